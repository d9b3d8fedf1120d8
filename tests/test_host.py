"""Tests of natsrpc.host: wire compatibility, validation, concurrency, overload, deadlines, limits, lifecycle.

Every test talks to a real nats-server (the session server, or its own where a server option matters).
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from children import poll
from nats.aio.client import Client as NatsConnection
from nats.aio.msg import Msg

import natsrpc
from natsrpc import Service, codec, protocol, rpc
from natsrpc.testing import serve
from services.kv import KV

# --------------------------------------------------------------------------------------------------
# Services used by the tests (module level: annotations resolve against module globals).
# --------------------------------------------------------------------------------------------------


class Point(msgspec.Struct):
    """A point stamped with a time, to round-trip a Struct with a datetime inside."""

    x: int
    y: int
    at: datetime


class Geometry(Service):
    """Takes and returns Structs and datetimes."""

    name = "th-geo"

    @rpc
    async def shift(self, p: Point, dx: int, dy: int = 0) -> Point:
        """Returns ``p`` moved by (dx, dy), one hour later."""
        return Point(p.x + dx, p.y + dy, p.at + timedelta(hours=1))

    @rpc
    async def later(self, when: datetime, minutes: int) -> datetime:
        """Returns ``when`` plus ``minutes``."""
        return when + timedelta(minutes=minutes)


class Calc(Service):
    """A strict signature for malformed-input tests."""

    name = "th-input"

    @rpc
    async def add(self, a: int, b: int) -> int:
        """Returns a + b."""
        return a + b


class Sleeper(Service):
    """Handlers that take time: async sleep, sync sleep in a thread, and a gate the test opens."""

    name = "th-sleep"

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.threads: set[int] = set()

    @rpc
    async def nap(self, seconds: float) -> float:
        """Sleeps ``seconds`` without blocking the event loop."""
        await asyncio.sleep(seconds)
        return seconds

    @rpc
    def block(self, seconds: float) -> int:
        """Sleeps ``seconds`` in the calling thread and returns that thread's id."""
        time.sleep(seconds)
        ident = threading.get_ident()
        self.threads.add(ident)
        return ident

    @rpc
    async def wait_gate(self) -> str:
        """Waits until the test opens the gate."""
        await self.gate.wait()
        return "through"


class Counter(Service):
    """Counts executions, to see whether a request ran at all."""

    name = "th-deadline"

    def __init__(self) -> None:
        self.count = 0
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    @rpc
    async def bump(self) -> int:
        """Counts one execution and returns the count."""
        self.count += 1
        return self.count

    @rpc
    async def hold(self) -> None:
        """Occupies a concurrency slot until the test releases it."""
        self.holding.set()
        await self.release.wait()


class Blob(Service):
    """Echoes and produces payloads of chosen sizes."""

    name = "th-blob"

    @rpc
    async def echo(self, data: str) -> int:
        """Returns the length of ``data`` (the reply stays small)."""
        return len(data)

    @rpc
    async def make(self, size: int) -> str:
        """Returns a string of ``size`` characters."""
        return "x" * size


class Failing(Service):
    """Handlers that raise."""

    name = "th-fail"

    @rpc
    async def crash(self) -> None:
        """Raises an unexpected exception."""
        raise ValueError("the value is bad")

    @rpc
    async def conflict(self) -> None:
        """Raises a business error with a code and data."""
        raise natsrpc.ServiceError(409, "conflict", {"k": 1})


class Lifecycle(Service):
    """Records the order of setup, calls and cleanup, and what self.ctx holds."""

    name = "th-life"

    def __init__(self) -> None:
        self.events: list[str] = []
        self.seen: dict[str, Any] = {}

    async def setup(self) -> None:
        """Records setup and the context it sees."""
        ctx = self.ctx
        self.seen = {"name": ctx.name, "instance_id": ctx.instance_id, "client": ctx.client, "config": ctx.config}
        self.events.append("setup")

    async def cleanup(self) -> None:
        """Records cleanup."""
        self.events.append("cleanup")

    @rpc
    async def ping(self) -> str:
        """Records a call."""
        self.events.append("call")
        return "pong"

    @rpc
    async def slow(self) -> str:
        """Records a call that finishes after 200 ms."""
        await asyncio.sleep(0.2)
        self.events.append("slow")
        return "done"


