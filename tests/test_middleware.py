"""Middleware, one mechanism on both sides, against a real nats-server: order, refusal, headers, streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog
from children import poll

import natsrpc
import natsrpc.circuit
import natsrpc.observe.middleware
import natsrpc.retry
from natsrpc import Service, ServiceError, current_call, rpc
from natsrpc.observe import Invocation
from natsrpc.observe.middleware import Observers
from natsrpc.testing import serve


class Echo(Service):
    name = "mwecho"

    def __init__(self) -> None:
        super().__init__()
        self.ran = 0
        self.seen_headers: dict[str, str] = {}

    @rpc
    async def echo(self, value: str) -> str:
        self.ran += 1
        self.seen_headers = dict(current_call().headers)
        return value

    @rpc
    def blocking(self, value: int) -> int:
        self.ran += 1
        return value * 2

    @rpc
    async def fail(self) -> None:
        raise ServiceError(409, "conflict")

    @rpc
    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @rpc
    async def break_after(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        raise ServiceError(409, "no more")


class Recorder:
    """Records what it sees, in a shared log, under its label."""

    def __init__(self, label: str, log: list[Any]) -> None:
        self.label = label
        self.log = log

    async def __call__(self, call: Invocation, call_next: Any) -> Any:
        self.log.append((self.label, "in", call.side, call.service, call.method, call.args, dict(call.kwargs)))
        try:
            result = await call_next()
        except Exception as exc:
            self.log.append((self.label, "raised", type(exc).__name__))
            raise
        self.log.append((self.label, "out", result))
        return result


class Auth:
    """Refuses every call without an ``Authorization: secret`` header, before the handler runs."""

    async def __call__(self, call: Invocation, call_next: Any) -> Any:
        if call.headers.get("Authorization") != "secret":
            raise ServiceError(401, "unauthorized", type="Unauthorized")
        return await call_next()


class AddsHeaders:
    """Client side: adds a request header; server side: adds a reply header."""

    async def __call__(self, call: Invocation, call_next: Any) -> Any:
        if call.side == "client":
            call.headers["Authorization"] = "secret"
            return await call_next()
        assert call.reply_headers is not None
        call.reply_headers["X-Served-By"] = call.instance
        return await call_next()


@pytest.fixture
async def mw_client(nats_url: str, request: pytest.FixtureRequest) -> AsyncIterator[natsrpc.Client]:
    """A client with the middleware the test's ``client_middleware`` marker-free parameter gives."""
    middleware = getattr(request, "param", None)
    async with natsrpc.connect(nats_url, middleware=middleware) as client:
        yield client


