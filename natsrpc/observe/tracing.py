"""OpenTelemetry spans of calls served and made, as a middleware (``pip install 'natsrpc[otel]'``).

::

    from natsrpc.observe.tracing import Tracing

    tracing = Tracing()                      # the global tracer provider, as the app configured it
    client = await natsrpc.connect(url, middleware=[tracing])
    host = natsrpc.Host(client, [Memory()], middleware=[tracing])

A CLIENT span per call made and a SERVER span per request served, named ``<service>/<method>``
with the RPC semantic conventions' attributes (``rpc.system`` = ``natsrpc``, ``rpc.service``,
``rpc.method``) and ``natsrpc.caller``. The client span's context travels in the request's
``traceparent`` (and ``tracestate``) header and is the server span's parent, and the server span
is current while the handler runs, so the calls it makes are its children: a ``memory.remember``
is one trace across every process. A request's ``tracestate`` that breaks the W3C rules (or is
over 512 characters) is dropped, as W3C allows: the server span's trace state is empty, and
:attr:`Tracing.ignored_tracestates` counts it (logged for the 1st, 2nd, 4th... only).

A failure sets the span's status to ERROR, records the exception as an event and sets
``error.type`` (and ``natsrpc.code``, a reply's code). Retries add a ``natsrpc.retry`` event to the
call's span; a call refused by an open circuit adds ``natsrpc.circuit_open``. A call to a cached
method has ``natsrpc.cache_hit`` (True when the reply cache answered it: no request was sent).

Only opentelemetry-api is needed: with no SDK configured nothing is recorded (the spans are
no-ops), and whatever SDK, sampler and exporter the application set up are used.

What a trace that is not sampled costs (``trust_parent_sampling``, the default): a request whose
``traceparent`` says "not sampled", and the calls made while serving it, get no span and ask
nothing of the SDK; their trace context still travels on. A new trace under the SDK's ratio
sampler (``TraceIdRatioBased``, alone or as ``ParentBased``'s root with its default delegates) is
decided here, by the sampler's own rule on a trace id from the SDK's id generator: only a trace
the sampler would keep is handed to the SDK, with that trace id. Under any other sampler every
new trace is asked of the SDK.
"""

from __future__ import annotations

import re
import threading
from random import getrandbits
from typing import Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("natsrpc.observe.tracing needs opentelemetry-api: pip install 'natsrpc[otel]'") from exc

from natsrpc import logs, protocol
from natsrpc.context import parse_traceparent
from natsrpc.errors import CircuitOpen, RemoteError
from natsrpc.observe.middleware import Invocation, Observer

TRACESTATE = "tracestate"
"""The W3C header carrying vendor trace state beside ``traceparent``."""

_EMPTY = otel_context.Context()
_MAX_TRACESTATE = 512  # W3C Trace Context: propagate at least 512 characters; longer ones may be dropped
_NO_SPAN = trace.INVALID_SPAN  # what get_current_span() returns when no span is current
_MAX_NAMES = 4096  # (service, method, caller) span names kept
_LOW_64 = (1 << 64) - 1  # TraceIdRatioBased decides on the trace id's low 64 bits
_VERSION_00 = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")  # one C call
_FLAGS = (TraceFlags(0), TraceFlags(TraceFlags.SAMPLED))
_FLAGS_TEXT = tuple(f"-{flags:02x}" for flags in range(256))  # a traceparent's last field
_UNSAMPLED = "02468ace"  # a traceparent's last hex digit when its sampled bit is clear

# The descriptions of the SDK samplers whose decision for a new trace is known from its trace id.
_PARENT_BASED = re.compile(
    r"ParentBased\{root:(.*),remoteParentSampled:AlwaysOnSampler,remoteParentNotSampled:AlwaysOffSampler,"
    r"localParentSampled:AlwaysOnSampler,localParentNotSampled:AlwaysOffSampler\}"
)
_RATIO = re.compile(r"TraceIdRatioBased\{([0-9.eE+-]+)\}")

# A tracestate list member, as W3C Trace Context defines it: key=value.
_STATE_KEY = r"[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13}"
_STATE_VALUE = r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_STATE_MEMBER = re.compile(f"({_STATE_KEY})=({_STATE_VALUE})")
_MAX_STATE_MEMBERS = 32

log = logs.get_logger("natsrpc.tracing")


