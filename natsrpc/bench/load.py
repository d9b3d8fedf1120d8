"""Load generation: a closed loop (a concurrency) or an open loop (a rate), in one process or several.

A closed loop keeps ``concurrency`` calls in flight and times each call from its send. An open loop
starts call number i at ``t0 + i / rate`` as its own task, at most ``max_in_flight`` awaiting a
reply, and times each call from its *scheduled* send: a generator or service that falls behind
shows in the latencies instead of hiding them (no coordinated omission), and sends more than
:data:`LATE_AFTER` behind schedule are counted as late. Calls started during the warm-up are made
but not counted. Calls go through ``Client.request`` with the body encoded once and no retries.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from natsrpc import logs, protocol
from natsrpc.bench.stats import Soak, Stats, other_tasks, rss_mb
from natsrpc.client import DEFAULT_TIMEOUT, Client
from natsrpc.connection import connect
from natsrpc.loop import runner
from natsrpc.proxy import CallOptions
from natsrpc.retry import NO_RETRIES

SOAK_SAMPLES = 200_000  # latency samples a soak run keeps (a uniform reservoir), preallocated

DEFAULT_CONCURRENCY: Final = 10
DEFAULT_DURATION: Final = 10.0
DEFAULT_MAX_IN_FLIGHT: Final = 10_000
LATE_AFTER: Final = 0.002
"""Seconds behind schedule after which an open-loop send counts as late."""
READY_TIMEOUT: Final = 60.0
"""Seconds the client processes of a run have to start and connect."""

Tick = Callable[[Stats, float], None]
"""Called with the figures so far and the seconds since the load started."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one load generator does (a whole run, or one client process's share of it).

    Attributes:
        servers: NATS URLs.
        security: ``connect()`` keywords of :mod:`natsrpc.auth` (credentials, TLS files), as text.
        service: the service called.
        method: the method called.
        body: the request body, encoded once.
        msgpack: the body is MessagePack.
        timeout: seconds per call.
        concurrency: closed loop: calls in flight (None in an open loop).
        rate: open loop: calls per second (None in a closed loop).
        duration: seconds to measure, or None to measure ``count`` calls.
        count: calls to measure, or None to measure for ``duration``.
        warmup: seconds of uncounted calls first.
        max_in_flight: open loop: calls awaiting a reply at most.
        processes: client processes sharing the load.
        uvloop: run on uvloop.
        soak: measure memory and leftovers.
        phase: open loop: seconds this share's schedule lags the run's (interleaves processes).
    """

    servers: tuple[str, ...]
    service: str
    method: str
    body: bytes = b""
    security: tuple[tuple[str, str], ...] = ()
    msgpack: bool = False
    timeout: float = DEFAULT_TIMEOUT
    concurrency: int | None = DEFAULT_CONCURRENCY
    rate: float | None = None
    duration: float | None = DEFAULT_DURATION
    count: int | None = None
    warmup: float = 1.0
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    processes: int = 1
    uvloop: bool = False
    soak: bool = False
    phase: float = 0.0

    def split(self) -> list[Plan]:
        """Returns the shares of the ``processes`` processes (concurrency, rate, count, in-flight split evenly)."""
        n = self.processes

        def share(total: int, i: int) -> int:
            return total // n + (i < total % n)

        return [
            dataclasses.replace(
                self,
                processes=1,
                concurrency=None if self.concurrency is None else share(self.concurrency, i),
                rate=None if self.rate is None else self.rate / n,
                count=None if self.count is None else share(self.count, i),
                max_in_flight=max(1, share(self.max_in_flight, i)),
                phase=0.0 if self.rate is None else i / self.rate,
            )
            for i in range(n)
        ]


class _Load:
    """One load generator on one client: the closed or open loop, feeding its :class:`Stats`."""

    def __init__(self, client: Client, plan: Plan) -> None:
        self.client = client
        self.plan = plan
        self.subject = protocol.endpoint_subject(plan.service, plan.method, client.prefix)
        self.options = CallOptions(timeout=plan.timeout, msgpack=plan.msgpack, retry=NO_RETRIES)
        self.remaining = plan.count
        self.t0 = time.perf_counter()
        self.stats = Stats(start=self.t0 + plan.warmup, wall_start=time.time() + plan.warmup)
        self.end = math.inf if plan.duration is None else self.stats.start + plan.duration

    def claim(self, at: float) -> bool:
        """Returns whether a counted call may start at ``at`` (before the end, or within the count)."""
        if self.remaining is None:
            return at < self.end
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True

    async def closed_worker(self) -> None:
        """Calls back to back until the run ends: one of ``concurrency`` such workers."""
        request, subject, body, options = self.client.request, self.subject, self.plan.body, self.options
        clock, measured = time.perf_counter, self.stats.start
        while True:
            started = clock()
            counted = started >= measured
            if counted and not self.claim(started):
                return
            error = None
            try:
                await request(subject, body, options)
            except Exception as exc:  # every failure is a figure of the run, whatever its class
                error = type(exc).__name__
            if counted:
                self.stats.record(started, error)

    async def open_schedule(self, tg: asyncio.TaskGroup) -> None:
        """Starts call number i at ``t0 + phase + i / rate`` as a task of ``tg``, at most ``max_in_flight`` at once."""
        assert self.plan.rate is not None
        interval, first, measured = 1.0 / self.plan.rate, self.t0 + self.plan.phase, self.stats.start
        slots = asyncio.Semaphore(self.plan.max_in_flight)
        for i in itertools.count():
            at = first + i * interval
            counted = at >= measured
            if counted and not self.claim(at):
                return
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif i % 32 == 0:  # behind schedule: send a batch of due calls, but let replies be read between
                await asyncio.sleep(0)
            await slots.acquire()
            if counted and time.perf_counter() - at > LATE_AFTER:
                self.stats.late += 1
            tg.create_task(self.timed_call(at if counted else None, slots))

    async def timed_call(self, at: float | None, slots: asyncio.Semaphore) -> None:
        """Makes one open-loop call; counts it, timed from ``at``, unless ``at`` is None (warm-up)."""
        error = None
        try:
            await self.client.request(self.subject, self.plan.body, self.options)
        except Exception as exc:  # every failure is a figure of the run, whatever its class
            error = type(exc).__name__
        finally:
            slots.release()
        if at is not None:
            self.stats.record(at, error)

    def half_done(self) -> bool:
        """Returns whether half the counted calls (or half the duration) are behind."""
        if self.plan.count is not None:
            return self.stats.calls * 2 >= self.plan.count
        return time.perf_counter() >= (self.stats.start + self.end) / 2

    async def ticker(self, on_tick: Tick, every: float) -> None:
        """Reports progress every ``every`` seconds, and takes the soak run's middle RSS."""
        soak = self.stats.soak
        while True:
            await asyncio.sleep(every)
            on_tick(self.stats, time.perf_counter() - self.t0)
            if soak is not None and soak.rss_middle is None and self.half_done():
                soak.rss_middle = rss_mb()

    async def run(self, on_tick: Tick, every: float) -> Stats:
        """Runs the whole load (warm-up included) and returns its figures."""
        async with asyncio.TaskGroup() as outer:
            ticker = outer.create_task(self.ticker(on_tick, every))
            async with asyncio.TaskGroup() as tg:
                if self.plan.concurrency is not None:
                    for _ in range(self.plan.concurrency):
                        tg.create_task(self.closed_worker())
                else:
                    await self.open_schedule(tg)
            ticker.cancel()
        on_tick(self.stats, time.perf_counter() - self.t0)
        return self.stats


