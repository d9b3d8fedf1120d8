"""The client side of a stream: the items of a streaming endpoint, in order, as an async iterator.

A :class:`Receiver` takes the stream's messages as the client's reply subscription hands them over
(:meth:`Receiver.deliver`), checks that they follow the protocol (sequence numbers without gaps or
repeats, no more than ``window`` beyond the last ack, a control subject of the called service) and
queues at most ``window`` of them. The consumer takes items with :meth:`Receiver.next`; every half
window consumed, the receiver acknowledges them on the stream's control subject, which lets the
server send more. It sends a keepalive when it has sent nothing for an interval and fails the
stream with :class:`~natsrpc.errors.StreamInterrupted` when the server has sent nothing for three.

:class:`Stream` is what callers iterate. Leaving the ``async for`` early (``break``, an exception),
calling :meth:`Stream.aclose` or cancelling the consuming task cancels the stream: the server closes
its generator.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

import msgspec
import nats.errors

from natsrpc import codec, logs, protocol, transport
from natsrpc.errors import (
    BadReply,
    CallError,
    CallTimeout,
    ReplyTooLarge,
    StreamInterrupted,
    error_from_reply,
    no_responders,
)
from natsrpc.streams.produce import MISSED_KEEPALIVES

T = TypeVar("T")

log = logs.get_logger("natsrpc.streams")

_ITEM, _END, _ERROR = 0, 1, 2
_MAX_SIZE_DIGITS = 15


class Receiver:
    """The client's state of one stream, from the request until its end.

    Args:
        nc: the client's connection.
        subject: the request subject (for messages).
        reply: this stream's reply subject.
        service: the service called: the control subject the server names must be one of its.
        prefix: the subject prefix.
        window: the window asked for.
        decode: turns an item's body into its value (a msgspec decoder's ``decode``, or None for the raw bytes).
        on_done: called once when the stream ends, however it ends (the client forgets it).
        max_reply_size: the largest reply taken in chunks (a start announcing more is refused).

    A reply too large for one message comes as a stream whose start says ``Natsrpc-Chunked: <bytes>``:
    the receiver joins its chunks (acknowledging them as they arrive) into one item.
    """

    def __init__(
        self,
        nc: Any,
        subject: str,
        reply: str,
        service: str,
        prefix: str,
        window: int,
        decode: Callable[[bytes], Any] | None,
        on_done: Callable[[Receiver], None],
        max_reply_size: int = protocol.DEFAULT_MAX_REPLY_SIZE,
    ) -> None:
        self.nc = nc
        self.max_reply_size = max_reply_size
        self._chunked = -1  # the announced size of a reply sent in chunks; -1 for a stream of items
        self._joined = bytearray()
        self.subject = subject
        self.reply = reply
        self.service = service
        self.prefix = prefix
        self.window = window
        self.decode = decode
        self._on_done = on_done
        self.loop = asyncio.get_running_loop()
        self.control = ""  # named by the start message
        self.keepalive = 0.0
        self.done = False  # ended: the end, an error, a cancel
        self.unary = False  # the endpoint answered with one plain reply (it does not stream)
        self._expected = 1  # the sequence number due next
        self._consumed = 0
        self._acked = 0  # the last ack sent
        self._queue: deque[tuple[int, Any]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._heard = self._last_sent = self.loop.time()
        self._timers: list[asyncio.TimerHandle] = []
        self.error: CallError | None = None  # what ended the stream for its consumer, if not its end
        self._ended: asyncio.Future[None] | None = None

    def expire_at(self, when: float, timeout: float) -> None:
        """Fails the stream at loop time ``when``: a stream's deadline bounds the whole stream."""
        message = (
            f"{self.subject}: the stream did not end within its timeout of {timeout:g} s "
            "(set a longer one with .options(timeout=...) for long streams)"
        )
        self._timers.append(self.loop.call_at(when, self._fail_and_cancel, CallTimeout(message)))

    def deliver(self, data: bytes, headers: dict[str, str] | None) -> None:
        """Takes one message from the reply subject (called as nats-py parses it)."""
        if self.done:
            return
        self._heard = self.loop.time()
        h = headers or {}
        if not self.control and protocol.CONTROL in h and not self._start(h):  # the stream's first message
            return
        seq_text = h.get(protocol.SEQ)
        if seq_text is None:
            self._unnumbered(data, h)
            return
        seq = protocol.parse_count(seq_text, protocol.MAX_SEQ_DIGITS)
        if seq is None:
            self._violation(f"sequence number {seq_text[:20]!r} is not a number")
            return
        if seq != self._expected:
            self._violation(f"message {seq} arrived where {self._expected} was due")
            return
        self._expected = seq + 1
        if len(h) == 1 and seq > 0 and self._chunked < 0 and self.control:  # the usual message: an item
            if seq > self._acked + self.window:
                self._violation(f"item {seq} is beyond the window ({self.window} after ack {self._acked})")
                return
            self._queue.append((_ITEM, data))
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            return
        if protocol.ERROR_CODE in h:
            self._push(_ERROR, error_from_reply(h, data))
        elif not self.control:
            self._violation(f"message {seq} came before any message naming the control subject")
        elif protocol.END in h:
            count = h[protocol.END]
            if count != str(seq - 1):
                self._violation(f"the end says {count[:20]!r} items, {seq - 1} were sent")
            elif self._chunked >= 0 and len(self._joined) != self._chunked:
                self._violation(f"the chunks hold {len(self._joined)} bytes, {self._chunked} were announced")
            else:
                if self._chunked >= 0:
                    self._queue.append((_ITEM, bytes(self._joined)))
                self._push(_END, None)
        elif seq > self._acked + self.window:
            self._violation(f"item {seq} is beyond the window ({self.window} after ack {self._acked})")
        elif self._chunked >= 0:  # a chunk: joined here, acknowledged as it arrives
            if len(self._joined) + len(data) > self._chunked:
                self._violation(f"the chunks exceed the {self._chunked} bytes announced")
                return
            self._joined += data
            if seq - self._acked >= max(1, self.window // 2):
                self._acked = seq
                self._send({protocol.ACK: str(seq)})
        else:
            self._push(_ITEM, data)

    def _unnumbered(self, data: bytes, h: dict[str, str]) -> None:
        """A message without a sequence number: a keepalive, an error before the stream started
        (400, 429, ...), the server's no-responders status, or the plain reply of a unary endpoint."""
        if protocol.KEEPALIVE in h:
            if not self.control:
                self._violation("a keepalive that does not name the control subject came first")
            return
        if h.get(protocol.STATUS) == protocol.NO_RESPONDERS_STATUS and not data:
            self._push(_ERROR, no_responders(self.subject))
        elif protocol.ERROR_CODE in h:
            self._push(_ERROR, error_from_reply(h, data))
        elif self._expected == 1 and not self.control:  # not a streaming endpoint: its result is the only item
            self.unary = True
            self._expected = 2
            self._queue.append((_ITEM, data))
            self._push(_END, None)
        else:
            self._violation("a message without a sequence number")

    def _start(self, h: dict[str, str]) -> bool:
        """Reads the first message's control subject, keepalive interval and (a reply in chunks) size;
        returns False when they break the protocol (the stream is failed then)."""
        control = h.get(protocol.CONTROL, "")
        if protocol.parse_control_subject(control, self.service, self.prefix) is None:
            self._violation(f"the first message names {control[:80]!r}, not a control subject of {self.service}")
            return False
        try:
            keepalive = float(h.get(protocol.KEEPALIVE, ""))
        except ValueError:
            keepalive = -1.0
        if not protocol.MIN_KEEPALIVE <= keepalive <= protocol.MAX_KEEPALIVE:
            self._violation(f"keepalive interval {h.get(protocol.KEEPALIVE, '')[:20]!r} is not usable")
            return False
        chunked = h.get(protocol.CHUNKED)
        if chunked is not None:
            size = protocol.parse_count(chunked, _MAX_SIZE_DIGITS)
            if size is None:
                self._violation(f"{protocol.CHUNKED} {chunked[:20]!r} is not a size")
                return False
            if size > self.max_reply_size:
                self.control = control  # so the cancel reaches the server
                too_large = ReplyTooLarge(
                    f"{self.subject}: the reply of {chunked} bytes exceeds this client's max_reply_size "
                    f"{self.max_reply_size}"
                )
                self._fail_and_cancel(too_large)
                return False
            self._chunked = size
        self.control = control
        self.keepalive = keepalive
        self._timers.append(self.loop.call_later(keepalive, self._tick))
        return True

    async def next(self) -> Any:
        """Returns the next item, decoded.

        Raises:
            StopAsyncIteration: the stream ended.
            CallError: the stream failed (RemoteError from the service, StreamInterrupted, ...).
        """
        while not self._queue:
            if self.done:
                raise StopAsyncIteration
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            except asyncio.CancelledError:  # the consuming task was cancelled: so is the stream
                self.cancel()
                raise
        kind, value = self._queue.popleft()
        if kind == _END:
            self._finish()
            raise StopAsyncIteration
        if kind == _ERROR:
            self.error = value
            self._finish()
            raise value
        self._consumed += 1
        if self.control and self._consumed - self._acked >= max(1, self.window // 2):
            self._acked = self._consumed
            self._send({protocol.ACK: str(self._consumed)})
            # Let nats-py's flusher send the ack now, while the queued items are consumed, so the
            # server sends on instead of waiting for the queue to drain (a stall per window).
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                self.cancel()
                raise
        if self.decode is None:
            return value
        try:
            return self.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            self.cancel()
            raise BadReply(f"item {self._consumed - 1} of {self.subject} does not decode: {exc}") from exc

    def cancel(self) -> None:
        """Gives the stream up: tells the server (which closes its generator) unless it ended already."""
        if self.done:
            return
        if self.control:
            self._send({protocol.CANCEL: "1"})
        else:  # before the start: the control subject is not known yet, every instance hears this
            service_cancels = protocol.cancel_subject(self.service, self.prefix)
            if not transport.send(self.nc, service_cancels, "", self.reply.encode(), b""):
                self.loop.create_task(self._publish(service_cancels, self.reply.encode(), None))
        self._finish()

    def fail(self, error: CallError) -> None:
        """Ends the stream with ``error`` for the consumer (the connection broke, the client closed)."""
        if not self.done:
            self._queue.clear()
            self._push(_ERROR, error)

    def _fail_and_cancel(self, error: CallError) -> None:
        if not self.done:
            self.fail(error)
            self._queue_cancel()

    def _queue_cancel(self) -> None:
        """Tells the server the stream is given up, keeping the queued error for the consumer."""
        if self.control:
            self._send({protocol.CANCEL: "1"})

    def _violation(self, problem: str) -> None:
        """The server broke the protocol: the consumer gets BadReply, the server a cancel."""
        self._fail_and_cancel(BadReply(f"{self.subject}: stream protocol: {problem}"))

    def _push(self, kind: int, value: Any) -> None:
        self._queue.append((kind, value))
        if kind != _ITEM:
            for timer in self._timers:  # nothing more to wait for
                timer.cancel()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            for timer in self._timers:
                timer.cancel()
            self._on_done(self)
            if self._ended is not None and not self._ended.done():
                self._ended.set_result(None)

    async def ended(self) -> None:
        """Returns once the consumer has taken the stream's end or left the stream.

        Raises:
            CallError: the error the consumer got instead of the end.
        """
        if not self.done:
            self._ended = self.loop.create_future()
            await self._ended
        if self.error is not None:
            raise self.error

    def _tick(self) -> None:
        if self.done:
            return
        now = self.loop.time()
        if now - self._heard > MISSED_KEEPALIVES * self.keepalive:
            silent = f"{self.subject}: the server sent nothing for {MISSED_KEEPALIVES} keepalive intervals"
            self._fail_and_cancel(StreamInterrupted(silent))
            return
        if now - self._last_sent >= self.keepalive * 0.9:
            self._send({protocol.KEEPALIVE: "1"})
        self._timers.append(self.loop.call_later(self.keepalive, self._tick))

    def _send(self, headers: dict[str, str]) -> None:
        self._last_sent = self.loop.time()
        if not transport.send(self.nc, self.control, "", b"", protocol.encode_headers(headers)):
            self.loop.create_task(self._publish(self.control, b"", headers))

    async def _publish(self, subject: str, body: bytes, headers: dict[str, str] | None) -> None:
        try:
            await transport.publish(self.nc, subject, body, headers=headers)
        except nats.errors.Error as exc:
            log.debug("stream control message not sent", subject=subject, error=repr(exc))


class Stream(AsyncIterator[T], Generic[T]):
    """The items of one call to a streaming endpoint: ``async for item in stream``.

    The request is sent on the first ``__anext__``. Dropping the stream before its end (leaving
    the loop with ``break``), :meth:`aclose`, or cancelling the task iterating it cancels the
    call: the server closes its generator.
    """

    def __init__(
        self,
        open_: Callable[[], Receiver],
        around: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]] | None = None,
    ) -> None:
        self._open = open_
        self._around = around  # the client's middleware chain, given the stream's call_next
        self._receiver: Receiver | None = None

    @property
    def receiver(self) -> Receiver | None:
        """The stream's receiver once the request was sent (None before)."""
        return self._receiver

    def __aiter__(self) -> Stream[T]:
        return self

    async def __anext__(self) -> T:
        receiver = self._receiver
        if receiver is None:
            receiver = self._receiver = self._open() if self._around is None else await self._open_around()
        item: T = await receiver.next()
        return item

    async def _open_around(self) -> Receiver:
        """Opens the stream inside the middleware chain, which runs (in a task) until the stream ends."""
        assert self._around is not None
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[Receiver] = loop.create_future()

        async def call_next() -> None:
            receiver = self._open()
            opened.set_result(receiver)
            await receiver.ended()

        chain: asyncio.Task[Any] = loop.create_task(self._around(call_next))  # type: ignore[arg-type]
        chain.add_done_callback(_retrieved)
        try:
            await asyncio.wait((opened, chain), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            chain.cancel()
            if opened.done():
                opened.result().cancel()
            raise
        if opened.done():
            return opened.result()
        error = chain.exception()  # a middleware refused the call, or the request could not be sent
        if error is not None:
            raise error
        raise StopAsyncIteration  # a middleware returned without calling call_next(): no items

    async def aclose(self) -> None:
        """Cancels the stream if it has not ended (the server closes its generator)."""
        if self._receiver is not None:
            self._receiver.cancel()

    def __del__(self) -> None:
        receiver = self._receiver
        if receiver is not None and not receiver.done:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing is listening anyway
                receiver.loop.call_soon_threadsafe(receiver.cancel)

    def __await__(self) -> Any:
        raise TypeError("a stream is iterated (async for item in ...), not awaited")


def _retrieved(task: asyncio.Task[Any]) -> None:
    """Marks a finished middleware chain's error as seen: the consumer got it from the stream."""
    if not task.cancelled():
        task.exception()


def decoder_of(result: Any, msgpack: bool) -> Callable[[bytes], Any]:
    """Returns the item decoder: a typed msgspec decoder's ``decode``, or plain JSON/MessagePack."""
    if result is not None:
        decode: Callable[[bytes], Any] = result.decode
        return decode
    return lambda data: codec.decode(data, msgpack) if data else None
