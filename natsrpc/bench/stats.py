"""The figures of a load run: latencies, errors by type and a timeline, per process and merged; percentiles.

Latencies of successful calls are kept in an ``array('d')`` (8 bytes a call: 8 MB per million),
sorted once for the report; failed calls are counted by exception class name, not timed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import os
import random
import sys
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from typing import Final

PERCENTILES: Final = (50.0, 90.0, 99.0, 99.9)
"""The percentiles reported, as ``p50``, ``p90``, ``p99`` and ``p99_9``."""
TIMELINE_STEP: Final = 0.5
"""Seconds per timeline entry."""


def percentiles(sorted_samples: Sequence[float], ps: Sequence[float]) -> list[float]:
    """Returns the nearest-rank percentiles ``ps`` of ``sorted_samples``.

    The p-th percentile is the sample of 1-based rank ``ceil(p / 100 * n)`` (at least 1): the
    smallest sample with p% of all samples at or below it. No interpolation, so every figure is a
    measured value: p0 is the minimum, p100 the maximum, and one sample is every percentile.

    Args:
        sorted_samples: the samples in ascending order.
        ps: percentiles between 0 and 100 (``[50, 90, 99, 99.9]``).

    Raises:
        ValueError: there are no samples, they are not ascending, or a percentile is out of range.
    """
    n = len(sorted_samples)
    if n == 0:
        raise ValueError("percentiles of no samples")
    if any(b < a for a, b in itertools.pairwise(sorted_samples)):
        raise ValueError("samples must be sorted in ascending order")
    out = []
    for p in ps:
        if not 0 <= p <= 100:
            raise ValueError(f"percentile must be between 0 and 100, got {p!r}")
        # round() first: 99.9 * 1000 / 100 is 999.0000000000001 in floating point (rank 1000, not 999).
        rank = max(1, math.ceil(round(p * n / 100, 6)))
        out.append(sorted_samples[rank - 1])
    return out


@dataclasses.dataclass
class Soak:
    """Memory and leftovers of a soak run, in MiB and counts (summed over client processes).

    Attributes:
        rss_start: resident memory once connected.
        rss_middle: resident memory half-way (None until then).
        rss_end: resident memory after the last reply.
        pending_calls_end: ``client.pending_calls`` after the last reply (0: nothing leaked).
        tasks_start: asyncio tasks once connected, besides the one running the load.
        tasks_end: the same after the last reply (no more than at the start: nothing leaked).
    """

    rss_start: float = 0.0
    rss_middle: float | None = None
    rss_end: float = 0.0
    pending_calls_end: int = 0
    tasks_start: int = 0
    tasks_end: int = 0


@dataclasses.dataclass
class Stats:
    """The counted calls of one load generator, or of several merged; picklable, to cross processes.

    Attributes:
        start: ``time.perf_counter()`` at the end of the warm-up (this process's clock).
        wall_start: ``time.time()`` then, to line processes up.
        samples: seconds each successful call took, in finishing order.
        calls: calls finished (successful or not).
        failed: calls that raised.
        errors: exception class name -> count.
        late: open-loop sends more than ``natsrpc.bench.load.LATE_AFTER`` behind schedule.
        timeline: [calls, errors] finished in each ``TIMELINE_STEP`` seconds from ``start``.
        duration: seconds from ``start`` to the last reply.
        loop: ``"uvloop"`` or ``"asyncio"``.
        soak: memory and leftovers, with ``--soak``.
    """

    start: float = 0.0
    wall_start: float = 0.0
    samples: array[float] = dataclasses.field(default_factory=lambda: array("d"))
    calls: int = 0
    failed: int = 0
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    late: int = 0
    timeline: list[list[int]] = dataclasses.field(default_factory=list)
    duration: float = 0.0
    loop: str = "asyncio"
    soak: Soak | None = None
    reservoir: int | None = None
    """Keep at most this many latency samples (uniform reservoir sampling); None keeps all.

    Soak runs use it so the bench's own memory stays flat and RSS shows natsrpc's.
    """
    _seen: int = 0

    def use_reservoir(self, size: int) -> None:
        """Preallocates a ``size``-sample reservoir, so it costs no memory growth during the run."""
        self.reservoir = size
        self.samples = array("d", bytes(8 * size))
        self._seen = 0

    def _sample(self, value: float) -> None:
        assert self.reservoir is not None
        if self._seen < self.reservoir:
            self.samples[self._seen] = value
        else:
            slot = random.randrange(self._seen + 1)
            if slot < self.reservoir:
                self.samples[slot] = value
        self._seen += 1

    def finish_reservoir(self) -> None:
        """Trims an unfilled reservoir to the samples taken."""
        if self.reservoir is not None and self._seen < self.reservoir:
            del self.samples[self._seen :]

    def record(self, started: float, error: str | None) -> None:
        """Counts a call that started (or was scheduled) at ``started`` and has just finished."""
        end = time.perf_counter()
        self.calls += 1
        if error is None:
            if self.reservoir is None:
                self.samples.append(end - started)
            else:
                self._sample(end - started)
        else:
            self.failed += 1
            self.errors[error] += 1
        since = end - self.start
        if since > self.duration:
            self.duration = since
        self._add(int(since / TIMELINE_STEP), 1, error is not None)

    def _add(self, step: int, calls: int, errors: int) -> None:
        while len(self.timeline) <= step:
            self.timeline.append([0, 0])
        self.timeline[step][0] += calls
        self.timeline[step][1] += errors

    @classmethod
    def merge(cls, parts: Sequence[Stats]) -> Stats:
        """Returns the figures of ``parts`` (one per client process) combined, lined up by wall clock."""
        first = min(p.wall_start for p in parts)
        merged = cls(wall_start=first, loop=parts[0].loop)
        for p in parts:
            merged.samples.extend(p.samples)
            merged.calls += p.calls
            merged.failed += p.failed
            merged.errors.update(p.errors)
            merged.late += p.late
            merged.duration = max(merged.duration, p.wall_start - first + p.duration)
            offset = round((p.wall_start - first) / TIMELINE_STEP)
            for step, (calls, errors) in enumerate(p.timeline, offset):
                merged._add(step, calls, errors)
            if p.soak is not None:
                s = merged.soak = merged.soak or Soak(rss_middle=0.0)
                s.rss_start += p.soak.rss_start
                s.rss_middle = (s.rss_middle or 0.0) + (p.soak.rss_middle or p.soak.rss_end)
                s.rss_end += p.soak.rss_end
                s.pending_calls_end += p.soak.pending_calls_end
                s.tasks_start += p.soak.tasks_start
                s.tasks_end += p.soak.tasks_end
        return merged


def rss_mb() -> float:
    """Returns this process's resident memory in MiB (the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource  # Unix only, and /proc (Linux) is the usual source

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere


def other_tasks() -> int:
    """Returns how many asyncio tasks exist besides the one asking."""
    return len(asyncio.all_tasks()) - 1
