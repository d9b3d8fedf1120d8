"""Resilience against a real nats-server: killed instances, circuit breaking, retries, per-instance routing.

The SIGKILL scenario runs the example kv service as separate ``python -m natsrpc.run`` processes and
prints its figures (registry drop time, CircuitOpen latency, recovery time) so they can be quoted.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import msgspec
import pytest
import pytest_asyncio
from children import REPO, child_env, loop_probe, poll

import natsrpc
from natsrpc import Service, ServiceError, protocol, rpc
from natsrpc.circuit import CircuitConfig, State
from natsrpc.host import Host
from natsrpc.registry import EXPIRY_INTERVALS, InstanceState
from natsrpc.retry import NO_RETRIES, RetryPolicy
from natsrpc.testing import serve
from services.kv import KV

HEARTBEAT = 0.1  # the kv processes' heartbeat interval (--heartbeat-interval)
STARTUP = 20.0  # the longest a process may take to start beating
FAST = 0.010  # the most the median refused call may take (the slowest may lose the CPU to the OS or the collector)
SLACK = 0.25  # scheduling delay allowed on top of protocol times (the test machine is shared and loaded)

# --------------------------------------------------------------------------------------------------
# Services (module level, names unique in the test session: the server is shared).
# --------------------------------------------------------------------------------------------------


class Late(Service):
    """Started only after a call to it has already failed with NoResponders."""

    name = "reslate"

    @rpc
    async def echo(self, text: str) -> str:
        """Returns ``text``."""
        return text


class FirstCallHangs(Service):
    """The first run of each method hangs until released; later runs return at once. Counts runs."""

    name = "resslow"

    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()
        self.release = asyncio.Event()

    async def _run(self, method: str) -> int:
        self.runs[method] += 1
        run = self.runs[method]
        if run == 1:
            await self.release.wait()
        return run

    @rpc
    async def write(self) -> int:
        """Not idempotent: returns the run number."""
        return await self._run("write")

    @rpc(idempotent=True)
    async def read(self) -> int:
        """Idempotent: returns the run number."""
        return await self._run("read")


class Busy(Service):
    """Answers 429 while ``busy``; counts runs."""

    name = "resbusy"

    def __init__(self) -> None:
        self.runs = 0
        self.busy = True

    @rpc
    async def take(self) -> str:
        """Raises 429 while busy, else returns ``"ok"``."""
        self.runs += 1
        if self.busy:
            raise ServiceError(429, "busy, try later")
        return "ok"


class Mute(Service):
    """Never answers until released; counts runs."""

    name = "resmute"

    def __init__(self) -> None:
        self.runs = 0
        self.release = asyncio.Event()

    @rpc(idempotent=True)
    async def wait(self) -> None:
        """Returns once released."""
        self.runs += 1
        await self.release.wait()


# --------------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------------


@dataclass
class Runner:
    """One ``python -m natsrpc.run services.kv`` process."""

    proc: asyncio.subprocess.Process
    started: float
    stderr: bytes = b""

    def kill(self) -> float:
        """Sends SIGKILL; returns the monotonic time it was sent."""
        killed = time.monotonic()
        self.proc.send_signal(signal.SIGKILL)
        return killed


@asynccontextmanager
async def kv_process(url: str) -> AsyncIterator[Runner]:
    """Runs the kv example service in its own process (heartbeat every HEARTBEAT s); killed on the way out."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "natsrpc.run",
        "services.kv",
        "--url",
        url,
        "--heartbeat-interval",
        str(HEARTBEAT),
        "--log-level",
        "warning",
        cwd=REPO,
        env=child_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    runner = Runner(proc, time.monotonic())
    assert proc.stderr is not None
    reader = asyncio.create_task(proc.stderr.read())
    try:
        yield runner
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
        runner.stderr = await reader


@dataclass
class Outcome:
    """One call: when it started (monotonic), how long it took, what it raised (None: success), and
    whether it yielded to the event loop (a call refused at once never does)."""

    started: float
    seconds: float
    error: BaseException | None
    yielded: bool = False


