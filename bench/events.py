"""natsrpc events against raw nats-py, in one run: events/s from emit to handled, pooled and durable.

Usage:  python bench/events.py [--rounds 5] [--events 20000] [--durable-events 5000]

The handlers run in a second process: a natsrpc service with a pooled ``@event`` handler, and a
raw nats-py queue subscriber. This process emits ``--events`` 64-byte payloads (natsrpc:
``client.emit``; raw: ``nc.publish`` to the queue subscriber's subject). Each side, once it has
handled them all, publishes one message back: the time from the first emit to that message gives
events/s. The figure is the median of ``--rounds`` interleaved rounds, with natsrpc's ratio to raw.

Durable: natsrpc's ``emit(..., durable=True)`` (each awaits JetStream's ack) to a durable handler,
against raw nats-py ``js.publish`` (awaited) to a stream of its own read by a durable pull
consumer that fetches batches of 100 and acks each event.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import natsrpc
import natsrpc.logs
from natsrpc import Service, event

PAYLOAD = "x" * 64
RAW_SUBJECT = "bench.raw.events"
RAW_DURABLE = "bench.rawjs"
DONE = "bench.events.done"


class Sink(Service):
    """Counts ``bench.tick`` events; says so on ``bench.events.done`` when it has ``expected``."""

    name = "benchsink"

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.expected = 0

    @event("bench.tick")
    async def on_tick(self, value: str) -> None:
        self.count += 1
        if self.count == self.expected:
            await self.ctx.client.nc.publish(DONE, b"natsrpc")

    @event("bench.durable", durable=True)
    async def on_durable(self, value: str) -> None:
        self.count += 1
        if self.count == self.expected:
            await self.ctx.client.nc.publish(DONE, b"natsrpc")

    @event("bench.expect")
    async def on_expect(self, n: int) -> None:
        self.count, self.expected = 0, n
        await self.ctx.client.nc.publish(DONE, b"ready")


async def serve(url: str) -> None:
    """Runs the natsrpc sink and the raw queue subscriber until stdin closes."""
    nc = await nats.connect(url)
    state = {"count": 0, "expected": 0}

    async def raw(msg: Any) -> None:
        if msg.data.startswith(b"expect "):
            state["count"], state["expected"] = 0, int(msg.data[7:])
            await nc.publish(DONE, b"ready")
            return
        state["count"] += 1
        if state["count"] == state["expected"]:
            await nc.publish(DONE, b"raw")

    await nc.subscribe(RAW_SUBJECT, queue="q", cb=raw)
    js = nc.jetstream()
    await js.add_stream(name="BENCHRAW", subjects=[RAW_DURABLE])
    pull = await js.pull_subscribe(RAW_DURABLE, durable="benchraw", stream="BENCHRAW")

    async def consume() -> None:
        while True:
            try:
                messages = await pull.fetch(100, timeout=1)
            except nats.errors.TimeoutError:
                continue
            except nats.errors.ConnectionClosedError:
                return
            except nats.errors.Error as exc:  # a fetch that expired, or a status: fetch again
                print(f"raw consumer: {exc!r}", file=sys.stderr)
                continue
            for msg in messages:
                await msg.ack()
                state["count"] += 1
                if state["count"] == state["expected"]:
                    await nc.publish(DONE, b"raw")

    consumer = asyncio.create_task(consume())
    async with natsrpc.connect(url) as client, natsrpc.Host(client, [Sink()], max_event_queue=1_000_000):
        await nc.flush()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    consumer.cancel()
    await nc.close()


async def measure(url: str, args: argparse.Namespace) -> dict[str, list[float]]:
    nc = await nats.connect(url)
    done: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_done(msg: Any) -> None:
        done.put_nowait(msg.data)

    await nc.subscribe(DONE, cb=on_done)
    results: dict[str, list[float]] = {"natsrpc": [], "raw": [], "natsrpc durable": [], "raw durable": []}
    js = nc.jetstream()
    item = PAYLOAD.encode()
    async with natsrpc.connect(url) as client:

        async def timed(
            n: int, expect: Callable[[], Awaitable[object]], send: Callable[[], Awaitable[object]], by: bytes
        ) -> float:
            """Tells the handler to expect ``n`` events, sends them, and returns events/s until it says done."""
            await expect()
            assert await asyncio.wait_for(done.get(), 10) == b"ready"
            started = time.perf_counter()
            for _ in range(n):
                await send()
            assert await asyncio.wait_for(done.get(), 60) == by
            return n / (time.perf_counter() - started)

        def natsrpc_round(event_type: str, durable: bool) -> Callable[[int], Awaitable[float]]:
            async def run(n: int) -> float:
                return await timed(
                    n,
                    lambda: client.emit("bench.expect", n),
                    lambda: client.emit(event_type, PAYLOAD, durable=durable),
                    b"natsrpc",
                )

            return run

        def raw_round(send: Callable[[], Awaitable[object]]) -> Callable[[int], Awaitable[float]]:
            async def run(n: int) -> float:
                return await timed(n, lambda: nc.publish(RAW_SUBJECT, f"expect {n}".encode()), send, b"raw")

            return run

        rounds = {
            "natsrpc": natsrpc_round("bench.tick", durable=False),
            "raw": raw_round(lambda: nc.publish(RAW_SUBJECT, item)),
            "natsrpc durable": natsrpc_round("bench.durable", durable=True),
            "raw durable": raw_round(lambda: js.publish(RAW_DURABLE, item)),
        }

        for name, run in rounds.items():  # warm up every path
            await run(200 if "durable" in name else 1000)
        for round_no in range(args.rounds):
            order = [
                (name, run, args.durable_events if "durable" in name else args.events) for name, run in rounds.items()
            ]
            for name, run, n in order if round_no % 2 == 0 else order[::-1]:
                results[name].append(await run(n))
    await nc.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--events", type=int, default=20_000, help="events per round")
    parser.add_argument("--durable-events", type=int, default=5_000, help="durable events per round")
    args = parser.parse_args()
    natsrpc.logs.configure("console", "warning")
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    with tempfile.TemporaryDirectory() as store, natsrpc.NatsServer(args=["-js", "-sd", store]) as server:
        handlers = subprocess.Popen(
            [sys.executable, __file__, "--serve", server.url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert handlers.stdin is not None
        assert handlers.stdout is not None
        try:
            if handlers.stdout.readline().strip() != "ready":
                raise SystemExit("the handlers did not start")
            results = asyncio.run(measure(server.url, args))
        finally:
            handlers.stdin.close()
            handlers.wait(10)
    print(f"natsrpc events vs raw nats-py, asyncio loop, median of {args.rounds} interleaved rounds\n")
    print("| figure | natsrpc | raw nats-py | ratio | goal |")
    print("|---|---:|---:|---:|---|")
    for label, ours_key, raw_key, n in (
        ("pooled", "natsrpc", "raw", args.events),
        ("durable", "natsrpc durable", "raw durable", args.durable_events),
    ):
        ours, raw = statistics.median(results[ours_key]), statistics.median(results[raw_key])
        figure = f"{label} events/s, emit to handled ({n:,} a round)"
        print(f"| {figure} | {ours:,.0f} | {raw:,.0f} | {ours / raw:.2f} | >= 0.8 |")


if __name__ == "__main__":
    main()
