"""Contracts enforced both ways: unknown fields refused at any depth, return values checked before sending."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any, Literal, TypedDict

import msgspec
import nats
import pytest
from nats.aio.client import Client as NatsConnection

import natsrpc
from natsrpc import Service, protocol, rpc
from natsrpc.codec import Signature
from natsrpc.errors import BadRequest
from natsrpc.testing import serve


class Op(msgspec.Struct):
    """A Struct that, by msgspec's default, would drop unknown fields."""

    scale: float = 1.0


class StrictOp(msgspec.Struct, forbid_unknown_fields=True):
    """A Struct that refuses unknown fields itself, holding a lenient one."""

    inner: Op = msgspec.field(default_factory=Op)


class Strict(msgspec.Struct, forbid_unknown_fields=True):
    """A strict Struct of plain types."""

    a: int


class Tree(msgspec.Struct):
    """A recursive Struct."""

    label: str = ""
    children: list[Tree] = []


@dataclasses.dataclass
class Box:
    """A dataclass."""

    w: int = 0


class Opts(TypedDict, total=False):
    """A TypedDict."""

    limit: int


class Add(msgspec.Struct, tag="add"):
    """One member of a tagged union."""

    n: int = 0


class Mul(msgspec.Struct, tag="mul"):
    """The other member."""

    factor: float = 1.0


class Pair(msgspec.Struct, array_like=True):
    """An array-like Struct: encoded as [a, op]."""

    a: int = 0
    op: Op = msgspec.field(default_factory=Op)


def compute(
    self: Any,
    x: float,
    op: Op | None = None,
    ops: list[Op] = [],  # noqa: B006
    by_name: dict[str, Op] = {},  # noqa: B006
    strict: StrictOp | None = None,
    tree: Tree | None = None,
    box: Box | None = None,
    opts: Opts = {},  # noqa: B006
    step: Add | Mul | None = None,
    pair: Pair | None = None,
) -> float:
    """A handler signature with each kind of nested record."""
    return x


SIG = Signature(compute, "calc.compute")


def refused(body: bytes, *, msgpack: bool = False, mixed: bool = False) -> str:
    with pytest.raises(BadRequest) as info:
        SIG.decode_arguments(body, msgpack, mixed)
    return info.value.message


class TestUnknownNestedFields:
    """Unknown fields are refused at every depth, with the field's path, in every body form."""

    @pytest.mark.parametrize(
        ("body", "path"),
        [
            (b'{"x":1,"op":{"scael":2}}', "$.op.scael"),
            (b'{"x":1,"ops":[{},{"scale":2,"sclae":1}]}', "$.ops[1].sclae"),
            (b'{"x":1,"by_name":{"a":{"y":1}}}', "$.by_name['a'].y"),
            (b'{"x":1,"strict":{"inner":{"typo":1}}}', "$.strict.inner.typo"),
            (b'{"x":1,"strict":{"typo":1}}', "$.strict.typo"),
            (b'{"x":1,"tree":{"children":[{"children":[{"lable":"x"}]}]}}', "$.tree.children[0].children[0].lable"),
            (b'{"x":1,"box":{"h":1}}', "$.box.h"),
            (b'{"x":1,"opts":{"limt":1}}', "$.opts.limt"),
            (b'{"x":1,"step":{"type":"mul","factr":2}}', "$.step.factr"),
            (b'{"x":1,"pair":[1,{"sale":1}]}', "$.pair[1].sale"),
            (b'{"x":1,"extra":1}', "$.extra"),
        ],
    )
    def test_json_object_body(self, body: bytes, path: str) -> None:
        """Each misspelt field is a 400 whose message names its full path."""
        assert f"unknown field `{path}`" in refused(body)

    def test_positional_body(self) -> None:
        """An array body's arguments are named in the path, not numbered."""
        assert "unknown field `$.op.scael`" in refused(b'[1,{"scael":2}]')

    def test_mixed_body(self) -> None:
        """The mixed form ([[positional], {named}]) is checked too."""
        assert "unknown field `$.ops[0].x`" in refused(b'[[1],{"ops":[{"x":1}]}]', mixed=True)

    def test_msgpack_body(self) -> None:
        """MessagePack bodies are checked like JSON ones."""
        body = msgspec.msgpack.encode({"x": 1, "op": {"scael": 2}})
        assert "unknown field `$.op.scael`" in refused(body, msgpack=True)

    def test_valid_nested_values_still_decode(self) -> None:
        """Known fields at every depth pass, and the values arrive typed."""
        body = (
            b'{"x":2,"op":{"scale":3},"ops":[{"scale":1}],"tree":{"label":"r","children":[{"label":"c"}]},'
            b'"box":{"w":4},"opts":{"limit":5},"step":{"type":"mul","factor":2},"pair":[1,{"scale":2}]}'
        )
        values = SIG.decode_arguments(body, False)
        assert values[1] == Op(3.0)
        assert values[5] == Tree("r", [Tree("c")])
        assert values[6] == Box(4)
        assert values[8] == Mul(2.0)

    def test_plain_signatures_have_nothing_to_check(self) -> None:
        """Signatures of plain types, or of strict Structs of plain types, skip the check (no cost)."""

        def plain(self: Any, key: str, n: int, tags: list[str], s: Strict, mode: Literal["a", "b"]) -> str:
            return key

        assert Signature(plain, "kv.plain")._strict == ()


