"""Tests of service-to-service calls: the call context, deadline propagation, errors naming hops, recursion.

Handlers read ``natsrpc.current_call()``; calls they make carry its remaining deadline, its trace
id and their own ``<service>/<instance-id>`` as the caller.
"""

from __future__ import annotations

import asyncio
import re
import time

import msgspec
import nats
import pytest
from children import loop_probe, poll

import natsrpc
from natsrpc import Service, context, protocol, rpc
from natsrpc.host import Host
from natsrpc.testing import serve

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"
# Natsrpc-Deadline has millisecond resolution, rounded up: a handler may see up to 1 ms more than
# the caller's timeout (never less than the caller's own timer).
MS = 0.001
TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-0[01]$")


# --------------------------------------------------------------------------------------------------
# Services used by the tests (module level: annotations resolve against module globals).
# --------------------------------------------------------------------------------------------------


class Seen(msgspec.Struct):
    """What a handler saw of its call context."""

    service: str
    method: str
    caller: str
    trace_id: str
    traceparent: str
    deadline: float
    remaining: float
    instance: str
    headers: dict[str, str]


def seen() -> Seen:
    """Returns the current call's context as a Seen."""
    call = natsrpc.current_call()
    return Seen(
        service=call.service,
        method=call.method,
        caller=call.caller,
        trace_id=call.trace_id,
        traceparent=call.traceparent,
        deadline=call.deadline,
        remaining=call.remaining(),
        instance=call.instance,
        headers=dict(call.headers),
    )


class Probe(Service):
    """Reports the call context it sees."""

    name = "ctxprobe"

    @rpc
    async def info(self) -> Seen:
        """Returns the context of this call."""
        return seen()

    @rpc
    def info_sync(self) -> Seen:
        """Returns the context of this call, from a plain ``def`` handler (run in a worker thread)."""
        return seen()


class Back(Service):
    """The downstream end: counts executions, raises on demand, holds a slot on demand."""

    name = "ctxback"

    def __init__(self) -> None:
        self.count = 0
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    @rpc
    async def record(self) -> int:
        """Counts one execution (the side effect tests look for) and returns the count."""
        self.count += 1
        return self.count

    @rpc
    async def hold(self) -> None:
        """Occupies a concurrency slot until the test releases it."""
        self.holding.set()
        await self.release.wait()

    @rpc
    async def boom(self) -> None:
        """Raises an unexpected KeyError."""
        raise KeyError("missing")

    @rpc
    async def conflict(self) -> None:
        """Raises a business error with a code and data."""
        raise natsrpc.ServiceError(409, "version conflict", {"id": 7})


class Slow(Service):
    """Records the budget it was given, then works for up to a second (until released)."""

    name = "ctxslow"

    def __init__(self) -> None:
        self.remaining: float | None = None
        self.release = asyncio.Event()

    @rpc
    async def work(self) -> str:
        """Records ``current_call().remaining()``, then waits up to 1 s for the test to release it."""
        self.remaining = natsrpc.current_call().remaining()
        try:
            await asyncio.wait_for(self.release.wait(), 1.0)
        except TimeoutError:
            pass
        return "done"


class Front(Service):
    """The middle hop: calls the other test services through ``self.call_service``."""

    name = "ctxfront"

    def __init__(self) -> None:
        self.late_error: BaseException | None = None
        self.late_cancelled = False
        self.late_call_yielded: bool | None = None
        self.late_done = asyncio.Event()
        self.record_runs = 0

    @rpc
    async def relay(self) -> list[Seen]:
        """Returns its own context and the one ctxprobe sees."""
        return [seen(), Seen(**await self.call_service["ctxprobe"].info())]

    @rpc
    async def relay_short(self, seconds: float) -> Seen:
        """Calls ctxprobe with a ``seconds`` timeout, below its own deadline; returns what ctxprobe saw."""
        return Seen(**await self.call_service["ctxprobe"].options(timeout=seconds).info())

    @rpc
    async def slow(self) -> str:
        """Calls ctxslow.work."""
        result: str = await self.call_service["ctxslow"].work()
        return result

    @rpc
    async def record(self) -> int:
        """Counts its own runs, then calls ctxback.record."""
        self.record_runs += 1
        result: int = await self.call_service["ctxback"].record()
        return result

    @rpc
    async def late(self, nap: float) -> None:
        """Sleeps ``nap`` seconds (cancelled at its deadline, it carries on), then tries to call ctxback.record."""
        try:
            await asyncio.sleep(nap)
        except asyncio.CancelledError:  # the host cancels a handler at its deadline; this one carries on
            self.late_cancelled = natsrpc.current_call().cancelled
        try:
            with loop_probe() as yielded:
                await self.call_service["ctxback"].record()
        except Exception as exc:
            self.late_error = exc
            raise
        finally:
            self.late_call_yielded = bool(yielded)
            self.late_done.set()

    @rpc
    async def boom(self) -> None:
        """Calls ctxback.boom (which raises KeyError)."""
        await self.call_service["ctxback"].boom()

    @rpc
    async def conflict(self) -> None:
        """Calls ctxback.conflict (which raises a 409 ServiceError)."""
        await self.call_service["ctxback"].conflict()

    @rpc
    async def chain(self) -> None:
        """Calls ctxmid.boom, which calls ctxback.boom: a three-hop failure."""
        await self.call_service["ctxmid"].boom()


