"""Hosting services: subscribe their endpoints, dispatch requests concurrently, stop without loss.

Each request runs as its own task (nats-py runs one subscription's callbacks one at a time), under
a per-instance concurrency limit with a bounded wait queue; beyond it the reply is an immediate 429.
Stopping drains the subscriptions, awaits in-flight handlers (bounded), then runs ``cleanup()``.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import anyio.to_thread
import msgspec
import nats.errors
from nats.nuid import NUID

from natsrpc import announce, context, logs, protocol, transport
from natsrpc.client import Client
from natsrpc.dispatch import Dispatcher, resume
from natsrpc.errors import (
    BadRequest,
    CallError,
    ConfigurationError,
    DeadlineExceeded,
    InternalError,
    NotFound,
    Overloaded,
    RemoteError,
    ReplyTooLarge,
    Unavailable,
    error_reply,
    remote_error,
    reply_code,
    streaming_awaited,
)
from natsrpc.events import durable
from natsrpc.events.serve import EventPool, subscription
from natsrpc.instance import Instance, Request, Route
from natsrpc.observe.middleware import Invocation, Middleware, hooks, split
from natsrpc.proxy import check_headers
from natsrpc.service import Service, ServiceContext
from natsrpc.streams import produce

log = logs.get_logger("natsrpc.host")

DEFAULT_MAX_CONCURRENCY = 100
DEFAULT_MAX_QUEUE = 100
DEFAULT_MAX_EVENT_QUEUE = 10_000  # events are not refused with a reply: a burst waits instead
DEFAULT_DRAIN_TIMEOUT = 30.0
DEFAULT_LEAVE_GRACE = 0.1  # seconds between the last heartbeat and the unsubscribe of a graceful stop
MAX_LEAVE_GRACE = 60.0
DEFAULT_HANDLER_TIMEOUT = 30.0
CANCELLED = 499  # counted (never sent) for a call its caller cancelled, as nginx logs a closed request
_MAX_REPLY_SUBJECT = 512  # a cancel naming a longer reply subject names no call of ours
_NOT_BEGUN = object()  # the observers had not all begun: nothing to end


def _seconds_within(name: str, value: float, low: float, high: float) -> None:
    """Raises ConfigurationError unless ``value`` is from ``low`` to ``high`` seconds (not NaN)."""
    if not low <= value <= high:
        span = f"at least {low:g}" if high == math.inf else f"{low:g}-{high:g}"
        raise ConfigurationError(f"{name} must be {span} seconds, got {value!r}")


class Host:
    """Serves Service instances on a client's connection; use as ``async with Host(client, [KV()])``.

    Args:
        client: the connection to serve on; handlers' ``self.call_service`` uses it too.
        services: the instances to host.
        max_concurrency: handlers running at once per instance.
        max_queue: requests waiting for a slot per instance; beyond that the reply is 429.
        drain_timeout: seconds :meth:`stop` waits for in-flight handlers.
        leave_grace: seconds :meth:`stop` keeps serving after its last heartbeat (``draining``)
            before it unsubscribes, when other instances of its services are live: callers that
            heard that beat send to those instances' own subjects meanwhile, so none of their
            requests is routed here after the unsubscribe (a cluster's servers drop those).
        default_timeout: the deadline of requests that carry no ``Natsrpc-Deadline``.
        config: per-service configuration sections, by service name (``self.ctx.config``).
        heartbeat_interval: seconds between heartbeats (jittered); see :mod:`natsrpc.announce`.
        discoverable: answer ``$SRV.PING/INFO/STATS`` and publish heartbeats.
        stream_keepalive: seconds between the keepalives of an idle stream; a client silent for 3
            of them is given up (its generator closed).
        max_reply_size: the largest reply sent: one over the server's max_payload goes to natsrpc
            clients in chunks (docs/protocol.md); above this it is a 413.
        max_event_queue: events waiting per instance for a free handler slot (``max_concurrency``
            of them run at once); beyond it an event is dropped, counted and logged.
        event_backoff: seconds before each redelivery of a durable event whose handler raised.
        event_max_deliver: deliveries of a durable event before it is dead-lettered.
        event_stream: settings of the ``EVENTS`` stream when natsrpc creates it (``max_age``,
            ``max_bytes``, ...: nats-py's ``StreamConfig`` fields).
        event_ack_wait: seconds JetStream waits for a durable event's acknowledgement before it
            redelivers it (an instance that died mid-handler); default ``default_timeout`` + 30.
        middleware: runs around every request served, the first listed outermost
            (:mod:`natsrpc.observe.middleware`). A middleware may also have an
            ``on_rejected(service, method, code)`` method: it is told of each request refused
            before its handler ran (400 bad arguments or headers, 429 full, 503 stopped, 504
            deadline passed).
    """

    def __init__(
        self,
        client: Client,
        services: Sequence[Service],
        *,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        max_queue: int = DEFAULT_MAX_QUEUE,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        leave_grace: float = DEFAULT_LEAVE_GRACE,
        default_timeout: float = DEFAULT_HANDLER_TIMEOUT,
        config: Mapping[str, Mapping[str, Any]] | None = None,
        heartbeat_interval: float = protocol.DEFAULT_HEARTBEAT_INTERVAL,
        discoverable: bool = True,
        stream_keepalive: float = protocol.DEFAULT_KEEPALIVE,
        max_reply_size: int = protocol.DEFAULT_MAX_REPLY_SIZE,
        middleware: Sequence[Middleware] | None = None,
        max_event_queue: int = DEFAULT_MAX_EVENT_QUEUE,
        event_backoff: Sequence[float] = durable.DEFAULT_BACKOFF,
        event_max_deliver: int = durable.DEFAULT_MAX_DELIVER,
        event_stream: Mapping[str, Any] | None = None,
        event_ack_wait: float | None = None,
    ) -> None:
        if max_concurrency < 1 or max_queue < 0 or max_event_queue < 0:
            raise ConfigurationError("max_concurrency must be >= 1, max_queue and max_event_queue >= 0")
        _seconds_within("leave_grace", leave_grace, 0, MAX_LEAVE_GRACE)
        _seconds_within("drain_timeout", drain_timeout, 0, math.inf)
        _seconds_within("stream_keepalive", stream_keepalive, protocol.MIN_KEEPALIVE, protocol.MAX_KEEPALIVE)
        if discoverable:
            shortest, longest = protocol.MIN_HEARTBEAT_INTERVAL, protocol.MAX_HEARTBEAT_INTERVAL
            _seconds_within("heartbeat_interval", heartbeat_interval, shortest, longest)
        self.leave_grace = leave_grace
        self.max_event_queue = max_event_queue
        self.event_backoff = tuple(event_backoff)
        self.event_max_deliver = event_max_deliver
        self.event_stream = dict(event_stream or {})
        self.event_ack_wait = event_ack_wait or default_timeout + durable.ACK_WAIT_MARGIN
        self._consumers: list[durable.DurableConsumer] = []
        self._js: Any = None
        self.middleware: tuple[Middleware, ...] = tuple(middleware or ())
        """The middleware every request served goes through (outermost first)."""
        self._observers, self._middleware = split(self.middleware)  # observers run in line, the rest as a chain
        self._rejected_hooks = hooks(self.middleware, "on_rejected")
        classes_of: dict[str, set[type[Service]]] = {}
        for service in services:  # instances of one class may share a name; two classes may not
            classes_of.setdefault(service.name, set()).add(type(service))
        doubled = sorted(name for name, classes in classes_of.items() if len(classes) > 1)
        if doubled:
            names = ", ".join(sorted(cls.__qualname__ for name in doubled for cls in classes_of[name]))
            raise ConfigurationError(
                f"two services named {', '.join(map(repr, doubled))} in one process ({names}): names must be unique"
            )
        self.client = client
        self.nc = client.nc
        self.drain_timeout = drain_timeout
        self.default_timeout = default_timeout
        self.instances = [Instance(s, NUID().next().decode(), max_concurrency, max_queue) for s in services]
        self._config = config or {}
        self._announcer = (
            announce.Announcer(self.nc, self.instances, client.prefix, heartbeat_interval) if discoverable else None
        )
        self._subs: list[Any] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._stopping = False  # the drain timeout passed: handlers still running are being cancelled
        self.stream_keepalive = stream_keepalive
        self.max_reply_size = max_reply_size
        self._producers: dict[str, produce.Producer] = {}  # the streams being served, by token
        # Calls a caller may cancel, by reply subject: handlers that suspended, and streams.
        self._cancellable: dict[str, tuple[context.CallContext, asyncio.Task[Any] | None]] = {}

    async def __aenter__(self) -> Host:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def in_flight(self) -> int:
        """Requests accepted and not yet answered, over all instances."""
        return sum(i.active for i in self.instances)

    async def readiness(self, health_timeout: float = 2.0) -> dict[str, Any]:
        """Says whether this host should get traffic (what the runner's ``/readyz`` answers).

        Ready means started and not draining, connected to NATS, and every service's ``health()``
        true (each given ``health_timeout`` seconds; one that raises or hangs counts as false).

        Returns:
            ``{"ready": bool, "reasons": [why not, ...], "services": {name: healthy}}``.
        """
        reasons = []
        if any(inst.draining for inst in self.instances):
            reasons.append("draining: stopping gracefully")
        elif not self._started:
            reasons.append("not serving yet: starting")
        if not self.nc.is_connected:
            reasons.append("not connected to NATS")
        healthy = await asyncio.gather(*(inst.healthy(health_timeout) for inst in self.instances))
        services = {inst.label: ok for inst, ok in zip(self.instances, healthy, strict=True)}
        reasons.extend(f"{label}: health() is false" for label, ok in services.items() if not ok)
        return {"ready": not reasons, "reasons": reasons, "services": services}

    async def start(self) -> None:
        """Runs each service's ``setup()``, then subscribes its endpoints.

        If any step fails, what was done is undone before the error propagates: the subscriptions
        made are unsubscribed and the services set up get their ``cleanup()``.
        """
        self._loop = asyncio.get_running_loop()
        for inst in self.instances:
            inst.pool = Dispatcher(inst.max_concurrency, self._serve, self._refuse_queued)
            if inst.event_routes:
                inst.events = EventPool(
                    inst.max_concurrency, inst.max_concurrency + self.max_event_queue, self.default_timeout
                )
        set_up: list[Instance] = []
        try:
            for inst in self.instances:
                svc = inst.service
                svc._bind(ServiceContext(svc.name, inst.id, self.client, None, self._config.get(svc.name, {})))
                await svc.setup()
                set_up.append(inst)
            if any(r.handler.durable for inst in self.instances for r in inst.event_routes.values()):
                await durable.ensure_stream(self._jetstream(), self.event_stream)
            for inst in self.instances:
                await self._subscribe_instance(inst)
            if self._announcer is not None:
                await self._announcer.start()
                self.client.add_reconnect_listener(self._beat_now)
            await transport.sync_with_server(self.nc)
        except BaseException:
            await self._undo_start(set_up)
            raise
        self._started = True

    def _beat_now(self) -> None:
        """Beats at once when the connection comes back: nats-py resubscribed the endpoints before
        this runs, so the beat tells callers waiting after the outage that the endpoints are back."""
        if self._announcer is not None:
            self._spawn(self._announcer.beat())

    async def _subscribe_instance(self, inst: Instance) -> None:
        prefix = self.client.prefix
        for name, route in inst.routes.items():
            subject = protocol.endpoint_subject(inst.service.name, name, prefix)
            await self._subscribe(subject, protocol.QUEUE_GROUP, functools.partial(self._admit, route))
        wildcard = protocol.instance_wildcard(inst.service.name, inst.id, prefix)
        await self._subscribe(wildcard, "", functools.partial(self._admit_instance_request, inst))
        await self._subscribe(protocol.control_wildcard(inst.service.name, inst.id, prefix), "", self._admit_control)
        for handling in inst.event_routes.values():
            assert inst.events is not None
            if handling.handler.durable:
                consumer = durable.DurableConsumer(
                    self._jetstream(), handling, inst.events, self.event_backoff, self.event_max_deliver,
                    ack_wait=self.event_ack_wait,
                )  # fmt: skip
                await consumer.start()
                self._consumers.append(consumer)
                continue
            subject, queue = subscription(handling)
            await self._subscribe(subject, queue, functools.partial(inst.events.admit, handling))
        cancels = protocol.cancel_subject(inst.service.name, prefix)
        if all(sub.subject != cancels for sub in self._subs):  # one per service, however many instances
            await self._subscribe(cancels, "", self._admit_cancel)
        log.info(
            "serving", service=inst.service.name, version=inst.service.version, instance=inst.id,
            endpoints=sorted(inst.routes), events=sorted(inst.event_routes),
        )  # fmt: skip

    async def _undo_start(self, set_up: Sequence[Instance]) -> None:
        """Undoes a start that failed part way: unsubscribes, stops announcing, cleans up what was set up."""
        subs, self._subs = self._subs, []
        for sub in subs:
            try:
                await sub.unsubscribe()
            except nats.errors.Error as exc:
                log.warning("unsubscribe failed", subject=sub.subject, error=repr(exc))
        if self._announcer is not None:
            self.client.remove_reconnect_listener(self._beat_now)
            await self._announcer.stop(last_beat=False)
        for inst in set_up:
            try:
                await inst.service.cleanup()
            except Exception:
                log.exception("cleanup failed", service=inst.service.name)

    async def stop(self) -> None:
        """Stops taking requests, waits for in-flight handlers (bounded), then runs ``cleanup()``."""
        if not self._started:
            return
        self._started = False
        for inst in self.instances:
            inst.draining = True
        staying = self._name_the_staying()
        if self._announcer is not None:
            self.client.remove_reconnect_listener(self._beat_now)
            await self._announcer.stop()  # a last beat says "draining" and who stays, so callers go there
            if self.leave_grace and not self.nc.is_closed and staying:
                await asyncio.sleep(self.leave_grace)  # their calls go to the others' own subjects meanwhile
        # Requests delivered until the subscriptions are drained are still served: refusing them
        # (503) while the unsubscribe travels would turn a graceful stop into lost calls.
        subs, self._subs = self._subs, []
        consumers, self._consumers = self._consumers, []
        await asyncio.gather(*(consumer.stop() for consumer in consumers))  # nothing more is fetched
        if not self.nc.is_closed:
            await asyncio.gather(*(_drain(sub) for sub in subs))
        for inst in self.instances:
            inst.closed = True
        pools: list[Any] = [inst.pool for inst in self.instances if inst.pool is not None]
        pools += [inst.events for inst in self.instances if inst.events is not None]
        await asyncio.gather(*(pool.wait_idle(self.drain_timeout) for pool in pools))
        self._stopping = True  # from here, a handler cancelled by cancel() replies 503
        abandoned = sum(await asyncio.gather(*(pool.cancel() for pool in pools)))
        if abandoned:
            log.warning("requests still queued or running after the drain timeout were cancelled", count=abandoned)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.drain_timeout)
        for inst in self.instances:
            try:
                await inst.service.cleanup()
            except Exception:
                log.exception("cleanup failed", service=inst.service.name)
        log.info("stopped", services=[i.service.name for i in self.instances])

    def _name_the_staying(self) -> bool:
        """Sets each instance's :attr:`~natsrpc.instance.Instance.staying` (announced in its last,
        draining beat) to the live instances of its service, other than these, that this client's
        registry knows: where callers can send instead while this host leaves, callers that have not
        heard them beat yet included. Returns whether any instance has one."""
        registry = self.client.registry
        if registry is None:
            return False
        mine = {inst.id for inst in self.instances}
        for inst in self.instances:
            others = sorted(other.id for other in registry.live(inst.service.name) if other.id not in mine)
            inst.staying = others[: protocol.MAX_STAYING]
        return any(inst.staying for inst in self.instances)

    def _jetstream(self) -> Any:
        if self._js is None:
            self._js = self.nc.jetstream()
        return self._js

    async def _subscribe(self, subject: str, queue: str, admit: transport.Handler) -> None:
        """Subscribes ``admit`` to ``subject``, delivered directly as nats-py parses each message."""
        self._subs.append(await transport.subscribe(self.nc, subject, admit, queue))

    def _admit_instance_request(
        self, inst: Instance, subject: str, reply: str, data: bytes, headers: dict[str, str] | None
    ) -> None:
        method = subject.split(".")[-2]
        route = inst.routes.get(method)
        if route is None:
            self._spawn(self._reply_error(reply, None, NotFound(f"{inst.service.name} has no method {method!r}")))
            return
        self._admit(route, subject, reply, data, headers)

    def _admit_control(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        """Hands a stream's control message (ack, keepalive, cancel) to its producer; others are dropped."""
        producer = self._producers.get(subject[subject.rfind(".") + 1 :])
        if producer is not None:
            producer.on_control(headers)

    def _admit_cancel(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        """Cancels the call whose reply subject the message names, if it runs or waits here.

        A handler running is cancelled (a plain ``def`` one sees ``current_call().cancelled``); a
        request still queued is dropped. Nothing is sent: the caller has gone.
        """
        target = data.decode("utf-8", "replace") if len(data) <= _MAX_REPLY_SUBJECT else ""
        if not target:
            return
        entry = self._cancellable.get(target)
        if entry is not None:
            call, task = entry
            call.cancelled = True
            call.cancel_reason = "cancelled by its caller"
            if task is not None:
                task.cancel()
            return
        for inst in self.instances:
            if inst.pool is not None and inst.pool.withdraw(lambda request: request[1] == target):
                return

    def _admit(self, route: Route, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        """Admits a request as it arrives: starts its task, or refuses it at once (503 stopped, 429 full)."""
        inst = route.instance
        route.stats.num_requests += 1
        if inst.closed:
            self._rejected(route, 503)
            self._spawn(self._reply_error(reply, route, Unavailable(f"{inst.label} has stopped")))
        elif inst.active >= inst.capacity:
            self._rejected(route, 429)
            self._spawn(
                self._reply_error(reply, route, Overloaded(f"{inst.label} is at its concurrency limit and queue"))
            )
        else:
            deadline = context.parse_deadline(headers, self.default_timeout)
            if deadline is None:
                value = (headers or {}).get(protocol.DEADLINE, "")
                shown = repr(value[:40]) + ("..." if len(value) > 40 else "")
                bad = BadRequest(f"{route.where}: header {protocol.DEADLINE} {shown} is not epoch milliseconds")
                self._rejected(route, 400)
                self._spawn(self._reply_error(reply, route, bad))
                return
            if time.time() >= deadline:
                error = DeadlineExceeded(f"{route.where}: the deadline passed before the request was dispatched")
                self._rejected(route, 504)
                self._spawn(self._reply_error(reply, route, error))
                return
            assert inst.pool is not None
            inst.pool.submit((route, reply, data, headers, deadline))

    def _rejected(self, route: Route, code: int) -> None:
        """Tells the middleware's ``on_rejected`` hooks of a request refused before its handler ran."""
        for hook in self._rejected_hooks:
            hook(route.instance.service.name, route.endpoint.name, code)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(
        self, route: Route, reply: str, data: bytes, headers: dict[str, str] | None, deadline: float
    ) -> None:
        inst = route.instance
        endpoint = route.endpoint
        started = time.perf_counter_ns()
        streams: Sequence[produce.Producer] = ()  # the stream this request opened, if any (errors end it)
        observers = self._observers
        states: Any = _NOT_BEGUN  # the observers' states, once they all began
        failure: BaseException | None = None  # what they are told the request ended with
        if headers is None:
            headers = {}
            msgpack = mixed = False
        elif len(headers) == 1 and protocol.DEADLINE in headers:  # the usual request from a client
            msgpack = mixed = False
        else:
            msgpack = headers.get(protocol.CONTENT_TYPE) == protocol.MSGPACK
            mixed = headers.get(protocol.ARGS_FORM) == protocol.MIXED_ARGS
        try:
            if time.time() >= deadline:
                self._rejected(route, 504)
                raise DeadlineExceeded(f"{route.where}: the deadline passed while the request waited for a slot")
            caller = headers.get(protocol.CALLER, "client")
            if caller != "client" and not protocol.valid_caller(caller):  # it reaches logs and spans
                self._rejected(route, 400)
                raise BadRequest(f"{route.where}: {protocol.BAD_CALLER}")
            try:
                values = endpoint.signature.decode_arguments(data, msgpack, mixed)
            except BadRequest:
                self._rejected(route, 400)
                raise
            call = context.CallContext(
                inst.service.name,
                endpoint.name,
                deadline,
                inst.label,
                caller,
                headers.get(protocol.TRACEPARENT, ""),
                headers,
            )
            context.enter(call)
            args, kwargs = endpoint.signature.call_parts(values)
            if endpoint.streaming and not reply:  # a stream sent nowhere would publish to an empty subject
                self._rejected(route, 400)
                raise BadRequest(f"{route.where} streams: the request needs a reply subject")
            if observers is not None or self._middleware is not None:
                through = Invocation(
                    "server",
                    inst.service.name,
                    endpoint.name,
                    args,
                    kwargs,
                    headers,
                    deadline,
                    call.caller,
                    endpoint.streaming,
                    inst.label,
                    call,
                    "",
                    {},  # reply_headers: a middleware adds to them
                )
                if observers is not None:  # in line; one raising refuses (those begun are ended by it)
                    states = observers.begin(through)
            if self._middleware is not None:
                collected: list[bytes] = []  # a plain request's array reply, from a streaming endpoint
                opened: list[produce.Producer] = []
                streams = opened
                final = functools.partial(
                    self._handle, route, call, through, reply, headers, msgpack, collected, opened
                )
                result = await self._middleware(through, final)
                if endpoint.streaming and not collected:  # the stream was sent
                    return
                body = collected[0] if collected else self._encode(route, result, msgpack)
                if reply and through.reply_headers and len(body) <= self.nc.max_payload:
                    check_headers(through.reply_headers)
                    await self._publish(reply, body, through.reply_headers)
                    return
            elif endpoint.streaming:
                items = route.handler(*args, **kwargs)
                opened = []
                streams = opened
                streamed = await self._stream(route, items, reply, call, headers, msgpack, opened)
                if streamed is None:  # the stream was sent
                    return
                body = streamed
            else:
                if endpoint.is_async:
                    coro = route.handler(*args, **kwargs)
                    try:  # the first step here: most handlers finish in it, and need no deadline timer
                        yielded = coro.send(None)
                    except StopIteration as stop:
                        result = stop.value
                    else:
                        result = await self._resumed(call, reply, coro, yielded)
                else:
                    result = await self._in_thread(route, call, reply, args, kwargs)
                body = self._encode(route, result, msgpack)
            if reply and (len(body) > self.nc.max_payload or not transport.send(self.nc, reply, "", body)):
                if self.nc.max_payload < len(body) <= self.max_reply_size and protocol.DEADLINE in headers:
                    # A natsrpc client (its requests carry a deadline) takes it in chunks, as a stream.
                    producer = self._producer(route, reply, call, protocol.DEFAULT_WINDOW, msgpack, len(body))
                    streams = (producer,)
                    size = self.nc.max_payload - protocol.CHUNK_OVERHEAD
                    await self._run_stream(producer, produce.chunks(body, size), reply, call)
                else:
                    await self._reply(reply, route, body)  # too large, or not connected: the slow path
        except RemoteError as exc:
            failure = exc
            await self._reply_error(reply, route, _downstream(route, exc) if exc.hop else exc, *streams)
        except CallError as exc:  # a call this handler made failed without a reply
            failure = exc
            await self._reply_error(reply, route, _downstream(route, exc), *streams)
        except (asyncio.CancelledError, _Abandoned) as exc:
            failure = exc
            if self._stopping:  # the drain timeout of a graceful stop passed: tell the caller
                stopped = Unavailable(f"{route.where}: cancelled, the instance stopped")
                await self._reply_error(reply, route, stopped, *streams)
            elif (current := context.active_call()) is not None and current.cancelled:
                # The caller gave up, or its deadline passed: nobody listens for a reply, so it is only counted.
                reason = current.cancel_reason or "its deadline passed"
                if reason.startswith("its deadline"):
                    gone: RemoteError = DeadlineExceeded(f"{route.where}: cancelled at its deadline")
                else:
                    gone = remote_error(CANCELLED, f"{route.where}: {reason}", "Cancelled")
                await self._reply_error("", route, gone)
            else:
                raise
        except Exception as exc:
            failure = exc
            await self._reply_error(reply, route, InternalError(str(exc), type=type(exc).__name__), *streams)
            log.exception("handler raised", where=route.where)  # after the reply: logging may fail too
        finally:  # every request served counts, errors too (as Go's micro library counts them)
            if states is not _NOT_BEGUN:
                observers.end(through, states, failure)  # type: ignore[union-attr]
            elapsed = time.perf_counter_ns() - started
            route.stats.processing_time_ns += elapsed
            route.stats.latency.add(elapsed)
            inst.pool.finished()  # type: ignore[union-attr]  # a request is served only by its pool

    async def _handle(
        self,
        route: Route,
        call: context.CallContext,
        through: Invocation,
        reply: str,
        headers: dict[str, str],
        msgpack: bool,
        collected: list[bytes],
        streams: list[produce.Producer],
    ) -> Any:
        """The innermost step of the middleware chain: runs the handler (its arguments as the
        middleware left them) and returns its result; a stream is sent here (None is returned),
        a plain request's array reply goes into ``collected`` (and its producer into ``streams``)."""
        endpoint = route.endpoint
        if endpoint.streaming:
            items = route.handler(*through.args, **through.kwargs)
            body = await self._stream(route, items, reply, call, headers, msgpack, streams)
            if body is not None:
                collected.append(body)
            return None
        if not endpoint.is_async:
            return await self._in_thread(route, call, reply, through.args, through.kwargs)
        coro = route.handler(*through.args, **through.kwargs)
        try:  # the first step here, as without middleware: most finish in it and need no timer
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value
        return await self._resumed(call, reply, coro, yielded)

    async def _resumed(self, call: context.CallContext, reply: str, coro: Any, yielded: Any) -> Any:
        """Drives an async handler that suspended in its first step to its end, under its deadline."""
        timer = self._watch(call, reply, asyncio.current_task())
        try:
            return await resume(coro, yielded)
        finally:
            self._unwatch(reply, timer)

    async def _in_thread(
        self, route: Route, call: context.CallContext, reply: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Any:
        """Runs a plain ``def`` handler in a worker thread, under its deadline (it is told through
        ``call.cancelled``: a thread cannot be interrupted)."""
        timer = self._watch(call, reply, None)
        try:
            result = await anyio.to_thread.run_sync(functools.partial(route.handler, *args, **kwargs))
        finally:
            self._unwatch(reply, timer)
        if call.cancelled:
            raise _Abandoned()
        return result

    async def _stream(
        self,
        route: Route,
        items: Any,
        reply: str,
        call: context.CallContext,
        headers: dict[str, str],
        msgpack: bool,
        streams: list[produce.Producer],
    ) -> bytes | None:
        """Serves a streaming endpoint's items: as a stream (returns None once sent; its producer goes
        into ``streams``, so that an error ends it in order) when the request asks for one, else as
        one array reply (returned, to be sent)."""
        window = produce.window_of(headers)
        if window is None:
            return await self._collect(route, items, reply, call, headers, msgpack)
        producer = self._producer(route, reply, call, window, msgpack)
        streams.append(producer)
        await self._run_stream(producer, items, reply, call)
        return None

    def _encode(self, route: Route, result: Any, msgpack: bool) -> bytes:
        """Encodes a return value or stream item, checked against its annotation (a 500 if it does not fit)."""
        try:
            return route.endpoint.signature.encode_result(result, msgpack)
        except (TypeError, ValueError, msgspec.EncodeError, msgspec.ValidationError) as exc:
            raise _unencodable(route, exc) from exc

    def _producer(
        self, route: Route, reply: str, call: context.CallContext, window: int, msgpack: bool, chunked: int = 0
    ) -> produce.Producer:
        """Makes the producer of a stream request (or of a reply of ``chunked`` bytes sent in chunks),
        with its own control subject."""
        inst = route.instance
        token = produce.new_token()
        control = protocol.control_subject(inst.service.name, inst.id, token, self.client.prefix)
        if chunked:
            encode: Callable[[Any], bytes] = bytes
            start = {protocol.CHUNKED: str(chunked)}
        else:
            encode, start = functools.partial(self._encode, route, msgpack=msgpack), {}
        producer = produce.Producer(
            self.nc, reply, control, window, self.stream_keepalive, encode, call, route.where, start
        )
        self._producers[token] = producer
        return producer

    async def _run_stream(self, producer: produce.Producer, items: Any, reply: str, call: context.CallContext) -> None:
        """Runs a stream to its end, bounded by the call's deadline (armed when it first waits: one
        that ends in its first step cannot be interrupted anyway); cancellable by its caller."""
        task = asyncio.current_task()
        timers: list[asyncio.TimerHandle] = []
        producer.on_suspend = lambda: timers.append(self._watch(call, reply, task))
        try:
            await producer.run(items)
        finally:
            if timers:
                self._unwatch(reply, timers[0])
            del self._producers[producer.control[producer.control.rfind(".") + 1 :]]

    async def _collect(
        self, route: Route, items: Any, reply: str, call: context.CallContext, headers: dict[str, str], msgpack: bool
    ) -> bytes:
        """Answers a plain request to a streaming endpoint: every item in one array reply, if they fit.

        A natsrpc client's ``await`` (its requests always carry a deadline) gets a 400 saying to
        iterate instead.
        """
        if protocol.DEADLINE in headers:
            await items.aclose()
            raise streaming_awaited(route.where)
        bodies: list[bytes] = []
        size = 2
        timer = self._watch(call, reply, asyncio.current_task())
        try:
            async for item in items:
                body = self._encode(route, item, msgpack)
                size += len(body) + 1
                if size > self.nc.max_payload:
                    raise ReplyTooLarge(
                        f"{route.where}: the items exceed max_payload {self.nc.max_payload} as one reply; "
                        f"request a stream (header {protocol.STREAM}, see docs/protocol.md)"
                    )
                bodies.append(body)
        finally:
            self._unwatch(reply, timer)
            await items.aclose()
        return produce.array_reply(bodies, msgpack)

    def _watch(self, call: context.CallContext, reply: str, task: asyncio.Task[Any] | None) -> asyncio.TimerHandle:
        """Makes a call that is about to wait cancellable; undo with :meth:`_unwatch` when it stops waiting.

        At the deadline the caller has given up: the returned timer cancels ``task`` (an async
        handler's) and sets ``call.cancelled`` (all a plain def handler can be told: a thread cannot
        be interrupted). A cancel naming ``reply`` does the same before it.
        """
        if reply:
            self._cancellable[reply] = (call, task)
        loop = self._loop
        return loop.call_at(loop.time() + call.deadline - time.time(), _expire, call, task)

    def _unwatch(self, reply: str, timer: asyncio.TimerHandle) -> None:
        timer.cancel()
        if reply:
            self._cancellable.pop(reply, None)

    def _refuse_queued(self, request: Request) -> None:
        """Answers a request still queued when a graceful stop ran out of time: 503, not silence."""
        route, reply = request[0], request[1]
        self._rejected(route, 503)
        self._spawn(self._reply_error(reply, route, Unavailable(f"{route.where}: the instance stopped")))

    async def _reply(self, reply: str, route: Route, body: bytes) -> None:
        """Sends a reply: an error reply if it is over max_payload, else through nats-py."""
        if len(body) > self.nc.max_payload:
            limit = self.nc.max_payload
            if len(body) > self.max_reply_size:
                why = f"max_reply_size {self.max_reply_size}"
            else:
                why = f"max_payload {limit} (only natsrpc clients take replies in chunks)"
            error = ReplyTooLarge(f"{route.where}: reply of {len(body)} bytes exceeds {why}")
            await self._reply_error(reply, route, error)
        else:
            await self._publish(reply, body, None)

    async def _reply_error(
        self, reply: str, route: Route | None, error: RemoteError, stream: produce.Producer | None = None
    ) -> None:
        """Counts an error and sends its reply (numbered as the stream's last message, for a stream)."""
        if route is not None:
            route.stats.num_errors += 1
            route.stats.last_error = f"{error.code} {error.message}"[:512]
        if not reply:
            return
        closing = stream.closing_headers() if stream is not None else {}  # once: it takes the first headers
        headers, body = error_reply(error)
        headers.update(closing)
        block = protocol.encode_headers(headers)
        if len(body) + len(block) > self.nc.max_payload:
            headers, body = error_reply(remote_error(error.code, error.message[:1024], error.type))
            headers.update(closing)
            block = protocol.encode_headers(headers)
        if not transport.send(self.nc, reply, "", body, block):
            await self._publish(reply, body, headers)

    async def _publish(self, reply: str, body: bytes, headers: dict[str, str] | None) -> None:
        """Sends a reply through nats-py (while reconnecting, say); a reply it cannot send is logged."""
        try:
            await transport.publish(self.nc, reply, body, headers=headers)
        except nats.errors.Error as exc:
            log.warning("reply not sent", error=repr(exc))


class _Abandoned(Exception):
    """A sync handler returned after its deadline: its result goes nowhere."""


def _unencodable(route: Route, exc: Exception) -> InternalError:
    """The 500 for a return value that does not fit its annotation or cannot be encoded; logged,
    as it is a bug in the handler, and never sent as it is."""
    if isinstance(exc, msgspec.ValidationError):
        annotation = route.endpoint.signature.return_type
        named = annotation.__qualname__ if isinstance(annotation, type) else repr(annotation).replace("typing.", "")
        message = f"{route.where}: the return value does not fit its annotation {named}: {exc}"
    else:
        message = f"{route.where}: cannot encode the return value: {exc}"
    log.error("return value refused", where=route.where, error=message)
    return InternalError(message, type="EncodeError")


def _expire(call: context.CallContext, task: asyncio.Task[Any] | None) -> None:
    """Marks a call cancelled at its deadline and cancels the task serving it."""
    call.cancelled = True
    call.cancel_reason = "its deadline passed"
    if task is not None:
        task.cancel()


def _downstream(route: Route, exc: CallError) -> RemoteError:
    """Returns the error reply for a failed call the handler made, naming the hop that failed.

    Business errors (4xx) keep their code and type. Refusals that mean "not executed" (429, 503,
    no responders, circuit open) become 502, because this handler did run and a caller must not
    retry it as if it had not; a downstream timeout becomes 504.
    """
    if isinstance(exc, RemoteError):
        if exc.message.startswith(exc.hop + " -> "):  # already a chain that starts at the hop
            message = f"{route.where} -> {exc.message}"
        else:
            detail = f"{exc.type}: {exc.message}" if exc.type not in exc.message else exc.message
            message = f"{route.where} -> {exc.hop}: {detail}"
        return remote_error(reply_code(exc), message, exc.type, exc.data)
    message = f"{route.where} -> {exc.hop or 'call'}: {type(exc).__name__}: {exc}"
    return remote_error(reply_code(exc), message, type(exc).__name__)


async def _drain(sub: Any) -> None:
    try:
        await sub.drain()
    except nats.errors.Error as exc:
        log.warning("subscription drain failed", subject=sub.subject, error=repr(exc))