# --------------------------------------------------------------------------------------------------
# Helpers and fixtures.
# --------------------------------------------------------------------------------------------------


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NatsConnection]:
    """A plain nats-py connection, as the nats CLI or a non-Python caller would use."""
    conn = await nats.connect(nats_url)
    try:
        yield conn
    finally:
        await conn.drain()


def error_of(msg: Msg) -> dict[str, Any]:
    """Returns the ``error`` object of an error reply, after checking its headers agree with it."""
    assert msg.headers is not None, f"not an error reply: {msg.data!r}"
    error: dict[str, Any] = msgspec.json.decode(msg.data)["error"]
    assert msg.headers[protocol.ERROR_CODE] == str(error["code"])
    assert msg.headers[protocol.ERROR]
    return error


async def timed(awaitable: Awaitable[Any]) -> tuple[Any, float]:
    """Returns the result (or the exception raised) of ``awaitable`` and the seconds it took."""
    start = time.perf_counter()
    try:
        result = await awaitable
    except Exception as exc:
        result = exc
    return result, time.perf_counter() - start


def past_deadline_ms(seconds_ago: float = 1.0) -> str:
    """Returns a ``Natsrpc-Deadline`` value ``seconds_ago`` in the past."""
    return str(int((time.time() - seconds_ago) * 1000))


# --------------------------------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------------------------------


class TestPlainNatsCallers:
    """Callers with nothing but a NATS client reach services with plain JSON."""

    async def test_kv_put_then_get_with_array_and_object_bodies(
        self, client: natsrpc.Client, nc: NatsConnection
    ) -> None:
        """A put with a JSON object, then gets with a JSON array and a JSON object, return the value."""
        async with serve(client, KV()):
            put = await nc.request("svc.kv.put", b'{"key":"a","value":"1"}', timeout=2)
            assert put.data == b"null"
            assert not put.headers or protocol.ERROR_CODE not in put.headers
            by_position = await nc.request("svc.kv.get", b'["a"]', timeout=2)
            by_name = await nc.request("svc.kv.get", b'{"key":"a"}', timeout=2)
            assert by_position.data == b'"1"'
            assert by_name.data == b'"1"'


class TestEncodings:
    """MessagePack and typed Struct arguments round-trip."""

    async def test_msgpack_round_trip_through_the_client(self, client: natsrpc.Client) -> None:
        """A client using MessagePack stores and reads values."""
        async with serve(client, KV()):
            kv = client.call_service["kv"].options(encoding="msgpack")
            assert await kv.put("a", "1") is None
            assert await kv.get("a") == "1"
            assert await kv.get(key="a") == "1"
            assert await kv.keys() == ["a"]

    async def test_plain_msgpack_request_gets_msgpack_reply(self, client: natsrpc.Client, nc: NatsConnection) -> None:
        """A request with Content-Type application/msgpack gets a MessagePack reply."""
        headers = {"Content-Type": "application/msgpack"}
        async with serve(client, KV()):
            body = msgspec.msgpack.encode({"key": "a", "value": "1"})
            put = await nc.request("svc.kv.put", body, timeout=2, headers=headers)
            assert put.data == msgspec.msgpack.encode(None)
            got = await nc.request("svc.kv.get", msgspec.msgpack.encode(["a"]), timeout=2, headers=headers)
            assert got.data == msgspec.msgpack.encode("1")
            assert got.data != b'"1"'
            assert msgspec.msgpack.decode(got.data) == "1"

    @pytest.mark.parametrize("encoding", ["json", "msgpack"])
    async def test_struct_and_datetime_round_trip_through_typed_proxy(
        self, client: natsrpc.Client, encoding: str
    ) -> None:
        """Struct and datetime arguments and returns keep their types through client.proxy()."""
        at = datetime(2024, 5, 1, 12, 30, 15, 123000, tzinfo=UTC)
        async with serve(client, Geometry()):
            geo = client.proxy(Geometry, encoding=encoding)
            moved = await geo.shift(Point(1, 2, at), 10, dy=5)
            assert moved == Point(11, 7, at + timedelta(hours=1))
            assert isinstance(moved, Point)
            assert isinstance(moved.at, datetime)
            assert await geo.later(at, minutes=30) == at + timedelta(minutes=30)


