"""natsrpc vs raw nats-py request/reply vs nats-py's ``nats.micro``, interleaved in one run.

Usage:  python bench/compare.py [--rounds 5] [--duration 2] [--concurrency 1 10 100]
                                [--encodings json msgpack] [--loops asyncio uvloop]
                                [--observe [--sample 0.1]]

For each event loop, the responders (a natsrpc ``echo`` service, a raw nats-py responder and a
``nats.micro`` endpoint) run in a second process on that loop; this process, on the same loop,
drives closed-loop load at each concurrency and encoding, rotating the contenders' order each
round, and prints median throughput, p99 latency and the ratios to raw nats-py. Absolute numbers
drift on shared machines; the ratios measured side by side are the figures to quote. "ratio by
round" is the median (and range) of each round's ratio to raw nats-py measured in that same round,
seconds apart: the figure least moved by the machine's drift over a run.

Below each table it prints how the machine's CPU went during the run (``/proc/stat``): time stolen
by the hypervisor means other guests took CPU, and the figures drift.

``--observe`` adds a fourth contender, "natsrpc observed": a client and a host (in the responder
process) with the Prometheus ``Metrics`` and OpenTelemetry ``Tracing`` middleware, the SDK set up
in both processes as production runs it (a parent-based ``--sample`` ratio sampler at the root,
0.1 by default) with an exporter that drops the spans, and a fifth, "natsrpc observed, no spans":
the same middleware on a tracer provider that samples no trace (natsrpc's own work, every
``traceparent`` made and read, its metrics, and no span). It also prints the CPU each side spends
per call, and splits what observing adds: natsrpc's own (no spans, against plain) and the SDK's
spans as they run in the call (observed, against no spans), beside the SDK's cost for the two spans
of a sampled call measured alone in the same run (times the ratio: only sampled traces ask the SDK
for spans). It prints the nats-server's CPU per call too, and "cores busy": calls/s times the CPU
of an observed call, all three processes. Where that is the number of cores, throughput is bound by
CPU, and "observed without natsrpc's own" is the ratio the observed contender would reach if
natsrpc's own part of observing cost nothing: what is left is the SDK's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import os
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
OBSERVED = "natsrpc observed"
NO_SPANS = "natsrpc observed, no spans"


class Echo(Service):
    """Returns its argument."""

    name = "echo"
    version = "1.0.0"

    @rpc
    async def echo(self, value: str) -> str:
        """Returns ``value``."""
        return value


class ObservedEcho(Echo):
    """The same echo, hosted with the metrics and tracing middleware."""

    name = "echoobs"


class UnsampledEcho(Echo):
    """The same echo, hosted with the metrics and tracing middleware on a provider that samples nothing."""

    name = "echonospans"


def observability(sample: float) -> list[Any]:
    """Sets up the OpenTelemetry SDK (parent-based ratio sampler, spans dropped) and returns the
    middleware: Prometheus metrics and tracing."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from natsrpc.observe.metrics import Metrics
    from natsrpc.observe.tracing import Tracing

    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(sample)))
    provider.add_span_processor(SimpleSpanProcessor(dropped_exporter()))
    trace.set_tracer_provider(provider)
    return [Metrics(), Tracing()]


def observability_without_spans() -> list[Any]:
    """The same middleware as :func:`observability`, on a provider whose sampler keeps no trace:
    natsrpc's own work of observing, without the SDK's spans."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from natsrpc.observe.metrics import Metrics
    from natsrpc.observe.tracing import Tracing

    return [Metrics(), Tracing(TracerProvider(sampler=ParentBased(TraceIdRatioBased(0))))]


def dropped_exporter() -> Any:
    """An OpenTelemetry span exporter that drops every span."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class Dropped(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    return Dropped()


async def serve(url: str, observe: bool, sample: float) -> None:
    """Runs the three responders (four with ``observe``) until stdin closes."""
    natsrpc.logs.configure("console", "warning")
    nc = await nats.connect(url)
    observed_hosts: list[natsrpc.Host] = []
    if observe:
        for echo, middleware in (
            (ObservedEcho(), observability(sample)),
            (UnsampledEcho(), observability_without_spans()),
        ):
            connection = await natsrpc.connect(url, middleware=middleware)
            host = natsrpc.Host(connection, [echo], max_concurrency=1000, max_queue=10000, middleware=middleware)
            await host.start()
            observed_hosts.append(host)
        gc.freeze()  # as the runner does once started: the collector leaves start-up's objects alone

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
    for host in observed_hosts:
        await host.stop()
        await host.client.close()
    await nc.drain()


