"""The nats-py boundary: every use of a nats-py private internal lives in this module, and only here.

natsrpc talks to NATS through nats-py's public API, plus a few shortcuts through its internals that
make the hot path cheaper or close a hole the public API leaves open. Each is listed below with why;
each has a public-API fallback, which ``NATSRPC_FAST_PATH=0`` selects (read once, at import) and
which is taken too whenever an internal is missing. :func:`missing_internals` names any internal
the installed nats-py lacks (a test fails on it after an upgrade); pyproject pins nats-py to the
minor version these were checked against.

Speed (off under ``NATSRPC_FAST_PATH=0``; the fallback is plain nats-py):

- ``Subscription._pending_queue``, ``_wait_for_msgs_task``, ``_pending_size``, ``_max_msgs``,
  ``_received``: :func:`subscribe` hands a subscription's messages straight to a handler, instead
  of nats-py's queue and per-subscription task (a queue put, a get and a task switch per message).
- ``Client._process_msg``, ``_process_headers``, ``_subs``, ``stats``: the per-message step of
  those subscriptions, with natsrpc's leaner header parser (:func:`natsrpc.protocol.parse_headers`).
- ``Client._status``, ``_flusher_task``, ``_pending``, ``_flush_queue``, ``_pending_data_size``,
  ``_max_pending_size``, ``_send_publish``: :func:`send` and :func:`publish` queue a message
  without ``publish()``'s checks and coroutine frames (natsrpc checked subject and size already).
- ``Client._flush_pending``: :func:`sync_with_server` pushes queued SUBs out before the PING of
  ``flush()`` (nats-py 2.16 can send the PING first, so a PONG does not prove the SUBs arrived).

Correctness (kept under ``NATSRPC_FAST_PATH=0``: they are not speed-ups; their fallback is stated):

- ``Client._connect_command`` and ``_server_info``: :func:`refuse_plaintext` makes a connection
  that was given TLS options refuse, before CONNECT (and with it any credential) is written, a
  server that does not offer TLS, on every connect and reconnect. nats-py sends CONNECT in clear
  then. Fallback when missing: :func:`refuse_plaintext` raises, so TLS options fail closed.
- ``Client._transport``: :func:`drop_socket` closes a socket nats-py leaves open after a refused
  connect or a failed close. Fallback: nothing (the socket leaks until collected).
- ``Client._inbox_prefix``: :func:`inbox_prefix`. Fallback: derived from ``new_inbox()``.
- ``Client._server_info`` also for :func:`server_name` (the runner says whose server it joined).
  Fallback: an empty name.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any, Final

import nats.errors
from nats.aio.client import Client as NatsConnection
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from natsrpc import logs, protocol
from natsrpc.errors import ConfigurationError

log = logs.get_logger("natsrpc.transport")

FAST_PATH: Final = os.environ.get("NATSRPC_FAST_PATH", "1") != "0"
"""Whether the speed shortcuts through nats-py's internals are on (``NATSRPC_FAST_PATH=0`` turns them off)."""

_CONNECTED = NatsConnection.CONNECTED

Handler = Callable[[str, str, bytes, "dict[str, str] | None"], None]
"""Takes a message's subject, reply subject, payload and headers; must not block."""

CONNECTION_INTERNALS: Final = (
    "_status", "_flusher_task", "_pending", "_flush_queue", "_pending_data_size", "_max_pending_size",
    "_send_publish", "_process_msg", "_process_headers", "_subs", "_flush_pending", "_connect_command",
    "_server_info", "_transport", "_inbox_prefix",
)  # fmt: skip
SUBSCRIPTION_INTERNALS: Final = ("_pending_queue", "_wait_for_msgs_task", "_pending_size", "_max_msgs", "_received")


def missing_internals() -> list[str]:
    """Returns the nats-py internals this module uses that the installed nats-py lacks (``Class.attr``)."""
    nc = NatsConnection()
    sub = Subscription(nc, 1, "x")
    missing = [f"Client.{name}" for name in CONNECTION_INTERNALS if not hasattr(nc, name)]
    missing += [f"Subscription.{name}" for name in SUBSCRIPTION_INTERNALS if not hasattr(sub, name)]
    return missing


