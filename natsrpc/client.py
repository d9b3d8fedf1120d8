"""The client: one NATS connection, one reply subscription, and the calls made over it.

``natsrpc.connect()`` (:mod:`natsrpc.connection`) opens it; :class:`Client` sends requests with
a deadline header and waits for replies on a single wildcard inbox, failing pending calls promptly
when the connection breaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsConnection
from nats.aio.msg import Msg
from nats.nuid import NUID

from natsrpc import codec, context, logs, protocol, transport
from natsrpc.cache import DEFAULT_CACHE_BYTES, DEFAULT_CACHE_SIZE, ReplyCache, varied
from natsrpc.circuit import CircuitBreaker, CircuitConfig, Circuits, State
from natsrpc.errors import (
    BadReply,
    CallError,
    CallTimeout,
    ClientClosed,
    ConfigurationError,
    ConnectionLost,
    DeadlineExceeded,
    NoResponders,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    error_from_reply,
    no_responders,
    streaming_awaited,
    translate_nats_errors,
)
from natsrpc.expiry import Expiry
from natsrpc.observe.middleware import Invocation, Middleware, check_middleware, compose, hooks, split
from natsrpc.proxy import (
    Call,
    CallOptions,
    ServiceDirectory,
    TypedProxy,
    check_encoding,
    check_headers,
    check_timeout,
)
from natsrpc.registry import InstanceState, Registry
from natsrpc.retry import DEFAULT_RETRY, RetryPolicy, TokenBucket, run_with_retries
from natsrpc.streams import consume

S = TypeVar("S")

log = logs.get_logger("natsrpc.client")

DEFAULT_TIMEOUT = 5.0
DEFAULT_CIRCUIT = CircuitConfig()
JS_MSG_ID = "Nats-Msg-Id"  # JetStream's deduplication header
MAX_BUCKETS = 4096  # retry budgets kept, one per service called
MAX_CACHED_SUBJECTS = 4096  # subjects of checked names kept
_TOKEN_BYTES = 12

Reply = tuple[bytes, "dict[str, str] | None"]
"""A reply's data and headers."""


