"""The client's reply cache: successful replies of ``@rpc(idempotent=True, cache_ttl=...)`` methods.

A call to a method whose instances announce a ``cache_ttl`` (in their heartbeats) is answered
from a reply kept for the same service, method, encoding and encoded arguments, until the TTL
passes, without sending a request. The cache is a bounded LRU (``connect(cache_size=...)``,
default 10,000 entries); it keeps the reply's bytes and decodes them for each caller, so no two
callers share a mutable result.

``.options(cache=False)`` sends the request anyway and keeps the fresh reply;
``client.cache.clear(service, method=None)`` empties entries. A service's
``await self.invalidate("get", key="a")`` reaches every client on ``svc._inval.<service>``: each
drops the entries of that method whose arguments hold every value named (a value given
positionally matches too: dropping one entry too many is harmless, keeping a stale one is not).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from natsrpc import logs

log = logs.get_logger("natsrpc.cache")

DEFAULT_CACHE_SIZE = 10_000
MAX_INVALIDATION_BYTES = 64 * 1024  # an invalidation message larger than this is ignored

Key = tuple[str, str, bool, bytes]
"""(service, method, msgpack, encoded arguments)."""


class _Entry:
    __slots__ = ("args", "data", "expires", "kwargs")

    def __init__(self, data: bytes, expires: float, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        self.data = data
        self.expires = expires
        self.args = args
        self.kwargs = kwargs


class _Invalidation(msgspec.Struct):
    method: str
    arguments: dict[str, Any] = {}


_decode_invalidation = msgspec.json.Decoder(_Invalidation).decode


class ReplyCache:
    """Replies kept by one client, at most ``max_entries`` (least recently used dropped first).

    Args:
        max_entries: the most replies kept (0 turns caching off).
        clock: monotonic seconds (inject a fake in tests).

    Attributes:
        hits: calls answered from the cache.
        misses: calls to a cached method that sent a request (nothing kept, expired, or bypassed).
        invalidations: entries dropped by services' invalidations.
    """

    def __init__(self, max_entries: int = DEFAULT_CACHE_SIZE, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self.hits = 0
        self.misses = 0
        self.invalidations = 0
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key) -> bytes | None:
        """Returns the kept reply for ``key`` if it has not expired (counting a hit), else None (a miss)."""
        entry = self._entries.get(key)
        if entry is not None:
            if self.clock() < entry.expires:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry.data
            del self._entries[key]
        self.misses += 1
        return None

    def put(self, key: Key, data: bytes, ttl: float, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """Keeps a successful reply for ``ttl`` seconds, dropping the least recently used beyond the bound."""
        if self.max_entries <= 0:
            return
        self._entries[key] = _Entry(data, self.clock() + ttl, args, dict(kwargs))
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self, service: str, method: str | None = None) -> int:
        """Drops every entry of ``service`` (of ``method`` only, if given); returns how many."""
        doomed = [k for k in self._entries if k[0] == service and (method is None or k[1] == method)]
        for key in doomed:
            del self._entries[key]
        return len(doomed)

    def invalidate(self, service: str, method: str, arguments: Mapping[str, Any]) -> int:
        """Drops the entries of ``service.method`` whose arguments hold every value in ``arguments``
        (by name, or among the positional ones); all of the method's entries when it is empty."""
        doomed = [
            key
            for key, entry in self._entries.items()
            if key[0] == service and key[1] == method and _matches(entry, arguments)
        ]
        for key in doomed:
            del self._entries[key]
        self.invalidations += len(doomed)
        return len(doomed)

    def on_invalidation(self, service: str, body: bytes) -> int:
        """Takes an invalidation message of ``service`` (named by its subject, not its body); returns
        the entries dropped. A message that breaks the format is logged and ignored."""
        if len(body) > MAX_INVALIDATION_BYTES:
            log.warning("cache invalidation ignored: too large", service=service, size=len(body))
            return 0
        try:
            message = _decode_invalidation(body)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            log.warning("cache invalidation ignored: not {method, arguments} JSON", service=service, error=str(exc))
            return 0
        return self.invalidate(service, message.method, message.arguments)


def _matches(entry: _Entry, arguments: Mapping[str, Any]) -> bool:
    for name, value in arguments.items():
        if name in entry.kwargs:
            if not _same(entry.kwargs[name], value):
                return False
        elif not any(_same(arg, value) for arg in entry.args):
            return False
    return True


def _same(arg: Any, value: Any) -> bool:
    """Whether a positional argument equals an invalidation's value (which came through JSON)."""
    if arg == value:
        return True
    try:  # a Struct, tuple or other value JSON turns into a dict or a list
        return bool(msgspec.json.decode(msgspec.json.encode(arg)) == value)
    except (TypeError, msgspec.EncodeError):
        return False