class Tracing(Observer):
    """A middleware (an observer) that makes an OpenTelemetry span of every call, on whichever side
    it is installed.

    Args:
        tracer_provider: the provider to take the tracer from; None uses the global one (set by the
            application's SDK setup, at any time: the global provider forwards to it).
        trust_parent_sampling: a request whose ``traceparent`` says "not sampled", and the calls
            made while serving it, get no span (their trace context still travels on), and a new
            trace under a ratio sampler is decided without the SDK: parent-based sampling would
            record nothing for them anyway, and asking it costs a span's worth of CPU each. Set
            False when your sampler may record spans below an unsampled parent.
    """

    def __init__(self, tracer_provider: Any = None, *, trust_parent_sampling: bool = True) -> None:
        self.tracer = trace.get_tracer("natsrpc", tracer_provider=tracer_provider)
        self.trust_parent_sampling = trust_parent_sampling
        self._provider = tracer_provider
        self._roots: _Roots | None = None  # once the SDK is known: how new traces are decided
        self._named: dict[tuple[str, str, str], tuple[str, dict[str, str]]] = {}  # span name and attributes
        self._ignored = logs.Ignored(log)

    @property
    def ignored_tracestates(self) -> int:
        """Requests whose ``tracestate`` broke the W3C rules (or was over 512 characters): their
        span has an empty trace state, as W3C allows."""
        return self._ignored.count

    def begin(self, call: Invocation) -> tuple[Any, object] | None:
        """Starts the call's span (None when the trace is not sampled: nothing to end)."""
        if call.side == "server":
            headers = call.headers
            value = headers.get(protocol.TRACEPARENT) if headers else None
            if value and self.trust_parent_sampling and value[-1] in _UNSAMPLED and _VERSION_00.fullmatch(value):
                return None  # not sampled: the request's context (natsrpc's own) carries the decision on
            return self._serve(call, value)
        ambient = otel_context.get_current()  # empty unless a span (or baggage) was made current
        roots = self._roots
        if not ambient and call.context is None and roots is not None and roots.random and self.trust_parent_sampling:
            # The usual root call: a new trace under the SDK's ratio sampler and id generator.
            dropped = _draw(roots)
            if dropped:
                call.headers[protocol.TRACEPARENT] = dropped
                return None
            return self._start(call, None, SpanKind.CLIENT)
        return self._call(call, ambient)

    def end(self, call: Invocation, state: tuple[Any, object] | None, error: BaseException | None) -> None:
        """Ends the call's span: an error sets its status and is recorded."""
        if state is None:
            return
        span, token = state
        if error is not None and span.is_recording():
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:1024]))
            span.set_attribute("error.type", type(error).__name__)
            if isinstance(error, RemoteError):
                span.set_attribute("natsrpc.code", error.code)
            if isinstance(error, CircuitOpen):
                span.add_event("natsrpc.circuit_open", {"rpc.service": call.service})
            span.record_exception(error)
        span.end()
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]

    def _serve(self, call: Invocation, value: str | None) -> tuple[Any, object] | None:
        parts = _parts(value) if value else None
        if parts is not None:
            header = call.headers.get(TRACESTATE)
            state = _trace_state(header) if header else None
            if state is None and header:
                self._ignored("tracestate ignored", service=call.service, caller=call.caller, tracestate=header)
            return self._start(call, _under_remote(*parts, state), SpanKind.SERVER)
        if self.trust_parent_sampling and self._dropped(call):
            return None
        return self._start(call, _EMPTY, SpanKind.SERVER)

    def _call(self, call: Invocation, ambient: Any) -> tuple[Any, object] | None:
        current = trace.get_current_span(ambient) if ambient else _NO_SPAN  # a server span, the app's, or none
        if current is not _NO_SPAN and current.is_recording():
            return self._start(call, None, SpanKind.CLIENT)  # its child
        if self.trust_parent_sampling:
            if current is not _NO_SPAN and (parent := current.get_span_context()).is_valid:
                _inject(parent, call.headers)  # a span not sampled: its context travels on
                return None
            context = call.context
            if context is not None:  # inside a handler, no span current: its own context decides
                hop_traceparent = context.traceparent  # natsrpc's own: always valid
                if hop_traceparent[-1] in _UNSAMPLED:
                    return None
                hop = _parts(hop_traceparent)
                if hop is None:
                    return None
                return self._start(call, _under_remote(*hop), SpanKind.CLIENT)
            if self._dropped(call):
                return None
        return self._start(call, None, SpanKind.CLIENT)

    def _dropped(self, call: Invocation) -> bool:
        """Decides a new trace as the SDK's ratio sampler would, when it is one; True when dropped
        (the call then carries a traceparent saying so). Otherwise False: the SDK decides."""
        roots = self._roots if self._roots is not None else self._settle()
        if roots is None or roots.bound is None:
            return False
        if roots.random:
            traceparent = _draw(roots)
            if not traceparent:
                return False
        else:
            ids = roots.ids
            trace_id = ids.inner.generate_trace_id()
            if trace_id & _LOW_64 < roots.bound:
                ids.choose(trace_id)
                return False
            span_id = ids.inner.generate_span_id()
            # A generator of ids out of range makes no valid traceparent: the SDK decides the trace.
            if not 0 < trace_id < 1 << 128 or not 0 < span_id < 1 << 64:
                return False
            traceparent = _format(trace_id << 64 | span_id, roots.dropped_flags)
        if call.side == "server":
            if call.context is not None:
                call.context.adopt_traceparent(traceparent)  # the calls it makes carry the decision
        else:
            call.headers[protocol.TRACEPARENT] = traceparent
        return True

    def _settle(self) -> _Roots | None:
        """Finds the SDK's tracer and sampler once the application has set a provider (None before)."""
        provider = self._provider if self._provider is not None else trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider):
            return None  # no SDK yet: the global provider may still be set, so look again next time
        tracer = provider.get_tracer("natsrpc")
        self.tracer = tracer
        self._roots = _Roots(tracer)
        return self._roots

    def _start(self, call: Invocation, parent: Any, kind: SpanKind) -> tuple[Any, object]:
        """Starts a span of the call under ``parent`` (None: the current context); a recording
        span, and a server span, are made current; a client span's context goes in the request."""
        name, attributes = self._name(call)
        span = self.tracer.start_span(name, parent, kind, attributes)
        context = span.get_span_context()
        if kind is SpanKind.CLIENT:
            _inject(context, call.headers)
        elif parent is _EMPTY and call.context is not None and context.is_valid:  # a new trace: it is this hop's
            call.context.adopt_traceparent(_traceparent(context))
        token = None
        if kind is SpanKind.SERVER or span.is_recording():
            token = otel_context.attach(trace.set_span_in_context(span, parent))
        return span, token

    def _name(self, call: Invocation) -> tuple[str, dict[str, str]]:
        key = (call.service, call.method, call.caller)
        found = self._named.get(key)
        if found is None:
            if len(self._named) >= _MAX_NAMES:
                self._named.clear()
            attributes = {
                "rpc.system": "natsrpc",
                "rpc.service": call.service,
                "rpc.method": call.method,
                "natsrpc.caller": call.caller,
            }
            found = self._named[key] = (f"{call.service}/{call.method}", attributes)
        return found

    def on_cache(self, service: str, method: str, hit: bool) -> None:
        """Marks the span of a call to a cached method (the current one): ``natsrpc.cache_hit`` is
        True for a call answered from the reply cache (no server span below it), else False."""
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute("natsrpc.cache_hit", hit)

    def on_retry(self, service: str, method: str) -> None:
        """Adds a ``natsrpc.retry`` event to the span of the call being retried (the current one)."""
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event("natsrpc.retry", {"rpc.service": service, "rpc.method": method})