class Client:
    """A natsrpc client on one NATS connection; use :func:`connect` to make one.

    Args:
        nc: a connected nats-py connection.
        timeout: default call timeout in seconds.
        encoding: ``"json"`` (default) or ``"msgpack"``.
        prefix: subject prefix (``svc``).
        caller: the ``Natsrpc-Caller`` value of calls made outside a handler.
        owns_connection: whether closing the client drains and closes ``nc``.
        discovery: follow heartbeats in :attr:`registry` (feeds the circuit breakers).
        circuit: circuit-breaker settings; None turns circuit breaking off.
        retry: the default retry policy (``natsrpc.retry.NO_RETRIES`` turns retries off).
        middleware: runs around every call and stream this client makes, the first listed
            outermost (:mod:`natsrpc.observe.middleware`). A middleware may also have
            ``on_retry(service, method)``, ``on_circuit(service, state)`` and
            ``on_cache(service, method, hit)`` methods: they are told of each retry, each change
            of a circuit's state and each call to a cached method.
        cache_size: the most replies the reply cache keeps (0 turns it off).
        cache_bytes: the most bytes of replies (and their encoded arguments) it keeps.
    """

    def __init__(
        self,
        nc: NatsConnection,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        encoding: str = "json",
        prefix: str = protocol.DEFAULT_PREFIX,
        caller: str = "client",
        owns_connection: bool = True,
        discovery: bool = True,
        circuit: CircuitConfig | None = DEFAULT_CIRCUIT,
        retry: RetryPolicy = DEFAULT_RETRY,
        middleware: Sequence[Middleware] | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        check_client_options(timeout=timeout, encoding=encoding, prefix=prefix, caller=caller)
        check_middleware(middleware)
        check_cache_size(cache_size, cache_bytes)
        self.cache = ReplyCache(cache_size, max_bytes=cache_bytes)
        """Replies of methods declared with ``cache_ttl``, kept for their TTL (:mod:`natsrpc.cache`)."""
        self._invalidations: Any = None  # the subscription to services' cache invalidations, once needed
        self.hears_invalidations = True
        """False once the server refused this client's subscription to cache invalidations: it then
        keeps no reply (a kept one could outlive the write that invalidated it)."""
        self.middleware: tuple[Middleware, ...] = tuple(middleware or ())
        """The middleware every call goes through (outermost first)."""
        # Calls run the leading observers in line and the rest as a chain; streams run all as a chain.
        self._observers, self._middleware = split(self.middleware)
        self._stream_chain = compose(self.middleware)
        self._retry_hooks = hooks(self.middleware, "on_retry")
        self._cache_hooks = hooks(self.middleware, "on_cache")
        self.nc = nc
        self.prefix = prefix
        self.caller = caller
        self.default_options = CallOptions(timeout=timeout, msgpack=encoding == "msgpack", retry=retry)
        self.registry: Registry | None = Registry() if discovery else None
        """Live instances per service, from heartbeats (None when discovery is off)."""
        self.circuits: Circuits | None = Circuits(circuit) if circuit is not None else None
        """The circuit breakers, one per service (None when circuit breaking is off)."""
        circuit_hooks = hooks(self.middleware, "on_circuit")
        if self.circuits is not None and circuit_hooks:

            def tell_circuit(service: str, old: State, new: State) -> None:
                for hook in circuit_hooks:
                    hook(service, new)

            self.circuits.on_state_change = tell_circuit
        self._buckets: dict[str, TokenBucket] = {}  # retry budgets, per service; at most MAX_BUCKETS
        if self.registry is not None and self.circuits is not None:
            self.registry.on_change(self._on_registry_change)
        # service -> the ids of its live instances, while another instance of it leaves (drains):
        # calls then go to those instances' own subjects, not through the queue group (see _detour).
        self._detours: dict[str, tuple[str, ...]] = {}
        if self.registry is not None:
            self.registry.on_change(self._on_leaving)
        self._owns_connection = owns_connection
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        # Tokens of calls published while nats-py was reconnecting: it holds them in its buffer and
        # sends them after the reconnect, so the disconnect that was under way does not fail them.
        self._parked: set[str] = set()
        self._streams: dict[str, consume.Receiver] = {}  # streams in progress, by reply token
        self._called: dict[str, str] = {}  # token -> subject of each pending call, to match permission errors
        self._refusables: set[_Refusable] = set()  # publishes waiting for the server: an ack, a flush
        self._subjects: dict[tuple[str, str, str | None], str] = {}  # checked names -> their subject
        self._event_types: set[str] = set()  # event types checked, for emit
        self._random = b""
        self._random_at = 0
        self._broken: CallError | None = None  # why no call can succeed any more (refused inbox, credentials)
        self.stray_replies = 0
        self.max_reply_size = protocol.DEFAULT_MAX_REPLY_SIZE
        """The largest reply taken in chunks (a reply over max_payload); a larger one raises ReplyTooLarge."""
        """Replies that arrived for no pending call (late, duplicated or forged): dropped and counted."""
        self._inbox = f"{transport.inbox_prefix(nc)}.{NUID().next().decode()}."
        self._reply_sub: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop = asyncio.get_running_loop()
        self._loop_time = self._loop.time
        self._expiry = Expiry(self._loop, _expire)
        self._closed = False
        self._connected = asyncio.Event()  # cleared while the connection is down
        self._connected.set()
        self._disconnected_at = -math.inf  # registry clock: when the connection last broke
        self._reconnect_listeners: list[Callable[[], None]] = []
        self.call_service = ServiceDirectory(self, spawn=False)
        self.call_service_async = ServiceDirectory(self, spawn=True)

    async def start(self) -> None:
        """Subscribes the reply inbox; :func:`connect` calls it."""
        with translate_nats_errors(self._inbox + "*"):
            self._reply_sub = await transport.subscribe(self.nc, self._inbox + "*", self._resolve)
            transport.fast_headers(self.nc)
            if self.registry is not None:
                await self.registry.start(self.nc, self.prefix)

    def circuit(self, service: str) -> CircuitBreaker:
        """Returns the circuit breaker of ``service`` (``client.circuit("kv").state``).

        Raises:
            ConfigurationError: circuit breaking is off for this client.
        """
        if self.circuits is None:
            raise ConfigurationError("circuit breaking is off for this client (circuit=None)")
        return self.circuits.get(service)

    def on_disconnected(self) -> None:
        """Notes that the connection broke (connection's nats-py callback); pending calls fail with ``error``."""
        self._connected.clear()
        if self.registry is not None:
            self._disconnected_at = self.registry.clock()
        self.fail_pending(
            ConnectionLost("the connection to the NATS server broke while the call was pending"), keep=self._parked
        )
        self._fail_streams(ConnectionLost("the connection to the NATS server broke during the stream"))

    def on_reconnected(self) -> None:
        """Notes that the connection is back (connection's nats-py callback): drops the reply cache,
        probes open circuits, tells listeners."""
        self._connected.set()
        self._parked.clear()  # sent with the reconnect: from now on in flight like any other call
        self.cache.clear_all()  # the invalidations published while away were missed
        self.probe_open_circuits()
        for listener in list(self._reconnect_listeners):
            try:
                listener()
            except Exception:
                log.exception("reconnect listener failed")

    def add_reconnect_listener(self, listener: Callable[[], None]) -> None:
        """Calls ``listener()`` each time the connection comes back (the host beats at once then)."""
        self._reconnect_listeners.append(listener)

    def remove_reconnect_listener(self, listener: Callable[[], None]) -> None:
        """Stops calling ``listener`` on reconnect."""
        if listener in self._reconnect_listeners:
            self._reconnect_listeners.remove(listener)

    def _resubscribing(self, service: str) -> bool:
        """Whether ``service`` had instances when this connection last broke and has not beaten since."""
        registry = self.registry
        return (
            registry is not None
            and registry.last_beat(service) < self._disconnected_at
            and bool(registry.instances(service))
        )

    async def _recover(self, service: str, idempotent: bool, error: Exception, deadline: float) -> bool:
        """Waits, within ``deadline`` (loop clock), for what makes retrying ``error`` at once worth it.

        After an outage of this connection: a :class:`ConnectionLost` of an idempotent call waits
        for the reconnect, and a :class:`NoResponders` of a service that has not beaten since the
        outage waits for its next beat (its instances resubscribe as they reconnect, and beat then).
        """
        wait = deadline - self._loop_time()
        if wait <= 0:
            return False
        if isinstance(error, ConnectionLost) and idempotent and not self._connected.is_set() and not self._closed:
            try:
                await asyncio.wait_for(self._connected.wait(), wait)
            except TimeoutError:
                return False
            return True
        if isinstance(error, NoResponders) and error.resubscribing and self.registry is not None:
            return await self.registry.next_beat(service, wait)
        return False

    def probe_open_circuits(self) -> None:
        """Restarts heartbeat expiry and half-opens every open circuit; called on reconnect.

        Calls that timed out and beats that were missed through a hung connection (SIGSTOPped
        server, RELIABILITY F5) open circuits, though the failure was the connection's: probe the
        services through the new one at once rather than wait for a heartbeat or the open wait.
        """
        if self.registry is not None:
            self.registry.restart_expiry()
        if self.circuits is not None:
            for service in self.circuits:
                self.circuits.get(service).probe_now()

    def _on_registry_change(self, service: str, instance: InstanceState, event: str) -> None:
        """Opens a service's circuit when its last live instance goes; a live instance's beat half-opens it.

        A draining or unhealthy beat heard before the registry has listened for a heartbeat interval
        opens nothing: the instances it has not heard yet may be live (a caller started during a
        rolling deploy). Calls then go to the queue group; an instance that expires opens it as ever."""
        assert self.circuits is not None
        registry = self.registry
        assert registry is not None
        breaker = self.circuits.get(service)
        if instance.live and event != "removed":
            if breaker.state is State.OPEN:
                breaker.on_heartbeat()
        elif not registry.live(service) and (event == "removed" or registry.heard_all(instance.interval)):
            breaker.set_alive(False)

    def _on_leaving(self, service: str, instance: InstanceState, event: str) -> None:
        """Keeps :attr:`_detours` of ``service``: set while one of its instances drains and others
        are live, until the draining one expires."""
        if event == "beat" or (service not in self._detours and not instance.draining):
            return  # neither who drains nor who is live changed, or nobody drains: no detour to keep
        assert self.registry is not None
        instances = self.registry.instances(service)
        if any(other.draining for other in instances):
            # The live instances heard, and those a draining beat names as staying that were not
            # heard at all (a registry younger than their interval): not those heard draining or ill.
            known = {other.id for other in instances}
            live = [other.id for other in instances if other.live and protocol.valid_name(other.id)]
            for other in instances:
                live += [named for named in other.staying if named not in known and named not in live]
            if live:
                self._detours[service] = tuple(live)
                return
        self._detours.pop(service, None)

    def _detour(self, service: str, method: str, live: tuple[str, ...]) -> str:
        """The subject of a call made while an instance of ``service`` leaves: one of its live
        instances' own, chosen at random (streams still go through the queue group: a stream
        request that the connection's permissions refuse there fails after it was handed to its
        consumer, too late to be sent again through the queue group).

        A queue group member that unsubscribes on a cluster loses the requests other servers route
        to it before they learn it left (nats-server drops them: the callers time out; see
        docs/operations.md). The leaving instance says it drains in a last heartbeat, and waits
        (``Host(leave_grace=...)``) before it unsubscribes: calls sent to the others' own subjects
        meanwhile cannot reach it. Retries go through the queue group again."""
        instance = live[0] if len(live) == 1 else live[random.randrange(len(live))]
        subject = self._subjects.get((service, method, instance))
        return subject if subject is not None else self._subject(service, method, instance)

    async def _request_detoured(
        self,
        subject: str,
        body: bytes,
        options: CallOptions | None,
        headers: dict[str, str] | None,
        service: str,
        breaker: CircuitBreaker | None,
        queue: str = "",
    ) -> Reply:
        """:meth:`_request` of a call sent to an instance's own subject by :meth:`_detour`. A
        connection whose permissions refuse that subject (they allow the queue group's only) sends
        the call again there, and takes no more detours for the service during this leave."""
        try:
            return await self._request(subject, body, options, headers, service, breaker, queue)
        except PermissionDenied:
            self._detours.pop(service, None)
            return await self._request(queue, body, options, headers, service, breaker)

    def _gone_from_detour(self, service: str, subject: str) -> None:
        """Takes an instance that a detoured call found gone (no responders on its own subject, its
        retry went through the queue group) out of ``service``'s detour: a stale name."""
        live = self._detours.get(service)
        if live is None:
            return
        gone = subject.rpartition(".")[2]
        rest = tuple(instance for instance in live if instance != gone)
        if rest:
            self._detours[service] = rest
        else:
            self._detours.pop(service, None)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def pending_calls(self) -> int:
        """The number of calls waiting for a reply (0 when idle: nothing leaks)."""
        return len(self._pending)

    def proxy(self, service: type[S], **options: Any) -> S:
        """Returns a typed proxy: ``client.proxy(KV).get("a")``, checked by mypy against ``KV``.

        Args:
            service: the Service class (only its signatures are used; it is not instantiated).
            **options: call options (``timeout``, ``headers``, ``encoding``).
        """
        # The proxy mirrors S's @rpc methods, so mypy checks calls against S itself.
        return cast(S, TypedProxy(self, service, self.default_options.merged(**options)))  # type: ignore[arg-type]

    async def close(self) -> None:
        """Fails pending calls with ClientClosed, then drains and closes the connection if owned."""
        if self._closed:
            return
        self._closed = True
        self._connected.set()  # calls waiting for a reconnect retry now, and fail with ClientClosed
        if self.registry is not None:
            await self.registry.stop()
        self.fail_pending(ClientClosed("the client was closed while the call was pending"))
        self._fail_streams(ClientClosed("the client was closed during the stream"))
        # Spawned calls now end with ClientClosed (failed above, or refused by the closed flag):
        # await them rather than cancel them, so awaiting one raises ClientClosed, not CancelledError.
        tasks = self._tasks - {asyncio.current_task()}
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=1.0)
            for task in stuck:
                task.cancel()
        if self._owns_connection and not self.nc.is_closed:
            try:
                await self.nc.drain()
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                log.warning("drain failed, closing", error=repr(exc))
                try:
                    await self.nc.close()
                except OSError as close_exc:
                    # nats-py flushes its reconnect buffer into the dead socket and stops half-way
                    # (already CLOSED, socket still open): close the socket so nothing leaks.
                    log.warning("close failed, dropping the socket", error=repr(close_exc))
                    transport.drop_socket(self.nc)

    def _fail_streams(self, error: CallError) -> None:
        """Fails every stream in progress (its messages sent meanwhile are lost, so it cannot go on)."""
        for receiver in list(self._streams.values()):
            receiver.fail(error)
            receiver.cancel()

    def fail_pending(self, error: Exception, keep: set[str] | frozenset[str] = frozenset()) -> None:
        """Fails every pending call with ``error`` (the connection broke or closed), but those in ``keep``."""
        pending, self._pending = self._pending, {}
        for token, future in pending.items():
            if token in keep:
                self._pending[token] = future
            elif not future.done():
                future.set_exception(error)

    def refuse(self, operation: str, subject: str) -> None:
        """Fails the pending calls a permissions violation refused (error_cb calls it); see :class:`PermissionDenied`.

        Args:
            operation: ``"publish"`` (the calls to ``subject``, and its streams not yet started,
                fail) or ``"subscription"`` (when ``subject`` is the reply inbox, every call fails,
                now and later: no reply can arrive).
            subject: the refused subject, lower-cased as nats-py reports it.
        """
        if operation == "subscription":
            if subject == (self._inbox + "*").lower():
                self._broken = PermissionDenied(
                    f"the server refused this connection's reply subscription {self._inbox}*: connect with an "
                    "inbox_prefix that its subscribe permission allows (e.g. inbox_prefix='_INBOX_app')"
                )
                self.fail_pending(self._broken)
                self._fail_streams(self._broken)
            elif subject == protocol.invalidation_wildcard(self.prefix).lower():
                self._deaf(f"the server refused the subscription to {subject}: allow subscribing to it")
            return
        for token, called in list(self._called.items()):
            if called.lower() == subject:
                future = self._pending.pop(token, None)
                if future is not None and not future.done():
                    future.set_exception(_publish_refused(called))
        for waiting in list(self._refusables):
            if waiting.subject.lower() == subject and waiting.refused is None:
                waiting.refused = _publish_refused(waiting.subject)
                waiting.task.cancel()  # it raises the refusal instead of waiting for an answer that cannot come
        for receiver in list(self._streams.values()):
            if not receiver.control and receiver.subject.lower() == subject:  # its request, not yet answered
                receiver.fail(_publish_refused(receiver.subject))
            elif receiver.control and receiver.control.lower() == subject:  # its acks: the server stops sending
                receiver.fail(
                    _publish_refused(
                        receiver.control,
                        f", the control subject of its stream from {receiver.subject}: "
                        f"allow publishing {self.prefix}._ctl.>",
                    )
                )

    def end(self, error: CallError) -> None:
        """Ends the connection for good (the server refused the credentials on a reconnect, say).

        Pending calls fail with ``error`` now, and so does every later call; the connection is
        closed, so nats-py stops reconnecting.
        """
        if self._broken is None:
            self._broken = error
        self.fail_pending(error)
        self._fail_streams(error)
        self._connected.set()  # calls waiting for a reconnect retry now, and fail with ``error``
        if not self.nc.is_closed:
            self.spawn(self._close_connection())

    async def _close_connection(self) -> None:
        """Closes the connection without draining (the server is gone or refuses us)."""
        try:
            await self.nc.close()
        except (OSError, nats.errors.Error) as exc:
            log.debug("close failed, dropping the socket", error=repr(exc))
            transport.drop_socket(self.nc)

    def spawn(self, coro: Awaitable[S]) -> asyncio.Task[S]:
        """Starts ``coro`` as a task the client tracks (awaited on close, where its call fails with ClientClosed)."""
        task: asyncio.Task[S] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def invoke(
        self,
        service: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        options: CallOptions | None,
        spawn: bool,
        result: Any = None,
    ) -> Any:
        """Returns the call to await or iterate (a :class:`~natsrpc.proxy.Call`), or a started task
        when ``spawn`` (the proxies use this)."""
        if spawn:
            return self.spawn(self.call(service, method, args, kwargs, options, result))
        return Call(self, service, method, args, kwargs, options, result)

    def call(
        self,
        service: str,
        method: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        options: CallOptions | None = None,
        result: Any = None,
    ) -> Coroutine[Any, Any, Any]:
        """Calls ``service.method``: await it for the decoded reply (the proxies call this).

        Args:
            service: service name.
            method: endpoint name.
            args: positional arguments.
            kwargs: named arguments.
            options: timeout, headers, encoding.
            result: a msgspec decoder for the return type, or None for plain values.

        Raises:
            CallError: a subclass says why (RemoteError, NoResponders, CallTimeout, ...).
        """
        opts = options or self.default_options
        if self._middleware is not None:
            return self._call_through(service, method, args, kwargs, opts, result)
        return self._call(service, method, args, kwargs, opts, result, None)  # observers, if any, run in it

    async def _call(
        self,
        service: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any] | None,
        opts: CallOptions,
        result: Any,
        _through: Invocation | None,
    ) -> Any:
        """:meth:`call` itself: after the chain (``_through`` is the call as the middleware left
        it), or with the observers run here when there is no chain (one coroutine frame fewer)."""
        observers = None
        if _through is None and self._observers is not None:
            observers = self._observers
            _through = self._invocation(service, method, args, kwargs or {}, opts, False)
            states = observers.begin(_through)  # in line, outermost first; one raising refuses the call
        try:
            subject = self._subjects.get((service, method, opts.instance))
            if subject is None:
                subject = self._subject(service, method, opts.instance)
            if self.registry is not None:
                unary = self.registry.unary_methods(service)
                if unary is not None and method not in unary:
                    self._refuse_unknown(service, method)
            body, mixed = codec.encode_arguments(args, kwargs or {}, opts.msgpack)
            headers = {protocol.ARGS_FORM: protocol.MIXED_ARGS} if mixed else None
            if _through is not None and _through.headers:  # names are checked as they are encoded; not changed
                headers = _through.headers if headers is None else {**_through.headers, **headers}
            # One instance: no load balancing, so no circuit of the whole service.
            breaker = self.circuits.get(service) if self.circuits is not None and not opts.instance else None
            cached = self.registry is not None and self.registry.cached
            ttl = self._cache_ttl(service, method, opts) if cached else None
            queue, send = subject, self._request
            if self._detours and not opts.instance and (live := self._detours.get(service)) is not None:
                subject, send = self._detour(service, method, live), self._request_detoured
            if ttl is not None and not self._invalidations.done():  # the first cached call: hear invalidations
                ttl = await self._hearing(ttl, opts.timeout)  # before keeping (a refused subscription: not kept)
            if ttl is None:
                data, reply_headers = await send(subject, body, opts, headers, service, breaker, queue)
            else:
                key = (service, method, opts.msgpack, body, varied(opts.headers, headers))
                kept = self.cache.get(key) if opts.cache else None
                for hook in self._cache_hooks:
                    hook(service, method, kept is not None)
                if kept is not None:
                    data, reply_headers = kept, None
                else:
                    epoch = self.cache.epoch(service, method)
                    data, reply_headers = await send(subject, body, opts, headers, service, breaker, queue)
                    self.cache.put(key, data, ttl, args, kwargs or {}, epoch)
            if _through is not None:
                _through.reply_headers = reply_headers
            try:
                if result is not None:
                    value = result.decode(data)
                else:
                    value = codec.decode(data, opts.msgpack) if data else None
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
                error = BadReply(f"the reply of {service}.{method} does not decode: {exc}")
                error.hop = f"{service}.{method}"
                raise error from exc
        except BaseException as exc:
            if observers is not None:
                observers.end(_through, states, exc)  # type: ignore[arg-type]
            raise
        if observers is not None:
            observers.end(_through, states, None)  # type: ignore[arg-type]
        return value

    async def _call_through(
        self,
        service: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any] | None,
        opts: CallOptions,
        result: Any,
    ) -> Any:
        """:meth:`call` through the chain: the observers in line, then the chain, and last the call itself."""
        assert self._middleware is not None
        through = self._invocation(service, method, args, kwargs or {}, opts, False)
        observers = self._observers
        states = observers.begin(through) if observers is not None else None

        def call_itself() -> Awaitable[Any]:
            return self._call(service, method, through.args, through.kwargs, opts, result, through)

        try:
            value = await self._middleware(through, call_itself)
        except BaseException as exc:
            if observers is not None:
                observers.end(through, states, exc)
            raise
        if observers is not None:
            observers.end(through, states, None)
        return value

    def _invocation(
        self,
        service: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        opts: CallOptions,
        streaming: bool,
    ) -> Invocation:
        """What the middleware is told of a call about to be made."""
        call = context.active_call()
        now = time.time()
        deadline = now + opts.timeout
        if call is not None:
            deadline = min(deadline, call.deadline)
            caller, trace_id = call.instance, call.trace_id
        else:
            caller = self.caller
            parent = opts.headers.get(protocol.TRACEPARENT, "") if opts.headers else ""
            trace_id = parent[3:35] if parent and context.valid_traceparent(parent) else ""
        return Invocation("client", service, method, args, kwargs, {}, deadline, caller, streaming, "", call, trace_id)

    def _cache_ttl(self, service: str, method: str, opts: CallOptions) -> float | None:
        """Returns how long a reply of ``service.method`` may be kept, or None (not cached, or a call
        to one instance). The first time any method is cached, subscribes to invalidations."""
        assert self.registry is not None
        ttl = self.registry.cached.get((service, method))
        if ttl is None or opts.instance or self.cache.max_entries <= 0 or not self.hears_invalidations:
            return None
        if self._invalidations is None:
            self._invalidations = self.spawn(self._listen_for_invalidations())
        return ttl

    async def emit(
        self,
        event_type: str,
        value: Any,
        *,
        encoding: str | None = None,
        durable: bool = False,
        msg_id: str | None = None,
    ) -> None:
        """Publishes an event on ``evt.<event_type>``: every service handling it gets it (pooled:
        one instance of each; broadcast: all). Inside a handler the trace and caller travel along.

        Args:
            event_type: dot-separated name tokens (``order.created``); no wildcards.
            value: the payload, encoded like a call's arguments (a Struct, dataclass, dict, ...).
            encoding: ``"json"`` or ``"msgpack"``; the client's default when None.
            durable: publish through JetStream and wait for its acknowledgement (the event is
                stored in the ``EVENTS`` stream), with a ``Nats-Msg-Id`` so that an emit retried
                with the same ``msg_id`` is stored once.
            msg_id: the ``Nats-Msg-Id`` of a durable emit (a random one when None).

        Raises:
            ConfigurationError: the type is not an event type, or the value cannot be encoded
                (nothing is published then).
            CallError: it could not be published (closed, too large; durable: not permitted, no
                stream stores it, no acknowledgement in time). A plain emit is at most once: one
                the server's permissions refuse is logged (the connection's error callback), not raised.
        """
        if not isinstance(event_type, str) or (
            event_type not in self._event_types and not self._checked_event_type(event_type)
        ):
            raise ConfigurationError(
                f"event type {event_type!r} must be dot-separated tokens matching {protocol.NAME_PATTERN.pattern}"
            )
        if encoding is not None:
            check_encoding(encoding)
        msgpack = self.default_options.msgpack if encoding is None else encoding == "msgpack"
        try:
            body = codec.encode(value, msgpack)
        except (TypeError, ValueError, msgspec.EncodeError) as exc:
            raise ConfigurationError(f"event {event_type}: the value cannot be encoded: {exc}") from None
        headers: dict[str, str] = {}
        call = context.active_call()
        if call is not None:
            headers[protocol.TRACEPARENT] = call.traceparent
            headers[protocol.CALLER] = call.instance
        elif self.caller != "client":
            headers[protocol.CALLER] = self.caller
        if msgpack:
            headers[protocol.CONTENT_TYPE] = protocol.MSGPACK
        if durable:
            if msg_id is not None and (not isinstance(msg_id, str) or not msg_id or not msg_id.isprintable()):
                raise ConfigurationError(f"msg_id must be a printable, non-empty string, got {msg_id!r}")
            headers[JS_MSG_ID] = msg_id or os.urandom(12).hex()
        subject = protocol.event_subject(event_type)
        block = protocol.encode_headers(headers)
        if len(body) + len(block) > self.nc.max_payload:
            raise PayloadTooLarge(f"event {event_type} is {len(body)} bytes, over max_payload {self.nc.max_payload}")
        if self._closed:
            raise ClientClosed("the client is closed")
        if durable:
            await self._emit_durable(subject, body, headers)
        elif not transport.send(self.nc, subject, "", body, block):  # not connected, or buffer full
            with translate_nats_errors(subject):
                await transport.publish(self.nc, subject, body, headers=headers or None)

    async def _emit_durable(self, subject: str, body: bytes, headers: dict[str, str]) -> None:
        """Publishes an event through JetStream and waits for its acknowledgement, or for the
        server's refusal of the publish (:meth:`refuse`): PermissionDenied at once, not a timeout."""
        with translate_nats_errors(subject), self._refusable(subject):
            try:
                await self.nc.jetstream().publish(subject, body, timeout=self.default_options.timeout, headers=headers)
            except nats.js.errors.NoStreamResponseError:
                raise NoResponders(
                    f"no JetStream stream stores {subject}: start a host with a durable handler (it creates "
                    "EVENTS), on a nats-server with JetStream (-js)"
                ) from None

    @contextlib.contextmanager
    def _refusable(self, subject: str) -> Iterator[None]:
        """Runs the block (a publish to ``subject``, then a wait for the server: an ack, a flush)
        so that the server's refusal of the publish (:meth:`refuse`) ends the wait at once with
        PermissionDenied: the server answers a refused publish with an error, and nothing else."""
        task = asyncio.current_task()
        assert task is not None
        waiting = _Refusable(subject, task)
        self._refusables.add(waiting)
        try:
            yield
        except asyncio.CancelledError:
            if waiting.refused is None or task.uncancel() > 0:  # cancelled by its caller (too)
                raise
            raise waiting.refused from None
        finally:
            self._refusables.discard(waiting)
        if waiting.refused is not None:  # the answer came with the refusal: asyncio.wait_for took it, not the cancel
            task.uncancel()
            raise waiting.refused

    def _checked_event_type(self, event_type: str) -> bool:
        """Checks an event type once; a valid one is remembered (up to MAX_CACHED_SUBJECTS)."""
        if not protocol.valid_event_type(event_type):
            return False
        if len(self._event_types) >= MAX_CACHED_SUBJECTS:
            self._event_types.clear()
        self._event_types.add(event_type)
        return True

    async def publish_invalidation(self, service: str, body: bytes) -> None:
        """Publishes a cache invalidation of ``service`` (:meth:`natsrpc.Service.invalidate` calls
        this) and returns once the server has it: the server then passes it on to every client
        subscribed (at most once, as any NATS message).

        Raises:
            PermissionDenied: the server refused the publish (allow publishing ``svc._inval.<service>``).
            CallTimeout: the server did not confirm it within the client's timeout (the connection
                is down: it is sent when it comes back).
            CallError: it could not be sent (closed, ...).
        """
        subject = protocol.invalidation_subject(service, self.prefix)
        with translate_nats_errors(subject), self._refusable(subject):
            await transport.publish(self.nc, subject, body)
            await self._synced()  # a refusal comes first

    async def _listen_for_invalidations(self) -> Any:
        """Subscribes to services' cache invalidations, and waits until the server has the
        subscription: a refusal (:meth:`refuse`) is known by then, and this client keeps nothing."""
        wildcard = protocol.invalidation_wildcard(self.prefix)
        head = wildcard[:-1]

        def on_invalidation(subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
            service = subject[len(head) :]
            if protocol.valid_name(service):
                self.cache.on_invalidation(service, data)

        try:
            sub = await transport.subscribe(self.nc, wildcard, on_invalidation)
        except nats.errors.Error as exc:
            self._deaf(repr(exc))
            return None
        with contextlib.suppress(TimeoutError, nats.errors.Error):  # not confirmed: a later refusal still counts
            await self._synced()
        return sub

    async def _synced(self) -> None:
        """Returns once the server has processed what this client sent so far (its error for a
        refused publish or subscription reached :meth:`refuse` first); TimeoutError after the
        client's timeout."""
        async with asyncio.timeout(self.default_options.timeout):
            await transport.sync_with_server(self.nc)

    async def _hearing(self, ttl: float, within: float) -> float | None:
        """Waits (up to ``within`` seconds) until the server has this client's subscription to
        invalidations; returns ``ttl``, or None when the reply may not be kept (refused, not yet
        confirmed)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await asyncio.shield(self._invalidations)  # other calls wait for the same subscription
        return ttl if self._invalidations.done() and self.hears_invalidations else None

    def _deaf(self, why: str) -> None:
        """This client cannot hear cache invalidations: it keeps no reply from now on (a kept one
        could outlive the write that invalidated it), and drops those it kept."""
        if self.hears_invalidations:
            self.hears_invalidations = False
            self.cache.clear_all()
            log.warning(
                "cache invalidations cannot be heard: replies are not cached", error=why,
                subject=protocol.invalidation_wildcard(self.prefix),
            )  # fmt: skip

    def _refuse_unknown(self, service: str, method: str, streaming: bool = False) -> None:
        """Raises, without sending, for a method discovery says the service lacks, or serves the other way.

        Raises:
            NotFound: no instance of the service has the method.
            BadRequest: the method streams and was awaited (or, with ``streaming``, the reverse is fine).
        """
        assert self.registry is not None
        methods = self.registry.methods(service) or frozenset()
        if method not in methods:
            error: CallError = NotFound(f"{service} has no method {method!r} (it has: {', '.join(sorted(methods))})")
        elif streaming:
            return
        else:
            error = streaming_awaited(f"{service}.{method}")
        error.hop = f"{service}.{method}"
        raise error

    def stream(
        self,
        service: str,
        method: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        options: CallOptions | None = None,
        result: Any = None,
        *,
        window: int = protocol.DEFAULT_WINDOW,
    ) -> consume.Stream[Any]:
        """Calls a streaming endpoint; returns its items as an async iterator (the request goes out on
        the first ``__anext__``).

        A unary endpoint called this way gives its one result as the only item. The stream's
        timeout bounds the whole stream. Streams are neither retried nor counted by the circuit
        breaker: once items flowed, a retry would repeat them.

        Args:
            service, method, args, kwargs, options, result: as for :meth:`call`.
            window: the most items the server may send beyond those consumed (flow control).

        Raises:
            ConfigurationError: a name or the window is unusable.
        """
        opts = options or self.default_options
        subject = self._subjects.get((service, method, opts.instance))
        if subject is None:
            subject = self._subject(service, method, opts.instance)
        body, mixed = codec.encode_arguments(args, kwargs or {}, opts.msgpack)
        extra: dict[str, str] = {}
        around = None
        if self._stream_chain is not None:
            through = self._invocation(service, method, args, kwargs or {}, opts, True)
            extra = through.headers
            around = functools.partial(self._stream_chain, through)
        if mixed:
            extra[protocol.ARGS_FORM] = protocol.MIXED_ARGS
        return self._stream(
            subject, service, method, body, opts, extra, consume.decoder_of(result, opts.msgpack), window, around
        )

    def stream_request(
        self,
        subject: str,
        body: bytes,
        options: CallOptions | None = None,
        headers: dict[str, str] | None = None,
        *,
        window: int = protocol.DEFAULT_WINDOW,
    ) -> consume.Stream[bytes]:
        """Sends an encoded request as a stream request; its items are the raw message bodies.

        The command line's ``call`` uses it: a unary endpoint's reply comes as the only item.

        Raises:
            ConfigurationError: the subject is not a call subject under this client's prefix, or a
                header or the window is unusable.
        """
        service = protocol.call_service_name(subject, self.prefix)
        if not protocol.valid_subject(subject) or not protocol.valid_name(service):
            raise ConfigurationError(f"subject {subject!r} is not a call subject (<prefix>.<service>.<method>)")
        if headers:
            check_headers(headers)
        return self._stream(
            subject, service, "", body, options or self.default_options, dict(headers or {}), None, window
        )

    def _stream(
        self,
        subject: str,
        service: str,
        method: str,
        body: bytes,
        opts: CallOptions,
        extra: dict[str, str],
        decode: Callable[[bytes], Any] | None,
        window: int,
        around: Any = None,
    ) -> consume.Stream[Any]:
        """Returns the stream of one request, sent on its first ``__anext__`` (inside ``around``, the
        middleware chain, when there is one: ``extra`` is then the headers the middleware adds to)."""
        if isinstance(window, bool) or not isinstance(window, int) or not 0 < window <= protocol.MAX_WINDOW:
            raise ConfigurationError(f"window must be a whole number from 1 to {protocol.MAX_WINDOW}, got {window!r}")
        extra[protocol.STREAM] = str(window)

        def open_stream() -> consume.Receiver:
            if self._closed:
                raise ClientClosed("the client is closed")
            if self._broken is not None:
                raise self._broken
            if method and self.registry is not None and self.registry.methods(service) is not None:
                self._refuse_unknown(service, method, streaming=True)
            headers, timeout = self._headers(subject, opts, extra)
            try:
                block = protocol.encode_headers(headers)
            except ValueError as exc:  # a header name a middleware added
                raise ConfigurationError(str(exc)) from None
            if len(body) + len(block) > self.nc.max_payload:
                raise PayloadTooLarge(
                    f"request to {subject} is {len(body) + len(block)} bytes with headers, "
                    f"over max_payload {self.nc.max_payload}"
                )
            token = self._token()
            reply = self._inbox + token
            receiver = consume.Receiver(
                self.nc, subject, reply, service, self.prefix, window, decode, self._forget_stream
            )
            receiver.expire_at(self._loop_time() + timeout, timeout)
            self._streams[token] = receiver
            if not transport.send(self.nc, subject, reply, body, block):
                self.spawn(self._send_stream_request(receiver, subject, body, headers))
            return receiver

        return consume.Stream(open_stream, around)

    def _forget_stream(self, receiver: consume.Receiver) -> None:
        self._streams.pop(receiver.reply[len(self._inbox) :], None)

    async def _send_stream_request(
        self, receiver: consume.Receiver, subject: str, body: bytes, headers: dict[str, str]
    ) -> None:
        try:
            await transport.publish(self.nc, subject, body, receiver.reply, headers)
        except nats.errors.Error as exc:
            try:
                with translate_nats_errors(subject):
                    raise exc from None
            except CallError as error:
                receiver.fail(error)

    def _subject(self, service: str, method: str, instance: str | None) -> str:
        """Returns the subject of a call, after checking its names (cached: the check runs once per name).

        Raises:
            ConfigurationError: a name is not one subject token.
        """
        for kind, name in (("service", service), ("method", method), ("instance id", instance)):
            if name is not None and not protocol.valid_name(name):
                raise ConfigurationError(f"{kind} name {name!r} must match {protocol.NAME_PATTERN.pattern}")
        if instance:
            subject = protocol.instance_subject(service, method, instance, self.prefix)
        else:
            subject = protocol.endpoint_subject(service, method, self.prefix)
        if len(self._subjects) >= MAX_CACHED_SUBJECTS:
            self._subjects.clear()
        self._subjects[(service, method, instance)] = subject
        return subject

    def _token(self) -> str:
        """Returns a fresh reply token: 96 random bits, unguessable (no one who saw an inbox can aim a
        reply at the next call). Drawn from a buffer of ``os.urandom``, refilled every 1024 calls."""
        start = self._random_at
        if start >= len(self._random):
            self._random, start = os.urandom(_TOKEN_BYTES * 1024), 0
        self._random_at = start + _TOKEN_BYTES
        return self._random[start : start + _TOKEN_BYTES].hex()

    async def request(
        self,
        subject: str,
        body: bytes,
        options: CallOptions | None = None,
        headers: dict[str, str] | None = None,
        *,
        service: str = "",
        breaker: CircuitBreaker | None = None,
    ) -> Msg:
        """Sends a request with a deadline, retrying as the options allow; returns the successful reply.

        The first attempt is the fast path; only a failed one enters the retry loop.

        Args:
            subject: the subject to send to.
            body: the encoded arguments.
            options: timeout, retry policy, idempotence, headers, encoding.
            headers: extra headers for this request.
            service: the service called (its retry budget); taken from ``subject`` when empty.
            breaker: the circuit breaker to consult and feed, if any.

        Returns:
            The reply: ``.data`` and ``.headers`` (``.subject`` is empty).

        Raises:
            RemoteError: the reply is an error reply.
            NoResponders, CallTimeout, CircuitOpen, PayloadTooLarge, ConnectionLost, ClientClosed,
            DeadlineExceeded: see their docstrings; ``.hop`` names the subject's service.method.
        """
        if not protocol.valid_subject(subject):
            raise ConfigurationError(f"subject {subject!r} is not a publishable NATS subject")
        if headers:
            check_headers(headers)
        data, reply_headers = await self._request(subject, body, options, headers, service, breaker)
        return Msg(self.nc, "", "", data, reply_headers)

    async def _request(
        self,
        subject: str,
        body: bytes,
        options: CallOptions | None,
        headers: dict[str, str] | None,
        service: str,
        breaker: CircuitBreaker | None,
        queue: str = "",
    ) -> Reply:
        """:meth:`request`, returning the reply's data and headers (``subject`` is checked already;
        retries go to ``queue`` when given: the queue group's subject of a call sent past it)."""
        try:
            opts = options or self.default_options
            headers, timeout = self._headers(subject, opts, headers)
            try:
                block = protocol.encode_headers(headers)
            except ValueError as exc:
                raise ConfigurationError(str(exc)) from None
            size = len(body) + len(block)
            if size > self.nc.max_payload:
                limit = self.nc.max_payload
                raise PayloadTooLarge(f"request to {subject} is {size} bytes with headers, over max_payload {limit}")
            started = self._loop_time()
            # The breaker counts calls, not attempts: one ticket, and one outcome, per call.
            ticket = breaker.allow() if breaker is not None else 0
            try:
                reply = await self._attempt(subject, body, headers, block, _attempt_wait(timeout, opts))
            except BaseException as exc:
                if not isinstance(exc, CallError) or opts.retry.max_attempts == 1:
                    if breaker is not None:
                        breaker.record(exc, ticket)
                    raise
                first_error: CallError = exc
                if queue and queue != subject and isinstance(exc, NoResponders):
                    self._gone_from_detour(service, subject)
            else:
                if breaker is not None:
                    breaker.record(None, ticket)
                bucket = self._buckets.get(service)
                if bucket is not None:
                    bucket.record_success()
                return reply
            try:
                reply = await self._retry(
                    queue or subject, body, (headers, block), opts, service, started + timeout, first_error
                )
            except BaseException as exc:
                if breaker is not None:
                    breaker.record(exc, ticket)
                raise
            if breaker is not None:
                breaker.record(None, ticket)
            return reply
        except CallError as exc:
            if not exc.hop:
                exc.hop = subject[len(self.prefix) + 1 :] if subject.startswith(self.prefix + ".") else subject
            raise

    async def _retry(
        self,
        subject: str,
        body: bytes,
        headers: tuple[dict[str, str], bytes],
        opts: CallOptions,
        service: str,
        deadline: float,
        first_error: CallError,
    ) -> Reply:
        """The slow path: retries after a failed first attempt, as the policy and the retry budget allow."""
        parts = subject.split(".")
        service = service or (parts[1] if len(parts) > 2 else subject)
        idempotent = opts.idempotent
        if idempotent is None:
            idempotent = self.registry is not None and len(parts) > 2 and self.registry.idempotent(service, parts[2])

        async def attempt(remaining: float) -> Reply:
            for hook in self._retry_hooks:  # every attempt here is a retry
                hook(service, parts[2] if len(parts) > 2 else "")
            return await self._attempt(subject, body, *headers, _attempt_wait(remaining, opts))

        return await run_with_retries(
            attempt,
            policy=opts.retry,
            bucket=self._bucket(service),
            idempotent=idempotent,
            deadline=deadline,
            clock=self._loop_time,
            first_error=first_error,
            recover=functools.partial(self._recover, service, idempotent),
        )

    def _bucket(self, service: str) -> TokenBucket:
        """Returns the retry budget of ``service``; past MAX_BUCKETS services the oldest budget is forgotten."""
        bucket = self._buckets.get(service)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                del self._buckets[next(iter(self._buckets))]
            bucket = self._buckets[service] = TokenBucket()
        return bucket

    async def _attempt(self, subject: str, body: bytes, headers: dict[str, str], block: bytes, wait: float) -> Reply:
        """Sends the request once (``block`` is ``headers`` encoded) and waits up to ``wait`` s for the reply."""
        if self._closed:
            raise ClientClosed("the client is closed")
        if self._broken is not None:
            raise self._broken
        loop = self._loop
        token = self._token()
        future: asyncio.Future[Reply] = loop.create_future()
        self._pending[token] = future
        self._called[token] = subject
        due = self._expiry.add(future, subject, wait)
        try:
            inbox = self._inbox + token
            if not transport.send(self.nc, subject, inbox, body, block):
                if not self.nc.is_connected:  # nats-py buffers it until it has reconnected
                    self._parked.add(token)
                try:
                    await transport.publish(self.nc, subject, body, inbox, headers)
                except nats.errors.Error as exc:
                    with translate_nats_errors(subject):
                        raise exc from None
            data, reply_headers = await future
            if reply_headers is not None and protocol.SEQ in reply_headers:
                data, reply_headers = await self._joined_reply(token, wait), None
        except asyncio.CancelledError:  # the caller gave up: the service cancels the handler too
            self._cancel_remote(subject, self._inbox + token)
            raise
        finally:
            due.pop(future, None)
            self._pending.pop(token, None)
            del self._called[token]
            if self._parked:
                self._parked.discard(token)
        if reply_headers:
            if reply_headers.get(protocol.STATUS) == protocol.NO_RESPONDERS_STATUS and not data:
                raise self._no_responders(subject)
            if protocol.ERROR_CODE in reply_headers:
                raise error_from_reply(reply_headers, data)
        return data, reply_headers

    def _no_responders(self, subject: str) -> NoResponders:
        """Returns the NoResponders of a call to ``subject``, saying which case it is when discovery knows.

        Marked ``resubscribing`` after an outage of this connection, and ``unseen`` for a service this
        client's registry never saw: neither says anything of the service's health (the circuit
        ignores both).
        """
        service = protocol.call_service_name(subject, self.prefix)
        registry = self.registry
        if not service or registry is None:
            return no_responders(subject)
        if self._resubscribing(service):
            error = NoResponders(f"no instance answers {subject} yet: {service} is resubscribing after an outage")
            error.resubscribing = True
            return error
        if not registry.known(service):
            error = NoResponders(f"no instance answers {subject}: {service} is not running (no instance of it seen)")
            error.unseen = True
            return error
        live = len(registry.live(service))
        if live:
            return NoResponders(f"no instance answers {subject}, though {service} has {live} live instance(s)")
        return NoResponders(f"no instance answers {subject}: every instance of {service} seen has gone")

    def _headers(self, subject: str, opts: CallOptions, extra: dict[str, str] | None) -> tuple[dict[str, str], float]:
        """Returns the request headers and timeout, the deadline shrunk to what the handler has left."""
        now = time.time()
        timeout = opts.timeout
        call = context.active_call()
        headers = dict(opts.headers) if opts.headers else {}
        if extra:
            headers.update(extra)
        if call is not None:
            remaining = call.deadline - now
            if remaining <= 0:
                raise DeadlineExceeded(
                    f"no time left to call {subject}: the deadline of {call.service}.{call.method} passed"
                )
            if remaining < timeout:
                timeout = remaining
            given = extra.get(protocol.TRACEPARENT) if extra else None  # a tracing middleware's span
            if given is None or not context.valid_traceparent(given):
                headers[protocol.TRACEPARENT] = call.traceparent
            headers[protocol.CALLER] = call.instance
        else:
            parent = headers.get(protocol.TRACEPARENT)
            # A caller's traceparent is checked; a tracing middleware's (in extra) is made well-formed.
            if parent is not None and (not extra or protocol.TRACEPARENT not in extra):
                if not context.valid_traceparent(parent):
                    headers[protocol.TRACEPARENT] = context.new_traceparent()
            if self.caller != "client":
                headers[protocol.CALLER] = self.caller
        headers[protocol.DEADLINE] = context.deadline_header(now + timeout)
        if opts.msgpack:
            headers[protocol.CONTENT_TYPE] = protocol.MSGPACK
        return headers, timeout

    def _resolve(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        """Hands a reply to the call waiting for it, or a stream's message to its receiver (called as
        nats-py parses the message)."""
        token = subject[len(self._inbox) :]
        future = self._pending.pop(token, None)
        if future is not None and not future.done():
            if headers is not None and protocol.SEQ in headers:  # a reply too large for one message
                self._take_chunks(token, data, headers)
            future.set_result((data, headers))
            return
        receiver = self._streams.get(token)
        if receiver is not None:
            receiver.deliver(data, headers)
        else:
            self.stray_replies += 1

    def _take_chunks(self, token: str, data: bytes, headers: dict[str, str]) -> None:
        """Starts taking a reply sent in chunks: its receiver exists before the next chunk is parsed."""
        subject = self._called.get(token, "")
        service = protocol.call_service_name(subject, self.prefix)
        receiver = consume.Receiver(
            self.nc, subject, self._inbox + token, service, self.prefix, protocol.DEFAULT_WINDOW, None,
            self._forget_stream, self.max_reply_size,
        )  # fmt: skip
        self._streams[token] = receiver
        receiver.deliver(data, headers)

    async def _joined_reply(self, token: str, wait: float) -> bytes:
        """Returns a reply sent in chunks, joined, within ``wait`` seconds."""
        receiver = self._streams.get(token)
        if receiver is None:  # its start broke the protocol, and the receiver is gone already
            raise BadReply("a reply in chunks ended before it started")
        receiver.expire_at(self._loop_time() + wait, wait)
        try:
            data: bytes = await receiver.next()
            with contextlib.suppress(StopAsyncIteration):
                await receiver.next()
        except StopAsyncIteration:
            raise BadReply(f"the reply of {receiver.subject} in chunks was empty") from None
        return data

    def _cancel_remote(self, subject: str, reply: str) -> None:
        """Tells every instance of the called service that the call replying to ``reply`` is cancelled."""
        service = protocol.call_service_name(subject, self.prefix)
        if not service:
            return
        cancels, body = protocol.cancel_subject(service, self.prefix), reply.encode()
        if not transport.send(self.nc, cancels, "", body, b""):
            self.spawn(self._publish_quietly(cancels, body))

    async def _publish_quietly(self, subject: str, body: bytes) -> None:
        try:
            await transport.publish(self.nc, subject, body)
        except nats.errors.Error as exc:
            log.debug("cancel not sent", subject=subject, error=repr(exc))


def check_cache_size(cache_size: object, cache_bytes: object = DEFAULT_CACHE_BYTES) -> None:
    """Checks the ``cache_size`` and ``cache_bytes`` options.

    Raises:
        ConfigurationError: one is not a whole number >= 0.
    """
    for name, value in (("cache_size", cache_size), ("cache_bytes", cache_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigurationError(f"{name} must be a whole number >= 0 (0: no reply cache), got {value!r}")


def check_client_options(*, timeout: object, encoding: object, prefix: object, caller: object) -> None:
    """Checks a client's options before anything connects.

    Raises:
        ConfigurationError: an option is unusable.
    """
    check_timeout("timeout", timeout)
    check_encoding(encoding)
    if not protocol.valid_prefix(prefix):
        raise ConfigurationError(f"prefix {prefix!r} is not a subject prefix (e.g. svc)")
    if not protocol.valid_caller(caller):
        raise ConfigurationError(
            f"caller {caller!r} must be a printable one-line string of 1 to {protocol.MAX_CALLER} characters"
        )


def _publish_refused(subject: str, why: str = "") -> PermissionDenied:
    """The error of what a permissions violation on ``subject`` refused (``why`` says more)."""
    return PermissionDenied(f"the server refused this connection a publish to {subject}{why}")


class _Refusable:
    """A publish waiting for the server (a durable emit for its ack, an invalidation for a flush):
    the task to stop, and why, when the server refuses the publish."""

    __slots__ = ("refused", "subject", "task")

    def __init__(self, subject: str, task: asyncio.Task[Any]) -> None:
        self.subject = subject
        self.task = task
        self.refused: PermissionDenied | None = None


def _attempt_wait(remaining: float, opts: CallOptions) -> float:
    """Returns how long one attempt may wait: what is left, or less when an attempt timeout is set."""
    if opts.attempt_timeout is None or opts.attempt_timeout >= remaining:
        return remaining
    return opts.attempt_timeout


def _expire(future: asyncio.Future[Reply], subject: str) -> None:
    if not future.done():
        future.set_exception(CallTimeout(f"no reply from {subject} before the deadline"))