@dataclass
class Caller:
    """Calls ``kv.get`` back to back (1 ms apart) and records every outcome."""

    call: Callable[[], Awaitable[object]]
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            with loop_probe() as yielded:
                try:
                    await self.call()
                    error = None
                except natsrpc.CallError as exc:
                    error = exc
            self.outcomes.append(Outcome(started, time.monotonic() - started, error, bool(yielded)))
            await asyncio.sleep(0.001)  # a refused call never yields: leave the loop room to run

    def since(self, moment: float) -> list[Outcome]:
        """Returns the outcomes of the calls started at or after ``moment``."""
        return [o for o in self.outcomes if o.started >= moment]


@dataclass
class RegistryLog:
    """The registry's events for one service, each with the circuit state the client's callback left."""

    client: natsrpc.Client
    service: str
    events: list[tuple[float, str, str, State]] = field(default_factory=list)

    def __call__(self, service: str, instance: InstanceState, event: str) -> None:
        # Registered after the client's own callback, so the state read here is the one it left.
        if service == self.service:
            self.events.append((time.monotonic(), instance.id, event, self.client.circuit(service).state))

    def last_beat(self, instance_id: str) -> float:
        """Returns when the last heartbeat of ``instance_id`` arrived."""
        return max(t for t, i, e, _ in self.events if i == instance_id and e != "removed")

    def first(self, event: str, after: float) -> tuple[float, str, str, State] | None:
        """Returns the first ``event`` seen after ``after``, if any."""
        return next((e for e in self.events if e[2] == event and e[0] >= after), None)


def ms(seconds: float) -> str:
    """Formats seconds as milliseconds."""
    return f"{seconds * 1e3:.1f} ms"


# --------------------------------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------------------------------


