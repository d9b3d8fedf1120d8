"""Events between services against a real nats-server: pooled, broadcast, wildcards, bad input, stop."""

from __future__ import annotations

import asyncio
import contextvars
import json
import subprocess
import sys
from contextlib import AsyncExitStack
from typing import Any, TypedDict

import msgspec
import pytest
import structlog.testing
from children import REPO, child_env, poll

import natsrpc
from natsrpc import DefinitionError, Service, current_call, event, rpc
from natsrpc.testing import serve

N = 1000


class OrderCreated(msgspec.Struct):
    id: int
    total: float = 0.0


class Shipped(TypedDict):
    id: int


class Orders(Service):
    """Handles order events (pooled), records what it saw."""

    name = "evorders"

    def __init__(self) -> None:
        super().__init__()
        self.created: list[int] = []
        self.any: list[tuple[str, int]] = []
        self.shipped: list[int] = []
        self.seen_caller: list[str] = []
        self.seen_trace: list[str] = []

    @event("order.created")
    async def on_created(self, order: OrderCreated) -> None:
        self.created.append(order.id)
        self.seen_caller.append(current_call().caller)
        self.seen_trace.append(current_call().trace_id)

    @event("order.*")
    async def on_any(self, payload: dict[str, Any]) -> None:
        self.any.append((current_call().event_type, payload["id"]))

    @event("ship.>")
    def on_shipped(self, payload: Shipped) -> None:  # a plain def runs in a worker thread
        self.shipped.append(payload["id"])

    @rpc
    async def place(self, id: int) -> None:
        """Emits order.created from inside a handler (trace and caller travel along)."""
        await self.emit("order.created", OrderCreated(id))


class Audit(Service):
    """Every instance sees every audit event (broadcast)."""

    name = "evaudit"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    @event("audit.entry", broadcast=True)
    async def on_entry(self, n: int) -> None:
        self.seen.append(n)


async def emit_all(client: natsrpc.Client, event_type: str, values: list[Any]) -> None:
    for value in values:
        await client.emit(event_type, value)
    await client.nc.flush()


class TestDefinition:
    @pytest.mark.parametrize("pattern", ["", "order..created", "order.>.x", "_dlq.x", "a b", "order.créé", ">x"])
    def test_bad_patterns_are_definition_errors(self, pattern: str) -> None:
        with pytest.raises(DefinitionError, match="event pattern"):
            event(pattern)

    def test_a_handler_takes_one_annotated_argument(self) -> None:
        with pytest.raises(DefinitionError, match="exactly one argument"):

            class Two(Service):
                @event("a.b")
                async def h(self, x: int, y: int) -> None: ...

        with pytest.raises(DefinitionError, match="needs a type annotation"):

            class Bare(Service):
                @event("a.b")
                async def h(self, x) -> None: ...  # type: ignore[no-untyped-def]

    def test_a_service_with_only_events_is_hostable_by_the_runner(self) -> None:
        assert set(Audit.event_handlers) == {"audit.entry"}
        assert Audit.endpoints == {}


class TestPooled:
    async def test_two_instances_handle_each_of_1000_events_exactly_once(
        self, client: natsrpc.Client, nats_url: str
    ) -> None:
        """Pool mode: 1,000 events over 2 instances, every id handled once, none twice, none missing."""
        a, b = Orders(), Orders()
        async with serve(client, a), natsrpc.connect(nats_url) as other, serve(other, b):
            await emit_all(client, "order.created", [OrderCreated(i) for i in range(N)])
            await poll(lambda: len(a.created) + len(b.created) >= N, "every event handled")
            await asyncio.sleep(0.05)  # a duplicate would show by now
        ids = a.created + b.created
        assert sorted(ids) == list(range(N))
        assert a.created
        assert b.created  # both instances took a share

    async def test_a_wildcard_handler_reads_the_concrete_type(self, client: natsrpc.Client) -> None:
        """order.* gets order.created and order.cancelled, and current_call().event_type names each."""
        orders = Orders()
        async with serve(client, orders):
            await emit_all(client, "order.cancelled", [{"id": 7}])
            await emit_all(client, "order.created", [OrderCreated(8)])
            await poll(lambda: len(orders.any) == 2, "both events")
            await emit_all(client, "ship.eu.fast", [{"id": 9}])
            await poll(lambda: orders.shipped == [9], "the > wildcard, in a thread")
        assert sorted(orders.any) == [("order.cancelled", 7), ("order.created", 8)]

    async def test_msgpack_and_emits_from_a_handler_carry_trace_and_caller(self, client: natsrpc.Client) -> None:
        orders = Orders()
        async with serve(client, orders) as host:
            await client.emit("order.created", OrderCreated(1), encoding="msgpack")
            await client.call_service["evorders"].place(2)
            await poll(lambda: len(orders.created) == 2, "both events")
        assert sorted(orders.created) == [1, 2]
        by_id = dict(zip(orders.created, orders.seen_caller, strict=True))
        assert by_id[1] == "client"
        assert by_id[2] == host.instances[0].label  # emitted inside place()
        assert all(len(t) == 32 for t in orders.seen_trace)