# Sending.


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
    :func:`natsrpc.protocol.encode_headers`. Returns False, queueing nothing, when nats-py's own
    path is needed (fast path off, not connected, flusher not running, buffer over its limit):
    then ``await`` :func:`publish`.
    """
    if not FAST_PATH:
        return False
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


async def publish(nc: Any, subject: str, body: bytes, reply: str = "", headers: dict[str, str] | None = None) -> None:
    """Publishes a message whose subject, reply and size natsrpc already checked.

    While connected (fast path on) it goes straight to nats-py's sender, skipping ``publish()``'s
    checks (a visible cost per call); otherwise ``nc.publish()`` decides (reconnect buffer, closed,
    draining). Header values are cleaned as :func:`natsrpc.protocol.encode_headers` cleans them.
    """
    if FAST_PATH and getattr(nc, "_status", None) == _CONNECTED and hasattr(nc, "_send_publish"):
        await nc._send_publish(subject, reply, body, len(body), headers)
    else:
        await nc.publish(subject, body, reply=reply, headers=headers)


async def sync_with_server(nc: Any) -> None:
    """Returns once the server has processed every command sent so far: other connections see the
    SUBs, and the server's error for a refused SUB or PUB has reached the error callback.

    nats-py 2.16's ``flush()`` writes its PING straight to the socket while queued commands still
    wait for the flusher task, so the PONG can come back before the SUBs are sent (measured: ~10% of
    requests from another connection right after ``start()`` got a false "no responders"). Pushing
    the queued commands out first restores the order. The fallback flushes twice.
    """
    flush_pending = getattr(nc, "_flush_pending", None) if FAST_PATH else None
    if flush_pending is not None:
        await flush_pending(force_flush=True)
    else:  # public API only: the flusher has written the commands by the time the first PONG is back
        await nc.flush()
    await nc.flush()


# Receiving.


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


async def subscribe(nc: Any, subject: str, handler: Handler, queue: str = "") -> Any:
    """Subscribes ``handler`` to ``subject``, delivered directly (:func:`deliver`) where allowed.

    Otherwise (fast path off, internals missing) an ordinary callback hands ``handler`` the same
    parts, one message at a time. Returns the subscription.
    """

    async def callback(msg: Msg) -> None:
        try:
            handler(msg.subject, msg.reply, msg.data, msg.headers)
        except Exception:
            log.exception("message handler failed", subject=msg.subject)

    sub = await nc.subscribe(subject, queue=queue, cb=callback)
    if FAST_PATH:
        deliver(sub, handler)
    return sub


def supported(sub: Any) -> bool:
    """Whether ``sub`` has the nats-py internals direct delivery replaces."""
    return all(hasattr(sub, name) for name in SUBSCRIPTION_INTERNALS)


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


def fast_headers(nc: Any) -> bool:
    """Replaces nats-py's header parsing on ``nc`` with a leaner one; returns False if off or unsupported.

    Every natsrpc request carries headers (at least ``Natsrpc-Deadline``), and nats-py's parser is
    a visible cost per message. Blocks with a status line (``NATS/1.0 503``) still go to nats-py's.
    The result is the same dict (:func:`natsrpc.protocol.parse_headers`).
    """
    original = getattr(nc, "_process_headers", None)
    if not FAST_PATH or original is None:
        return False

    async def process_headers(headers: bytes | None) -> dict[str, str] | None:
        if not headers:
            return None
        if not headers.startswith(protocol.HEADER_START):
            result: dict[str, str] | None = await original(headers)
            return result
        return protocol.parse_headers(headers)

    nc._process_headers = process_headers
    original_process_msg = getattr(nc, "_process_msg", None)
    if original_process_msg is not None and hasattr(nc, "_subs") and hasattr(nc, "stats"):
        nc._process_msg = _fast_process_msg(nc, original_process_msg)
    return True


def _fast_process_msg(nc: Any, original: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Returns nats-py's per-message step, shortened for directly delivered subscriptions.

    For those it counts the message, parses headers in line and hands the parts to the handler:
    none of the JetStream, old-style-request or slow-consumer branches apply to them. Every other
    subscription goes through nats-py's own code.
    """
    subs = nc._subs
    stats = nc.stats
    parse, start = protocol.parse_headers, protocol.HEADER_START

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
            hdr = parse(headers) if headers.startswith(start) else await nc._process_headers(headers)
        else:
            hdr = None
        try:
            direct._handler(subject.decode(), reply.decode(), data, hdr)
        except Exception:  # a handler bug must not break the connection's read loop
            log.exception("message handler failed", subject=subject.decode(errors="replace"))

    return process_msg


# Connection details.


class PlaintextRefused(nats.errors.Error):
    """Raised inside nats-py's connect when a server that does not offer TLS would get CONNECT."""

    def __str__(self) -> str:
        return "nats: TLS required, but the server does not offer TLS: CONNECT (and any credential) not sent"


def refuse_plaintext(nc: Any) -> None:
    """Makes ``nc`` (not yet connected) refuse, before CONNECT is written, a server that does not offer TLS.

    Applies to the first connect and every reconnect, to every server (those learnt from a
    cluster's INFO too): nats-py writes CONNECT after the TLS upgrade only when the server's INFO
    says ``tls_required`` (or TLS came first), and otherwise in clear. A refused server counts as
    a failed attempt (reported on ``error_cb`` as :class:`PlaintextRefused`); nats-py moves on.

    Raises:
        ConfigurationError: this nats-py lacks the internals the check needs (fail closed).
    """
    command = getattr(nc, "_connect_command", None)
    if command is None or not hasattr(nc, "_server_info"):
        raise ConfigurationError(
            "this nats-py version lacks the hook natsrpc needs to refuse plaintext servers before sending "
            "credentials; TLS options are refused rather than risk sending them in clear"
        )

    def guarded() -> bytes:
        if not (nc._server_info.get("tls_required") or nc.options.get("tls_handshake_first")):
            drop_socket(nc)  # nats-py would leave this socket open on a reconnect
            raise PlaintextRefused()
        result: bytes = command()
        return result

    nc._connect_command = guarded


def drop_socket(nc: Any) -> None:
    """Closes the connection's socket, which nats-py leaves open after a refused or failed close."""
    transport: Any = getattr(nc, "_transport", None)  # Any: nats-py's Transport.close() is untyped
    if transport is not None:
        transport.close()


def inbox_prefix(nc: Any) -> str:
    """Returns the prefix of the connection's reply subjects (``_INBOX`` unless ``inbox_prefix`` was given)."""
    prefix = getattr(nc, "_inbox_prefix", None)
    if isinstance(prefix, bytearray | bytes):
        return prefix.decode()
    return str(nc.new_inbox()).rsplit(".", 1)[0]


def server_name(nc: Any) -> str:
    """Returns the name the connected server gave itself in its INFO (``server_name``), or ""."""
    info = getattr(nc, "_server_info", None)
    return str(info.get("server_name", "")) if isinstance(info, dict) else ""
