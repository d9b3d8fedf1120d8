"""``python -m natsrpc bench``: load-test one method, and report calls/s, latency percentiles and errors by type.

The sub-package holds one concept, load testing, in three parts: :mod:`~natsrpc.bench.load` makes the
calls (closed or open loop, one process or several), :mod:`~natsrpc.bench.stats` keeps their figures
and computes nearest-rank percentiles, :mod:`~natsrpc.bench.report` shows them. This module is the
command: its arguments (:func:`add_parser`, :func:`plan_from_args`) and :func:`run`.

Calls started in the first ``--warmup`` seconds are made but not counted. The JSON arguments are
validated once and sent as-is with ``Client.request`` (no retries, no per-call encoding). A closed
loop times a call from its send; an open loop from its scheduled send, so a generator or service
that falls behind shows in the latencies (no coordinated omission), and sends more than 2 ms behind
schedule are counted as ``late``. Latencies of successful calls are kept in an ``array('d')`` (8 MB
per million calls) and sorted once at the end; failed calls are counted by exception class name.

JSON output (``--json``), one object::

    {
      "target": "kv.get",            SERVICE.METHOD
      "mode": "closed",              "closed" (a concurrency) or "open" (a rate)
      "concurrency": 10,             closed loop: calls in flight, all processes; null in an open loop
      "rate": null,                  open loop: calls/s scheduled, all processes; null in a closed loop
      "processes": 1,                client processes
      "loop": "uvloop",              "uvloop" or "asyncio"
      "duration_s": 10.002,          from the end of the warm-up to the last reply
      "calls": 41000,                counted calls that finished (ok + errors)
      "ok": 40990,
      "errors": {"CallTimeout": 10}, exception class name -> count
      "late": 0,                     open loop: sends more than 2 ms behind schedule (0 when closed)
      "rps": 4099.2,                 calls / duration_s
      "latency_ms": {"p50": 2.1, "p90": 3.0, "p99": 5.2, "p99_9": 9.8, "max": 12.0, "mean": 2.3},
                                     successful calls only; every value null when none succeeded
      "timeline": [{"t": 0.0, "calls": 2050, "errors": 0}, ...],
                                     calls and errors finished in each 0.5 s from the end of the warm-up
      "soak": null                   with --soak: {"rss_mb": {"start", "middle", "end"},
                                     "pending_calls_end", "tasks_start", "tasks_end"} (sums over processes)
    }

Exit codes: 0 the run finished (failed calls are in the report), 1 it could not run (no connection,
a client process failed, the plot could not be written), 2 bad usage.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from typing import Final

import msgspec

from natsrpc import auth, codec, protocol
from natsrpc.bench.load import (
    DEFAULT_CONCURRENCY,
    DEFAULT_DURATION,
    DEFAULT_MAX_IN_FLIGHT,
    Plan,
    WorkerFailed,
    generate,
    run_processes,
)
from natsrpc.bench.report import Progress, plot, render, summary
from natsrpc.bench.stats import Stats, percentiles
from natsrpc.client import DEFAULT_TIMEOUT
from natsrpc.errors import CallError, ConfigurationError
from natsrpc.loop import runner

__all__ = ["Plan", "Stats", "add_parser", "percentiles", "plan_from_args", "run"]

SOAK_COUNT: Final = 1_000_000
"""Calls a ``--soak`` run measures unless ``-n`` says otherwise."""


def plan_from_args(args: argparse.Namespace) -> Plan:
    """Returns the plan that parsed ``bench`` arguments describe.

    Raises:
        ConfigurationError: the target, the JSON or a combination of options is unusable.
    """
    service, _, method = args.target.partition(".")
    if not (protocol.valid_name(service) and protocol.valid_name(method)):
        raise ConfigurationError(f"{args.target!r} is not SERVICE.METHOD")
    body = args.arguments.encode()
    if body.strip():
        try:
            value = msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise ConfigurationError(f"the arguments are not valid JSON: {exc}") from None
        if args.msgpack:
            body = codec.encode(value, msgpack=True)
    else:
        body = b""
    if args.soak and args.duration is not None:
        raise ConfigurationError("--soak measures a count of calls: use -n, not -d")
    count = args.count if args.count is not None or not args.soak else SOAK_COUNT
    duration = None if count is not None else (args.duration or DEFAULT_DURATION)
    concurrency = None if args.rate is not None else (args.concurrency or DEFAULT_CONCURRENCY)
    if concurrency is not None and concurrency < args.processes:
        raise ConfigurationError(f"--concurrency {concurrency} is less than --processes {args.processes}")
    if count is not None and count < args.processes:
        raise ConfigurationError(f"--count {count} is less than --processes {args.processes}")
    security = tuple(sorted(auth.from_args(args).items()))
    auth.nats_options(**dict(security))  # missing files and contradictions are bad usage, found before any run
    if args.plot and not _importable("matplotlib"):
        raise ConfigurationError("--plot needs matplotlib: pip install 'natsrpc[plot]'")
    if args.uvloop and not _importable("uvloop"):
        raise ConfigurationError("--uvloop needs uvloop: pip install 'natsrpc[speed]'")
    return Plan(
        servers=tuple(auth.split_servers(args.url)),
        security=security,
        service=service,
        method=method,
        body=body,
        msgpack=args.msgpack,
        timeout=args.timeout,
        concurrency=concurrency,
        rate=args.rate,
        duration=duration,
        count=count,
        warmup=args.warmup,
        max_in_flight=args.max_in_flight,
        processes=args.processes,
        uvloop=_importable("uvloop") if args.uvloop is None else args.uvloop,
        soak=args.soak,
    )


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Adds the ``bench`` command to ``python -m natsrpc``'s subcommands; returns its parser."""
    # The JSON shape is written once, in the module docstring (absent under python -OO).
    shape = (__doc__ or "").partition("JSON output (``--json``), one object::\n")[2].partition("\nExit codes")[0]
    p = commands.add_parser(
        "bench",
        help="load-test one method: calls/s, latency percentiles, errors by type",
        description="Call SERVICE.METHOD in a closed loop (a concurrency) or an open loop (a rate), from one\n"
        "client process or several, and report calls/s, latency percentiles (nearest-rank) and errors by type.",
        epilog='examples:\n  python -m natsrpc bench kv.get \'{"key":"a"}\' -d 3 -c 100\n'
        "  python -m natsrpc bench kv.get '[\"a\"]' --rate 5000 -n 100000 --json\n\n"
        f"--json prints one object:\n{shape}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="SERVICE.METHOD")
    p.add_argument("arguments", nargs="?", default="", metavar="JSON", help="arguments as JSON, sent as-is")
    loop = p.add_mutually_exclusive_group()
    loop.add_argument(
        "-c",
        "--concurrency",
        type=_positive_int,
        metavar="N",
        help=f"closed loop: calls in flight (default {DEFAULT_CONCURRENCY})",
    )
    loop.add_argument("--rate", type=_positive_float, metavar="R", help="open loop: calls per second, sent on schedule")
    end = p.add_mutually_exclusive_group()
    end.add_argument(
        "-d", "--duration", type=_positive_float, metavar="S", help=f"seconds to measure (default {DEFAULT_DURATION:g})"
    )
    end.add_argument("-n", "--count", type=_positive_int, metavar="N", help="calls to measure")
    p.add_argument(
        "--warmup",
        type=_non_negative_float,
        default=1.0,
        metavar="S",
        help="seconds not counted first (default %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help="seconds per call (default %(default)s)",
    )
    p.add_argument("--msgpack", action="store_true", help="send the arguments as MessagePack (converted once)")
    p.add_argument(
        "--max-in-flight",
        type=_positive_int,
        default=DEFAULT_MAX_IN_FLIGHT,
        metavar="N",
        help="open loop: calls awaiting a reply at most (default %(default)s)",
    )
    p.add_argument(
        "--processes", type=_positive_int, default=1, metavar="N", help="client processes sharing the load (default 1)"
    )
    p.add_argument("--uvloop", action=argparse.BooleanOptionalAction, help="run on uvloop (default: when installed)")
    p.add_argument(
        "--soak", action="store_true", help=f"a long run ({SOAK_COUNT:,} calls unless -n) reporting RSS and leftovers"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (shape below)")
    p.add_argument("--plot", metavar="FILE.png", help="write a latency histogram and throughput chart (natsrpc[plot])")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    return p


def run(args: argparse.Namespace) -> int:
    """Runs ``python -m natsrpc bench`` with parsed arguments; returns the exit code."""
    try:
        plan = plan_from_args(args)
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    progress = Progress(None if args.quiet else sys.stderr, plan.warmup)
    elapsed = 0.0

    def show(seconds: float, calls: int, errors: int) -> None:
        nonlocal elapsed
        elapsed = seconds
        progress.update(seconds, calls, errors)

    try:
        if plan.processes == 1:
            with runner(plan.uvloop) as loop_runner:
                stats = loop_runner.run(generate(plan, lambda s, seconds: show(seconds, s.calls, s.failed)))
        else:
            stats = run_processes(plan, show)
    except (CallError, WorkerFailed) as exc:
        progress.close()
        print(f"error {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    progress.update(elapsed, stats.calls, stats.failed, final=True)
    progress.close()
    sorted_seconds = sorted(stats.samples)  # one transient list of floats, for the report only
    report = summary(plan, stats, sorted_seconds)
    print(msgspec.json.encode(report).decode() if args.json else render(report))
    if args.plot:
        try:
            plot(args.plot, report, sorted_seconds)
        except (OSError, ValueError) as exc:
            print(f"error: cannot write the plot {args.plot}: {exc}", file=sys.stderr)
            return 1
    return 0
