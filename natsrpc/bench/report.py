"""What a load run shows: the live progress line, the report (as JSON or text) and the optional plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final, TextIO

from natsrpc.bench.load import Plan
from natsrpc.bench.stats import PERCENTILES, TIMELINE_STEP, Stats, percentiles

PERCENTILE_KEYS: Final = ("p50", "p90", "p99", "p99_9")
"""The ``latency_ms`` keys of :data:`natsrpc.bench.stats.PERCENTILES`."""
PROGRESS_EVERY: Final = 0.5
"""Seconds between progress lines."""


class Progress:
    """The live progress line: rewritten in place on a terminal, one line per update otherwise.

    Args:
        stream: where to write (None: nowhere).
        warmup: seconds of warm-up, marked on the line.
    """

    def __init__(self, stream: TextIO | None, warmup: float = 0.0) -> None:
        self.stream = stream
        self.tty = stream is not None and stream.isatty()
        self.warmup = warmup
        self._last = (0.0, 0)
        self._width = 0

    def update(self, elapsed: float, calls: int, errors: int, final: bool = False) -> None:
        """Shows the figures at ``elapsed`` seconds: every ``PROGRESS_EVERY`` seconds, and the ``final`` ones."""
        last_elapsed, last_calls = self._last
        if self.stream is None or elapsed <= last_elapsed or (elapsed - last_elapsed < PROGRESS_EVERY and not final):
            return
        rps = (calls - last_calls) / (elapsed - last_elapsed)
        self._last = (elapsed, calls)
        line = f"{elapsed:7.1f} s  calls {calls:>10}  rps {rps:>9.0f}  errors {errors}"
        if elapsed < self.warmup:
            line += "  (warm-up)"
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Ends the rewritten line (on a terminal)."""
        if self.stream is not None and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


def summary(plan: Plan, stats: Stats, sorted_seconds: Sequence[float]) -> dict[str, Any]:
    """Returns the report of a run: the JSON object documented in :mod:`natsrpc.bench`.

    Args:
        plan: the whole run's plan.
        stats: its figures (merged over processes).
        sorted_seconds: ``stats.samples`` in ascending order.
    """
    latency: dict[str, float | None] = dict.fromkeys([*PERCENTILE_KEYS, "max", "mean"])
    if sorted_seconds:
        figures = [*percentiles(sorted_seconds, PERCENTILES), sorted_seconds[-1]]
        latency.update({k: round(v * 1e3, 3) for k, v in zip([*PERCENTILE_KEYS, "max"], figures, strict=True)})
        latency["mean"] = round(math.fsum(sorted_seconds) / len(sorted_seconds) * 1e3, 3)
    soak = stats.soak
    return {
        "target": f"{plan.service}.{plan.method}",
        "mode": "closed" if plan.rate is None else "open",
        "concurrency": plan.concurrency,
        "rate": plan.rate,
        "processes": plan.processes,
        "loop": stats.loop,
        "duration_s": round(stats.duration, 3),
        "calls": stats.calls,
        "ok": stats.calls - stats.failed,
        "errors": dict(stats.errors.most_common()),
        "late": stats.late,
        "rps": round(stats.calls / stats.duration, 1) if stats.duration > 0 else 0.0,
        "latency_ms": latency,
        "timeline": [
            {"t": round(i * TIMELINE_STEP, 3), "calls": calls, "errors": errors}
            for i, (calls, errors) in enumerate(stats.timeline)
        ],
        "soak": None
        if soak is None
        else {
            "rss_mb": {
                "start": round(soak.rss_start, 1),
                "middle": round(soak.rss_middle or soak.rss_end, 1),
                "end": round(soak.rss_end, 1),
            },
            "pending_calls_end": soak.pending_calls_end,
            "tasks_start": soak.tasks_start,
            "tasks_end": soak.tasks_end,
        },
    }


def render(report: dict[str, Any]) -> str:
    """Returns a :func:`summary` as text for people."""
    how = f"concurrency {report['concurrency']}" if report["mode"] == "closed" else f"rate {report['rate']:g}/s"
    procs = report["processes"]
    late = f", {report['late']} sent late" if report["mode"] == "open" else ""
    lines = [
        f"target   {report['target']}  ({report['mode']} loop, {how}, {procs} process{'es' * (procs > 1)}, "
        f"{report['loop']})",
        f"calls    {report['calls']} in {report['duration_s']:.2f} s = {report['rps']:.1f}/s"
        f"  ({report['ok']} ok, {report['calls'] - report['ok']} failed{late})",
    ]
    lat = report["latency_ms"]
    if lat["max"] is None:
        lines.append("latency  no call succeeded")
    else:
        labels = ("p50", "p90", "p99", "p99.9", "max", "mean")
        figures = "  ".join(f"{label} {lat[key]:.3f}" for label, key in zip(labels, lat, strict=True))
        lines.append(f"latency  {figures}  ms")
    errors = report["errors"] or {"none": ""}
    for i, (name, count) in enumerate(errors.items()):
        lines.append(f"{'errors' if i == 0 else '':<8} {name} {count}".rstrip())
    soak = report["soak"]
    if soak is not None:
        rss = soak["rss_mb"]
        lines.append(
            f"soak     RSS {rss['start']} -> {rss['middle']} -> {rss['end']} MiB, "
            f"pending calls {soak['pending_calls_end']}, tasks {soak['tasks_start']} -> {soak['tasks_end']}"
        )
    return "\n".join(lines)


def plot(path: str, report: dict[str, Any], sorted_seconds: Sequence[float]) -> None:
    """Writes a PNG: the latency histogram (log scale) and calls and errors per second over time.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'natsrpc[plot]'``).
        OSError: the file cannot be written.
    """
    from matplotlib.figure import Figure  # optional (natsrpc[plot]); a bare Figure needs no pyplot or backend

    fig = Figure(figsize=(11, 4), layout="constrained")
    hist, tput = fig.subplots(1, 2)
    if sorted_seconds:
        ms = [s * 1e3 for s in sorted_seconds]
        lo = max(ms[0], 1e-3)
        hi = max(ms[-1], lo * 1.01)
        hist.hist(ms, bins=[lo * (hi / lo) ** (i / 80) for i in range(81)], color="tab:blue")
        hist.set_xscale("log")
        for key, style in (("p50", "--"), ("p99", ":")):
            value = report["latency_ms"][key]
            hist.axvline(value, color="black", linestyle=style, label=f"{key} {value:.3f} ms")
        hist.legend()
    hist.set(title="latency of successful calls", xlabel="ms (log scale)", ylabel="calls")
    timeline = report["timeline"]
    if timeline:  # one more point, so the last step is drawn as wide as the others
        times = [e["t"] for e in timeline] + [timeline[-1]["t"] + TIMELINE_STEP]
        for key, label in (("calls", "calls/s"), ("errors", "errors/s")):
            values = [e[key] / TIMELINE_STEP for e in timeline]
            tput.plot(times, [*values, values[-1]], label=label, drawstyle="steps-post")
        tput.legend()
    tput.set(title="throughput", xlabel="seconds after warm-up", ylabel="per second")
    tput.set_ylim(bottom=0)
    fig.suptitle(f"natsrpc bench {report['target']}: {report['calls']} calls, {report['rps']:.0f}/s")
    fig.savefig(path, dpi=100)
