"""Tests of natsrpc.SyncClient: blocking calls from many threads, futures, typed proxies, closing.

The services run on the test's event loop; everything that blocks (connecting, calling, closing
a SyncClient) runs in worker threads through ``asyncio.to_thread``, so the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from nats.aio.msg import Msg

import natsrpc
from natsrpc import Service, rpc
from natsrpc.errors import error_reply
from natsrpc.retry import RetryPolicy
from natsrpc.testing import serve
from services.kv import KV

THREADS = 10
CALLS_PER_THREAD = 100


class Arith(Service):
    """Answers that depend on every argument, so a mixed-up reply is caught."""

    name = "syncarith"

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    @rpc
    async def affine(self, thread: int, i: int) -> int:
        """Returns thread * 1000 + i * i."""
        return thread * 1000 + i * i

    @rpc
    async def wait(self) -> str:
        """Waits until the test releases it."""
        self.entered.set()
        await self.release.wait()
        return "released"


@pytest_asyncio.fixture
async def arith(client: natsrpc.Client) -> AsyncIterator[Arith]:
    """Arith and the example KV, hosted on the test's loop."""
    service = Arith()
    async with serve(client, service, KV()):
        yield service


@pytest_asyncio.fixture
async def sync_client(nats_url: str, arith: Arith) -> AsyncIterator[natsrpc.SyncClient]:
    """A SyncClient connected (in a worker thread) to the session server, closed after the test."""
    sync = await asyncio.to_thread(natsrpc.SyncClient, nats_url, timeout=5)
    try:
        yield sync
    finally:
        await asyncio.to_thread(sync.close)


def hammer(sync: natsrpc.SyncClient, thread: int) -> list[tuple[int, int]]:
    """Makes CALLS_PER_THREAD blocking calls; returns (expected, got) pairs."""
    arith = sync.call_service["syncarith"]
    return [(thread * 1000 + i * i, arith.affine(thread, i)) for i in range(CALLS_PER_THREAD)]


def run_threads(sync: natsrpc.SyncClient) -> tuple[list[tuple[int, int]], set[int]]:
    """Runs ``hammer`` in THREADS threads at once; returns all pairs and the thread idents used."""
    idents: set[int] = set()
    start = threading.Barrier(THREADS)

    def one(thread: int) -> list[tuple[int, int]]:
        idents.add(threading.get_ident())
        start.wait(5)  # all threads call at the same time
        return hammer(sync, thread)

    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(one, range(THREADS)))
    return [pair for result in results for pair in result], idents


class TestThreads:
    """One SyncClient serves many threads at once, each getting its own answers."""

    async def test_ten_threads_times_hundred_calls(self, sync_client: natsrpc.SyncClient) -> None:
        """10 threads x 100 blocking calls all return their own correct answer; nothing stays pending."""
        pairs, idents = await asyncio.to_thread(run_threads, sync_client)
        assert len(pairs) == THREADS * CALLS_PER_THREAD
        assert all(expected == got for expected, got in pairs)
        assert len(idents) == THREADS
        assert threading.get_ident() not in idents
        assert sync_client.client.pending_calls == 0


class TestCalls:
    """The blocking sugar, futures and typed proxies behave like the async client's."""

    async def test_call_service_async_returns_a_concurrent_future(
        self, sync_client: natsrpc.SyncClient, arith: Arith
    ) -> None:
        """call_service_async returns a concurrent.futures.Future that resolves to the answer."""

        def start() -> concurrent.futures.Future[str]:
            future: concurrent.futures.Future[str] = sync_client.call_service_async["syncarith"].wait()
            return future

        future = await asyncio.to_thread(start)
        assert isinstance(future, concurrent.futures.Future)
        assert not future.done()
        arith.release.set()
        assert await asyncio.wrap_future(future) == "released"

    async def test_many_futures_at_once(self, sync_client: natsrpc.SyncClient) -> None:
        """A hundred futures started from one thread resolve to their own answers."""

        def gather() -> list[int]:
            futures = [sync_client.call_service_async["syncarith"].affine(3, i) for i in range(100)]
            return [f.result(5) for f in futures]

        assert await asyncio.to_thread(gather) == [3000 + i * i for i in range(100)]

    async def test_typed_proxy(self, sync_client: natsrpc.SyncClient) -> None:
        """proxy(KV).put then .get blocks and returns the decoded value; a missing key is None."""

        def use_proxy() -> tuple[str | None, str | None]:
            kv = sync_client.proxy(KV)
            kv.put("sync-key", "sync-value")
            return kv.get("sync-key"), kv.get("no-such-key")

        assert await asyncio.to_thread(use_proxy) == ("sync-value", None)

    async def test_remote_errors_are_raised_in_the_calling_thread(self, sync_client: natsrpc.SyncClient) -> None:
        """A bad argument raises BadRequest in the thread that called, as the async client would."""

        def bad_call() -> None:
            sync_client.call_service["syncarith"].affine("not a number", 1)

        with pytest.raises(natsrpc.BadRequest, match="thread"):
            await asyncio.to_thread(bad_call)