class TestServerSide:
    async def test_order_outermost_first_and_values_seen(self, client: natsrpc.Client) -> None:
        """Two server middleware wrap the handler: the first listed is the outermost, both see the call."""
        log: list[Any] = []
        service = Echo()
        async with serve(client, service, middleware=[Recorder("a", log), Recorder("b", log)]):
            assert await client.call_service["mwecho"].echo("hi") == "hi"
        assert log == [
            ("a", "in", "server", "mwecho", "echo", ("hi",), {}),
            ("b", "in", "server", "mwecho", "echo", ("hi",), {}),
            ("b", "out", "hi"),
            ("a", "out", "hi"),
        ]

    async def test_an_auth_middleware_refuses_before_the_handler(self, client: natsrpc.Client) -> None:
        """A 401 from the middleware reaches the caller; the handler never ran. With the header it runs."""
        service = Echo()
        async with serve(client, service, middleware=[Auth()]):
            with pytest.raises(natsrpc.RemoteError) as caught:
                await client.call_service["mwecho"].echo("hi")
            assert caught.value.code == 401
            assert caught.value.type == "Unauthorized"
            assert service.ran == 0
            authorized = client.call_service["mwecho"].options(headers={"Authorization": "secret"})
            assert await authorized.echo("hi") == "hi"
            assert service.ran == 1

    async def test_plain_def_handlers_and_errors_go_through(self, client: natsrpc.Client) -> None:
        """A thread-run handler's result and a handler's ServiceError pass through the middleware."""
        log: list[Any] = []
        async with serve(client, Echo(), middleware=[Recorder("a", log)]):
            assert await client.call_service["mwecho"].blocking(21) == 42
            with pytest.raises(natsrpc.RemoteError) as caught:
                await client.call_service["mwecho"].fail()
            assert caught.value.code == 409
        assert ("a", "out", 42) in log
        assert ("a", "raised", "ServiceError") in log

    async def test_a_middleware_can_replace_the_result(self, client: natsrpc.Client) -> None:
        """What the chain returns is what is encoded and sent."""

        async def shout(call: Invocation, call_next: Any) -> Any:
            return (await call_next()).upper()

        async with serve(client, Echo(), middleware=[shout]):
            assert await client.call_service["mwecho"].echo("hi") == "HI"

    async def test_a_stream_goes_through_once_for_its_whole_length(self, client: natsrpc.Client) -> None:
        """A streaming endpoint passes the chain once; call_next() returns when the stream ended."""
        log: list[Any] = []
        async with serve(client, Echo(), middleware=[Recorder("a", log)]):
            assert [i async for i in client.call_service["mwecho"].count(3)] == [0, 1, 2]
            # A plain request (no stream header) gets the array reply through the middleware too.
            reply = await client.nc.request("svc.mwecho.count", b'{"n": 2}', timeout=5)
            assert reply.data == b"[0,1]"
        assert log.count(("a", "out", None)) == 2
        assert log[0] == ("a", "in", "server", "mwecho", "count", (3,), {})

    async def test_a_stream_failing_midway_through_middleware_ends_in_order(self, client: natsrpc.Client) -> None:
        """The items so far, then the RemoteError, numbered as the stream's last message (not a protocol error)."""
        got: list[int] = []
        async with serve(client, Echo(), middleware=[Recorder("a", [])]):

            async def consume() -> None:
                async for i in client.call_service["mwecho"].break_after(3):
                    got.append(i)

            with pytest.raises(natsrpc.RemoteError) as caught:
                await consume()
        assert got == [0, 1, 2]
        assert caught.value.code == 409
        # On the wire, the error is the stream's numbered last message (seq 4, after items 1-3).
        messages: list[Any] = []
        async with serve(client, Echo(), middleware=[Recorder("a", [])]):
            inbox = client.nc.new_inbox()

            async def keep(msg: Any) -> None:
                messages.append(msg)

            sub = await client.nc.subscribe(inbox, cb=keep)
            await client.nc.publish("svc.mwecho.break_after", b'{"n": 3}', reply=inbox, headers={"Natsrpc-Stream": "8"})
            await poll(lambda: any((m.headers or {}).get("Nats-Service-Error-Code") for m in messages), "the error")
            await sub.unsubscribe()
        last = messages[-1].headers
        assert last["Nats-Service-Error-Code"] == "409"
        assert last["Natsrpc-Seq"] == "4"

    async def test_refused_requests_are_told_to_on_rejected(self, client: natsrpc.Client) -> None:
        """A 429 (concurrency and queue full) reaches ``on_rejected`` with the service, method and code."""
        rejected: list[tuple[str, str, int]] = []
        gate, running = asyncio.Event(), asyncio.Event()

        class Slow(Service):
            name = "mwslow"

            @rpc
            async def wait(self) -> None:
                running.set()
                await gate.wait()

        class Counts:
            async def __call__(self, call: Invocation, call_next: Any) -> Any:
                return await call_next()

            def on_rejected(self, service: str, method: str, code: int) -> None:
                rejected.append((service, method, code))

        async with serve(client, Slow(), middleware=[Counts()], max_concurrency=1, max_queue=0):
            first = asyncio.ensure_future(client.call_service["mwslow"].wait())
            await running.wait()
            with pytest.raises(natsrpc.Overloaded):
                await client.call_service["mwslow"].options(retry=natsrpc.retry.NO_RETRIES).wait()
            gate.set()
            await first
        assert rejected == [("mwslow", "wait", 429)]