class TestBroadcast:
    async def test_each_of_two_instances_handles_all_1000(self, client: natsrpc.Client, nats_url: str) -> None:
        a, b = Audit(), Audit()
        async with serve(client, a), natsrpc.connect(nats_url) as other, serve(other, b):
            await emit_all(client, "audit.entry", list(range(N)))
            await poll(lambda: len(a.seen) >= N and len(b.seen) >= N, "both saw all")
        assert sorted(a.seen) == sorted(b.seen) == list(range(N))


class TestBadInput:
    @pytest.mark.parametrize(
        ("sent", "said"),
        [
            ([(b'{"id": "not a number"}', None), (b"not json", None)], "$.id"),
            (
                [(b'{"id": 1}', {"Natsrpc-Caller": "c" * 10_000}), (b'{"id": 1}', {"Natsrpc-Caller": "bad\x00"})],
                "Natsrpc-Caller",
            ),
        ],
        ids=["payload-does-not-fit", "bad-caller-header"],
    )
    async def test_a_bad_event_is_logged_counted_and_dropped(
        self, client: natsrpc.Client, sent: list[tuple[bytes, dict[str, str] | None]], said: str
    ) -> None:
        """A payload that does not fit, or a Natsrpc-Caller that is too long or not printable:
        the event is dropped, counted and logged saying why; the handler never sees it."""
        orders = Orders()
        async with serve(client, orders) as host:
            with structlog.testing.capture_logs() as logs:
                for data, headers in sent:
                    await client.nc.publish("evt.order.created", data, headers=headers)
                await emit_all(client, "order.created", [OrderCreated(5)])
                route = host.instances[0].event_routes["order.created"]
                await poll(lambda: route.stats.invalid == 2 and route.stats.handled == 1, "counted")
        assert orders.created == [5]
        dropped = [e for e in logs if e["event"].startswith("event dropped") and e["handler"] == "evorders.on_created"]
        assert len(dropped) == 2
        assert dropped[0]["event_type"] == "order.created"
        assert said in dropped[0].get("error", "") + dropped[0]["event"]

    async def test_a_flood_of_bad_events_is_counted_and_logs_little(self, client: natsrpc.Client) -> None:
        """Twenty events that fit no handler: all counted and dropped, a warning for the 1st, 2nd,
        4th, 8th and 16th only of each handler's (a peer publishing bad events cannot flood the log)."""
        orders = Orders()
        async with serve(client, orders) as host:
            with structlog.testing.capture_logs() as logs:
                for _ in range(20):
                    await client.nc.publish("evt.order.created", b"not json")
                routes = host.instances[0].event_routes
                await poll(lambda: all(routes[p].stats.invalid == 20 for p in ("order.created", "order.*")), "counted")
        for handler in ("evorders.on_created", "evorders.on_any"):
            dropped = [e for e in logs if e["event"].startswith("event dropped") and e["handler"] == handler]
            assert [e["ignored"] for e in dropped] == [1, 2, 4, 8, 16]
        assert orders.created == orders.any == []

    async def test_emit_refuses_bad_types_and_unencodable_values_before_publishing(
        self, client: natsrpc.Client
    ) -> None:
        for bad in ("", "order.*", "order.>", "a..b", "_dlq.x", "x y", ["order"], None):
            with pytest.raises(natsrpc.ConfigurationError, match="event type"):
                await client.emit(bad, {})  # type: ignore[arg-type]
        with pytest.raises(natsrpc.ConfigurationError, match="cannot be encoded"):
            await client.emit("order.created", object())
        with pytest.raises(natsrpc.PayloadTooLarge):
            await client.emit("order.created", "x" * (client.nc.max_payload + 1))

    async def test_a_handler_that_raises_is_counted_and_others_go_on(self, client: natsrpc.Client) -> None:
        class Flaky(Service):
            name = "evflaky"
            seen: list[int] = []  # noqa: RUF012 - the test reads it

            @event("flaky.x")
            async def on_x(self, n: int) -> None:
                if n == 1:
                    raise RuntimeError("boom")
                self.seen.append(n)

        service = Flaky()
        async with serve(client, service) as host:
            await emit_all(client, "flaky.x", [0, 1, 2])
            route = host.instances[0].event_routes["flaky.x"]
            await poll(lambda: route.stats.handled + route.stats.failed == 3, "all three")
        assert route.stats.failed == 1
        assert sorted(service.seen) == [0, 2]

    async def test_a_blocked_handler_does_not_stop_other_events(self, client: natsrpc.Client) -> None:
        gate = asyncio.Event()

        class Blocky(Service):
            name = "evblocky"
            done: list[int] = []  # noqa: RUF012

            @event("block.x")
            async def on_x(self, n: int) -> None:
                if n == 0:
                    await gate.wait()
                self.done.append(n)

        service = Blocky()
        async with serve(client, service):
            await emit_all(client, "block.x", list(range(10)))
            await poll(lambda: len(service.done) == 9, "the other nine, while the first blocks")
            gate.set()
            await poll(lambda: len(service.done) == 10, "the first too")

    async def test_beyond_the_queue_events_are_dropped_and_counted(self, client: natsrpc.Client) -> None:
        gate = asyncio.Event()

        class Full(Service):
            name = "evfull"

            @event("full.x")
            async def on_x(self, n: int) -> None:
                await gate.wait()

        async with serve(client, Full(), max_concurrency=2, max_event_queue=3) as host:
            with structlog.testing.capture_logs() as logs:
                await emit_all(client, "full.x", list(range(10)))
                route = host.instances[0].event_routes["full.x"]
                await poll(lambda: route.stats.received == 10, "all received")
            gate.set()
            await poll(lambda: route.stats.handled == 5, "the five taken in")
        assert route.stats.dropped == 5
        assert any(entry["event"].startswith("events dropped") for entry in logs)


