"""Tests of natsrpc.client: connecting, the call sugar, options, deadlines and failing pending calls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator

import nats.errors
import pytest
import pytest_asyncio
import structlog.testing

import natsrpc
from natsrpc import NatsServer, Service, ServiceError, rpc
from natsrpc.circuit import State
from natsrpc.embedded import free_port
from natsrpc.testing import serve
from services.kv import KV

# A generous upper margin over the expected time: shared CI machines stall, but a call that
# waits for its full 10 s timeout instead of failing promptly must still fail the test.
MARGIN = 1.5
POLL_LIMIT = 5.0


class Gate(Service):
    """Handlers that block until the test opens the gate, so calls stay pending on purpose."""

    name = "clientgate"

    def __init__(self) -> None:
        self.started = 0
        self.release = asyncio.Event()

    @rpc
    async def wait(self) -> str:
        """Counts the call, then waits for the gate to open."""
        self.started += 1
        await self.release.wait()
        return "released"


class Probe(Service):
    """Handlers that report what they received, or fail on demand."""

    name = "clientprobe"

    @rpc
    async def header(self, name: str) -> str | None:
        """Returns the request header ``name`` as the handler sees it."""
        return natsrpc.current_call().headers.get(name)

    @rpc
    async def fail(self, code: int) -> None:
        """Raises a ServiceError with ``code``."""
        raise ServiceError(code, "asked to fail")


async def eventually(predicate: Callable[[], bool]) -> None:
    """Polls ``predicate`` until it holds, failing the test after POLL_LIMIT seconds."""
    deadline = time.monotonic() + POLL_LIMIT
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {POLL_LIMIT}s")
        await asyncio.sleep(0.005)


def assert_natsrpc_error(exc: BaseException) -> None:
    """Asserts ``exc`` is a natsrpc error, not a nats-py one leaking through."""
    assert isinstance(exc, natsrpc.NatsRpcError), repr(exc)
    assert not isinstance(exc, nats.errors.Error), repr(exc)
    assert type(exc).__module__.startswith("natsrpc"), repr(exc)


@pytest.fixture
def own_server() -> Iterator[NatsServer]:
    """A nats-server of this test alone, free to be killed and restarted."""
    with NatsServer() as server:
        yield server


@pytest_asyncio.fixture
async def kv(client: natsrpc.Client) -> AsyncIterator[KV]:
    """The example KV service, hosted on the test's client."""
    service = KV()
    async with serve(client, service):
        yield service


class TestConnect:
    """connect() works both as an awaitable and as an async context manager, and fails fast."""

    async def test_async_with_connects_and_closes(self, nats_url: str) -> None:
        """`async with natsrpc.connect(url)` yields a connected client and closes it on exit."""
        async with natsrpc.connect(nats_url) as client:
            assert client.nc.is_connected
            assert not client.closed
        assert client.closed
        assert client.nc.is_closed

    async def test_await_connect_returns_a_client(self, nats_url: str) -> None:
        """`await natsrpc.connect(url)` returns a connected client the caller closes."""
        client = await natsrpc.connect(nats_url)
        try:
            assert client.nc.is_connected
        finally:
            await client.close()
        assert client.closed

    async def test_connect_to_nothing_raises_connection_lost_quickly(self) -> None:
        """Connecting to a port where nothing listens raises ConnectionLost within a few seconds."""
        url = f"nats://127.0.0.1:{free_port()}"
        started = time.monotonic()
        with pytest.raises(natsrpc.ConnectionLost) as info:
            await asyncio.wait_for(natsrpc.connect(url), timeout=10)
        assert time.monotonic() - started < 3
        assert_natsrpc_error(info.value)

    async def test_connection_defaults_detect_hung_servers_and_reconnect_forever(self, client: natsrpc.Client) -> None:
        """A hung server is noticed within ping_interval x (max_outstanding_pings + 1) <= 6 s (docs/operations.md:
        ~4-6 s, so F5 recovers in < 8 s), and reconnecting never gives up."""
        options = client.nc.options
        assert (options["ping_interval"], options["max_outstanding_pings"]) == (2, 2)
        assert options["ping_interval"] * (options["max_outstanding_pings"] + 1) <= 6
        assert options["max_reconnect_attempts"] == -1