class TestClientSide:
    @pytest.mark.parametrize("mw_client", [[AddsHeaders()]], indirect=True)
    async def test_a_client_middleware_adds_request_headers(
        self, mw_client: natsrpc.Client, client: natsrpc.Client, nats_url: str
    ) -> None:
        """A header the client's middleware adds arrives; the server's middleware adds a reply header."""
        service = Echo()
        async with serve(client, service, middleware=[AddsHeaders(), Auth()]) as host:
            seen: list[Invocation] = []

            async def keep(call: Invocation, call_next: Any) -> Any:
                result = await call_next()
                seen.append(call)
                return result

            async with natsrpc.connect(nats_url, middleware=[AddsHeaders(), keep]) as other:
                assert await other.call_service["mwecho"].echo("hi") == "hi"
            assert await mw_client.call_service["mwecho"].echo("x") == "x"
        assert service.seen_headers["Authorization"] == "secret"
        assert seen[0].reply_headers is not None
        assert seen[0].reply_headers["X-Served-By"] == host.instances[0].label

    async def test_client_middleware_sees_calls_and_streams_with_their_outcome(
        self, nats_url: str, client: natsrpc.Client
    ) -> None:
        """Unary calls, errors and streams pass a client's chain; a stream's call_next() ends with it."""
        log: list[Any] = []
        async with (
            serve(client, Echo()),
            natsrpc.connect(nats_url, middleware=[Recorder("c", log)], caller="app") as app,
        ):
            assert await app.call_service["mwecho"].echo("hi") == "hi"
            with pytest.raises(natsrpc.RemoteError):
                await app.call_service["mwecho"].fail()
            assert [i async for i in app.call_service["mwecho"].count(2)] == [0, 1]
            await asyncio.sleep(0)  # the stream's chain task finishes once the end was taken
        assert log == [
            ("c", "in", "client", "mwecho", "echo", ("hi",), {}),
            ("c", "out", "hi"),
            ("c", "in", "client", "mwecho", "fail", (), {}),
            ("c", "raised", "ServiceError"),
            ("c", "in", "client", "mwecho", "count", (2,), {}),
            ("c", "out", None),
        ]

    async def test_a_client_middleware_refusing_a_stream_raises_at_iteration(
        self, nats_url: str, client: natsrpc.Client
    ) -> None:
        """A client middleware raising before call_next(): the first __anext__ raises it, nothing is sent."""
        service = Echo()

        async def refuse(call: Invocation, call_next: Any) -> Any:
            raise natsrpc.ConfigurationError("no streams here")

        async with serve(client, service), natsrpc.connect(nats_url, middleware=[refuse]) as app:
            with pytest.raises(natsrpc.ConfigurationError, match="no streams here"):
                async for _ in app.call_service["mwecho"].count(2):
                    pass
            with pytest.raises(natsrpc.ConfigurationError, match="no streams here"):
                await app.call_service["mwecho"].echo("x")
        assert service.ran == 0

    async def test_a_service_calling_out_passes_the_hosts_client_middleware(
        self, nats_url: str, client: natsrpc.Client
    ) -> None:
        """A handler's ``self.call_service`` goes through its client's middleware, with the handler as caller."""
        log: list[Any] = []

        class Front(Service):
            name = "mwfront"

            @rpc
            async def relay(self, value: str) -> str:
                result: str = await self.call_service["mwecho"].echo(value)
                return result

        seen: list[Invocation] = []

        async def keep(call: Invocation, call_next: Any) -> Any:
            seen.append(call)
            return await call_next()

        async with natsrpc.connect(nats_url, middleware=[keep, Recorder("c", log)]) as hosting:
            async with serve(hosting, Front()), serve(client, Echo()):
                assert await client.call_service["mwfront"].relay("v") == "v"
        assert [(c.service, c.method) for c in seen] == [("mwecho", "echo")]
        assert seen[0].caller.startswith("mwfront/")
        assert len(seen[0].trace_id) == 32
        assert seen[0].context is not None
        assert seen[0].context.method == "relay"

    async def test_retries_and_circuit_changes_are_told(self, nats_url: str) -> None:
        """``on_retry`` hears each retry of a call, ``on_circuit`` each state change of a breaker."""
        retries: list[tuple[str, str]] = []
        states: list[tuple[str, str]] = []

        class Hooks:
            async def __call__(self, call: Invocation, call_next: Any) -> Any:
                return await call_next()

            def on_retry(self, service: str, method: str) -> None:
                retries.append((service, method))

            def on_circuit(self, service: str, state: Any) -> None:
                states.append((service, str(state)))

        config = natsrpc.circuit.CircuitConfig(min_calls=2, failure_rate=0.5)
        async with natsrpc.connect(nats_url, middleware=[Hooks()], circuit=config, discovery=False) as app:
            policy = natsrpc.retry.RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.002)
            for _ in range(2):
                with pytest.raises(natsrpc.CallError):
                    await app.call_service["mwnobody"].options(retry=policy, idempotent=True).get()
        assert retries[:2] == [("mwnobody", "get"), ("mwnobody", "get")]
        assert ("mwnobody", "open") in states

    async def test_hooks_that_raise_are_logged_and_what_they_watch_goes_on(
        self, nats_url: str, client: natsrpc.Client
    ) -> None:
        """An on_rejected, on_retry or on_circuit that raises is logged (the 1st, 2nd, 4th...), and
        the request refused still gets its error reply (not a timeout), the retry is still made and
        the circuit still opens."""
        told: list[str] = []

        class Broken:
            async def __call__(self, call: Invocation, call_next: Any) -> Any:
                return await call_next()

            def on_rejected(self, service: str, method: str, code: int) -> None:
                told.append(f"rejected {code}")
                raise RuntimeError("on_rejected bug")

            def on_retry(self, service: str, method: str) -> None:
                told.append("retry")
                raise RuntimeError("on_retry bug")

            def on_circuit(self, service: str, state: Any) -> None:
                told.append(f"circuit {state}")
                raise RuntimeError("on_circuit bug")

        raw = client.nc
        with structlog.testing.capture_logs() as logged:
            async with serve(client, Echo(), middleware=[Broken()]):
                for _ in range(3):  # a bad deadline header: refused in the read loop, before any task
                    reply = await raw.request("svc.mwecho.echo", b'["x"]', timeout=5, headers={"Natsrpc-Deadline": "x"})
                    assert reply.headers is not None
                    assert reply.headers["Nats-Service-Error-Code"] == "400"
            config = natsrpc.circuit.CircuitConfig(min_calls=2, failure_rate=0.5)
            policy = natsrpc.retry.RetryPolicy(max_attempts=2, initial_backoff=0.001, max_backoff=0.002)
            async with natsrpc.connect(nats_url, middleware=[Broken()], circuit=config, discovery=False) as app:
                for _ in range(2):
                    with pytest.raises(natsrpc.NoResponders):
                        await app.call_service["mwnobody"].options(retry=policy, idempotent=True).get()
                with pytest.raises(natsrpc.CircuitOpen):
                    await app.call_service["mwnobody"].get()
        assert told[:3] == ["rejected 400"] * 3
        assert told.count("retry") == 2
        assert "circuit open" in told
        failures = [e for e in logged if e["event"] == "middleware hook failed"]
        assert [(e["hook"], e["ignored"]) for e in failures if e["hook"] == "on_rejected"] == [
            ("on_rejected", 1),
            ("on_rejected", 2),
        ]
        assert {e["hook"] for e in failures} == {"on_rejected", "on_retry", "on_circuit"}
        assert "on_rejected bug" in failures[0]["error"]

    def test_middleware_that_is_not_callable_is_refused_before_connecting(self) -> None:
        """A middleware list holding a non-callable is a ConfigurationError at connect() and Host()."""
        with pytest.raises(natsrpc.ConfigurationError, match="not callable"):
            natsrpc.connect("nats://127.0.0.1:1", middleware=[object()])  # type: ignore[list-item]
        with pytest.raises(natsrpc.ConfigurationError, match="list of middleware"):
            natsrpc.connect("nats://127.0.0.1:1", middleware=Auth())  # type: ignore[arg-type]


