"""The server side of a stream: an endpoint's async generator, its items sent as the client acknowledges them.

A :class:`Producer` sends each item as it is yielded (sequence 1, 2, ...), never more than
``window`` beyond the client's last acknowledgement, then the end (the item count). The first
message it sends, whatever it is (an item, the end, an error or a keepalive), also names the
stream's control subject and keepalive interval. It sends a
keepalive when it has sent nothing for an interval, and gives the stream up when the client has
sent nothing for three. Control messages that break the protocol end the stream with a 400; a
cancel, a silent client or the deadline close the generator (its ``finally`` runs) and send nothing.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Callable
from typing import Any

import nats.errors

from natsrpc import logs, protocol, transport
from natsrpc.context import CallContext
from natsrpc.dispatch import resume
from natsrpc.errors import BadRequest, RemoteError, ReplyTooLarge

log = logs.get_logger("natsrpc.streams")

MISSED_KEEPALIVES = 3
"""Intervals of silence after which the peer of a stream counts as dead."""

_MAX_WINDOW_DIGITS = 6


def new_token() -> str:
    """Returns a stream token: 96 random bits, unguessable, one subject token."""
    return os.urandom(12).hex()


def window_of(headers: dict[str, str]) -> int | None:
    """Returns the window a stream request asks for (capped at MAX_WINDOW), or None for no stream.

    Raises:
        BadRequest: the ``Natsrpc-Stream`` value is not a positive whole number.
    """
    value = headers.get(protocol.STREAM)
    if value is None:
        return None
    window = protocol.parse_count(value, _MAX_WINDOW_DIGITS)
    if not window:  # None or 0
        raise BadRequest(f"header {protocol.STREAM} {value[:20]!r} is not a window (a positive whole number)")
    return min(window, protocol.MAX_WINDOW)


class Producer:
    """One stream being served.

    Args:
        nc: the host's connection.
        reply: the client's reply subject, where every message of the stream goes.
        control: this stream's control subject (the host routes its messages to :meth:`on_control`).
        window: the most items sent beyond the client's last acknowledgement.
        keepalive: seconds between keepalives, both ways.
        encode: encodes one item (checked against the item annotation); raises as ``encode_result``.
        call: the call's context (its ``cancelled`` is set when the stream is given up).
        where: ``service.method``, for messages.
        start: more headers for the start message (``Natsrpc-Chunked`` for a reply sent in chunks).
        on_suspend: called once, before the stream first waits (for the generator, for credit, or
            to publish): the host arms the deadline then. A stream that runs to its end in one
            step (most short ones) costs no timer.
    """

    def __init__(
        self,
        nc: Any,
        reply: str,
        control: str,
        window: int,
        keepalive: float,
        encode: Callable[[Any], bytes],
        call: CallContext,
        where: str,
        start: dict[str, str] | None = None,
        on_suspend: Callable[[], None] | None = None,
    ) -> None:
        self.nc = nc
        # Headers the first message carries, whatever it is; None once it went out.
        self._first: dict[str, str] | None = {
            protocol.CONTROL: control,
            protocol.KEEPALIVE: f"{keepalive:g}",
            **(start or {}),
        }
        self.reply = reply
        self.control = control
        self.window = window
        self.keepalive = keepalive
        self.encode = encode
        self.call = call
        self.where = where
        self.sent = 0  # the sequence number of the last item sent
        self.acked = 0  # the last sequence number the client acknowledged
        self._loop = asyncio.get_running_loop()
        self._credit: asyncio.Event | None = None  # made when the stream first runs out of credit
        self.on_suspend = on_suspend
        self._task: asyncio.Task[Any] | None = None
        self._error: RemoteError | None = None  # a protocol error of the client's, to answer with
        self._heard = self._last_sent = self._loop.time()
        self._ticker: asyncio.TimerHandle | None = None

    async def run(self, items: AsyncGenerator[Any, None]) -> None:
        """Sends every item under credit, then the end; always closes ``items``.

        Raises:
            RemoteError: the generator raised one, an item does not fit, or the client broke the
                protocol; the caller replies with it (:meth:`closing_headers` numbers it).
            asyncio.CancelledError: the client cancelled or went silent, or the deadline passed.
        """
        self._task = asyncio.current_task()
        try:
            nc, reply, encode, send, loop = self.nc, self.reply, self.encode, transport.send, self._loop
            next_item = items.__anext__
            while True:
                step = next_item()
                try:  # the generator's step runs here; only one that waits arms the timers
                    yielded = step.send(None)
                except StopIteration as done:
                    item = done.value
                except StopAsyncIteration:
                    break
                else:
                    if self._ticker is None:
                        self._suspending()
                    try:
                        item = await resume(step, yielded)
                    except StopAsyncIteration:
                        break
                seq = self.sent + 1
                body = encode(item)
                if self._first is None:
                    headers = None
                    block = protocol.seq_block(seq)
                else:
                    headers = self._with_first({protocol.SEQ: str(seq)})
                    block = protocol.encode_headers(headers)
                if len(body) + len(block) > nc.max_payload:
                    raise ReplyTooLarge(
                        f"{self.where}: stream item at index {seq - 1} is {len(body)} bytes, "
                        f"over max_payload {nc.max_payload}"
                    )
                while seq > self.acked + self.window:  # out of credit: wait for the client's ack
                    if self._credit is None:
                        self._credit = asyncio.Event()
                    if self._ticker is None:
                        self._suspending()
                    self._credit.clear()
                    await self._credit.wait()
                self._last_sent = loop.time()
                if not send(nc, reply, "", body, block):  # buffer full, or not connected: in order, awaited
                    if self._ticker is None:
                        self._suspending()
                    await self._publish(headers or {protocol.SEQ: str(seq)}, body)
                self.sent = seq
            await self._emit(self._with_first({protocol.SEQ: str(self.sent + 1), protocol.END: str(self.sent)}))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._error is not None and task is not None and task.uncancel() == 0:
                raise self._error from None
            raise
        finally:
            if self._ticker is not None:
                self._ticker.cancel()
            await items.aclose()  # the generator's finally runs now, whatever ended the stream

    def _suspending(self) -> None:
        """Arms the keepalive ticker, and the host's deadline, before the stream first waits."""
        self._ticker = self._loop.call_later(self.keepalive, self._tick)
        if self.on_suspend is not None:
            self.on_suspend()
            self.on_suspend = None

    def closing_headers(self) -> dict[str, str]:
        """The headers an error reply ending this stream carries: the next sequence number (and the
        control subject, if it is the stream's first message)."""
        return self._with_first({protocol.SEQ: str(self.sent + 1)})

    def _with_first(self, headers: dict[str, str]) -> dict[str, str]:
        """Adds the first message's headers to ``headers`` if nothing was sent yet."""
        first, self._first = self._first, None
        return headers if first is None else headers | first

    def on_control(self, headers: dict[str, str] | None) -> None:
        """Takes a message from the client on the control subject: an ack, a keepalive or a cancel."""
        self._heard = self._loop.time()
        headers = headers or {}
        if protocol.CANCEL in headers:
            self.give_up("cancelled by its caller")
            return
        ack = headers.get(protocol.ACK)
        if ack is not None:
            n = protocol.parse_count(ack, protocol.MAX_SEQ_DIGITS)
            if n is None:
                self.fail(f"ack {ack[:20]!r} is not a sequence number")
                return
            if not self.acked < n <= self.sent:
                self.fail(f"ack {n} after ack {self.acked}, with {self.sent} items sent")
                return
            self.acked = n
            if self._credit is not None:
                self._credit.set()
        elif protocol.KEEPALIVE not in headers:
            self.fail(f"a control message needs {protocol.ACK}, {protocol.KEEPALIVE} or {protocol.CANCEL}")

    def fail(self, problem: str) -> None:
        """Ends the stream with a 400 for a control message that breaks the protocol."""
        if self._error is None and self._task is not None:
            self._error = BadRequest(f"{self.where}: stream protocol: {problem}")
            self._task.cancel()

    def give_up(self, reason: str) -> None:
        """Ends the stream without a reply (the client cancelled or went silent): closes the generator."""
        self.call.cancelled = True
        self.call.cancel_reason = reason
        if self._task is not None:
            self._task.cancel()

    def _tick(self) -> None:
        now = self._loop.time()
        if now - self._heard > MISSED_KEEPALIVES * self.keepalive:
            self.give_up(f"its caller went silent ({MISSED_KEEPALIVES} keepalive intervals)")
            return
        if now - self._last_sent >= self.keepalive * 0.9:
            self._send(self._with_first({protocol.KEEPALIVE: f"{self.keepalive:g}"}))
        self._ticker = self._loop.call_later(self.keepalive, self._tick)

    async def _emit(self, headers: dict[str, str], body: bytes = b"", block: bytes | None = None) -> None:
        """Sends one numbered message: queued on nats-py's buffer at once, or (buffer full, not
        connected) through nats-py's publish, awaited, so the messages keep their order."""
        self._last_sent = self._loop.time()
        if block is None:
            block = protocol.encode_headers(headers)
        if not transport.send(self.nc, self.reply, "", body, block):
            await self._publish(headers, body)

    def _send(self, headers: dict[str, str]) -> None:
        """Sends a keepalive (unnumbered: its order does not matter) without waiting."""
        self._last_sent = self._loop.time()
        if not transport.send(self.nc, self.reply, "", b"", protocol.encode_headers(headers)):
            self._loop.create_task(self._publish(headers, b""))

    async def _publish(self, headers: dict[str, str], body: bytes) -> None:
        try:
            await transport.publish(self.nc, self.reply, body, headers=headers)
        except nats.errors.Error as exc:
            log.warning("stream message not sent", where=self.where, error=repr(exc))


async def chunks(body: bytes, size: int) -> AsyncGenerator[bytes, None]:
    """Yields ``body`` in pieces of at most ``size`` bytes (a reply too large for one message)."""
    view = memoryview(body)
    for start in range(0, len(body), size):
        yield bytes(view[start : start + size])


def array_reply(bodies: list[bytes], msgpack: bool) -> bytes:
    """Returns items already encoded one by one as one encoded array (the reply to a plain request)."""
    if not msgpack:
        return b"[" + b",".join(bodies) + b"]"
    n = len(bodies)
    if n < 16:
        head = bytes([0x90 | n])
    elif n < 0x10000:
        head = b"\xdc" + n.to_bytes(2, "big")
    else:
        head = b"\xdd" + n.to_bytes(4, "big")
    return head + b"".join(bodies)