class TestCalls:
    """The call_service sugar sends calls and returns decoded replies."""

    async def test_put_then_get(self, client: natsrpc.Client, kv: KV) -> None:
        """A value put through call_service comes back from get."""
        assert await client.call_service["kv"].put("a", "1") is None
        assert await client.call_service["kv"].get("a") == "1"
        assert await client.call_service["kv"].get("missing") is None

    async def test_mixed_positional_and_keyword_arguments(self, client: natsrpc.Client, kv: KV) -> None:
        """A call mixing positional and keyword arguments reaches the handler intact."""
        await client.call_service["kv"].put("a", value="1")
        assert kv.data == {"a": "1"}
        assert await client.call_service["kv"].get(key="a") == "1"

    async def test_call_service_async_returns_a_running_task(self, client: natsrpc.Client, kv: KV) -> None:
        """call_service_async starts the call at once and returns an asyncio Task to await later."""
        await client.call_service["kv"].put("a", "1")
        task = client.call_service_async["kv"].get("a")
        assert isinstance(task, asyncio.Task)
        assert await task == "1"

    async def test_options_timeout_and_headers(self, client: natsrpc.Client) -> None:
        """options(headers=...) headers reach the handler; options() returns a new proxy."""
        async with serve(client, Probe()):
            proxy = client.call_service["clientprobe"].options(timeout=2, headers={"X-Tenant": "acme"})
            assert await proxy.header("X-Tenant") == "acme"
            assert await client.call_service["clientprobe"].header("X-Tenant") is None
            stacked = proxy.options(headers={"X-Other": "b"})
            assert await stacked.header("X-Tenant") == "acme"
            assert await stacked.header("X-Other") == "b"

    async def test_invalid_timeout_is_a_configuration_error(self, client: natsrpc.Client) -> None:
        """A non-positive timeout is refused before anything is sent."""
        with pytest.raises(natsrpc.ConfigurationError):
            client.call_service["kv"].options(timeout=0)

    async def test_pending_calls_return_to_zero(self, client: natsrpc.Client, kv: KV) -> None:
        """After many calls, successes, timeouts and errors alike, no call stays pending."""
        gate = Gate()
        async with serve(client, Probe(), gate):
            try:
                puts = [client.call_service["kv"].put(f"k{i}", str(i)) for i in range(200)]
                await asyncio.gather(*puts)
                gets = await asyncio.gather(*(client.call_service["kv"].get(f"k{i}") for i in range(200)))
                assert gets == [str(i) for i in range(200)]
                slow = [client.call_service_async["clientgate"].options(timeout=0.2).wait() for _ in range(20)]
                await eventually(lambda: client.pending_calls == 20)
                failures = [
                    client.call_service["clientprobe"].fail(409),
                    client.call_service["kv"].put("only-key"),  # 400: missing argument
                    client.call_service["nobody"].home(),
                    client.call_service["kv"].nosuchmethod(),
                ]
                results = await asyncio.gather(*slow, *failures, return_exceptions=True)
            finally:
                gate.release.set()
        kinds = [type(r) for r in results]
        assert kinds == [natsrpc.CallTimeout] * 20 + [
            natsrpc.ServiceError,
            natsrpc.BadRequest,
            natsrpc.NoResponders,
            natsrpc.NotFound,  # discovery knows kv's methods: not sent at all
        ]
        for result in results:
            assert isinstance(result, BaseException)
            assert_natsrpc_error(result)
        assert client.pending_calls == 0


