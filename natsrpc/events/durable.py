"""Durable events on JetStream: ``@event("order.created", durable=True)``.

The stream ``EVENTS`` captures ``evt.>`` (created when missing). Each durable handler has one
durable pull consumer, ``<service>_<method>``, shared by the service's instances, so each event
is handled by one of them and survives the service being down. An event is acknowledged after
its handler returns. A handler that raises gets it again after a backoff (1 s, 5 s, 30 s by
default); after ``max_deliver`` deliveries (default 5) it goes to
``evt._dlq.<service>.<type>`` with the error in a ``Natsrpc-Error`` header and is acknowledged.
A payload that does not fit the handler goes there at once: a 400 is not retried.

Fetching follows the instance's free handler slots, so nothing is buffered beyond them; on a
graceful stop the fetching stops first, and the handlers in flight finish and acknowledge.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig

from natsrpc import logs, protocol
from natsrpc.errors import ConfigurationError
from natsrpc.events.serve import EventPool, EventRoute

log = logs.get_logger("natsrpc.events")

STREAM = "EVENTS"
DEFAULT_BACKOFF: tuple[float, ...] = (1.0, 5.0, 30.0)
DEFAULT_MAX_DELIVER = 5
ERROR_HEADER = "Natsrpc-Error"
_FETCH_WAIT = 1.0  # seconds one fetch waits for events before asking again
ACK_WAIT_MARGIN = 30.0  # seconds JetStream waits beyond the handler's timeout before redelivering


def dead_letter_subject(service: str, event_type: str) -> str:
    """Where events a handler gave up on go: ``evt._dlq.<service>.<type>``."""
    return f"{protocol.EVENT_PREFIX}._dlq.{service}.{event_type}"


async def ensure_stream(js: Any, stream_config: dict[str, Any] | None = None) -> None:
    """Creates the ``EVENTS`` stream (capturing ``evt.>``) unless it exists.

    Raises:
        ConfigurationError: the server has no JetStream.
    """
    try:
        await js.stream_info(STREAM)
        return
    except nats.js.errors.NotFoundError:
        pass
    except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
        raise ConfigurationError(
            "durable event handlers need JetStream: start nats-server with -js (the runner's embedded one has it)"
        ) from None
    config = StreamConfig(name=STREAM, subjects=[f"{protocol.EVENT_PREFIX}.>"], **(stream_config or {}))
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError as exc:  # created by another instance meanwhile
        if "already in use" not in str(exc):
            raise


class DurableConsumer:
    """Feeds one durable handler of one instance from its JetStream consumer."""

    def __init__(
        self,
        js: Any,
        route: EventRoute,
        pool: EventPool,
        backoff: Sequence[float] = DEFAULT_BACKOFF,
        max_deliver: int = DEFAULT_MAX_DELIVER,
        ack_wait: float = 60.0,
    ) -> None:
        self.js = js
        self.route = route
        self.pool = pool
        self.backoff = tuple(backoff)
        self.max_deliver = max_deliver
        self.ack_wait = ack_wait
        self.name = f"{route.service.name}_{route.handler.attr}"
        self._sub: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Binds (or creates) the durable consumer and starts fetching."""
        config = ConsumerConfig(
            durable_name=self.name,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            max_deliver=self.max_deliver,
            ack_wait=self.ack_wait,
            filter_subject=protocol.event_subject(self.route.handler.pattern),
            max_ack_pending=max(1, self.pool.size) * 4,
        )
        subject = protocol.event_subject(self.route.handler.pattern)
        self._sub = await self.js.pull_subscribe(subject, durable=self.name, stream=STREAM, config=config)
        self._task = asyncio.get_running_loop().create_task(self._fetch_forever())

    async def stop(self) -> None:
        """Stops fetching (the events in flight finish in the pool and acknowledge)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except nats.errors.Error:
                pass
            self._sub = None

    async def _fetch_forever(self) -> None:
        pool = self.pool
        while True:
            free = pool.size - pool.running
            if free <= 0:
                await pool.slot_free()
                continue
            try:
                messages = await self._sub.fetch(free, timeout=_FETCH_WAIT)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except nats.errors.Error as exc:
                log.warning("durable events: fetch failed, retrying", consumer=self.name, error=repr(exc))
                await asyncio.sleep(_FETCH_WAIT)
                continue
            for msg in messages:
                pool.admit_durable(self.route, msg, self)

    async def settle(self, msg: Any, error: BaseException | None, invalid: bool) -> None:
        """After the handler: acknowledge, or redeliver after the backoff, or dead-letter."""
        try:
            if error is None:
                await msg.ack()
                return
            delivered = msg.metadata.num_delivered if msg.metadata is not None else 1
            if invalid or delivered >= self.max_deliver:
                await self._dead_letter(msg, error, delivered)
                await msg.ack()
                return
            await msg.nak(delay=self.backoff[min(delivered, len(self.backoff)) - 1] if self.backoff else None)
        except nats.errors.Error as exc:  # the event stays unacknowledged: JetStream redelivers it
            log.warning("durable events: acknowledgement not sent", consumer=self.name, error=repr(exc))

    async def _dead_letter(self, msg: Any, error: BaseException, delivered: int) -> None:
        event_type = msg.subject[len(protocol.EVENT_PREFIX) + 1 :]
        headers = dict(msg.headers or {})
        headers.pop("Nats-Msg-Id", None)
        headers[ERROR_HEADER] = protocol.clean_header_value(f"{type(error).__name__}: {error}")[:1024]
        headers["Natsrpc-Deliveries"] = str(delivered)
        subject = dead_letter_subject(self.route.service.name, event_type)
        await self.js.publish(subject, msg.data, headers=headers)
        log.warning(
            "durable event dead-lettered", handler=self.route.where, event_type=event_type,
            deliveries=delivered, dead_letter=subject, error=repr(error),
        )  # fmt: skip
