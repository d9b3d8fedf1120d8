"""Being discoverable, the server side: NATS Service API responders ($SRV.PING/INFO/STATS) and heartbeats.

Every hosted instance answers the ``$SRV`` subjects (so ``nats micro ls`` works) and publishes a
:class:`~natsrpc.protocol.Heartbeat` on ``svc._hb.<service>.<id>``; clients' registries
(:mod:`natsrpc.registry`) follow those beats.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
import nats.errors
from nats.aio.msg import Msg

from natsrpc import logs, protocol
from natsrpc.instance import Instance, LatencyHistogram
from natsrpc.protocol import Heartbeat

log = logs.get_logger("natsrpc.announce")


class EndpointInfo(msgspec.Struct):
    """One endpoint in a ``$SRV.INFO`` reply."""

    name: str
    subject: str
    queue_group: str
    metadata: dict[str, str]


class EndpointStats(msgspec.Struct):
    """One endpoint in a ``$SRV.STATS`` reply (times in integer nanoseconds)."""

    name: str
    subject: str
    queue_group: str
    num_requests: int
    num_errors: int
    last_error: str
    processing_time: int
    average_processing_time: int
    data: dict[str, int] = {}


class PingResponse(msgspec.Struct):
    """A ``$SRV.PING`` reply."""

    name: str
    id: str
    version: str
    metadata: dict[str, str]
    type: str = "io.nats.micro.v1.ping_response"


class InfoResponse(msgspec.Struct):
    """A ``$SRV.INFO`` reply."""

    name: str
    id: str
    version: str
    metadata: dict[str, str]
    description: str
    endpoints: list[EndpointInfo]
    type: str = "io.nats.micro.v1.info_response"


class StatsResponse(msgspec.Struct):
    """A ``$SRV.STATS`` reply."""

    name: str
    id: str
    version: str
    metadata: dict[str, str]
    started: str
    endpoints: list[EndpointStats]
    type: str = "io.nats.micro.v1.stats_response"


_encoder: Final = msgspec.json.Encoder()


def control_subjects(verb: str, service: str, instance_id: str) -> list[str]:
    """Returns the three ``$SRV`` subjects one instance answers for ``verb``: bare, by name, by id."""
    return [
        protocol.service_api_subject(verb),
        protocol.service_api_subject(verb, service),
        protocol.service_api_subject(verb, service, instance_id),
    ]


def rfc3339(epoch: float) -> str:
    """Returns ``epoch`` as UTC RFC3339 with a ``Z`` suffix, as Go's time encoder writes it."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def endpoint_metadata(instance: Instance, name: str) -> dict[str, str]:
    """Returns an endpoint's discovery metadata: JSON schemas of its arguments and result as JSON strings."""
    route = instance.routes[name]
    signature = route.endpoint.signature
    metadata = {"idempotent": "true" if route.endpoint.idempotent else "false"}
    if route.endpoint.streaming:
        metadata["streaming"] = "true"  # result_schema then describes each item
    if route.endpoint.cache_ttl is not None:
        metadata["cache_ttl"] = f"{route.endpoint.cache_ttl:g}"  # seconds clients may keep a reply
    if route.endpoint.description:
        metadata["description"] = route.endpoint.description
    try:
        metadata["arguments_schema"] = _encoder.encode(msgspec.json.schema(signature.arguments_type)).decode()
        metadata["result_schema"] = _encoder.encode(msgspec.json.schema(signature.return_type)).decode()
    except (TypeError, ValueError) as exc:  # a type msgspec cannot describe: leave the schema out
        log.debug("no schema for endpoint", endpoint=name, error=repr(exc))
    return metadata


def ping(instance: Instance) -> PingResponse:
    """Returns the instance's ``$SRV.PING`` reply."""
    svc = instance.service
    return PingResponse(svc.name, instance.id, svc.version, dict(svc.metadata))


def info(instance: Instance, prefix: str) -> InfoResponse:
    """Returns the instance's ``$SRV.INFO`` reply."""
    svc = instance.service
    endpoints = [
        EndpointInfo(
            name,
            protocol.endpoint_subject(svc.name, name, prefix),
            protocol.QUEUE_GROUP,
            endpoint_metadata(instance, name),
        )
        for name in instance.routes
    ]
    metadata = dict(svc.metadata)
    if instance.event_routes:  # the event types and patterns it handles, for discovery
        metadata["events"] = ",".join(sorted(instance.event_routes))
    return InfoResponse(svc.name, instance.id, svc.version, metadata, svc.description, endpoints)