class TestTimeout:
    """A call whose handler outlives the call's timeout fails with CallTimeout at the timeout."""

    async def test_slow_handler_raises_call_timeout_at_the_timeout(self, client: natsrpc.Client) -> None:
        """CallTimeout arrives no earlier than the timeout and not much later."""
        gate = Gate()
        async with serve(client, gate):
            try:
                started = time.monotonic()
                with pytest.raises(natsrpc.CallTimeout) as info:
                    await client.call_service["clientgate"].options(timeout=0.3).wait()
                elapsed = time.monotonic() - started
            finally:
                gate.release.set()
        assert 0.29 <= elapsed < 0.3 + MARGIN
        assert isinstance(info.value, TimeoutError)
        assert_natsrpc_error(info.value)
        assert gate.started == 1
        assert client.pending_calls == 0


class TestConnectionBreaks:
    """No call waits past its deadline when the connection breaks or the client closes."""

    async def test_server_kill_fails_pending_calls_promptly(self, own_server: NatsServer) -> None:
        """Killing the server fails pending 10 s calls within a second, with ConnectionLost."""
        gate = Gate()
        host_client = await natsrpc.connect(own_server.url)
        caller = await natsrpc.connect(own_server.url)
        try:
            async with serve(host_client, gate):
                try:
                    calls = [caller.call_service_async["clientgate"].options(timeout=10).wait() for _ in range(20)]
                    await eventually(lambda: gate.started == 20)
                    killed = time.monotonic()
                    await asyncio.to_thread(own_server.kill)
                    results = await asyncio.gather(*calls, return_exceptions=True)
                    elapsed = time.monotonic() - killed
                finally:
                    gate.release.set()
                    await host_client.close()  # closed first, so the host does not drain into a dead server
        finally:
            await caller.close()
            await host_client.close()
        assert elapsed < MARGIN, f"pending calls took {elapsed:.3f}s to fail after the kill"
        for result in results:
            assert isinstance(result, natsrpc.ConnectionLost | natsrpc.CallTimeout), repr(result)
            assert_natsrpc_error(result)
        assert caller.pending_calls == 0

    async def test_calls_sent_while_reconnecting_are_not_failed_by_that_disconnect(
        self, client: natsrpc.Client, nats_url: str
    ) -> None:
        """A non-idempotent call made after nats-py saw the break, but before its disconnect callback
        ran, waits in nats-py's buffer and is sent after the reconnect: it succeeds, not ConnectionLost."""
        kv = KV()
        async with serve(client, kv), natsrpc.connect(nats_url) as caller:
            await caller.call_service["kv"].put("warm", "up")
            await caller.nc.force_reconnect()  # RECONNECTING now; the disconnect callback runs later
            assert not caller.nc.is_connected
            assert await caller.call_service["kv"].options(timeout=5).put("a", "1") is None
            assert kv.data["a"] == "1"
            assert caller.pending_calls == 0

    async def test_close_fails_a_pending_call_with_client_closed(self, client: natsrpc.Client, nats_url: str) -> None:
        """Closing a client fails its pending calls (awaited directly or spawned) with ClientClosed."""
        gate = Gate()
        async with serve(client, gate):
            try:
                caller = await natsrpc.connect(nats_url)
                direct = asyncio.create_task(caller.call_service["clientgate"].options(timeout=10).wait())
                spawned = caller.call_service_async["clientgate"].options(timeout=10).wait()
                await eventually(lambda: gate.started == 2)
                closing = time.monotonic()
                await caller.close()
                results = await asyncio.gather(direct, spawned, return_exceptions=True)
                elapsed = time.monotonic() - closing
            finally:
                gate.release.set()
        assert elapsed < MARGIN
        for result in results:
            assert isinstance(result, natsrpc.ClientClosed), repr(result)
            assert_natsrpc_error(result)
        assert caller.pending_calls == 0

    async def test_close_right_after_the_server_died_does_not_raise(self, own_server: NatsServer) -> None:
        """Closing a client whose server just died closes it quietly: no nats-py or socket error leaks."""
        gate = Gate()
        host_client = await natsrpc.connect(own_server.url)
        try:
            async with serve(host_client, gate):
                await asyncio.to_thread(own_server.kill)
        finally:
            await host_client.close()
        assert host_client.closed
        assert host_client.nc.is_closed

    async def test_reconnect_half_opens_open_circuits(self, own_server: NatsServer) -> None:
        """After a reconnect, open circuits turn half-open at once: failures seen through a broken link say little."""
        async with natsrpc.connect(own_server.url) as caller:
            breaker = caller.circuit("kv")
            for _ in range(breaker.config.consecutive_failures):
                breaker.record(natsrpc.CallTimeout("through the dying connection"), breaker.allow())
            assert breaker.state is State.OPEN
            restarted = time.monotonic()
            await asyncio.to_thread(own_server.restart)
            await eventually(lambda: breaker.state is not State.OPEN)
            elapsed = time.monotonic() - restarted
            assert caller.nc.is_connected
            assert breaker.state is State.HALF_OPEN
        assert elapsed < MARGIN < breaker.config.open_wait, f"half-open {elapsed:.2f} s after the restart"

    async def test_calls_after_close_raise_client_closed(self, nats_url: str) -> None:
        """A call made on a closed client raises ClientClosed without touching the connection."""
        caller = await natsrpc.connect(nats_url)
        await caller.close()
        with pytest.raises(natsrpc.ClientClosed) as info:
            await caller.call_service["kv"].get("a")
        assert_natsrpc_error(info.value)
        with pytest.raises(natsrpc.ClientClosed):
            await caller.call_service_async["kv"].get("a")
        await caller.close()  # closing twice is harmless


