"""Reply caching of ``@rpc(idempotent=True, cache_ttl=...)`` methods, against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats
import pytest
import structlog
from children import poll
from micro_schemas import validate
from prometheus_client.parser import text_string_to_metric_families

import natsrpc
from natsrpc import DefinitionError, Service, rpc
from natsrpc.cache import ReplyCache
from natsrpc.observe import Observer
from natsrpc.observe.metrics import Metrics
from natsrpc.protocol import Heartbeat
from natsrpc.registry import Registry
from natsrpc.testing import serve

TTL = 30.0


class Point(msgspec.Struct):
    x: int
    y: int


class Store(Service):
    """A tiny store whose reads are cached; ``put`` invalidates the key it wrote."""

    name = "cachestore"

    def __init__(self) -> None:
        super().__init__()
        self.data: dict[str, str] = {}
        self.reads = 0
        self.hold = asyncio.Event()
        self.hold.set()
        self.holding = asyncio.Event()

    @rpc(idempotent=True, cache_ttl=TTL)
    async def get(self, key: str) -> str | None:
        self.reads += 1
        return self.data.get(key)

    @rpc(idempotent=True, cache_ttl=TTL)
    async def near(self, point: Point, radius: int = 1) -> list[int]:
        self.reads += 1
        return [point.x, point.y, radius]

    @rpc(idempotent=True, cache_ttl=TTL)
    async def slow_get(self, key: str) -> str | None:
        """Reads, then waits for ``hold`` before answering."""
        self.reads += 1
        value = self.data.get(key)
        self.holding.set()
        await self.hold.wait()
        return value

    @rpc
    async def put(self, key: str, value: str) -> None:
        self.data[key] = value
        await self.invalidate("get", key=key)
        await self.invalidate("slow_get", key=key)

    @rpc(idempotent=True)
    async def plain(self) -> int:
        self.reads += 1
        return self.reads


@pytest.fixture
async def store(client: natsrpc.Client) -> AsyncIterator[Store]:
    service = Store()
    async with serve(client, service, heartbeat_interval=0.2):  # clients that join learn the TTLs soon
        yield service


@pytest.fixture
async def app(nats_url: str, store: Store) -> AsyncIterator[natsrpc.Client]:
    """A second client that has seen the store's heartbeat (so it knows the TTLs)."""
    async with natsrpc.connect(nats_url) as other:
        assert other.registry is not None
        await poll(lambda: ("cachestore", "get") in other.registry.cached, "the store's beat is seen")
        yield other


class TestDefinition:
    def test_cache_ttl_needs_idempotent(self) -> None:
        """A non-idempotent method with cache_ttl is a DefinitionError at class definition."""
        with pytest.raises(DefinitionError, match="cache_ttl needs idempotent=True"):

            class Bad(Service):
                @rpc(cache_ttl=5)
                async def get(self) -> int:
                    return 1

    @pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf"), 1e9, True, "5"])
    def test_cache_ttl_must_be_usable_seconds(self, ttl: Any) -> None:
        """Zero, negative, NaN, infinite, over a day, a bool or a string: refused."""
        with pytest.raises(DefinitionError, match="cache_ttl must be seconds"):

            @rpc(idempotent=True, cache_ttl=ttl)
            async def get(self: Any) -> int:
                return 1

    def test_streams_are_not_cached(self) -> None:
        with pytest.raises(DefinitionError, match="not cached"):

            class Bad(Service):
                @rpc(idempotent=True, cache_ttl=5)
                async def items(self) -> AsyncIterator[int]:
                    yield 1