class Mid(Service):
    """A second middle hop, for errors crossing three services."""

    name = "ctxmid"

    @rpc
    async def boom(self) -> None:
        """Calls ctxback.boom."""
        await self.call_service["ctxback"].boom()


class Ping(Service):
    """Bounces a countdown to ctxpong."""

    name = "ctxping"
    other = "ctxpong"

    @rpc
    async def bounce(self, n: int) -> list[str]:
        """Returns ``[<name>:<n>/<caller>, ...]`` down to 0, alternating with the other service."""
        me = f"{self.name}:{n}/{natsrpc.current_call().caller.partition('/')[0]}"
        if n == 0:
            return [me]
        rest: list[str] = await self.call_service[self.other].bounce(n - 1)
        return [me, *rest]


class Pong(Ping):
    """Bounces a countdown back to ctxping."""

    name = "ctxpong"
    other = "ctxping"


class Recursive(Service):
    """Calls itself: ``self.call_service[self.name]``."""

    name = "ctxself"

    def __init__(self) -> None:
        self.callers: list[str] = []

    @rpc
    async def factorial(self, n: int) -> int:
        """Returns n!, computing (n-1)! with a call to this service."""
        self.callers.append(natsrpc.current_call().caller)
        if n <= 1:
            return 1
        rest: int = await self.call_service[self.name].factorial(n - 1)
        return n * rest


# --------------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------------


def instance_of(host: Host, service: Service) -> str:
    """Returns ``<service>/<instance-id>`` of ``service`` in ``host``."""
    return next(i.label for i in host.instances if i.service is service)


def route_stats(host: Host, service: Service, method: str) -> natsrpc.host.EndpointStats:
    """Returns the host's counters of one endpoint of ``service``."""
    inst = next(i for i in host.instances if i.service is service)
    return inst.routes[method].stats


# --------------------------------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------------------------------


