"""A key-value service: ``python -m natsrpc.run services.kv``.

With JetStream on the server (the runner's embedded one has it), the data lives in the JetStream
key-value bucket ``kv`` (created if missing): every kv instance shares it, a put is seen by the
next get on any instance, and it survives restarts. Without JetStream each instance keeps its own
dict in memory, and says so in a warning.
"""

from __future__ import annotations

from typing import Any

import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig

from natsrpc import Service, rpc

BUCKET = "kv"
_KEYS_ATTEMPTS = 3


def _stored(key: str) -> str:
    """A key as the bucket stores it: its UTF-8 bytes in hex, which keeps prefixes prefixes (JetStream
    allows only ``[-/_=.a-zA-Z0-9]`` in keys, and ``memory:<id>`` has a colon)."""
    return key.encode().hex()


class KV(Service):
    """Stores string values under string keys: in the JetStream bucket ``kv``, or in memory."""

    name = "kv"
    version = "1.0.0"
    description = "Key-value store (JetStream bucket kv, or in memory)"

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.bucket: Any = None  # the JetStream bucket, when the server has JetStream

    async def setup(self) -> None:
        """Binds the bucket ``kv`` (creating it), or falls back to memory without JetStream."""
        js = self.ctx.client.nc.jetstream()
        try:
            try:
                self.bucket = await js.key_value(BUCKET)
            except nats.js.errors.BucketNotFoundError:
                self.bucket = await js.create_key_value(KeyValueConfig(bucket=BUCKET, history=1))
        except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError, nats.errors.TimeoutError):
            self.ctx.log.warning("no JetStream on this server: kv keeps its data in memory, per instance")
            self.bucket = None

    @rpc
    async def put(self, key: str, value: str) -> None:
        """Stores ``value`` under ``key``, replacing any previous value."""
        if self.bucket is None:
            self.data[key] = value
            return
        await self.bucket.put(_stored(key), value.encode())

    @rpc(idempotent=True)
    async def get(self, key: str) -> str | None:
        """Returns the value under ``key``, or None."""
        if self.bucket is None:
            return self.data.get(key)
        try:
            entry = await self.bucket.get(_stored(key))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return entry.value.decode() if entry.value is not None else None

    @rpc
    async def delete(self, key: str) -> bool:
        """Removes ``key``; returns whether it existed."""
        if self.bucket is None:
            return self.data.pop(key, None) is not None
        existed = await self.get(key) is not None
        if existed:
            await self.bucket.delete(_stored(key))
        return existed

    @rpc(idempotent=True)
    async def keys(self, prefix: str = "") -> list[str]:
        """Returns the keys that start with ``prefix``, sorted."""
        if self.bucket is None:
            return sorted(k for k in self.data if k.startswith(prefix))
        stored: list[str] = []
        for _ in range(_KEYS_ATTEMPTS):
            try:
                stored = await self.bucket.keys()
                break
            except nats.js.errors.NoKeysError:
                # nats-py's key watcher now and then ends before the first key; an empty answer from
                # a bucket that holds values is asked again (a bucket of deletes only stays empty).
                if (await self.bucket.status()).values == 0:
                    break
        wanted = _stored(prefix)
        return sorted(bytes.fromhex(k).decode() for k in stored if k.startswith(wanted))
