"""Encoding and decoding of call arguments and return values with msgspec (JSON or MessagePack).

Each endpoint gets one :class:`Signature`, built from its type annotations when the Service class
is defined; its decoders and encoders are reused for every message.
"""

from __future__ import annotations

import collections.abc
import inspect
import re
import typing
from collections.abc import Callable, Mapping
from typing import Any, Final

import msgspec
import msgspec.inspect

from natsrpc import strict
from natsrpc.errors import BadRequest, DefinitionError

json_encoder: Final = msgspec.json.Encoder()
msgpack_encoder: Final = msgspec.msgpack.Encoder()
_json_any: Final = msgspec.json.Decoder()
_msgpack_any: Final = msgspec.msgpack.Decoder()
_mixed_json: Final = msgspec.json.Decoder(tuple[list[Any], dict[str, Any]])
_mixed_msgpack: Final = msgspec.msgpack.Decoder(tuple[list[Any], dict[str, Any]])
_INDEX_PATH: Final = re.compile(r"`\$\[(\d+)\]")
_ARRAY_TOO_SHORT: Final = re.compile(r"Expected `array` of at least length \d+, got (\d+)")
_ARRAY_TOO_LONG: Final = re.compile(r"Expected `array` of at most length \d+")
_UNKNOWN_FIELD: Final = re.compile(r"Object contains unknown field `([^`]*)`(?: - at `([^`]*)`)?")
# Return annotations whose values are sent unchecked when of exactly that type (bool is not an int here).
_EXACT: Final[dict[Any, type]] = {
    int: int,
    str: str,
    float: float,
    bool: bool,
    bytes: bytes,
    None: type(None),
    type(None): type(None),
}
_ASYNC_ITERATORS: Final = (collections.abc.AsyncIterator, collections.abc.AsyncGenerator, collections.abc.AsyncIterable)
_JSON_SPACE: Final = frozenset(b" \t\r\n")
_MSGPACK_ARRAY_HEADS: Final = frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])


def encode(value: Any, msgpack: bool = False) -> bytes:
    """Returns ``value`` encoded as JSON, or MessagePack when ``msgpack`` is true."""
    return msgpack_encoder.encode(value) if msgpack else json_encoder.encode(value)


def decode(body: bytes, msgpack: bool = False) -> Any:
    """Returns the plain Python value (dicts, lists, ...) a JSON or MessagePack body holds."""
    return _msgpack_any.decode(body) if msgpack else _json_any.decode(body)


def encode_arguments(args: tuple[Any, ...], kwargs: Mapping[str, Any], msgpack: bool) -> tuple[bytes, bool]:
    """Returns the request body for a call made with ``args``/``kwargs``, and whether it is mixed.

    Positional-only calls become an array, keyword-only calls an object, no arguments an empty
    body; a call with both is sent as ``[[positional...], {named...}]`` with the mixed-args header.
    """
    if not kwargs:
        return (encode(args, msgpack) if args else b""), False
    if not args:
        return encode(kwargs, msgpack), False
    return encode((args, kwargs), msgpack), True


