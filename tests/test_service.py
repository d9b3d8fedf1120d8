"""Tests for natsrpc.service: Service definitions are validated once, when the class is defined."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Mapping
from typing import ClassVar

import msgspec
import pytest

from natsrpc import DefinitionError, Service, rpc


class Item(msgspec.Struct):
    """A Struct argument and return type."""

    key: str
    value: int = 0


class Opaque:
    """A plain class msgspec cannot encode without hooks."""


class HasOpaque(msgspec.Struct):
    """A Struct hiding an unsupported type in a nested field."""

    items: list[dict[str, Opaque]]


class KV(Service):
    """A well-formed service using every way to declare an endpoint."""

    name = "kv"
    version = "1.2.3"
    description = "key/value store"
    metadata: ClassVar[Mapping[str, str]] = {"team": "storage"}

    @rpc
    async def put(self, key: str, value: str) -> None:
        """Stores a value.

        More text that is not part of the description.
        """

    @rpc(idempotent=True, name="x")
    async def get(self, key: str) -> str | None:
        """Returns a value."""
        return None

    @rpc
    def size(self) -> int:
        return 0

    @rpc(name="get-all")
    async def get_all(self, prefix: str = "", *, limit: int = 100) -> list[Item]:
        """Returns items."""
        return []

    async def helper(self) -> None:
        """Not an endpoint: no @rpc."""


class ExtendedKV(KV):
    """Inherits KV's endpoints and adds one; overriding ``size`` without @rpc removes that endpoint."""

    name = "extkv"

    @rpc
    async def delete(self, key: str) -> bool:
        """Deletes a value."""
        return True

    def size(self) -> int:
        return 1


class OverridingKV(KV):
    """Overrides an endpoint with a new signature, which replaces the inherited one."""

    name = "overkv"

    @rpc
    async def put(self, key: str, value: str, ttl: float = 0.0) -> None:
        """Stores a value with a ttl."""


class MyDefaultName(Service):
    """Takes its name from the class."""


class Versionless(Service):
    """Uses the default version."""

    name = "versionless"


