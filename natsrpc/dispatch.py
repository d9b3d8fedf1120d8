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
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

import structlog

Item = TypeVar("Item", bound=tuple[Any, ...])

log = structlog.get_logger("natsrpc.dispatch")


class Dispatcher(Generic[Item]):
    """Runs ``serve(*item)`` for submitted items (tuples), each as its own task, at most ``size`` at once.

    Args:
        size: the most items served at once (the concurrency limit).
        serve: the coroutine function that handles one item, called with the item's fields; it must
            not raise (log instead).
        refuse: called with each item still queued when :meth:`join` gives up (to answer it).
    """

    def __init__(
        self,
        size: int,
        serve: Callable[..., Coroutine[Any, Any, None]],
        refuse: Callable[[Item], None] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self._serve = serve
        self._refuse = refuse
        self._queue: deque[Item] = deque()
        self._running: set[asyncio.Task[None]] = set()
        self._done: asyncio.Event | None = None
        self._loop = asyncio.get_running_loop()
        self.active = 0
        """Items submitted and not finished: queued plus running."""

    def submit(self, item: Item) -> None:
        """Starts ``item`` in a task of its own now, or queues it while ``size`` are running."""
        self.active += 1
        if len(self._running) < self.size:
            self._start(item)
        else:
            self._queue.append(item)

    def _start(self, item: Item) -> None:
        task = self._loop.create_task(self._serve(*item))
        self._running.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self.active -= 1
        if not task.cancelled() and task.exception() is not None:
            log.error("request handling failed", error=repr(task.exception()))
        if self._queue:
            self._start(self._queue.popleft())
        elif self.active == 0 and self._done is not None:
            self._done.set()

    async def join(self, wait: float) -> int:
        """Waits up to ``wait`` seconds for every item to finish, then gives up on the rest.

        Items still queued are handed to ``refuse``; running ones are cancelled (their handlers see
        CancelledError) and awaited.

        Returns:
            How many items were still queued or running at the timeout.
        """
        if self.active:
            self._done = asyncio.Event()
            try:
                await asyncio.wait_for(self._done.wait(), wait)
            except TimeoutError:
                pass
        left = self.active
        queued, self._queue = list(self._queue), deque()
        self.active -= len(queued)
        for item in queued:
            if self._refuse is not None:
                self._refuse(item)
        running = list(self._running)
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)
        return left