class TestDiscovery:
    async def test_info_and_heartbeats_advertise_the_ttl(self, app: natsrpc.Client, store: Store) -> None:
        """INFO metadata says cache_ttl for cached endpoints only; the registry learnt it from a heartbeat."""
        nc = await nats.connect(app.nc.connected_url.geturl() if app.nc.connected_url else "")
        try:
            reply = json.loads((await nc.request("$SRV.INFO.cachestore", b"", timeout=5)).data)
        finally:
            await nc.close()
        validate("INFO", reply)
        metadata = {e["name"]: e["metadata"] for e in reply["endpoints"]}
        assert metadata["get"]["cache_ttl"] == "30"
        assert "cache_ttl" not in metadata["put"]
        assert "cache_ttl" not in metadata["plain"]
        assert app.registry is not None
        assert app.registry.cached[("cachestore", "get")] == TTL
        assert ("cachestore", "plain") not in app.registry.cached

    def test_a_ttl_announced_for_a_method_not_idempotent_is_not_taken(self) -> None:
        """A heartbeat (from another implementation, or a bug) announcing cache_ttl on a method it
        does not declare idempotent (a write) gives it no TTL: clients send every call of it. Nor
        does a TTL for a method the beat does not serve, or one out of range."""
        registry = Registry()
        registry.observe(
            Heartbeat(
                "kv", "a", "1.0.0", ["get", "put"], 0, True, False, 2.0, ["get"], [],
                {"get": 5.0, "put": 5.0, "gone": 5.0},
            )
        )  # fmt: skip
        registry.observe(Heartbeat("vdb", "b", "1.0.0", ["q"], 0, True, False, 2.0, ["q"], [], {"q": 1e9}))
        assert registry.cached == {("kv", "get"): 5.0}