def field(name: str) -> str:
    """Returns a pattern matching how error messages name argument ``name`` (`name` or `$.name`)."""
    return rf"`(\$\.)?{name}`"


MSGPACK = {"Content-Type": "application/msgpack"}
BAD_BODIES = [
    pytest.param(b'{"a": 1,', {}, "JSON", id="invalid-json"),
    pytest.param(b'{"a": "x", "b": 2}', {}, field("a"), id="wrong-type"),
    pytest.param(b'["x", 2]', {}, field("a"), id="wrong-type-positional"),
    pytest.param(b'{"a": 1}', {}, field("b"), id="missing-argument"),
    pytest.param(b"[1]", {}, field("b"), id="missing-argument-positional"),
    pytest.param(b'{"a": 1, "b": 2, "c": 3}', {}, field("c"), id="unknown-argument"),
    pytest.param(b"[1, 2, 3]", {}, r"\b2\b", id="too-many-positional"),
    pytest.param(b"", {}, field("a"), id="empty-body"),
    pytest.param(b"null", {}, "null", id="null-body"),
    pytest.param(os.urandom(64), {}, "", id="random-bytes"),
    pytest.param(os.urandom(64), MSGPACK, "", id="random-bytes-msgpack"),
    pytest.param(b"\xc1", MSGPACK, "MessagePack", id="invalid-msgpack"),
    pytest.param(msgspec.msgpack.encode({"a": 1}), MSGPACK, field("b"), id="missing-argument-msgpack"),
]


class TestBadInput:
    """Malformed requests get a quick 400 naming the problem, and the service keeps serving."""

    @pytest.mark.parametrize(("body", "headers", "names"), BAD_BODIES)
    async def test_plain_request_gets_400(
        self, client: natsrpc.Client, nc: NatsConnection, body: bytes, headers: dict[str, str], names: str
    ) -> None:
        """The reply carries ADR-32 headers and a JSON error body, in under 100 ms."""
        async with serve(client, Calc()):
            start = time.perf_counter()
            reply = await nc.request("svc.th-input.add", body, timeout=2, headers=headers or None)
            elapsed = time.perf_counter() - start
            error = error_of(reply)
            assert reply.headers is not None
            assert reply.headers[protocol.ERROR_CODE] == "400"
            assert error["code"] == 400
            assert error["type"] == "BadRequest"
            assert re.search(names, error["message"]), error["message"]
            assert elapsed < 0.1, f"400 reply took {elapsed * 1000:.1f} ms"
            good = await nc.request("svc.th-input.add", b'{"a": 2, "b": 3}', timeout=2)
            assert good.data == b"5"

    @pytest.mark.parametrize(
        ("args", "kwargs", "names"),
        [
            pytest.param(("x", 2), {}, field("a"), id="wrong-type"),
            pytest.param((1,), {}, field("b"), id="missing-argument"),
            pytest.param((), {"a": 1, "b": 2, "c": 3}, field("c"), id="unknown-argument"),
            pytest.param((), {}, field("a"), id="no-arguments"),
            pytest.param((1,), {"a": 1, "b": 2}, field("a"), id="duplicate-argument"),
            pytest.param((1, 2, 3), {}, r"\b2\b", id="too-many-arguments"),
        ],
    )
    async def test_client_sees_bad_request(
        self, client: natsrpc.Client, args: tuple[Any, ...], kwargs: dict[str, Any], names: str
    ) -> None:
        """Through the natsrpc client, bad arguments raise BadRequest with code 400."""
        async with serve(client, Calc()):
            with pytest.raises(natsrpc.BadRequest) as info:
                await client.call_service["th-input"].add(*args, **kwargs)
            assert info.value.code == 400
            assert info.value.type == "BadRequest"
            assert re.search(names, info.value.message), info.value.message
            assert await client.call_service["th-input"].add(2, b=3) == 5

    async def test_raw_garbage_through_client_is_bad_request(self, client: natsrpc.Client) -> None:
        """Raw undecodable bytes sent with client.request() raise BadRequest."""
        async with serve(client, Calc()):
            with pytest.raises(natsrpc.BadRequest):
                await client.request("svc.th-input.add", b"\xff\xfe{not json")


