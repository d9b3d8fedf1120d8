"""A blocking client for code without an event loop: scripts, Flask/Django views, threads.

:class:`SyncClient` runs a :class:`~natsrpc.client.Client` on an event loop in a background thread;
calls from any number of threads are handed to that loop and waited for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

from natsrpc.client import Client
from natsrpc.connection import DEFAULT_URL, connect
from natsrpc.errors import BadRequest, ClientClosed
from natsrpc.proxy import CallOptions, ServiceDirectory, TypedProxy
from natsrpc.service import Service
from natsrpc.streams import consume

T = TypeVar("T")

_GRACE = 5.0  # seconds a blocked caller waits beyond the call's own deadline before giving up


class SyncClient:
    """A thread-safe blocking client: ``with SyncClient(url) as c: c.call_service["kv"].get("a")``.

    ``c.call_service_async[...]`` returns a :class:`concurrent.futures.Future` instead.

    Args:
        servers: NATS URL, comma-separated URLs, or a list of URLs.
        **options: as for :func:`natsrpc.connect` (timeout, encoding, user, password, creds,
            tls_ca, tls_cert, tls_key, inbox_prefix, ...).

    Raises:
        ConnectionLost: the first connect failed.
    """

    def __init__(self, servers: str | list[str] = DEFAULT_URL, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="natsrpc-sync-client", daemon=True)
        self._thread.start()
        self._lock = threading.Lock()  # makes "refuse new calls" and "start closing" one step
        self._closed = False
        self._calls: set[asyncio.Task[Any]] = set()  # calls running on the loop (touched there only)
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
        """Runs the call on the client's loop; returns its result, or a Future when ``spawn``.

        A streaming endpoint (known from discovery, or saying so when called) gives an iterator of
        its items instead: ``for item in c.call_service["llm"].tokens("hi")``.
        """
        registry = self._client.registry
        if not spawn and registry is not None:
            unary = registry.unary_methods(service)
            if unary is not None and method not in unary and method in (registry.methods(service) or ()):
                return self.stream(service, method, args, kwargs, options, result)
        future = self._submit(self._client.call(service, method, args, kwargs, options, result))
        if spawn:
            return future
        timeout = (options or self.default_options).timeout + _GRACE
        try:
            return future.result(timeout)
        except BadRequest as exc:
            if exc.type != "StreamingEndpoint":
                raise
            return self.stream(service, method, args, kwargs, options, result)

    def stream(
        self,
        service: str,
        method: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        options: CallOptions | None = None,
        result: Any = None,
    ) -> SyncStream[Any]:
        """Calls a streaming endpoint; returns a blocking iterator of its items (see :meth:`Client.stream`)."""
        stream = self._client.stream(service, method, args, kwargs, options, result)
        return SyncStream(self, stream, (options or self.default_options).timeout + _GRACE)

    def emit(self, event_type: str, value: Any, *, encoding: str | None = None) -> None:
        """Publishes an event (see :meth:`Client.emit`); returns once it is handed to the server."""

        async def emit_and_flush() -> None:
            await self._client.emit(event_type, value, encoding=encoding)
            await self._client.nc.flush()

        self._submit(emit_and_flush()).result(self.default_options.timeout + _GRACE)

    def proxy(self, service: type[Service], **options: Any) -> Any:
        """Returns a proxy of ``service`` whose methods block and return decoded, typed results."""
        return TypedProxy(self, service, self.default_options.merged(**options))

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        with self._lock:
            if self._closed:
                coro.close()
                raise ClientClosed("the SyncClient is closed")
            return asyncio.run_coroutine_threadsafe(self._track(coro), self._loop)

    async def _track(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs one call as a task that :meth:`close` can find: it must end before the loop stops."""
        task = asyncio.current_task()
        assert task is not None
        self._calls.add(task)
        try:
            return await coro
        except asyncio.CancelledError:
            if self._closed:  # cancelled by _shutdown(): the caller's future gets ClientClosed
                raise ClientClosed("the SyncClient was closed while the call was pending") from None
            raise
        finally:
            self._calls.discard(task)

    async def _shutdown(self) -> None:
        """Closes the client, then ends the calls still running (e.g. waiting to retry) with ClientClosed."""
        await self._client.close()
        # Calls waiting for a reply failed with ClientClosed above; a call between attempts (retry
        # backoff) is not waiting for one and would never finish once the loop stops.
        calls = {task for task in self._calls if task is not asyncio.current_task()}
        for task in calls:
            task.cancel()
        if calls:
            await asyncio.wait(calls, timeout=_GRACE)

    def close(self) -> None:
        """Closes the client (pending calls fail with ClientClosed) and stops the loop thread.

        Safe to call from any thread, and more than once; calls made after it raise ClientClosed.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        try:
            future.result(_GRACE * 2)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        with self._lock:
            self._closed = True
            if self._loop.is_closed():
                return
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class SyncStream(Iterator[T]):
    """A stream's items for blocking code: ``for item in stream``; :meth:`close` (or dropping it) cancels it."""

    def __init__(self, owner: SyncClient, stream: consume.Stream[T], wait: float) -> None:
        self._owner = owner
        self._stream = stream
        self._wait = wait
        self._done = False

    def __iter__(self) -> SyncStream[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        try:
            return self._owner._submit(self._next()).result(self._wait)
        except StopAsyncIteration:
            self._done = True
            raise StopIteration from None

    async def _next(self) -> T:
        return await self._stream.__anext__()

    def close(self) -> None:
        """Cancels the stream if it has not ended (the server closes its generator)."""
        if not self._done:
            self._done = True
            with contextlib.suppress(ClientClosed):
                self._owner._submit(self._stream.aclose()).result(self._wait)

    def __del__(self) -> None:
        if not self._done:
            with contextlib.suppress(Exception):  # the client or its loop may be gone already
                self.close()


async def _connect(servers: str | list[str], options: dict[str, Any]) -> Client:
    return await connect(servers, **options)
