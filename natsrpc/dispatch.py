"""Running request handlers: one asyncio task per request, at most ``size`` at once, the rest queued.

Each request runs in a task of its own, as in any asyncio server: ``asyncio.current_task()`` differs
between any two requests, so libraries that scope state by task (SQLAlchemy's
``async_scoped_session(scopefunc=current_task)``), ``asyncio.timeout()`` and TaskGroups inside
handlers behave as they do elsewhere, and a request can be cancelled alone (at its deadline, or
when a graceful stop runs out of time). Beyond ``size`` running, requests wait in a FIFO queue
whose length the host bounds.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

from natsrpc import logs

T = TypeVar("T")
Item = TypeVar("Item", bound=tuple[Any, ...])

log = logs.get_logger("natsrpc.dispatch")


class _Step:
    """Passes one value a coroutine yielded (a future, or None) up to the task driving us."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, Any, Any]:
        return (yield self.value)


async def resume(coro: Coroutine[Any, Any, T], yielded: Any, context: contextvars.Context | None = None) -> T:
    """Drives ``coro``, whose first step the caller ran (it yielded ``yielded``), to completion.

    Each further step runs as ``asyncio.Task`` would run it, inside the calling task (so
    cancelling the task cancels ``coro``), in the task's context or in ``context``. A caller runs
    the first step itself when most coroutines finish in it: those then cost no timer and no frame
    of this function.
    """
    send: Callable[[Any], Any]
    throw: Callable[[BaseException], Any]
    if context is None:
        send, throw = coro.send, coro.throw
    else:
        run = context.run

        def send(value: Any) -> Any:
            return run(coro.send, value)

        def throw(exc: BaseException) -> Any:
            return run(coro.throw, exc)

    while True:
        try:
            value = await _Step(yielded)
        except BaseException as exc:  # thrown in by the task (e.g. cancellation): pass it on
            try:
                yielded = throw(exc)
            except StopIteration as stop:
                result: T = stop.value
                return result
        else:
            try:
                yielded = send(value)
            except StopIteration as stop:
                result = stop.value
                return result


class Drains:
    """Counts the items taken in and not finished (``active``), and waits for none to be left.

    A subclass sets ``_idle`` when ``active`` drops to 0 while it is not None (a stop is waiting).
    """

    def __init__(self) -> None:
        self.active = 0
        """Items taken in and not finished: queued plus running."""
        self._idle: asyncio.Event | None = None

    async def wait_idle(self, wait: float) -> bool:
        """Waits up to ``wait`` seconds for every item to finish; returns whether they all did."""
        if self.active:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), wait)
            except TimeoutError:
                return False
        return True


class Dispatcher(Drains, Generic[Item]):
    """Runs ``serve(*item)`` for submitted items (tuples), each as its own task, at most ``size`` at once.

    Args:
        size: the most items served at once (the concurrency limit).
        serve: the coroutine function that handles one item, called with the item's fields; it must
            not raise (log instead), and must call :meth:`finished` as its last step.
        refuse: called with each item still queued when :meth:`cancel` gives up on it (to answer it).
    """

    def __init__(
        self,
        size: int,
        serve: Callable[..., Coroutine[Any, Any, None]],
        refuse: Callable[[Item], None] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        super().__init__()
        self.size = size
        self._serve = serve
        self._refuse = refuse
        self._queue: deque[Item] = deque()
        self._running: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()

    def submit(self, item: Item) -> None:
        """Starts ``item`` in a task of its own now, or queues it while ``size`` are running."""
        self.active += 1
        if len(self._running) < self.size:
            self._start(item)
        else:
            self._queue.append(item)

    def _start(self, item: Item) -> None:
        self._running.add(self._loop.create_task(self._serve(*item)))

    def finished(self) -> None:
        """Called by ``serve`` as its last step (in its ``finally``), in the task that served the item.

        Cheaper than a done callback, which costs one more trip through the event loop per request.
        """
        self._running.discard(asyncio.current_task())  # type: ignore[arg-type,unused-ignore]
        self.active -= 1
        if self._queue:
            self._start(self._queue.popleft())
        elif self.active == 0 and self._idle is not None:
            self._idle.set()

    def withdraw(self, match: Callable[[Item], bool]) -> bool:
        """Drops the first queued item ``match`` accepts (its caller cancelled it); returns whether one was."""
        for item in self._queue:
            if match(item):
                self._queue.remove(item)
                self.active -= 1
                if self.active == 0 and self._idle is not None:
                    self._idle.set()
                return True
        return False

    async def cancel(self) -> int:
        """Gives up on what is left: queued items go to ``refuse``, running ones are cancelled (their
        handlers see CancelledError) and awaited.

        Returns:
            How many items were still queued or running.
        """
        left = self.active
        queued, self._queue = list(self._queue), deque()
        for item in queued:
            if self._refuse is not None:
                self._refuse(item)
        running = list(self._running)
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)
        self._running.clear()  # a task cancelled before its first step never called finished()
        self.active = 0
        return left