async def generate(
    plan: Plan,
    on_tick: Tick = lambda stats, elapsed: None,
    ready: Callable[[], Awaitable[None]] | None = None,
    every: float = 0.5,
) -> Stats:
    """Connects, runs the load of ``plan`` on the running loop and returns its figures.

    Args:
        plan: what to do (a one-process plan, or one share of :meth:`Plan.split`).
        on_tick: called every ``every`` seconds and once at the end.
        ready: awaited once connected, before the load starts (lines client processes up).
        every: seconds between ``on_tick`` calls.

    Raises:
        ConnectionLost: the first connect failed.
        ConfigurationError: the security options are unusable.
    """
    security: dict[str, Any] = dict(plan.security)
    async with connect(
        list(plan.servers), name="natsrpc-bench", timeout=plan.timeout, discovery=False, **security
    ) as client:
        soak = Soak(rss_start=rss_mb(), tasks_start=other_tasks()) if plan.soak else None
        if ready is not None:
            await ready()
        load = _Load(client, plan)
        load.stats.soak = soak
        if soak is not None:
            load.stats.use_reservoir(SOAK_SAMPLES)
        load.stats.loop = type(asyncio.get_running_loop()).__module__.partition(".")[0]
        stats = await load.run(on_tick, every)
        stats.finish_reservoir()
        if soak is not None:
            soak.rss_end = rss_mb()
            soak.rss_middle = soak.rss_end if soak.rss_middle is None else soak.rss_middle
            soak.pending_calls_end = client.pending_calls
            soak.tasks_end = other_tasks()
        return stats


