"""Durable events on JetStream (nats-server -js, a temporary store): kept, acked, redelivered, dead-lettered."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
import structlog.testing
from children import child, poll
from event_service import HANDLED_SUBJECT

import natsrpc
from natsrpc import Service, event
from natsrpc.embedded import NatsServer
from natsrpc.events.durable import STREAM, dead_letter_subject
from natsrpc.testing import serve

BACKOFF = (0.05, 0.05, 0.05)  # short redelivery pauses for the tests


@pytest.fixture(scope="module")
def js_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server with JetStream, its store in a temporary directory."""
    store = tmp_path_factory.mktemp("jetstream")
    with NatsServer(args=["-js", "-sd", str(store)]) as server:
        yield server


@pytest.fixture
async def js_client(js_server: NatsServer) -> AsyncIterator[natsrpc.Client]:
    async with natsrpc.connect(js_server.url) as client:
        yield client
    # each test starts from an empty stream: its consumers and events are gone
    nc = await nats.connect(js_server.url)
    try:
        await nc.jetstream().delete_stream(STREAM)
    except Exception:
        pass
    await nc.close()


class Ledger(Service):
    name = "evledger"

    def __init__(self, fail_times: int = 0, always_fail: bool = False) -> None:
        super().__init__()
        self.seen: list[int] = []
        self.attempts: dict[int, int] = {}
        self.fail_times = fail_times
        self.always_fail = always_fail

    @event("pay.made", durable=True)
    async def on_paid(self, n: int) -> None:
        self.attempts[n] = self.attempts.get(n, 0) + 1
        if self.always_fail or self.attempts[n] <= self.fail_times:
            raise RuntimeError(f"not now ({self.attempts[n]})")
        self.seen.append(n)


async def unsettled(client: natsrpc.Client, consumer: str) -> tuple[int, int]:
    """The consumer's (unacknowledged, undelivered) counts once they reach (0, 0), or after a second:
    the server applies acks asynchronously."""
    js = client.nc.jetstream()
    for _ in range(50):
        info = await js.consumer_info(STREAM, consumer)
        if (info.num_ack_pending, info.num_pending) == (0, 0):
            break
        await asyncio.sleep(0.02)
    return info.num_ack_pending, info.num_pending


def host_options() -> dict[str, object]:
    return {"event_backoff": BACKOFF, "heartbeat_interval": 0.5}


async def test_events_emitted_while_the_consumer_was_stopped_are_handled_after_it_starts(
    js_client: natsrpc.Client,
) -> None:
    first = Ledger()
    async with serve(js_client, first, **host_options()):  # creates the stream and the consumer
        await js_client.emit("pay.made", -1, durable=True)
        await poll(lambda: first.seen == [-1], "the first event")
    for n in range(100):  # nobody consumes now
        await js_client.emit("pay.made", n, durable=True)
    again = Ledger()
    async with serve(js_client, again, **host_options()):
        await poll(lambda: len(again.seen) == 100, "every event kept while it was down")
    assert sorted(again.seen) == list(range(100))


async def test_a_handler_failing_twice_sees_the_event_three_times_then_it_is_acked(
    js_client: natsrpc.Client,
) -> None:
    ledger = Ledger(fail_times=2)
    async with serve(js_client, ledger, **host_options()) as host:
        await js_client.emit("pay.made", 7, durable=True)
        await poll(lambda: ledger.seen == [7], "handled on the third delivery")
        route = host.instances[0].event_routes["pay.made"]
        assert route.stats.failed == 2
    assert ledger.attempts[7] == 3
    assert await unsettled(js_client, "evledger_on_paid") == (0, 0)  # acked, nothing left


async def test_a_handler_always_failing_sends_the_event_to_the_dlq_after_5_deliveries(
    js_client: natsrpc.Client,
) -> None:
    ledger = Ledger(always_fail=True)
    dead: asyncio.Queue[nats.aio.msg.Msg] = asyncio.Queue()

    async def on_dead(msg: nats.aio.msg.Msg) -> None:
        await dead.put(msg)

    await js_client.nc.subscribe(dead_letter_subject("evledger", "pay.made"), cb=on_dead)
    async with serve(js_client, ledger, **host_options()):
        await js_client.emit("pay.made", 9, durable=True)
        letter = await asyncio.wait_for(dead.get(), 10)
    assert ledger.attempts[9] == 5
    assert letter.data == b"9"
    assert letter.headers is not None
    assert "RuntimeError: not now (5)" in letter.headers["Natsrpc-Error"]
    assert letter.headers["Natsrpc-Deliveries"] == "5"


async def test_a_payload_that_does_not_fit_goes_to_the_dlq_at_once(js_client: natsrpc.Client) -> None:
    ledger = Ledger()
    dead: asyncio.Queue[nats.aio.msg.Msg] = asyncio.Queue()

    async def on_dead(msg: nats.aio.msg.Msg) -> None:
        await dead.put(msg)

    await js_client.nc.subscribe(dead_letter_subject("evledger", "pay.made"), cb=on_dead)
    async with serve(js_client, ledger, **host_options()):
        await js_client.emit("pay.made", "not a number", durable=True)
        letter = await asyncio.wait_for(dead.get(), 10)
    assert letter.headers is not None
    assert letter.headers["Natsrpc-Deliveries"] == "1"  # no retries for a 400
    assert "ValidationError" in letter.headers["Natsrpc-Error"]


