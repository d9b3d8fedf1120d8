"""The call sugar: ``client.call_service["kv"].put("a", "1")``, call options and typed proxies."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Coroutine, Generator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, Unpack

from natsrpc import protocol
from natsrpc.errors import ConfigurationError
from natsrpc.retry import DEFAULT_RETRY, RetryPolicy

if TYPE_CHECKING:
    from natsrpc.service import Service


class Invoker(Protocol):
    """What proxies need of a client: the async :class:`Client` and the blocking ``SyncClient``."""

    default_options: CallOptions

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
        """Starts the call: returns an awaitable or task (async) or the result or a Future (sync)."""

    def stream(
        self,
        service: str,
        method: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        options: CallOptions | None = None,
        result: Any = None,
    ) -> Any:
        """Calls a streaming endpoint: returns its items as an async (or, sync, a plain) iterator."""


class OptionChanges(TypedDict, total=False):
    """The call options a caller may change: ``proxy.options(timeout=0.2, encoding="msgpack")``."""

    timeout: float
    headers: Mapping[str, str]
    encoding: str
    retry: RetryPolicy
    idempotent: bool
    attempt_timeout: float
    instance: str
    cache: bool


@dataclasses.dataclass(frozen=True, slots=True)
class CallOptions:
    """Per-call settings.

    Attributes:
        timeout: seconds the whole call may take, retries included (inside a handler, capped by
            the handler's remaining deadline).
        headers: extra request headers.
        msgpack: send and expect MessagePack instead of JSON.
        retry: the retry policy (``NO_RETRIES`` to turn retries off).
        idempotent: whether the method may run twice, so a timed-out attempt may be retried;
            None = as the method declares (``@rpc(idempotent=True)``, learnt from discovery).
        attempt_timeout: seconds one attempt may take, so a timed-out idempotent call has time to
            retry; None = all the time that is left.
        instance: send to this instance id only (``svc.<service>.<method>.<id>``).
        cache: answer from the client's reply cache when the method allows it (``cache_ttl``);
            False sends the request anyway and keeps the fresh reply.
    """

    timeout: float
    headers: Mapping[str, str] | None = None
    msgpack: bool = False
    retry: RetryPolicy = DEFAULT_RETRY
    idempotent: bool | None = None
    attempt_timeout: float | None = None
    instance: str | None = None
    cache: bool = True

    def merged(self, **changes: Unpack[OptionChanges]) -> CallOptions:
        """Returns these options with ``changes`` replacing them (headers are added to the old ones).

        Raises:
            ConfigurationError: a timeout is not positive, the encoding is unknown, or a header name
                is not an HTTP token.
        """
        fields: dict[str, Any] = dict(changes)
        for key in ("timeout", "attempt_timeout"):
            if fields.get(key) is not None:
                fields[key] = check_timeout(key, fields[key])
        encoding = fields.pop("encoding", None)
        if encoding is not None:
            check_encoding(encoding)
        if "cache" in changes and not isinstance(changes["cache"], bool):
            raise ConfigurationError(f"cache must be True or False, got {changes['cache']!r}")
        if "instance" in changes and not protocol.valid_name(changes["instance"]):
            raise ConfigurationError(f"instance id {changes['instance']!r} is not a subject token")
        headers = fields.pop("headers", None)
        if headers:
            check_headers(headers)
        return dataclasses.replace(
            self,
            **fields,
            headers={**(self.headers or {}), **headers} if headers else self.headers,
            msgpack=self.msgpack if encoding is None else encoding == "msgpack",
        )


MAX_CACHED = 1024
"""The most proxies (per directory) and method callers (per proxy) kept for reuse; more are made anew."""

MAX_TIMEOUT = 7 * 24 * 3600.0
"""The longest timeout a call may have (a week): longer ones overflow deadlines and timers."""


def check_timeout(name: str, value: object) -> float:
    """Returns ``value`` as a timeout in seconds: a real number, positive, finite and at most :data:`MAX_TIMEOUT`.

    Raises:
        ConfigurationError: anything else (a string, a bool, zero, NaN, infinity, 1e308).
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{name} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise ConfigurationError(f"{name} must be positive and at most {MAX_TIMEOUT:g} s, got {value!r}")
    return float(value)


def check_encoding(value: object) -> None:
    """Checks an encoding option.

    Raises:
        ConfigurationError: it is neither ``"json"`` nor ``"msgpack"``.
    """
    if value not in ("json", "msgpack"):
        raise ConfigurationError(f"encoding must be 'json' or 'msgpack', got {value!r}")


def check_headers(headers: Mapping[str, str]) -> None:
    """Checks caller-given headers: names are HTTP tokens, values strings that carry no line break.

    Raises:
        ConfigurationError: a name is not a token, or a value is not a string or holds CR or LF.
    """
    for name, value in headers.items():
        if not isinstance(name, str) or not protocol.HEADER_NAME.fullmatch(name.strip()):
            raise ConfigurationError(f"header name {name!r} is not an HTTP token")
        if not isinstance(value, str) or "\r" in value or "\n" in value:
            raise ConfigurationError(f"header {name}: value {value!r} is not a string on one line")


class ServiceDirectory:
    """``client.call_service``: index it by service name to get a :class:`ServiceProxy`."""

    def __init__(self, client: Invoker, *, spawn: bool) -> None:
        self._client = client
        self._spawn = spawn
        self._proxies: dict[str, ServiceProxy] = {}  # a cache, emptied when it reaches MAX_CACHED

    def __getitem__(self, service: str) -> ServiceProxy:
        proxy = self._proxies.get(service)
        if proxy is None:
            if not protocol.valid_name(service):
                raise ConfigurationError(f"service name {service!r} must match {protocol.NAME_PATTERN.pattern}")
            if len(self._proxies) >= MAX_CACHED:
                self._proxies.clear()
            proxy = self._proxies[service] = ServiceProxy(self._client, service, None, self._spawn)
        return proxy


class ServiceProxy:
    """Calls the methods of one service: ``proxy.get("a")`` sends ``svc.<service>.get``."""

    def __init__(self, client: Invoker, service: str, options: CallOptions | None, spawn: bool) -> None:
        self._client = client
        self._service = service
        self._options = options
        self._spawn = spawn
        self._methods: dict[str, MethodCaller] = {}

    def options(self, **changes: Unpack[OptionChanges]) -> ServiceProxy:
        """Returns a proxy whose calls use these options (see :class:`CallOptions`)."""
        base = self._options or self._client.default_options
        return ServiceProxy(self._client, self._service, base.merged(**changes), self._spawn)

    def instance(self, instance_id: str) -> ServiceProxy:
        """Returns a proxy whose calls go to one instance only (``svc.<service>.<method>.<id>``)."""
        return self.options(instance=instance_id)

    def __getattr__(self, method: str) -> MethodCaller:
        if method.startswith("__"):
            raise AttributeError(method)
        caller = self._methods.get(method)
        if caller is None:
            if not protocol.valid_name(method):
                raise ConfigurationError(f"method name {method!r} must match {protocol.NAME_PATTERN.pattern}")
            if len(self._methods) >= MAX_CACHED:
                self._methods.clear()
            caller = self._methods[method] = MethodCaller(
                self._client, self._service, method, self._options, self._spawn
            )
        return caller

    def __getitem__(self, method: str) -> MethodCaller:
        """Returns the caller of a method whose name is not a Python identifier (``proxy["get-all"]``)."""
        return self.__getattr__(method)

    def __repr__(self) -> str:
        return f"<ServiceProxy {self._service}>"


class MethodCaller:
    """One remote method; calling it returns an awaitable (or a started task, for call_service_async)."""

    __slots__ = ("_client", "_method", "_options", "_service", "_spawn")

    def __init__(self, client: Invoker, service: str, method: str, options: CallOptions | None, spawn: bool) -> None:
        self._client = client
        self._service = service
        self._method = method
        self._options = options
        self._spawn = spawn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._client.invoke(self._service, self._method, args, kwargs, self._options, self._spawn)


class Call(Coroutine[Any, Any, Any]):
    """One call made with the sugar: ``await`` it for a unary endpoint's result, or iterate it
    (``async for``) for a streaming endpoint's items.

    It is a coroutine (``asyncio.create_task(call)``, ``gather`` and ``wait_for`` take it); the
    request goes out when it is first awaited, stepped or iterated.
    """

    __slots__ = ("_args", "_client", "_coro", "_kwargs", "_method", "_options", "_result", "_service")

    def __init__(
        self,
        client: Any,
        service: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        options: CallOptions | None,
        result: Any,
    ) -> None:
        self._client = client
        self._service = service
        self._method = method
        self._args = args
        self._kwargs = kwargs
        self._options = options
        self._result = result
        self._coro: Coroutine[Any, Any, Any] | None = None

    def _call(self) -> Coroutine[Any, Any, Any]:
        coro = self._coro
        if coro is None:
            coro = self._coro = self._client.call(
                self._service, self._method, self._args, self._kwargs, self._options, self._result
            )
        return coro

    def __await__(self) -> Generator[Any, None, Any]:  # the usual path: awaited once, at once
        return self._client.call(  # type: ignore[no-any-return]
            self._service, self._method, self._args, self._kwargs, self._options, self._result
        ).__await__()

    def send(self, value: Any) -> Any:
        return self._call().send(value)

    def throw(self, *exc: Any) -> Any:
        return self._call().throw(*exc)

    def close(self) -> None:
        if self._coro is not None:
            self._coro.close()

    def __aiter__(self) -> Any:
        return self._client.stream(self._service, self._method, self._args, self._kwargs, self._options, self._result)

    def __repr__(self) -> str:
        return f"<Call {self._service}.{self._method}>"


class TypedProxy:
    """``client.proxy(KV)``: calls checked against the Service class, returns decoded to its types."""

    def __init__(self, client: Invoker, service: type[Service], options: CallOptions) -> None:
        self._client = client
        self._service = service
        self._options = options
        self._methods: dict[str, Callable[..., Any]] = {}
        self._by_attr = {ep.attr: ep for ep in service.endpoints.values()}

    def __getattr__(self, attr: str) -> Callable[..., Any]:
        if attr.startswith("__"):
            raise AttributeError(attr)
        method = self._methods.get(attr)
        if method is not None:
            return method
        endpoint = self._by_attr.get(attr)
        if endpoint is None:
            raise AttributeError(f"{self._service.__name__} has no @rpc method {attr!r}")
        client, name, options, signature = self._client, self._service.name, self._options, endpoint.signature
        if options.idempotent is None:
            options = dataclasses.replace(options, idempotent=endpoint.idempotent)
        decoder = signature.msgpack_result if options.msgpack else signature.json_result

        if endpoint.streaming:

            def call(*args: Any, **kwargs: Any) -> Any:
                return client.stream(name, endpoint.name, (), signature.bind(args, kwargs), options, decoder)

        else:

            def call(*args: Any, **kwargs: Any) -> Any:
                return client.invoke(name, endpoint.name, (), signature.bind(args, kwargs), options, False, decoder)

        call.__name__ = attr
        call.__doc__ = endpoint.fn.__doc__
        self._methods[attr] = call
        return call

    def options(self, **changes: Unpack[OptionChanges]) -> TypedProxy:
        """Returns a typed proxy whose calls use these options (see :class:`CallOptions`)."""
        return TypedProxy(self._client, self._service, self._options.merged(**changes))

    def __repr__(self) -> str:
        return f"<TypedProxy {self._service.__name__}>"
