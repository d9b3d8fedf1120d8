"""Fault and overload tests of RELIABILITY.md's matrix (F1-F9, S1, S4) on a real 3-node cluster.

Each test drives open-loop load (a fixed rate from asyncio tasks, bounded in time) through natsrpc,
injects one fault (SIGKILL, SIGSTOP or SIGTERM of a nats-server or a replica process) once a set
number of calls has gone out, and prints its figure (visible with ``pytest -s``); the assertion
messages carry the same figures. Replicas are ``python -m natsrpc.run`` child processes, so killing
one is a real crash. Budgets are windows and ratios with margins: the machine is shared and noisy.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from children import poll

import natsrpc
from natsrpc import NatsServer, Service, current_call, rpc
from natsrpc.cluster import NatsCluster
from natsrpc.retry import NO_RETRIES
from natsrpc.testing import serve

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 15.0
TICK = 0.002  # the load generator's pacing step
TIMEOUT = 1.0  # call timeout under load: long against a ~1 ms call, short enough to keep tests fast


F1_REPLICA = ("--max-queue", "2000")

# --- load -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Call:
    """One call of a load run: when it was issued, when it ended, and how."""

    start: float
    end: float = math.nan
    error: str = ""  # the exception's class name; "" for a success
    result: Any = None


class Load:
    """Open-loop load: ``rate`` calls per second for ``duration`` seconds, each call its own task.

    Open loop means a slow or failing call does not slow the sending down, as with real traffic.
    """

    def __init__(self, call: Callable[[], Awaitable[Any]], rate: float, duration: float) -> None:
        self.call = call
        self.rate = rate
        self.duration = duration
        self.calls: list[Call] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._marks: list[tuple[int, asyncio.Event]] = []

    def after(self, count: int) -> asyncio.Event:
        """Returns an event set once ``count`` calls have been issued (when to inject a fault)."""
        event = asyncio.Event()
        self._marks.append((count, event))
        return event

    async def run(self) -> list[Call]:
        """Sends the load, waits for every call to end, and returns them in issue order."""
        started = time.monotonic()
        total = round(self.rate * self.duration)
        while (elapsed := time.monotonic() - started) < self.duration:
            for _ in range(min(int(elapsed * self.rate) + 1, total) - len(self.calls)):
                record = Call(time.monotonic())
                self.calls.append(record)
                task = asyncio.create_task(self._one(record))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            for count, event in self._marks:
                if len(self.calls) >= count:
                    event.set()
            await asyncio.sleep(TICK)
        await asyncio.gather(*self._tasks)
        return self.calls

    async def _one(self, record: Call) -> None:
        try:
            record.result = await self.call()
        except natsrpc.NatsRpcError as exc:
            record.error = type(exc).__name__
        finally:
            record.end = time.monotonic()


def failed(calls: Sequence[Call]) -> list[Call]:
    """Returns the calls that raised."""
    return [c for c in calls if c.error]


def errors(calls: Sequence[Call]) -> dict[str, int]:
    """Returns the number of failed calls per exception name."""
    return dict(Counter(c.error for c in calls if c.error))


def in_flight(calls: Sequence[Call], at: float) -> list[Call]:
    """Returns the calls issued by ``at`` that had not ended at ``at``."""
    return [c for c in calls if c.start <= at < c.end]


def percentile(values: Sequence[float], q: float) -> float:
    """Returns the ``q`` quantile (0..1) of ``values`` (nan when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def figure(name: str, **values: Any) -> str:
    """Prints a measured figure (``pytest -s`` shows it) and returns it for assertion messages."""
    text = f"{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"\nFIGURE {text}")
    return text


def ms(seconds: float) -> float:
    """Returns ``seconds`` in milliseconds, rounded to 0.1 ms."""
    return round(seconds * 1000, 1)


class Watch:
    """Polls a client's connection every millisecond: when it went down, and when it came back elsewhere."""

    def __init__(self, client: natsrpc.Client) -> None:
        self.nc = client.nc
        self.server = self.nc.connected_url.port
        self.down = math.nan
        self.up = math.nan
        self._task = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            if math.isnan(self.down) and not self.nc.is_connected:
                self.down = time.monotonic()
            if not math.isnan(self.down) and self.nc.is_connected:
                self.up = time.monotonic()
                return
            await asyncio.sleep(0.001)

    async def stop(self) -> None:
        """Stops polling."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


# --- replicas ---------------------------------------------------------------------------------


class Replica:
    """A ``python -m natsrpc.run`` child process hosting ``tests.fault_service`` (and more modules)."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Any) -> None:
        self.proc = proc
        self.log = log

    @property
    def pid(self) -> int:
        """The child's pid, which ``faultwork.work`` returns."""
        return self.proc.pid

    @property
    def output(self) -> str:
        """What the child logged so far."""
        self.log.seek(0)
        return str(self.log.read().decode(errors="replace"))

    def kill(self) -> None:
        """Kills the process at once (SIGKILL), as a crash would."""
        self.proc.kill()

    async def wait(self) -> int:
        """Waits (up to STARTUP_TIMEOUT seconds) for the process to exit; returns its exit code."""
        return await asyncio.wait_for(self.proc.wait(), STARTUP_TIMEOUT)


@asynccontextmanager
async def replicas(*urls: str, modules: Sequence[str] = (), args: Sequence[str] = ()) -> AsyncIterator[list[Replica]]:
    """Starts one replica per URL (connected to that server only) and stops them on the way out.

    Args:
        *urls: one server URL per replica.
        modules: service modules to host besides ``tests.fault_service``.
        args: more ``python -m natsrpc.run`` options (``--max-queue``, ...).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "PYTHONPATH")}
    started: list[Replica] = []
    try:
        for url in urls:
            log = tempfile.TemporaryFile()
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "natsrpc.run",
                *modules,
                "tests.fault_service",
                "--url",
                url,
                *args,
                cwd=REPO,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
            started.append(Replica(proc, log))
        yield started
    finally:
        for replica in started:
            if replica.proc.returncode is None:
                replica.proc.terminate()
                try:
                    await replica.wait()
                except TimeoutError:
                    replica.kill()
                    await replica.proc.wait()
            replica.log.close()


async def until_served_by(url: str, expected: Sequence[Replica]) -> None:
    """Calls ``faultwork.work`` from a client on ``url`` until every expected replica has served one.

    Run from the same server the load's client uses, so that server has seen every replica's
    subscription (a remote subscription takes a few ms to reach it).
    """
    pids = {r.pid for r in expected}
    seen: set[int] = set()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    async with natsrpc.connect(url, circuit=None, retry=NO_RETRIES, timeout=1) as probe:
        while not pids <= seen:
            try:
                seen.add(await probe.call_service["faultwork"].work(0))
            except natsrpc.NoResponders:
                await asyncio.sleep(0.01)
            if time.monotonic() > deadline or any(r.proc.returncode is not None for r in expected):
                logs = "\n".join(r.output for r in expected)
                pytest.fail(f"replicas {pids - seen} never answered; their output:\n{logs}")


# --- in-process services ----------------------------------------------------------------------


class Stamp(Service):
    """Records how much of each call's deadline was left when its handler ran."""

    name = "stamp"

    def __init__(self) -> None:
        self.remaining: list[float] = []

    @rpc
    async def stamp(self) -> None:
        """Appends ``current_call().remaining()`` (negative = ran after the caller's deadline)."""
        self.remaining.append(current_call().remaining())


class Sleepy(Service):
    """A handler with a fixed latency and no CPU cost."""

    name = "sleepy"
    latency = 0.02

    @rpc
    async def nap(self) -> None:
        """Sleeps ``latency`` seconds."""
        await asyncio.sleep(self.latency)


async def until_answers(client: natsrpc.Client, call: Callable[[natsrpc.Client], Awaitable[Any]]) -> None:
    """Repeats ``call`` while it raises NoResponders (a subscription still on its way)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        try:
            await call(client)
            return
        except natsrpc.NoResponders:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)


# --- tests ------------------------------------------------------------------------------------


class TestServerFailure:
    """A nats-server node dies or hangs under load; clients and replicas fail over to the others."""

    async def test_f1_killing_the_clients_server_fails_only_calls_in_flight(self, nats_cluster: NatsCluster) -> None:
        """F1: SIGKILL of the client's node fails only calls sent before the client noticed; reconnect < 1 s."""
        node = nats_cluster.nodes[0]
        async with (
            # After the reconnect the client sends at once the calls it held while reconnecting (rate x
            # reconnect time, under 2,000 here): the replicas queue that burst instead of refusing it
            # with 429. Overload is the S tests' subject; this one is about the server's failure.
            replicas(nats_cluster.urls[1], nats_cluster.urls[2], modules=["services.kv"], args=F1_REPLICA) as reps,
            natsrpc.connect(nats_cluster.urls, dont_randomize=True, timeout=TIMEOUT) as client,
        ):
            assert client.nc.connected_url.port == node.port
            await until_served_by(node.url, reps)
            load = Load(lambda: client.call_service["kv"].put("k", "v"), rate=2000, duration=2.5)
            kill_at = load.after(2000)

            async def fault() -> tuple[float, Watch]:
                await kill_at.wait()
                watch = Watch(client)
                node.kill()
                return time.monotonic(), watch

            calls, (killed, watch) = await asyncio.gather(load.run(), fault())
            await watch.stop()
            new_server = client.nc.connected_url.port
        bad = failed(calls)
        reconnect = watch.up - killed
        outside = [c for c in bad if not (c.start <= watch.down and c.end >= killed)]
        text = figure(
            "F1 kill the client's server",
            rate=2000,
            sent=len(calls),
            failed=len(bad),
            errors=errors(calls),
            in_flight_at_kill=len(in_flight(calls, killed)),
            sent_after_kill_before_noticed=sum(killed <= c.start <= watch.down for c in calls),
            noticed_ms=ms(watch.down - killed),
            reconnect_ms=ms(reconnect),
            new_server=new_server,
        )
        assert not outside, f"failures outside the calls in flight at the kill: {outside[:5]}; {text}"
        assert reconnect < 1.0, text
        assert new_server != node.port, text

    @pytest.mark.parametrize(
        ("rate", "max_queue"),
        [
            # 6 s: the default suite keeps under 3 minutes; .ci/run runs it with -m slow (F1 and F3,
            # a server and a replica killed, stay in the default suite)
            pytest.param(1000, 100, id="1000-per-s", marks=pytest.mark.slow),
            # At 2,000 calls/s the lone survivor takes them all; a ~100 ms stall of it on a loaded
            # 2-core machine fills the default queue (100) and it sheds load with 429s (measured:
            # 129-213 of 6,000 calls in 2 of ~18 runs), so this run lets it queue a longer burst.
            pytest.param(2000, 1000, id="2000-per-s", marks=pytest.mark.slow),
        ],
    )
    async def test_f2_killing_a_replicas_server_fails_few_calls(
        self, nats_cluster: NatsCluster, rate: int, max_queue: int
    ) -> None:
        """F2: SIGKILL of one kv replica's node (two replicas, client on the third) fails <= 0.2% of calls."""
        client_url = nats_cluster.urls[0]
        async with (
            replicas(
                nats_cluster.urls[1],
                nats_cluster.urls[2],
                modules=["services.kv"],
                args=["--max-queue", str(max_queue)],
            ) as reps,
            natsrpc.connect(client_url, timeout=TIMEOUT) as client,
        ):
            await until_served_by(client_url, reps)
            # A kill loses a handful of calls whatever the rate: 5,000 calls, so 0.2% means 10.
            load = Load(lambda: client.call_service["kv"].put("k", "v"), rate=rate, duration=5000 / rate)
            kill_at = load.after(rate)

            async def fault() -> float:
                await kill_at.wait()
                nats_cluster.nodes[1].kill()
                return time.monotonic()

            calls, killed = await asyncio.gather(load.run(), fault())
        bad = failed(calls)
        ratio = len(bad) / len(calls)
        text = figure(
            "F2 kill a replica's server",
            rate=rate,
            max_queue=max_queue,
            sent=len(calls),
            failed=len(bad),
            failed_pct=100 * ratio,
            errors=errors(calls),
            in_flight_at_kill=len(in_flight(calls, killed)),
            failed_issued_after_kill=sum(c.start > killed for c in bad),
        )
        assert ratio <= 0.002, text

    @pytest.mark.slow  # 9 s: the default suite keeps under 3 minutes; .ci/run runs it with -m slow
    async def test_f5_hung_client_server_is_detected_and_left(self, nats_cluster: NatsCluster) -> None:
        """F5: with natsrpc's default client settings, a SIGSTOPped client server is left and calls succeed in < 8 s."""
        node = nats_cluster.nodes[0]
        async with (
            replicas(nats_cluster.urls[1], nats_cluster.urls[2]) as reps,
            natsrpc.connect(nats_cluster.urls, dont_randomize=True) as client,
        ):
            assert client.nc.connected_url.port == node.port
            await until_served_by(node.url, reps)
            load = Load(lambda: client.call_service["faultwork"].work(0), rate=500, duration=9)
            pause_at = load.after(500)

            async def fault() -> tuple[float, Watch]:
                await pause_at.wait()
                watch = Watch(client)
                node.pause()
                return time.monotonic(), watch

            try:
                calls, (paused, watch) = await asyncio.gather(load.run(), fault())
            finally:
                node.resume()
            await watch.stop()
        after = [c for c in calls if c.start > paused]
        first_ok = min((c.end for c in after if not c.error), default=math.inf)
        recovered = first_ok - paused
        late_failures = [c for c in after if c.error and c.start > paused + 8]
        text = figure(
            "F5 hung client server",
            rate=500,
            sent=len(calls),
            failed=len(failed(calls)),
            errors=errors(calls),
            detected_s=watch.down - paused,
            reconnected_s=watch.up - paused,
            first_success_s=recovered,
            failures_after_8s=len(late_failures),
        )
        assert recovered < 8.0, text
        assert not late_failures, text


class TestReplicaFailure:
    """A replica process dies or stops under load while the cluster stays up."""

    async def test_f3_killing_a_replica_fails_only_its_calls_in_flight(self, nats_cluster: NatsCluster) -> None:
        """F3: SIGKILL of one of two replicas mid-request fails only calls issued before the kill."""
        client_url = nats_cluster.urls[0]
        async with (
            replicas(nats_cluster.urls[1], nats_cluster.urls[2]) as reps,
            natsrpc.connect(client_url, timeout=TIMEOUT) as client,
        ):
            await until_served_by(client_url, reps)
            victim, survivor = reps
            load = Load(lambda: client.call_service["faultwork"].work(20), rate=1000, duration=3)
            kill_at = load.after(1000)

            async def fault() -> float:
                await kill_at.wait()
                victim.kill()
                await victim.wait()
                return time.monotonic()

            calls, killed = await asyncio.gather(load.run(), fault())
        bad = failed(calls)
        late = [c for c in bad if c.start > killed]
        at_kill = in_flight(calls, killed)
        text = figure(
            "F3 kill a replica process mid-request",
            rate=1000,
            handler_ms=20,
            sent=len(calls),
            failed=len(bad),
            errors=errors(calls),
            in_flight_at_kill=len(at_kill),
            served_by_survivor=sum(c.result == survivor.pid for c in calls),
            failed_issued_after_kill=len(late),
        )
        assert not late, text
        assert len(bad) <= len(at_kill), text

    @pytest.mark.slow  # 4 s: as F2 (test_resilience kills every instance in the default suite)
    async def test_f4_killing_the_only_replica_fails_fast(self, nats_cluster: NatsCluster) -> None:
        """F4: SIGKILL of the only replica: calls fail fast (NoResponders, CircuitOpen), none times out later."""
        client_url = nats_cluster.urls[0]
        async with (
            replicas(nats_cluster.urls[1]) as reps,
            natsrpc.connect(client_url, timeout=TIMEOUT) as client,
        ):
            await until_served_by(client_url, reps)
            load = Load(lambda: client.call_service["faultwork"].work(5), rate=1000, duration=1 + TIMEOUT + 1.5)
            kill_at = load.after(1000)

            async def fault() -> float:
                await kill_at.wait()
                reps[0].kill()
                await reps[0].wait()
                return time.monotonic()

            calls, killed = await asyncio.gather(load.run(), fault())
        timeouts = [c for c in calls if c.error == "CallTimeout"]
        settled = [c for c in calls if c.start > killed + TIMEOUT]
        late_timeouts = [c for c in timeouts if c.end > killed + 2 * TIMEOUT]
        fast = [c.end - c.start for c in settled]
        text = figure(
            "F4 kill the only replica",
            rate=1000,
            sent=len(calls),
            errors=errors(calls),
            errors_after_one_timeout=errors(settled),
            last_timeout_ended_s=max((c.end - killed for c in timeouts), default=0.0),
            failure_p99_ms=ms(percentile(fast, 0.99)),
            failure_max_ms=ms(max(fast, default=0.0)),
        )
        assert settled, text
        assert all(c.error in ("NoResponders", "CircuitOpen") for c in settled), text
        assert not late_timeouts, text
        assert percentile(fast, 0.99) < 0.25 * TIMEOUT, text

    @pytest.mark.slow  # 4 s: as F5 (test_run's Ctrl-C drains a call in flight in the default suite)
    async def test_f7_graceful_stop_of_a_replica_loses_nothing(self, nats_cluster: NatsCluster) -> None:
        """F7: SIGTERM to one of two replicas under load: every call succeeds, the replica exits 0.

        The leaving replica waits its leave grace, and the client sends to the other's own subject
        meanwhile, once each has heard the other's heartbeat (a registry connected within the last
        interval has not): the replicas beat every 0.2 s, and the load starts once the client has
        heard both, from a beat sent after every registry here subscribed.
        """
        client_url = nats_cluster.urls[0]
        async with (
            replicas(nats_cluster.urls[1], nats_cluster.urls[2], args=("--heartbeat-interval", "0.2")) as reps,
            natsrpc.connect(client_url, timeout=TIMEOUT) as client,
        ):
            await until_served_by(client_url, reps)
            assert client.registry is not None
            registry = client.registry
            await poll(lambda: len(registry.live("faultwork")) == 2, "the client heard both replicas beat")
            victim, survivor = reps
            load = Load(lambda: client.call_service["faultwork"].work(20), rate=1000, duration=3)
            stop_at = load.after(1000)

            async def fault() -> tuple[float, int]:
                await stop_at.wait()
                victim.proc.send_signal(signal.SIGTERM)
                return time.monotonic(), await victim.wait()

            calls, (stopped, code) = await asyncio.gather(load.run(), fault())
        bad = failed(calls)
        text = figure(
            "F7 graceful replica stop",
            rate=1000,
            handler_ms=20,
            sent=len(calls),
            lost=len(bad),
            errors=errors(calls),
            in_flight_at_sigterm=len(in_flight(calls, stopped)),
            served_by_victim=sum(c.result == victim.pid for c in calls),
            served_by_survivor=sum(c.result == survivor.pid for c in calls),
            exit_code=code,
        )
        assert not bad, text
        assert code == 0, f"{text}\n{victim.output}"


class TestOutage:
    """The whole NATS service goes away and comes back."""

    @pytest.mark.slow  # 5 s: as F5
    async def test_f9_nothing_runs_after_its_deadline(self) -> None:
        """F9: kill the only server, restart it on the same port: no request runs after its deadline."""
        stamp = Stamp()
        with NatsServer() as server:
            # Caller and service share one connection, as a service calling another in-process does.
            # On reconnect nats-py sends the subscriptions before the requests it buffered during
            # the outage, so those requests surely reach the service, past their deadline (fact 5).
            async with (
                natsrpc.connect(server.url, timeout=TIMEOUT) as client,
                serve(client, stamp) as host,
            ):
                await until_answers(client, lambda c: c.call_service["stamp"].stamp())
                load = Load(lambda: client.call_service["stamp"].stamp(), rate=500, duration=5)
                kill_at, restart_at = load.after(500), load.after(500 + 1000)

                async def fault() -> tuple[float, float]:
                    await kill_at.wait()
                    server.kill()
                    killed = time.monotonic()
                    await restart_at.wait()
                    await asyncio.to_thread(server.restart)
                    return killed, time.monotonic()

                calls, (killed, restarted) = await asyncio.gather(load.run(), fault())
                route = host.instances[0].routes["stamp"]
                refused_late = route.stats.num_errors
        late_runs = [r for r in stamp.remaining if r < 0]
        back = min((c.end for c in calls if c.start > restarted and not c.error), default=math.inf)
        text = figure(
            "F9 full outage then restart",
            rate=500,
            outage_s=restarted - killed,
            sent=len(calls),
            errors=errors(calls),
            executed=len(stamp.remaining),
            executed_after_deadline=len(late_runs),
            refused_as_late=refused_late,
            min_remaining_ms=ms(min(stamp.remaining, default=math.nan)),
            first_success_after_restart_s=back - restarted,
        )
        assert not late_runs, text
        assert refused_late > 0, f"no buffered request reached the service late: nothing was tested; {text}"
        assert sum(c.start > restarted + TIMEOUT and c.error == "" for c in calls) > 0, text


class TestOverload:
    """Offered load beyond a replica's capacity is shed fast; concurrency is not capped at one."""

    async def test_s1_ten_times_capacity_gets_quick_429s(self, nats_url: str) -> None:
        """S1: 10x capacity: excess calls get 429 Overloaded quickly, in-flight stays bounded, < 1% time out."""
        concurrency, queue, latency = 4, 4, 0.05
        capacity = concurrency / latency  # 80 calls/s
        sleepy = Sleepy()
        sleepy.latency = latency
        async with (
            natsrpc.connect(nats_url) as server_side,
            serve(server_side, sleepy, max_concurrency=concurrency, max_queue=queue) as host,
            natsrpc.connect(nats_url, timeout=TIMEOUT, retry=NO_RETRIES) as caller,
        ):
            await until_answers(caller, lambda c: c.call_service["sleepy"].nap())
            peak = 0

            async def sample() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, host.in_flight)
                    await asyncio.sleep(0.001)

            sampler = asyncio.create_task(sample())
            load = Load(lambda: caller.call_service["sleepy"].nap(), rate=10 * capacity, duration=2.5)
            calls = await load.run()
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        overloaded = [c.end - c.start for c in calls if c.error == "Overloaded"]
        timeouts = sum(c.error == "CallTimeout" for c in calls)
        text = figure(
            "S1 offered load 10x capacity",
            capacity_per_s=capacity,
            offered_per_s=10 * capacity,
            sent=len(calls),
            ok=sum(not c.error for c in calls),
            errors=errors(calls),
            overloaded_p50_ms=ms(percentile(overloaded, 0.5)),
            overloaded_p99_ms=ms(percentile(overloaded, 0.99)),
            peak_in_flight=peak,
            limit_plus_queue=concurrency + queue,
            timeout_pct=100 * timeouts / len(calls),
        )
        assert len(overloaded) > 0.5 * len(calls), text
        # Quick: most in about a millisecond; the tail (a stalled loop on a shared machine) still far
        # below the 1 s a caller would wait for a timeout or the 50 ms a slot takes to free up.
        assert percentile(overloaded, 0.5) < 0.2 * latency, text
        assert percentile(overloaded, 0.99) < 0.25 * TIMEOUT, text
        assert peak <= concurrency + queue, text
        assert timeouts < 0.01 * len(calls), text

    async def test_s4_slow_handler_is_not_capped_at_one_call_at_a_time(self, nats_url: str) -> None:
        """S4: a 20 ms handler at 1,000 calls/s on one replica keeps up (one at a time would cap it at 50/s)."""
        rate, duration = 1000, 3.0
        async with (
            natsrpc.connect(nats_url) as server_side,
            serve(server_side, Sleepy()),
            natsrpc.connect(nats_url, timeout=TIMEOUT, retry=NO_RETRIES) as caller,
        ):
            await until_answers(caller, lambda c: c.call_service["sleepy"].nap())
            calls = await Load(lambda: caller.call_service["sleepy"].nap(), rate=rate, duration=duration).run()
        ok = [c for c in calls if not c.error]
        elapsed = max(c.end for c in calls) - min(c.start for c in calls)
        throughput = len(ok) / elapsed
        latencies = [c.end - c.start for c in ok]
        text = figure(
            "S4 20 ms handler, one replica",
            offered_per_s=rate,
            sent=len(calls),
            ok=len(ok),
            errors=errors(calls),
            throughput_per_s=throughput,
            times_one_at_a_time_cap=throughput / (1 / Sleepy.latency),
            p50_ms=ms(percentile(latencies, 0.5)),
            p99_ms=ms(percentile(latencies, 0.99)),
        )
        assert len(ok) == len(calls), text
        assert throughput > 0.8 * rate, text