async def test_an_emit_retried_with_the_same_id_is_stored_once(js_client: natsrpc.Client) -> None:
    ledger = Ledger()
    async with serve(js_client, ledger, **host_options()):
        for _ in range(3):
            await js_client.emit("pay.made", 11, durable=True, msg_id="pay-11")
        await js_client.emit("pay.made", 12, durable=True)
        await poll(lambda: 12 in ledger.seen, "the next event")
    assert ledger.seen.count(11) == 1
    info = await js_client.nc.jetstream().stream_info(STREAM)
    assert info.state.messages == 2


async def test_a_durable_emit_without_jetstream_or_stream_is_a_clear_error(
    js_client: natsrpc.Client, client: natsrpc.Client
) -> None:
    with pytest.raises(natsrpc.NoResponders, match="no JetStream stream"):
        await js_client.emit("nothing.here", 1, durable=True)  # no stream captures it yet
    with pytest.raises(natsrpc.ConfigurationError, match="msg_id"):
        await js_client.emit("pay.made", 1, durable=True, msg_id="bad\nid")

    class NeedsJs(Service):
        name = "evneedsjs"

        @event("a.b", durable=True)
        async def on_ab(self, n: int) -> None: ...

    with pytest.raises(natsrpc.ConfigurationError, match="need JetStream"):
        async with serve(client, NeedsJs()):  # the session's server has no JetStream
            pass


def test_durable_handlers_are_pooled_not_broadcast() -> None:
    with pytest.raises(natsrpc.DefinitionError, match="not broadcast"):
        event("a.b", broadcast=True, durable=True)


async def test_plain_emits_are_kept_for_durable_handlers_too(js_client: natsrpc.Client, tmp_path: Path) -> None:
    """The stream captures evt.>: an event emitted without durable=True also reaches a durable handler."""
    ledger = Ledger()
    async with serve(js_client, ledger, **host_options()):
        await js_client.emit("pay.made", 21)
        await poll(lambda: ledger.seen == [21], "the core-NATS emit, stored and consumed")


async def test_the_runners_embedded_server_has_jetstream_for_durable_handlers(tmp_path: Path) -> None:
    """``python -m natsrpc.run --embedded --store-dir DIR`` hosts a durable handler; a durable emit reaches it."""
    store = tmp_path / "store"
    async with child("-m", "natsrpc.run", "tests.event_service", "--embedded", "--store-dir", str(store)) as runner:
        url = (await runner.wait_for_line(re.compile(r"embedded nats-server at (nats://\S+)"))).group(1)
        await runner.wait_for_line(re.compile(r"\bready\b"))
        async with natsrpc.connect(url) as app:
            handled: asyncio.Queue[bytes] = asyncio.Queue()

            async def on_handled(msg: nats.aio.msg.Msg) -> None:
                await handled.put(msg.data)

            await app.nc.subscribe(HANDLED_SUBJECT, cb=on_handled)
            await app.nc.flush()
            await app.emit("pay.made", 42, durable=True)
            assert await asyncio.wait_for(handled.get(), 10) == b"42"
        assert await runner.stop() == 0, runner.stderr
    assert any(store.iterdir())  # the store was where it was told to be


async def test_a_sigkilled_consumer_loses_nothing_after_a_restart(js_client: natsrpc.Client) -> None:
    """1,000 durable events; the consumer is SIGKILLed part way; after a restart every id was handled
    at least once (those in flight at the kill are redelivered after the ack wait)."""
    seen: set[int] = set()
    deliveries = 0

    async def on_handled(msg: nats.aio.msg.Msg) -> None:
        nonlocal deliveries
        deliveries += 1
        seen.add(int(msg.data))

    await js_client.nc.subscribe("test.handled", cb=on_handled)
    await js_client.nc.flush()
    url = js_client.nc.connected_url.geturl() if js_client.nc.connected_url else ""
    ready = re.compile(r"^ready$")
    async with child("tests/durable_child.py", url) as first:
        await first.wait_for_line(ready)
        for n in range(1000):
            await js_client.emit("kill.pay", n, durable=True)
        await poll(lambda: len(seen) >= 300, "a part handled")
        first.proc.kill()
        await first.wait()
    handled_before_restart = len(seen)
    assert handled_before_restart < 1000
    async with child("tests/durable_child.py", url) as second:
        await second.wait_for_line(ready)
        await poll(lambda: len(seen) == 1000, "every id, after the restart", 20.0)
    assert seen == set(range(1000))
    assert deliveries >= 1000