class TestCaching:
    async def test_a_cached_call_sends_no_request_until_invalidated(self, app: natsrpc.Client, store: Store) -> None:
        """Two gets: one request (the server's counter moves once). A put invalidates: the next get is sent."""
        store.data["a"] = "1"
        kv = app.call_service["cachestore"]
        assert await kv.get("a") == "1"
        assert await kv.get("a") == "1"
        assert store.reads == 1
        assert (app.cache.hits, app.cache.misses) == (1, 1)
        await kv.put("a", "2")  # its invalidation reaches this client before the put's reply
        assert await kv.get("a") == "2"
        assert store.reads == 2

    async def test_keys_are_per_arguments_and_encoding(self, app: natsrpc.Client, store: Store) -> None:
        """Other arguments or the other encoding are other entries."""
        kv = app.call_service["cachestore"]
        await kv.get("a")
        await kv.get("b")
        await kv.options(encoding="msgpack").get("a")
        assert store.reads == 3
        await kv.get("b")
        assert store.reads == 3

    async def test_options_cache_false_bypasses_and_refreshes(self, app: natsrpc.Client, store: Store) -> None:
        """cache=False sends the request and keeps its fresh reply for the next cached call."""
        kv = app.call_service["cachestore"]
        store.data["k"] = "old"
        assert await kv.get("k") == "old"
        store.data["k"] = "new"  # changed behind the cache's back: no invalidation
        assert await kv.get("k") == "old"
        assert await kv.options(cache=False).get("k") == "new"
        assert await kv.get("k") == "new"
        assert store.reads == 2

    async def test_clear_empties_a_service_or_a_method(self, app: natsrpc.Client, store: Store) -> None:
        kv = app.call_service["cachestore"]
        await kv.get("a")
        await kv.near(Point(1, 2))
        assert app.cache.clear("cachestore", "near") == 1
        assert app.cache.clear("cachestore") == 1
        await kv.get("a")
        assert store.reads == 3

    async def test_each_hit_decodes_anew(self, app: natsrpc.Client, store: Store) -> None:
        """Two callers never share a mutable result."""
        first = await app.call_service["cachestore"].near(Point(1, 2))
        first.append(99)
        assert await app.call_service["cachestore"].near(Point(1, 2)) == [1, 2, 1]

    async def test_invalidation_matches_struct_and_positional_arguments(
        self, app: natsrpc.Client, store: Store
    ) -> None:
        """invalidate("near", point=...) drops entries called with that point by position or name, not others."""
        kv = app.call_service["cachestore"]
        await kv.near(Point(1, 2))
        await kv.near(point=Point(1, 2), radius=3)
        await kv.near(Point(5, 5))
        assert store.reads == 3
        await store.invalidate("near", point=Point(1, 2))
        await poll(lambda: app.cache.invalidations == 2, "both entries of that point are dropped")
        await kv.near(Point(5, 5))
        assert store.reads == 3

    async def test_the_ttl_expires_entries(self, app: natsrpc.Client, store: Store) -> None:
        """An entry older than its TTL is not used (the clock is moved past it)."""
        now = [0.0]
        app.cache.clock = lambda: now[0]
        kv = app.call_service["cachestore"]
        await kv.get("a")
        now[0] = TTL - 0.1
        await kv.get("a")
        assert store.reads == 1
        now[0] = TTL + 0.1
        await kv.get("a")
        assert store.reads == 2

    async def test_uncached_methods_and_one_instance_calls_always_go_out(
        self, app: natsrpc.Client, store: Store
    ) -> None:
        """A method without cache_ttl, and a call to one instance, are never answered from the cache."""
        assert await app.call_service["cachestore"].plain() == 1
        assert await app.call_service["cachestore"].plain() == 2
        instance = store.ctx.instance_id
        one = app.call_service["cachestore"].options(instance=instance)
        await one.get("z")
        await one.get("z")
        assert store.reads == 4
        assert len(app.cache) == 0

    async def test_a_read_answered_after_an_invalidation_is_not_kept(self, app: natsrpc.Client, store: Store) -> None:
        """A get that read the old value, answered only after a put's invalidation reached the
        client, is returned but not kept: the next get is sent and sees the new value (kept, it
        would have served the old one for the whole TTL)."""
        store.data["r"] = "old"
        store.hold.clear()
        kv = app.call_service["cachestore"]
        slow = asyncio.ensure_future(kv.slow_get("r"))
        await store.holding.wait()  # it has read "old"
        await kv.put("r", "new")  # invalidates slow_get and get of "r": heard before the put's reply
        store.hold.set()
        assert await slow == "old"
        assert await kv.slow_get("r") == "new"
        assert await kv.slow_get("r") == "new"  # this one was kept
        assert store.reads == 2

    async def test_a_reply_is_kept_per_request_headers(self, app: natsrpc.Client, store: Store) -> None:
        """A reply to a call made with one Authorization header is not handed to a call made with
        another, or with none: the headers a call sends are part of its key."""
        kv = app.call_service["cachestore"]
        ann = kv.options(headers={"Authorization": "Bearer ann"})
        bob = kv.options(headers={"Authorization": "Bearer bob"})
        await ann.get("a")
        await bob.get("a")
        await kv.get("a")
        assert store.reads == 3
        await ann.get("a")
        await bob.get("a")
        await kv.get("a")
        assert store.reads == 3
        assert (app.cache.hits, app.cache.misses) == (3, 3)

    async def test_a_middlewares_headers_vary_the_key_but_trace_context_does_not(
        self, nats_url: str, store: Store
    ) -> None:
        """A header a client middleware adds (a tenant) is part of the key; the traceparent that
        tracing sets anew on every call, and the deadline, are not, so tracing leaves hits hits."""
        tenant = ["ann"]

        class Tenant(Observer):
            def begin(self, call: Any) -> None:
                call.headers["X-Tenant"] = tenant[0]
                call.headers["traceparent"] = f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"

        async with natsrpc.connect(nats_url, middleware=[Tenant()]) as other:
            assert other.registry is not None
            await poll(lambda: ("cachestore", "get") in other.registry.cached, "the store's beat is seen")
            kv = other.call_service["cachestore"]
            await kv.get("t")
            await kv.options(headers={"traceparent": f"00-{'1' * 32}-{'2' * 16}-01"}).get("t")
            assert store.reads == 1
            tenant[0] = "bob"
            await kv.get("t")
            assert store.reads == 2

    async def test_hits_and_misses_are_counted_in_the_metrics(self, nats_url: str, store: Store) -> None:
        metrics = Metrics()
        async with natsrpc.connect(nats_url, middleware=[metrics]) as other:
            assert other.registry is not None
            await poll(lambda: ("cachestore", "get") in other.registry.cached, "the store's beat is seen")
            for _ in range(3):
                await other.call_service["cachestore"].get("m")
        got = {
            (s.name, s.labels.get("result")): s.value
            for family in text_string_to_metric_families(metrics.exposition().decode())
            for s in family.samples
            if s.name == "natsrpc_client_cache_total"
        }
        assert got == {("natsrpc_client_cache_total", "hit"): 2, ("natsrpc_client_cache_total", "miss"): 1}


