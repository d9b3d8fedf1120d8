"""Middleware: code that runs around every call, on the client side and on the server side alike.

A middleware is any object (or function) with ``async def __call__(self, call, call_next)``.
``call`` is an :class:`Invocation`; ``await call_next()`` runs the rest of the chain (the next
middleware, and last the call itself) and returns its result or raises its error. The first
middleware listed is the outermost::

    class Timing:
        async def __call__(self, call, call_next):
            started = time.perf_counter()
            try:
                return await call_next()
            finally:
                log.info("call", service=call.service, method=call.method, side=call.side,
                         seconds=time.perf_counter() - started)

Installed with ``natsrpc.connect(..., middleware=[...])`` (calls made through the client, from
services too), ``Host(..., middleware=[...])`` (requests served) and the runner's
``--middleware module:attr``. A middleware may refuse a call by raising (a server-side
``ServiceError(401, ...)`` reaches the caller as a 401 before the handler runs), add request
headers (client side, ``call.headers``) or reply headers (server side, ``call.reply_headers``),
time it and count it.

For a streaming endpoint ``call.streaming`` is True and ``call_next()`` returns (None) when the
stream has ended: on the server once its last item is sent, on the client once the consumer has
taken its end (or left it).

An :class:`Observer` is a middleware that only watches (metrics, tracing): ``begin(call)``
before the call and ``end(call, state, error)`` after it, called in line. Observers listed before
any other middleware run without a coroutine frame around the call, which is most of what a
wrapping middleware costs (gRPC's stats handlers beside its interceptors are the same idea);
listed after one, they run as an ordinary layer.

With no middleware installed nothing of this runs: a call checks one attribute.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import msgspec

from natsrpc import logs
from natsrpc.context import CallContext
from natsrpc.errors import ConfigurationError

_log = logs.get_logger("natsrpc.middleware")

Next = Callable[[], Awaitable[Any]]


class Middleware(Protocol):
    """What a middleware is: awaited with the call and the rest of the chain."""

    def __call__(self, call: Invocation, call_next: Next) -> Awaitable[Any]:
        """Runs around the call; ``await call_next()`` runs it (and the middleware inside this one)."""


class Invocation(msgspec.Struct, eq=False):
    """One call as a middleware sees it.

    Attributes:
        side: ``"client"`` (a call being made) or ``"server"`` (a request being served).
        service: the service called.
        method: the endpoint called.
        args: the positional arguments (server side: as decoded for the handler).
        kwargs: the named arguments.
        headers: client side, extra request headers a middleware may add to (sent with the call);
            server side, the request's headers as received.
        reply_headers: client side, the reply's headers once ``call_next()`` returned (None for
            none); server side, headers a middleware adds to the reply.
        deadline: the call's absolute deadline, Unix epoch seconds.
        caller: who calls: ``<service>/<instance-id>`` of a calling service, or the client's
            ``caller`` name (``"client"`` by default).
        streaming: the endpoint streams (``call_next()`` returns when the stream ended).
        instance: server side, ``<service>/<instance-id>`` of the instance serving; client side, "".
        context: server side, the handler's :class:`~natsrpc.context.CallContext`; client side,
            the context of the handler making the call (None outside a handler).
    """

    # A Struct, not a class with __init__: built in C from the positional fields, half the cost
    # of a Python __init__ on every observed call. Compared and hashed by identity, as objects are.
    side: str
    service: str
    method: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    headers: Any
    deadline: float
    caller: str
    streaming: bool = False
    instance: str = ""
    context: CallContext | None = None
    _trace_id: str = ""
    reply_headers: dict[str, str] | None = None

    @property
    def trace_id(self) -> str:
        """The call's W3C trace id (32 hex digits), or "" for a client call that starts no trace."""
        if self._trace_id:
            return self._trace_id
        if self.side == "server" and self.context is not None:
            return self.context.trace_id
        return ""

    def __repr__(self) -> str:
        return f"<Invocation {self.side} {self.service}.{self.method} caller={self.caller}>"


Chain = Callable[[Invocation, Next], Awaitable[Any]]


class Observer:
    """A middleware that watches calls without wrapping them: subclass it and override
    :meth:`begin` and :meth:`end`.

    ``begin`` runs before the call (it may add request headers, client side, or refuse by
    raising) and returns any state; ``end`` gets that state and the call's error (None when it
    succeeded) once it is over. Neither may await. The observers listed first are called in line;
    one listed after a wrapping middleware runs as an ordinary layer (:meth:`__call__`), in order.
    """

    def begin(self, call: Invocation) -> Any:
        """Called before the call runs; returns what :meth:`end` is given."""
        return None

    def end(self, call: Invocation, state: Any, error: BaseException | None) -> None:
        """Called once the call is over, with ``begin``'s state and the call's error (or None)."""

    async def __call__(self, call: Invocation, call_next: Next) -> Any:
        state = self.begin(call)
        try:
            result = await call_next()
        except BaseException as exc:
            _end(self, call, state, exc)
            raise
        _end(self, call, state, None)
        return result


def _end(observer: Observer, call: Invocation, state: Any, error: BaseException | None) -> None:
    """Runs ``observer.end``; its own error is logged, not raised: the call's outcome stands."""
    try:
        observer.end(call, state, error)
    except Exception:
        _failed(observer, call)


def _failed(observer: Observer, call: Invocation) -> None:
    """Logs the error an observer's ``end`` raised (called in its ``except``)."""
    _log.exception("observer failed", observer=repr(observer), call=repr(call))