class TestConnectionLogging:
    """Every nats-py connection callback is logged with structlog."""

    async def test_disconnect_and_reconnect_are_logged(self, own_server: NatsServer) -> None:
        """Killing and restarting the server logs "nats disconnected, reconnecting" then "nats reconnected"."""
        with structlog.testing.capture_logs() as logs:
            async with natsrpc.connect(own_server.url) as client:
                await asyncio.to_thread(own_server.kill)
                await eventually(lambda: any(e["event"] == "nats disconnected, reconnecting" for e in logs))
                await asyncio.to_thread(own_server.restart)
                await eventually(lambda: any(e["event"] == "nats reconnected" for e in logs))
                await client.nc.flush()
        events = [e["event"] for e in logs]
        assert events.index("nats disconnected, reconnecting") < events.index("nats reconnected")
        disconnected = next(e for e in logs if e["event"] == "nats disconnected, reconnecting")
        assert disconnected["log_level"] == "warning"

    async def test_an_outage_logs_one_line_then_one_every_10_s(
        self, own_server: NatsServer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """While the server is gone the client logs the disconnect once, then a reminder per interval, not
        one line per reconnect attempt (4 a second); the reconnect is one more line."""
        monkeypatch.setattr(natsrpc.connection, "RECONNECT_LOG_EVERY", 1.0)  # 10 s in production
        with structlog.testing.capture_logs() as logs:
            async with natsrpc.connect(own_server.url, reconnect_time_wait=0.05) as client:
                await asyncio.to_thread(own_server.kill)
                await asyncio.sleep(2.5)  # ~40 failed attempts at 0.05 s, and 2 reminders at 1 s
                lines = [e for e in logs if e["log_level"] != "debug"]
                await asyncio.to_thread(own_server.restart)
                await eventually(lambda: any(e["event"] == "nats reconnected" for e in logs))
                await client.nc.flush()
        assert [e["event"] for e in lines] == ["nats disconnected, reconnecting"] + ["nats still reconnecting"] * 2
        assert lines[-1]["failed_attempts"] > 10
        reconnected = next(e for e in logs if e["event"] == "nats reconnected")
        assert reconnected["failed_attempts"] > 10


class Liar(Service):
    """Answers with a string where its callers' view of it declares an int."""

    name = "tc-liar"
    version = "1.0.0"

    @rpc
    async def number(self) -> str:
        """Returns a string, not a number."""
        return "not a number"


class LiarView(Service):
    """The callers' (stale) view of tc-liar: ``number`` returns an int."""

    name = "tc-liar"
    version = "1.0.0"

    @rpc
    async def number(self) -> int:
        """Returns a number."""
        return 0


class TestBadReplies:
    """A success reply that does not decode raises a natsrpc error, never a msgspec one."""

    async def test_typed_proxy_reply_of_the_wrong_type_is_bad_reply(self, client: natsrpc.Client) -> None:
        """A typed proxy whose return type does not match the reply raises BadReply naming the method."""
        async with serve(client, Liar()):
            with pytest.raises(natsrpc.BadReply, match=r"tc-liar\.number") as info:
                await client.proxy(LiarView).number()
        assert info.value.hop == "tc-liar.number"
        assert isinstance(info.value, natsrpc.NatsRpcError)


class Hang(Service):
    """An idempotent method that never answers in time."""

    name = "hang"

    @rpc(idempotent=True)
    async def wait(self) -> None:
        """Sleeps past any deadline."""
        await asyncio.sleep(10)


class TestUnknownMethodsAndTheCircuit:
    """A misspelt method is NotFound at once; neither it nor a never-seen service opens a circuit."""

    async def test_a_misspelt_method_is_not_found_without_sending(self, client: natsrpc.Client, kv: KV) -> None:
        """Discovery knows kv's methods: kv.gett raises NotFound naming them, sends nothing, opens nothing."""
        assert await client.call_service["kv"].get("a") is None  # kv serves, and the registry knows it
        assert client.registry is not None
        await eventually(lambda: client.registry is not None and client.registry.methods("kv") is not None)
        sent = client.nc.stats["out_msgs"]
        for _ in range(10):
            with pytest.raises(natsrpc.NotFound) as info:
                await client.call_service["kv"].gett("a")
            assert info.value.message == "kv has no method 'gett' (it has: delete, get, keys, put)"
            assert info.value.hop == "kv.gett"
        assert client.nc.stats["out_msgs"] == sent
        assert client.circuit("kv").state is State.CLOSED
        assert await client.call_service["kv"].get("a") is None

    async def test_a_never_seen_service_opens_no_circuit(self, client: natsrpc.Client) -> None:
        """Ten calls to a service never seen each raise NoResponders saying so; its circuit stays closed."""
        for _ in range(10):
            with pytest.raises(natsrpc.NoResponders, match="no instance of it seen"):
                await client.call_service["calcc"].compute()
        assert client.circuit("calcc").state is State.CLOSED

    async def test_the_breaker_counts_calls_not_attempts(self, nats_url: str) -> None:
        """With consecutive_failures=2, one call whose 3 attempts time out leaves the circuit closed; two open it."""
        config = natsrpc.circuit.CircuitConfig(consecutive_failures=2, min_calls=100)
        async with natsrpc.connect(nats_url, circuit=config) as caller, natsrpc.connect(nats_url) as host_client:
            async with serve(host_client, Hang()):
                proxy = caller.call_service["hang"].options(timeout=0.8, attempt_timeout=0.15, idempotent=True)
                sent = caller.nc.stats["out_msgs"]
                with pytest.raises(natsrpc.CallTimeout):
                    await proxy.wait()
                assert caller.nc.stats["out_msgs"] - sent >= 3  # it was retried
                assert caller.circuit("hang").state is State.CLOSED
                with pytest.raises(natsrpc.CallTimeout):
                    await proxy.wait()
                assert caller.circuit("hang").state is State.OPEN
                with pytest.raises(natsrpc.CircuitOpen, match="2 calls in a row failed"):
                    await proxy.wait()
