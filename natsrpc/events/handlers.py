"""Event handlers: ``@event("order.created")`` on a Service method, and their validation.

A handler takes one argument, the event's payload, annotated like an rpc argument (a Struct,
dataclass, TypedDict or plain type) and decoded and checked against it; it returns nothing.
Its pattern is an event type (``order.created``) or a NATS wildcard (``order.*``, ``order.>``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from natsrpc import protocol
from natsrpc.errors import DefinitionError

F = TypeVar("F", bound=Callable[..., Any])

_EVENT_MARK = "__natsrpc_event__"


@dataclass(frozen=True, slots=True)
class _EventOptions:
    pattern: str
    broadcast: bool
    durable: bool


def event(pattern: str, /, *, broadcast: bool = False, durable: bool = False) -> Callable[[F], F]:
    """Marks a Service method as the handler of the events ``pattern`` matches (on ``evt.<pattern>``).

    Args:
        pattern: an event type (``order.created``) or a wildcard (``order.*``, ``order.>``).
        broadcast: every instance of the service handles each event; by default (pooled) exactly
            one instance of each subscribing service does.
        durable: consume from JetStream (:mod:`natsrpc.events.durable`): kept while the service is
            down, acknowledged after the handler returns, redelivered with backoff, dead-lettered.

    Raises:
        DefinitionError: the pattern is not an event type or wildcard, or the decorated object
            is not a method.
    """
    if not protocol.valid_event_type(pattern, wildcards=True):
        raise DefinitionError(
            f"event pattern {pattern!r} must be dot-separated tokens matching {protocol.NAME_PATTERN.pattern}"
            " (or * and a last >)"
        )

    if broadcast and durable:
        raise DefinitionError(
            f"event {pattern!r}: durable handlers are pooled (one consumer per service), not broadcast"
        )

    def mark(f: F) -> F:
        if not callable(f):
            raise DefinitionError(f"@event decorates methods, got {f!r}")
        setattr(f, _EVENT_MARK, _EventOptions(pattern, broadcast, durable))
        return f

    return mark


@dataclass(frozen=True, slots=True)
class EventHandler:
    """One ``@event`` method of a Service class, validated.

    Attributes:
        pattern: the event type or wildcard it handles.
        attr: the Python method name.
        is_async: whether it is a coroutine function (a plain ``def`` runs in a worker thread).
        broadcast: every instance handles each event (no queue group).
        durable: consumed from JetStream, acknowledged after the handler.
        payload_type: the annotation of its argument.
    """

    pattern: str
    attr: str
    is_async: bool
    broadcast: bool
    durable: bool
    payload_type: Any
    json: msgspec.json.Decoder[Any]
    msgpack: msgspec.msgpack.Decoder[Any]

    def decode(self, data: bytes, msgpack: bool) -> Any:
        """Returns the payload decoded and checked against the argument's annotation.

        Raises:
            msgspec.DecodeError, msgspec.ValidationError: it does not decode or fit.
        """
        return (self.msgpack if msgpack else self.json).decode(data)


def collect_event_handlers(cls: type, where: str) -> dict[str, EventHandler]:
    """Returns the ``@event`` methods of ``cls`` by pattern (each pattern handled once per class).

    Raises:
        DefinitionError: a handler does not take exactly one annotated argument, or two share a pattern.
    """
    handlers: dict[str, EventHandler] = {}
    seen: set[str] = set()
    for klass in cls.__mro__:
        for attr, value in vars(klass).items():
            if attr in seen:
                continue
            seen.add(attr)
            options = getattr(value, _EVENT_MARK, None)
            if not isinstance(options, _EventOptions):
                continue
            at = f"{where}.{attr} (@event {options.pattern!r})"
            if options.pattern in handlers:
                raise DefinitionError(f"{at}: two methods handle the pattern {options.pattern!r}")
            params = list(inspect.signature(value).parameters.values())[1:]
            if len(params) != 1 or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
                raise DefinitionError(f"{at}: an event handler takes exactly one argument, the event's payload")
            try:
                hints = inspect.get_annotations(value, eval_str=True)
            except Exception as exc:  # NameError, SyntaxError, ... from string annotations
                raise DefinitionError(f"{at}: cannot resolve type annotations: {exc}") from exc
            if params[0].name not in hints:
                raise DefinitionError(f"{at}: argument {params[0].name!r} needs a type annotation")
            payload_type = hints[params[0].name]
            try:
                json, msgpack = msgspec.json.Decoder(payload_type), msgspec.msgpack.Decoder(payload_type)
            except TypeError as exc:
                raise DefinitionError(f"{at}: unsupported payload type: {exc}") from exc
            handlers[options.pattern] = EventHandler(
                options.pattern,
                attr,
                inspect.iscoroutinefunction(value),
                options.broadcast,
                options.durable,
                payload_type,
                json,
                msgpack,
            )
    return handlers
