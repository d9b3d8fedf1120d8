"""The runner's HTTP endpoints for orchestrators and Prometheus: ``/healthz``, ``/readyz``, ``/metrics``.

- ``GET /healthz``: 200 while the process runs (a liveness probe).
- ``GET /readyz``: 200 when connected to NATS, subscribed and every service's ``health()`` is
  true; 503 while starting, draining or disconnected, with a JSON body saying why (a readiness probe).
- ``GET /metrics``: the Prometheus text exposition of a :class:`natsrpc.observe.metrics.Metrics`
  (needs ``natsrpc[metrics]``); 404 without one.

A small HTTP/1.1 server on asyncio (no dependency): one request per connection, a request head
of at most 8 KiB read within 5 seconds, GET and HEAD only. A peer that stops taking the answer is
cut off after 10 seconds, at most 64 connections are open at once (one more is closed as it
comes), and stopping the server closes the connections still open: no peer holds memory or a
file descriptor of the process for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from natsrpc import logs
from natsrpc.errors import ConfigurationError

log = logs.get_logger("natsrpc.observe")

MAX_HEAD = 8192  # bytes of request line and headers
READ_TIMEOUT = 5.0  # seconds to send them
WRITE_TIMEOUT = 10.0  # seconds for the peer to take the answer
MAX_CONNECTIONS = 64  # open at once; one more is closed unanswered
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}

Readiness = Callable[[], Awaitable[dict[str, Any]]]
"""Returns ``{"ready": bool, "reasons": [...], ...}``: what ``/readyz`` answers."""


class HealthServer:
    """Serves ``/healthz``, ``/readyz`` and ``/metrics`` on ``host:port`` (``port=0``: a free one).

    Args:
        port: the TCP port (0 picks a free one: see :attr:`port` once started).
        host: the address to bind (``0.0.0.0``: every interface, as probes and scrapers come from outside).
        readiness: what ``/readyz`` reports; None means always ready.
        metrics: an object with ``exposition() -> bytes`` and ``CONTENT_TYPE`` (a ``Metrics``), or None.
        max_connections: connections open at once; one more is closed at once, unanswered.
        write_timeout: seconds a peer has to take the answer before its connection is dropped.
    """

    def __init__(
        self,
        port: int,
        host: str = "0.0.0.0",
        readiness: Readiness | None = None,
        metrics: Any = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        """Raises ConfigurationError for a port outside 0-65535."""
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigurationError(f"port must be 0-65535, got {port!r}")
        self.host = host
        self.port = port
        self.readiness = readiness
        self.metrics = metrics
        self.max_connections = max_connections
        self.write_timeout = write_timeout
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    @property
    def connections(self) -> int:
        """The connections open now."""
        return len(self._open)

    async def start(self) -> None:
        """Starts listening.

        Raises:
            OSError: the port cannot be bound (in use, or not allowed).
        """
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("serving health and metrics", url=f"http://{self.host}:{self.port}", paths="/healthz /readyz /metrics")

    async def stop(self) -> None:
        """Stops listening and closes the connections still open."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._open):  # asyncio leaves accepted connections open
                writer.transport.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= self.max_connections:
            writer.transport.abort()
            return
        self._open.add(writer)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                await self._send(writer, 400, b"bad request\n", "text/plain")
                return
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                await self._send(writer, 400, b"bad request\n", "text/plain")
                return
            method, target = parts[0], parts[1].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                await self._send(writer, 405, b"only GET and HEAD\n", "text/plain", head_only=False)
                return
            status, body, content_type = await self._answer(target)
            await self._send(writer, status, body, content_type, head_only=method == "HEAD")
        except (ConnectionError, OSError):
            pass  # the peer went away
        finally:
            self._open.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, target: str) -> tuple[int, bytes, str]:
        if target == "/healthz":
            return 200, b'{"live": true}\n', "application/json"
        if target == "/readyz":
            state = await self.readiness() if self.readiness is not None else {"ready": True, "reasons": []}
            return (200 if state["ready"] else 503), json.dumps(state).encode() + b"\n", "application/json"
        if target == "/metrics":
            if self.metrics is None:
                return 404, b"no metrics here: install natsrpc[metrics] (prometheus-client)\n", "text/plain"
            return 200, self.metrics.exposition(), self.metrics.CONTENT_TYPE
        return 404, b"not found: /healthz, /readyz or /metrics\n", "text/plain"

    async def _send(
        self, writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str, head_only: bool = False
    ) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + (b"" if head_only else body))
        try:
            await asyncio.wait_for(writer.drain(), self.write_timeout)
        except TimeoutError:  # the peer stopped reading: close() would wait for it to take the rest
            writer.transport.abort()
