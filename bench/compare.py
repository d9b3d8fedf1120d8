"""natsrpc vs raw nats-py request/reply on the same echo payload, interleaved in one run.

Usage:  python bench/compare.py [--rounds 5] [--duration 2] [--concurrency 1 100]

Responders (a natsrpc ``echo`` service and a raw nats-py responder) run in a second process; this
process drives closed-loop load at each concurrency, alternating natsrpc and raw each round, and
prints the median throughput, p99 latency and the ratio natsrpc / raw. Absolute numbers drift on
shared machines; the ratio measured side by side is the figure to quote.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import natsrpc
import natsrpc.logs
from natsrpc import Service, rpc

PAYLOAD = "x" * 64
RAW_SUBJECT = "bench.raw.echo"


class Echo(Service):
    """Returns its argument."""

    name = "echo"
    version = "1.0.0"

    @rpc
    async def echo(self, value: str) -> str:
        """Returns ``value``."""
        return value


async def serve(url: str) -> None:
    """Runs both responders until stdin closes."""
    natsrpc.logs.configure("console", "warning")
    nc = await nats.connect(url)

    async def raw(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(RAW_SUBJECT, queue="q", cb=raw)
    async with natsrpc.connect(url) as client, natsrpc.Host(client, [Echo()], max_concurrency=1000, max_queue=10000):
        await nc.flush()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await nc.drain()


async def closed_loop(call: Callable[[], Awaitable[object]], concurrency: int, duration: float) -> tuple[float, float]:
    """Runs ``concurrency`` workers calling back-to-back for ``duration`` s; returns (calls/s, p99 s)."""
    latencies: list[float] = []
    stop = time.perf_counter() + duration

    async def worker() -> None:
        while (start := time.perf_counter()) < stop:
            await call()
            latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    return len(latencies) / elapsed, latencies[int(len(latencies) * 0.99) - 1]


def main(args: argparse.Namespace) -> None:
    """Starts a server and the responders, then measures and prints the table."""
    with natsrpc.NatsServer() as server:
        responders = subprocess.Popen(
            [sys.executable, __file__, "--serve", server.url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert responders.stdin is not None
        assert responders.stdout is not None
        try:
            if responders.stdout.readline().strip() != "ready":
                raise SystemExit("the responders did not start")
            asyncio.run(measure(server.url, args))
        finally:
            responders.stdin.close()
            responders.wait(10)


async def measure(url: str, args: argparse.Namespace) -> None:
    """Interleaves natsrpc and raw runs at each concurrency and prints medians and ratios."""
    raw_nc = await nats.connect(url)
    body = natsrpc.codec.encode([PAYLOAD])
    async with natsrpc.connect(url) as client:
        echo = client.call_service["echo"].echo

        async def rpc_call() -> object:
            return await echo(PAYLOAD)

        async def raw_call() -> object:
            return await raw_nc.request(RAW_SUBJECT, body, timeout=5)

        contenders = {"natsrpc": rpc_call, "raw nats-py": raw_call}
        for call in contenders.values():  # warm up both paths
            await closed_loop(call, 10, 0.3)
        results: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for round_no in range(args.rounds):
            for concurrency in args.concurrency:
                order = list(contenders.items()) if round_no % 2 == 0 else list(contenders.items())[::-1]
                for name, call in order:
                    results.setdefault((name, concurrency), []).append(
                        await closed_loop(call, concurrency, args.duration)
                    )
            print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr)
    await raw_nc.drain()
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    rounds = f"median of {args.rounds} interleaved rounds of {args.duration}s"
    print(f"\necho, 64-byte string, JSON, {loop_name} loop, {rounds}\n")
    columns = ["concurrency", "natsrpc calls/s", "raw calls/s", "ratio", "p99 natsrpc", "p99 raw", "p99 ratio"]
    print(" | ".join(f"{c:>11}" for c in columns))
    print("-" * 98)
    for concurrency in args.concurrency:
        ours = results[("natsrpc", concurrency)]
        raw = results[("raw nats-py", concurrency)]
        rps_ours, rps_raw = statistics.median(r for r, _ in ours), statistics.median(r for r, _ in raw)
        p99_ours, p99_raw = statistics.median(p for _, p in ours), statistics.median(p for _, p in raw)
        cells = [
            f"{concurrency}",
            f"{rps_ours:,.0f}",
            f"{rps_raw:,.0f}",
            f"{rps_ours / rps_raw:.2f}",
            f"{p99_ours * 1e3:.2f}ms",
            f"{p99_raw * 1e3:.2f}ms",
            f"{p99_ours / p99_raw:.2f}",
        ]
        print(" | ".join(f"{c:>11}" for c in cells))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 100])
    parsed = parser.parse_args()
    if parsed.serve:
        asyncio.run(serve(parsed.serve))
    else:
        main(parsed)
