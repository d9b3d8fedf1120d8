"""The Service base class and the ``@rpc`` decorator: how users define endpoints.

A Service subclass is checked once, when the class is defined: its name and version, and every
``@rpc`` method's signature (see :class:`natsrpc.codec.Signature`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, overload

import msgspec

from natsrpc import logs, protocol
from natsrpc.codec import Signature
from natsrpc.errors import ConfigurationError, DefinitionError
from natsrpc.events.handlers import EventHandler, collect_event_handlers

if TYPE_CHECKING:
    from natsrpc.client import Client
    from natsrpc.proxy import ServiceDirectory

F = TypeVar("F", bound=Callable[..., Any])

MAX_CACHE_TTL = protocol.MAX_CACHE_TTL

_RPC_MARK = "__natsrpc_rpc__"


@dataclass(frozen=True, slots=True)
class _RpcOptions:
    name: str | None
    idempotent: bool
    cache_ttl: float | None = None


@overload
def rpc(fn: F, /) -> F: ...
@overload
def rpc(*, name: str | None = None, idempotent: bool = False, cache_ttl: float | None = None) -> Callable[[F], F]: ...
def rpc(
    fn: F | None = None, /, *, name: str | None = None, idempotent: bool = False, cache_ttl: float | None = None
) -> F | Callable[[F], F]:
    """Marks a Service method as an endpoint, callable as ``svc.<service>.<name>``.

    Args:
        fn: the method (when used as a bare ``@rpc``).
        name: the endpoint name; defaults to the method name.
        idempotent: whether running the call twice is harmless, so a timed-out call may be retried.
        cache_ttl: seconds clients may keep a successful reply and answer the same call (same
            arguments) from it without sending a request; only for idempotent methods. A service
            drops entries early with :meth:`Service.invalidate`.

    Returns:
        The method itself, marked; the Service class validates it when the class is defined.
    """

    def mark(f: F) -> F:
        if not callable(f):
            raise DefinitionError(f"@rpc decorates methods, got {f!r}")
        if cache_ttl is not None:
            where = getattr(f, "__qualname__", repr(f))
            if (
                isinstance(cache_ttl, bool)
                or not isinstance(cache_ttl, int | float)
                or not 0 < cache_ttl <= MAX_CACHE_TTL
            ):
                raise DefinitionError(
                    f"{where}: cache_ttl must be seconds in (0, {MAX_CACHE_TTL:g}], got {cache_ttl!r}"
                )
            if not idempotent:
                raise DefinitionError(
                    f"{where}: cache_ttl needs idempotent=True (a cached reply stands in for running the call)"
                )
        setattr(f, _RPC_MARK, _RpcOptions(name, idempotent, cache_ttl))
        return f

    return mark if fn is None else mark(fn)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One ``@rpc`` method of a Service class, validated.

    Attributes:
        name: the endpoint (subject) name.
        attr: the Python method name.
        fn: the unbound function.
        is_async: whether it is a coroutine function (plain ``def`` runs in a worker thread).
        idempotent: whether a timed-out call may be retried.
        streaming: whether it is an async generator (``-> AsyncIterator[T]``), streaming its items.
        cache_ttl: seconds clients may answer the same call from a kept reply (None: never cached).
        signature: argument/return codecs.
        description: the first line of the docstring.
    """

    name: str
    attr: str
    fn: Callable[..., Any]
    is_async: bool
    idempotent: bool
    signature: Signature
    description: str = ""
    streaming: bool = False
    cache_ttl: float | None = None


@dataclass(slots=True)
class ServiceContext:
    """What a hosted service instance knows about where it runs (``self.ctx``).

    Attributes:
        name: the service name.
        instance_id: this instance's unique id (also in per-instance subjects).
        client: the client of the hosting connection, used by ``self.call_service``.
        log: natsrpc's logger bound to the service and instance (structlog's once the application
            configured structlog, as the runner does; standard logging otherwise).
        config: the service's section of the runner's configuration.
    """

    name: str
    instance_id: str
    client: Client
    log: Any
    config: Mapping[str, Any] = field(default_factory=dict)


