"""Prometheus metrics of calls served and made, as a middleware (``pip install 'natsrpc[metrics]'``).

::

    from natsrpc.observe.metrics import Metrics

    metrics = Metrics()                       # its own registry: metrics.registry
    client = await natsrpc.connect(url, middleware=[metrics])
    host = natsrpc.Host(client, [KV()], middleware=[metrics])

The same object on both sides records, by ``call.side``:

- served: ``natsrpc_server_requests_total{service,method,code}``,
  ``natsrpc_server_request_duration_seconds{service,method}`` (a histogram),
  ``natsrpc_server_in_flight{service}`` and ``natsrpc_server_rejected_total{service,reason}``
  (429 ``overloaded``, 503 ``unavailable``, 504 ``deadline``: refused before the handler ran);
- made: ``natsrpc_client_requests_total{caller,service,method,outcome}``,
  ``natsrpc_client_request_duration_seconds{caller,service,method}``,
  ``natsrpc_client_retries_total{service}`` and ``natsrpc_client_circuit_state{service}``
  (0 closed, 1 half-open, 2 open), and ``natsrpc_client_cache_total{service,method,result}``
  (``hit`` or ``miss`` of the reply cache). ``caller`` is the calling service, or the client's
  ``caller`` name (``client``) outside a handler.

An application passes its own registry (``Metrics(registry=prometheus_client.REGISTRY)``) to
serve these beside its own metrics; the runner's ``--metrics-port`` serves ``/metrics``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

try:
    import prometheus_client
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("natsrpc.observe.metrics needs prometheus-client: pip install 'natsrpc[metrics]'") from exc

from natsrpc.errors import (
    CallTimeout,
    CircuitOpen,
    ConnectionLost,
    DeadlineExceeded,
    NoResponders,
    Overloaded,
    RemoteError,
    reply_code,
)
from natsrpc.observe.middleware import Invocation, Next

REJECTED_REASONS = {429: "overloaded", 503: "unavailable", 504: "deadline"}
"""The ``reason`` label of ``natsrpc_server_rejected_total`` for each code refused before a handler."""

CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}
"""The value of ``natsrpc_client_circuit_state`` for each circuit state."""

# Client outcomes, most specific first: a call's error names its outcome.
_OUTCOMES: tuple[tuple[type[BaseException], str], ...] = (
    (CircuitOpen, "circuit_open"),
    (NoResponders, "no_responders"),
    (CallTimeout, "timeout"),
    (DeadlineExceeded, "deadline"),
    (Overloaded, "overloaded"),
    (ConnectionLost, "connection_lost"),
    (RemoteError, "error"),
)


class Metrics:
    """A middleware that counts and times every call, on whichever side it is installed.

    Args:
        registry: the prometheus-client registry to register in; None makes a new one
            (:attr:`registry`), so two Metrics never collide.
        buckets: the duration histograms' buckets, in seconds.
    """

    def __init__(
        self,
        registry: prometheus_client.CollectorRegistry | None = None,
        buckets: tuple[float, ...] = prometheus_client.Histogram.DEFAULT_BUCKETS,
    ) -> None:
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        r = self.registry
        self.server_requests = prometheus_client.Counter(
            "natsrpc_server_requests", "Requests served, by reply code", ["service", "method", "code"], registry=r
        )
        self.server_duration = prometheus_client.Histogram(
            "natsrpc_server_request_duration_seconds", "Time to serve a request (a whole stream, for streams)",
            ["service", "method"], buckets=buckets, registry=r,
        )  # fmt: skip
        self.server_in_flight = prometheus_client.Gauge(
            "natsrpc_server_in_flight", "Requests being served", ["service"], registry=r
        )
        self.server_rejected = prometheus_client.Counter(
            "natsrpc_server_rejected", "Requests refused before their handler ran", ["service", "reason"], registry=r
        )
        self.client_requests = prometheus_client.Counter(
            "natsrpc_client_requests", "Calls made, by outcome", ["caller", "service", "method", "outcome"], registry=r
        )
        self.client_duration = prometheus_client.Histogram(
            "natsrpc_client_request_duration_seconds", "Time a call took, retries included",
            ["caller", "service", "method"], buckets=buckets, registry=r,
        )  # fmt: skip
        self.client_retries = prometheus_client.Counter(
            "natsrpc_client_retries", "Attempts beyond a call's first", ["service"], registry=r
        )
        self.client_cache = prometheus_client.Counter(
            "natsrpc_client_cache", "Calls to cached methods: answered from the reply cache (hit) or sent (miss)",
            ["service", "method", "result"], registry=r,
        )  # fmt: skip
        self.client_circuit = prometheus_client.Gauge(
            "natsrpc_client_circuit_state", "Circuit state: 0 closed, 1 half-open, 2 open", ["service"], registry=r
        )
        # Labelled children, cached: prometheus-client's labels() takes a lock and builds a tuple.
        self._children: dict[tuple[Any, ...], Any] = {}
        self._endpoints: dict[tuple[str, str], tuple[Any, Any, dict[str, Any]]] = {}
        self._calls: dict[tuple[str, str, str], tuple[Any, dict[str, Any]]] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    async def __call__(self, call: Invocation, call_next: Next) -> Any:
        if call.side == "server":
            return await self._serve(call, call_next)
        return await self._call(call, call_next)

    def _served(self, service: str, method: str) -> tuple[Any, Any, dict[str, Any]]:
        """The in-flight gauge, duration histogram and counters by code of one endpoint."""
        key = (service, method)
        found = self._endpoints.get(key)
        if found is None:
            found = self._endpoints[key] = (
                self.server_in_flight.labels(service),
                self.server_duration.labels(service, method),
                {},
            )
        return found

    async def _serve(self, call: Invocation, call_next: Next) -> Any:
        in_flight, duration, by_code = self._served(call.service, call.method)
        in_flight.inc()
        code = "500"
        started = time.perf_counter()
        try:
            result = await call_next()
            code = "200"
            return result
        except asyncio.CancelledError:
            code = "499"  # the caller gave up, or the deadline passed: nothing was sent
            raise
        except Exception as exc:
            code = str(reply_code(exc))  # the code of the error reply the caller gets
            raise
        finally:
            in_flight.dec()
            duration.observe(time.perf_counter() - started)
            counter = by_code.get(code)
            if counter is None:
                counter = by_code[code] = self.server_requests.labels(call.service, call.method, code)
            counter.inc()

    async def _call(self, call: Invocation, call_next: Next) -> Any:
        caller = call.context.service if call.context is not None else call.caller
        key = (caller, call.service, call.method)
        found = self._calls.get(key)
        if found is None:
            found = self._calls[key] = (self.client_duration.labels(*key), {})
        duration, by_outcome = found
        outcome = "ok"
        started = time.perf_counter()
        try:
            return await call_next()
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except BaseException as exc:
            outcome = next((name for kind, name in _OUTCOMES if isinstance(exc, kind)), "failed")
            raise
        finally:
            duration.observe(time.perf_counter() - started)
            counter = by_outcome.get(outcome)
            if counter is None:
                counter = by_outcome[outcome] = self.client_requests.labels(*key, outcome)
            counter.inc()

    def on_rejected(self, service: str, method: str, code: int) -> None:
        """Counts a request the host refused before its handler ran."""
        self._child(self.server_rejected, service, REJECTED_REASONS.get(code, str(code))).inc()

    def on_retry(self, service: str, method: str) -> None:
        """Counts a retry of a call to ``service``."""
        self._child(self.client_retries, service).inc()

    def on_cache(self, service: str, method: str, hit: bool) -> None:
        """Counts a call to a cached method: a hit (no request sent) or a miss."""
        self._child(self.client_cache, service, method, "hit" if hit else "miss").inc()

    def on_circuit(self, service: str, state: Any) -> None:
        """Records the new state of ``service``'s circuit."""
        self._child(self.client_circuit, service).set(CIRCUIT_VALUES.get(str(state), -1))

    def exposition(self) -> bytes:
        """The registry's metrics in Prometheus' text format (what ``/metrics`` serves)."""
        return prometheus_client.generate_latest(self.registry)  # type: ignore[no-any-return,unused-ignore]

    CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
    """The content type of :meth:`exposition`."""
