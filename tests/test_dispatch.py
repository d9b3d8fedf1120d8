"""natsrpc.dispatch and the host's use of it: one task per request, cancelled at its deadline or at
the end of a graceful stop's drain, against a real nats-server."""

from __future__ import annotations

import asyncio
import contextvars
import time

import nats
import pytest
from children import poll

import natsrpc
from natsrpc import Service, protocol, rpc
from natsrpc.context import deadline_header
from natsrpc.testing import serve

CANCEL_BUDGET = 0.1  # a handler is cancelled within 100 ms of its deadline

_scoped: contextvars.ContextVar[str] = contextvars.ContextVar("scoped", default="")


class Tasks(Service):
    """Handlers that show which task they run in and what asyncio features they can use."""

    name = "tasks"

    def __init__(self) -> None:
        super().__init__()
        self.tasks: list[asyncio.Task[object]] = []
        self.sessions: dict[asyncio.Task[object], str] = {}  # as async_scoped_session(scopefunc=current_task)
        self.cancelled: list[str] = []
        self.finally_ran: list[str] = []
        self.sync_saw_cancel = asyncio.Event()
        self.started = asyncio.Event()

    @rpc
    async def which(self, nap: float = 0.0) -> str:
        """Records its task, keeps per-task state, and returns whether the state was its own."""
        task = asyncio.current_task()
        assert task is not None
        self.tasks.append(task)
        mine = f"session-{len(self.tasks)}"
        assert task not in self.sessions, "a task scoped session leaked from another request"
        self.sessions[task] = mine
        await asyncio.sleep(nap)
        return "ok" if self.sessions[task] == mine else "shared"

    @rpc
    async def bounded(self) -> str:
        """Uses asyncio.timeout() inside the handler: it times out the inner wait only."""
        try:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(1)
        except TimeoutError:
            return "inner timeout"
        return "no timeout"

    @rpc
    async def group(self) -> list[int]:
        """Runs a TaskGroup inside the handler."""

        async def square(n: int) -> int:
            await asyncio.sleep(0)
            return n * n

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(square(n)) for n in range(4)]
        return [t.result() for t in tasks]

    @rpc
    async def scoped(self, value: str) -> str:
        """Sets a context variable; the next request must not see it."""
        seen = _scoped.get()
        _scoped.set(value)
        await asyncio.sleep(0)
        return seen

    @rpc
    async def hang(self, label: str) -> None:
        """Waits far past any deadline; records its cancellation and its finally."""
        self.started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.append(label)
            raise
        finally:
            self.finally_ran.append(label)

    @rpc
    def spin(self) -> str:
        """A plain def handler that polls current_call().cancelled until its deadline passes."""
        call = natsrpc.current_call()
        until = time.monotonic() + 10
        while not call.cancelled and time.monotonic() < until:
            time.sleep(0.005)
        if call.cancelled:
            self.loop.call_soon_threadsafe(self.sync_saw_cancel.set)
        return "done"

    async def setup(self) -> None:
        self.loop = asyncio.get_running_loop()


class TestOneTaskPerRequest:
    """Item 8: asyncio.current_task() differs between any two requests, sequential or concurrent."""

    async def test_sequential_and_concurrent_requests_get_their_own_task(self, client: natsrpc.Client) -> None:
        """20 sequential and 20 concurrent calls ran in 40 different tasks, each with its own task-scoped state."""
        service = Tasks()
        async with serve(client, service):
            proxy = client.call_service["tasks"]
            for _ in range(20):
                assert await proxy.which() == "ok"
            assert await asyncio.gather(*(proxy.which(0.01) for _ in range(20))) == ["ok"] * 20
        assert len({id(task) for task in service.tasks}) == 40

    async def test_asyncio_timeout_and_task_groups_work_in_handlers(self, client: natsrpc.Client) -> None:
        """asyncio.timeout() times out only the handler's inner wait; a TaskGroup runs; the next call is unharmed."""
        async with serve(client, Tasks()):
            proxy = client.call_service["tasks"]
            assert await proxy.bounded() == "inner timeout"
            assert await proxy.group() == [0, 1, 4, 9]
            assert await proxy.which() == "ok"

    async def test_context_variables_do_not_leak_between_requests(self, client: natsrpc.Client) -> None:
        """A context variable one request sets is unset in the next."""
        async with serve(client, Tasks(), max_concurrency=1):
            proxy = client.call_service["tasks"]
            assert await proxy.scoped("a") == ""
            assert await proxy.scoped("b") == ""


