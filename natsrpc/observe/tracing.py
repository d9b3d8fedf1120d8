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
is one trace across every process.

A failure sets the span's status to ERROR, records the exception as an event and sets
``error.type`` (and ``natsrpc.code``, a reply's code). Retries add a ``natsrpc.retry`` event to the
call's span; a call refused by an open circuit adds ``natsrpc.circuit_open``.

Only opentelemetry-api is needed: with no SDK configured nothing is recorded (the spans are
no-ops), and whatever SDK, sampler and exporter the application set up are used. A request whose
trace is not sampled gets no span and asks nothing of the SDK (``trust_parent_sampling``).
"""

from __future__ import annotations

from typing import Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("natsrpc.observe.tracing needs opentelemetry-api: pip install 'natsrpc[otel]'") from exc

from natsrpc import protocol
from natsrpc.context import parse_traceparent
from natsrpc.errors import CircuitOpen, RemoteError
from natsrpc.observe.middleware import Invocation, Next

TRACESTATE = "tracestate"
"""The W3C header carrying vendor trace state beside ``traceparent``."""

_EMPTY = otel_context.Context()
_MAX_NAMES = 4096  # (service, method, caller) span names kept


class Tracing:
    """A middleware that makes an OpenTelemetry span of every call, on whichever side it is installed.

    Args:
        tracer_provider: the provider to take the tracer from; None uses the global one (set by the
            application's SDK setup, at any time: the global provider forwards to it).
        trust_parent_sampling: a request whose ``traceparent`` says "not sampled", and the calls
            made while serving it, get no span (their trace context still travels on): the SDK's
            default parent-based sampling would record nothing for them anyway, and asking it
            costs a span's worth of CPU each. Set False when your sampler may record spans below
            an unsampled parent.
    """

    def __init__(self, tracer_provider: Any = None, *, trust_parent_sampling: bool = True) -> None:
        self.tracer = trace.get_tracer("natsrpc", tracer_provider=tracer_provider)
        self.trust_parent_sampling = trust_parent_sampling
        self._named: dict[tuple[str, str, str], tuple[str, dict[str, str]]] = {}  # span name and attributes

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

    async def __call__(self, call: Invocation, call_next: Next) -> Any:
        if call.side == "server":
            remote = _remote_parent(call.headers)
            parent = _EMPTY if remote is None else trace.set_span_in_context(NonRecordingSpan(remote), _EMPTY)
            if remote is not None and self.trust_parent_sampling and not remote.trace_flags.sampled:
                token = otel_context.attach(parent)  # not sampled: the context travels on, no span
                try:
                    return await call_next()
                finally:
                    otel_context.detach(token)
            kind = SpanKind.SERVER
        else:
            if call.context is not None and self.trust_parent_sampling:  # inside a handler: its trace
                current = trace.get_current_span().get_span_context()
                if current.is_valid and not current.trace_flags.sampled:
                    _inject(current, call.headers)
                    return await call_next()
            parent, kind = None, SpanKind.CLIENT
        name, attributes = self._name(call)
        span = self.tracer.start_span(name, parent, kind, attributes)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            if kind is SpanKind.CLIENT:
                _inject(span.get_span_context(), call.headers)
            return await call_next()
        except BaseException as exc:
            if span.is_recording():
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:1024]))
                span.set_attribute("error.type", type(exc).__name__)
                if isinstance(exc, RemoteError):
                    span.set_attribute("natsrpc.code", exc.code)
                if isinstance(exc, CircuitOpen):
                    span.add_event("natsrpc.circuit_open", {"rpc.service": call.service})
                span.record_exception(exc)
            raise
        finally:
            span.end()
            otel_context.detach(token)

    def on_retry(self, service: str, method: str) -> None:
        """Adds a ``natsrpc.retry`` event to the span of the call being retried (the current one)."""
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event("natsrpc.retry", {"rpc.service": service, "rpc.method": method})


_FLAGS = (TraceFlags(0), TraceFlags(TraceFlags.SAMPLED))


def _remote_parent(headers: Any) -> SpanContext | None:
    """The span context a request's ``traceparent`` (and ``tracestate``) names, or None (a new trace)."""
    match = parse_traceparent(headers.get(protocol.TRACEPARENT, "")) if headers else None
    if match is None:
        return None
    state = headers.get(TRACESTATE)
    return SpanContext(
        int(match[2], 16),
        int(match[3], 16),
        True,
        _FLAGS[int(match[4], 16) & TraceFlags.SAMPLED],
        TraceState.from_header([state]) if state else None,
    )


def _inject(span_context: SpanContext, headers: dict[str, str]) -> None:
    """Puts a span's context in request headers (W3C ``traceparent``, and ``tracestate`` if any)."""
    if not span_context.is_valid:
        return
    headers[protocol.TRACEPARENT] = (
        f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{span_context.trace_flags:02x}"
    )
    if span_context.trace_state:
        headers[TRACESTATE] = span_context.trace_state.to_header()
