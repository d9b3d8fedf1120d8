"""An in-memory key-value service: ``python -m natsrpc.run services.kv``."""

from __future__ import annotations

from natsrpc import Service, rpc


class KV(Service):
    """Stores string values under string keys, in memory, per instance."""

    name = "kv"
    version = "1.0.0"
    description = "In-memory key-value store"

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    @rpc
    async def put(self, key: str, value: str) -> None:
        """Stores ``value`` under ``key``, replacing any previous value."""
        self.data[key] = value

    @rpc(idempotent=True)
    async def get(self, key: str) -> str | None:
        """Returns the value under ``key``, or None."""
        return self.data.get(key)

    @rpc
    async def delete(self, key: str) -> bool:
        """Removes ``key``; returns whether it existed."""
        return self.data.pop(key, None) is not None

    @rpc(idempotent=True)
    async def keys(self, prefix: str = "") -> list[str]:
        """Returns the keys that start with ``prefix``, sorted."""
        return sorted(k for k in self.data if k.startswith(prefix))