class Service:
    """Base class of natsrpc services: subclass it, set ``name``/``version``, decorate with ``@rpc``.

    Class attributes:
        name: the service name (one subject token); defaults to the lower-cased class name.
        version: semantic version, e.g. ``"1.0.0"``.
        description: one line for discovery.
        metadata: string key/value pairs published in discovery.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "0.1.0"
    description: ClassVar[str] = ""
    metadata: ClassVar[Mapping[str, str]] = {}
    endpoints: ClassVar[Mapping[str, Endpoint]] = {}
    event_handlers: ClassVar[Mapping[str, EventHandler]] = {}

    _ctx: ServiceContext | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:  # an explicit name (even "") is validated, never replaced
            cls.name = cls.name or cls.__name__.lower()
        if not protocol.valid_name(cls.name):
            raise DefinitionError(
                f"{cls.__qualname__}: service name {cls.name!r} must match {protocol.NAME_PATTERN.pattern}"
            )
        if not isinstance(cls.version, str) or not protocol.SEMVER_PATTERN.fullmatch(cls.version):
            raise DefinitionError(f"{cls.__qualname__}: version {cls.version!r} is not semantic (e.g. '1.0.0')")
        for key, value in cls.metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise DefinitionError(f"{cls.__qualname__}: metadata must map str to str, got {key!r}: {value!r}")
        cls.endpoints = _collect_endpoints(cls)
        cls.event_handlers = collect_event_handlers(cls, cls.name)

    async def setup(self) -> None:
        """Runs once before the instance starts serving; override to open resources."""

    async def cleanup(self) -> None:
        """Runs once after the instance stopped serving (in-flight calls done); override to close."""

    async def health(self) -> bool:
        """Returns whether the instance is fit to take calls; sent in every heartbeat. Override to check."""
        return True

    @property
    def ctx(self) -> ServiceContext:
        """The service context; available once the instance is hosted.

        Raises:
            RuntimeError: the instance is not hosted.
        """
        if self._ctx is None:
            raise RuntimeError(f"{type(self).__name__} is not hosted yet: self.ctx exists inside setup() and handlers")
        return self._ctx

    @property
    def call_service(self) -> ServiceDirectory:
        """Calls other services (or this one) like a client: ``self.call_service["kv"].get("a")``."""
        return self.ctx.client.call_service

    @property
    def call_service_async(self) -> ServiceDirectory:
        """Like :attr:`call_service`, but each call returns a task to await later."""
        return self.ctx.client.call_service_async

    async def emit(
        self,
        event_type: str,
        value: Any,
        *,
        encoding: str | None = None,
        durable: bool = False,
        msg_id: str | None = None,
    ) -> None:
        """Publishes an event on ``evt.<event_type>``, with this handler's trace and caller
        (:meth:`natsrpc.Client.emit`)."""
        await self.ctx.client.emit(event_type, value, encoding=encoding, durable=durable, msg_id=msg_id)

    async def invalidate(self, method: str, /, **arguments: Any) -> None:
        """Makes every client drop the replies of ``method`` it keeps for these arguments.

        ``await self.invalidate("get", key="a")`` after a write to ``a``: clients drop the entries of
        ``get`` whose arguments hold ``key="a"`` (given by name or position); with no arguments,
        every entry of ``get``. Published on ``svc._inval.<service>``; returns once the server has
        it (one round trip). Clients that miss it (not connected at that moment) keep their entries
        until the TTL passes.

        Raises:
            ConfigurationError: ``method`` is not an endpoint with ``cache_ttl``, an argument is not
                one of its parameters, or a value cannot be encoded as JSON.
            PermissionDenied: the server refused the publish (allow publishing ``svc._inval.<service>``).
            CallTimeout: the server did not confirm it within the client's timeout (the connection
                is down; it is sent when the connection comes back).
        """
        endpoint = self.endpoints.get(method)
        if endpoint is None or endpoint.cache_ttl is None:
            cached = sorted(name for name, ep in self.endpoints.items() if ep.cache_ttl is not None)
            raise ConfigurationError(
                f"{self.name}.invalidate: {method!r} is not a cached method (those with cache_ttl: {cached})"
            )
        unknown = sorted(set(arguments) - set(endpoint.signature.names))
        if unknown:
            raise ConfigurationError(f"{self.name}.invalidate: {method} has no argument {', '.join(unknown)}")
        try:
            body = msgspec.json.encode({"method": method, "arguments": arguments})
        except (TypeError, msgspec.EncodeError) as exc:
            raise ConfigurationError(f"{self.name}.invalidate: arguments not encodable as JSON: {exc}") from None
        client = self.ctx.client
        client.cache.on_invalidation(self.name, body)  # this process's own entries, at once
        await client.publish_invalidation(self.name, body)

    def _bind(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        ctx.log = logs.get_logger("natsrpc.service").bind(service=ctx.name, instance=ctx.instance_id)


def _collect_endpoints(cls: type[Service]) -> dict[str, Endpoint]:
    endpoints: dict[str, Endpoint] = {}
    seen_attrs: set[str] = set()
    for klass in cls.__mro__:
        for attr, value in vars(klass).items():
            if attr in seen_attrs:
                continue
            seen_attrs.add(attr)
            options = getattr(value, _RPC_MARK, None)
            if not isinstance(options, _RpcOptions):
                continue
            name = attr if options.name is None else options.name  # an explicit "" is validated, not replaced
            where = f"{cls.name}.{name or attr}"
            if not protocol.valid_name(name):
                raise DefinitionError(f"{where}: endpoint name {name!r} must match {protocol.NAME_PATTERN.pattern}")
            if name in endpoints:
                raise DefinitionError(f"{where}: two methods use the endpoint name {name!r}")
            doc = inspect.getdoc(value) or ""
            signature = Signature(value, where)
            streaming = inspect.isasyncgenfunction(value)
            if streaming and not signature.streaming:
                raise DefinitionError(f"{where}: an async generator must be annotated '-> AsyncIterator[ItemType]'")
            if signature.streaming and not streaming:
                raise DefinitionError(f"{where}: '-> AsyncIterator[...]' needs an async generator (async def, yield)")
            if streaming and options.cache_ttl is not None:
                raise DefinitionError(f"{where}: a stream's items are not cached (cache_ttl is for unary methods)")
            endpoints[name] = Endpoint(
                name=name,
                attr=attr,
                fn=value,
                is_async=inspect.iscoroutinefunction(value),
                idempotent=options.idempotent,
                signature=signature,
                description=doc.splitlines()[0] if doc else "",
                streaming=streaming,
                cache_ttl=options.cache_ttl,
            )
    return endpoints
