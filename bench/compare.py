"""natsrpc vs raw nats-py request/reply vs nats-py's ``nats.micro``, interleaved in one run.

Usage:  python bench/compare.py [--rounds 5] [--duration 2] [--concurrency 1 10 100]
                                [--encodings json msgpack] [--loops asyncio uvloop]

For each event loop, the responders (a natsrpc ``echo`` service, a raw nats-py responder and a
``nats.micro`` endpoint) run in a second process on that loop; this process, on the same loop,
drives closed-loop load at each concurrency and encoding, rotating the contenders' order each
round, and prints median throughput, p99 latency and the ratios to raw nats-py. Absolute numbers
drift on shared machines; the ratios measured side by side are the figures to quote.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.micro
from nats.micro.request import Request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import natsrpc
import natsrpc.logs
from natsrpc import Service, rpc

PAYLOAD = "x" * 64
RAW_SUBJECT = "bench.raw.echo"
MICRO_SUBJECT = "bench.micro.echo"
CONTENDERS = ("natsrpc", "raw nats-py", "nats.micro")


class Echo(Service):
    """Returns its argument."""

    name = "echo"
    version = "1.0.0"

    @rpc
    async def echo(self, value: str) -> str:
        """Returns ``value``."""
        return value


async def serve(url: str) -> None:
    """Runs the three responders until stdin closes."""
    natsrpc.logs.configure("console", "warning")
    nc = await nats.connect(url)

    async def raw(msg: Any) -> None:
        await msg.respond(msg.data)

    json_args = msgspec.json.Decoder(list[str])
    mp_args = msgspec.msgpack.Decoder(list[str])

    async def micro(request: Request) -> None:  # decodes and encodes, as an endpoint would
        msgpack = (request.headers or {}).get("Content-Type") == "application/msgpack"
        (value,) = (mp_args if msgpack else json_args).decode(request.data)
        await request.respond(msgspec.msgpack.encode(value) if msgpack else msgspec.json.encode(value))

    await nc.subscribe(RAW_SUBJECT, queue="q", cb=raw)
    service = await nats.micro.add_service(nc, name="benchmicro", version="1.0.0")
    await service.add_endpoint(name="echo", subject=MICRO_SUBJECT, handler=micro)
    async with natsrpc.connect(url) as client, natsrpc.Host(client, [Echo()], max_concurrency=1000, max_queue=10000):
        await nc.flush()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await service.stop()
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
    return len(latencies) / elapsed, latencies[max(0, int(len(latencies) * 0.99) - 1)]


def calls(client: natsrpc.Client, nc: Any, encoding: str) -> dict[str, Callable[[], Awaitable[object]]]:
    """Returns one call of each contender, sending the same arguments in ``encoding``."""
    msgpack = encoding == "msgpack"
    body = natsrpc.codec.encode([PAYLOAD], msgpack)
    headers = {"Content-Type": "application/msgpack"} if msgpack else None
    echo = client.call_service["echo"].options(encoding=encoding).echo

    async def ours() -> object:
        return await echo(PAYLOAD)

    async def raw() -> object:
        return await nc.request(RAW_SUBJECT, body, timeout=5, headers=headers)

    async def micro() -> object:
        return await nc.request(MICRO_SUBJECT, body, timeout=5, headers=headers)

    return dict(zip(CONTENDERS, (ours, raw, micro), strict=True))


Results = dict[tuple[str, str, int], list[tuple[float, float]]]


async def measure(url: str, args: argparse.Namespace) -> Results:
    """Measures every contender at every encoding and concurrency, rotating their order each round."""
    nc = await nats.connect(url)
    results: Results = {}
    async with natsrpc.connect(url) as client:
        for encoding in args.encodings:
            contenders = calls(client, nc, encoding)
            for call in contenders.values():  # warm up every path
                await closed_loop(call, 10, 0.3)
            names = list(contenders)
            for round_no in range(args.rounds):
                order = names[round_no % len(names) :] + names[: round_no % len(names)]
                for concurrency in args.concurrency:
                    for name in order:
                        result = await closed_loop(contenders[name], concurrency, args.duration)
                        results.setdefault((encoding, name, concurrency), []).append(result)
                print(f"{encoding}: round {round_no + 1}/{args.rounds} done", file=sys.stderr)
    await nc.drain()
    return results


def table(results: Results, loop_name: str, args: argparse.Namespace) -> str:
    """Returns the results as a Markdown table with ratios to raw nats-py."""
    lines = [
        f"echo of a 64-byte string, {loop_name} loop on both sides, "
        f"median of {args.rounds} interleaved rounds of {args.duration} s",
        "",
        "| encoding | concurrency | contender | calls/s | ratio to raw | p99 ms | p99 ratio |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for encoding in args.encodings:
        for concurrency in args.concurrency:
            raw = results[(encoding, "raw nats-py", concurrency)]
            raw_rps = statistics.median(r for r, _ in raw)
            raw_p99 = statistics.median(p for _, p in raw)
            for name in CONTENDERS:
                runs = results[(encoding, name, concurrency)]
                rps = statistics.median(r for r, _ in runs)
                p99 = statistics.median(p for _, p in runs)
                lines.append(
                    f"| {encoding} | {concurrency} | {name} | {rps:,.0f} | {rps / raw_rps:.2f} | "
                    f"{p99 * 1e3:.2f} | {p99 / raw_p99:.2f} |"
                )
    return "\n".join(lines)


def run_loop(loop_name: str, args: argparse.Namespace) -> str:
    """Starts a server and the responders on ``loop_name``, measures, and returns the table."""
    with natsrpc.NatsServer() as server:
        responders = subprocess.Popen(
            [sys.executable, __file__, "--serve", server.url, "--loops", loop_name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert responders.stdin is not None
        assert responders.stdout is not None
        try:
            if responders.stdout.readline().strip() != "ready":
                raise SystemExit("the responders did not start")
            with runner(loop_name) as loop:
                results = loop.run(measure(server.url, args))
        finally:
            responders.stdin.close()
            responders.wait(10)
    return table(results, loop_name, args)


def runner(loop_name: str) -> asyncio.Runner:
    """Returns an asyncio runner on the named loop."""
    if loop_name == "uvloop":
        import uvloop

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()


def main() -> None:
    """Parses the arguments and runs the comparison on each loop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--encodings", nargs="+", choices=["json", "msgpack"], default=["json", "msgpack"])
    parser.add_argument("--loops", nargs="+", choices=["asyncio", "uvloop"], default=["asyncio", "uvloop"])
    args = parser.parse_args()
    natsrpc.logs.configure("console", "warning")
    if args.serve:
        with runner(args.loops[0]) as loop:
            loop.run(serve(args.serve))
        return
    loops = [name for name in args.loops if name != "uvloop" or importlib.util.find_spec("uvloop")]
    for loop_name in loops:
        print(run_loop(loop_name, args), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