class TestCurrentCall:
    """natsrpc.current_call() tells a handler its deadline, caller, trace and headers."""

    async def test_first_hop_sees_client_caller_and_its_own_deadline(self, client: natsrpc.Client) -> None:
        """A call from a plain client shows caller "client", a new trace, and deadline = send time + timeout."""
        async with serve(client, Probe()) as host:
            before = time.time()
            info = await client.proxy(Probe, timeout=2.0).info()
        assert info.caller == "client"
        assert info.service == "ctxprobe"
        assert info.method == "info"
        assert info.instance == host.instances[0].label
        assert TRACEPARENT_RE.match(info.traceparent)
        assert info.trace_id == info.traceparent.split("-")[1]
        assert before + 1.9 < info.deadline <= before + 2.01
        assert 1.9 < info.remaining <= 2.0 + MS
        assert info.headers[protocol.DEADLINE] == str(round(info.deadline * 1000))
        assert protocol.CALLER not in info.headers
        assert protocol.TRACEPARENT not in info.headers

    async def test_sync_handler_sees_its_call(self, client: natsrpc.Client) -> None:
        """A plain ``def`` handler, run in a worker thread, still sees its own call context."""
        async with serve(client, Probe()):
            info = await client.proxy(Probe, timeout=2.0, headers={protocol.TRACEPARENT: TRACEPARENT}).info_sync()
        assert (info.service, info.method, info.caller, info.trace_id) == ("ctxprobe", "info_sync", "client", TRACE_ID)
        assert 1.9 < info.remaining <= 2.0 + MS

    async def test_downstream_sees_the_calling_instance_and_the_same_trace(self, client: natsrpc.Client) -> None:
        """One hop down: caller is ctxfront/<instance-id>, same trace id, new span, same deadline."""
        front = Front()
        async with serve(client, front, Probe()) as host:
            mine, theirs = await client.proxy(Front).relay()
        assert mine.caller == "client"
        assert theirs.caller == instance_of(host, front) == mine.instance
        assert re.fullmatch(r"ctxfront/\w+", theirs.caller)
        assert theirs.headers[protocol.CALLER] == theirs.caller
        assert theirs.trace_id == mine.trace_id
        assert theirs.headers[protocol.TRACEPARENT] == mine.traceparent  # the parent of its span is front's
        assert theirs.traceparent != mine.traceparent
        assert theirs.deadline == pytest.approx(mine.deadline, abs=0.002)
        assert theirs.remaining < mine.remaining

    async def test_caller_traceparent_is_kept_downstream(self, client: natsrpc.Client) -> None:
        """A traceparent sent by the client keeps its trace id at every hop, with a new span id per hop."""
        async with serve(client, Front(), Probe()):
            mine, theirs = await client.proxy(Front, headers={protocol.TRACEPARENT: TRACEPARENT}).relay()
        assert mine.trace_id == theirs.trace_id == TRACE_ID
        assert mine.headers[protocol.TRACEPARENT] == TRACEPARENT
        spans = {TRACEPARENT.split("-")[2], mine.traceparent.split("-")[2], theirs.traceparent.split("-")[2]}
        assert len(spans) == 3

    @pytest.mark.parametrize(
        "bad",
        [
            f"00-{'0' * 32}-b7ad6b7169203331-01",
            f"00-{TRACE_ID.upper()}-b7ad6b7169203331-01",
            f"00-{'z' * 32}-b7ad6b7169203331-01",
            f"00-{TRACE_ID}-{'0' * 16}-01",
            f"00-{TRACE_ID}-b7ad6b71-01",
            f"ff-{TRACE_ID}-b7ad6b7169203331-01",
            f"00-{TRACE_ID}-b7ad6b7169203331-01-extra",
            "not a traceparent",
        ],
        ids=["zero-trace", "upper-case", "not-hex", "zero-span", "short-span", "version-ff", "extra-field", "junk"],
    )
    async def test_invalid_traceparent_starts_a_new_trace(self, client: natsrpc.Client, bad: str) -> None:
        """An invalid caller traceparent is ignored (W3C Trace Context): the first hop starts a new trace."""
        async with serve(client, Probe()):
            info = await client.proxy(Probe, headers={protocol.TRACEPARENT: bad}).info()
        match = TRACEPARENT_RE.match(info.traceparent)
        assert match, info.traceparent
        assert match.group(1) not in (TRACE_ID, TRACE_ID.upper(), "0" * 32)

    async def test_sampled_flag_is_kept(self, client: natsrpc.Client) -> None:
        """A caller's "not sampled" flag (00) travels on through every hop, as W3C Trace Context asks."""
        unsampled = f"00-{TRACE_ID}-b7ad6b7169203331-00"
        async with serve(client, Front(), Probe()):
            mine, theirs = await client.proxy(Front, headers={protocol.TRACEPARENT: unsampled}).relay()
        assert mine.traceparent.endswith("-00")
        assert theirs.traceparent.endswith("-00")
        assert mine.trace_id == theirs.trace_id == TRACE_ID

    async def test_future_version_traceparent_keeps_its_trace_id(self, client: natsrpc.Client) -> None:
        """A higher-version traceparent with extra fields still gives its trace id (sent on as version 00)."""
        future = f"01-{TRACE_ID}-b7ad6b7169203331-01-what-comes-next"
        async with serve(client, Probe()):
            info = await client.proxy(Probe, headers={protocol.TRACEPARENT: future}).info()
        assert info.trace_id == TRACE_ID
        assert TRACEPARENT_RE.match(info.traceparent)

    async def test_concurrent_calls_keep_their_own_context(self, client: natsrpc.Client) -> None:
        """Twenty calls in flight at once, each with its own trace, each see only their own downstream."""
        async with serve(client, Front(), Probe()):
            trace_ids = [f"{i:032x}" for i in range(1, 21)]
            results = await asyncio.gather(
                *(
                    client.proxy(Front, headers={protocol.TRACEPARENT: f"00-{t}-{'1' * 16}-01"}).relay()
                    for t in trace_ids
                )
            )
        assert [(a.trace_id, b.trace_id) for a, b in results] == [(t, t) for t in trace_ids]

    async def test_shorter_call_timeout_inside_a_handler_wins(self, client: natsrpc.Client) -> None:
        """A handler's call with a timeout below its own remaining budget sends that smaller deadline."""
        async with serve(client, Front(), Probe()):
            theirs = await client.proxy(Front, timeout=5).relay_short(0.05)
        assert 0 < theirs.remaining <= 0.05 + MS

    async def test_request_without_deadline_gets_the_host_default(self, client: natsrpc.Client, nats_url: str) -> None:
        """A plain NATS request without Natsrpc-Deadline gets now + the host's default_timeout."""
        nc = await nats.connect(nats_url)
        try:
            async with serve(client, Probe(), default_timeout=7.0):
                reply = await nc.request("svc.ctxprobe.info", b"", timeout=2)
        finally:
            await nc.drain()
        info = msgspec.json.decode(reply.data, type=Seen)
        assert 6.9 < info.remaining <= 7.0
        assert info.caller == "client"

    async def test_client_caller_name_is_sent(self, client: natsrpc.Client, nats_url: str) -> None:
        """A client connected with caller="nightly-job" is seen as that caller at the first hop."""
        async with serve(client, Probe()), natsrpc.connect(nats_url, caller="nightly-job") as job:
            info = await job.proxy(Probe).info()
        assert info.caller == "nightly-job"

    def test_outside_a_handler_is_a_lookup_error(self) -> None:
        """current_call() outside a handler raises LookupError with a helpful message."""
        with pytest.raises(LookupError, match="inside an @rpc handler"):
            natsrpc.current_call()


