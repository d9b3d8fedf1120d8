"""The server side of events: each hosted instance's ``@event`` handlers, fed from ``evt.<pattern>``.

Pooled handlers subscribe in a queue group named after the service and handler, so each event
reaches one instance of each subscribing service (and each of its handlers that match).
Broadcast ones subscribe plainly, so every instance gets it. Each event runs as a task of its
instance's event pool: ``max_concurrency`` at once and ``max_event_queue`` waiting. Beyond that
an event is dropped, counted and logged: core NATS has no one to push back on.

A payload that does not fit the handler's annotation is logged with the event type and the
field, counted, and dropped; it is never retried. A handler that raises is logged and counted.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import msgspec

from natsrpc import context, logs, protocol
from natsrpc.dispatch import Drains, resume
from natsrpc.errors import BadRequest
from natsrpc.events.handlers import EventHandler

log = logs.get_logger("natsrpc.events")

_EVENT_HEAD = len(protocol.EVENT_PREFIX) + 1
DROP_LOG_EVERY = 1000  # an overloaded handler logs its first dropped event, then every 1000th


@dataclass(slots=True)
class EventStats:
    """Counters of one handler on one instance."""

    received: int = 0
    handled: int = 0
    failed: int = 0  # the handler raised
    invalid: int = 0  # the payload did not fit the annotation, or the Natsrpc-Caller header broke the rules
    dropped: int = 0  # the instance's event pool was full


class EventRoute:
    """One ``@event`` handler of one hosted instance: the bound method and its counters."""

    __slots__ = ("bound", "handler", "ignored", "label", "service", "stats", "where")

    def __init__(self, service: Any, label: str, handler: EventHandler) -> None:
        self.service = service
        self.label = label
        self.handler = handler
        self.bound = getattr(service, handler.attr)
        self.stats = EventStats()
        self.where = f"{service.name}.{handler.attr}"
        self.ignored = logs.Ignored(log)  # events dropped as invalid: a flood of them logs little

    def drop_invalid(self, event_type: str, why: str, **fields: Any) -> None:
        """Counts an event dropped as invalid (``stats.invalid``) and logs why, for the 1st, 2nd,
        4th... only: a peer publishing bad events cannot flood the log."""
        self.stats.invalid += 1
        self.ignored("event dropped: " + why, handler=self.where, event_type=event_type, **fields)


Item = tuple[EventRoute, str, bytes, "dict[str, str] | None", Any]
"""An event taken in: its route, subject, body, headers and, for a durable one, (message, consumer)."""


class EventPool(Drains):
    """Runs one instance's events, ``size`` at once and at most ``capacity`` taken in.

    Events run in up to ``size`` worker tasks, started as needed and kept. Each event runs in a
    context of its own (a fresh copy of the worker's first one), inside its worker's task, so
    ``current_call()``, context variables, ``asyncio.timeout()`` and task groups behave in a
    handler as in a task of its own; it costs no task per event, as a raw nats-py callback costs none.
    """

    def __init__(self, size: int, capacity: int, timeout: float) -> None:
        super().__init__()
        self.size = size
        self.capacity = capacity
        self.timeout = timeout
        self.running = 0
        self._queue: deque[Item] = deque()
        self._workers: set[asyncio.Task[None]] = set()
        self._waiting: deque[asyncio.Future[None]] = deque()  # idle workers
        self._slot: asyncio.Event | None = None  # set when a running event finishes (durable fetching waits)
        self._loop = asyncio.get_running_loop()
        self._base = contextvars.copy_context()  # each event's context starts as a copy of this one

    def admit(self, route: EventRoute, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        """Takes one event as nats-py parses it: queued for a worker, or dropped when full."""
        route.stats.received += 1
        if self.active >= self.capacity:
            route.stats.dropped += 1
            if route.stats.dropped % DROP_LOG_EVERY == 1:
                log.warning(
                    "events dropped: the handler's instance is at its concurrency limit and queue",
                    handler=route.where, event_type=subject[_EVENT_HEAD:], dropped=route.stats.dropped,
                )  # fmt: skip
            return
        self._take((route, subject, data, headers, None))

    def admit_durable(self, route: EventRoute, msg: Any, consumer: Any) -> None:
        """Takes one event fetched from JetStream (fetching follows the free slots: never dropped)."""
        route.stats.received += 1
        self._take((route, msg.subject, msg.data, msg.headers, (msg, consumer)))

    def _take(self, item: Item) -> None:
        self.active += 1
        self._queue.append(item)
        while self._waiting:  # wake an idle worker
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        if len(self._workers) < self.size:
            worker = self._loop.create_task(self._work(), context=self._base.copy())
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)

    async def slot_free(self) -> None:
        """Returns once a running event has finished."""
        self._slot = asyncio.Event()
        await self._slot.wait()

    async def _work(self) -> None:
        queue, loop = self._queue, self._loop
        while True:
            while queue:
                item = queue.popleft()
                self.running += 1
                context = self._base.copy()
                coro = self._serve(*item)
                try:
                    yielded = context.run(coro.send, None)
                except StopIteration:
                    continue
                await resume(coro, yielded, context)
            waiter = loop.create_future()
            self._waiting.append(waiter)
            await waiter

    def _finished(self) -> None:
        self.running -= 1
        self.active -= 1
        if self._slot is not None:
            self._slot.set()
        if self.active == 0 and self._idle is not None:
            self._idle.set()

    async def _serve(
        self, route: EventRoute, subject: str, data: bytes, headers: dict[str, str] | None, durable: Any
    ) -> None:
        event_type = subject[_EVENT_HEAD:]
        handler = route.handler
        error: BaseException | None = None
        invalid = False
        finished = False  # cancelled midway, a durable event is left unacknowledged (JetStream redelivers it)
        try:
            msgpack = headers is not None and headers.get(protocol.CONTENT_TYPE) == protocol.MSGPACK
            try:
                payload = handler.decode(data, msgpack)
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
                error, invalid, finished = exc, True, True
                route.drop_invalid(event_type, "its payload does not fit", error=str(exc))
                return
            h = headers or {}
            caller = h.get(protocol.CALLER, "client")
            if caller != "client" and not protocol.valid_caller(caller):  # it would reach logs and spans
                error, invalid, finished = BadRequest(protocol.BAD_CALLER), True, True
                route.drop_invalid(event_type, protocol.BAD_CALLER)
                return
            call = context.CallContext(
                route.service.name,
                handler.attr,
                time.time() + self.timeout,
                route.label,
                caller,
                h.get(protocol.TRACEPARENT, ""),
                h,
            )
            call.event_type = event_type
            context.enter(call)
            try:
                if handler.is_async:
                    await route.bound(payload)
                else:
                    await anyio.to_thread.run_sync(functools.partial(route.bound, payload))
            except Exception as exc:
                route.stats.failed += 1
                error, finished = exc, True
                log.exception("event handler raised", handler=route.where, event_type=event_type)
            else:
                route.stats.handled += 1
                finished = True
        finally:
            try:
                if durable is not None and finished:
                    msg, consumer = durable
                    await consumer.settle(msg, error, invalid)
            finally:
                self._finished()

    async def cancel(self) -> int:
        """At the end of a stop: drops what is queued (counted, logged), cancels the workers (and the
        handlers still running, after the drain timeout); returns how many events were left."""
        left = self.active
        while self._queue:
            route, subject, _, _, _ = self._queue.popleft()
            route.stats.dropped += 1
            self.active -= 1
            log.warning(
                "event dropped at stop: the drain timeout passed", handler=route.where, event_type=subject[_EVENT_HEAD:]
            )
        workers = list(self._workers)
        for worker in workers:
            worker.cancel()
        if workers:
            await asyncio.gather(*workers, return_exceptions=True)
        return left


def subscription(route: EventRoute) -> tuple[str, str]:
    """The subject and queue group of a handler: ``evt.<pattern>``, and ``<service>.<method>``
    unless broadcast.

    The queue group names the handler, not only the service: NATS gives each group one copy of a
    message, so two handlers of one service whose patterns both match an event (``order.created``
    and ``order.*``) would otherwise share one copy.
    """
    if route.handler.broadcast:
        return protocol.event_subject(route.handler.pattern), ""
    return protocol.event_subject(route.handler.pattern), f"{route.service.name}.{route.handler.attr}"
