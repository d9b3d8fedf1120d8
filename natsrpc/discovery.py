"""Discovery: NATS Service API responders ($SRV.PING/INFO/STATS), heartbeats, and the registry.

Every hosted instance answers the ``$SRV`` subjects (so ``nats micro ls`` works) and publishes a
:class:`Heartbeat` on ``svc._hb.<service>.<id>``; a client's :class:`Registry` listens to those
beats to know which instances are alive and tells the circuit breakers when a service is gone.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import msgspec
import nats.errors
import structlog
from nats.aio.msg import Msg

from natsrpc import protocol

if TYPE_CHECKING:
    from natsrpc.host import Instance

log = structlog.get_logger("natsrpc.discovery")

DEFAULT_HEARTBEAT_INTERVAL: Final = 2.0
EXPIRY_INTERVALS: Final = 3  # an instance is gone after this many missed beats
VERBS: Final = ("PING", "INFO", "STATS")


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


class Heartbeat(msgspec.Struct, omit_defaults=True):
    """What an instance publishes every interval on ``svc._hb.<service>.<id>``."""

    name: str
    id: str
    version: str
    endpoints: list[str]
    in_flight: int
    healthy: bool
    draining: bool
    interval: float
    idempotent: list[str] = []


_encoder: Final = msgspec.json.Encoder()
heartbeat_decoder: Final = msgspec.json.Decoder(Heartbeat)


def control_subjects(verb: str, service: str, instance_id: str) -> list[str]:
    """Returns the three ``$SRV`` subjects one instance answers for ``verb``: bare, by name, by id."""
    return [f"$SRV.{verb}", f"$SRV.{verb}.{service}", f"$SRV.{verb}.{service}.{instance_id}"]


def rfc3339(epoch: float) -> str:
    """Returns ``epoch`` as UTC RFC3339 with a ``Z`` suffix, as Go's time encoder writes it."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def endpoint_metadata(instance: Instance, name: str) -> dict[str, str]:
    """Returns an endpoint's discovery metadata: JSON schemas of its arguments and result as JSON strings."""
    route = instance.routes[name]
    signature = route.endpoint.signature
    metadata = {"idempotent": "true" if route.endpoint.idempotent else "false"}
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
    return InfoResponse(svc.name, instance.id, svc.version, dict(svc.metadata), svc.description, endpoints)


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
            )
        )
    return StatsResponse(svc.name, instance.id, svc.version, dict(svc.metadata), rfc3339(instance.started), endpoints)


class Announcer:
    """Makes one host's instances discoverable: ``$SRV`` responders and periodic heartbeats.

    Args:
        nc: the hosting nats-py connection.
        instances: the hosted instances.
        prefix: subject prefix.
        interval: seconds between heartbeats (each jittered by up to -20%).
    """

    def __init__(self, nc: Any, instances: Iterable[Instance], prefix: str, interval: float) -> None:
        if interval <= 0:
            raise ValueError(f"heartbeat interval must be positive, got {interval!r}")
        self.nc = nc
        self.instances = list(instances)
        self.prefix = prefix
        self.interval = interval
        self._subs: list[Any] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribes the ``$SRV`` subjects and starts beating."""
        for inst in self.instances:
            for verb in VERBS:
                cb = functools.partial(self._answer, verb, inst)
                for subject in control_subjects(verb, inst.service.name, inst.id):
                    self._subs.append(await self.nc.subscribe(subject, cb=cb))
        await self.beat()
        self._task = asyncio.get_running_loop().create_task(self._beat_forever())

    async def stop(self) -> None:
        """Stops beating, sends a last beat with ``draining: true``, and unsubscribes."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
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
        health = await asyncio.gather(*(self._health(inst) for inst in self.instances))
        for inst, healthy in zip(self.instances, health, strict=True):
            svc = inst.service
            idempotent = sorted(name for name, route in inst.routes.items() if route.endpoint.idempotent)
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
            )
            try:
                await self.nc.publish(protocol.heartbeat_subject(svc.name, inst.id, self.prefix), _encoder.encode(beat))
            except nats.errors.Error as exc:
                log.warning("heartbeat not sent", service=svc.name, error=repr(exc))

    async def _health(self, inst: Instance) -> bool:
        svc = inst.service
        try:
            return bool(await asyncio.wait_for(svc.health(), self.interval))
        except Exception as exc:
            log.warning("health check failed", service=svc.name, error=repr(exc))
            return False

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


@dataclass(slots=True)
class InstanceState:
    """What the registry knows of one instance, from its latest heartbeat."""

    service: str
    id: str
    version: str
    endpoints: list[str]
    in_flight: int
    healthy: bool
    draining: bool
    interval: float
    last_seen: float
    idempotent: list[str]

    @property
    def live(self) -> bool:
        """Whether calls should go to it: healthy and not draining."""
        return self.healthy and not self.draining

    def expired(self, now: float) -> bool:
        """Whether it missed 3 heartbeat intervals by ``now``."""
        return now - self.last_seen > EXPIRY_INTERVALS * self.interval


ChangeCallback = Callable[[str, "InstanceState", str], None]
"""Called as ``callback(service, instance, event)``; event is "added", "updated" (healthy or
draining changed), "beat" (a routine heartbeat) or "removed" (expired)."""