class Signature:
    """The argument and return types of one handler, with decoders and encoders built once.

    Args:
        fn: the handler function (its first parameter is ``self``).
        where: ``"service.method"``, used in error messages.

    Raises:
        DefinitionError: a parameter is unannotated, variadic, or of a type msgspec cannot decode.
    """

    def __init__(self, fn: Callable[..., Any], where: str) -> None:
        self.where = where
        try:
            hints = inspect.get_annotations(fn, eval_str=True)
        except Exception as exc:  # NameError, SyntaxError, ... from string annotations
            raise DefinitionError(f"{where}: cannot resolve type annotations: {exc}") from exc
        params = list(inspect.signature(fn).parameters.values())[1:]  # drop self
        fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
        self.names: tuple[str, ...] = tuple(p.name for p in params)
        self.n_positional = 0
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise DefinitionError(f"{where}: *args/**kwargs are not supported; name every argument")
            if p.kind is p.POSITIONAL_ONLY:
                raise DefinitionError(f"{where}: positional-only argument {p.name!r} is not supported")
            if p.name not in hints:
                raise DefinitionError(f"{where}: argument {p.name!r} needs a type annotation")
            if p.kind is p.POSITIONAL_OR_KEYWORD:
                self.n_positional += 1
            fields.append((p.name, hints[p.name]) if p.default is p.empty else (p.name, hints[p.name], p.default))
        if "return" not in hints:
            raise DefinitionError(f"{where}: needs a return annotation (use '-> None' for none)")
        self.required: frozenset[str] = frozenset(p.name for p in params if p.default is p.empty)
        self.return_type: Any = hints["return"]
        # A streaming endpoint (-> AsyncIterator[T]) encodes and decodes each item as a T.
        self.streaming = typing.get_origin(self.return_type) in _ASYNC_ITERATORS
        if self.streaming:
            (self.return_type, *_) = typing.get_args(self.return_type) or (Any,)
        struct_name = where.replace(".", "_").replace("-", "_") + "_args"
        try:
            # kw_only lets a required keyword-only parameter follow one with a default, as Python does;
            # field order (and so array positions) stays the parameter order.
            named = msgspec.defstruct(struct_name, fields, kw_only=True, forbid_unknown_fields=True)
            positional = msgspec.defstruct(
                struct_name, fields, kw_only=True, array_like=True, forbid_unknown_fields=True
            )
            self._json_named = msgspec.json.Decoder(named)
            self._json_positional = msgspec.json.Decoder(positional)
            self._msgpack_named = msgspec.msgpack.Decoder(named)
            self._msgpack_positional = msgspec.msgpack.Decoder(positional)
            self.arguments_type: Any = named
        except (TypeError, ValueError) as exc:
            raise DefinitionError(f"{where}: unsupported argument type: {exc}") from exc
        try:
            self.json_result = msgspec.json.Decoder(self.return_type)
            self.msgpack_result = msgspec.msgpack.Decoder(self.return_type)
        except TypeError as exc:
            raise DefinitionError(f"{where}: unsupported return type: {exc}") from exc
        # Return values of these types are sent as they are; others are checked against the annotation.
        self._exact_result: type | None = _EXACT.get(self.return_type)
        self._any_result = self.return_type in (Any, object)
        # Arguments whose types hold Structs, dataclasses or TypedDicts that would drop unknown fields.
        self._strict = tuple((f[0], c) for f in fields if (c := strict.checker(f[1])) is not None)
        for label, annotation in [*((f"argument {f[0]!r}", f[1]) for f in fields), ("return type", self.return_type)]:
            custom = _custom_classes(annotation)
            if custom:
                cls_name = f"{custom[0].__module__}.{custom[0].__qualname__}"
                raise DefinitionError(
                    f"{where}: unsupported {label}: msgspec cannot encode {cls_name}"
                    " (use a Struct, dataclass or builtin type)"
                )

    def decode_arguments(self, body: bytes, msgpack: bool, mixed: bool = False) -> tuple[Any, ...]:
        """Returns the argument values, in parameter order, that a request body holds.

        Raises:
            BadRequest: the body is undecodable or does not fit the signature; the message names
                the field.
        """
        try:
            if mixed:
                return self._decode_mixed(body, msgpack)
            if not body:
                body = b"\x80" if msgpack else b"{}"
            if msgpack:
                positional = body[0] in _MSGPACK_ARRAY_HEADS
                mp = self._msgpack_positional if positional else self._msgpack_named
                values = msgspec.structs.astuple(mp.decode(body))
                if self._strict:
                    self._refuse_unknown_fields(body, msgpack, False)
                return values
            first = body[0]
            if first in _JSON_SPACE:
                body = body.strip() or b"{}"  # whitespace only counts as an empty body
                first = body[0]
            js = self._json_positional if first == 0x5B else self._json_named  # '['
            values = msgspec.structs.astuple(js.decode(body))
            if self._strict:
                self._refuse_unknown_fields(body, msgpack, False)
            return values
        except msgspec.ValidationError as exc:
            raise BadRequest(f"{self.where}: invalid arguments: {self._name_fields(str(exc))}") from None
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec raises the latter for bad UTF-8
            kind = "MessagePack" if msgpack else "JSON"
            raise BadRequest(f"{self.where}: body is not valid {kind}: {exc}") from None
        except RecursionError:  # msgspec's own limit on nesting depth
            raise BadRequest(f"{self.where}: body is nested too deeply") from None

    def _decode_mixed(self, body: bytes, msgpack: bool) -> tuple[Any, ...]:
        args, kwargs = (_mixed_msgpack if msgpack else _mixed_json).decode(body)
        if len(args) > len(self.names):
            raise msgspec.ValidationError(f"takes {len(self.names)} arguments, got {len(args)} positional")
        named = dict(zip(self.names, args, strict=False))
        for key in kwargs:
            if key in named:
                raise msgspec.ValidationError(f"got multiple values for argument `{key}`")
        named.update(kwargs)
        values = msgspec.structs.astuple(msgspec.convert(named, self.arguments_type))
        if self._strict:
            self._refuse_unknown_fields(body, msgpack, True)
        return values

    def _refuse_unknown_fields(self, body: bytes, msgpack: bool, mixed: bool) -> None:
        """Raises ValidationError for an unknown field nested in an argument (the body decoded fine)."""
        raw = decode(body, msgpack)
        if mixed:
            named = dict(zip(self.names, raw[0], strict=False)) | raw[1]
        elif isinstance(raw, list):
            named = dict(zip(self.names, raw, strict=False))
        else:
            named = raw
        for name, check in self._strict:
            if name in named:
                check(named[name], f"$.{name}")

    def encode_result(self, value: Any, msgpack: bool) -> bytes:
        """Returns the reply body for a handler's return value, checked against its annotation.

        Raises:
            msgspec.ValidationError: the value does not fit the return annotation (naming the field).
            msgspec.EncodeError, TypeError, ValueError: msgspec cannot encode the value.
        """
        body = msgpack_encoder.encode(value) if msgpack else json_encoder.encode(value)
        if type(value) is not self._exact_result and not self._any_result:
            (self.msgpack_result if msgpack else self.json_result).decode(body)  # as the caller will decode it
        return body

    def _name_fields(self, message: str) -> str:
        """Rewrites ``$[0]`` paths from positional decoding into ``$.name``, and array lengths into arguments."""
        short = _ARRAY_TOO_SHORT.fullmatch(message)  # top level only: nested errors end with "- at `$...`"
        if short:
            missing = [n for n in self.names[int(short.group(1)) :] if n in self.required]
            return f"missing required argument `$.{missing[0]}`" if missing else message
        if _ARRAY_TOO_LONG.fullmatch(message):
            return f"too many arguments: takes at most {len(self.names)}"
        unknown = _UNKNOWN_FIELD.fullmatch(message)
        if unknown:  # msgspec names the object; say the field's own path: `$.op.scael`
            return f"unknown field `{unknown.group(2) or '$'}.{unknown.group(1)}`"

        def name(match: re.Match[str]) -> str:
            index = int(match.group(1))
            return f"`$.{self.names[index]}" if index < len(self.names) else match.group(0)

        return _INDEX_PATH.sub(name, message, count=1)

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Returns the named-arguments object for a Python call (used by typed proxies).

        Raises:
            TypeError: the arguments do not fit the signature, as a Python call would.
        """
        if len(args) > self.n_positional:
            raise TypeError(f"{self.where}() takes {self.n_positional} positional arguments but {len(args)} were given")
        named = dict(zip(self.names, args, strict=False))
        for key, value in kwargs.items():
            if key not in self.names:
                raise TypeError(f"{self.where}() got an unexpected keyword argument {key!r}")
            if key in named:
                raise TypeError(f"{self.where}() got multiple values for argument {key!r}")
            named[key] = value
        missing = [n for n in self.names if n in self.required and n not in named]
        if missing:
            raise TypeError(f"{self.where}() missing required arguments: {', '.join(map(repr, missing))}")
        return named

    def call_parts(self, values: tuple[Any, ...]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Splits decoded values into the positional and keyword-only arguments of the handler."""
        n = self.n_positional
        if n == len(values):
            return values, {}
        return values[:n], dict(zip(self.names[n:], values[n:], strict=True))


def _custom_classes(annotation: Any) -> list[type]:
    """Returns the classes inside ``annotation`` that msgspec handles only through enc/dec hooks.

    msgspec accepts any class in a Decoder and fails per message instead; natsrpc sets no hooks, so
    such types are rejected when the Service is defined.
    """
    found: list[type] = []
    seen: set[int] = set()  # Type/Field nodes only: they live in the tree, and recursive Structs repeat

    def walk(node: object) -> None:
        if isinstance(node, msgspec.inspect.CustomType):
            if node.cls is not object:  # `object` decodes like Any
                found.append(node.cls)
        elif isinstance(node, msgspec.inspect.Type | msgspec.inspect.Field):
            if id(node) not in seen:
                seen.add(id(node))
                for value in msgspec.structs.astuple(node):
                    walk(value)
        elif isinstance(node, tuple):
            for value in node:
                walk(value)

    walk(msgspec.inspect.type_info(annotation))
    return found
