"""Direct delivery: hand a subscription's messages to a plain function as nats-py parses them.

nats-py queues every message of a callback subscription and runs the callback from a task of its
own, one message at a time: a queue put, a get and a task switch per message. The reply inbox and
the endpoint subscriptions need none of that (their handlers never block), so :func:`deliver`
replaces the subscription's queue with a shim that calls the handler at once, with the message's
parts (a :data:`Handler`) rather than a ``Msg``, which costs a dataclass per message. It relies on
nats-py 2.x internals (``Subscription._pending_queue``); :func:`supported` says whether they are
there, and callers fall back to ordinary callbacks when not.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from nats.aio.client import Client as NatsConnection
from nats.aio.msg import Msg

from natsrpc import protocol
from natsrpc.errors import ConfigurationError

log = structlog.get_logger("natsrpc.delivery")

_CONNECTED = NatsConnection.CONNECTED

Handler = Callable[[str, str, bytes, "dict[str, str] | None"], None]
"""Takes a message's subject, reply subject, payload and headers; must not block."""


class _Direct:
    """Stands in for ``asyncio.Queue`` in a nats-py Subscription: ``put_nowait`` calls the handler."""

    __slots__ = ("_handler", "_sub")

    def __init__(self, sub: Any, handler: Handler) -> None:
        self._sub = sub
        self._handler = handler

    def put_nowait(self, msg: Msg) -> None:
        self._sub._pending_size -= len(msg.data)
        try:
            self._handler(msg.subject, msg.reply, msg.data, msg.headers)
        except Exception:  # a handler bug must not break the connection's read loop
            log.exception("message handler failed", subject=msg.subject)

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    def task_done(self) -> None:
        pass

    async def join(self) -> None:
        pass

    def __bool__(self) -> bool:
        return True


class _Kick:
    """What the flusher is handed to wake it: it only asks whether the waiter is done (nobody waits)."""

    __slots__ = ()

    def done(self) -> bool:
        return True


_KICK = _Kick()


def send(nc: Any, subject: str, reply: str, body: bytes, header: bytes = b"") -> bool:
    """Queues one message on the connection's outgoing buffer and wakes its flusher, without awaiting.

    This is what ``nc.publish()`` does while connected, minus its checks and coroutine frames:
    natsrpc checked the subject and the size already, and ``header`` is a block from
    :func:`header_block`. Returns False, queueing nothing, when nats-py's own path is needed (not
    connected, flusher not running, buffer over its limit): then ``await`` :func:`publish`.
    """
    try:  # every nats-py internal is read before anything changes, so a missing one queues nothing
        flusher, commands, queue, stats = nc._flusher_task, nc._pending, nc._flush_queue, nc.stats
        buffered, limit = nc._pending_data_size, nc._max_pending_size
        if nc._status != _CONNECTED or flusher is None or flusher.done():
            return False
    except AttributeError:  # not the nats-py internals this was written against
        return False
    if header:
        size = len(header)
        total = size + len(body)
        command = b"HPUB %b %b %d %d\r\n%b%b\r\n" % (subject.encode(), reply.encode(), size, total, header, body)
    else:
        command = b"PUB %b %b %d\r\n%b\r\n" % (subject.encode(), reply.encode(), len(body), body)
    buffered += len(command)
    if 0 < limit < buffered:
        return False
    commands.append(command)
    nc._pending_data_size = buffered
    stats["out_msgs"] += 1
    stats["out_bytes"] += len(body)
    if queue.empty():
        queue.put_nowait(_KICK)
    return True


_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
_PROTOCOL_NAMES = frozenset(
    [protocol.DEADLINE, protocol.CALLER, protocol.ARGS_FORM, protocol.TRACEPARENT, protocol.CONTENT_TYPE]
)


def header_block(headers: Mapping[str, str]) -> bytes:
    """Encodes headers as nats-py does (``NATS/1.0``, ``Name: value`` lines), or b"" for none.

    Values of natsrpc's own headers are made by natsrpc and go as they are; other values are
    stripped and their line breaks become spaces, as nats-py does.

    Raises:
        ConfigurationError: a name is not an HTTP token.
    """
    if not headers:
        return b""
    lines = ["NATS/1.0\r\n"]
    for name, value in headers.items():
        if name not in _PROTOCOL_NAMES:
            name = name.strip()
            if not name:
                continue
            if not protocol.HEADER_NAME.fullmatch(name):
                raise ConfigurationError(f"header name {name!r} is not an HTTP token")
            value = value.strip().translate(_NEWLINES)
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode()