class TestBounds:
    def test_the_lru_keeps_at_most_max_entries(self) -> None:
        cache = ReplyCache(max_entries=3)
        for i in range(5):
            cache.put(("s", "m", False, str(i).encode(), b""), b"x", 10, (i,), {})
        assert len(cache) == 3
        assert cache.get(("s", "m", False, b"0", b"")) is None
        assert cache.get(("s", "m", False, b"4", b"")) == b"x"

    def test_the_lru_keeps_at_most_max_bytes(self) -> None:
        """Replies and their encoded arguments count against max_bytes: the least recently used go
        first, a reply over the bound alone is not kept (and drops the entry it would replace)."""
        cache = ReplyCache(max_entries=100, max_bytes=1000)
        for i in range(10):
            cache.put(("s", "m", False, b"%d" % i, b""), b"x" * 149, 10, (i,), {})  # 150 bytes each
        assert (len(cache), cache.bytes) == (6, 900)
        assert cache.get(("s", "m", False, b"3", b"")) is None
        assert cache.get(("s", "m", False, b"4", b"")) is not None
        cache.put(("s", "m", False, b"4", b""), b"x" * 1000, 10, (4,), {})  # 1,001 bytes: not kept
        assert cache.get(("s", "m", False, b"4", b"")) is None
        assert (len(cache), cache.bytes) == (5, 750)
        assert cache.clear("s") == 5
        assert cache.bytes == 0

    def test_zero_entries_turns_caching_off(self) -> None:
        cache = ReplyCache(max_entries=0)
        cache.put(("s", "m", False, b"a", b""), b"x", 10, (), {})
        assert len(cache) == 0

    @pytest.mark.parametrize(
        "body",
        [
            b"not json",
            b"[]",
            b'{"method": 5}',
            b'{"arguments": {}}',
            b"{" * 100_000,
            b'{"method": "get"}' + b" " * 70_000,
        ],
    )
    def test_bad_invalidations_are_ignored(self, body: bytes) -> None:
        """Garbage, a wrong shape, deep nesting or an oversized body: nothing dropped, nothing raised."""
        cache = ReplyCache()
        cache.put(("s", "get", False, b"a", b""), b"x", 10, ("a",), {})
        assert cache.on_invalidation("s", body) == 0
        assert len(cache) == 1

    def test_a_flood_of_bad_invalidations_logs_little(self) -> None:
        """1,000 garbage messages are each counted, and logged 10 times (the 1st, 2nd, 4th ... 512th)."""
        cache = ReplyCache()
        with structlog.testing.capture_logs() as logs:
            for _ in range(1000):
                cache.on_invalidation("s", b"not json" * 100)
        assert cache.ignored == 1000
        assert [entry["ignored"] for entry in logs] == [1 << n for n in range(10)]
        assert all(len(entry["detail"]) <= 200 for entry in logs)

    def test_an_invalidation_looks_only_at_the_entries_holding_its_value(self) -> None:
        """With 10,000 entries kept, invalidating one value compares none of the others' arguments
        (each compare is counted): its cost is what it drops, not what the cache holds."""

        class Counted:  # not JSON: kept as it is, so a comparison with it runs __eq__
            compared = 0

            def __eq__(self, other: object) -> bool:
                Counted.compared += 1
                return other is self

            __hash__ = object.__hash__

        cache = ReplyCache(max_entries=20_000)
        for i in range(10_000):
            cache.put(("s", "get", False, b"%d" % i, b""), b"x", 10, (Counted(),), {"other": Counted()})
        cache.put(("s", "get", False, b"a", b""), b"x", 10, ("a",), {})
        cache.put(("s", "get", False, b"b", b""), b"x", 10, (), {"key": "a"})
        assert cache.on_invalidation("s", b'{"method": "get", "arguments": {"key": "a"}}') == 2
        assert Counted.compared == 0
        assert len(cache) == 10_000

    def test_invalidation_by_a_list_or_an_object_and_by_several_values(self) -> None:
        """Values that cannot be looked up (a list, an object) are found among the method's entries;
        with several values an entry must hold them all, by name or by position."""
        cache = ReplyCache()
        cache.put(("s", "near", False, b"1", b""), b"x", 10, (Point(1, 2),), {"tags": ("a", "b")})
        cache.put(("s", "near", False, b"2", b""), b"x", 10, (Point(1, 2),), {"tags": ("c",)})
        cache.put(("s", "near", False, b"3", b""), b"x", 10, (Point(5, 5), 3), {})
        cache.put(("s", "far", False, b"3", b""), b"x", 10, (Point(5, 5), 3), {})
        drop = b'{"method": "near", "arguments": {"point": {"x": 1, "y": 2}, "tags": ["a", "b"]}}'
        assert cache.on_invalidation("s", drop) == 1
        assert (
            cache.on_invalidation("s", b'{"method": "near", "arguments": {"radius": 3, "point": {"x": 1, "y": 2}}}')
            == 0
        )
        assert (
            cache.on_invalidation("s", b'{"method": "near", "arguments": {"radius": 3, "point": {"x": 5, "y": 5}}}')
            == 1
        )
        assert len(cache) == 2

    def test_entries_gone_leave_nothing_in_the_indexes(self) -> None:
        """Entries dropped by the LRU bound, by expiry, by clear and by invalidation are forgotten
        by the value indexes too: they hold no more than the entries kept."""
        now = [0.0]
        cache = ReplyCache(max_entries=100, clock=lambda: now[0])
        for i in range(1000):
            cache.put(("s", "get", False, b"%d" % i, b""), b"x", 10, (f"k{i}",), {"n": i})
        assert len(cache) == 100
        assert len(cache._by_value) == 200
        now[0] = 20.0
        assert cache.get(("s", "get", False, b"999", b"")) is None  # expired
        assert cache.on_invalidation("s", b'{"method": "get", "arguments": {"n": 998}}') == 1
        assert cache.clear("s", "get") == 98
        assert (len(cache), cache._by_value, cache._by_method) == (0, {}, {})

    def test_an_invalidation_names_its_service_by_subject(self) -> None:
        """The service is the subject's, never the body's: another service's entries stay."""
        cache = ReplyCache()
        cache.put(("kv", "get", False, b"a", b""), b"x", 10, ("a",), {})
        assert cache.on_invalidation("evil", b'{"method": "get", "arguments": {}}') == 0
        assert cache.on_invalidation("kv", b'{"method": "get", "arguments": {}}') == 1

    async def test_invalidate_checks_its_arguments(self, store: Store) -> None:
        with pytest.raises(natsrpc.ConfigurationError, match="not a cached method"):
            await store.invalidate("put")
        with pytest.raises(natsrpc.ConfigurationError, match="no argument nope"):
            await store.invalidate("get", nope=1)
        with pytest.raises(natsrpc.ConfigurationError, match="not encodable"):
            await store.invalidate("get", key=object())

    def test_connect_refuses_a_bad_cache_size(self) -> None:
        for size in (-1, 1.5, True, "10"):
            with pytest.raises(natsrpc.ConfigurationError, match="cache_size"):
                natsrpc.connect("nats://127.0.0.1:1", cache_size=size)  # type: ignore[arg-type]
            with pytest.raises(natsrpc.ConfigurationError, match="cache_bytes"):
                natsrpc.connect("nats://127.0.0.1:1", cache_bytes=size)  # type: ignore[arg-type]