class TestDefinitionErrors:
    """Badly defined services fail at class definition with a DefinitionError that says what is wrong."""

    def test_service_name_with_dot(self) -> None:
        """A service name must be a single subject token."""
        with pytest.raises(DefinitionError, match=r"service name 'a\.b' must match"):

            class Bad(Service):
                name = "a.b"

    def test_empty_service_name(self) -> None:
        """An explicitly empty service name is rejected, not replaced by the class name."""
        with pytest.raises(DefinitionError, match="service name '' must match"):

            class Bad(Service):
                name = ""

    @pytest.mark.parametrize(
        "name", ["a b", "-a", "a*", "a>", "_hb"], ids=["space", "dash", "star", "gt", "underscore"]
    )
    def test_service_name_not_a_token(self, name: str) -> None:
        """Names that are not a plain subject token are rejected."""
        with pytest.raises(DefinitionError, match="service name"):
            type("Bad", (Service,), {"name": name})

    @pytest.mark.parametrize(
        "version", ["1.0", "x", "1.0.0.0", "v1.0.0", ""], ids=["two-parts", "word", "four", "v", "empty"]
    )
    def test_bad_version(self, version: str) -> None:
        """A version must be semantic (major.minor.patch)."""
        with pytest.raises(DefinitionError, match="is not semantic"):
            type("Bad", (Service,), {"name": "bad", "version": version})

    def test_metadata_must_be_strings(self) -> None:
        """Discovery metadata maps str to str."""
        with pytest.raises(DefinitionError, match="metadata must map str to str"):
            type("Bad", (Service,), {"metadata": {"replicas": 3}})

    def test_unannotated_parameter(self) -> None:
        """Every parameter needs a type annotation; the message names it."""
        with pytest.raises(DefinitionError, match=r"bad\.f: argument 'key' needs a type annotation"):

            class Bad(Service):
                @rpc
                async def f(self, key) -> None:
                    """Unannotated."""

    def test_missing_return_annotation(self) -> None:
        """The return type must be annotated, even when it is None."""
        with pytest.raises(DefinitionError, match=r"bad\.f: needs a return annotation"):

            class Bad(Service):
                @rpc
                async def f(self, key: str):
                    """No return annotation."""

    def test_var_positional(self) -> None:
        """``*args`` is rejected: every argument must be named."""
        with pytest.raises(DefinitionError, match=r"\*args/\*\*kwargs are not supported"):

            class Bad(Service):
                @rpc
                async def f(self, *keys: str) -> None:
                    """Variadic."""

    def test_var_keyword(self) -> None:
        """``**kwargs`` is rejected: every argument must be named."""
        with pytest.raises(DefinitionError, match=r"\*args/\*\*kwargs are not supported"):

            class Bad(Service):
                @rpc
                async def f(self, **options: str) -> None:
                    """Variadic."""

    def test_positional_only(self) -> None:
        """Positional-only parameters are rejected because the JSON object form names every argument."""
        with pytest.raises(DefinitionError, match="positional-only argument 'key'"):

            class Bad(Service):
                @rpc
                async def f(self, key: str, /) -> None:
                    """Positional-only."""

    @pytest.mark.parametrize(
        ("make", "fragment"),
        [
            (lambda: _endpoint_with_argument_type(socket.socket), "argument 'a': msgspec cannot encode socket.socket"),
            (
                lambda: _endpoint_with_argument_type(Opaque),
                "argument 'a': msgspec cannot encode " + f"{__name__}.Opaque",
            ),
            (lambda: _endpoint_with_argument_type(HasOpaque), "argument 'a': msgspec cannot encode"),
            (lambda: _endpoint_with_argument_type(list[Opaque]), "argument 'a': msgspec cannot encode"),
            (lambda: _endpoint_with_return_type(socket.socket), "return type: msgspec cannot encode socket.socket"),
            (lambda: _endpoint_with_return_type(Opaque | None), "return type: msgspec cannot encode"),
        ],
        ids=["socket-arg", "plain-class-arg", "nested-in-struct", "in-list", "socket-return", "optional-return"],
    )
    def test_unsupported_type(self, make: Callable[[], type[Service]], fragment: str) -> None:
        """Types msgspec can only handle through hooks are rejected at definition, not per message."""
        with pytest.raises(DefinitionError, match="unsupported") as info:
            make()
        assert fragment in str(info.value)

    def test_unresolvable_annotation(self) -> None:
        """An annotation naming an undefined type is a DefinitionError, not a NameError at call time."""
        with pytest.raises(DefinitionError, match="cannot resolve type annotations"):

            class Bad(Service):
                @rpc
                async def f(self, key: Undefined) -> None:  # noqa: F821
                    """Refers to a missing name."""

    def test_duplicate_endpoint_names(self) -> None:
        """Two methods may not share an endpoint name."""
        with pytest.raises(DefinitionError, match="two methods use the endpoint name 'x'"):

            class Bad(Service):
                @rpc(name="x")
                async def f(self) -> None:
                    """First."""

                @rpc(name="x")
                async def g(self) -> None:
                    """Second."""

    def test_endpoint_name_clashes_with_method_name(self) -> None:
        """An explicit endpoint name may not reuse another method's default name."""
        with pytest.raises(DefinitionError, match="endpoint name 'f'"):

            class Bad(Service):
                @rpc
                async def f(self) -> None:
                    """First."""

                @rpc(name="f")
                async def g(self) -> None:
                    """Second."""

    @pytest.mark.parametrize("name", ["a.b", "", "a b", "a*"], ids=["dot", "empty", "space", "wildcard"])
    def test_bad_endpoint_name(self, name: str) -> None:
        """An endpoint name must be a single subject token."""

        async def f(self: Service) -> None:
            """Badly named."""

        with pytest.raises(DefinitionError, match=re.escape(f"endpoint name {name!r} must match")):
            type("Bad", (Service,), {"name": "bad", "f": rpc(name=name)(f)})

    def test_rpc_on_non_callable(self) -> None:
        """@rpc only decorates callables."""
        with pytest.raises(DefinitionError, match="@rpc decorates methods"):
            rpc(5)

    def test_definition_error_is_type_error(self) -> None:
        """DefinitionError is also a TypeError, as wrong definitions are in Python."""
        assert issubclass(DefinitionError, TypeError)


def _endpoint_with_argument_type(annotation: object) -> type[Service]:
    """Defines a service whose endpoint takes one argument of type ``annotation``."""

    async def f(self: Service, a: object) -> None:
        """One argument."""

    f.__annotations__ = {"a": annotation, "return": None}
    return type("Bad", (Service,), {"name": "bad", "f": rpc(f)})


