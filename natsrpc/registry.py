"""Discovery, the client side: the registry of live instances, from heartbeats, and ``$SRV`` surveys.

A client's :class:`Registry` follows the beats hosted instances publish (:mod:`natsrpc.announce`)
to know which instances are alive, and tells the circuit breakers when a service is gone. A beat's
service and instance come from its subject, which the server's permissions guard, never from its body.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import nats.errors
from nats.aio.msg import Msg

from natsrpc import logs, protocol
from natsrpc.errors import ConfigurationError
from natsrpc.protocol import Heartbeat

log = logs.get_logger("natsrpc.registry")

EXPIRY_INTERVALS: Final = 3  # an instance is gone after this many missed beats

heartbeat_decoder: Final = msgspec.json.Decoder(Heartbeat)

MAX_INSTANCES: Final = 10_000  # instances one registry tracks at once
MAX_SERVICES: Final = 4_096  # service names one registry remembers


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
    streaming: list[str] = field(default_factory=list)
    cached: dict[str, float] = field(default_factory=dict)
    staying: tuple[str, ...] = ()  # draining: the ids its beat names as staying (valid names, at most MAX_STAYING)

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

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_instances: int = MAX_INSTANCES,
        max_services: int = MAX_SERVICES,
    ) -> None:
        self.clock = clock
        self.max_instances = max_instances
        """The most instances tracked at once; beats of further new instances are dropped (and counted)."""
        self.max_services = max_services
        """The most service names remembered; past it, names without a live instance are forgotten first."""
        self._ignored = logs.Ignored(log)  # the beats dropped (ignored_beats), logged little
        self.prefix = protocol.DEFAULT_PREFIX
        self._services: dict[str, dict[str, InstanceState]] = {}
        self._count = 0  # instances tracked, over all services
        self._last_beat: dict[str, float] = {}  # service -> when its latest beat arrived (clock)
        self._methods: dict[str, frozenset[str]] = {}  # service -> endpoints of its tracked instances
        self._unary: dict[str, frozenset[str]] = {}  # service -> those endpoints that do not stream
        self.cached: dict[tuple[str, str], float] = {}
        """(service, method) -> seconds its replies may be kept (the shortest any instance announces)."""
        self._beat_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._callbacks: list[ChangeCallback] = []
        self._sub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._listening_since = -math.inf  # clock: when start() subscribed to the heartbeats

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
        """Takes in one heartbeat (whose name and id its subject vouched for)."""
        instances = self._services.get(beat.name)
        previous = None if instances is None else instances.get(beat.id)
        if previous is None:
            if self._count >= self.max_instances:
                self._ignored.count += 1
                return
            if instances is None:
                if len(self._services) >= self.max_services and not self._forget_a_silent_service():
                    self._ignored.count += 1
                    return
                instances = self._services[beat.name] = {}
            self._count += 1
        assert instances is not None
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
            beat.streaming,
            beat.cached,
            _staying(beat) if beat.staying and beat.draining else (),
        )
        instances[beat.id] = state
        if previous is None or previous.endpoints != state.endpoints or previous.cached != state.cached:
            self._update_methods(beat.name)
        self._last_beat[beat.name] = state.last_seen
        waiters = self._beat_waiters.pop(beat.name, None)
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)
        if previous is None:
            self._warn_if_different(instances, state)
            self._emit(beat.name, state, "added")
        elif (previous.healthy, previous.draining) != (state.healthy, state.draining):
            self._emit(beat.name, state, "updated")
        else:
            self._emit(beat.name, state, "beat")

    def _warn_if_different(self, instances: dict[str, InstanceState], new: InstanceState) -> None:
        """Warns, once per new instance, when it serves other endpoints or another version than one
        already known by the same name (two different services sharing a name, or a rolling upgrade)."""
        for other in instances.values():
            if other.id != new.id and (other.version, sorted(other.endpoints)) != (new.version, sorted(new.endpoints)):
                log.warning(
                    "two instances of one service name differ",
                    service=new.service,
                    instances=[
                        f"{other.id} (version {other.version}: {', '.join(sorted(other.endpoints))})",
                        f"{new.id} (version {new.version}: {', '.join(sorted(new.endpoints))})",
                    ],
                )
                return

    def _forget_a_silent_service(self) -> bool:
        """Forgets one service name that has no instance left; returns False if every one has some."""
        for name, instances in self._services.items():
            if not instances:
                del self._services[name]
                self._last_beat.pop(name, None)
                return True
        return False

    def methods(self, service: str) -> frozenset[str] | None:
        """Returns the endpoints the tracked instances of ``service`` serve, or None when none is tracked."""
        return self._methods.get(service)

    def unary_methods(self, service: str) -> frozenset[str] | None:
        """Returns the endpoints of ``service`` that answer with one reply (awaited, not iterated), or None."""
        return self._unary.get(service)

    def _update_methods(self, service: str) -> None:
        instances = self._services.get(service)
        if instances:
            methods = frozenset(name for state in instances.values() for name in state.endpoints)
            self._methods[service] = methods
            self._unary[service] = methods - {name for state in instances.values() for name in state.streaming}
        else:
            self._methods.pop(service, None)
            self._unary.pop(service, None)
        self._update_cached(service)

    def _update_cached(self, service: str) -> None:
        """Recomputes the cache TTLs of ``service``'s methods: announced by an instance that serves the
        method and declares it idempotent (as ``@rpc`` requires of a ``cache_ttl``: a TTL on any
        other would have clients answer a write from the cache, never sending it), within
        (0, MAX_CACHE_TTL], the shortest when instances differ."""
        for key in [key for key in self.cached if key[0] == service]:
            del self.cached[key]
        for state in self._services.get(service, {}).values():
            for method, ttl in state.cached.items():
                if method in state.endpoints and method in state.idempotent and 0 < ttl <= protocol.MAX_CACHE_TTL:
                    key = (service, method)
                    self.cached[key] = min(ttl, self.cached.get(key, ttl))

    def heard_all(self, interval: float) -> bool:
        """Whether this registry has listened for a whole heartbeat ``interval``: long enough to
        have heard every instance that beats at it. Before that, an instance it does not know may
        be live: a registry started a moment ago has heard nobody yet."""
        return self.clock() - self._listening_since >= interval

    def last_beat(self, service: str) -> float:
        """Returns when (on :attr:`clock`) the latest beat of ``service`` arrived, or -inf if none did."""
        return self._last_beat.get(service, -math.inf)

    async def next_beat(self, service: str, wait: float) -> bool:
        """Waits up to ``wait`` seconds for the next beat of ``service``; returns whether one came."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._beat_waiters.setdefault(service, []).append(waiter)
        try:
            await asyncio.wait_for(waiter, wait)
        except TimeoutError:
            return False
        finally:
            waiters = self._beat_waiters.get(service)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._beat_waiters[service]
        return True

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
                    self._count -= 1
                    self._update_methods(service)
                    self._emit(service, state, "removed")

    def _emit(self, service: str, state: InstanceState, event: str) -> None:
        for callback in self._callbacks:
            try:
                callback(service, state, event)
            except Exception:
                log.exception("registry callback failed")

    async def start(self, nc: Any, prefix: str = protocol.DEFAULT_PREFIX) -> None:
        """Subscribes to every heartbeat and starts expiring silent instances."""
        self.prefix = prefix
        self._sub = await nc.subscribe(f"{prefix}._hb.>", cb=self._on_beat)
        self._listening_since = self.clock()
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
        self.take(msg.subject, msg.data)

    def take(self, subject: str, data: bytes) -> bool:
        """Takes in the heartbeat ``data`` that arrived on ``subject``; returns whether it was used.

        The service and instance are the subject's (``svc._hb.<service>.<id>``), which the server's
        publish permissions guard: a beat whose body names another service or instance is ignored,
        so an identity can change the state of its own instances only.
        """
        where = protocol.parse_heartbeat_subject(subject, self.prefix)
        try:
            beat = heartbeat_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError) as exc:
            self._ignored("bad heartbeat ignored", subject=subject, detail=str(exc))
            return False
        if where is None or where != (beat.name, beat.id):
            detail = f"{beat.name}/{beat.id}"
            self._ignored("heartbeat whose body disagrees with its subject ignored", subject=subject, detail=detail)
            return False
        self.observe(beat)
        return True

    @property
    def ignored_beats(self) -> int:
        """Beats dropped: undecodable, not on a heartbeat subject, a body naming another service or
        instance than its subject, or a new instance past the limits."""
        return self._ignored.count

    async def _sweep_forever(self) -> None:
        while True:
            intervals = [s.interval for inst in self._services.values() for s in inst.values()]
            await asyncio.sleep(min(intervals, default=protocol.DEFAULT_HEARTBEAT_INTERVAL) / 4)
            self.sweep()