class TestDeadlineHeader:
    """Natsrpc-Deadline carries epoch milliseconds, rounded up so a receiver never has less than the caller."""

    @pytest.mark.parametrize(
        ("deadline", "header"),
        [(1700000000.0, "1700000000000"), (1700000000.0001, "1700000000001"), (1700000000.9991, "1700000001000")],
        ids=["exact", "just-after", "rounds-into-next-second"],
    )
    def test_rounds_up_to_the_millisecond(self, deadline: float, header: str) -> None:
        """deadline_header() rounds a partial millisecond up, and parse_deadline() reads it back."""
        assert context.deadline_header(deadline) == header
        parsed = context.parse_deadline({protocol.DEADLINE: header}, 30.0)
        assert deadline <= parsed < deadline + MS

    def test_missing_header_means_the_default(self) -> None:
        """Without the header the deadline is now + the default timeout."""
        for headers in (None, {}, {"Other": "1"}):
            deadline = context.parse_deadline(headers, 7.0)
            assert deadline is not None
            assert deadline - time.time() == pytest.approx(7.0, abs=0.05)

    @pytest.mark.parametrize(
        "value",
        ["soon", "-5", "9" * 400, "1e308", "\u00b2\u00b3", "", " 17 ", "1" * 16],
        ids=["word", "negative", "400-digits", "float-overflow", "unicode-digits", "empty", "spaces", "16-digits"],
    )
    def test_an_implausible_header_is_refused(self, value: str) -> None:
        """A Natsrpc-Deadline that is not plausible epoch milliseconds gives None (the host replies 400)."""
        assert context.parse_deadline({protocol.DEADLINE: value}, 7.0) is None