class TestUnknownMethods:
    """Calls to methods nobody serves fail fast instead of timing out."""

    async def test_no_such_method_is_not_found_at_once(self, client: natsrpc.Client) -> None:
        """A method the service does not have raises NotFound naming what it has, at once."""
        async with serve(client, Calc()):
            result, elapsed = await timed(client.call_service["th-input"].options(timeout=3).nosuch())
            assert isinstance(result, natsrpc.NotFound), result
            assert result.message == "th-input has no method 'nosuch' (it has: add)"
            assert elapsed < 0.5

    async def test_no_such_method_on_instance_subject_is_404(self, client: natsrpc.Client) -> None:
        """The per-instance subject of a missing method answers 404 NotFound."""
        async with serve(client, Calc()) as host:
            subject = f"svc.th-input.nosuch.{host.instances[0].id}"
            result, elapsed = await timed(client.request(subject, b""))
            assert isinstance(result, natsrpc.NotFound), result
            assert result.code == 404
            assert "nosuch" in result.message
            assert elapsed < 0.5
            assert await client.request(f"svc.th-input.add.{host.instances[0].id}", b"[1, 2]")


class TestConcurrency:
    """One instance runs many requests at once, async and sync."""

    async def test_hundred_async_calls_run_concurrently(self, client: natsrpc.Client) -> None:
        """100 calls to a 50 ms handler finish far faster than serially (5 s)."""
        async with serve(client, Sleeper()) as host:
            assert len(host.instances) == 1
            sleeper = client.call_service["th-sleep"]
            start = time.perf_counter()
            results = await asyncio.gather(*(sleeper.nap(0.05) for _ in range(100)))
            elapsed = time.perf_counter() - start
            assert results == [0.05] * 100
            assert elapsed < 0.5, f"100 x 50 ms took {elapsed:.3f} s"

    async def test_sync_handlers_run_in_worker_threads(self, client: natsrpc.Client) -> None:
        """100 calls to a blocking sync handler run off the event loop thread, in parallel."""
        service = Sleeper()
        async with serve(client, service):
            sleeper = client.call_service["th-sleep"]
            start = time.perf_counter()
            idents = await asyncio.gather(*(sleeper.block(0.05) for _ in range(100)))
            elapsed = time.perf_counter() - start
            assert threading.main_thread().ident not in idents
            assert threading.get_ident() not in service.threads
            assert len(service.threads) > 1
            assert elapsed < 2.0, f"100 x 50 ms sync took {elapsed:.3f} s (serial: 5 s)"


class TestOverload:
    """Beyond the concurrency limit and queue, requests get a fast 429 instead of waiting."""

    async def test_excess_calls_get_overloaded_and_the_rest_succeed(self, client: natsrpc.Client) -> None:
        """With 10 running and 10 queued, 80 of 100 calls get 429 at once; the 20 complete; none time out."""
        service = Sleeper()
        async with serve(client, service, max_concurrency=10, max_queue=10, drain_timeout=1) as host:
            sleeper = client.call_service["th-sleep"].options(timeout=5)
            start = time.perf_counter()
            calls = [asyncio.ensure_future(timed(sleeper.wait_gate())) for _ in range(100)]
            await poll(lambda: sum(c.done() for c in calls) == 80)
            rejected_after = time.perf_counter() - start
            assert host.in_flight == 20
            service.gate.set()
            outcomes = await asyncio.gather(*calls)
        results = [r for r, _ in outcomes]
        overloaded = [(r, t) for r, t in outcomes if isinstance(r, natsrpc.Overloaded)]
        assert not [r for r in results if isinstance(r, natsrpc.CallTimeout)]
        assert len(overloaded) == 80
        assert results.count("through") == 20
        assert all(r.code == 429 for r, _ in overloaded)
        assert max(t for _, t in overloaded) < 1.0, f"429s took up to {rejected_after:.3f} s"


