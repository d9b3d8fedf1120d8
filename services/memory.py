"""A memory service composing kv (texts) and vdb (embeddings): ``python -m natsrpc.run services.memory``.

It shows service-to-service calls: ``self.call_service["kv"]`` and a typed proxy of VDB, both
carrying the caller's deadline and trace.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

import msgspec

from natsrpc import Service, rpc
from services.vdb import VDB, Hit

KEY_PREFIX = "memory:"
_WORD = re.compile(r"[a-z0-9]+")


class Embedder(Protocol):
    """Turns text into a vector; plug a real model in by passing one to ``Memory(embedder=...)``."""

    def __call__(self, text: str) -> list[float]: ...


def hashed_bag_of_words(text: str, dim: int = 256) -> list[float]:
    """A small deterministic local embedding: each lower-cased word hashed into one of ``dim`` buckets.

    Texts that share words get a high cosine similarity; good enough for examples and tests.
    """
    vector = [0.0] * dim
    for word in _WORD.findall(text.lower()):
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        bucket = int.from_bytes(digest[:4], "little") % dim
        vector[bucket] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


class MemoryItem(msgspec.Struct):
    """One recalled memory: its id, text, similarity to the query and metadata."""

    id: str
    text: str
    score: float
    metadata: dict[str, str] = {}


class MemoryEvent(msgspec.Struct):
    """The payload of ``memory.remembered`` and ``memory.forgotten`` (no text when forgotten)."""

    id: str
    text: str = ""


class Memory(Service):
    """Remembers texts: the text in kv under ``memory:<id>``, its embedding in vdb under ``<id>``."""

    name = "memory"
    version = "1.0.0"
    description = "Semantic memory over kv and vdb"

    def __init__(self, embedder: Embedder = hashed_bag_of_words) -> None:
        self.embed = embedder

    @rpc
    async def remember(self, text: str, metadata: dict[str, str] | None = None) -> str:
        """Stores ``text`` and returns its new id."""
        id_ = uuid.uuid4().hex
        vdb = self.ctx.client.proxy(VDB)
        vector = await asyncio.to_thread(self.embed, text)  # CPU work off the event loop (1 MB: ~0.2 s here)
        await self.call_service["kv"].put(KEY_PREFIX + id_, text)
        try:
            await vdb.upsert(id_, vector, metadata)
        except BaseException:
            # No orphan text: the memory is stored in both services or in neither. The delete is
            # shielded so a cancelled remember still cleans up.
            await asyncio.shield(self._drop_text(id_))
            raise
        await self.emit("memory.remembered", MemoryEvent(id_, text))
        return id_

    async def _drop_text(self, id_: str) -> None:
        try:
            await self.call_service["kv"].delete(KEY_PREFIX + id_)
        except Exception as exc:
            self.ctx.log.warning("could not remove the text of a failed remember", id=id_, error=repr(exc))

    @rpc(idempotent=True)
    async def recall(self, query: str, k: int = 5) -> list[MemoryItem]:
        """Returns the ``k`` memories most similar to ``query``, best first."""
        hits = await self.ctx.client.proxy(VDB).search(await asyncio.to_thread(self.embed, query), k)
        kv = self.call_service["kv"]
        texts = await asyncio.gather(*(kv.get(KEY_PREFIX + hit.id) for hit in hits))
        return [
            MemoryItem(hit.id, text, hit.score, hit.metadata)
            for hit, text in zip(hits, texts, strict=True)
            if text is not None
        ]

    @rpc(idempotent=True)
    async def recall_stream(self, query: str, k: int = 5) -> AsyncIterator[MemoryItem]:
        """Streams the ``k`` memories most similar to ``query`` as their texts come back from kv
        (fastest first, not best first: each item carries its score)."""
        hits = await self.ctx.client.proxy(VDB).search(await asyncio.to_thread(self.embed, query), k)
        kv = self.call_service["kv"]

        async def fetch(hit: Hit) -> tuple[Hit, str | None]:
            text: str | None = await kv.get(KEY_PREFIX + hit.id)
            return hit, text

        pending = [asyncio.ensure_future(fetch(hit)) for hit in hits]
        try:
            for done in asyncio.as_completed(pending):
                hit, text = await done
                if text is not None:
                    yield MemoryItem(hit.id, text, hit.score, hit.metadata)
        finally:
            for task in pending:  # the caller left early: stop the lookups still running
                task.cancel()

    @rpc
    async def forget(self, id: str) -> bool:
        """Removes the memory from kv and vdb; returns whether it existed."""
        in_kv, in_vdb = await asyncio.gather(
            self.call_service["kv"].delete(KEY_PREFIX + id), self.ctx.client.proxy(VDB).delete(id)
        )
        existed = bool(in_kv or in_vdb)
        if existed:
            await self.emit("memory.forgotten", MemoryEvent(id, ""))
        return existed