class TestClose:
    """Closing fails what is pending and refuses new calls with ClientClosed."""

    async def test_use_after_close_raises_client_closed(self, nats_url: str, arith: Arith) -> None:
        """After close(), blocking calls, futures and proxies raise ClientClosed; close() twice is fine."""
        sync = await asyncio.to_thread(natsrpc.SyncClient, nats_url)
        assert await asyncio.to_thread(sync.call_service["syncarith"].affine, 1, 2) == 1004
        await asyncio.to_thread(sync.close)
        await asyncio.to_thread(sync.close)
        with pytest.raises(natsrpc.ClientClosed):
            sync.call_service["syncarith"].affine(1, 2)
        with pytest.raises(natsrpc.ClientClosed):
            sync.call_service_async["syncarith"].affine(1, 2)
        with pytest.raises(natsrpc.ClientClosed):
            sync.proxy(KV).get("a")

    async def test_close_fails_a_pending_future(self, nats_url: str, arith: Arith) -> None:
        """A call still waiting when the SyncClient closes ends with ClientClosed, not a hang."""
        sync = await asyncio.to_thread(natsrpc.SyncClient, nats_url)
        try:
            future = await asyncio.to_thread(lambda: sync.call_service_async["syncarith"].wait())
            await asyncio.wait_for(arith.entered.wait(), 5)  # the call is pending in the SyncClient
            assert not future.done()
        finally:
            await asyncio.to_thread(sync.close)
        with pytest.raises(natsrpc.ClientClosed):
            await asyncio.wrap_future(future)
        arith.release.set()

    async def test_close_ends_a_call_waiting_to_retry(self, client: natsrpc.Client, nats_url: str) -> None:
        """A call between retry attempts (1 s backoff) when close() runs ends with ClientClosed at once."""
        attempts = 0

        async def overloaded(msg: Msg) -> None:
            nonlocal attempts
            attempts += 1
            headers, body = error_reply(natsrpc.Overloaded("busy"))
            await client.nc.publish(msg.reply, body, headers=headers)

        sub = await client.nc.subscribe("svc.syncbusy.work", cb=overloaded)
        await client.nc.flush()
        slow_retries = RetryPolicy(max_attempts=5, initial_backoff=1.0, max_backoff=1.0, jitter=False)
        sync = await asyncio.to_thread(natsrpc.SyncClient, nats_url, timeout=10, retry=slow_retries)
        try:
            future = await asyncio.to_thread(lambda: sync.call_service_async["syncbusy"].work())
            async with asyncio.timeout(5):  # the 429 came back: the call now waits 1 s to retry
                while not (attempts == 1 and sync.client.pending_calls == 0):  # noqa: ASYNC110
                    await asyncio.sleep(0.001)
            start = time.perf_counter()
            await asyncio.to_thread(sync.close)
            with pytest.raises(natsrpc.ClientClosed):
                await asyncio.wait_for(asyncio.wrap_future(future), 5)
            elapsed = time.perf_counter() - start
        finally:
            await asyncio.to_thread(sync.close)
            await sub.unsubscribe()
        assert attempts == 1
        assert elapsed < 0.5, f"the call ended {elapsed:.3f} s after close()"

    async def test_close_while_threads_call(self, nats_url: str, arith: Arith) -> None:
        """Threads calling in a loop while another thread closes all end with ClientClosed, none hangs."""
        sync = await asyncio.to_thread(natsrpc.SyncClient, nats_url, timeout=10)
        calls = [0] * THREADS
        started = threading.Barrier(THREADS + 1)

        def call_until_closed(thread: int) -> BaseException:
            started.wait(5)
            while True:
                try:
                    sync.call_service["syncarith"].affine(thread, 1)
                except BaseException as exc:
                    return exc
                calls[thread] += 1

        def close_midway() -> list[BaseException]:
            with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
                outcomes = [pool.submit(call_until_closed, t) for t in range(THREADS)]
                started.wait(5)
                while min(calls) < 5:  # every thread is calling
                    time.sleep(0.001)
                sync.close()
                return [f.result(5) for f in outcomes]

        errors = await asyncio.to_thread(close_midway)
        assert [type(e) for e in errors] == [natsrpc.ClientClosed] * THREADS, errors

    async def test_context_manager_closes(self, nats_url: str, arith: Arith) -> None:
        """`with SyncClient(url) as c:` closes c on exit."""

        def use() -> natsrpc.SyncClient:
            with natsrpc.SyncClient(nats_url) as sync:
                assert sync.call_service["syncarith"].affine(0, 3) == 9
            return sync

        sync = await asyncio.to_thread(use)
        with pytest.raises(natsrpc.ClientClosed):
            sync.call_service["syncarith"].affine(0, 3)