async def test_many_clients_all_drop_on_invalidate(nats_url: str, store: Store) -> None:
    """Three clients keep a reply; one put makes each of them ask again."""
    clients = [await natsrpc.connect(nats_url) for _ in range(3)]
    try:
        for c in clients:
            assert c.registry is not None
            await poll(lambda c=c: ("cachestore", "get") in c.registry.cached, "beat seen")  # type: ignore[misc]
            await c.call_service["cachestore"].get("shared")
        assert store.reads == 3
        await clients[0].call_service["cachestore"].put("shared", "v")
        await poll(lambda: all(len(c.cache) == 0 for c in clients), "every client dropped its entry")
        for c in clients:
            assert await c.call_service["cachestore"].get("shared") == "v"
        assert store.reads == 6
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def test_a_reconnect_drops_the_cache() -> None:
    """Invalidations published while a client was cut off never reach it: once its connection is
    back, it has dropped every entry, and the next get is sent (the server's counter moves)."""
    store = Store()
    with natsrpc.NatsServer() as server:
        async with (
            natsrpc.connect(server.url) as host_client,
            serve(host_client, store, heartbeat_interval=0.2),
            natsrpc.connect(server.url) as other,
        ):
            assert other.registry is not None
            await poll(lambda: ("cachestore", "get") in other.registry.cached, "the store's beat is seen")
            kv = other.call_service["cachestore"]
            await kv.get("a")
            await kv.get("a")
            assert (store.reads, len(other.cache)) == (1, 1)
            await asyncio.to_thread(server.restart)
            await poll(lambda: other.nc.is_connected and len(other.cache) == 0, "reconnected, the cache dropped")
            await poll(lambda: ("cachestore", "get") in other.registry.cached, "the store's beat is seen again")
            await kv.options(timeout=10).get("a")
            assert store.reads == 2