class TestDeadlinePropagation:
    """One deadline covers the whole chain: downstream calls get what is left, and no work runs late."""

    async def test_client_times_out_at_its_deadline_and_downstream_got_less(self, client: natsrpc.Client) -> None:
        """A 0.3 s call to front -> slow fails at the client with CallTimeout at ~0.3 s; slow had < 0.3 s."""
        slow = Slow()
        async with serve(client, Front(), slow):
            start = time.perf_counter()
            with pytest.raises(natsrpc.CallTimeout) as info:
                await client.call_service["ctxfront"].options(timeout=0.3).slow()
            elapsed = time.perf_counter() - start
            slow.release.set()
        assert 0.25 < elapsed < 0.6, f"CallTimeout after {elapsed * 1000:.0f} ms"
        assert info.value.hop == "ctxfront.slow"
        assert slow.remaining is not None
        # below the client's 0.3 s by the time front took to pass the call on (less the ms rounding)
        assert 0.2 < slow.remaining < 0.3 + MS, f"slow saw {slow.remaining * 1000:.1f} ms left"

    async def test_call_after_the_deadline_fails_at_once_without_sending(self, client: natsrpc.Client) -> None:
        """A handler that outlived its deadline gets DeadlineExceeded at once, and nothing reaches ctxback."""
        front, back = Front(), Back()
        async with serve(client, front, back) as host:
            with pytest.raises(natsrpc.CallTimeout):
                await client.call_service["ctxfront"].options(timeout=0.1).late(0.15)
            await asyncio.wait_for(front.late_done.wait(), 2)
            received = route_stats(host, back, "record").num_requests
        error = front.late_error
        assert isinstance(error, natsrpc.DeadlineExceeded), repr(error)
        assert front.late_cancelled
        assert error.hop == "ctxback.record"
        assert "ctxfront.late" in str(error)
        assert front.late_call_yielded is False  # failed at once: it never waited on the event loop
        assert back.count == 0
        assert received == 0

    async def test_request_reaching_downstream_after_its_deadline_is_not_executed(self, client: natsrpc.Client) -> None:
        """front's call queued behind ctxback's full limit expires there: ctxback answers 504 and never runs it."""
        back = Back()
        async with serve(client, back, max_concurrency=1) as back_host, serve(client, Front()):
            holder = asyncio.ensure_future(client.call_service["ctxback"].hold())
            await back.holding.wait()
            with pytest.raises((natsrpc.CallTimeout, natsrpc.DeadlineExceeded)):
                await client.call_service["ctxfront"].options(timeout=0.2).record()
            await poll(lambda: back_host.in_flight == 2)  # hold running, front's record still queued
            back.release.set()
            await holder
            await poll(lambda: back_host.in_flight == 0)
            stats = route_stats(back_host, back, "record")
        assert back.count == 0
        assert stats.num_requests == 1
        assert stats.num_errors == 1
        assert stats.last_error.startswith("504 ")
        assert "deadline passed" in stats.last_error


class TestErrorsNameTheHop:
    """An error raised downstream reaches the client through the middle service, naming the failing hop."""

    async def test_unexpected_exception_downstream(self, client: natsrpc.Client) -> None:
        """ctxback's KeyError reaches the client as a 500 whose message says 'ctxfront.boom -> ctxback.boom'."""
        async with serve(client, Front(), Back()):
            with pytest.raises(natsrpc.InternalError) as info:
                await client.call_service["ctxfront"].boom()
        error = info.value
        assert error.code == 500
        assert error.type == "KeyError"
        assert "ctxfront.boom -> ctxback.boom" in error.message
        assert "missing" in error.message
        assert error.hop == "ctxfront.boom"

    async def test_service_error_keeps_code_and_data(self, client: natsrpc.Client) -> None:
        """ctxback's 409 ServiceError reaches the client with its code, type and data, naming the hop."""
        async with serve(client, Front(), Back()):
            with pytest.raises(natsrpc.ServiceError) as info:
                await client.call_service["ctxfront"].conflict()
        error = info.value
        assert (error.code, error.type, error.data) == (409, "ServiceError", {"id": 7})
        assert "ctxfront.conflict -> ctxback.conflict" in error.message
        assert "version conflict" in error.message

    async def test_three_hops_name_the_whole_path(self, client: natsrpc.Client) -> None:
        """A failure two hops down names the path once: 'ctxfront.chain -> ctxmid.boom -> ctxback.boom'."""
        async with serve(client, Front(), Mid(), Back()):
            with pytest.raises(natsrpc.InternalError) as info:
                await client.call_service["ctxfront"].chain()
        message = info.value.message
        assert "ctxfront.chain -> ctxmid.boom -> ctxback.boom" in message, message
        assert message.count("ctxmid.boom") == 1, message
        assert info.value.type == "KeyError"

    async def test_missing_downstream_is_bad_gateway_naming_the_hop(self, client: natsrpc.Client) -> None:
        """Calling a service nobody runs fails fast: 502 'ctxfront.record -> ctxback.record: NoResponders'."""
        async with serve(client, Front()):
            start = time.perf_counter()
            with pytest.raises(natsrpc.BadGateway) as info:
                await client.call_service["ctxfront"].record()
            elapsed = time.perf_counter() - start
        assert info.value.code == 502
        assert "ctxfront.record -> ctxback.record" in info.value.message
        # NoResponders, or CircuitOpen once the retries of NoResponders opened ctxback's circuit
        assert info.value.type in ("NoResponders", "CircuitOpen"), info.value
        assert elapsed < 1.0


