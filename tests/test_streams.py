"""Streams against a real nats-server: iteration, flow control, cancellation, keepalives, bad peers, kills."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats
import pytest
from children import EXIT_TIMEOUT, REPO, child, child_env, poll
from nats.aio.client import Client as NatsConnection
from nats.aio.msg import Msg
from stream_service import Streams, Word

import natsrpc
from natsrpc import Service, current_call, protocol, rpc
from natsrpc.testing import serve
from natsrpc.transport import sync_with_server

KEEPALIVE = 0.1  # the hosts' stream keepalive in these tests: dead peers show within 0.3 s
PROMPT = 0.1  # "within 100 ms on loopback"


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NatsConnection]:
    """A plain nats-py connection: a peer that speaks the wire protocol by hand."""
    conn = await nats.connect(nats_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def streams(client: natsrpc.Client) -> AsyncIterator[Streams]:
    """The Streams service hosted on the test's client, with a short keepalive."""
    service = Streams()
    async with serve(client, service, stream_keepalive=KEEPALIVE):
        yield service


class TestIteration:
    """Callers iterate streams with the sugar, the typed proxy, the SyncClient and the command line."""

    async def test_the_sugar_iterates(self, client: natsrpc.Client, streams: Streams) -> None:
        """``async for`` over ``call_service[...].count(5)`` gives 0..4, then ends."""
        assert [i async for i in client.call_service["streams"].count(5)] == [0, 1, 2, 3, 4]

    async def test_the_typed_proxy_decodes_items(self, client: natsrpc.Client, streams: Streams) -> None:
        """``client.proxy(Streams).words(...)`` yields typed Word items."""
        assert [w async for w in client.proxy(Streams).words("a b")] == [Word(0, "a"), Word(1, "b")]

    async def test_many_items_arrive_in_order_in_both_encodings(self, client: natsrpc.Client, streams: Streams) -> None:
        """10,000 items, several windows' worth, arrive complete and in order, JSON and MessagePack."""
        for encoding in ("json", "msgpack"):
            proxy = client.call_service["streams"].options(encoding=encoding)
            assert [i async for i in proxy.count(10_000)] == list(range(10_000))

    async def test_an_empty_stream_ends_at_once(self, client: natsrpc.Client, streams: Streams) -> None:
        """A generator that yields nothing is an empty stream."""
        assert [i async for i in client.call_service["streams"].count(0)] == []

    async def test_awaiting_a_stream_says_to_iterate(
        self, client: natsrpc.Client, streams: Streams, nats_url: str
    ) -> None:
        """``await`` on a streaming endpoint is a 400 StreamingEndpoint that says to iterate, whether
        discovery knows the endpoint (refused before sending) or not (refused by the service)."""
        await poll(lambda: client.registry is not None and client.registry.known("streams"), "streams discovered")
        async with natsrpc.connect(nats_url, discovery=False) as blind:
            for caller in (client, blind):
                with pytest.raises(natsrpc.BadRequest, match="iterate it") as info:
                    await caller.call_service["streams"].count(3)
                assert info.value.type == "StreamingEndpoint"

    async def test_iterating_a_unary_endpoint_yields_its_result(self, client: natsrpc.Client, streams: Streams) -> None:
        """A unary endpoint asked for a stream answers as usual: its result is the only item."""
        assert [v async for v in client.stream("streams", "echo", ("hi",))] == ["hi"]

    async def test_sync_client_iterates(self, streams: Streams, nats_url: str) -> None:
        """``for i in SyncClient.call_service[...].count(3)``, with discovery and without it."""

        def run(discovery: bool) -> list[Any]:
            with natsrpc.SyncClient(nats_url, discovery=discovery) as sync:
                if discovery:
                    deadline = time.monotonic() + 5
                    while not sync.client.registry.known("streams") and time.monotonic() < deadline:  # type: ignore[union-attr]
                        time.sleep(0.01)
                return list(sync.call_service["streams"].count(3))

        assert await asyncio.to_thread(run, True) == [0, 1, 2]
        assert await asyncio.to_thread(run, False) == [0, 1, 2]

    async def test_the_cli_prints_one_json_line_per_item(self, streams: Streams, nats_url: str) -> None:
        """``python -m natsrpc call streams.words '{"text":"a b"}'`` prints each item on its own line."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "natsrpc", "--url", nats_url, "call", "streams.words", '{"text":"a b"}',
            cwd=REPO, env=child_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), EXIT_TIMEOUT)
        assert proc.returncode == 0, err
        lines = out.decode().splitlines()
        assert [json.loads(line) for line in lines] == [{"index": 0, "text": "a"}, {"index": 1, "text": "b"}]

    async def test_discovery_marks_streaming_endpoints(self, client: natsrpc.Client, streams: Streams) -> None:
        """INFO metadata says streaming=true for streams only; heartbeats list them."""
        assert client.registry is not None
        await poll(lambda: client.registry.known("streams"), "streams discovered")  # type: ignore[union-attr]
        (state,) = client.registry.instances("streams")
        assert sorted(state.streaming) == ["big", "count", "fail_after", "lie", "slow", "words"]
        info = await client.nc.request(f"$SRV.INFO.streams.{state.id}", b"", timeout=2)
        endpoints = {e["name"]: e["metadata"] for e in json.loads(info.data)["endpoints"]}
        assert endpoints["count"]["streaming"] == "true"
        assert "streaming" not in endpoints["echo"]


class TestPlainRequests:
    """A request without the stream header (``nats req``) gets every item in one array reply."""

    async def test_items_come_as_one_array(self, nc: NatsConnection, streams: Streams) -> None:
        reply = await nc.request("svc.streams.count", b'{"n":3}', timeout=2)
        assert reply.data == b"[0,1,2]"

    async def test_items_over_max_payload_are_a_413_naming_the_stream_protocol(
        self, nc: NatsConnection, streams: Streams
    ) -> None:
        """Items that do not fit one reply are refused with a 413 that says to use a stream."""
        n = nc.max_payload // 2
        reply = await nc.request("svc.streams.big", json.dumps({"sizes": [n, n, n]}).encode(), timeout=5)
        assert reply.headers is not None
        assert reply.headers[protocol.ERROR_CODE] == "413"
        assert protocol.STREAM in json.loads(reply.data)["error"]["message"]


class TestFailures:
    """Errors mid-stream reach the caller after the items sent before them."""

    async def test_a_raising_generator_gives_the_items_then_the_error(
        self, client: natsrpc.Client, streams: Streams
    ) -> None:
        got: list[int] = []
        with pytest.raises(natsrpc.ServiceError) as info:
            await gather_into(got, client.call_service["streams"].fail_after(3))
        assert got == [0, 1, 2]
        assert (info.value.code, info.value.data) == (409, {"n": 3})

    async def test_an_item_that_does_not_fit_its_annotation_is_a_500(
        self, client: natsrpc.Client, streams: Streams
    ) -> None:
        got: list[int] = []
        with pytest.raises(natsrpc.InternalError) as info:
            await gather_into(got, client.call_service["streams"].lie())
        assert got == [1]
        assert info.value.type == "EncodeError"

    async def test_an_item_over_max_payload_is_a_413_naming_its_index(
        self, client: natsrpc.Client, streams: Streams
    ) -> None:
        got: list[str] = []
        with pytest.raises(natsrpc.ReplyTooLarge, match="index 1"):
            await gather_into(got, client.call_service["streams"].big([10, client.nc.max_payload + 1]))
        assert got == ["x" * 10]

    async def test_the_deadline_bounds_the_whole_stream(self, client: natsrpc.Client, streams: Streams) -> None:
        """A 0.3 s timeout ends a long stream with CallTimeout at 0.3 s, and the server closes its generator."""
        started = time.monotonic()
        with pytest.raises(natsrpc.CallTimeout, match="timeout"):
            async for _ in client.call_service["streams"].options(timeout=0.3).slow():
                pass
        assert 0.25 < time.monotonic() - started < 0.3 + 0.3
        await poll(lambda: len(streams.closed) == 1, "the server closed the generator at the deadline", 1.0)

    async def test_the_deadline_bounds_a_stream_stalled_for_credit(self, nc: NatsConnection, streams: Streams) -> None:
        """A generator that never waits itself (count), held only by a client that grants no credit, is
        closed at the request's deadline: the deadline is armed when the stream first waits."""
        started = time.monotonic()
        deadline = natsrpc.context.deadline_header(time.time() + 0.12)  # before 3 keepalives (0.3 s) of silence
        headers = {protocol.STREAM: "4", protocol.DEADLINE: deadline}
        await nc.publish("svc.streams.count", b'{"n":100}', reply=nc.new_inbox(), headers=headers)
        await poll(lambda: len(streams.closed) == 1, "the generator is closed at the deadline", 1.5)
        assert streams.closed[0] - started < 0.25  # the deadline closed it, not the silence
        assert streams.yielded <= 5