@dataclasses.dataclass
class Point:
    """A dataclass return value."""

    x: int


class Liar(Service):
    """Handlers whose return values do not fit their annotations."""

    name = "liar"

    @rpc
    async def count(self, value: Any) -> int:
        """Returns ``value`` as it is, annotated as an int."""
        return value  # type: ignore[no-any-return]

    @rpc
    async def point(self, x: Any) -> Point:
        """Returns a Point whose field may be of the wrong type."""
        return Point(x)

    @rpc
    async def ratio(self) -> float:
        """Returns an int where a float is annotated: it fits (JSON does not tell them apart)."""
        return 3

    @rpc
    async def nothing(self) -> None:
        """Returns a value although annotated ``-> None``."""
        return "something"  # type: ignore[return-value]

    @rpc
    async def anything(self, value: Any) -> Any:
        """Annotated Any: anything that encodes is sent."""
        return value


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NatsConnection]:
    conn = await nats.connect(nats_url)
    try:
        yield conn
    finally:
        await conn.drain()


class TestReturnValues:
    """A return value that does not fit its annotation is a 500 EncodeError naming the field, never sent."""

    @pytest.mark.parametrize(
        ("method", "args", "says"),
        [
            ("count", ("abc",), "does not fit its annotation int: Expected `int`, got `str`"),
            ("count", (True,), "does not fit its annotation int: Expected `int`, got `bool`"),
            ("point", ("1",), "does not fit its annotation Point: Expected `int`, got `str` - at `$.x`"),
            ("nothing", (), "does not fit its annotation None: Expected `null`, got `str`"),
        ],
    )
    async def test_misfit_is_a_500_encode_error(
        self, client: natsrpc.Client, method: str, args: tuple[Any, ...], says: str
    ) -> None:
        """The caller gets InternalError (500, type EncodeError) whose message names the misfit."""
        async with serve(client, Liar()):
            with pytest.raises(natsrpc.InternalError) as info:
                await getattr(client.call_service["liar"], method)(*args)
        assert (info.value.code, info.value.type) == (500, "EncodeError")
        assert says in info.value.message

    async def test_the_misfit_value_is_never_sent(self, client: natsrpc.Client, nc: NatsConnection) -> None:
        """A plain NATS caller gets the error reply, and the value appears nowhere in it."""
        async with serve(client, Liar()):
            reply = await nc.request("svc.liar.count", b'["the-secret-value"]', timeout=2)
        assert reply.headers is not None
        assert reply.headers[protocol.ERROR_CODE] == "500"
        assert b"the-secret-value" not in reply.data

    async def test_values_that_fit_are_sent(self, client: natsrpc.Client) -> None:
        """Fitting values pass in both encodings: exact types, an int for a float, Any."""
        async with serve(client, Liar()):
            for encoding in ("json", "msgpack"):
                calc = client.call_service["liar"].options(encoding=encoding)
                assert await calc.count(5) == 5
                assert await calc.point(2) == {"x": 2}
                assert await calc.ratio() == 3
                assert await calc.anything({"a": [1]}) == {"a": [1]}
