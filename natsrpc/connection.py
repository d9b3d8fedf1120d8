"""Opening the NATS connection of a :class:`~natsrpc.client.Client`: ``natsrpc.connect()``.

It owns the connection defaults (RELIABILITY.md), the security options, the first-connect rules
(fail fast, no endless retry on bad credentials) and the nats-py callbacks, each logged.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from types import TracebackType
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NatsConnection

from natsrpc import auth, logs, protocol, transport
from natsrpc.cache import DEFAULT_CACHE_BYTES, DEFAULT_CACHE_SIZE
from natsrpc.circuit import CircuitConfig
from natsrpc.client import DEFAULT_CIRCUIT, DEFAULT_TIMEOUT, Client, check_cache_size, check_client_options
from natsrpc.errors import (
    AuthenticationFailed,
    ConfigurationError,
    ConnectionLost,
    is_authentication_failure,
    permission_violation,
    translate_nats_errors,
)
from natsrpc.observe.middleware import Middleware, check_middleware
from natsrpc.retry import DEFAULT_RETRY, RetryPolicy

log = logs.get_logger("natsrpc.connection")

DEFAULT_URL = "nats://127.0.0.1:4222"

# Connection defaults from RELIABILITY.md: detect a hung server within seconds (F5), reconnect
# forever once connected, and fail the first connect quickly.
CONNECTION_DEFAULTS: dict[str, Any] = {
    "ping_interval": 2,
    "max_outstanding_pings": 2,
    "max_reconnect_attempts": -1,
    "reconnect_time_wait": 0.25,
    "connect_timeout": 2,
    "allow_reconnect": True,
}

# nats-py retries the *first* connect as it reconnects: forever with max_reconnect_attempts=-1
# (or 0). The first connect retries each server this many times, then raises; the configured
# value applies once connected.
FIRST_CONNECT_RETRIES = 1

ABANDON_TIMEOUT = 0.5  # seconds to close a connection whose connect() failed


class connect:
    """Connects to NATS and returns a :class:`Client`; await it or use it with ``async with``.

    Args:
        servers: a URL, a comma-separated string of URLs, or a list of URLs (``nats://host:4222``).
        timeout: default call timeout in seconds.
        encoding: ``"json"`` or ``"msgpack"``.
        prefix: subject prefix.
        name: connection name shown by the server.
        caller: the ``Natsrpc-Caller`` of calls made outside handlers.
        discovery: follow heartbeats (``client.registry``), feeding the circuit breakers.
        circuit: circuit-breaker settings (:class:`natsrpc.circuit.CircuitConfig`); None = off.
        retry: default retry policy (:class:`natsrpc.retry.RetryPolicy`).
        middleware: runs around every call this client makes, the first listed outermost
            (:mod:`natsrpc.observe.middleware`).
        cache_size: the most replies of ``cache_ttl`` methods the client keeps (0: no reply cache).
        cache_bytes: the most bytes of such replies (with their encoded arguments) it keeps
            (default 64 MiB; a reply over it is not kept).
        user: user name, with ``password``.
        password: password.
        token: authentication token.
        nkeys_seed: path of a file holding an NKey seed.
        creds: path of a user credentials file (JWT and NKey seed).
        tls_ca: CA file that signs the server's certificate; any ``tls_*`` option requires TLS.
        tls_cert: client certificate file, for mutual TLS.
        tls_key: private key file of ``tls_cert``.
        inbox_prefix: prefix of this connection's reply subjects (default ``_INBOX``): give each
            identity its own (``_INBOX_app``) and allow it only that, so no one reads others' replies.
        **nats_options: passed to ``nats.connect`` over natsrpc's defaults (``ping_interval``,
            ``tls`` as a ready SSLContext, ...).

    Raises:
        ConnectionLost: the first connect failed (no server, refused, timed out, TLS handshake).
        AuthenticationFailed: the server refused the credentials (after one retry per server, no loop).
        ConfigurationError: unusable options (a missing file, or TLS asked for and the server has none).
    """

    def __init__(
        self,
        servers: str | list[str] = DEFAULT_URL,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        encoding: str = "json",
        prefix: str = protocol.DEFAULT_PREFIX,
        name: str = "natsrpc-client",
        caller: str = "client",
        discovery: bool = True,
        circuit: CircuitConfig | None = DEFAULT_CIRCUIT,
        retry: RetryPolicy = DEFAULT_RETRY,
        middleware: Sequence[Middleware] | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        nkeys_seed: str | None = None,
        creds: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        inbox_prefix: str | None = None,
        **nats_options: Any,
    ) -> None:
        if "tls" in nats_options and (tls_ca or tls_cert or tls_key):
            raise ConfigurationError("give tls (an SSLContext) or tls_ca/tls_cert/tls_key, not both")
        check_client_options(timeout=timeout, encoding=encoding, prefix=prefix, caller=caller)
        check_middleware(middleware)
        check_cache_size(cache_size, cache_bytes)
        security = auth.nats_options(
            user=user, password=password, token=token, nkeys_seed=nkeys_seed, creds=creds,
            tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, inbox_prefix=inbox_prefix,
        )  # fmt: skip
        self._servers = auth.split_servers(servers)
        self._name = name
        self._nats_options = {**security, **nats_options}
        self._client_options: dict[str, Any] = {
            "timeout": timeout, "encoding": encoding, "prefix": prefix, "caller": caller,
            "discovery": discovery, "circuit": circuit, "retry": retry, "middleware": middleware,
            "cache_size": cache_size, "cache_bytes": cache_bytes,
        }  # fmt: skip
        self._client: Client | None = None

    async def _connect(self) -> Client:
        servers, name, nats_options = self._servers, self._name, self._nats_options
        client_ref: list[Client] = []
        refusals: list[Exception] = []  # what went wrong in each failed attempt of the first connect
        options = {**CONNECTION_DEFAULTS, **_callbacks(client_ref, refusals), "name": name, **nats_options}
        reconnect_attempts = options["max_reconnect_attempts"]
        if not 0 < reconnect_attempts <= FIRST_CONNECT_RETRIES:
            options["max_reconnect_attempts"] = FIRST_CONNECT_RETRIES
        nc = NatsConnection()
        tls = "tls" in options or any(url.startswith("tls://") for url in servers)
        if tls:
            transport.refuse_plaintext(nc)  # before CONNECT, on every connect and reconnect
        try:
            await nc.connect(servers, **options)
            nc.options["max_reconnect_attempts"] = reconnect_attempts
        except (TimeoutError, nats.errors.NoServersError, OSError) as exc:
            await _abandon(nc)
            refused = next((e for e in refusals if is_authentication_failure(e)), None)
            if refused is not None:
                who = _credentials(options)
                raise AuthenticationFailed(
                    f"the NATS server at {auth.redacted(servers)} refused the credentials ({who}): {refused}"
                ) from exc
            plaintext = next((e for e in refusals if isinstance(e, transport.PlaintextRefused)), None)
            if plaintext is not None:
                raise ConfigurationError(
                    f"TLS options given, but the server at {auth.redacted(servers)} does not use TLS: "
                    "nothing was sent to it"
                ) from exc
            raise ConnectionLost(f"cannot connect to {auth.redacted(servers)}: {_why(refusals, exc)}") from exc
        except BaseException as exc:
            await _abandon(nc)
            if isinstance(exc, nats.errors.Error):
                with translate_nats_errors():
                    raise
            raise
        try:
            client = Client(nc, **self._client_options)
            client_ref.append(client)
            await client.start()
        except BaseException:
            await _abandon(nc)
            raise
        return client

    def __await__(self) -> Generator[Any, None, Client]:
        return self._connect().__await__()

    async def __aenter__(self) -> Client:
        self._client = await self._connect()
        return self._client

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._client is not None:
            await self._client.close()


def _why(refusals: list[Exception], exc: BaseException) -> str:
    """Says in words why the first connect failed (``connection refused``), from what nats-py reported."""
    last = refusals[-1] if refusals else exc
    if isinstance(last, ConnectionRefusedError):
        return "connection refused"
    if isinstance(last, TimeoutError):
        return "timed out"
    if isinstance(last, OSError) and last.strerror:
        return last.strerror.lower()
    return repr(last)


async def _abandon(nc: NatsConnection) -> None:
    """Closes a connection whose ``connect()`` failed, so it does not go on reconnecting in the background."""
    if nc.is_closed:
        return
    try:
        # Bounded: nats-py 2.16 waits for good closing a connection whose TLS handshake failed.
        await asyncio.wait_for(nc.close(), ABANDON_TIMEOUT)
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        log.debug("closing a failed connection failed", error=repr(exc))
    transport.drop_socket(nc)


def _credentials(options: Mapping[str, Any]) -> str:
    """Returns which credentials a connection presented, for error messages (never the secrets)."""
    if options.get("user") is not None:
        return f"user {options['user']!r}"
    kinds = {"token": "a token", "nkeys_seed": "an NKey seed", "user_credentials": "a creds file", "tls": "TLS"}
    presented = [label for key, label in kinds.items() if options.get(key) is not None]
    return ", ".join(presented) or "none: the server requires some"


RECONNECT_LOG_EVERY = 10.0
"""While reconnecting, at most one log line per this many seconds (nats-py retries every 0.25 s)."""

_CONNECTION_ERRORS = (OSError, TimeoutError, nats.errors.UnexpectedEOF, nats.errors.StaleConnectionError)


class _Outage:
    """What the callbacks know of the current outage, to log it in one line and then every 10 s."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.since: float | None = None
        self.next_log = 0.0
        self.failed = 0
        self.last: Exception | None = None


