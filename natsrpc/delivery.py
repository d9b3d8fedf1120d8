"""Direct delivery: hand a subscription's messages to a plain function as nats-py parses them.

nats-py queues every message of a callback subscription and runs the callback from a task of its
own, one message at a time: a queue put, a get and a task switch per message. The reply inbox and
the endpoint subscriptions need none of that (their handlers never block), so :func:`deliver`
replaces the subscription's queue with a shim that calls the handler at once. It relies on
nats-py 2.x internals (``Subscription._pending_queue``); :func:`supported` says whether they are
there, and callers fall back to ordinary callbacks when not.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from nats.aio.client import Client as NatsConnection
from nats.aio.msg import Msg

log = structlog.get_logger("natsrpc.delivery")

_CONNECTED = NatsConnection.CONNECTED


class _Direct:
    """Stands in for ``asyncio.Queue`` in a nats-py Subscription: ``put_nowait`` calls the handler."""

    __slots__ = ("_handler", "_sub")

    def __init__(self, sub: Any, handler: Callable[[Msg], None]) -> None:
        self._sub = sub
        self._handler = handler

    def put_nowait(self, msg: Msg) -> None:
        self._sub._pending_size -= len(msg.data)
        try:
            self._handler(msg)
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


async def publish(nc: Any, subject: str, body: bytes, reply: str = "", headers: dict[str, str] | None = None) -> None:
    """Publishes a message whose subject, reply and size natsrpc already checked.

    While connected it goes straight to nats-py's sender, skipping ``publish()``'s checks (a
    visible cost per call); otherwise ``nc.publish()`` decides (reconnect buffer, closed, draining).
    """
    if nc._status == _CONNECTED:
        await nc._send_publish(subject, reply, body, len(body), headers)
    else:
        await nc.publish(subject, body, reply=reply, headers=headers)


def supported(sub: Any) -> bool:
    """Whether ``sub`` has the nats-py internals direct delivery replaces."""
    return hasattr(sub, "_pending_queue") and hasattr(sub, "_wait_for_msgs_task") and hasattr(sub, "_pending_size")


def deliver(sub: Any, handler: Callable[[Msg], None]) -> bool:
    """Makes ``sub`` call ``handler(msg)`` synchronously for each message; returns False if unsupported.

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


def fast_headers(nc: Any) -> bool:
    """Replaces nats-py's header parsing on ``nc`` with a leaner one; returns False if unsupported.

    Every natsrpc request carries headers (at least ``Natsrpc-Deadline``), and nats-py's parser is
    a visible cost per message. Blocks with a status line (``NATS/1.0 503``) still go to nats-py's.
    The result is the same dict: names as sent, values stripped, lines without a colon or with
    whitespace or non-ASCII in the name skipped.
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
    """Parses a header block without a status line (the same dict nats-py's parser returns)."""
    out: dict[str, str] = {}
    for line in headers[len(_HEADER_START) :].split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip()
        if not name or not name.isascii() or b" " in name or b"\t" in name:
            continue
        out[name.decode()] = value.strip().decode("utf-8", "replace")
    return out or None


def _fast_process_msg(nc: Any, original: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Returns nats-py's per-message step, shortened for directly delivered subscriptions.

    For those it counts the message, parses headers in line, builds the ``Msg`` and hands it to
    the handler: none of the JetStream, old-style-request or slow-consumer branches apply to them.
    Every other subscription goes through nats-py's own code.
    """
    subs = nc._subs
    stats = nc.stats
    msg_class = nc.msg_class

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
        msg = msg_class(_client=nc, subject=subject.decode(), reply=reply.decode(), data=data, headers=hdr, _sid=sid)
        try:
            direct._handler(msg)
        except Exception:  # a handler bug must not break the connection's read loop
            log.exception("message handler failed", subject=msg.subject)

    return process_msg
