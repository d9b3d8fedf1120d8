"""Tests for natsrpc.codec: argument decoding per signature, error messages, bind and encode_arguments."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
import pytest

from natsrpc.codec import Signature, decode, encode, encode_arguments
from natsrpc.errors import BadRequest


class Point(msgspec.Struct):
    """A msgspec Struct argument."""

    x: int
    y: int


@dataclasses.dataclass
class Box:
    """A dataclass argument with a default field."""

    w: int
    h: int = 1


class Handlers:
    """Plain functions whose signatures the tests turn into Signatures."""

    def put(self, key: str, value: str) -> None:
        """Two required string arguments."""

    def count(self, key: str, n: int = 3) -> int:
        """One required argument and one with a default."""
        return n

    def search(self, query: str, *, limit: int = 10, exact: bool) -> list[str]:
        """A required keyword-only argument after one with a default, as Python allows."""
        return []

    def shapes(self, p: Point, b: Box) -> Point:
        """A Struct and a dataclass argument."""
        return p

    def ping(self) -> str:
        """No arguments at all."""
        return "pong"


def sig(name: str) -> Signature:
    """Returns the Signature of one of the Handlers methods, named like an endpoint."""
    return Signature(getattr(Handlers, name), f"svc.{name}")


def mp(value: Any) -> bytes:
    """Returns ``value`` encoded as MessagePack."""
    return msgspec.msgpack.encode(value)


class TestDecodeJson:
    """JSON bodies: an object holds named arguments, an array positional ones, empty means none."""

    @pytest.mark.parametrize(
        ("method", "body", "expected"),
        [
            ("put", b'{"key":"a","value":"1"}', ("a", "1")),
            ("put", b'{"value":"1","key":"a"}', ("a", "1")),
            ("put", b'["a","1"]', ("a", "1")),
            ("put", b' \n ["a","1"]', ("a", "1")),
            ("put", b' {"key":"a","value":"1"}', ("a", "1")),
            ("count", b'{"key":"a"}', ("a", 3)),
            ("count", b'["a"]', ("a", 3)),
            ("count", b'["a",7]', ("a", 7)),
            ("search", b'{"query":"q","exact":true}', ("q", 10, True)),
            ("search", b'{"query":"q","limit":2,"exact":false}', ("q", 2, False)),
            ("search", b'["q",5,true]', ("q", 5, True)),
            ("ping", b"", ()),
            ("ping", b"{}", ()),
            ("ping", b"[]", ()),
        ],
        ids=[
            "named",
            "named-any-order",
            "positional",
            "positional-leading-space",
            "named-leading-space",
            "default-named",
            "default-positional",
            "default-overridden",
            "keyword-only-default",
            "keyword-only-all",
            "keyword-only-positional",
            "no-args-empty-body",
            "no-args-object",
            "no-args-array",
        ],
    )
    def test_decodes(self, method: str, body: bytes, expected: tuple[Any, ...]) -> None:
        """A well-formed JSON body decodes to the argument values in parameter order."""
        assert sig(method).decode_arguments(body, msgpack=False) == expected

    def test_struct_and_dataclass_named(self) -> None:
        """Struct and dataclass arguments decode from nested objects, with dataclass defaults applied."""
        values = sig("shapes").decode_arguments(b'{"p":{"x":1,"y":2},"b":{"w":3}}', msgpack=False)
        assert values == (Point(1, 2), Box(3, 1))

    def test_struct_and_dataclass_positional(self) -> None:
        """Struct and dataclass arguments decode from a positional array too."""
        values = sig("shapes").decode_arguments(b'[{"x":1,"y":2},{"w":3,"h":4}]', msgpack=False)
        assert values == (Point(1, 2), Box(3, 4))


class TestDecodeMsgpack:
    """MessagePack bodies: a map holds named arguments, an array positional ones."""

    @pytest.mark.parametrize(
        ("method", "body", "expected"),
        [
            ("put", mp({"key": "a", "value": "1"}), ("a", "1")),
            ("put", mp(["a", "1"]), ("a", "1")),
            ("count", mp({"key": "a"}), ("a", 3)),
            ("count", mp(["a", 9]), ("a", 9)),
            ("search", mp({"query": "q", "exact": True}), ("q", 10, True)),
            ("shapes", mp({"p": {"x": 1, "y": 2}, "b": {"w": 3}}), (Point(1, 2), Box(3, 1))),
            ("shapes", mp([{"x": 1, "y": 2}, {"w": 3}]), (Point(1, 2), Box(3, 1))),
            ("ping", b"", ()),
            ("ping", mp({}), ()),
            ("ping", mp([]), ()),
            ("put", mp(["a" * 40, "1" * 20]), ("a" * 40, "1" * 20)),
        ],
        ids=[
            "map",
            "array",
            "default-map",
            "default-array",
            "keyword-only",
            "struct-dataclass-map",
            "struct-dataclass-array",
            "empty-body",
            "empty-map",
            "empty-array",
            "long-strings",
        ],
    )
    def test_decodes(self, method: str, body: bytes, expected: tuple[Any, ...]) -> None:
        """A well-formed MessagePack body decodes to the argument values in parameter order."""
        assert sig(method).decode_arguments(body, msgpack=True) == expected

    def test_array16_form(self) -> None:
        """A MessagePack array16 header (0xdc) is recognised as positional arguments."""
        body = b"\xdc\x00\x02" + mp("a") + mp("1")
        assert sig("put").decode_arguments(body, msgpack=True) == ("a", "1")


class TestDecodeMixed:
    """The mixed form ``[[positional...], {named...}]`` that Python callers send with the mixed-args header."""

    @pytest.mark.parametrize(
        ("method", "body", "expected"),
        [
            ("put", b'[["a"],{"value":"1"}]', ("a", "1")),
            ("put", b'[[],{"key":"a","value":"1"}]', ("a", "1")),
            ("put", b'[["a","1"],{}]', ("a", "1")),
            ("count", b'[["a"],{}]', ("a", 3)),
            ("search", b'[["q"],{"exact":true}]', ("q", 10, True)),
            ("shapes", b'[[{"x":1,"y":2}],{"b":{"w":5}}]', (Point(1, 2), Box(5, 1))),
        ],
        ids=["split", "all-named", "all-positional", "default", "keyword-only", "struct-dataclass"],
    )
    def test_decodes_json(self, method: str, body: bytes, expected: tuple[Any, ...]) -> None:
        """A JSON mixed body decodes to the argument values in parameter order."""
        assert sig(method).decode_arguments(body, msgpack=False, mixed=True) == expected

    def test_decodes_msgpack(self) -> None:
        """A MessagePack mixed body decodes like the JSON one."""
        body = mp([["a"], {"value": "1"}])
        assert sig("put").decode_arguments(body, msgpack=True, mixed=True) == ("a", "1")

    @pytest.mark.parametrize(
        ("body", "fragment"),
        [
            (b'[["a"],{"key":"b"}]', "multiple values for argument `key`"),
            (b'[["a"],{"value":1}]', "`$.value`"),
            (b'[["a"],{}]', "missing required field `value`"),
            (b'[["a"],{"value":"1","other":2}]', "unknown field `$.other`"),
            (b'[["a","1","2"],{}]', "takes 2 arguments, got 3"),
            (b'{"key":"a"}', "Expected `array`"),
            (b"[[", "not valid JSON"),
        ],
        ids=["duplicate", "wrong-type", "missing", "unknown", "too-many-positional", "not-a-pair", "invalid-json"],
    )
    def test_rejects(self, body: bytes, fragment: str) -> None:
        """A mixed body that does not fit the signature is a BadRequest naming the problem."""
        with pytest.raises(BadRequest, match=r"svc\.put") as info:
            sig("put").decode_arguments(body, msgpack=False, mixed=True)
        assert fragment in info.value.message


class TestBadRequestMessages:
    """Undecodable or ill-fitting bodies raise BadRequest (400) whose message names the field."""

    @pytest.mark.parametrize(
        ("method", "body", "msgpack", "fragment"),
        [
            ("put", b'{"key":"a","value":1}', False, "Expected `str`, got `int` - at `$.value`"),
            ("put", b'["a",1]', False, "Expected `str`, got `int` - at `$.value`"),
            ("put", b"[1,2]", False, "at `$.key`"),
            ("put", mp(["a", 1]), True, "at `$.value`"),
            ("put", mp({"key": "a", "value": 1}), True, "at `$.value`"),
            ("shapes", b'[{"x":1,"y":"2"},{"w":3}]', False, "at `$.p.y`"),
            ("shapes", b'{"p":{"x":1,"y":2},"b":{"w":"3"}}', False, "at `$.b.w`"),
            ("put", b'{"key":"a"}', False, "missing required field `value`"),
            ("put", b'["a"]', False, "missing required argument `$.value`"),
            ("put", mp(["a"]), True, "missing required argument `$.value`"),
            ("search", b'["q"]', False, "missing required argument `$.exact`"),
            ("search", b'{"query":"q"}', False, "missing required field `exact`"),
            ("put", b'{"key":"a","value":"1","extra":true}', False, "unknown field `$.extra`"),
            ("put", mp({"key": "a", "value": "1", "extra": True}), True, "unknown field `$.extra`"),
            ("put", b'["a","1","extra"]', False, "too many arguments: takes at most 2"),
            ("ping", b"[1]", False, "too many arguments: takes at most 0"),
            ("put", b'{"key":', False, "body is not valid JSON"),
            ("put", b"{bad}", False, "body is not valid JSON"),
            ("put", b"\x8f\x01\xff\xfe\x00", False, "body is not valid JSON"),
            ("put", b"\xc1\xc1", True, "body is not valid MessagePack"),
            ("put", b"", False, "missing required field `key`"),
            ("put", b"", True, "missing required field `key`"),
            ("put", b'"a"', False, "Expected `object`, got `str`"),
        ],
        ids=[
            "wrong-type-named",
            "wrong-type-positional",
            "wrong-type-first-positional",
            "wrong-type-msgpack-array",
            "wrong-type-msgpack-map",
            "wrong-type-nested-positional",
            "wrong-type-nested-dataclass",
            "missing-named",
            "missing-positional",
            "missing-msgpack-array",
            "missing-keyword-only-positional",
            "missing-keyword-only-named",
            "unknown-named",
            "unknown-msgpack",
            "too-many-positional",
            "args-to-no-arg-method",
            "truncated-json",
            "invalid-json",
            "random-bytes-json",
            "random-bytes-msgpack",
            "empty-body-args-required",
            "empty-body-args-required-msgpack",
            "scalar-body",
        ],
    )
    def test_message_names_field(self, method: str, body: bytes, msgpack: bool, fragment: str) -> None:
        """The BadRequest message carries the endpoint and names the offending field or form."""
        with pytest.raises(BadRequest) as info:
            sig(method).decode_arguments(body, msgpack=msgpack)
        assert info.value.code == 400
        assert info.value.message.startswith(f"svc.{method}: ")
        assert fragment in info.value.message

    def test_positional_path_never_leaks(self) -> None:
        """Positional errors are rewritten to `$.name`: the caller never sees an index path."""
        with pytest.raises(BadRequest) as info:
            sig("put").decode_arguments(b'["a",1]', msgpack=False)
        assert "$[" not in info.value.message

    def test_bad_request_has_no_cause(self) -> None:
        """The msgspec exception is not chained, so nothing internal travels with the error."""
        with pytest.raises(BadRequest) as info:
            sig("put").decode_arguments(b"{bad}", msgpack=False)
        assert info.value.__cause__ is None
        assert info.value.__suppress_context__


class TestBind:
    """``bind()`` turns a Python call into named arguments, raising TypeError as Python would."""

    @pytest.mark.parametrize(
        ("method", "args", "kwargs", "expected"),
        [
            ("put", ("a", "1"), {}, {"key": "a", "value": "1"}),
            ("put", ("a",), {"value": "1"}, {"key": "a", "value": "1"}),
            ("put", (), {"value": "1", "key": "a"}, {"key": "a", "value": "1"}),
            ("count", ("a",), {}, {"key": "a"}),
            ("search", ("q",), {"exact": True}, {"query": "q", "exact": True}),
            ("ping", (), {}, {}),
        ],
        ids=["positional", "mixed", "named", "default-left-out", "keyword-only", "no-args"],
    )
    def test_binds(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], expected: dict[str, Any]) -> None:
        """A valid call becomes the named-arguments object, leaving defaults to the service."""
        assert sig(method).bind(args, kwargs) == expected

    @pytest.mark.parametrize(
        ("method", "args", "kwargs", "fragment"),
        [
            ("put", ("a", "1", "2"), {}, "takes 2 positional arguments but 3 were given"),
            ("search", ("q", 5), {"exact": True}, "takes 1 positional arguments but 2 were given"),
            ("put", ("a",), {"key": "b"}, "got multiple values for argument 'key'"),
            ("put", ("a", "1"), {"other": 1}, "got an unexpected keyword argument 'other'"),
            ("put", ("a",), {}, "missing required arguments: 'value'"),
            ("search", ("q",), {}, "missing required arguments: 'exact'"),
            ("put", (), {}, "missing required arguments: 'key', 'value'"),
        ],
        ids=[
            "too-many",
            "keyword-only-given-positionally",
            "duplicate",
            "unknown",
            "missing",
            "missing-kw-only",
            "none",
        ],
    )
    def test_raises_type_error(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], fragment: str) -> None:
        """A call that Python would reject raises TypeError naming the endpoint and the problem."""
        with pytest.raises(TypeError, match=f"svc.{method}") as info:
            sig(method).bind(args, kwargs)
        assert fragment in str(info.value)


class TestCallParts:
    """``call_parts()`` splits decoded values into the handler's positional and keyword-only arguments."""

    def test_all_positional(self) -> None:
        """Without keyword-only parameters every value is positional."""
        assert sig("put").call_parts(("a", "1")) == (("a", "1"), {})

    def test_keyword_only(self) -> None:
        """Keyword-only parameters are passed by name."""
        assert sig("search").call_parts(("q", 10, True)) == (("q",), {"limit": 10, "exact": True})