def _staying(beat: Heartbeat) -> tuple[str, ...]:
    """The instances a draining beat names as staying: valid names other than its own, at most
    MAX_STAYING (the rest, and any that is not a name, ignored)."""
    named = dict.fromkeys(i for i in beat.staying[: protocol.MAX_STAYING] if i != beat.id and protocol.valid_name(i))
    return tuple(named)


class _Endpoint(msgspec.Struct):
    """What a survey needs of an endpoint in an INFO reply (the Service API's ``endpoint_info``)."""

    name: str
    subject: str
    queue_group: str = ""
    metadata: dict[str, str] | None = None


class _EndpointStats(_Endpoint, kw_only=True):
    """... and in a STATS reply (``endpoint_stats``)."""

    num_requests: int
    num_errors: int
    last_error: str
    processing_time: int
    average_processing_time: int
    data: Any = None


class _Ping(msgspec.Struct):
    """The fields every ``$SRV`` reply has (``ping_response``)."""

    name: str
    id: str
    version: str
    metadata: dict[str, str] | None = None


class _Info(_Ping):
    description: str = ""
    endpoints: list[_Endpoint] | None = None


class _Stats(_Ping):
    started: str = ""
    endpoints: list[_EndpointStats] | None = None


_SURVEY_DECODERS: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    "PING": msgspec.json.Decoder(_Ping),
    "INFO": msgspec.json.Decoder(_Info),
    "STATS": msgspec.json.Decoder(_Stats),
}