class TestFlowControl:
    """The server sends at most ``window`` items beyond the client's acknowledgements."""

    async def test_a_client_that_does_not_consume_stalls_the_generator(
        self, client: natsrpc.Client, streams: Streams
    ) -> None:
        stream = client.stream("streams", "count", (1000,), window=8)
        assert await stream.__anext__() == 0
        await asyncio.sleep(0.3)  # time for the generator to run ahead, if nothing held it back
        assert streams.yielded <= 8 + 1  # the window, plus the item waiting for credit
        rest = [i async for i in stream]
        assert rest == list(range(1, 1000))

    async def test_a_raw_client_that_grants_no_credit_gets_one_window(
        self, nc: NatsConnection, streams: Streams
    ) -> None:
        """A client that never acks receives exactly ``window`` items, and the generator waits."""
        inbox = nc.new_inbox()
        got: list[Msg] = []
        sub = await nc.subscribe(inbox, cb=_collect(got))
        await nc.publish("svc.streams.count", b'{"n":100}', reply=inbox, headers={protocol.STREAM: "5"})
        await poll(lambda: sum(1 for m in got if m.data) >= 5, "one window of items")
        await asyncio.sleep(0.05)  # no more may come
        items = [m for m in got if m.headers and protocol.SEQ in m.headers]
        assert [m.headers[protocol.SEQ] for m in items] == ["1", "2", "3", "4", "5"]  # type: ignore[index]
        await sub.unsubscribe()