def _endpoint_with_return_type(annotation: object) -> type[Service]:
    """Defines a service whose endpoint returns ``annotation``."""

    async def f(self: Service) -> object:
        """Returns something."""

    f.__annotations__ = {"return": annotation}
    return type("Bad", (Service,), {"name": "bad", "f": rpc(f)})


class TestGoodDefinitions:
    """Well-formed services expose their endpoints with names, options and signatures."""

    def test_endpoint_names(self) -> None:
        """Endpoints are keyed by their endpoint name (the method name unless @rpc(name=...))."""
        assert set(KV.endpoints) == {"put", "x", "size", "get-all"}
        assert "helper" not in KV.endpoints

    def test_bare_rpc(self) -> None:
        """A bare @rpc endpoint is named after the method and is not idempotent."""
        endpoint = KV.endpoints["put"]
        assert (endpoint.name, endpoint.attr, endpoint.idempotent, endpoint.is_async) == ("put", "put", False, True)
        assert endpoint.fn is KV.__dict__["put"]

    def test_rpc_options(self) -> None:
        """@rpc(idempotent=True, name="x") sets the endpoint name and the retry flag."""
        endpoint = KV.endpoints["x"]
        assert (endpoint.name, endpoint.attr, endpoint.idempotent) == ("x", "get", True)

    def test_sync_handler(self) -> None:
        """A plain ``def`` handler is detected as not async (it runs in a worker thread)."""
        assert KV.endpoints["size"].is_async is False

    def test_description_is_first_docstring_line(self) -> None:
        """The endpoint description is the first line of its docstring, empty without one."""
        assert KV.endpoints["put"].description == "Stores a value."
        assert KV.endpoints["size"].description == ""

    def test_signature(self) -> None:
        """Each endpoint carries its Signature: names, defaults and the return type."""
        signature = KV.endpoints["get-all"].signature
        assert signature.names == ("prefix", "limit")
        assert signature.return_type == list[Item]
        assert signature.decode_arguments(b"", msgpack=False) == ("", 100)

    def test_class_attributes(self) -> None:
        """Name, version, description and metadata are kept as defined."""
        assert (KV.name, KV.version, KV.description, dict(KV.metadata)) == (
            "kv",
            "1.2.3",
            "key/value store",
            {"team": "storage"},
        )

    def test_default_name(self) -> None:
        """Without a name the service is named after its class, lower-cased."""
        assert MyDefaultName.name == "mydefaultname"

    def test_default_version(self) -> None:
        """Without a version the service is 0.1.0."""
        assert Versionless.version == "0.1.0"

    def test_inherited_endpoints(self) -> None:
        """A subclass inherits its bases' endpoints and adds its own."""
        assert set(ExtendedKV.endpoints) == {"put", "x", "get-all", "delete"}
        assert ExtendedKV.endpoints["put"].fn is KV.__dict__["put"]

    def test_override_without_rpc_removes_endpoint(self) -> None:
        """Overriding an endpoint method without @rpc makes it a plain method again."""
        assert "size" not in ExtendedKV.endpoints

    def test_override_replaces_signature(self) -> None:
        """An overriding @rpc method replaces the inherited endpoint and its signature."""
        assert OverridingKV.endpoints["put"].signature.names == ("key", "value", "ttl")
        assert KV.endpoints["put"].signature.names == ("key", "value")

    def test_subclass_endpoints_do_not_leak_to_base(self) -> None:
        """Defining a subclass leaves the base class's endpoints untouched."""
        assert "delete" not in KV.endpoints

    def test_rpc_returns_the_function(self) -> None:
        """@rpc returns the method itself, so it stays directly callable."""

        async def f(self: Service) -> None:
            """A method."""

        assert rpc(f) is f
        assert rpc(name="g")(f) is f


class TestContext:
    """``self.ctx`` exists only while an instance is hosted."""

    def test_ctx_unhosted(self) -> None:
        """Reading ``ctx`` on an instance that is not hosted raises RuntimeError."""
        with pytest.raises(RuntimeError, match="KV is not hosted yet"):
            _ = KV().ctx

    def test_call_service_unhosted(self) -> None:
        """``call_service`` needs the context too, so it raises the same RuntimeError."""
        with pytest.raises(RuntimeError, match="not hosted"):
            _ = KV().call_service