class WorkerFailed(Exception):
    """Raised when a client process of a multi-process run could not connect, failed or died.

    Kept out of the :mod:`natsrpc.errors` tree: only the bench command raises and catches it.
    """


def _worker(plan: Plan, index: int, barrier: Any, results: Any, counters: Any) -> None:
    """Runs one client process: its share of the load, the figures sent back to the parent."""
    logs.configure("console", os.environ.get("NATSRPC_LOG_LEVEL", "error"))

    def on_tick(stats: Stats, _elapsed: float) -> None:
        counters[2 * index], counters[2 * index + 1] = stats.calls, stats.failed

    async def ready() -> None:
        await asyncio.to_thread(barrier.wait, READY_TIMEOUT)

    try:
        with runner(plan.uvloop) as loop_runner:
            stats = loop_runner.run(generate(plan, on_tick, ready, every=0.1))
    except KeyboardInterrupt:  # the parent got it too, and stops the run
        return
    except Exception as exc:  # sent to the parent, which says why the run failed
        barrier.abort()
        results.put((index, f"{type(exc).__name__}: {exc}"))
        return
    results.put((index, stats))


def run_processes(plan: Plan, on_progress: Callable[[float, int, int], None]) -> Stats:
    """Runs ``plan`` in ``plan.processes`` spawned client processes; returns their merged figures.

    The processes connect, wait for each other, then run their shares of :meth:`Plan.split`; their
    call and error counts reach the parent through shared memory as they go, their figures
    (latency samples included) through a queue at the end.

    Args:
        plan: the whole run.
        on_progress: called about every 0.1 s with seconds elapsed, calls and errors so far.

    Raises:
        WorkerFailed: a process could not connect, failed or died.
    """
    ctx = multiprocessing.get_context("spawn")
    n = plan.processes
    barrier = ctx.Barrier(n + 1)
    results = ctx.Queue()
    counters = ctx.RawArray("q", 2 * n)  # calls and failures per process, written as they go
    procs = [
        ctx.Process(target=_worker, args=(share, i, barrier, results, counters), name=f"natsrpc-bench-{i}")
        for i, share in enumerate(plan.split())
    ]
    done: dict[int, Stats] = {}
    for proc in procs:
        proc.start()
    try:
        try:
            barrier.wait(READY_TIMEOUT)
        except threading.BrokenBarrierError:
            try:
                raise WorkerFailed(results.get(timeout=5)[1]) from None
            except queue.Empty:
                raise WorkerFailed("the client processes did not start in time") from None
        t0 = time.perf_counter()
        while len(done) < n:
            try:
                index, item = results.get(timeout=0.1)
            except queue.Empty:
                dead = [p.name for i, p in enumerate(procs) if i not in done and p.exitcode is not None]
                if dead:
                    raise WorkerFailed(f"client process {dead[0]} died") from None
            else:
                if isinstance(item, str):
                    raise WorkerFailed(item)
                done[index] = item
            on_progress(time.perf_counter() - t0, sum(counters[0::2]), sum(counters[1::2]))
    finally:
        for proc in procs:
            if len(done) < n and proc.is_alive():  # the run failed or was interrupted: stop the rest now
                proc.kill()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        results.close()
    return Stats.merge([done[i] for i in range(n)])