def cpu_seconds(pid: int) -> float:
    """The CPU time (user + system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_pid(server: natsrpc.NatsServer) -> int:
    """The pid of the nats-server process itself (a tethered server runs under a keeper process)."""
    assert server.process is not None
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = children.read_text().split() if children.exists() else []
    return int(found[0]) if server.tethered and found else pid


Result = tuple[float, float, float, float, float]
"""calls/s, p99 latency s, client CPU s per call, responder CPU s per call, nats-server CPU s per call."""


async def closed_loop(
    call: Callable[[], Awaitable[object]], concurrency: int, duration: float, responder: int = 0, server: int = 0
) -> Result:
    """Runs ``concurrency`` workers calling back-to-back for ``duration`` s."""
    latencies: list[float] = []
    stop = time.perf_counter() + duration
    cpu, served = time.process_time(), cpu_seconds(responder) if responder else 0.0
    routed = cpu_seconds(server) if server else 0.0

    async def worker() -> None:
        while (start := time.perf_counter()) < stop:
            await call()
            latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    n = len(latencies)
    client_cpu = (time.process_time() - cpu) / n
    responder_cpu = (cpu_seconds(responder) - served) / n if responder else 0.0
    server_cpu = (cpu_seconds(server) - routed) / n if server else 0.0
    latencies.sort()
    return n / elapsed, latencies[max(0, int(n * 0.99) - 1)], client_cpu, responder_cpu, server_cpu


def calls(
    client: natsrpc.Client, nc: Any, encoding: str, observed: tuple[natsrpc.Client, natsrpc.Client] | None = None
) -> dict[str, Callable[[], Awaitable[object]]]:
    """Returns one call of each contender, sending the same arguments in ``encoding``."""
    msgpack = encoding == "msgpack"
    body = natsrpc.codec.encode([PAYLOAD], msgpack)
    headers = {"Content-Type": "application/msgpack"} if msgpack else None
    echo = client.call_service["echo"].options(encoding=encoding).echo

    async def raw() -> object:
        return await nc.request(RAW_SUBJECT, body, timeout=5, headers=headers)

    async def micro() -> object:
        return await nc.request(MICRO_SUBJECT, body, timeout=5, headers=headers)

    contenders: dict[str, Callable[[], Awaitable[object]]] = dict(
        zip(CONTENDERS, (_echo_call(echo), raw, micro), strict=True)
    )
    if observed is not None:
        for name, caller, service in ((OBSERVED, observed[0], "echoobs"), (NO_SPANS, observed[1], "echonospans")):
            contenders[name] = _echo_call(caller.call_service[service].options(encoding=encoding).echo)
    return contenders


def _echo_call(echo: Any) -> Callable[[], Awaitable[object]]:
    async def call() -> object:
        return await echo(PAYLOAD)

    return call


Results = dict[tuple[str, str, int], list[Result]]


async def measure(url: str, args: argparse.Namespace, responder: int, server: int) -> Results:
    """Measures every contender at every encoding and concurrency, rotating their order each round."""
    nc = await nats.connect(url)
    results: Results = {}
    middleware = observability(args.sample) if args.observe else []
    unsampled = observability_without_spans() if args.observe else []
    async with (
        natsrpc.connect(url) as client,
        natsrpc.connect(url, middleware=middleware) as observed,
        natsrpc.connect(url, middleware=unsampled) as without_spans,
    ):
        if args.observe:
            gc.freeze()
        for encoding in args.encodings:
            contenders = calls(client, nc, encoding, (observed, without_spans) if args.observe else None)
            for call in contenders.values():  # warm up every path
                await closed_loop(call, 10, 0.3)
            names = list(contenders)
            for round_no in range(args.rounds):
                order = names[round_no % len(names) :] + names[: round_no % len(names)]
                for concurrency in args.concurrency:
                    for name in order:
                        result = await closed_loop(contenders[name], concurrency, args.duration, responder, server)
                        results.setdefault((encoding, name, concurrency), []).append(result)
                print(f"{encoding}: round {round_no + 1}/{args.rounds} done", file=sys.stderr)
    await nc.drain()
    if args.observe:
        results[("", "sdk span s", 0)] = [(sdk_span_cost(), 0.0, 0.0, 0.0, 0.0)]
    return results


def sdk_span_cost(n: int = 5_000) -> float:
    """CPU seconds the SDK and the API take for the two spans of one sampled call, measured alone:
    the CLIENT span (a new trace, started with its attributes, made current, ended) and the SERVER
    span under it (the remote parent's context built, as the W3C propagator does, the span started,
    made current, ended). Made on a provider like the benchmark's, sampling every trace.

    With ``Tracing`` only a sampled trace asks anything of the SDK (a trace that is not sampled is
    decided without it), so the SDK's share of an observed call is this times the sampling ratio.
    """
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider()  # the SDK's default: ParentBased(ALWAYS_ON)
    provider.add_span_processor(SimpleSpanProcessor(dropped_exporter()))
    tracer = provider.get_tracer("bench")
    attributes = {"rpc.system": "natsrpc", "rpc.service": "echoobs", "rpc.method": "echo", "natsrpc.caller": "client"}
    empty = otel_context.Context()
    started = time.process_time()
    for _ in range(n):
        span = tracer.start_span("echoobs/echo", None, trace.SpanKind.CLIENT, attributes)
        token = otel_context.attach(trace.set_span_in_context(span))
        otel_context.detach(token)
        span.end()
        sent = span.get_span_context()
        remote = trace.SpanContext(sent.trace_id, sent.span_id, True, sent.trace_flags)
        parent = trace.set_span_in_context(trace.NonRecordingSpan(remote), empty)
        server = tracer.start_span("echoobs/echo", parent, trace.SpanKind.SERVER, attributes)
        token = otel_context.attach(trace.set_span_in_context(server, parent))
        otel_context.detach(token)
        server.end()
    elapsed = (time.process_time() - started) / n
    provider.shutdown()
    return elapsed


def table(results: Results, loop_name: str, args: argparse.Namespace) -> str:
    """Returns the results as a Markdown table with ratios to raw nats-py."""
    lines = [
        f"echo of a 64-byte string, {loop_name} loop on both sides, "
        f"median of {args.rounds} interleaved rounds of {args.duration} s",
        "",
        "| encoding | concurrency | contender | calls/s | ratio to raw | p99 ms | p99 ratio | ratio by round |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    names = (*CONTENDERS, NO_SPANS, OBSERVED) if args.observe else CONTENDERS
    for encoding in args.encodings:
        for concurrency in args.concurrency:
            raw = results[(encoding, "raw nats-py", concurrency)]
            raw_rps = statistics.median(r[0] for r in raw)
            raw_p99 = statistics.median(r[1] for r in raw)
            for name in names:
                runs = results[(encoding, name, concurrency)]
                rps = statistics.median(r[0] for r in runs)
                p99 = statistics.median(r[1] for r in runs)
                # Each round measures every contender within seconds: its ratio to that round's raw
                # is the least touched by the machine's drift over the run.
                by_round = sorted(r[0] / q[0] for r, q in zip(runs, raw, strict=True))
                lines.append(
                    f"| {encoding} | {concurrency} | {name} | {rps:,.0f} | {rps / raw_rps:.2f} | "
                    f"{p99 * 1e3:.2f} | {p99 / raw_p99:.2f} | "
                    f"{statistics.median(by_round):.2f} ({by_round[0]:.2f}-{by_round[-1]:.2f}) |"
                )
    if args.observe:
        lines += ["", *observed_cost(results, args)]
    return "\n".join(lines)


def observed_cost(results: Results, args: argparse.Namespace) -> list[str]:
    """The CPU per call of each natsrpc contender on each side, and what observing adds: natsrpc's
    own (no spans against plain) and the SDK's spans in the call (observed against no spans),
    beside the SDK's pair measured alone; and what the observed ratio would be without natsrpc's own
    part, when the cores are what limits throughput (all of them busy: calls/s times the CPU of a
    call, the nats-server's included, is the number of cores)."""
    pair = results[("", "sdk span s", 0)][0][0]
    sdk = pair * args.sample  # only sampled traces ask the SDK for spans
    lines = [
        f"CPU per call, µs, both processes (sample ratio {args.sample:g}; the SDK's two spans of a sampled call, "
        f"measured alone: {pair * 1e6:.1f}, so {sdk * 1e6:.1f} per call at this ratio; the metrics are natsrpc's "
        "own code, prometheus-client runs only when scraped). 'cores busy' is calls/s times the CPU of an observed "
        f"call, the nats-server's included ({os.cpu_count()} cores here); when it is the number of cores, 'observed "
        "without natsrpc's own' is the ratio to raw that the observed contender would reach if natsrpc's own part "
        "cost nothing (its ratio times its CPU per call over that CPU less natsrpc's own):",
        "",
        "| encoding | concurrency | client plain | client no spans | client observed | responder plain "
        "| responder no spans | responder observed | nats-server | natsrpc's own | the SDK's spans in the call "
        "| the SDK's alone | cores busy | observed without natsrpc's own |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for encoding in args.encodings:
        for concurrency in args.concurrency:

            def cpu(name: str, side: int, key: tuple[str, int] = (encoding, concurrency)) -> float:
                return statistics.median(r[side] for r in results[(key[0], name, key[1])])

            client = [cpu(name, 2) for name in ("natsrpc", NO_SPANS, OBSERVED)]
            responder = [cpu(name, 3) for name in ("natsrpc", NO_SPANS, OBSERVED)]
            server = cpu(OBSERVED, 4)
            own = (client[1] - client[0]) + (responder[1] - responder[0])
            spans = (client[2] - client[1]) + (responder[2] - responder[1])
            total = client[2] + responder[2] + server
            rps, raw_rps = cpu(OBSERVED, 0), cpu("raw nats-py", 0)
            without_own = rps / raw_rps * total / (total - own) if total > own else float("nan")
            cells = [f"{value * 1e6:.1f}" for value in (*client, *responder, server, own, spans, sdk)]
            cells += [f"{rps * total:.2f}", f"{without_own:.2f}"]
            lines.append(f"| {encoding} | {concurrency} | " + " | ".join(cells) + " |")
    return lines


def run_loop(loop_name: str, args: argparse.Namespace) -> str:
    """Starts a server and the responders on ``loop_name``, measures, and returns the table."""
    with natsrpc.NatsServer() as server:
        observe = ["--observe", "--sample", str(args.sample)] if args.observe else []
        responders = subprocess.Popen(
            [sys.executable, __file__, "--serve", server.url, "--loops", loop_name, *observe],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert responders.stdin is not None
        assert responders.stdout is not None
        try:
            if responders.stdout.readline().strip() != "ready":
                raise SystemExit("the responders did not start")
            before = machine_ticks()
            with runner(loop_name) as loop:
                results = loop.run(measure(server.url, args, responders.pid, server_pid(server)))
            spent = [after - then for then, after in zip(before, machine_ticks(), strict=True)]
        finally:
            responders.stdin.close()
            responders.wait(10)
    return table(results, loop_name, args) + "\n\n" + machine_share(spent)


_TICKS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_ticks() -> list[int]:
    """The machine's CPU time so far, by kind (``/proc/stat``: user, nice, system, idle, ..., steal)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return [int(value) for value in fields[: len(_TICKS)]]


def machine_share(spent: list[int]) -> str:
    """How the machine's CPU went during the run: a busy or stolen machine makes the ratios noisy."""
    total = sum(spent) or 1
    shares = dict(zip(_TICKS, (100 * n / total for n in spent), strict=True))
    return (
        f"The machine's CPU during the run: user {shares['user'] + shares['nice']:.0f}%, system "
        f"{shares['system'] + shares['irq'] + shares['softirq']:.0f}%, idle {shares['idle'] + shares['iowait']:.0f}%, "
        f"stolen by the hypervisor {shares['steal']:.0f}% (over 5%: other guests took CPU, the figures drift)."
    )


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
    parser.add_argument("--observe", action="store_true", help="add natsrpc with metrics and tracing on")
    parser.add_argument("--sample", type=float, default=0.1, help="the root sampling ratio with --observe")
    args = parser.parse_args()
    natsrpc.logs.configure("console", "warning")
    if args.serve:
        with runner(args.loops[0]) as loop:
            loop.run(serve(args.serve, args.observe, args.sample))
        return
    loops = [name for name in args.loops if name != "uvloop" or importlib.util.find_spec("uvloop")]
    for loop_name in loops:
        print(run_loop(loop_name, args), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