class TestDeadlines:
    """A request whose deadline passed before it could run is answered 504 and never executed."""

    async def test_expired_request_is_not_executed(self, client: natsrpc.Client, nc: NatsConnection) -> None:
        """A request arriving with a past Natsrpc-Deadline gets 504 and has no side effect."""
        service = Counter()
        async with serve(client, service):
            reply = await nc.request(
                "svc.th-deadline.bump", b"", timeout=2, headers={protocol.DEADLINE: past_deadline_ms()}
            )
            error = error_of(reply)
            assert error["code"] == 504
            assert error["type"] == "DeadlineExceeded"
            assert service.count == 0
            assert await client.call_service["th-deadline"].bump() == 1

    async def test_request_expiring_in_the_queue_is_not_executed(
        self, client: natsrpc.Client, nc: NatsConnection
    ) -> None:
        """A request waiting behind a full concurrency limit past its deadline gets 504 and never runs."""
        service = Counter()
        async with serve(client, service, max_concurrency=1) as host:
            holder = asyncio.ensure_future(client.call_service["th-deadline"].hold())
            await service.holding.wait()
            deadline = time.time() + 0.1
            queued = asyncio.ensure_future(
                nc.request(
                    "svc.th-deadline.bump", b"", timeout=3, headers={protocol.DEADLINE: str(int(deadline * 1000))}
                )
            )
            await poll(lambda: host.in_flight == 2)  # the bump is accepted and waits for the slot
            await asyncio.sleep(max(0.0, deadline - time.time()) + 0.02)  # let its deadline pass
            service.release.set()
            reply = await queued
            await holder
            error = error_of(reply)
            assert error["code"] == 504
            assert "waited" in error["message"]
            assert service.count == 0


class TestPayloadLimits:
    """Payloads over max_payload fail with clear errors and never break a connection."""

    MAX = 4096

    @pytest.fixture
    def small_server(self, tmp_path: Path) -> Iterator[natsrpc.NatsServer]:
        """A nats-server with max_payload 4096 (a config option; there is no command-line flag)."""
        config = tmp_path / "small.conf"
        config.write_text(f"max_payload: {self.MAX}\n")
        with natsrpc.NatsServer(config=config) as server:
            yield server

    async def test_request_over_limit_with_headers_fails_before_sending(self, small_server: natsrpc.NatsServer) -> None:
        """A body that fits alone but not with its headers raises PayloadTooLarge; the next call works."""
        async with natsrpc.connect(small_server.url) as server_side, natsrpc.connect(small_server.url) as caller:
            assert caller.nc.max_payload == self.MAX
            async with serve(server_side, Blob()):
                blob = caller.call_service["th-blob"].options(timeout=2)
                header_bytes = len(protocol.encode_headers({protocol.DEADLINE: "1" * 13}))  # what the client adds
                overhead = len(codec.encode({"data": ""}))

                # body + headers exactly at the limit: accepted by the server
                exact = "x" * (self.MAX - header_bytes - overhead)
                assert await blob.echo(data=exact) == len(exact)
                # one byte more: the body alone still fits (nats-py would send it), with headers it does not
                over = exact + "x"
                assert len(codec.encode({"data": over})) <= self.MAX
                with pytest.raises(natsrpc.PayloadTooLarge):
                    await blob.echo(data=over)
                # a body exactly max_payload long
                with pytest.raises(natsrpc.PayloadTooLarge):
                    await blob.echo(data="x" * (self.MAX - overhead))

                assert caller.nc.is_connected
                assert await blob.echo(data="small") == 5
            assert server_side.nc.is_connected

    async def test_reply_over_limit_comes_in_chunks_and_over_max_reply_size_is_413(
        self, small_server: natsrpc.NatsServer
    ) -> None:
        """A reply over max_payload reaches a natsrpc caller whole (sent in chunks); one over the host's
        max_reply_size is ReplyTooLarge (413), fast; both connections stay up."""
        async with natsrpc.connect(small_server.url) as server_side, natsrpc.connect(small_server.url) as caller:
            async with serve(server_side, Blob(), max_reply_size=self.MAX * 3):
                blob = caller.call_service["th-blob"].options(timeout=3)
                assert await blob.make(self.MAX + 100) == "x" * (self.MAX + 100)
                result, elapsed = await timed(blob.make(self.MAX * 3 + 100))
                assert isinstance(result, natsrpc.ReplyTooLarge), result
                assert result.code == 413
                assert "max_reply_size" in result.message
                assert elapsed < 1.0
                assert caller.nc.is_connected
                assert server_side.nc.is_connected
                # a reply right at the limit goes as one message: the JSON string adds its two quotes
                assert await blob.make(self.MAX - 2) == "x" * (self.MAX - 2)
                assert await blob.make(10) == "x" * 10
            assert server_side.nc.is_connected