class Registry:
    """Live instances per service, from heartbeats; expires an instance after 3 missed intervals.

    Args:
        clock: monotonic seconds; injectable so tests move time instead of sleeping.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._services: dict[str, dict[str, InstanceState]] = {}
        self._callbacks: list[ChangeCallback] = []
        self._sub: Any = None
        self._task: asyncio.Task[None] | None = None

    def on_change(self, callback: ChangeCallback) -> None:
        """Registers ``callback(service, instance, event)``, called for every heartbeat and expiry."""
        self._callbacks.append(callback)

    def known(self, service: str) -> bool:
        """Whether the service ever had an instance this registry saw."""
        return service in self._services

    def instances(self, service: str) -> list[InstanceState]:
        """Returns the unexpired instances of ``service`` (live or not)."""
        now = self.clock()
        return [i for i in self._services.get(service, {}).values() if not i.expired(now)]

    def live(self, service: str) -> list[InstanceState]:
        """Returns the instances of ``service`` that take calls: unexpired, healthy, not draining."""
        return [i for i in self.instances(service) if i.live]

    def services(self) -> dict[str, list[InstanceState]]:
        """Returns every known service with its unexpired instances."""
        return {name: self.instances(name) for name in self._services}

    def idempotent(self, service: str, method: str) -> bool:
        """Whether the instances of ``service`` declare ``method`` idempotent (from their heartbeats)."""
        return any(method in i.idempotent for i in self._services.get(service, {}).values())

    def observe(self, beat: Heartbeat) -> None:
        """Takes in one heartbeat."""
        instances = self._services.setdefault(beat.name, {})
        previous = instances.get(beat.id)
        state = InstanceState(
            beat.name,
            beat.id,
            beat.version,
            beat.endpoints,
            beat.in_flight,
            beat.healthy,
            beat.draining,
            beat.interval,
            self.clock(),
            beat.idempotent,
        )
        instances[beat.id] = state
        if previous is None:
            self._emit(beat.name, state, "added")
        elif (previous.healthy, previous.draining) != (state.healthy, state.draining):
            self._emit(beat.name, state, "updated")
        else:
            self._emit(beat.name, state, "beat")

    def restart_expiry(self) -> None:
        """Counts every known instance as seen now; the client calls it when its connection comes back.

        Beats missed while this client was cut off (a hung server takes seconds to detect) say
        nothing about the instances: without this, they expired right after the reconnect, before
        their next beat could arrive, and opened circuits of services that answer (RELIABILITY F5).
        """
        now = self.clock()
        for instances in self._services.values():
            for state in instances.values():
                state.last_seen = now

    def sweep(self) -> None:
        """Removes the instances that missed 3 intervals, telling the callbacks."""
        now = self.clock()
        for service, instances in self._services.items():
            for instance_id, state in list(instances.items()):
                if state.expired(now):
                    del instances[instance_id]
                    self._emit(service, state, "removed")

    def _emit(self, service: str, state: InstanceState, event: str) -> None:
        for callback in self._callbacks:
            try:
                callback(service, state, event)
            except Exception:
                log.exception("registry callback failed")

    async def start(self, nc: Any, prefix: str = protocol.DEFAULT_PREFIX) -> None:
        """Subscribes to every heartbeat and starts expiring silent instances."""
        self._sub = await nc.subscribe(f"{prefix}._hb.>", cb=self._on_beat)
        self._task = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def stop(self) -> None:
        """Unsubscribes and stops the sweeper."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except nats.errors.Error:
                pass
            self._sub = None

    async def _on_beat(self, msg: Msg) -> None:
        try:
            self.observe(heartbeat_decoder.decode(msg.data))
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            log.warning("bad heartbeat ignored", subject=msg.subject, error=str(exc))

    async def _sweep_forever(self) -> None:
        while True:
            intervals = [s.interval for inst in self._services.values() for s in inst.values()]
            await asyncio.sleep(min(intervals, default=DEFAULT_HEARTBEAT_INTERVAL) / 4)
            self.sweep()


async def survey(nc: Any, verb: str, service: str = "", wait: float = 0.5) -> list[tuple[dict[str, Any], float]]:
    """Asks every instance (of ``service``, or all) a ``$SRV`` question; returns (reply, seconds) pairs.

    Replies are collected for ``wait`` seconds, since any number of instances may answer.
    """
    if verb not in VERBS:
        raise ValueError(f"verb must be one of {VERBS}, got {verb!r}")
    inbox = nc.new_inbox()
    replies: list[tuple[dict[str, Any], float]] = []
    sent = time.perf_counter()

    async def collect(msg: Msg) -> None:
        if not msg.data:  # the server's "no responders" status: nobody answers, which is no reply
            return
        try:
            replies.append((msgspec.json.decode(msg.data), time.perf_counter() - sent))
        except msgspec.DecodeError:
            log.warning("undecodable discovery reply", subject=msg.subject)

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        subject = f"$SRV.{verb}.{service}" if service else f"$SRV.{verb}"
        sent = time.perf_counter()
        await nc.publish(subject, b"", reply=inbox)
        await asyncio.sleep(wait)
    finally:
        await sub.unsubscribe()
    return replies