class Observers:
    """The observers at the head of a middleware list, run in line by the client and the host.

    ``begin(call)`` runs every observer's ``begin``, outermost first, and returns their states; if
    one raises, those begun are ended with its error and it is raised (there is nothing to end).
    ``end(call, states, error)`` runs each ``end``, innermost first; an observer's own error is
    logged, not raised: the call's outcome stands. One or two observers (metrics, tracing) get
    functions made for their number, with no loop: they run on every call.
    """

    __slots__ = ("begin", "end", "observers")

    begin: Callable[[Invocation], Any]
    end: Callable[[Invocation, Any, BaseException | None], None]

    def __init__(self, observers: Sequence[Observer]) -> None:
        self.observers = tuple(observers)
        count = len(self.observers)
        made = _one if count == 1 else _two if count == 2 else _many
        self.begin, self.end = made(*self.observers)


_BeginEnd = tuple[Callable[[Invocation], Any], Callable[..., None]]
"""An ``Observers.begin`` and ``Observers.end``, made for a number of observers."""


def _one(observer: Observer) -> _BeginEnd:
    """One observer: its own ``begin``, and its ``end`` with its error logged."""
    begin, end_it = observer.begin, observer.end

    def end(call: Invocation, state: Any, error: BaseException | None) -> None:
        try:
            end_it(call, state, error)
        except Exception:
            _failed(observer, call)

    return begin, end


def _two(first: Observer, second: Observer) -> _BeginEnd:
    """Two observers (metrics and tracing, usually): their states as a pair, no loop."""
    begin1, begin2, end1, end2 = first.begin, second.begin, first.end, second.end

    def begin(call: Invocation) -> tuple[Any, Any]:
        state = begin1(call)
        try:
            return state, begin2(call)
        except BaseException as exc:
            _end(first, call, state, exc)
            raise

    def end(call: Invocation, states: tuple[Any, Any], error: BaseException | None) -> None:
        state1, state2 = states
        try:
            end2(call, state2, error)
        except Exception:
            _failed(second, call)
        try:
            end1(call, state1, error)
        except Exception:
            _failed(first, call)

    return begin, end


def _many(*observers: Observer) -> _BeginEnd:
    """Three observers or more: their states in a list, in a loop."""

    def begin(call: Invocation) -> list[Any]:
        states: list[Any] = []
        try:
            for observer in observers:
                states.append(observer.begin(call))
        except BaseException as exc:
            end(call, states, exc)
            raise
        return states

    def end(call: Invocation, states: list[Any], error: BaseException | None) -> None:
        for position in range(len(states) - 1, -1, -1):  # those begun, innermost first
            _end(observers[position], call, states[position], error)

    return begin, end


def split(middleware: Sequence[Middleware] | None) -> tuple[Observers | None, Chain | None]:
    """Returns the observers at the head of ``middleware`` (run in line) and the chain of the rest.

    Raises:
        ConfigurationError: as :func:`check_middleware`.
    """
    check_middleware(middleware)
    layers = tuple(middleware or ())
    head = 0
    while head < len(layers) and isinstance(layers[head], Observer):
        head += 1
    observers = Observers(layers[:head]) if head else None  # type: ignore[arg-type]
    return observers, compose(layers[head:])


def check_middleware(middleware: object) -> None:
    """Checks a ``middleware=`` option: None, or a list of callables.

    Raises:
        ConfigurationError: it is not a list or tuple, or an entry is not callable.
    """
    if middleware is None:
        return
    if not isinstance(middleware, (list, tuple)):
        raise ConfigurationError(f"middleware must be a list of middleware, got {type(middleware).__name__}")
    for layer in middleware:
        if not callable(layer):
            raise ConfigurationError(
                f"middleware {layer!r} is not callable (it needs async __call__(self, call, call_next))"
            )


def hooks(middleware: Sequence[Middleware], name: str) -> list[Callable[..., None]]:
    """Returns the ``name`` methods of the middleware that have one (``on_retry``, ``on_circuit``,
    ``on_rejected``, ``on_cache``: told of events that are not calls), each made so that an error
    it raises is logged (the 1st, 2nd, 4th... of each hook's), not raised: a hook only watches, and
    what it is told of goes on (a refused request still gets its error reply, a retry is still made)."""
    found = ((layer, getattr(layer, name, None)) for layer in middleware)
    return [_guarded(layer, name, hook) for layer, hook in found if callable(hook)]


def _guarded(layer: Middleware, name: str, hook: Callable[..., Any]) -> Callable[..., None]:
    failed = logs.Ignored(_log)

    def guarded(*args: Any) -> None:
        try:
            hook(*args)
        except Exception as exc:
            failed("middleware hook failed", middleware=repr(layer), hook=name, error=repr(exc))

    return guarded


def compose(middleware: Sequence[Middleware] | None) -> Chain | None:
    """Returns the chain of ``middleware`` (the first is the outermost), or None for none.

    Raises:
        ConfigurationError: as :func:`check_middleware`.
    """
    check_middleware(middleware)
    if not middleware:
        return None
    layers = tuple(middleware)
    if len(layers) == 1:
        return layers[0]  # awaited as layer(call, final): nothing in between
    inner = layers[1:]

    def run(call: Invocation, final: Next) -> Awaitable[Any]:
        # Each call_next calls the next layer directly: no coroutine frame of natsrpc's in between.
        call_next = final
        for layer in reversed(inner):
            call_next = _bound(layer, call, call_next)
        return layers[0](call, call_next)

    return run


def _bound(layer: Middleware, call: Invocation, call_next: Next) -> Next:
    def step() -> Awaitable[Any]:
        return layer(call, call_next)

    return step
