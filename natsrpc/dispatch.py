"""Running request handlers: a bounded pool of worker tasks per instance, each request in its own context.

A task per request costs a Task object and a trip through the event loop before the handler starts.
A :class:`Pool` keeps up to ``size`` worker tasks that take requests from a queue back to back; each
request still runs in a fresh copy of the context, as a task of its own would (each step under
``Context.run``, see :func:`_finish`), so contextvars a handler sets never leak into the next
request. A handler's first step runs inline in the worker; most handlers finish in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, Protocol, TypeVar

import structlog

T = TypeVar("T")
Item = TypeVar("Item", bound=tuple[Any, ...])

log = structlog.get_logger("natsrpc.dispatch")


class _Step:
    """Passes one value a coroutine yielded (a future, or None) up to the task driving us."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, Any, Any]:
        return (yield self.value)


class _Watcher(Protocol):
    """Told when the coroutine driven by :func:`_finish` suspends and resumes."""

    def suspended(self) -> None: ...

    def resumed(self) -> None: ...


async def _finish(coro: Coroutine[Any, Any, T], ctx: contextvars.Context, yielded: Any, watcher: _Watcher | None) -> T:
    """Drives ``coro``, which suspended with ``yielded`` after its first step in ``ctx``, to completion.

    Each further step runs under ``ctx.run``, exactly as ``asyncio.Task`` drives a coroutine, inside
    the calling task, so context variables it sets stay in ``ctx``. Cancellation of the calling task
    reaches ``coro`` as usual. ``watcher`` hears each time ``coro`` suspends and resumes.
    """
    send, throw = coro.send, coro.throw
    while True:
        if watcher is not None:
            watcher.suspended()
        try:
            value, error = await _Step(yielded), None
        except BaseException as exc:  # thrown in by the task (e.g. cancellation): pass it on
            value, error = None, exc
        finally:
            if watcher is not None:
                watcher.resumed()
        try:
            yielded = ctx.run(send, value) if error is None else ctx.run(throw, error)
        except StopIteration as stop:
            result: T = stop.value
            return result


class Pool(Generic[Item]):
    """Up to ``size`` worker tasks running ``serve(*item)`` for submitted items (tuples), in order.

    Only as many workers are awake as the queue needs: one drains a burst back to back, and another
    is woken (or started) when the running handler suspends with items still queued. So a burst of
    quick requests costs one wake-up, and slow ones still run ``size`` at a time.

    Args:
        size: the most items served at once (the concurrency limit).
        serve: the coroutine function that handles one item, called with the item's fields; it must
            not raise (log instead).
    """

    def __init__(self, size: int, serve: Callable[..., Coroutine[Any, Any, None]]) -> None:
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        self.size = size
        self._serve = serve
        self._queue: deque[Item] = deque()
        self._idle: list[asyncio.Future[None]] = []
        self._workers: set[asyncio.Task[None]] = set()
        self._done: asyncio.Event | None = None
        self._awake = 0  # workers that will look at the queue again before they sleep
        self.active = 0
        """Items submitted and not finished: queued plus running."""

    def submit(self, item: Item) -> None:
        """Queues ``item``; wakes a worker unless one that will take it is already awake."""
        self.active += 1
        self._queue.append(item)
        if self._awake == 0:
            self._wake()

    def _wake(self) -> None:
        """Makes one more worker drain the queue: an idle one, or a new one while fewer than ``size``."""
        while self._idle:
            waiter = self._idle.pop()
            if not waiter.done():
                waiter.set_result(None)
                self._awake += 1
                return
        if len(self._workers) < self.size:
            self._awake += 1
            self._workers.add(asyncio.get_running_loop().create_task(self._work()))

    def suspended(self) -> None:
        """A worker's handler waits: wake another if items are queued and no one else will take them."""
        self._awake -= 1
        if self._queue and self._awake == 0:
            self._wake()

    def resumed(self) -> None:
        """A worker's handler runs again (and will drain the queue when it is done)."""
        self._awake += 1

    async def _work(self) -> None:
        queue, idle, serve, copy_context = self._queue, self._idle, self._serve, contextvars.copy_context
        loop = asyncio.get_running_loop()
        counted = True  # _wake counted this worker as awake
        try:
            while True:
                while queue:
                    coro = serve(*queue.popleft())
                    ctx = copy_context()
                    try:  # the first step inline, in the request's own context; most handlers finish in it
                        try:
                            yielded = ctx.run(coro.send, None)
                        except StopIteration:
                            pass
                        else:
                            await _finish(coro, ctx, yielded, self)
                    except Exception:
                        with contextlib.suppress(Exception):  # a broken log sink must not kill the worker
                            log.exception("request handling failed")
                    finally:
                        self.active -= 1
                        if self.active == 0 and self._done is not None:
                            self._done.set()
                waiter: asyncio.Future[None] = loop.create_future()
                idle.append(waiter)
                self._awake -= 1
                counted = False
                try:
                    await waiter
                finally:
                    counted = waiter.done() and not waiter.cancelled()  # woken: _wake counted us
        finally:
            if counted:
                self._awake -= 1
            self._workers.discard(asyncio.current_task())  # type: ignore[arg-type,unused-ignore]

    async def join(self, wait: float) -> int:
        """Waits up to ``wait`` seconds for every item to finish, then stops the workers.

        Returns:
            How many items were still queued or running at the timeout (their handlers are cancelled).
        """
        if self.active:
            self._done = asyncio.Event()
            try:
                await asyncio.wait_for(self._done.wait(), wait)
            except TimeoutError:
                pass
        left = self.active
        self._queue.clear()
        workers = list(self._workers)
        for task in workers:
            task.cancel()
        if workers:
            await asyncio.wait(workers)
        self.active = 0
        return left