async def publish(nc: Any, subject: str, body: bytes, reply: str = "", headers: dict[str, str] | None = None) -> None:
    """Publishes a message whose subject, reply and size natsrpc already checked.

    While connected it goes straight to nats-py's sender, skipping ``publish()``'s checks (a
    visible cost per call); otherwise ``nc.publish()`` decides (reconnect buffer, closed, draining).
    """
    if nc._status == _CONNECTED:
        await nc._send_publish(subject, reply, body, len(body), headers)
    else:
        await nc.publish(subject, body, reply=reply, headers=headers)


async def subscribe(nc: Any, subject: str, handler: Handler, queue: str = "") -> Any:
    """Subscribes ``handler`` to ``subject``, delivered directly (:func:`deliver`) where nats-py allows.

    Where it does not, an ordinary callback hands ``handler`` the same parts. Returns the subscription.
    """

    async def callback(msg: Msg) -> None:
        handler(msg.subject, msg.reply, msg.data, msg.headers)

    sub = await nc.subscribe(subject, queue=queue, cb=callback)
    deliver(sub, handler)
    return sub


def supported(sub: Any) -> bool:
    """Whether ``sub`` has the nats-py internals direct delivery replaces."""
    return hasattr(sub, "_pending_queue") and hasattr(sub, "_wait_for_msgs_task") and hasattr(sub, "_pending_size")


def deliver(sub: Any, handler: Handler) -> bool:
    """Makes ``sub`` call ``handler(subject, reply, data, headers)`` at once for each message.

    Returns False, changing nothing, when nats-py lacks the internals this replaces.

    The subscription must have been made with a callback (so nats-py started its task); that task is
    stopped, and unsubscribe/drain keep working.
    """
    if not supported(sub):
        return False
    task = sub._wait_for_msgs_task
    if task is not None and not task.done():
        task.cancel()
    sub._pending_queue = _Direct(sub, handler)
    return True


_HEADER_START = b"NATS/1.0\r\n"
_HEADER_START_LEN = len(_HEADER_START)
_ASCII_SPACE = " \t\n\r\x0b\x0c"  # what bytes.strip() strips; str.strip() would take Unicode spaces too


def fast_headers(nc: Any) -> bool:
    """Replaces nats-py's header parsing on ``nc`` with a leaner one; returns False if unsupported.

    Every natsrpc request carries headers (at least ``Natsrpc-Deadline``), and nats-py's parser is
    a visible cost per message. Blocks with a status line (``NATS/1.0 503``) still go to nats-py's.
    The result is the same dict: names as sent, values stripped, lines without a colon, or with
    an empty name or whitespace, control characters or non-ASCII in the name, skipped.
    """
    original = getattr(nc, "_process_headers", None)
    if original is None:
        return False

    async def process_headers(headers: bytes | None) -> dict[str, str] | None:
        if not headers:
            return None
        if not headers.startswith(_HEADER_START):
            result: dict[str, str] | None = await original(headers)
            return result
        return _parse_headers(headers)

    nc._process_headers = process_headers
    original_process_msg = getattr(nc, "_process_msg", None)
    if original_process_msg is not None and hasattr(nc, "_subs") and hasattr(nc, "stats"):
        nc._process_msg = _fast_process_msg(nc, original_process_msg)
    return True


def _parse_headers(headers: bytes) -> dict[str, str] | None:
    """Parses a header block without a status line (the same dict nats-py's parser returns).

    The block is decoded once (``\\r\\n`` cannot occur inside a UTF-8 sequence, so this equals
    decoding each value), then split: one decode instead of one per name and value.
    """
    end = -4 if headers.endswith(b"\r\n\r\n") else len(headers)  # no empty lines to skip
    out: dict[str, str] = {}
    for line in headers[_HEADER_START_LEN:end].decode("utf-8", "replace").split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep:
            continue
        name = name.strip(_ASCII_SPACE)
        if name and name.isascii() and name.isprintable() and " " not in name:
            out[name] = value.strip(_ASCII_SPACE)
    return out or None


def _fast_process_msg(nc: Any, original: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Returns nats-py's per-message step, shortened for directly delivered subscriptions.

    For those it counts the message, parses headers in line and hands the parts to the handler:
    none of the JetStream, old-style-request or slow-consumer branches apply to them. Every other
    subscription goes through nats-py's own code.
    """
    subs = nc._subs
    stats = nc.stats

    async def process_msg(sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        sub = subs.get(sid)
        direct = getattr(sub, "_pending_queue", None)
        if type(direct) is not _Direct or sub._max_msgs > 0:
            await original(sid, subject, reply, data, headers)
            return
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        sub._received += 1
        if headers:
            hdr = _parse_headers(headers) if headers.startswith(_HEADER_START) else await nc._process_headers(headers)
        else:
            hdr = None
        try:
            direct._handler(subject.decode(), reply.decode(), data, hdr)
        except Exception:  # a handler bug must not break the connection's read loop
            log.exception("message handler failed", subject=subject.decode(errors="replace"))

    return process_msg
