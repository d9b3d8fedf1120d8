"""natsrpc streams against raw nats-py, in one run: items/s, a reply larger than max_payload, first item.

Usage:  python bench/stream.py [--rounds 5] [--items 20000] [--reply-mib 8] [--first 300]

The responders run in a second process. Three figures, each the median of ``--rounds``
interleaved rounds, with natsrpc's ratio to raw nats-py measured side by side:

- items/s: a natsrpc stream of 64-byte items (credit window 64) against a raw responder that
  publishes the same number of 64-byte messages to the request's reply inbox, counted by the
  requester (no flow control at all);
- a reply of ``--reply-mib`` MiB (MessagePack bytes): natsrpc on a server with the default
  max_payload of 1 MiB (so in chunks) against a raw nats-py request/reply of the same payload on a
  server whose max_payload holds it in one message;
- time to the first item at concurrency 1: a natsrpc stream's first item against a natsrpc unary
  call of the same 64-byte string (both from natsrpc: the cost of opening a stream).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import natsrpc
import natsrpc.logs
from natsrpc import Service, rpc

ITEM = "x" * 64
RAW_ITEMS = "bench.raw.items"
RAW_BLOB = "bench.raw.blob"
END = b"end"


class Bench(Service):
    """The natsrpc side: a stream of 64-byte items, a large reply and a unary echo."""

    name = "bench"

    @rpc
    async def items(self, n: int) -> AsyncIterator[str]:
        """Yields ``n`` 64-byte strings."""
        for _ in range(n):
            yield ITEM

    @rpc
    async def blob(self, size: int) -> bytes:
        """Returns ``size`` bytes."""
        return b"b" * size

    @rpc
    async def echo(self, value: str) -> str:
        """Returns ``value``."""
        return value


async def serve(url: str, big_url: str) -> None:
    """Runs the natsrpc host on ``url`` and the raw responders (items on ``url``, blob on ``big_url``)."""
    nc = await nats.connect(url)
    big = await nats.connect(big_url)
    item = ITEM.encode()

    async def raw_items(msg: Any) -> None:
        for _ in range(int(msg.data)):
            await nc.publish(msg.reply, item)
        await nc.publish(msg.reply, END)

    async def raw_blob(msg: Any) -> None:
        await big.publish(msg.reply, b"b" * int(msg.data))

    await nc.subscribe(RAW_ITEMS, cb=raw_items)
    await big.subscribe(RAW_BLOB, cb=raw_blob)
    async with natsrpc.connect(url) as client, natsrpc.Host(client, [Bench()]):
        await nc.flush()
        await big.flush()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await nc.close()
    await big.close()


async def raw_items_per_s(nc: Any, n: int) -> float:
    inbox = nc.new_inbox()
    done = asyncio.Event()
    count = 0

    async def on_item(msg: Any) -> None:
        nonlocal count
        if msg.data == END:
            done.set()
        else:
            count += 1

    sub = await nc.subscribe(inbox, cb=on_item)
    started = time.perf_counter()
    await nc.publish(RAW_ITEMS, str(n).encode(), reply=inbox)
    await done.wait()
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    assert count == n, (count, n)
    return n / elapsed


async def natsrpc_items_per_s(client: natsrpc.Client, n: int) -> float:
    started = time.perf_counter()
    count = 0
    async for _ in client.call_service["bench"].options(timeout=60).items(n):
        count += 1
    elapsed = time.perf_counter() - started
    assert count == n
    return n / elapsed


async def raw_blob_s(big: Any, size: int) -> float:
    started = time.perf_counter()
    reply = await big.request(RAW_BLOB, str(size).encode(), timeout=30)
    elapsed = time.perf_counter() - started
    assert len(reply.data) == size
    return elapsed


async def natsrpc_blob_s(client: natsrpc.Client, size: int) -> float:
    started = time.perf_counter()
    data = await client.call_service["bench"].options(timeout=30, encoding="msgpack").blob(size)
    elapsed = time.perf_counter() - started
    assert len(data) == size
    return elapsed


async def first_item_s(client: natsrpc.Client) -> float:
    stream = client.stream("bench", "items", (1,))
    started = time.perf_counter()
    await stream.__anext__()
    elapsed = time.perf_counter() - started
    async for _ in stream:  # the end
        pass
    return elapsed


async def unary_s(client: natsrpc.Client) -> float:
    started = time.perf_counter()
    await client.call_service["bench"].echo(ITEM)
    return time.perf_counter() - started


async def measure(url: str, big_url: str, args: argparse.Namespace) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    size = args.reply_mib * 1024 * 1024
    async with natsrpc.connect(url) as client:
        nc = await nats.connect(url)
        big = await nats.connect(big_url)
        try:
            await natsrpc_items_per_s(client, 1000)  # warm up both paths
            await raw_items_per_s(nc, 1000)
            for _ in range(args.rounds):
                results.setdefault("raw items/s", []).append(await raw_items_per_s(nc, args.items))
                results.setdefault("natsrpc items/s", []).append(await natsrpc_items_per_s(client, args.items))
                results.setdefault("natsrpc reply s", []).append(await natsrpc_blob_s(client, size))
                results.setdefault("raw reply s", []).append(await raw_blob_s(big, size))
                firsts = [await first_item_s(client) for _ in range(args.first)]
                unaries = [await unary_s(client) for _ in range(args.first)]
                results.setdefault("first item s", []).append(statistics.median(firsts))
                results.setdefault("unary s", []).append(statistics.median(unaries))
        finally:
            await nc.close()
            await big.close()
    return results


def report(results: dict[str, list[float]], args: argparse.Namespace) -> str:
    med = {name: statistics.median(values) for name, values in results.items()}
    return "\n".join(
        [
            f"natsrpc streams vs raw nats-py, asyncio loop, median of {args.rounds} interleaved rounds",
            "",
            "| figure | natsrpc | raw nats-py / unary | ratio | goal |",
            "|---|---:|---:|---:|---|",
            f"| 64-byte items/s ({args.items:,} per stream) | {med['natsrpc items/s']:,.0f} | "
            f"{med['raw items/s']:,.0f} | {med['natsrpc items/s'] / med['raw items/s']:.2f} | >= 0.5 |",
            f"| {args.reply_mib} MiB reply, s (natsrpc in 1 MiB chunks) | {med['natsrpc reply s']:.3f} | "
            f"{med['raw reply s']:.3f} | {med['raw reply s'] / med['natsrpc reply s']:.2f} | >= 0.5 (throughput) |",
            f"| first item vs unary call, ms (concurrency 1) | {med['first item s'] * 1e3:.3f} | "
            f"{med['unary s'] * 1e3:.3f} | {med['first item s'] / med['unary s']:.2f} | <= 1.3 (time) |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", nargs=2, metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--items", type=int, default=20_000, help="items per stream")
    parser.add_argument("--reply-mib", type=int, default=8, help="size of the large reply")
    parser.add_argument("--first", type=int, default=300, help="calls per first-item measurement")
    args = parser.parse_args()
    natsrpc.logs.configure("console", "warning")
    if args.serve:
        asyncio.run(serve(*args.serve))
        return
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "big.conf"
        config.write_text(f"max_payload: {(args.reply_mib + 1) * 1024 * 1024}\n")
        with natsrpc.NatsServer() as server, natsrpc.NatsServer(config=config) as big_server:
            responders = subprocess.Popen(
                [sys.executable, __file__, "--serve", server.url, big_server.url],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert responders.stdin is not None
            assert responders.stdout is not None
            try:
                if responders.stdout.readline().strip() != "ready":
                    raise SystemExit("the responders did not start")
                results = asyncio.run(measure(server.url, big_server.url, args))
            finally:
                responders.stdin.close()
                responders.wait(10)
    print(report(results, args))


if __name__ == "__main__":
    main()