class _Roots:
    """How new traces are decided under one SDK tracer: ``bound`` is the ratio sampler's (a trace
    id whose low 64 bits are below it is kept), or None when the sampler is another kind."""

    def __init__(self, tracer: Any) -> None:
        self.bound: int | None = None
        self.dropped_flags = "-00"  # a traceparent's last field, for a trace not sampled
        self.random = False  # a ratio sampler (bound set), ids from the SDK's RandomIdGenerator (getrandbits)
        sampler = getattr(tracer, "sampler", None)
        ids = getattr(tracer, "id_generator", None)
        if sampler is None or ids is None or not type(sampler).__module__.startswith("opentelemetry.sdk."):
            return
        if not isinstance(ids, _ChosenIds):
            if not all(hasattr(ids, name) for name in ("generate_trace_id", "generate_span_id", "is_trace_id_random")):
                return
            try:
                tracer.id_generator = ids = _ChosenIds(ids)
            except (AttributeError, TypeError):  # a tracer that keeps its generator: the SDK decides every trace
                return
        self.ids: _ChosenIds = ids
        self.bound = _ratio_bound(sampler.get_description())
        if ids.inner.is_trace_id_random() and hasattr(TraceFlags, "RANDOM_TRACE_ID"):
            self.dropped_flags = f"-{TraceFlags.RANDOM_TRACE_ID:02x}"
        self.random = (
            self.bound is not None
            and type(ids.inner).__name__ == "RandomIdGenerator"
            and type(ids.inner).__module__.startswith("opentelemetry.sdk.")
        )