class TestCancellation:
    """Leaving the loop, aclose() or cancelling the consumer closes the server's generator within 100 ms."""

    async def test_break_closes_the_generator(self, client: natsrpc.Client, streams: Streams) -> None:
        async for i in client.call_service["streams"].slow():
            if i == 2:
                left = time.monotonic()
                break
        await poll(lambda: bool(streams.closed), "the generator closed", 1.0)
        assert streams.closed[0] - left < PROMPT
        assert streams.cancelled == [True]

    async def test_aclose_closes_the_generator(self, client: natsrpc.Client, streams: Streams) -> None:
        stream = client.proxy(Streams).slow()
        assert await stream.__anext__() == 0
        left = time.monotonic()
        await stream.aclose()  # type: ignore[attr-defined]
        await poll(lambda: bool(streams.closed), "the generator closed", 1.0)
        assert streams.closed[0] - left < PROMPT

    async def test_cancelling_the_consumer_closes_the_generator(self, client: natsrpc.Client, streams: Streams) -> None:
        seen = asyncio.Event()

        async def consume() -> None:
            async for _ in client.call_service["streams"].slow():
                seen.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(seen.wait(), 2)
        left = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await poll(lambda: bool(streams.closed), "the generator closed", 1.0)
        assert streams.closed[0] - left < PROMPT


class Down(Service):
    """The end of a call chain: waits until cancelled, recording it."""

    name = "down"

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled_at: list[float] = []
        self.sync_saw_cancel: list[bool] = []

    @rpc
    async def wait(self) -> None:
        """Waits 30 s unless cancelled."""
        self.started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled_at.append(time.monotonic())
            raise

    @rpc
    def block(self) -> bool:
        """A plain def handler: polls current_call().cancelled for up to 5 s."""
        self.started.set()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if current_call().cancelled:
                self.sync_saw_cancel.append(True)
                return True
            time.sleep(0.005)
        return False


