"""A hosted service instance: its id, routes (one per endpoint, with counters), concurrency limit and state.

The host (:mod:`natsrpc.host`) serves instances; the announcer (:mod:`natsrpc.announce`) describes
them to discovery. Both read this model; neither imports the other.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from natsrpc import logs
from natsrpc.dispatch import Dispatcher
from natsrpc.events.serve import EventPool, EventRoute
from natsrpc.service import Endpoint, Service

log = logs.get_logger("natsrpc.host")

_SUB_BITS = 2  # 4 buckets per power of two: a percentile is read to within 19%
_BUCKETS = 65 << _SUB_BITS  # bit lengths 0 to 64: any time perf_counter_ns can give


class LatencyHistogram:
    """Processing times in a fixed set of buckets (4 per power of two of nanoseconds): bounded
    memory however many requests, percentiles to within 19%.

    A time of ``ns`` nanoseconds falls in bucket ``(b << 2) | next two bits``, where ``b`` is its
    bit length: integer arithmetic, no logarithm, on every request.
    """

    __slots__ = ("count", "counts")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.count = 0

    def add(self, ns: int) -> None:
        """Counts one processing time, in nanoseconds."""
        bits = ns.bit_length()
        index = (bits << _SUB_BITS) | ((ns >> (bits - 1 - _SUB_BITS)) & 3) if bits > _SUB_BITS else bits << _SUB_BITS
        self.counts[index] += 1
        self.count += 1

    def percentile(self, q: float) -> int:
        """Returns the ``q`` quantile (0 < q <= 1) in nanoseconds: the upper bound of its bucket (0 if empty)."""
        if not self.count:
            return 0
        rank = max(1, round(q * self.count))
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return _upper_bound(index)
        return _upper_bound(_BUCKETS - 1)  # not reached


def _upper_bound(index: int) -> int:
    """The largest time, in nanoseconds, that bucket ``index`` holds."""
    bits, sub = index >> _SUB_BITS, index & 3
    if bits <= _SUB_BITS:
        return (1 << bits) - 1
    step = 1 << (bits - 1 - _SUB_BITS)
    return (1 << (bits - 1)) + (sub + 1) * step - 1


@dataclass(slots=True)
class EndpointStats:
    """Counters of one endpoint on one instance (served as ``$SRV.STATS``)."""

    num_requests: int = 0
    num_errors: int = 0
    processing_time_ns: int = 0
    last_error: str = ""
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)


class Route:
    """One endpoint of one hosted instance: the bound handler, its codec and its counters."""

    __slots__ = ("endpoint", "handler", "instance", "stats", "where")

    def __init__(self, instance: Instance, endpoint: Endpoint) -> None:
        self.instance = instance
        self.endpoint = endpoint
        self.handler = getattr(instance.service, endpoint.attr)
        self.stats = EndpointStats()
        self.where = f"{instance.service.name}.{endpoint.name}"


Request = tuple[Route, str, bytes, "dict[str, str] | None", float]
"""An admitted request: its route, reply subject, body, headers and absolute deadline."""


class Instance:
    """One hosted service instance: its routes, concurrency limit and wait queue."""

    def __init__(self, service: Service, instance_id: str, max_concurrency: int, max_queue: int) -> None:
        self.service = service
        self.id = instance_id
        self.label = f"{service.name}/{instance_id}"
        self.capacity = max_concurrency + max_queue
        self.max_concurrency = max_concurrency
        self.pool: Dispatcher[Request] | None = None  # made by the Host, on its loop
        self.draining = False  # announced in heartbeats: callers should stop routing here
        self.staying: list[str] = []  # announced with draining: the service's other live instances, to call instead
        self.closed = False  # unsubscribed: anything that still reaches it is refused with 503
        self.started = time.time()
        self.routes = {name: Route(self, ep) for name, ep in service.endpoints.items()}
        self.event_routes = {p: EventRoute(service, self.label, h) for p, h in service.event_handlers.items()}
        self.events: EventPool | None = None  # made by the Host, on its loop, when there are handlers

    @property
    def active(self) -> int:
        """Requests accepted and not yet answered: queued plus running."""
        return self.pool.active if self.pool is not None else 0

    async def healthy(self, within: float) -> bool:
        """Runs the service's ``health()``, bounded by ``within`` seconds; an error or a hang is unhealthy."""
        try:
            return bool(await asyncio.wait_for(self.service.health(), within))
        except Exception as exc:
            log.warning("health check failed", service=self.service.name, error=repr(exc))
            return False