class TestTaskSemantics:
    async def test_timeouts_task_groups_and_context_variables_behave_in_handlers(self, client: natsrpc.Client) -> None:
        """asyncio.timeout() times out the handler only, a TaskGroup runs, and each event starts with
        fresh context variables, though workers are reused (2 slots, 6 events)."""
        var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
        results: list[tuple[int, str, bool, int, str, str]] = []

        class Semantics(Service):
            name = "evsem"

            @event("sem.x")
            async def on_x(self, n: int) -> None:
                before = var.get()
                var.set(f"event {n}")
                timed_out = False
                try:
                    async with asyncio.timeout(0.02):
                        await asyncio.sleep(5)
                except TimeoutError:
                    timed_out = True
                async with asyncio.TaskGroup() as group:
                    doubled = group.create_task(asyncio.sleep(0, result=n * 2))
                results.append((n, before, timed_out, doubled.result(), var.get(), current_call().event_type))

        async with serve(client, Semantics(), max_concurrency=2) as host:
            await emit_all(client, "sem.x", list(range(6)))
            await poll(lambda: len(results) == 6, "every event, through the same two workers")
            assert host.instances[0].events is not None
            assert len(host.instances[0].events._workers) <= 2
            assert await client.nc.request("$SRV.PING.evsem", b"", timeout=2)  # the connection's reader lives on
        for n, before, timed_out, doubled, after, event_type in results:
            assert before == "unset"  # no event sees another's context variables
            assert timed_out
            assert doubled == n * 2
            assert after == f"event {n}"
            assert event_type == "sem.x"


class TestStop:
    async def test_handlers_in_flight_finish_before_the_host_stops(self, client: natsrpc.Client) -> None:
        finished: list[int] = []
        started = asyncio.Event()

        class Slow(Service):
            name = "evslow"

            @event("slow.x")
            async def on_x(self, n: int) -> None:
                started.set()
                await asyncio.sleep(0.2)
                finished.append(n)

        async with AsyncExitStack() as stack:
            await stack.enter_async_context(serve(client, Slow()))
            await emit_all(client, "slow.x", [1])
            await started.wait()
        assert finished == [1]  # stop waited for it


class TestDiscoveryAndTools:
    async def test_info_metadata_lists_the_events_handled(self, client: natsrpc.Client, nats_url: str) -> None:
        async with serve(client, Orders()):
            reply = await client.nc.request("$SRV.INFO.evorders", b"", timeout=5)
        assert json.loads(reply.data)["metadata"]["events"] == "order.*,order.created,ship.>"

    async def test_sync_client_and_command_line_emit(self, client: natsrpc.Client, nats_url: str) -> None:
        orders = Orders()
        async with serve(client, orders):
            sync = await asyncio.to_thread(natsrpc.SyncClient, nats_url)
            try:
                await asyncio.to_thread(sync.emit, "order.created", OrderCreated(30))
            finally:
                await asyncio.to_thread(sync.close)
            run = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "natsrpc", "emit", "order.created", '{"id": 31}', "--url", nats_url],
                cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert run.returncode == 0, run.stderr
            await poll(lambda: sorted(orders.created) == [30, 31], "both emits handled")
            bad = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "natsrpc", "emit", "order.*", "{}", "--url", nats_url],
                cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert bad.returncode == 2
            assert "not an event type" in bad.stderr
            ls = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "natsrpc", "ls", "--url", nats_url],
                cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=60,
            )  # fmt: skip
        row = next(line for line in ls.stdout.splitlines() if line.startswith("evorders"))
        assert row.split()[-3:] == ["order.*", "order.created", "ship.>"]