class TestHandlerErrors:
    """Exceptions raised by handlers reach callers as RemoteError with type, message and data."""

    async def test_unexpected_exception_is_internal_error(self, client: natsrpc.Client) -> None:
        """A ValueError arrives as InternalError (a RemoteError) with its class name and message."""
        async with serve(client, Failing()):
            with pytest.raises(natsrpc.RemoteError) as info:
                await client.call_service["th-fail"].crash()
            error = info.value
            assert isinstance(error, natsrpc.InternalError)
            assert error.code == 500
            assert error.type == "ValueError"
            assert error.message == "the value is bad"

    async def test_service_error_keeps_code_and_data(self, client: natsrpc.Client, nc: NatsConnection) -> None:
        """ServiceError(409, "conflict", {"k": 1}) arrives with its code, message and data."""
        async with serve(client, Failing()):
            with pytest.raises(natsrpc.RemoteError) as info:
                await client.call_service["th-fail"].conflict()
            assert info.value.code == 409
            assert info.value.message == "conflict"
            assert info.value.data == {"k": 1}
            reply = await nc.request("svc.th-fail.conflict", b"", timeout=2)
            assert reply.headers is not None
            assert reply.headers[protocol.ERROR_CODE] == "409"
            assert error_of(reply)["data"] == {"k": 1}


class TestGracefulStop:
    """Stopping a host finishes the calls it accepted."""

    async def test_stop_with_fifty_calls_in_flight_loses_none(self, client: natsrpc.Client) -> None:
        """Leaving serve() while 50 calls run a 200 ms handler lets all 50 succeed."""
        service = Lifecycle()
        async with serve(client, service, heartbeat_interval=0.2) as host:
            life = client.call_service["th-life"].options(timeout=5)
            calls = [asyncio.ensure_future(life.slow()) for _ in range(50)]
            await poll(lambda: host.in_flight == 50)
            # A registry that has listened for a heartbeat interval believes the draining beat: no other instance.
            await poll(lambda: client.registry is not None and client.registry.heard_all(0.2))
            stop_started = time.perf_counter()
        stop_took = time.perf_counter() - stop_started
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert results == ["done"] * 50
        assert host.in_flight == 0
        assert service.events[-1] == "cleanup"
        assert stop_took < 2.0
        # The last heartbeat said "draining": the client's circuit for th-life fails fast.
        with pytest.raises(natsrpc.CircuitOpen, match="no live instances"):
            await client.call_service["th-life"].options(timeout=2).ping()


class TestLifecycle:
    """setup() runs before the first call and cleanup() after stop, with self.ctx filled in."""

    async def test_setup_then_calls_then_cleanup(self, client: natsrpc.Client) -> None:
        """Hooks run in order and self.ctx holds name, instance id, client and config."""
        service = Lifecycle()
        config = {"th-life": {"greeting": "hi"}}
        async with serve(client, service, config=config) as host:
            assert service.events == ["setup"]
            assert await client.call_service["th-life"].ping() == "pong"
            assert service.events == ["setup", "call"]
            instance_id = host.instances[0].id
        assert service.events == ["setup", "call", "cleanup"]
        assert service.seen == {
            "name": "th-life",
            "instance_id": instance_id,
            "client": client,
            "config": {"greeting": "hi"},
        }
        assert service.ctx.instance_id == instance_id