class Watch(natsrpc.observe.middleware.Observer):
    """An observer recording begin and end in a shared log; optionally adds a header, refuses or fails."""

    def __init__(self, label: str, log: list[Any], *, header: bool = False, refuse: bool = False) -> None:
        self.label = label
        self.log = log
        self.header = header
        self.refuse = refuse
        self.fail_end = False

    def begin(self, call: Invocation) -> str:
        self.log.append((self.label, "begin", call.side, call.method))
        if self.refuse and call.side == "server":
            raise ServiceError(401, "unauthorized")
        if self.header and call.side == "client":
            call.headers["Authorization"] = "secret"
        return f"{self.label}-state"

    def end(self, call: Invocation, state: Any, error: BaseException | None) -> None:
        self.log.append((self.label, "end", call.side, state, type(error).__name__ if error else None))
        if self.fail_end:
            raise RuntimeError("an observer's own bug")


class TestObservers:
    async def test_observers_run_in_line_in_order_around_the_chain_and_see_errors(self, nats_url: str) -> None:
        """Observers first, then a wrapping middleware, then an observer after it (run as a layer):
        the order holds on both sides, states reach end, an error reaches every end."""
        log: list[Any] = []
        chain = [Watch("a", log), Watch("b", log), Recorder("r", log), Watch("c", log)]
        async with (
            natsrpc.connect(nats_url, middleware=chain) as client,
            serve(client, Echo(), middleware=chain),
        ):
            assert client._observers is not None
            assert len(client._observers.observers) == 2
            assert await client.call_service["mwecho"].echo("x") == "x"
            with pytest.raises(natsrpc.RemoteError):
                await client.call_service["mwecho"].fail()
        for side in ("client", "server"):
            begun = [e[:2] for e in log if len(e) > 2 and e[2] == side and e[1] in ("begin", "in")]
            assert begun[:4] == [("a", "begin"), ("b", "begin"), ("r", "in"), ("c", "begin")]
            ends = [(e[0], e[3], e[4]) for e in log if e[1] == "end" and e[2] == side]
            assert ends == [
                ("c", "c-state", None), ("b", "b-state", None), ("a", "a-state", None),
                ("c", "c-state", "ServiceError"), ("b", "b-state", "ServiceError"), ("a", "a-state", "ServiceError"),
            ]  # fmt: skip

    async def test_an_observer_adds_headers_and_refuses_before_the_handler(self, nats_url: str) -> None:
        """A client observer's header reaches the handler; a server observer raising 401 refuses the
        call before the handler runs, and the observers begun before it are ended with that error."""
        log: list[Any] = []
        echo = Echo()
        async with (
            natsrpc.connect(nats_url, middleware=[Watch("h", log, header=True)]) as client,
            serve(client, echo, middleware=[Watch("outer", log), Watch("guard", log, refuse=True)]),
        ):
            with pytest.raises(natsrpc.RemoteError) as refused:
                await client.call_service["mwecho"].echo("x")
        assert refused.value.code == 401
        assert echo.ran == 0
        assert ("outer", "end", "server", "outer-state", "ServiceError") in log
        assert not any(e[0] == "guard" and e[1] == "end" for e in log)  # it never began
        assert ("h", "end", "client", "h-state", "ServiceError") in log

    async def test_an_observers_own_failure_is_logged_and_the_call_stands(self, nats_url: str) -> None:
        """An observer whose end raises does not change the call's result, on either side."""
        log: list[Any] = []
        broken = Watch("x", log)
        broken.fail_end = True
        async with (
            natsrpc.connect(nats_url, middleware=[broken]) as client,
            serve(client, Echo(), middleware=[broken]),
        ):
            assert await client.call_service["mwecho"].echo("still") == "still"
            assert await client.call_service["mwecho"].blocking(2) == 4
        assert [e[2] for e in log if e[1] == "end"].count("server") == 2

    async def test_a_stream_goes_through_an_observer_once(self, nats_url: str) -> None:
        """Client streams run observers as a layer: begin once, end once after the last item."""
        log: list[Any] = []
        async with (
            natsrpc.connect(nats_url, middleware=[Watch("s", log)]) as client,
            serve(client, Echo(), middleware=[Watch("s", log)]),
        ):
            assert [i async for i in client.call_service["mwecho"].count(3)] == [0, 1, 2]
            await poll(lambda: sum(1 for e in log if e[1] == "end") == 2, "both ends")
        assert sorted((e[1], e[2]) for e in log) == [
            ("begin", "client"), ("begin", "server"), ("end", "client"), ("end", "server")
        ]  # fmt: skip