def latency_percentiles(histogram: LatencyHistogram) -> dict[str, int]:
    """Returns an endpoint's STATS ``data``: its processing-time percentiles (upper bounds of
    buckets 19% wide), since the instance started."""
    return {name: histogram.percentile(q) for name, q in protocol.STATS_PERCENTILES}


def stats(instance: Instance, prefix: str) -> StatsResponse:
    """Returns the instance's ``$SRV.STATS`` reply."""
    svc = instance.service
    endpoints = []
    for name, route in instance.routes.items():
        s = route.stats
        average = s.processing_time_ns // s.num_requests if s.num_requests else 0
        endpoints.append(
            EndpointStats(
                name,
                protocol.endpoint_subject(svc.name, name, prefix),
                protocol.QUEUE_GROUP,
                s.num_requests,
                s.num_errors,
                s.last_error,
                s.processing_time_ns,
                average,
                latency_percentiles(s.latency),
            )
        )
    return StatsResponse(svc.name, instance.id, svc.version, dict(svc.metadata), rfc3339(instance.started), endpoints)


class Announcer:
    """Makes one host's instances discoverable: ``$SRV`` responders and periodic heartbeats.

    Args:
        nc: the hosting nats-py connection.
        instances: the hosted instances.
        prefix: subject prefix.
        interval: seconds between heartbeats (each jittered by up to -20%), within the range
            ``protocol.MIN_HEARTBEAT_INTERVAL``-``MAX_HEARTBEAT_INTERVAL`` (the Host checks it).
    """

    def __init__(self, nc: Any, instances: Iterable[Instance], prefix: str, interval: float) -> None:
        self.nc = nc
        self.instances = list(instances)
        self.prefix = prefix
        self.interval = interval
        self._subs: list[Any] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribes the ``$SRV`` subjects and starts beating."""
        for inst in self.instances:
            for verb in protocol.SERVICE_API_VERBS:
                cb = functools.partial(self._answer, verb, inst)
                for subject in control_subjects(verb, inst.service.name, inst.id):
                    self._subs.append(await self.nc.subscribe(subject, cb=cb))
        await self.beat()
        self._task = asyncio.get_running_loop().create_task(self._beat_forever())

    async def stop(self, last_beat: bool = True) -> None:
        """Stops beating, sends a last beat (``draining: true``) unless told not to, and unsubscribes."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if last_beat:
            await self.beat()
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass
        self._subs = []

    async def beat(self) -> None:
        """Publishes one heartbeat per instance now.

        The health hooks run concurrently, each bounded by one interval, so a slow or hung hook
        delays no other instance's beat (run one after another, three hung hooks stretched a healthy
        instance's beats past the 3-interval expiry).
        """
        health = await asyncio.gather(*(inst.healthy(self.interval) for inst in self.instances))
        for inst, healthy in zip(self.instances, health, strict=True):
            svc = inst.service
            idempotent = sorted(name for name, route in inst.routes.items() if route.endpoint.idempotent)
            streaming = sorted(name for name, route in inst.routes.items() if route.endpoint.streaming)
            cached = {name: r.endpoint.cache_ttl for name, r in inst.routes.items() if r.endpoint.cache_ttl}
            beat = Heartbeat(
                svc.name,
                inst.id,
                svc.version,
                sorted(inst.routes),
                inst.active,
                healthy,
                inst.draining,
                self.interval,
                idempotent,
                streaming,
                cached,
                inst.staying if inst.draining else [],
            )
            try:
                await self.nc.publish(protocol.heartbeat_subject(svc.name, inst.id, self.prefix), _encoder.encode(beat))
            except nats.errors.Error as exc:
                log.warning("heartbeat not sent", service=svc.name, error=repr(exc))

    async def _beat_forever(self) -> None:
        # Paced from the start of each beat, so time spent in health hooks does not stretch the
        # period; ends with the connection (a closed nats-py connection never reconnects).
        loop = asyncio.get_running_loop()
        started = loop.time()
        while not self.nc.is_closed:
            await asyncio.sleep(max(0.0, started + self.interval * random.uniform(0.8, 1.0) - loop.time()))
            started = loop.time()
            await self.beat()

    async def _answer(self, verb: str, inst: Instance, msg: Msg) -> None:
        if not msg.reply:
            return
        reply: msgspec.Struct
        if verb == "PING":
            reply = ping(inst)
        elif verb == "INFO":
            reply = info(inst, self.prefix)
        else:
            reply = stats(inst, self.prefix)
        try:
            await msg.respond(_encoder.encode(reply))
        except nats.errors.Error as exc:
            log.warning("discovery reply not sent", verb=verb, error=repr(exc))
