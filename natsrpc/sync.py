"""A blocking client for code without an event loop: scripts, Flask/Django views, threads.

:class:`SyncClient` runs a :class:`~natsrpc.client.Client` on an event loop in a background thread;
calls from any number of threads are handed to that loop and waited for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Mapping
from types import TracebackType
from typing import Any, TypeVar

from natsrpc.client import DEFAULT_URL, Client, connect
from natsrpc.errors import ClientClosed
from natsrpc.proxy import CallOptions, ServiceDirectory, TypedProxy
from natsrpc.service import Service

T = TypeVar("T")

_GRACE = 5.0  # seconds a blocked caller waits beyond the call's own deadline before giving up


class SyncClient:
    """A thread-safe blocking client: ``with SyncClient(url) as c: c.call_service["kv"].get("a")``.

    ``c.call_service_async[...]`` returns a :class:`concurrent.futures.Future` instead.

    Args:
        servers: NATS URL or list of URLs.
        **options: as for :func:`natsrpc.connect` (timeout, encoding, user, password, tls, ...).

    Raises:
        ConnectionLost: the first connect failed.
    """

    def __init__(self, servers: str | list[str] = DEFAULT_URL, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="natsrpc-sync-client", daemon=True)
        self._thread.start()
        self._closed = False
        try:
            self._client: Client = self._submit(_connect(servers, options)).result()
        except BaseException:
            self._stop_loop()
            raise
        self.default_options = self._client.default_options
        self.call_service = ServiceDirectory(self, spawn=False)
        self.call_service_async = ServiceDirectory(self, spawn=True)

    @property
    def client(self) -> Client:
        """The underlying async client (use it only from its loop's thread)."""
        return self._client

    def invoke(
        self,
        service: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        options: CallOptions | None,
        spawn: bool,
        result: Any = None,
    ) -> Any:
        """Runs the call on the client's loop; returns its result, or a Future when ``spawn``."""
        future = self._submit(self._client.call(service, method, args, kwargs, options, result))
        if spawn:
            return future
        timeout = (options or self.default_options).timeout + _GRACE
        return future.result(timeout)

    def proxy(self, service: type[Service], **options: Any) -> Any:
        """Returns a proxy of ``service`` whose methods block and return decoded, typed results."""
        return TypedProxy(self, service, self.default_options.merged(**options))

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._closed:
            coro.close()
            raise ClientClosed("the SyncClient is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def close(self) -> None:
        """Closes the client (pending calls fail with ClientClosed) and stops the loop thread."""
        if self._closed:
            return
        future = asyncio.run_coroutine_threadsafe(self._client.close(), self._loop)
        self._closed = True
        try:
            future.result(_GRACE * 2)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


async def _connect(servers: str | list[str], options: dict[str, Any]) -> Client:
    return await connect(servers, **options)