class Quiet(natsrpc.observe.middleware.Observer):
    """An observer keeping no state (its begin returns None), counting its ends by side."""

    def __init__(self) -> None:
        self.ends: list[str] = []

    def end(self, call: Invocation, state: Any, error: BaseException | None) -> None:
        self.ends.append(call.side)


class TestObserversInLine:
    """The observers at the head of a list run in line, made for their number: one, two, many."""

    @pytest.mark.parametrize("count", [1, 2, 3, 4])
    def test_begin_outermost_first_end_innermost_first_with_states(self, count: int) -> None:
        log: list[Any] = []
        observers = Observers([Watch(str(i), log) for i in range(count)])
        call = Invocation("server", "kv", "get", (), {}, {}, 0.0, "client")
        states = observers.begin(call)
        observers.end(call, states, None)
        labels = [str(i) for i in range(count)]
        assert [e[0] for e in log if e[1] == "begin"] == labels
        assert [(e[0], e[3]) for e in log if e[1] == "end"] == [(x, f"{x}-state") for x in reversed(labels)]

    @pytest.mark.parametrize("count", [1, 2, 3, 4])
    def test_the_last_refusing_ends_those_begun_with_its_error(self, count: int) -> None:
        log: list[Any] = []
        chain = [Watch(str(i), log) for i in range(count - 1)] + [Watch("guard", log, refuse=True)]
        observers = Observers(chain)
        call = Invocation("server", "kv", "get", (), {}, {}, 0.0, "client")
        with pytest.raises(ServiceError):
            observers.begin(call)
        ended = [(e[0], e[4]) for e in log if e[1] == "end"]
        assert ended == [(str(i), "ServiceError") for i in reversed(range(count - 1))]

    @pytest.mark.parametrize("count", [1, 2, 3])
    def test_an_end_raising_is_logged_and_the_others_still_end(self, count: int) -> None:
        log: list[Any] = []
        chain = [Watch(str(i), log) for i in range(count)]
        chain[-1].fail_end = True
        observers = Observers(chain)
        call = Invocation("client", "kv", "get", (), {}, {}, 0.0, "client")
        observers.end(call, observers.begin(call), None)
        assert [e[0] for e in log if e[1] == "end"] == [str(i) for i in reversed(range(count))]

    async def test_an_observer_with_no_state_is_still_ended(self, nats_url: str) -> None:
        """A begin returning None (the default) is not taken for "not begun": end runs on both sides."""
        quiet = Quiet()
        async with (
            natsrpc.connect(nats_url, middleware=[quiet]) as client,
            serve(client, Echo(), middleware=[quiet]),
        ):
            assert await client.call_service["mwecho"].echo("x") == "x"
            await poll(lambda: quiet.ends.count("server") == 1, "the server's end")
        assert sorted(quiet.ends) == ["client", "server"]


class TestInvocation:
    """An Invocation is one call: compared and hashed by identity, its fields settable."""

    def test_two_calls_alike_are_two_calls(self) -> None:
        """Invocations with equal fields differ, key a dict apart, and take new arguments and headers."""
        fields = ("client", "kv", "get", ("a",), {}, {}, 0.0, "client")
        first, second = Invocation(*fields), Invocation(*fields)
        assert first != second
        assert first == first
        assert len({first: 1, second: 2}) == 2
        first.args, first.headers["X-Tenant"] = ("b",), "acme"
        assert (first.args, first.headers, first.reply_headers, first.trace_id) == (
            ("b",),
            {"X-Tenant": "acme"},
            None,
            "",
        )
        with pytest.raises(AttributeError):
            first.unknown = 1  # type: ignore[attr-defined]
