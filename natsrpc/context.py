"""The context of the call being handled: deadline, caller, trace, headers (contextvars).

The host sets it for each request; outgoing calls made while handling it read it, so the
caller's remaining deadline and trace travel along service-to-service calls.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar

from natsrpc import protocol


class CallContext:
    """What a handler knows about the request it is serving.

    Attributes:
        service: the name of the service handling the call.
        method: the endpoint name.
        deadline: absolute deadline, Unix epoch seconds.
        instance: ``<service>/<instance-id>`` of the instance serving the call (the caller of
            any call it makes).
        caller: ``<service>/<instance-id>`` of the calling service, or ``"client"``.
        headers: the request headers as received.
        cancelled: True once the call was cancelled (its deadline passed, or its caller cancelled
            it): a plain ``def`` handler, which cannot be interrupted, should check it and give up.
        cancel_reason: why it was cancelled ("" while it is not).
        event_type: for an event handler, the concrete type of the event being handled
            (``order.created`` for a handler of ``order.*``); "" for a call.
    """

    __slots__ = (
        "_traceparent", "caller", "cancel_reason", "cancelled", "deadline", "event_type", "headers", "instance",
        "method", "parent", "service",
    )  # fmt: skip

    def __init__(
        self,
        service: str,
        method: str,
        deadline: float,
        instance: str = "",
        caller: str = "client",
        traceparent: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.service = service
        self.method = method
        self.deadline = deadline
        self.instance = instance
        self.caller = caller
        self.parent = traceparent
        self.headers: Mapping[str, str] = headers if headers is not None else {}
        self._traceparent = ""
        self.cancelled = False
        self.cancel_reason = ""
        self.event_type = ""

    def remaining(self) -> float:
        """Returns the seconds left before the deadline (negative once it passed)."""
        return self.deadline - time.time()

    @property
    def traceparent(self) -> str:
        """The W3C traceparent of this hop: the caller's trace with a new span, or a new trace.

        Made on first use (logging or an outgoing call), so calls that need none pay nothing.
        """
        if not self._traceparent:
            self._traceparent = new_traceparent(self.parent)
        return self._traceparent

    def adopt_traceparent(self, traceparent: str) -> None:
        """Makes ``traceparent`` (valid, as :func:`valid_traceparent`) this hop's: a tracing
        middleware's span, or its decision not to sample, travels on with the calls made from here."""
        self._traceparent = traceparent

    @property
    def trace_id(self) -> str:
        """Returns the 32-hex-digit trace id of this hop's traceparent."""
        return self.traceparent[3:35]

    def __repr__(self) -> str:
        return f"<CallContext {self.service}.{self.method} caller={self.caller} trace={self.trace_id}>"


_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_SAMPLED = 0x01

_current: ContextVar[CallContext | None] = ContextVar("natsrpc_call", default=None)


def current_call() -> CallContext:
    """Returns the context of the call the current handler is serving.

    Raises:
        LookupError: called outside a handler.
    """
    ctx = _current.get()
    if ctx is None:
        raise LookupError("natsrpc.current_call() is only available inside an @rpc handler")
    return ctx


active_call: Callable[[], CallContext | None] = _current.get
"""Returns the context of the call being served, or None outside a handler (the context
variable's own ``get``: one C call, on every call made)."""


def enter(ctx: CallContext) -> None:
    """Makes ``ctx`` the current call for the running task (each task has its own context)."""
    _current.set(ctx)


# version-trace_id-parent_id-flags; versions above 00 may append fields (W3C Trace Context §3.2).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


def parse_traceparent(value: str) -> re.Match[str] | None:
    """Returns the parts of a valid W3C traceparent, or None (not lower-case hex, all-zero ids,
    version ff, extra fields in version 00, or characters a header line cannot carry)."""
    match = _TRACEPARENT.fullmatch(value.strip())
    if (
        match is not None
        and match[1] != "ff"
        and not (match[1] == "00" and match[5])
        and match[2] != _ZERO_TRACE
        and match[3] != _ZERO_SPAN
        and (not match[5] or match[5].isprintable())
    ):
        return match
    return None


def valid_traceparent(value: str) -> bool:
    """Returns whether ``value`` is a valid W3C traceparent that may be sent as it is."""
    return parse_traceparent(value) is not None


def new_traceparent(parent: str = "") -> str:
    """Returns a traceparent for this hop: the parent's trace id with a new span id, or a new trace.

    An invalid parent (see :func:`valid_traceparent`) is ignored, as the spec requires. The parent's
    sampled flag is kept.
    """
    match = parse_traceparent(parent)
    if match is not None:
        trace_id, flags = match[2], int(match[4], 16) & _SAMPLED
    else:
        trace_id, flags = os.urandom(16).hex(), _SAMPLED
    return f"00-{trace_id}-{os.urandom(8).hex()}-{flags:02x}"


def deadline_header(deadline: float) -> str:
    """Returns the ``Natsrpc-Deadline`` value (epoch milliseconds) for an epoch-seconds deadline.

    Rounded up: a receiver's deadline is never earlier than the sender's own timer, so a
    downstream hop's 504 cannot beat the caller's CallTimeout at the very same deadline.
    """
    return str(math.ceil(deadline * 1000))


_MAX_DEADLINE_DIGITS = 15  # epoch ms has 13 digits until the year 2286; 15 allows any sane deadline


def parse_deadline(headers: Mapping[str, str] | None, default_timeout: float) -> float | None:
    """Returns the request's absolute deadline (epoch seconds), now + ``default_timeout`` without one,
    or None when the ``Natsrpc-Deadline`` header is not plausible epoch milliseconds (not ASCII
    digits, negative, over 15 digits): the request is then refused with 400."""
    if headers is not None:
        value = headers.get(protocol.DEADLINE)
        if value is not None:
            millis = protocol.parse_count(value, _MAX_DEADLINE_DIGITS)
            return None if millis is None else millis / 1000
    return time.time() + default_timeout
