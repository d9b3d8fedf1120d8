"""The Python cost of one call on each side, natsrpc vs raw nats-py, in one process with no network.

Usage:  python bench/hotpath.py [--side host client] [--calls 30000] [--rounds 7] [--loop uvloop]

A nats-py connection is given a fake transport: nothing reaches a socket or a server, so what is
measured is only the Python work of each side (parsing, dispatch, encoding, the flusher), which is
what decides throughput once the loop and the sockets are cheap (uvloop).

- ``host``: requests are fed to the connection's parser step as a server would deliver them (50 at
  a time), to a natsrpc ``echo`` service and to a raw nats-py callback that ``respond()``s.
- ``client``: ``client.call_service["echo"].echo(value)`` vs ``nc.request()``, 100 at a time; the
  fake transport answers every request by feeding an echo reply back to the parser.

It prints CPU microseconds per call (min and median of the rounds). CPU time is noisy on shared
machines; for a deterministic figure count instructions under valgrind and take the difference
of two call counts, which cancels start-up:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/hotpath.py --side host --only natsrpc --rounds 1 --calls 2000   # then 12000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NatsConnection

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compare import PAYLOAD, Echo  # the same service and value as the network comparison

import natsrpc
import natsrpc.logs
import natsrpc.observe.middleware

BODY = natsrpc.codec.encode([PAYLOAD])
BATCH = 50  # requests the host side is handed per parser read
KINDS = ("natsrpc", "raw nats-py")


class FakeTransport:
    """Stands in for nats-py's transport: answers PINGs, and (``echo``) every request with its body."""

    def __init__(self, nc: Any, echo: bool) -> None:
        self.nc = nc
        self.echo = echo
        self.replies: list[tuple[bytes, bytes]] = []

    def writelines(self, commands: list[bytes]) -> None:
        for command in commands:
            if command.startswith(b"PING"):
                asyncio.get_running_loop().create_task(self.nc._process_pong())
            elif self.echo and command.startswith((b"PUB ", b"HPUB ")):
                line, _, rest = command.partition(b"\r\n")
                parts = line.split()
                if parts[0] == b"PUB":
                    reply, payload = parts[2], rest[: int(parts[3])]
                else:
                    reply, payload = parts[2], rest[int(parts[3]) : int(parts[4])]
                if not self.replies:
                    asyncio.get_running_loop().create_task(self.deliver())
                self.replies.append((reply, payload))

    def write(self, data: bytes) -> None:
        self.writelines([data])

    async def drain(self) -> None:
        pass

    async def deliver(self) -> None:
        """Feeds the replies written so far back to the connection, as one read would."""
        await asyncio.sleep(0)
        replies, self.replies = self.replies, []
        subs = self.nc._subs
        for reply, payload in replies:
            name = reply.decode()
            for sid, sub in list(subs.items()):
                if sub.subject.endswith(">") and name.startswith(sub.subject[:-1]):
                    await self.nc._process_msg(sid, reply, b"", payload, None)
                    break
                if sub.subject.endswith("*") and name.startswith(sub.subject[:-1]):
                    await self.nc._process_msg(sid, reply, b"", payload, None)
                    break


def fake_connection(echo: bool) -> Any:
    """A nats-py connection that believes it is connected, writing to a :class:`FakeTransport`."""
    nc = NatsConnection()
    nc._status = NatsConnection.CONNECTED
    nc._flush_queue = asyncio.Queue(maxsize=1024)
    nc._pending = []
    nc._max_payload = 1 << 20
    nc._flush_timeout = 10.0
    nc._server_info = {"max_payload": 1 << 20, "headers": True}
    nc._transport = FakeTransport(nc, echo)  # type: ignore[assignment]
    nc._flusher_task = asyncio.get_running_loop().create_task(nc._flusher())
    return nc


MIDDLEWARE: list[Any] = []  # --observe: the metrics and tracing middleware, on both sides
TRACEPARENTS: list[bytes] = [b""]  # --observe: what the requests carry (a sampled one in 1/sample)


async def host_side(kind: str, calls: int) -> float:
    """CPU us per request served by ``kind``."""
    nc = fake_connection(echo=False)
    if kind == "raw nats-py":

        async def respond(msg: Any) -> None:
            await msg.respond(msg.data)

        sub = await nc.subscribe("bench.raw.echo", queue="q", cb=respond)
        subject, headers = b"bench.raw.echo", None
        host = None
    else:
        client = natsrpc.Client(nc, discovery=False, middleware=MIDDLEWARE)
        await client.start()
        host = natsrpc.Host(
            client, [Echo()], max_concurrency=1000, max_queue=10000, discoverable=False, middleware=MIDDLEWARE
        )
        await host.start()
        sub = host._subs[0]
        subject = b"svc.echo.echo"
        deadline = natsrpc.context.deadline_header(time.time() + 3600).encode()
        headers = b"NATS/1.0\r\nNatsrpc-Deadline: " + deadline + b"\r\n\r\n"
    blocks = [headers if not parent or headers is None else headers[:-2] + parent + b"\r\n" for parent in TRACEPARENTS]
    process, sid, reply = nc._process_msg, sub._id, b"_INBOX.abcdefghijklmnopqrstuv.1"
    sent = nc.stats["out_msgs"]

    async def burst() -> None:
        nonlocal sent
        for i in range(BATCH):
            await process(sid, subject, reply, BODY, blocks[i % len(blocks)])
        sent += BATCH
        while nc.stats["out_msgs"] < sent:  # noqa: ASYNC110 - lets the workers run, as a socket read would
            await asyncio.sleep(0)

    return await _timed(nc, burst, BATCH, calls)


