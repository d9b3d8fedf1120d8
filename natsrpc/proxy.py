"""The call sugar: ``client.call_service["kv"].put("a", "1")``, call options and typed proxies."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from natsrpc import protocol
from natsrpc.errors import ConfigurationError

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


@dataclasses.dataclass(frozen=True, slots=True)
class CallOptions:
    """Per-call settings.

    Attributes:
        timeout: seconds the call may take (inside a handler, capped by its remaining deadline).
        headers: extra request headers.
        msgpack: send and expect MessagePack instead of JSON.
    """

    timeout: float
    headers: Mapping[str, str] | None = None
    msgpack: bool = False

    def merged(
        self, *, timeout: float | None = None, headers: Mapping[str, str] | None = None, encoding: str | None = None
    ) -> CallOptions:
        """Returns these options with the given ones replacing them (headers are added)."""
        if timeout is not None and timeout <= 0:
            raise ConfigurationError(f"timeout must be positive, got {timeout!r}")
        if encoding not in (None, "json", "msgpack"):
            raise ConfigurationError(f"encoding must be 'json' or 'msgpack', got {encoding!r}")
        return CallOptions(
            timeout=self.timeout if timeout is None else timeout,
            headers={**(self.headers or {}), **headers} if headers else self.headers,
            msgpack=self.msgpack if encoding is None else encoding == "msgpack",
        )


class ServiceDirectory:
    """``client.call_service``: index it by service name to get a :class:`ServiceProxy`."""

    def __init__(self, client: Invoker, *, spawn: bool) -> None:
        self._client = client
        self._spawn = spawn
        self._proxies: dict[str, ServiceProxy] = {}

    def __getitem__(self, service: str) -> ServiceProxy:
        proxy = self._proxies.get(service)
        if proxy is None:
            if not protocol.valid_name(service):
                raise ConfigurationError(f"service name {service!r} must match {protocol.NAME_PATTERN.pattern}")
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

    def options(
        self, *, timeout: float | None = None, headers: Mapping[str, str] | None = None, encoding: str | None = None
    ) -> ServiceProxy:
        """Returns a proxy whose calls use these options (timeout in seconds, extra headers, encoding)."""
        base = self._options or self._client.default_options
        return ServiceProxy(
            self._client, self._service, base.merged(timeout=timeout, headers=headers, encoding=encoding), self._spawn
        )

    def __getattr__(self, method: str) -> MethodCaller:
        if method.startswith("__"):
            raise AttributeError(method)
        caller = self._methods.get(method)
        if caller is None:
            if not protocol.valid_name(method):
                raise ConfigurationError(f"method name {method!r} must match {protocol.NAME_PATTERN.pattern}")
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

        decoder = signature.msgpack_result if options.msgpack else signature.json_result

        def call(*args: Any, **kwargs: Any) -> Any:
            return client.invoke(name, endpoint.name, (), signature.bind(args, kwargs), options, False, decoder)

        call.__name__ = attr
        call.__doc__ = endpoint.fn.__doc__
        self._methods[attr] = call
        return call

    def options(
        self, *, timeout: float | None = None, headers: Mapping[str, str] | None = None, encoding: str | None = None
    ) -> TypedProxy:
        """Returns a typed proxy whose calls use these options."""
        return TypedProxy(
            self._client, self._service, self._options.merged(timeout=timeout, headers=headers, encoding=encoding)
        )

    def __repr__(self) -> str:
        return f"<TypedProxy {self._service.__name__}>"
