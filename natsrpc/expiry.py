"""Deadlines of waiting calls: one loop timer for all of them, not one timer each.

A loop timer per call costs a ``TimerHandle``, a heap push and its cancellation (about 5 µs on
asyncio), paid by every call though almost none reaches its deadline. Here a call's future joins
the bucket of the 1/100 s tick its deadline falls in (a dict entry, taken out when the call
ends), and one timer, armed for the earliest deadline still waiting, fails what is due when it
fires: at its deadline, as a timer of its own would. A bucket left empty stays until its tick
has passed (most are refilled first), unless the empty ones pile up (long timeouts): then they are
swept, so the buckets kept stay within a bound of the calls waiting.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable
from typing import Any

TICKS_PER_SECOND = 100
"""How finely deadlines are grouped (not how precisely they are met)."""

_SWEEP_AT = 4096  # buckets kept, empty ones included, before the empty ones are swept
_EARLY = 1e-5  # the loop runs a timer up to its clock's resolution early: a future so close is due

Bucket = dict["asyncio.Future[Any]", tuple[str, float]]
"""The futures due in one tick, each with the subject it waits on (its timeout error names it)
and its deadline on the loop's clock."""


class Expiry:
    """Fails waiting futures at their deadlines, on one event loop.

    Args:
        loop: the loop the futures belong to (its clock is the one deadlines are on).
        expire: called as ``expire(future, subject)`` for each future still waiting at its deadline.
    """

    __slots__ = ("_armed", "_buckets", "_expire", "_loop", "_sweep_at", "_ticks", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, expire: Callable[[asyncio.Future[Any], str], None]) -> None:
        self._loop = loop
        self._expire = expire
        self._buckets: dict[int, Bucket] = {}  # tick -> the futures due in it
        self._ticks: list[int] = []  # the ticks that have a bucket, a heap
        self._timer: asyncio.TimerHandle | None = None
        self._armed = 0.0  # when the timer fires
        self._sweep_at = _SWEEP_AT  # buckets kept before the empty ones are swept

    def add(self, future: asyncio.Future[Any], subject: str, wait: float) -> Bucket:
        """Fails ``future`` (unless it is done) ``wait`` s from now.

        Returns:
            The bucket it is in: ``bucket.pop(future, None)`` once its call ended forgets it.
        """
        due = self._loop.time() + wait
        tick = int(due * TICKS_PER_SECOND)
        bucket = self._buckets.get(tick)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self._sweep()
            bucket = self._buckets[tick] = {}
            heapq.heappush(self._ticks, tick)
        bucket[future] = (subject, due)
        if self._timer is None or due < self._armed:
            self._arm(due)
        return bucket

    def __len__(self) -> int:
        """The futures waiting for a deadline."""
        return sum(len(bucket) for bucket in self._buckets.values())

    @property
    def buckets(self) -> int:
        """The buckets kept, empty ones included."""
        return len(self._buckets)

    def _sweep(self) -> None:
        """Forgets the empty buckets; the next sweep waits until the buckets kept have doubled."""
        self._buckets = {tick: bucket for tick, bucket in self._buckets.items() if bucket}
        self._ticks = list(self._buckets)
        heapq.heapify(self._ticks)
        self._sweep_at = 2 * len(self._buckets) + _SWEEP_AT

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        """Fails the futures that are due, forgets the ticks that have passed, and arms the timer for
        the earliest deadline left."""
        self._timer = None
        now = self._loop.time() + _EARLY
        ticks, buckets = self._ticks, self._buckets
        while ticks and ticks[0] / TICKS_PER_SECOND <= now:
            bucket = buckets[ticks[0]]
            for future in [future for future, (_, due) in bucket.items() if due <= now]:
                subject, _ = bucket.pop(future)
                if not future.done():
                    self._expire(future, subject)
            if bucket:  # due later in this tick: the timer is armed for it below
                break
            del buckets[heapq.heappop(ticks)]
        if ticks:
            head = buckets[ticks[0]]
            self._arm(min((due for _, due in head.values()), default=ticks[0] / TICKS_PER_SECOND))
