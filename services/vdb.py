"""An in-memory vector store with cosine-similarity search: ``python -m natsrpc.run services.vdb``."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import msgspec

from natsrpc import BadRequest, Service, rpc


class Hit(msgspec.Struct):
    """One search result: the vector's id, its cosine similarity to the query, its metadata."""

    id: str
    score: float
    metadata: dict[str, str] = {}


class VDB(Service):
    """Stores vectors of one dimension (``dim`` in the config, else the first upsert's until the store empties).

    State lives in memory, per instance: run one instance (two would each hold half the vectors).
    """

    name = "vdb"
    version = "1.0.0"
    description = "In-memory vector store, cosine similarity"

    def __init__(self) -> None:
        self.vectors: dict[str, tuple[list[float], float, dict[str, str]]] = {}
        self.configured_dim: int | None = None  # from the config: fixed for good
        self.dim: int | None = None  # the dimension held: the configured one, else the first upsert's

    async def setup(self) -> None:
        """Takes the vector dimension from the config, when given."""
        dim = self.ctx.config.get("dim")
        self.configured_dim = self.dim = int(dim) if dim is not None else None

    def _check(self, vector: list[float]) -> float:
        if not vector:
            raise BadRequest("vector must not be empty")
        if not all(math.isfinite(x) for x in vector):
            raise BadRequest("vector components must be finite numbers (no NaN or infinity)")
        if self.dim is not None and len(vector) != self.dim:
            raise BadRequest(f"vector has dimension {len(vector)}, this store holds dimension {self.dim}")
        return math.sqrt(sum(x * x for x in vector))

    @rpc
    async def upsert(self, id: str, vector: list[float], metadata: dict[str, str] | None = None) -> None:
        """Stores (or replaces) ``vector`` under ``id`` with optional string metadata."""
        norm = self._check(vector)
        self.dim = len(vector)
        self.vectors[id] = (vector, norm, metadata or {})

    @rpc(idempotent=True)
    async def search(self, vector: list[float], k: int = 5) -> list[Hit]:
        """Returns the ``k`` stored vectors most similar to ``vector``, best first."""
        if k < 1:
            raise BadRequest(f"k must be >= 1, got {k}")
        norm = self._check(vector)
        hits = []
        for id_, (stored, stored_norm, metadata) in self.vectors.items():
            dot = sum(a * b for a, b in zip(vector, stored, strict=True))
            score = dot / (norm * stored_norm) if norm and stored_norm else 0.0
            hits.append(Hit(id_, score, metadata))
        hits.sort(key=lambda h: h.score, reverse=True)
        return hits[:k]

    @rpc
    async def delete(self, id: str) -> bool:
        """Removes ``id``; returns whether it existed. An emptied store forgets a dimension it learnt."""
        existed = self.vectors.pop(id, None) is not None
        if not self.vectors:
            self.dim = self.configured_dim
        return existed

    @rpc(idempotent=True)
    async def scan(self, batch: int = 100) -> AsyncIterator[Hit]:
        """Streams every stored vector as a Hit (score 1.0), ``batch`` at a time between yields to the loop.

        It streams what was stored when the scan started; later upserts and deletes do not disturb it.
        """
        if batch < 1:
            raise BadRequest(f"batch must be >= 1, got {batch}")
        snapshot = [(id_, metadata) for id_, (_, _, metadata) in self.vectors.items()]
        for start in range(0, len(snapshot), batch):
            for id_, metadata in snapshot[start : start + batch]:
                yield Hit(id_, 1.0, metadata)
            await asyncio.sleep(0)  # other calls run between batches

    @rpc(idempotent=True)
    async def count(self) -> int:
        """Returns the number of stored vectors."""
        return len(self.vectors)
