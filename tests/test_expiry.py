"""Tests of natsrpc.expiry: waiting calls fail at their deadlines, sharing one loop timer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import natsrpc
from natsrpc.expiry import TICKS_PER_SECOND, Expiry
from natsrpc.testing import serve
from services.kv import KV
from tests.test_client import Gate


def expired_at(loop: asyncio.AbstractEventLoop, failed: dict[str, float]) -> Any:
    """An ``expire`` callback that records, by subject, the loop time each future was failed at."""

    def expire(future: asyncio.Future[Any], subject: str) -> None:
        failed[subject] = loop.time()
        future.set_exception(TimeoutError(subject))

    return expire


class TestDeadlines:
    """A future fails at its deadline, never early, unless its call ended first."""

    async def test_a_future_fails_at_its_deadline_not_before(self) -> None:
        """Futures waiting 50 ms and 120 ms (added later, due sooner) fail at their deadlines, in order."""
        loop = asyncio.get_running_loop()
        failed: dict[str, float] = {}
        expiry = Expiry(loop, expired_at(loop, failed))
        started = loop.time()
        later, sooner = loop.create_future(), loop.create_future()
        expiry.add(later, "later", 0.12)
        expiry.add(sooner, "sooner", 0.05)  # added after, due before: the timer is moved earlier
        with pytest.raises(TimeoutError):
            await sooner
        with pytest.raises(TimeoutError):
            await later
        assert 0.05 <= failed["sooner"] - started < 0.05 + 0.03
        assert 0.12 <= failed["later"] - started < 0.12 + 0.03
        assert len(expiry) == 0

    async def test_deadlines_within_one_tick_are_met_each(self) -> None:
        """Futures due a few milliseconds apart, in one tick or two, each fail at their own deadline."""
        loop = asyncio.get_running_loop()
        failed: dict[str, float] = {}
        expiry = Expiry(loop, expired_at(loop, failed))
        started = loop.time()
        waits = {f"w{i}": 0.03 + i * 0.5 / TICKS_PER_SECOND for i in range(5)}  # half a tick apart
        futures = [loop.create_future() for _ in waits]
        for future, (subject, wait) in zip(futures, waits.items(), strict=True):
            expiry.add(future, subject, wait)
        await asyncio.gather(*futures, return_exceptions=True)
        for subject, wait in waits.items():
            assert wait <= failed[subject] - started < wait + 0.03, subject
        assert sorted(failed, key=failed.__getitem__) == list(waits)

    async def test_a_discarded_or_done_future_is_left_alone(self) -> None:
        """A future taken out of its bucket (its call ended), or done, is not failed at its deadline."""
        loop = asyncio.get_running_loop()
        failed: dict[str, float] = {}
        expiry = Expiry(loop, expired_at(loop, failed))
        discarded, done, waiting = loop.create_future(), loop.create_future(), loop.create_future()
        bucket = expiry.add(discarded, "discarded", 0.03)
        expiry.add(done, "done", 0.03)
        expiry.add(waiting, "waiting", 0.03)
        bucket.pop(discarded)
        done.set_result(None)
        with pytest.raises(TimeoutError):
            await waiting
        assert list(failed) == ["waiting"]
        assert not discarded.done()
        assert done.result() is None
        discarded.cancel()

    async def test_calls_due_in_one_tick_share_a_bucket(self) -> None:
        """A thousand futures added at once fall in one or two ticks' buckets, not a timer each."""
        loop = asyncio.get_running_loop()
        expiry = Expiry(loop, expired_at(loop, {}))
        futures = [loop.create_future() for _ in range(1000)]
        buckets = {id(expiry.add(future, "s", 5.0)) for future in futures}
        assert len(buckets) <= 2
        assert len(expiry) == 1000
        for future in futures:
            future.cancel()


class TestMemory:
    """The buckets kept stay within a bound of the futures waiting, however long the timeouts."""

    async def test_empty_buckets_of_long_timeouts_are_swept(self) -> None:
        """Twenty thousand calls with hour-long timeouts, each over at once, leave a bounded number of buckets."""
        loop = asyncio.get_running_loop()
        expiry = Expiry(loop, expired_at(loop, {}))
        waiting = [loop.create_future() for _ in range(10)]
        for future in waiting:
            expiry.add(future, "waiting", 3600.0)
        most = 0
        for i in range(20_000):  # a tick of its own each: a bucket each, emptied when the call ends
            future = loop.create_future()
            expiry.add(future, "s", 3600.0 + i / TICKS_PER_SECOND).pop(future)
            most = max(most, expiry.buckets)
        assert most <= 4096 + 2 * len(waiting) + 1
        assert len(expiry) == len(waiting)
        for future in waiting:
            future.cancel()


class TestClientCalls:
    """The client's calls wait on its Expiry: none is left in it once the calls have ended."""

    async def test_ended_calls_leave_nothing_behind(self, client: natsrpc.Client) -> None:
        """After successful calls and timed-out ones, the client's Expiry holds no future."""
        gate = Gate()
        async with serve(client, gate, KV()):
            try:
                slow = [client.call_service_async["clientgate"].options(timeout=0.1).wait() for _ in range(20)]
                results = await asyncio.gather(*slow, return_exceptions=True)
            finally:
                gate.release.set()
            await asyncio.gather(*(client.call_service["kv"].put(f"k{i}", "v") for i in range(200)))
        assert [type(result) for result in results] == [natsrpc.CallTimeout] * 20
        assert len(client._expiry) == 0