async def test_audit_keeps_what_memory_did(js_client: natsrpc.Client) -> None:
    """memory emits memory.remembered / memory.forgotten; audit keeps them (durably) and serves recent()."""
    from services.audit import Audit
    from services.kv import KV
    from services.memory import Memory
    from services.vdb import VDB

    audit = Audit()
    async with serve(js_client, KV(), VDB(), Memory(), audit, **host_options()):
        memory = js_client.call_service["memory"]
        first = await memory.remember("the cat sat")
        second = await memory.remember("the dog ran")
        assert await memory.forget(first) is True
        assert await memory.forget("no-such-id") is False  # nothing forgotten: no event
        await poll(lambda: len(audit.entries) == 3, "three events audited")
        recent = await js_client.call_service["audit"].recent(2)
    assert [(e["event"], e["id"]) for e in recent] == [("memory.forgotten", first), ("memory.remembered", second)]
    with pytest.raises(natsrpc.RemoteError, match="n must be >= 0"):
        async with serve(js_client, Audit(), **host_options()):
            await js_client.call_service["audit"].recent(-1)


class TestSharedKV:
    async def test_500_put_then_get_pairs_across_two_kv_instances_all_read_their_write(
        self, js_client: natsrpc.Client, js_server: NatsServer
    ) -> None:
        """Two kv instances (two connections, load-balanced), 500 put-then-get pairs: every get sees its put.

        The keys have a prefix of their own: the bucket is shared with the earlier tests, whose
        memory ids (``memory:<hex>``) would match a ``memory:4`` prefix one time in sixteen."""
        from services.kv import KV

        first, second = KV(), KV()
        async with (
            serve(js_client, first),
            natsrpc.connect(js_server.url) as other,
            serve(other, second),
        ):
            assert first.bucket is not None
            assert second.bucket is not None
            kv = js_client.call_service["kv"]
            one = kv.options(instance=first.ctx.instance_id)
            two = kv.options(instance=second.ctx.instance_id)
            for i in range(500):  # each put through one instance, its get through the other
                writer, reader = (one, two) if i % 2 else (two, one)
                await writer.put(f"pairs:{i}", f"v{i}")
                assert await reader.get(f"pairs:{i}") == f"v{i}"
            assert await kv.keys("pairs:4") == sorted(f"pairs:{i}" for i in range(500) if str(i).startswith("4"))
            assert await kv.delete("pairs:1") is True
            assert await kv.delete("pairs:1") is False
        async with serve(js_client, KV()):  # a restarted service keeps the data
            assert await js_client.call_service["kv"].get("pairs:2") == "v2"
            assert await js_client.call_service["kv"].get("pairs:1") is None
        nc = await nats.connect(js_server.url)
        await nc.jetstream().delete_key_value("kv")
        await nc.close()

    async def test_without_jetstream_kv_keeps_its_data_in_memory_and_says_so(self, client: natsrpc.Client) -> None:
        from services.kv import KV

        kv = KV()
        with structlog.testing.capture_logs() as logs:
            async with serve(client, kv):
                await client.call_service["kv"].put("a", "1")
                assert await client.call_service["kv"].get("a") == "1"
        assert kv.bucket is None
        assert kv.data == {"a": "1"}
        assert any("no JetStream" in entry["event"] for entry in logs)


async def test_the_runners_config_sets_the_event_streams_limits(js_server: NatsServer, tmp_path: Path) -> None:
    """``[natsrpc] event_stream`` in ``--config`` sets the limits of the EVENTS stream the runner creates;
    an unknown limit is a one-line error (exit 2)."""
    config = tmp_path / "run.toml"
    config.write_text("[natsrpc]\nevent_stream = { max_msgs = 1234, max_age = 3600 }\nevent_max_deliver = 3\n")
    async with child("-m", "natsrpc.run", "tests.event_service", "--url", js_server.url, "--config", str(config)) as r:
        await r.wait_for_line(re.compile(r"\bready\b"))
        nc = await nats.connect(js_server.url)
        try:
            info = await nc.jetstream().stream_info(STREAM)
            consumer = await nc.jetstream().consumer_info(STREAM, "evreceipts_on_paid")
            await nc.jetstream().delete_stream(STREAM)
        finally:
            await nc.close()
        assert await r.stop() == 0, r.stderr
    assert info.config.max_msgs == 1234
    assert info.config.max_age == 3600
    assert consumer.config.max_deliver == 3
    config.write_text("[natsrpc]\nevent_stream = { max_msg = 1 }\n")
    async with child("-m", "natsrpc.run", "tests.event_service", "--url", js_server.url, "--config", str(config)) as r:
        assert await r.wait() == 2
    assert "unknown limit 'max_msg'" in r.stderr


async def test_a_graceful_stop_lets_durable_handlers_finish_and_ack(js_client: natsrpc.Client) -> None:
    """A stop while a durable handler runs: it finishes, its event is acked, nothing is left pending."""
    started, finished = asyncio.Event(), []

    class Slow(Service):
        name = "evslowdurable"

        @event("slowpay.made", durable=True)
        async def on_paid(self, n: int) -> None:
            started.set()
            await asyncio.sleep(0.3)
            finished.append(n)

    async with serve(js_client, Slow(), **host_options()):
        await js_client.emit("slowpay.made", 1, durable=True)
        await asyncio.wait_for(started.wait(), 10)
    assert finished == [1]
    assert await unsettled(js_client, "evslowdurable_on_paid") == (0, 0)