async def client_side(kind: str, calls: int) -> float:
    """CPU us per call made by ``kind`` (the fake transport's echo included, the same for both)."""
    nc = fake_connection(echo=True)
    call: Callable[[], Awaitable[object]]
    if kind == "raw nats-py":

        async def call() -> object:
            return await nc.request("bench.raw.echo", BODY, timeout=5)

    else:
        client = natsrpc.Client(nc, discovery=False, middleware=MIDDLEWARE)
        await client.start()
        echo = client.call_service["echo"].echo

        async def call() -> object:
            return await echo(PAYLOAD)

    concurrency = 100

    async def burst() -> None:
        async def worker() -> None:
            for _ in range(10):
                await call()

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    return await _timed(nc, burst, concurrency * 10, calls)


async def _timed(nc: Any, burst: Callable[[], Awaitable[None]], per_burst: int, calls: int) -> float:
    """Runs ``burst`` until ``calls`` calls are done (after a warm-up); returns CPU us per call."""
    for _ in range(max(1, 2000 // per_burst)):
        await burst()
    bursts = max(1, calls // per_burst)
    started = time.process_time()
    for _ in range(bursts):
        await burst()
    elapsed = time.process_time() - started
    nc._status = NatsConnection.CLOSED
    await _stop_tasks()
    return elapsed / (bursts * per_burst) * 1e6


async def _stop_tasks() -> None:
    """Stops what the fake connection started (flusher, subscription and worker tasks)."""
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def measure(args: argparse.Namespace) -> None:
    """Measures each side, contenders interleaved round by round, and prints the figures."""
    natsrpc.logs.configure("console", "warning")
    gc.freeze()  # as the runner does once started: the collector leaves start-up's objects (the SDK's) alone
    for side in args.side:
        measure_one = host_side if side == "host" else client_side
        kinds = [k for k in KINDS if not args.only or k == args.only]
        results: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(args.rounds):
            for kind in kinds:
                results[kind].append(await measure_one(kind, args.calls))
        for kind in kinds:
            runs = results[kind]
            print(f"{side:6s} {kind:12s} min {min(runs):6.2f} us  median {statistics.median(runs):6.2f} us per call")


def main() -> None:
    """Parses the arguments and measures on the chosen loop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", nargs="+", choices=["host", "client"], default=["host", "client"])
    parser.add_argument("--calls", type=int, default=30000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", choices=KINDS, help="measure one contender (for valgrind)")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    parser.add_argument("--observe", action="store_true", help="natsrpc with the metrics and tracing middleware")
    parser.add_argument(
        "--sample",
        type=float,
        default=0.1,
        help="the root sampling ratio with --observe (0: no span at all, natsrpc's own work alone)",
    )
    parser.add_argument(
        "--span-only", action="store_true", help="count the SDK's two spans of a sampled call alone (for valgrind)"
    )
    parser.add_argument(
        "--piece",
        choices=("nothing", "metrics", "tracing"),
        help="with --observe, install only this piece ('nothing': an observer that does nothing)",
    )
    args = parser.parse_args()
    if args.observe or args.span_only:
        from compare import observability, sdk_span_cost

        installed = observability(args.sample)
        if args.piece == "nothing":
            installed = [natsrpc.observe.middleware.Observer()]
        elif args.piece is not None:
            installed = [m for m in installed if type(m).__name__.lower() == args.piece]
        MIDDLEWARE.extend(installed)
        sampled, unsampled = (b"traceparent: 00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-0" + f for f in (b"1", b"0"))
        if args.sample > 0:
            TRACEPARENTS[:] = [sampled] + [unsampled] * (max(1, round(1 / args.sample)) - 1)
        else:  # natsrpc's own work alone: no trace is sampled, the SDK makes no span
            TRACEPARENTS[:] = [unsampled]
        if args.span_only:
            print(f"the SDK's two spans of a sampled call, alone: {sdk_span_cost(args.calls) * 1e6:.2f} us")
            return
    if args.loop == "uvloop":
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    else:
        runner = asyncio.Runner()
    with runner:
        runner.run(measure(args))


if __name__ == "__main__":
    main()