class TestInstanceKilled:
    """SIGKILLed kv processes drop out of the registry within 3 heartbeats; the circuit fails fast, then recovers."""

    async def test_kill_one_then_all_then_restart(self, nats_url: str, capsys: pytest.CaptureFixture[str]) -> None:
        """Calls survive one kill, fail fast with CircuitOpen after the last, and succeed again on a fresh beat."""
        window = EXPIRY_INTERVALS * HEARTBEAT
        async with AsyncExitStack() as stack:
            # open_wait far beyond the test: only a heartbeat can half-open the circuit here.
            client = await stack.enter_async_context(natsrpc.connect(nats_url, circuit=CircuitConfig(open_wait=60)))
            assert client.registry is not None
            registry = client.registry
            log = RegistryLog(client, "kv")
            registry.on_change(log)
            assert client.circuits is not None
            assert "kv" not in client.circuits  # so the "kv" breaker reports its changes below
            changes: list[tuple[float, State]] = []
            client.circuits.on_state_change = lambda name, old, new: (
                changes.append((time.monotonic(), new)) if name == "kv" else None
            )
            first = await stack.enter_async_context(kv_process(nats_url))
            second = await stack.enter_async_context(kv_process(nats_url))
            await poll(lambda: len(registry.live("kv")) == 2, "two kv processes beating", limit=STARTUP)
            kv = client.call_service["kv"].options(timeout=1.0, attempt_timeout=0.2)
            caller = Caller(lambda: kv.get("k"))
            calls = asyncio.create_task(caller.run())
            try:
                await poll(lambda: len(caller.outcomes) >= 100, "100 calls")

                # 1. Kill one of two: the registry drops it, calls keep succeeding.
                killed_one = first.kill()
                await poll(lambda: log.first("removed", killed_one) is not None, "the killed instance removed")
                removed = log.first("removed", killed_one)
                assert removed is not None
                drop_one = removed[0] - killed_one
                silent_one = removed[0] - log.last_beat(removed[1])
                survivors = [i.id for i in registry.live("kv")]
                assert len(survivors) == 1
                assert removed[1] not in survivors
                count = len(caller.outcomes)
                await poll(lambda: len(caller.outcomes) >= count + 200, "200 more calls")
                during_one = caller.since(killed_one)
                failed_one = [o for o in during_one if o.error is not None]
                assert failed_one == [], [repr(o.error) for o in failed_one]
                assert all(o.yielded for o in during_one)  # the probe sees a call that waits for its reply
                assert client.circuit("kv").state is State.CLOSED

                # 2. Kill the last one: within 3 intervals every call is refused at once with CircuitOpen.
                killed_all = second.kill()
                await poll(lambda: not registry.instances("kv"), "no kv instance left", limit=2 * window)
                await poll(lambda: log.first("removed", killed_all) is not None, "the last instance removed")
                removed = log.first("removed", killed_all)
                assert removed is not None
                drop_all = removed[0] - killed_all
                silent_all = removed[0] - log.last_beat(removed[1])
                assert client.circuit("kv").state is State.OPEN
                opened = next(t for t, state in changes if t >= killed_all and state is State.OPEN)
                await poll(
                    lambda: any(isinstance(o.error, natsrpc.CircuitOpen) for o in caller.since(killed_all)),
                    "a call refused with CircuitOpen",
                )
                first_refusal = next(o for o in caller.since(killed_all) if isinstance(o.error, natsrpc.CircuitOpen))
                count = len(caller.outcomes)
                await poll(lambda: len(caller.outcomes) >= count + 200, "200 refused calls")
                dead = caller.since(killed_all)
                assert all(isinstance(o.error, natsrpc.NoResponders | natsrpc.CircuitOpen) for o in dead), Counter(
                    type(o.error).__name__ for o in dead
                )
                refused = caller.since(opened)
                assert all(isinstance(o.error, natsrpc.CircuitOpen) for o in refused)
                assert not [o for o in refused if o.yielded], "a refused call waited on the event loop"
                refusal_times = sorted(o.seconds for o in refused)
                assert refusal_times[len(refusal_times) // 2] < FAST, refusal_times[-5:]

                # 3. Start a fresh instance: its first beat half-opens the circuit, and calls succeed again.
                third = await stack.enter_async_context(kv_process(nats_url))
                await poll(lambda: log.first("added", killed_all) is not None, "the new instance's beat", STARTUP)
                added = log.first("added", killed_all)
                assert added is not None
                assert added[3] is State.HALF_OPEN  # the state the client's callback left on that first beat
                await poll(lambda: any(o.error is None for o in caller.since(added[0])), "a successful call")
                recovered = next(o for o in caller.since(added[0]) if o.error is None)
                await poll(lambda: client.circuit("kv").state is State.CLOSED, "the circuit closed")
                count = len(caller.outcomes)
                await poll(lambda: len(caller.outcomes) >= count + 50, "50 more calls")
                after = caller.since(recovered.started)
                assert all(o.error is None for o in after), Counter(type(o.error).__name__ for o in after)
            finally:
                caller.stop.set()
                await calls

        ok_one = [o.seconds for o in during_one]
        figures = {
            "heartbeat interval": ms(HEARTBEAT),
            "expiry window (3 intervals)": ms(window),
            "kill 1 of 2 -> registry drop": ms(drop_one),
            "  (its last beat -> registry drop)": ms(silent_one),
            "calls after kill 1 of 2": f"{len(during_one)} sent, {len(failed_one)} failed, "
            f"p50 {ms(statistics.median(ok_one))}, max {ms(max(ok_one))}",
            "kill last -> circuit open": ms(opened - killed_all),
            "kill last -> registry drop": ms(drop_all),
            "  (last beat -> registry drop)": ms(silent_all),
            "kill last -> first CircuitOpen raised": ms(first_refusal.started + first_refusal.seconds - killed_all),
            "calls failed before it (NoResponders)": str(
                sum(o.error is not None for o in dead if o.started < first_refusal.started)
            ),
            "CircuitOpen latency": f"{len(refused)} calls, p50 {ms(statistics.median(refusal_times))}, "
            f"p99 {ms(refusal_times[int(len(refusal_times) * 0.99)])}, max {ms(refusal_times[-1])}",
            "restart: spawn -> first beat": ms(added[0] - third.started),
            "restart: first beat -> first success": ms(recovered.started + recovered.seconds - added[0]),
        }
        with capsys.disabled():
            print("\nSIGKILL scenario (2 kv processes, sequential kv.get calls 1 ms apart):")
            for name, value in figures.items():
                print(f"  {name:38} {value}")
        sweep = HEARTBEAT / 4  # the registry sweeps 4 times per interval
        for silent in (silent_one, silent_all):
            assert window <= silent <= window + sweep + SLACK  # expired after 3 silent intervals
        assert drop_one <= window + sweep + SLACK  # the last beat came before the kill
        assert drop_all <= window + sweep + SLACK
        assert opened - killed_all <= window + sweep + SLACK


class TestRetries:
    """Retries against a real server: what is retried, the token bucket, and one deadline over all attempts."""

    async def test_no_responders_in_a_restart_window_is_retried(self, client: natsrpc.Client) -> None:
        """A call that meets NoResponders succeeds on a retry once the service has started."""
        pauses: list[float] = []
        failed_once = asyncio.Event()

        def pause(low: float, high: float) -> float:
            pauses.append(high)  # called when an attempt failed and a retry is coming
            failed_once.set()
            return high

        policy = RetryPolicy(max_attempts=5, initial_backoff=0.3, max_backoff=0.3, random=pause)
        call = client.call_service_async["reslate"].options(timeout=5, retry=policy).echo("hi")
        await asyncio.wait_for(failed_once.wait(), 5)  # the first attempt met NoResponders
        async with serve(client, Late()) as host:
            assert await call == "hi"
        assert len(pauses) >= 1  # at least two attempts
        assert host.instances[0].routes["echo"].stats.num_requests == 1  # only the retry reached it

    @pytest.mark.parametrize(
        ("method", "runs"),
        [("write", 1), ("read", 2)],
        ids=["not-idempotent-runs-once", "idempotent-is-retried"],
    )
    async def test_timeout_retried_only_when_idempotent(self, client: natsrpc.Client, method: str, runs: int) -> None:
        """A timed-out attempt is retried for ``@rpc(idempotent=True)`` only; otherwise the handler ran once."""
        assert client.registry is not None
        registry = client.registry
        service = FirstCallHangs()
        async with serve(client, service, heartbeat_interval=0.1):
            await poll(lambda: registry.idempotent("resslow", "read"), "the beat declaring read idempotent")
            proxy = client.call_service["resslow"].options(timeout=3, attempt_timeout=0.15)
            start = time.monotonic()
            try:
                result: int | BaseException = await proxy[method]()
            except natsrpc.CallTimeout as exc:
                result = exc
            took = time.monotonic() - start
            assert service.runs[method] == runs
            service.release.set()
        if runs == 1:
            assert isinstance(result, natsrpc.CallTimeout)
            assert 0.15 <= took < 0.5  # the attempt timeout, not the 3 s call timeout
        else:
            assert result == 2
            assert took < 0.6

    async def test_token_bucket_stops_retries_and_successes_refill_it(self, client: natsrpc.Client) -> None:
        """429s drain the service's retry budget: 5 attempts, then 1 per call, until successes refill it."""
        busy = Busy()
        policy = RetryPolicy(max_attempts=5, initial_backoff=0.001, max_backoff=0.001, jitter=False)
        take = client.call_service["resbusy"].options(timeout=5, retry=policy).take
        async with serve(client, busy):
            attempts: list[int] = []
            for _ in range(3):
                with pytest.raises(natsrpc.Overloaded):
                    await take()
                attempts.append(busy.runs - sum(attempts))
            assert attempts == [5, 1, 1]  # 10 tokens, 1 per failed attempt; retries need more than 5 left
            busy.busy = False
            for _ in range(40):  # each success gives back 0.1 token: 3 + 4 = 7
                assert await take() == "ok"
            busy.busy, before = True, busy.runs
            with pytest.raises(natsrpc.Overloaded):
                await take()
            assert busy.runs - before == 2  # 7 - 1 = 6 tokens: one retry allowed again

    @pytest.mark.parametrize(
        ("service", "policy", "attempt_timeout", "error", "at_least"),
        [
            ("resnobody", RetryPolicy(), None, natsrpc.NoResponders, 0.0),
            (
                "resnobody",
                RetryPolicy(max_attempts=5, initial_backoff=0.14, max_backoff=0.14, jitter=False),
                None,
                natsrpc.NoResponders,
                0.4,
            ),
            ("resmute", RetryPolicy(max_attempts=5), 0.2, natsrpc.CallTimeout, 0.39),
        ],
        ids=["no-responders-default-policy", "no-responders-long-backoff", "idempotent-timeouts"],
    )
    async def test_one_deadline_covers_every_attempt(
        self,
        nats_url: str,
        service: str,
        policy: RetryPolicy,
        attempt_timeout: float | None,
        error: type[Exception],
        at_least: float,
    ) -> None:
        """With timeout=0.5 the call gives up within 0.5 s (+ small margin), however many attempts it made."""
        mute = Mute()
        async with (
            natsrpc.connect(nats_url, circuit=None) as client,  # no breaker: see every attempt fail
            serve(client, mute),
        ):
            proxy = client.call_service[service].options(timeout=0.5, retry=policy)
            if attempt_timeout is not None:
                proxy = proxy.options(attempt_timeout=attempt_timeout, idempotent=True)
            start = time.monotonic()
            with pytest.raises(error):
                await proxy.wait()
            took = time.monotonic() - start
            mute.release.set()
        assert at_least <= took <= 0.5 + 0.05, took
        if service == "resmute":
            assert mute.runs >= 2  # retried after a timeout, inside the deadline


class TestInstanceCalls:
    """``call_service[name].instance(id)`` reaches exactly that instance, bypassing load balancing."""

    @pytest_asyncio.fixture
    async def two_kvs(self, client: natsrpc.Client, nats_url: str) -> AsyncIterator[dict[str, str]]:
        """Two KV instances holding different data under the key ``who``; yields {instance id: value}."""
        a, b = KV(), KV()
        a.data["who"], b.data["who"] = "a", "b"
        async with (
            natsrpc.connect(nats_url) as other,
            serve(client, a) as host_a,
            serve(other, b) as host_b,
        ):
            yield {host_a.instances[0].id: "a", host_b.instances[0].id: "b"}

    async def test_instance_proxy_reaches_that_instance(self, client: natsrpc.Client, two_kvs: dict[str, str]) -> None:
        """Twenty calls to each instance id all read that instance's own data."""
        for instance_id, value in two_kvs.items():
            kv = client.call_service["kv"].instance(instance_id)
            assert [await kv.get("who") for _ in range(20)] == [value] * 20

    async def test_typed_proxy_with_instance_option(self, client: natsrpc.Client, two_kvs: dict[str, str]) -> None:
        """A typed proxy made with ``instance=`` routes the same way."""
        for instance_id, value in two_kvs.items():
            assert await client.proxy(KV, instance=instance_id).get("who") == value

    async def test_load_balanced_calls_reach_both(self, client: natsrpc.Client, two_kvs: dict[str, str]) -> None:
        """Without an instance, the queue group spreads calls over both instances."""
        seen = {await client.call_service["kv"].get("who") for _ in range(60)}
        assert seen == {"a", "b"}

    async def test_unknown_instance_is_no_responders(self, client: natsrpc.Client, two_kvs: dict[str, str]) -> None:
        """An id no instance has gets a fast NoResponders, not a timeout."""
        start = time.monotonic()
        with pytest.raises(natsrpc.NoResponders):
            await (
                client.call_service["kv"]
                .instance("nosuchinstance")
                .options(retry=RetryPolicy(max_attempts=1))
                .get("who")
            )
        assert time.monotonic() - start < 0.5


async def until_refused(call: Callable[[], Awaitable[object]]) -> None:
    """Calls ``call`` until it raises NoResponders (a subscription's removal has reached the server)."""
    while True:
        try:
            await call()
        except natsrpc.NoResponders:
            return
        except natsrpc.CallTimeout:  # sent to the connection before the server saw it close
            continue
        await asyncio.sleep(0.01)


class Who(Service):
    """Says which instance served the call."""

    name = "reswho"

    def __init__(self, label: str) -> None:
        self.label = label

    @rpc
    async def who(self) -> str:
        """Returns this instance's label."""
        return self.label


class TestGracefulLeave:
    """An instance stopping gracefully beside others: its last beat (draining) sends callers to the
    others' own subjects while it waits ``leave_grace`` before unsubscribing, so no request is
    routed to it after it left the queue group (on a cluster, the servers would drop those)."""

    @asynccontextmanager
    async def two(
        self,
        nats_url: str,
        grace: float,
        *,
        callers: Sequence[natsrpc.Client] = (),
        interval: float = protocol.DEFAULT_HEARTBEAT_INTERVAL,
    ) -> AsyncIterator[tuple[Host, Host]]:
        """A leaving instance (``leave_grace=grace``) and a staying one, each on its own connection
        and beating every ``interval``, once the leaving one's connection and every client of
        ``callers`` have heard both."""
        async with (
            natsrpc.connect(nats_url) as leaving_nc,
            natsrpc.connect(nats_url) as staying_nc,
            serve(leaving_nc, Who("leaving"), leave_grace=grace, heartbeat_interval=interval) as leaving,
            serve(staying_nc, Who("staying"), heartbeat_interval=interval) as staying,
        ):
            ids = {leaving.instances[0].id, staying.instances[0].id}
            for registry in (*(caller.registry for caller in callers), leaving_nc.registry):
                assert registry is not None
                await poll(lambda r=registry: {i.id for i in r.live("reswho")} == ids, "both instances heard")
            yield leaving, staying

    async def test_calls_made_while_one_leaves_go_to_the_other(self, client: natsrpc.Client, nats_url: str) -> None:
        """While one instance is in its leave grace (still subscribed), every call goes to the other;
        before, the queue group spread them over both."""
        async with self.two(nats_url, grace=1.0, callers=[client]) as (leaving, _):
            assert {await client.call_service["reswho"].who() for _ in range(40)} == {"leaving", "staying"}
            stopping = asyncio.create_task(leaving.stop())
            assert client.registry is not None
            await poll(lambda: any(i.draining for i in client.registry.instances("reswho")), "the draining beat heard")
            served = [await client.call_service["reswho"].who() for _ in range(40)]
            assert not stopping.done(), "the leave grace ended before the calls: nothing was shown"
            assert Counter(served) == {"staying": 40}
            await stopping

    async def test_a_call_to_a_vanished_instance_is_retried_through_the_queue_group(
        self, client: natsrpc.Client, nats_url: str
    ) -> None:
        """When the instance a call was sent to has gone without a word (its connection closed), the
        call's retry goes through the queue group: the leaving instance, still subscribed, serves it."""
        async with self.two(nats_url, grace=2.0, callers=[client]) as (leaving, staying):
            stopping = asyncio.create_task(leaving.stop())
            assert client.registry is not None
            await poll(lambda: any(i.draining for i in client.registry.instances("reswho")), "the draining beat heard")
            await staying.client.nc.close()  # no last beat: the registry still holds it live
            gone = (
                client.call_service["reswho"].instance(staying.instances[0].id).options(retry=NO_RETRIES, timeout=0.2)
            )
            await until_refused(gone.who)  # the server has dropped its subscriptions
            assert await client.call_service["reswho"].who() == "leaving"
            assert not stopping.done(), "the leave grace ended before the call: nothing was shown"
            await stopping

    async def test_the_detour_ends_when_the_leaving_instance_expires(
        self, client: natsrpc.Client, nats_url: str
    ) -> None:
        """Once the draining instance has expired (3 missed beats), calls use the queue group again."""
        async with (
            natsrpc.connect(nats_url) as leaving_nc,
            serve(client, Who("staying"), heartbeat_interval=HEARTBEAT),
        ):
            leaving = Host(leaving_nc, [Who("leaving")], heartbeat_interval=HEARTBEAT)
            await leaving.start()
            assert client.registry is not None
            assert leaving_nc.registry is not None
            for registry in (client.registry, leaving_nc.registry):  # the leaving one too: it waits its grace
                await poll(lambda r=registry: len(r.live("reswho")) == 2, "both instances heard")
            await leaving.stop()
            assert "reswho" in client._detours  # the draining beat came before the stop's unsubscribe
            await poll(lambda: "reswho" not in client._detours, "the detour ended", 5)
            assert len(client.registry.instances("reswho")) == 1
            assert await client.call_service["reswho"].who() == "staying"

    async def test_a_caller_that_has_heard_only_the_draining_beat_keeps_calling(self, nats_url: str) -> None:
        """A client started during a rolling deploy, which has heard no beat but the leaving
        instance's last one (draining), does not open the circuit: the instances it has not heard
        yet may be live, and they are. Before, its calls failed with CircuitOpen until one of them
        beat (up to a heartbeat interval)."""
        async with self.two(nats_url, grace=0.1, interval=60) as (leaving, _):
            async with natsrpc.connect(nats_url) as young:  # after both first beats: the next are a minute away
                assert young.registry is not None
                await leaving.stop()
                heard = young.registry
                await poll(lambda: any(i.draining for i in heard.instances("reswho")), "the draining beat heard")
                assert not heard.live("reswho")
                assert young.circuit("reswho").state is State.CLOSED
                assert [await young.call_service["reswho"].who() for _ in range(5)] == ["staying"] * 5

    async def test_a_caller_that_has_heard_no_beat_goes_where_the_draining_beat_says(self, nats_url: str) -> None:
        """The draining beat names the instances the leaving one has heard (``staying``): a client
        that has heard none of them beat yet sends its calls there during the leave grace, as one
        that had heard them would. Before, it kept to the queue group, which spread its calls over
        both instances (on a cluster, those routed to the leaving one as it unsubscribes are lost)."""
        async with self.two(nats_url, grace=1.0, interval=60) as (leaving, staying):
            staying_id = staying.instances[0].id
            async with natsrpc.connect(nats_url) as young:  # after both first beats: the next are a minute away
                assert young.registry is not None
                assert {await young.call_service["reswho"].who() for _ in range(40)} == {"leaving", "staying"}
                stopping = asyncio.create_task(leaving.stop())
                await poll(lambda: "reswho" in young._detours, "the draining beat heard")
                assert young._detours["reswho"] == (staying_id,)
                assert not young.registry.live("reswho")  # it has still heard no beat of the staying one
                served = [await young.call_service["reswho"].who() for _ in range(40)]
                assert not stopping.done(), "the leave grace ended before the calls: nothing was shown"
                assert Counter(served) == {"staying": 40}
                await stopping

    async def test_an_instance_named_staying_that_is_gone_leaves_the_detour(self, nats_url: str) -> None:
        """A draining beat naming an instance that no longer serves: the call sent to it meets no
        responders, is retried through the queue group (and served), and that instance is taken out
        of the detour; the one that serves stays in it."""
        async with (
            natsrpc.connect(nats_url) as staying_nc,
            serve(staying_nc, Who("staying"), heartbeat_interval=60) as staying,
            natsrpc.connect(nats_url) as young,
        ):
            staying_id = staying.instances[0].id
            beat = protocol.Heartbeat(
                "reswho", "leaver", "0.1.0", ["who"], 0, True, True, 60.0, staying=["ghost", staying_id]
            )
            await young.nc.flush()  # its registry's subscription is in place on the server
            await staying_nc.nc.publish(protocol.heartbeat_subject("reswho", "leaver"), msgspec.json.encode(beat))
            await poll(lambda: young._detours.get("reswho") == ("ghost", staying_id), "the draining beat heard")
            served = []
            while "ghost" in young._detours["reswho"] and len(served) < 60:  # each call picks one of the two
                served.append(await young.call_service["reswho"].who())
            assert young._detours["reswho"] == (staying_id,)
            assert set(served) == {"staying"}

    async def test_a_lone_instance_does_not_wait(self, client: natsrpc.Client) -> None:
        """With no other live instance of its services, callers have nowhere else to go: no grace."""
        host = Host(client, [Who("alone")], leave_grace=30)
        await host.start()
        started = time.monotonic()
        await host.stop()
        assert time.monotonic() - started < 10

    @pytest.mark.parametrize("grace", [-1, 61, math.nan])
    def test_an_unusable_grace_is_refused(self, client: natsrpc.Client, grace: float) -> None:
        """leave_grace is 0-60 seconds."""
        with pytest.raises(natsrpc.ConfigurationError, match="leave_grace"):
            Host(client, [Who("x")], leave_grace=grace)