async def survey(
    nc: Any, verb: str, service: str = "", wait: float = 0.5, quiet: float | None = None
) -> list[tuple[dict[str, Any], float]]:
    """Asks every instance (of ``service``, or all) a ``$SRV`` question; returns (reply, seconds) pairs.

    Replies are collected for ``wait`` seconds, since any number of instances may answer; with
    ``quiet``, collecting also ends once a reply came and ``quiet`` seconds passed with no other
    (so a slow machine gets all of ``wait`` for the first answer, and a quick one is not kept
    waiting for it). It ends at once when the server says nothing subscribes (no instance runs).
    A reply without the fields of its kind (name, id, version; endpoints with name and subject,
    and a STATS endpoint's counts as integers) is ignored and logged (1st, 2nd, 4th... of them),
    so one broken or hostile responder cannot break a listing of the others. A reply kept is
    returned as it came, with ``metadata`` and ``endpoints`` never null.
    """
    if verb not in protocol.SERVICE_API_VERBS:
        raise ValueError(f"verb must be one of {protocol.SERVICE_API_VERBS}, got {verb!r}")
    if service and not protocol.valid_name(service):
        raise ConfigurationError(f"service name {service!r} must match {protocol.NAME_PATTERN.pattern}")
    inbox = nc.new_inbox()
    replies: list[tuple[dict[str, Any], float]] = []
    sent = time.perf_counter()

    decoder = _SURVEY_DECODERS[verb]
    ignored = logs.Ignored(log)
    came = asyncio.Event()  # a reply, or the server's word that nobody will answer
    nobody = False

    async def collect(msg: Msg) -> None:
        nonlocal nobody
        if not msg.data:  # the server's "no responders" status: nobody answers, which is no reply
            if msg.headers and msg.headers.get(protocol.STATUS) == protocol.NO_RESPONDERS_STATUS:
                nobody = True
                came.set()
            return
        try:
            decoder.decode(msg.data)
            reply = msgspec.json.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            ignored(f"$SRV.{verb} reply ignored", error=str(exc), reply=msg.data.decode(errors="replace"))
            return
        reply["metadata"] = reply.get("metadata") or {}
        if verb != "PING":
            reply["endpoints"] = reply.get("endpoints") or []
        replies.append((reply, time.perf_counter() - sent))
        came.set()

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        subject = protocol.service_api_subject(verb, service)
        sent = time.perf_counter()
        await nc.publish(subject, b"", reply=inbox)
        end = time.perf_counter() + wait
        while (left := end - time.perf_counter()) > 0 and not nobody:
            came.clear()
            try:
                await asyncio.wait_for(came.wait(), left if quiet is None or not replies else min(left, quiet))
            except TimeoutError:
                if replies and quiet is not None:
                    break  # quiet since the last reply
    finally:
        await sub.unsubscribe()
    return replies