class Middle(Service):
    """Calls down.wait: cancelling its caller must reach down through it."""

    name = "middle"

    def __init__(self) -> None:
        self.cancelled_at: list[float] = []

    @rpc
    async def relay(self) -> None:
        """Awaits down.wait."""
        try:
            await self.call_service["down"].wait()
        except asyncio.CancelledError:
            self.cancelled_at.append(time.monotonic())
            raise

    @rpc
    async def traces(self) -> AsyncIterator[str]:
        """Streams from another service: yields its own trace id, then the inner stream's items."""
        yield current_call().trace_id
        async for item in self.call_service["inner"].trace():
            yield item


class Inner(Service):
    """Streams its trace id and deadline."""

    name = "inner"

    @rpc
    async def trace(self) -> AsyncIterator[str]:
        """Yields the trace id and the remaining time of the call."""
        yield current_call().trace_id
        yield f"{current_call().remaining():.1f}"


class TestUnaryCancellation:
    """Cancelling the task awaiting a call cancels the remote handler, and the calls it made."""

    async def test_cancel_propagates_down_the_chain(self, client: natsrpc.Client) -> None:
        down, middle = Down(), Middle()
        async with serve(client, down, middle):
            task = asyncio.ensure_future(client.call_service["middle"].options(timeout=20).relay())
            await asyncio.wait_for(down.started.wait(), 5)
            cancelled = time.monotonic()
            task.cancel()
            await poll(lambda: bool(down.cancelled_at), "down.wait cancelled", 1.0)
        assert middle.cancelled_at[0] - cancelled < PROMPT
        assert down.cancelled_at[0] - cancelled < PROMPT

    async def test_a_plain_def_handler_sees_cancelled(self, client: natsrpc.Client) -> None:
        down = Down()
        async with serve(client, down):
            task = asyncio.ensure_future(client.call_service["down"].options(timeout=20).block())
            await asyncio.wait_for(down.started.wait(), 5)
            task.cancel()
            await poll(lambda: bool(down.sync_saw_cancel), "current_call().cancelled seen", 1.0)

    async def test_a_queued_request_cancelled_never_runs(self, client: natsrpc.Client) -> None:
        """With one slot taken, a cancelled queued call is dropped: its handler never starts."""
        down = Down()
        async with serve(client, down, max_concurrency=1) as host:
            first = asyncio.ensure_future(client.call_service["down"].options(timeout=20).wait())
            await asyncio.wait_for(down.started.wait(), 5)
            queued = asyncio.ensure_future(client.call_service["down"].options(timeout=20).wait())
            await poll(lambda: host.in_flight == 2, "the second request queued")
            queued.cancel()
            await poll(lambda: host.in_flight == 1, "the queued request withdrawn", 1.0)
            down.started.clear()
            first.cancel()
            await poll(lambda: host.in_flight == 0, "the first call cancelled", 1.0)
        assert len(down.cancelled_at) == 1
        assert not down.started.is_set()  # the queued one never started

    async def test_uncancelled_calls_cost_no_cancel_message(self, client: natsrpc.Client, nats_url: str) -> None:
        """Calls that finish send nothing on the cancel subject."""
        cancels: list[Msg] = []
        async with serve(client, Streams()), natsrpc.connect(nats_url) as spy:
            sub = await spy.nc.subscribe("svc._cancel.>", cb=_collect(cancels))
            await spy.nc.flush()
            for _ in range(50):
                assert await client.call_service["streams"].echo("x") == "x"
            await client.nc.flush()
            await spy.nc.flush()
            await sub.unsubscribe()
        assert cancels == []

    async def test_streams_inside_services_carry_the_trace_and_deadline(self, client: natsrpc.Client) -> None:
        async with serve(client, Middle(), Inner(), Down()):
            outer, inner, remaining = [s async for s in client.call_service["middle"].options(timeout=4).traces()]
        assert outer == inner
        assert 3.0 < float(remaining) <= 4.0