def _callbacks(client_ref: list[Client], refusals: list[Exception]) -> dict[str, Callable[..., Awaitable[None]]]:
    """Returns nats-py callbacks that log every event and fail pending calls on disconnect or refusal.

    ``refusals`` collects the errors of the first connect (before ``client_ref`` holds the client).
    """

    outage = _Outage()

    async def error_cb(exc: Exception) -> None:
        if not client_ref:  # the first connect: connect() raises with the reason, so nothing is logged
            refusals.append(exc)
            if isinstance(exc, ssl.SSLError):
                # nats-py 2.16 hangs for good closing a connection whose TLS handshake failed (it
                # waits for a close the swapped-out protocol never sees): give up this connect now.
                raise ConnectionLost(f"TLS handshake with the NATS server failed: {exc}") from exc
            return
        violation = permission_violation(exc)
        if violation is not None:
            log.warning("nats permission denied", operation=violation[0], subject=violation[1])
            for client in client_ref:
                client.refuse(*violation)
            return
        if client_ref and is_authentication_failure(exc):
            # A reconnect whose credentials the server now refuses: retrying them forever helps no
            # one, so the connection ends and every call, pending or new, fails with the reason.
            log.error("nats server refused the credentials on reconnect: closing the connection", error=repr(exc))
            for client in client_ref:
                # nats-py opens the next attempt's socket without closing this refused one (a leak
                # and a ResourceWarning): close it, the server has hung up anyway.
                transport.drop_socket(client.nc)
                client.end(AuthenticationFailed(f"the NATS server refused the credentials on reconnect: {exc}"))
            return
        if isinstance(exc, transport.PlaintextRefused):
            log.error("refused a NATS server that does not offer TLS: nothing was sent to it", error=str(exc))
            return
        if isinstance(exc, _CONNECTION_ERRORS):  # the link broke, or a reconnect attempt failed
            outage.failed += 1
            outage.last = exc
            now = time.monotonic()
            if outage.since is not None and now >= outage.next_log:
                outage.next_log = now + RECONNECT_LOG_EVERY
                log.warning(
                    "nats still reconnecting", down_s=round(now - outage.since, 1), failed_attempts=outage.failed,
                    error=repr(exc),
                )  # fmt: skip
            return
        log.warning("nats error", error=repr(exc))

    def closing() -> bool:
        return any(client.closed for client in client_ref)

    async def disconnected_cb() -> None:
        if not client_ref:  # a failed first connect: connect() raises with the reason
            return
        if closing():
            log.debug("nats disconnected (client closing)")
            return
        outage.since = time.monotonic()
        outage.next_log = outage.since + RECONNECT_LOG_EVERY
        log.warning("nats disconnected, reconnecting", error=repr(outage.last) if outage.last else None)
        for client in client_ref:
            client.on_disconnected()

    async def reconnected_cb() -> None:
        down = time.monotonic() - outage.since if outage.since is not None else 0.0
        log.info("nats reconnected", down_s=round(down, 3), failed_attempts=outage.failed)
        outage.reset()
        for client in client_ref:
            client.on_reconnected()

    async def closed_cb() -> None:
        if not client_ref:
            return
        (log.debug if closing() else log.warning)("nats connection closed")
        for client in client_ref:
            client.fail_pending(ConnectionLost("the NATS connection closed while the call was pending"))

    async def discovered_server_cb() -> None:
        log.info("nats server discovered")

    async def lame_duck_mode_cb() -> None:
        log.warning("nats server entered lame duck mode")

    return {
        "error_cb": error_cb,
        "disconnected_cb": disconnected_cb,
        "reconnected_cb": reconnected_cb,
        "closed_cb": closed_cb,
        "discovered_server_cb": discovered_server_cb,
        "lame_duck_mode_cb": lame_duck_mode_cb,
    }
