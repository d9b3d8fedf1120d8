"""A hosted service instance: its id, routes (one per endpoint, with counters), concurrency limit and state.

The host (:mod:`natsrpc.host`) serves instances; the announcer (:mod:`natsrpc.announce`) describes
them to discovery. Both read this model; neither imports the other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from natsrpc.dispatch import Dispatcher
from natsrpc.service import Endpoint, Service


@dataclass(slots=True)
class EndpointStats:
    """Counters of one endpoint on one instance (served as ``$SRV.STATS``)."""

    num_requests: int = 0
    num_errors: int = 0
    processing_time_ns: int = 0
    last_error: str = ""


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
        self.closed = False  # unsubscribed: anything that still reaches it is refused with 503
        self.started = time.time()
        self.routes = {name: Route(self, ep) for name, ep in service.endpoints.items()}

    @property
    def active(self) -> int:
        """Requests accepted and not yet answered: queued plus running."""
        return self.pool.active if self.pool is not None else 0