class Blobs(Service):
    """Replies of any size."""

    name = "blobs"

    @rpc
    async def text(self, n: int) -> str:
        """Returns ``n`` x's."""
        return "x" * n

    @rpc
    async def raw(self, n: int) -> bytes:
        """Returns ``n`` bytes."""
        return bytes(range(256)) * (n // 256)


class TestLargeReplies:
    """A unary reply over max_payload travels in chunks and arrives as an ordinary return value."""

    async def test_an_8_mib_reply_arrives_whole(self, client: natsrpc.Client) -> None:
        """8 MiB through the sugar and 3 MiB of bytes through the typed proxy, with max_payload 1 MiB."""
        assert client.nc.max_payload <= 1024 * 1024
        async with serve(client, Blobs()):
            text = await client.call_service["blobs"].text(8 * 1024 * 1024)
            assert text == "x" * (8 * 1024 * 1024)
            assert await client.proxy(Blobs).raw(3 * 1024 * 1024) == bytes(range(256)) * (3 * 1024 * 4)
            assert await client.call_service["blobs"].options(encoding="msgpack").text(2_000_000) == "x" * 2_000_000

    async def test_over_max_reply_size_is_413(self, client: natsrpc.Client) -> None:
        async with serve(client, Blobs(), max_reply_size=3_000_000):
            with pytest.raises(natsrpc.ReplyTooLarge, match="max_reply_size 3000000"):
                await client.call_service["blobs"].text(3_000_001)

    async def test_a_plain_requester_gets_a_413(self, client: natsrpc.Client, nc: NatsConnection) -> None:
        """Only natsrpc clients (whose requests carry a deadline) take chunks; ``nats req`` gets a 413."""
        async with serve(client, Blobs()):
            reply = await nc.request("svc.blobs.text", b"[2000000]", timeout=5)
        assert reply.headers is not None
        assert reply.headers[protocol.ERROR_CODE] == "413"

    async def test_the_client_refuses_more_than_its_max_reply_size(self, client: natsrpc.Client) -> None:
        """A client takes at most ``client.max_reply_size`` in chunks; the server stops sending."""
        async with serve(client, Blobs()):
            client.max_reply_size = 1_500_000
            with pytest.raises(natsrpc.ReplyTooLarge, match="this client's max_reply_size"):
                await client.call_service["blobs"].text(2_000_000)
            assert await client.call_service["blobs"].text(3) == "xxx"

    async def test_chunks_that_disagree_with_the_announced_size(
        self, client: natsrpc.Client, nc: NatsConnection
    ) -> None:
        """A server whose chunks do not add up to the size it announced: BadReply, not a wrong value."""

        async def respond(msg: Msg) -> None:
            first = {protocol.SEQ: "1", protocol.CONTROL: "svc._ctl.fake.I1.T1", protocol.KEEPALIVE: "1"}
            await nc.publish(msg.reply, b'"abc"', headers=first | {protocol.CHUNKED: "10"})
            await nc.publish(msg.reply, b"", headers={protocol.SEQ: "2", protocol.END: "1"})

        await nc.subscribe("svc.fake.chunks", cb=respond)
        await sync_with_server(nc)  # nc.flush() can return before the SUB is sent
        with pytest.raises(natsrpc.BadReply, match="the chunks hold 5 bytes, 10 were announced"):
            await client.call_service["fake"].chunks()

    async def test_requests_over_max_payload_still_raise_before_sending(self, client: natsrpc.Client) -> None:
        async with serve(client, Blobs()):
            with pytest.raises(natsrpc.PayloadTooLarge):
                await client.call_service["blobs"].text("9" * (client.nc.max_payload + 1))


class TestBadPeers:
    """A peer that breaks the stream protocol ends the stream with a clear error; nothing crashes or hangs."""

    @pytest.mark.parametrize(
        ("messages", "says"),
        [
            ([{"seq": "1"}, {"seq": "3"}], "message 3 arrived where 2 was due"),
            ([{"seq": "1"}, {"seq": "2"}, {"seq": "2"}], "message 2 arrived where 3 was due"),
            ([{"seq": "1"}, {"seq": "one"}], "not a number"),
            ([{"seq": "2"}], "message 2 arrived where 1 was due"),
            ([{"seq": "1", "first": "no"}], "before any message naming the control subject"),
            ([{"seq": "1", "control": "svc.kv.put"}], "not a control subject of fake"),
            ([{"seq": "1", "keepalive": "0"}], "keepalive interval"),
            ([{"seq": "1"}, {"seq": "2", "end": "7"}], "the end says '7' items, 1 were sent"),
            ([{"seq": str(i)} for i in range(1, 5)], "beyond the window"),
        ],
        ids=[
            "gap",
            "duplicate",
            "garbage",
            "first-missing",
            "no-control",
            "foreign-control",
            "keepalive",
            "end-count",
            "window",
        ],
    )
    async def test_a_server_breaking_the_protocol(
        self, client: natsrpc.Client, nc: NatsConnection, messages: list[dict[str, str]], says: str
    ) -> None:
        """The client gets BadReply naming the problem, within a second."""

        async def respond(msg: Msg) -> None:
            for index, spec in enumerate(messages):
                headers = {protocol.SEQ: spec["seq"]}
                if index == 0 and "first" not in spec:  # the first message names the control subject
                    headers[protocol.CONTROL] = spec.get("control", "svc._ctl.fake.I1.T1")
                    headers[protocol.KEEPALIVE] = spec.get("keepalive", "1")
                if "end" in spec:
                    headers[protocol.END] = spec["end"]
                await nc.publish(msg.reply, b"1", headers=headers)

        await nc.subscribe("svc.fake.bad", cb=respond)
        await sync_with_server(nc)  # nc.flush() can return before the SUB is sent
        started = time.monotonic()
        with pytest.raises(natsrpc.BadReply, match=says):
            async for _ in client.stream("fake", "bad", window=3):
                pass
        assert time.monotonic() - started < 1.0
        assert client._streams == {}  # forgotten

    async def test_a_silent_server_is_stream_interrupted_within_3_keepalives(
        self, client: natsrpc.Client, nc: NatsConnection
    ) -> None:
        """A server that sends one keepalive (0.1 s, naming the control subject) and then nothing:
        StreamInterrupted after ~0.3 s."""

        async def respond(msg: Msg) -> None:
            first = {protocol.CONTROL: "svc._ctl.fake.I1.T1", protocol.KEEPALIVE: "0.1"}
            await nc.publish(msg.reply, b"", headers=first)

        await nc.subscribe("svc.fake.silent", cb=respond)
        await sync_with_server(nc)  # nc.flush() can return before the SUB is sent
        started = time.monotonic()
        with pytest.raises(natsrpc.StreamInterrupted):
            async for _ in client.stream("fake", "silent"):
                pass
        assert 0.3 <= time.monotonic() - started < 0.3 + 0.3

    @pytest.mark.parametrize(
        ("ack", "says"),
        [("x", "is not a sequence number"), ("99", "ack 99 after ack 0"), ("0", "ack 0 after ack 0")],
        ids=["garbage", "beyond-sent", "not-increasing"],
    )
    async def test_a_client_breaking_the_protocol_gets_a_400(
        self, nc: NatsConnection, streams: Streams, ack: str, says: str
    ) -> None:
        """A bad ack ends the stream with a numbered 400; the generator is closed and the host serves on."""
        got: list[Msg] = []
        inbox = nc.new_inbox()
        await nc.subscribe(inbox, cb=_collect(got))
        await nc.publish("svc.streams.slow", b'{"every":0.01}', reply=inbox, headers={protocol.STREAM: "4"})
        await poll(lambda: len(got) >= 1, "the first item")
        control = got[0].headers[protocol.CONTROL]  # type: ignore[index]
        await nc.publish(control, b"", headers={protocol.ACK: ack})
        await poll(lambda: any(m.headers and protocol.ERROR_CODE in m.headers for m in got), "the 400")
        error = next(m for m in got if m.headers and protocol.ERROR_CODE in m.headers)
        assert error.headers is not None
        assert error.headers[protocol.ERROR_CODE] == "400"
        assert protocol.SEQ in error.headers
        assert says in json.loads(error.data)["error"]["message"]
        await poll(lambda: bool(streams.closed), "the generator closed")
        assert await natsrpc_echo(nc) == b'"ok"'

    async def test_a_stream_request_without_a_reply_subject_is_refused(
        self, client: natsrpc.Client, nc: NatsConnection
    ) -> None:
        """Published with no reply subject, a stream request is counted as a 400 and sends nothing: a
        stream sent to an empty subject would make the server drop the host's connection."""
        service = Streams()
        async with serve(client, service) as host:
            stats = host.instances[0].routes["count"].stats
            await nc.publish("svc.streams.count", b'{"n":3}', headers={protocol.STREAM: "4"})
            await nc.publish("svc.streams.count", b'{"n":3}')
            await nc.flush()
            await poll(lambda: stats.num_errors == 2, "both requests counted as errors")
            assert stats.last_error.startswith("400 ")
            assert service.yielded == 0
            assert client.nc.stats["reconnects"] == 0
            assert await natsrpc_echo(nc) == b'"ok"'

    async def test_a_bad_window_is_a_400(self, nc: NatsConnection, streams: Streams) -> None:
        reply = await nc.request("svc.streams.count", b'{"n":3}', timeout=2, headers={protocol.STREAM: "lots"})
        assert reply.headers is not None
        assert reply.headers[protocol.ERROR_CODE] == "400"

    async def test_a_silent_client_is_given_up_within_3_keepalives(self, nc: NatsConnection, streams: Streams) -> None:
        """A client that opens a stream and never sends anything: the generator is closed after ~0.3 s."""
        inbox = nc.new_inbox()
        await nc.subscribe(inbox, cb=_collect([]))
        opened = time.monotonic()
        await nc.publish("svc.streams.slow", b"{}", reply=inbox, headers={protocol.STREAM: "64"})
        await poll(lambda: bool(streams.closed), "the generator closed", 2.0)
        assert streams.closed[0] - opened < 3 * KEEPALIVE + 0.3
        assert streams.cancelled == [True]


class TestKills:
    """SIGKILL of either end mid-stream, in subprocesses."""

    async def test_a_killed_instance_is_stream_interrupted(self, client: natsrpc.Client, nats_url: str) -> None:
        """The runner SIGKILLed mid-stream: the client gets StreamInterrupted within 3 keepalives."""
        keepalive = 0.2
        args = ("-m", "natsrpc.run", "tests.stream_service", "--url", nats_url, "--stream-keepalive", str(keepalive))
        async with child(*args) as runner:
            await poll(lambda: client.registry is not None and client.registry.known("streams"), "runner up", 15)
            got: list[int] = []
            killed = math.nan

            def kill_at_3(i: int) -> None:
                nonlocal killed
                if i == 3:
                    runner.proc.send_signal(signal.SIGKILL)
                    killed = time.monotonic()

            with pytest.raises(natsrpc.StreamInterrupted):
                await gather_into(got, client.call_service["streams"].options(timeout=20).slow(every=0.02), kill_at_3)
            interrupted = time.monotonic()
        assert got[:4] == [0, 1, 2, 3]
        assert interrupted - killed < 3 * keepalive + 0.5

    async def test_a_killed_client_gets_its_generator_closed(self, client: natsrpc.Client, nats_url: str) -> None:
        """A client SIGKILLed mid-stream: the server closes the generator within 3 keepalives."""
        service = Streams()
        script = (
            "import asyncio, natsrpc, sys\n"
            "async def main():\n"
            f"    async with natsrpc.connect({nats_url!r}) as c:\n"
            "        async for i in c.call_service['streams'].options(timeout=30).slow(every=0.02):\n"
            "            print(i, flush=True)\n"
            "asyncio.run(main())\n"
        )
        async with serve(client, service, stream_keepalive=KEEPALIVE):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", script, cwd=REPO, env=child_env(), stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert proc.stdout is not None
            try:
                for _ in range(3):
                    await asyncio.wait_for(proc.stdout.readline(), 15)
            finally:
                os.kill(proc.pid, signal.SIGKILL)
                killed = time.monotonic()
                await proc.wait()
            await poll(lambda: bool(service.closed), "the generator closed", 3.0)
        assert service.closed[0] - killed < 3 * KEEPALIVE + 0.5
        assert service.cancelled == [True]


async def gather_into(got: list[Any], stream: Any, each: Any = None) -> None:
    """Appends a stream's items to ``got`` (calling ``each`` on every one) until it ends or raises."""
    async for item in stream:
        got.append(item)
        if each is not None:
            each(item)


def _collect(into: list[Msg]) -> Any:
    async def collect(msg: Msg) -> None:
        into.append(msg)

    return collect


async def natsrpc_echo(nc: NatsConnection) -> bytes:
    """Calls streams.echo by hand: the host still serves."""
    return bytes((await nc.request("svc.streams.echo", b'["ok"]', timeout=2)).data)


_ = msgspec  # msgspec Structs come from stream_service