class TestEncodeArguments:
    """``encode_arguments()`` picks the wire form from how the Python call was made."""

    @pytest.mark.parametrize(
        ("args", "kwargs", "msgpack", "body", "mixed"),
        [
            ((), {}, False, b"", False),
            ((), {}, True, b"", False),
            (("a", 1), {}, False, b'["a",1]', False),
            ((), {"key": "a"}, False, b'{"key":"a"}', False),
            (("a",), {"value": "1"}, False, b'[["a"],{"value":"1"}]', True),
            (("a", 1), {}, True, mp(["a", 1]), False),
            ((), {"key": "a"}, True, mp({"key": "a"}), False),
            (("a",), {"value": "1"}, True, mp([["a"], {"value": "1"}]), True),
        ],
        ids=[
            "none-json",
            "none-msgpack",
            "positional-json",
            "named-json",
            "mixed-json",
            "positional-msgpack",
            "named-msgpack",
            "mixed-msgpack",
        ],
    )
    def test_forms(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], msgpack: bool, body: bytes, mixed: bool
    ) -> None:
        """Each call shape encodes to its documented body and mixed flag."""
        assert encode_arguments(args, kwargs, msgpack) == (body, mixed)

    @pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
    @pytest.mark.parametrize(
        ("args", "kwargs"),
        [(("a", "1"), {}), ((), {"key": "a", "value": "1"}), (("a",), {"value": "1"})],
        ids=["positional", "named", "mixed"],
    )
    def test_round_trip(self, args: tuple[Any, ...], kwargs: dict[str, Any], msgpack: bool) -> None:
        """Whatever form the client encodes, the service's Signature decodes the same values."""
        body, mixed = encode_arguments(args, kwargs, msgpack)
        assert sig("put").decode_arguments(body, msgpack, mixed) == ("a", "1")

    def test_struct_round_trip(self) -> None:
        """Struct and dataclass values encode and decode back to equal objects."""
        body, mixed = encode_arguments((Point(1, 2),), {"b": Box(3)}, msgpack=False)
        assert sig("shapes").decode_arguments(body, False, mixed) == (Point(1, 2), Box(3, 1))


class TestResultCodecs:
    """Return values decode with the signature's result decoders."""

    @pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
    def test_struct_result(self, msgpack: bool) -> None:
        """A Struct return type decodes back to the Struct."""
        signature = sig("shapes")
        decoder = signature.msgpack_result if msgpack else signature.json_result
        assert decoder.decode(encode(Point(1, 2), msgpack)) == Point(1, 2)

    def test_untyped_decode(self) -> None:
        """``decode()`` returns plain Python values."""
        assert decode(encode({"a": [1, None]})) == {"a": [1, None]}
        assert decode(encode({"a": [1, None]}, msgpack=True), msgpack=True) == {"a": [1, None]}