class TestCancelledAtTheDeadline:
    """Item 7: handlers still running at their deadline are cancelled; their slot is freed; no reply."""

    async def test_an_async_handler_is_cancelled_and_its_slot_freed(self, client: natsrpc.Client) -> None:
        """With one slot, a handler hanging past its 0.2 s deadline is cancelled (finally runs); the next call runs."""
        service = Tasks()
        async with serve(client, service, max_concurrency=1, max_queue=0) as host:
            started = time.monotonic()
            with pytest.raises(natsrpc.CallTimeout):
                await client.call_service["tasks"].options(timeout=0.2).hang("first")
            await poll(lambda: service.finally_ran == ["first"], "the handler's finally")
            assert time.monotonic() - started < 0.2 + CANCEL_BUDGET
            assert service.cancelled == ["first"]
            assert host.in_flight == 0
            assert await client.call_service["tasks"].which() == "ok"  # the slot is free again

    async def test_no_reply_is_sent_after_the_deadline(self, client: natsrpc.Client, nats_url: str) -> None:
        """A raw caller that waits past the deadline it sent gets no reply at all (neither result nor error).

        The deadline leaves the request 0.3 s to be admitted: one admitted after its deadline (a
        stalled machine) is answered 504 at once, which is another test's subject.
        """
        service = Tasks()
        async with serve(client, service):
            nc = await nats.connect(nats_url)
            try:
                headers = {protocol.DEADLINE: deadline_header(time.time() + 0.3)}
                with pytest.raises(nats.errors.TimeoutError):
                    await nc.request("svc.tasks.hang", b'{"label":"raw"}', timeout=0.8, headers=headers)
            finally:
                await nc.close()
        assert service.cancelled == ["raw"]

    async def test_a_sync_handler_sees_cancelled(self, client: natsrpc.Client) -> None:
        """A plain def handler sees current_call().cancelled turn true at its deadline."""
        service = Tasks()
        async with serve(client, service):
            with pytest.raises(natsrpc.CallTimeout):
                await client.call_service["tasks"].options(timeout=0.2).spin()
            await asyncio.wait_for(service.sync_saw_cancel.wait(), 2)


class TestDrainTimeout:
    """Item 7: handlers still running after a graceful stop's drain timeout are cancelled; callers get 503."""

    async def test_running_and_queued_requests_get_503(self, client: natsrpc.Client) -> None:
        """Stopping with drain_timeout=0.2 cancels the hanging handler (finally runs); both callers get 503."""
        service = Tasks()
        host = natsrpc.Host(client, [service], max_concurrency=1, max_queue=5, drain_timeout=0.2)
        await host.start()
        proxy = client.call_service["tasks"].options(timeout=10, retry=natsrpc.retry.NO_RETRIES)
        running = asyncio.ensure_future(proxy.hang("running"))
        await asyncio.wait_for(service.started.wait(), 5)
        queued = asyncio.ensure_future(proxy.hang("queued"))
        await poll(lambda: host.in_flight == 2, "both requests accepted")
        started = time.monotonic()
        await host.stop()
        assert time.monotonic() - started < 2
        for call in (running, queued):
            with pytest.raises(natsrpc.Unavailable):
                await asyncio.wait_for(call, 2)
        assert service.cancelled == ["running"]
        assert service.finally_ran == ["running"]
