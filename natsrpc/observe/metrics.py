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
  (400 ``bad_request``: arguments that do not fit the signature, or a bad header; 429
  ``overloaded``, 503 ``unavailable``, 504 ``deadline``: refused before the handler ran);
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
from bisect import bisect_left
from collections.abc import Iterator
from time import perf_counter
from typing import Any

try:
    import prometheus_client
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
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
from natsrpc.observe.middleware import Invocation, Observer

REJECTED_REASONS = {400: "bad_request", 429: "overloaded", 503: "unavailable", 504: "deadline"}
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


class _Timings:
    """The calls of one (service, method) on one side: their durations' histogram (counts per
    bucket, not cumulative) and sum, the successes, and the failures by label (code or outcome).
    ``in_flight`` is the served service's one-element counter (shared by its methods); None for
    calls made."""

    __slots__ = ("buckets", "failed", "in_flight", "ok", "sum")

    def __init__(self, size: int, in_flight: list[int] | None) -> None:
        self.buckets = [0] * size
        self.sum = 0.0
        self.ok = 0
        self.failed: dict[str, int] = {}
        self.in_flight = in_flight

    def by_label(self, success: str) -> list[tuple[str, int]]:
        """The calls counted by label, successes under ``success``."""
        counts = [(success, self.ok)] if self.ok else []
        return counts + list(self.failed.items())