class TestDownstreamFailuresAreNotRetriedUpstream:
    """A middle handler that ran and then failed downstream is not run again by its caller's retries.

    The downstream's "not executed" refusals (429, 503, no responders) reach the client as 502
    BadGateway, which retries leave alone: the middle hop did run.
    """

    async def test_missing_downstream(self, client: natsrpc.Client) -> None:
        """ctxfront.record fails on a missing ctxback; the client's one call ran ctxfront.record once."""
        front = Front()
        async with serve(client, front):
            with pytest.raises(natsrpc.BadGateway):
                await client.call_service["ctxfront"].record()
        assert front.record_runs == 1

    async def test_overloaded_downstream(self, client: natsrpc.Client) -> None:
        """ctxfront.record fails on an overloaded ctxback (429); the client's one call ran ctxfront.record once."""
        front, back = Front(), Back()
        async with serve(client, back, max_concurrency=1, max_queue=0), serve(client, front):
            holder = asyncio.ensure_future(client.call_service["ctxback"].hold())
            await back.holding.wait()
            try:
                with pytest.raises(natsrpc.BadGateway) as info:
                    await client.call_service["ctxfront"].record()
            finally:
                back.release.set()
                await holder
        assert info.value.type == "Overloaded"
        assert back.count == 0
        assert front.record_runs == 1


class TestRecursion:
    """Services may call each other back and call themselves, within the concurrency limits."""

    async def test_ping_pong_alternates_to_depth_five(self, client: natsrpc.Client) -> None:
        """ctxping(5) -> ctxpong(4) -> ... -> ctxpong(0) completes, each hop called by the other service."""
        async with serve(client, Ping(), Pong()):
            path = await client.call_service["ctxping"].bounce(5)
        assert path == [
            "ctxping:5/client",
            "ctxpong:4/ctxping",
            "ctxping:3/ctxpong",
            "ctxpong:2/ctxping",
            "ctxping:1/ctxpong",
            "ctxpong:0/ctxping",
        ]

    async def test_many_ping_pong_chains_at_once_under_default_limits(self, client: natsrpc.Client) -> None:
        """Thirty depth-5 chains in parallel (90 handlers waiting per service) all complete."""
        async with serve(client, Ping(), Pong()):
            paths = await asyncio.gather(*(client.call_service["ctxping"].bounce(5) for _ in range(30)))
        assert all(len(p) == 6 for p in paths)

    async def test_service_calls_itself(self, client: natsrpc.Client) -> None:
        """factorial(10) through ten nested self-calls is 3628800; inner calls come from ctxself itself."""
        service = Recursive()
        async with serve(client, service) as host:
            assert await client.call_service["ctxself"].factorial(10) == 3628800
        assert service.callers == ["client"] + [instance_of(host, service)] * 9

    async def test_recursion_deeper_than_the_limit_fails_fast(self, client: natsrpc.Client) -> None:
        """With 2 slots and no queue, a depth-10 self-call fails at once (502, type Overloaded), not a hang."""
        async with serve(client, Recursive(), max_concurrency=2, max_queue=0):
            start = time.perf_counter()
            with pytest.raises(natsrpc.BadGateway) as info:
                await client.call_service["ctxself"].options(timeout=3).factorial(10)
            elapsed = time.perf_counter() - start
        assert "ctxself.factorial -> ctxself.factorial" in info.value.message
        assert info.value.type == "Overloaded"
        assert elapsed < 1.0