def _draw(roots: _Roots) -> str:
    """Decides a new trace under the SDK's ratio sampler and RandomIdGenerator (``roots.random``):
    both ids are drawn at once, from that generator's own source. Returns the traceparent of a
    trace dropped, or "" for one kept (its trace id chosen for the SDK, whose own decision on that
    id is the same)."""
    bits = getrandbits(192)
    trace_id = bits >> 64
    if not trace_id or not bits & _LOW_64:  # an invalid id (1 in 2**64): drawn again
        return _draw(roots)
    if trace_id & _LOW_64 < roots.bound:  # type: ignore[operator]  # random: a bound is set
        roots.ids.choose(trace_id)
        return ""
    return _format(bits, roots.dropped_flags)


def _ratio_bound(description: str) -> int | None:
    """The bound of an SDK ratio sampler (alone, or the root of a ParentBased with its default
    delegates) from its description, 0 for one that drops every new trace, else None."""
    parent_based = _PARENT_BASED.fullmatch(description)
    root = parent_based[1] if parent_based else description
    if root == "AlwaysOffSampler":
        return 0
    ratio = _RATIO.fullmatch(root)
    if ratio is None:
        return None
    rate = float(ratio[1])
    bound = round(rate * (_LOW_64 + 1))
    return bound if 0 <= bound <= _LOW_64 else None  # every trace kept: nothing to decide before the SDK


class _ChosenIds:
    """The SDK tracer's id generator, handing out a trace id chosen beforehand (once, to the
    thread that chose it): the one a new trace was decided on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._chosen = 0
        self._by = 0
        self.generate_span_id = inner.generate_span_id  # as they are: no frame of ours in between
        self.is_trace_id_random = inner.is_trace_id_random

    def choose(self, trace_id: int) -> None:
        self._chosen, self._by = trace_id, threading.get_ident()

    def generate_trace_id(self) -> int:
        chosen = self._chosen
        if chosen and self._by == threading.get_ident():
            self._chosen = 0
            return chosen
        return int(self.inner.generate_trace_id())


def _parts(value: str) -> tuple[int, int, int] | None:
    """The trace id, parent id and flags of a valid W3C traceparent, or None."""
    if _VERSION_00.fullmatch(value):  # as natsrpc and the SDKs write it
        return int(value[3:35], 16), int(value[36:52], 16), int(value[53:], 16)
    match = parse_traceparent(value)  # another version, or surrounding space: the full rules
    return None if match is None else (int(match[2], 16), int(match[3], 16), int(match[4], 16))


def _under_remote(trace_id: int, span_id: int, flags: int, state: TraceState | None = None) -> Any:
    """The context whose current span is a remote parent with these ids, flags and trace state."""
    remote = SpanContext(trace_id, span_id, True, _FLAGS[flags & TraceFlags.SAMPLED], state)
    return trace.set_span_in_context(NonRecordingSpan(remote), _EMPTY)


def _trace_state(header: str) -> TraceState | None:
    """A ``tracestate`` header as the API's TraceState, or None when it breaks the W3C rules (a
    member that is not key=value, a key twice, over 32 members) or is over 512 characters (more
    than W3C asks to pass on: not parsed). Checked here so the API, which would log a warning for
    each such header, is handed only valid ones."""
    if len(header) > _MAX_TRACESTATE:
        return None
    pairs: dict[str, str] = {}
    for member in header.split(","):
        member = member.strip(" \t")  # optional whitespace (RFC 9110, 5.6.3); empty members are allowed
        if not member:
            continue
        match = _STATE_MEMBER.fullmatch(member)
        if match is None or match[1] in pairs:
            return None
        pairs[match[1]] = match[2]
    if len(pairs) > _MAX_STATE_MEMBERS:
        return None
    return TraceState(list(pairs.items()))


def _traceparent(span_context: SpanContext) -> str:
    """A span context as a W3C ``traceparent``."""
    ids = span_context.trace_id << 64 | span_context.span_id
    return _format(ids, _FLAGS_TEXT[span_context.trace_flags & 0xFF])


def _format(ids: int, flags: str) -> str:
    """A version-00 ``traceparent``: ``ids`` is the trace id and the span id as one number (trace id
    in the high 128 bits), ``flags`` the last field with its dash ("-01"). One C call hexes both
    ids and puts the dash between them, 16 bytes in."""
    return "00-" + ids.to_bytes(24, "big").hex("-", -16) + flags


def _inject(span_context: SpanContext, headers: dict[str, str]) -> None:
    """Puts a span's context in request headers (W3C ``traceparent``, and ``tracestate`` if any)."""
    trace_id, span_id = span_context.trace_id, span_context.span_id
    if not trace_id or not span_id:  # an invalid context (no SDK): nothing to carry
        return
    headers[protocol.TRACEPARENT] = _format(trace_id << 64 | span_id, _FLAGS_TEXT[span_context.trace_flags & 0xFF])
    if span_context.trace_state:
        headers[TRACESTATE] = span_context.trace_state.to_header()