class Metrics(Observer):
    """A middleware (an observer) that counts and times every call, on whichever side it is installed.

    It counts in plain Python objects, on the event loop, and hands them to prometheus-client only
    when scraped (a custom collector): no lock and no prometheus-client code per call.

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
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != float("inf"):
            bounds.append(float("inf"))
        self.bounds = tuple(bounds)
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        self._served: dict[tuple[str, str], _Timings] = {}  # (service, method) -> its requests
        self._in_flight: dict[str, list[int]] = {}  # service -> [requests being served]
        self._rejected: dict[tuple[str, str], int] = {}
        self._calls: dict[tuple[str, str, str], _Timings] = {}  # (caller, service, method) -> its calls
        self._retries: dict[str, int] = {}
        self._circuit: dict[str, int] = {}
        self._cache: dict[tuple[str, str, str], int] = {}
        self.registry.register(self)

    def begin(self, call: Invocation) -> tuple[_Timings, float]:
        """Starts timing a call (and counts it in flight, server side)."""
        if call.side == "server":
            timings = self._served.get((call.service, call.method))
            if timings is None:
                timings = self._first(self._served, (call.service, call.method), call.service)
            timings.in_flight[0] += 1  # type: ignore[index]
        else:
            context = call.context
            made = (call.caller if context is None else context.service, call.service, call.method)
            timings = self._calls.get(made)
            if timings is None:
                timings = self._first(self._calls, made, None)
        return timings, perf_counter()

    def _first(self, kept: dict[Any, _Timings], key: Any, served: str | None) -> _Timings:
        """The timings of a key's first call (``served``: the service served, None for calls made)."""
        in_flight = None if served is None else self._in_flight.setdefault(served, [0])
        timings = kept[key] = _Timings(len(self.bounds), in_flight)
        return timings

    def end(self, call: Invocation, state: tuple[_Timings, float], error: BaseException | None) -> None:
        """Counts a call by its code (served) or outcome (made) and records its duration."""
        timings, started = state
        seconds = perf_counter() - started
        timings.buckets[bisect_left(self.bounds, seconds)] += 1
        timings.sum += seconds
        in_flight = timings.in_flight
        if in_flight is not None:
            in_flight[0] -= 1
        if error is None:
            timings.ok += 1
            return
        if in_flight is not None:
            if isinstance(error, asyncio.CancelledError):
                label = "499"  # the caller gave up, or the deadline passed: nothing was sent
            else:
                label = str(reply_code(error))  # the code of the error reply the caller gets
        elif isinstance(error, asyncio.CancelledError):
            label = "cancelled"
        else:
            label = next((name for kind, name in _OUTCOMES if isinstance(error, kind)), "failed")
        timings.failed[label] = timings.failed.get(label, 0) + 1

    def on_rejected(self, service: str, method: str, code: int) -> None:
        """Counts a request the host refused before its handler ran."""
        key = (service, REJECTED_REASONS.get(code, str(code)))
        self._rejected[key] = self._rejected.get(key, 0) + 1

    def on_retry(self, service: str, method: str) -> None:
        """Counts a retry of a call to ``service``."""
        self._retries[service] = self._retries.get(service, 0) + 1

    def on_cache(self, service: str, method: str, hit: bool) -> None:
        """Counts a call to a cached method: a hit (no request sent) or a miss."""
        key = (service, method, "hit" if hit else "miss")
        self._cache[key] = self._cache.get(key, 0) + 1

    def on_circuit(self, service: str, state: Any) -> None:
        """Records the new state of ``service``'s circuit."""
        self._circuit[service] = CIRCUIT_VALUES.get(str(state), -1)

    def collect(self) -> Iterator[Any]:
        """What a scrape reads (prometheus-client's collector protocol)."""
        requests = CounterMetricFamily(
            "natsrpc_server_requests", "Requests served, by reply code", labels=["service", "method", "code"]
        )
        duration = HistogramMetricFamily(
            "natsrpc_server_request_duration_seconds", "Time to serve a request (a whole stream, for streams)",
            labels=["service", "method"],
        )  # fmt: skip
        for (service, method), timings in list(self._served.items()):
            for code, n in timings.by_label("200"):
                requests.add_metric([service, method, code], n)
            duration.add_metric([service, method], self._cumulative(timings), timings.sum)
        yield requests
        yield duration
        in_flight = {service: cell[0] for service, cell in list(self._in_flight.items())}
        yield self._gauge("natsrpc_server_in_flight", "Requests being served", ["service"], in_flight)
        yield self._counter(
            "natsrpc_server_rejected", "Requests refused before their handler ran", ["service", "reason"],
            self._rejected,
        )  # fmt: skip
        calls = CounterMetricFamily(
            "natsrpc_client_requests", "Calls made, by outcome", labels=["caller", "service", "method", "outcome"]
        )
        call_duration = HistogramMetricFamily(
            "natsrpc_client_request_duration_seconds", "Time a call took, retries included",
            labels=["caller", "service", "method"],
        )  # fmt: skip
        for key, timings in list(self._calls.items()):
            for outcome, n in timings.by_label("ok"):
                calls.add_metric([*key, outcome], n)
            call_duration.add_metric(list(key), self._cumulative(timings), timings.sum)
        yield calls
        yield call_duration
        yield self._counter("natsrpc_client_retries", "Attempts beyond a call's first", ["service"], self._retries)
        yield self._gauge(
            "natsrpc_client_circuit_state", "Circuit state: 0 closed, 1 half-open, 2 open", ["service"], self._circuit
        )
        yield self._counter(
            "natsrpc_client_cache", "Calls to cached methods: answered from the reply cache (hit) or sent (miss)",
            ["service", "method", "result"], self._cache,
        )  # fmt: skip

    def _cumulative(self, timings: _Timings) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip(self.bounds, list(timings.buckets), strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else f"{bound:g}", total))
        return out

    @staticmethod
    def _counter(name: str, doc: str, labels: list[str], values: dict[Any, int]) -> Any:
        family = CounterMetricFamily(name, doc, labels=labels)
        for key, n in list(values.items()):
            family.add_metric(list(key) if isinstance(key, tuple) else [key], n)
        return family

    @staticmethod
    def _gauge(name: str, doc: str, labels: list[str], values: dict[str, int]) -> Any:
        family = GaugeMetricFamily(name, doc, labels=labels)
        for key, n in list(values.items()):
            family.add_metric([key], n)
        return family

    def exposition(self) -> bytes:
        """The registry's metrics in Prometheus' text format (what ``/metrics`` serves)."""
        return prometheus_client.generate_latest(self.registry)  # type: ignore[no-any-return,unused-ignore]

    CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
    """The content type of :meth:`exposition`."""
