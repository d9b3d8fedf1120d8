"""The client's reply cache: successful replies of ``@rpc(idempotent=True, cache_ttl=...)`` methods.

A call to a method whose instances announce a ``cache_ttl`` (in their heartbeats) is answered
from a reply kept for the same service, method, encoding, encoded arguments and request headers,
until the TTL passes, without sending a request. The headers are those of ``.options(headers=...)``
and of the client's middleware, all but the trace context and the deadline (which change with
every call and do not change a reply): a reply to a call made with one ``Authorization`` or
tenant header is never handed to a call made with another. The cache is an LRU bounded twice
(``connect(cache_size=...)``, default 10,000 entries, and ``connect(cache_bytes=...)``, default
64 MiB of replies: a reply larger than that is not kept); it keeps the reply's bytes and decodes
them for each caller, so no two callers share a mutable result.

A reply is kept only if no invalidation (or ``clear``) of its method came while its request was
out: one read before a write but answered after the write's invalidation (by another instance,
say) would otherwise be kept, stale, for the whole TTL. In-flight calls are told apart by 256
counters, each shared by the methods that hash to it: bounded, whatever method names invalidations carry.

When the client's connection comes back after an outage, the whole cache is dropped: the
invalidations published while it was away never reached it.

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

from natsrpc import logs, protocol

log = logs.get_logger("natsrpc.cache")

DEFAULT_CACHE_SIZE = 10_000
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024  # of replies and encoded arguments kept
MAX_INVALIDATION_BYTES = 64 * 1024  # an invalidation message larger than this is ignored

Key = tuple[str, str, bool, bytes, bytes]
"""(service, method, msgpack, encoded arguments, the request headers a reply may depend on: :func:`varied`)."""

_UNVARIED = frozenset((protocol.TRACEPARENT, "tracestate", protocol.DEADLINE))  # new with every call


def varied(*blocks: Mapping[str, str] | None) -> bytes:
    """The part of a cache key that the request headers make: every header in ``blocks`` (the later
    block's value winning, as the headers sent are merged), but the trace context and the deadline,
    as name and value lines in name order; b"" for none."""
    merged = {name: value for block in blocks if block for name, value in block.items() if name not in _UNVARIED}
    if not merged:
        return b""
    return "\r\n".join(f"{name}: {merged[name]}" for name in sorted(merged)).encode()


_STRIPES = 256  # invalidation counters (a power of two): a method's is at hash((service, method)) & 255

_POSITIONAL = ""  # the name under which positional values are indexed (no argument is named "")


class _Entry:
    """A kept reply, its arguments as plain values (what JSON would give for them, as an
    invalidation carries them) and the value-index slots it is in."""

    __slots__ = ("args", "data", "expires", "indexed", "kwargs")

    def __init__(self, data: bytes, expires: float, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        self.data = data
        self.expires = expires
        self.args = [_plain(arg) for arg in args]
        self.kwargs = {name: _plain(value) for name, value in kwargs.items()}
        self.indexed: list[tuple[str, Any]] = []


class _Invalidation(msgspec.Struct):
    method: str
    arguments: dict[str, Any] = {}


_decode_invalidation = msgspec.json.Decoder(_Invalidation).decode


class ReplyCache:
    """Replies kept by one client, at most ``max_entries`` (least recently used dropped first).

    Args:
        max_entries: the most replies kept (0 turns caching off).
        clock: monotonic seconds (inject a fake in tests).
        max_bytes: the most bytes of replies and encoded arguments kept (0 turns caching off); a
            reply whose entry alone is over it is not kept.

    Attributes:
        hits: calls answered from the cache.
        misses: calls to a cached method that sent a request (nothing kept, expired, or bypassed).
        invalidations: entries dropped by services' invalidations.
    """

    def __init__(
        self,
        max_entries: int = DEFAULT_CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        self.bytes = 0
        """The bytes of replies and encoded arguments kept now."""
        self.hits = 0
        self.misses = 0
        self.invalidations = 0
        self._ignored = logs.Ignored(log)
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        # So an invalidation looks only at the entries it may drop, not at every entry kept:
        self._by_method: dict[tuple[str, str], set[Key]] = {}  # (service, method) -> its keys
        self._by_value: dict[tuple[str, str, str, Any], set[Key]] = {}  # (service, method, name, value) -> keys
        self._epochs = [0] * _STRIPES  # invalidations and clears so far, by the methods' stripe

    def epoch(self, service: str, method: str) -> int:
        """The count of invalidations and clears of ``service.method`` (and of the methods sharing
        its counter) so far: taken before a request, handed to :meth:`put` with its reply."""
        return self._epochs[hash((service, method)) & (_STRIPES - 1)]

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
            self._drop(key)
        self.misses += 1
        return None

    def put(
        self,
        key: Key,
        data: bytes,
        ttl: float,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        epoch: int | None = None,
    ) -> None:
        """Keeps a successful reply for ``ttl`` seconds, dropping the least recently used beyond the
        bound; not if :meth:`epoch` moved since ``epoch`` (taken when the request went out): the
        method was invalidated meanwhile, so the reply may predate the write."""
        if key in self._entries:
            self._drop(key)
        if epoch is not None and epoch != self.epoch(key[0], key[1]):
            return
        size = len(data) + len(key[3]) + len(key[4])
        if self.max_entries <= 0 or size > self.max_bytes:
            return
        entry = self._entries[key] = _Entry(data, self.clock() + ttl, args, kwargs)
        self.bytes += size
        service, method = key[0], key[1]
        self._by_method.setdefault((service, method), set()).add(key)
        values = [(_POSITIONAL, value) for value in entry.args] + list(entry.kwargs.items())
        for slot in values:
            try:
                self._by_value.setdefault((service, method, *slot), set()).add(key)
            except TypeError:  # a list or a dict: found by a scan of the method's entries
                continue
            entry.indexed.append(slot)
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: Key) -> None:
        """Forgets an entry, and its places in the indexes."""
        entry = self._entries.pop(key)
        self.bytes -= len(entry.data) + len(key[3]) + len(key[4])
        service, method = key[0], key[1]
        keys = self._by_method[service, method]
        keys.discard(key)
        if not keys:
            del self._by_method[service, method]
        for name, value in entry.indexed:
            index = (service, method, name, value)
            keys = self._by_value[index]
            keys.discard(key)
            if not keys:
                del self._by_value[index]

    def clear(self, service: str, method: str | None = None) -> int:
        """Drops every entry of ``service`` (of ``method`` only, if given); returns how many."""
        doomed = [k for m, keys in self._by_method.items() if m[0] == service and method in (None, m[1]) for k in keys]
        self._moved(None if method is None else (service, method))
        for key in doomed:
            self._drop(key)
        return len(doomed)

    def clear_all(self) -> int:
        """Drops every entry, and keeps no reply of a call out now; returns how many were dropped.
        The client calls it when its connection comes back: invalidations sent while it was away
        were missed."""
        dropped = len(self._entries)
        self._entries.clear()
        self._by_method.clear()
        self._by_value.clear()
        self.bytes = 0
        self._moved(None)
        return dropped

    def invalidate(self, service: str, method: str, arguments: Mapping[str, Any]) -> int:
        """Drops the entries of ``service.method`` whose arguments hold every value in ``arguments``
        (by name, or among the positional ones); all of the method's entries when it is empty.

        Only the entries holding one of the values are looked at (an index by value), so an
        invalidation costs what it drops, not what the cache holds; a value that is a list or an
        object is looked for among the method's entries."""
        self._moved((service, method))
        candidates = self._candidates(service, method, arguments)
        doomed = [key for key in candidates if _matches(self._entries[key], arguments)]
        for key in doomed:
            self._drop(key)
        self.invalidations += len(doomed)
        return len(doomed)

    def _moved(self, method: tuple[str, str] | None) -> None:
        """Counts an invalidation or clear of ``(service, method)``, or of every method (None)."""
        if method is None:
            self._epochs = [n + 1 for n in self._epochs]
        else:
            self._epochs[hash(method) & (_STRIPES - 1)] += 1

    def _candidates(self, service: str, method: str, arguments: Mapping[str, Any]) -> list[Key]:
        """The keys of ``service.method`` that may match: those holding the first value that can be
        looked up (by its name, or positionally), else every key of the method."""
        for name, value in arguments.items():
            try:
                named = self._by_value.get((service, method, name, value), ())
                positional = self._by_value.get((service, method, _POSITIONAL, value), ())
            except TypeError:  # a list or a dict: no index
                continue
            return list({*named, *positional})
        return list(self._by_method.get((service, method), ()))

    def on_invalidation(self, service: str, body: bytes) -> int:
        """Takes an invalidation message of ``service`` (named by its subject, not its body); returns
        the entries dropped. A message that breaks the format is logged and ignored."""
        if len(body) > MAX_INVALIDATION_BYTES:
            self._ignored("cache invalidation ignored: too large", service=service, detail=f"{len(body)} bytes")
            return 0
        try:
            message = _decode_invalidation(body)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            self._ignored("cache invalidation ignored: not {method, arguments} JSON", service=service, detail=str(exc))
            return 0
        return self.invalidate(service, message.method, message.arguments)

    @property
    def ignored(self) -> int:
        """Invalidation messages ignored for breaking the format."""
        return self._ignored.count


def _matches(entry: _Entry, arguments: Mapping[str, Any]) -> bool:
    for name, value in arguments.items():
        if name in entry.kwargs:
            if entry.kwargs[name] != value:
                return False
        elif value not in entry.args:
            return False
    return True


def _plain(value: Any) -> Any:
    """An argument as an invalidation carries it: what JSON makes of it (a Struct or a dataclass
    becomes a dict, a tuple a list, bytes base64 text), or the value itself when JSON cannot
    carry it (then only an equal value matches)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    try:
        return msgspec.json.decode(msgspec.json.encode(value))
    except (TypeError, msgspec.EncodeError, RecursionError):
        return value
