"""Unknown fields refused at every depth of an argument, not only at its top.

msgspec refuses unknown fields only in Structs declared ``forbid_unknown_fields=True``; other
Structs, dataclasses and TypedDicts drop them silently, so a misspelt nested field
(``{"op": {"scael": 2}}``) would run the handler with the default value. :func:`checker` builds,
once per argument type, a function that walks a decoded plain value (dicts and lists) along the
type and raises ``msgspec.ValidationError`` naming the first unknown field, in msgspec's own words
(``Object contains unknown field `scael` - at `$.op```). It returns None for a type with nothing to
check (plain types, strict Structs of plain types), which then costs nothing per request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import msgspec.inspect as mi

Check = Callable[[Any, str], None]
"""Checks a plain value found at a path (``$.op``); raises ValidationError on an unknown field."""

_RECORDS = (mi.StructType, mi.DataclassType, mi.TypedDictType)
_SEQUENCES = (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)
_MAPPINGS = (mi.DictType, *((mi.FrozenDictType,) if hasattr(mi, "FrozenDictType") else ()))


def checker(annotation: Any) -> Check | None:
    """Returns the unknown-field check of values of type ``annotation``, or None when there is none."""
    return _build(mi.type_info(annotation), {})


def unknown_field(name: object, path: str) -> msgspec.ValidationError:
    """The error for an unknown field ``name`` in the object at ``path``, worded as msgspec words it."""
    return msgspec.ValidationError(f"Object contains unknown field `{name}` - at `{path}`")


def _build(node: mi.Type, memo: dict[int, Check | None]) -> Check | None:
    if isinstance(node, mi.Metadata):
        return _build(node.type, memo)
    if isinstance(node, _RECORDS) or isinstance(node, mi.NamedTupleType):
        return _record(node, memo)
    if isinstance(node, _SEQUENCES):
        return _each(_build(node.item_type, memo))
    if isinstance(node, mi.TupleType):
        return _positions([_build(t, memo) for t in node.item_types])
    if isinstance(node, _MAPPINGS):
        return _values(_build(node.value_type, memo))
    if isinstance(node, mi.UnionType):
        return _union(node, memo)
    return None


def _record(node: Any, memo: dict[int, Check | None]) -> Check | None:
    """A Struct, dataclass, TypedDict or NamedTuple: its own keys, then each field's value."""
    if id(node) in memo:  # a recursive type: the check being built, through a late-bound cell
        return memo[id(node)]
    cell: list[Check | None] = [None]

    def late(value: Any, path: str) -> None:
        if cell[0] is not None:
            cell[0](value, path)

    memo[id(node)] = late
    fields = node.fields
    by_name = {f.encode_name: _build(f.type, memo) for f in fields}
    by_index = [by_name[f.encode_name] for f in fields]
    tag_field = getattr(node, "tag_field", None)
    known = set(by_name) | ({tag_field} if tag_field else set())
    lenient = not getattr(node, "forbid_unknown_fields", False) and not isinstance(node, mi.NamedTupleType)
    array_like = getattr(node, "array_like", False) or isinstance(node, mi.NamedTupleType)
    if not lenient and not any(by_index):
        memo[id(node)] = None
        return None

    def check(value: Any, path: str) -> None:
        if isinstance(value, dict) and not array_like:
            for key, item in value.items():
                if key not in known:
                    if lenient:
                        raise unknown_field(key, path)
                    continue
                field_check = by_name.get(key)
                if field_check is not None:
                    field_check(item, f"{path}.{key}")
        elif isinstance(value, list) and array_like:
            start = 1 if tag_field else 0  # a tagged array-like Struct starts with its tag
            for index, (field_check, item) in enumerate(zip(by_index, value[start:], strict=False)):
                if field_check is not None:
                    field_check(item, f"{path}[{index + start}]")

    cell[0] = check
    return check


def _each(item_check: Check | None) -> Check | None:
    if item_check is None:
        return None

    def check(value: Any, path: str) -> None:
        if isinstance(value, list):
            for index, item in enumerate(value):
                item_check(item, f"{path}[{index}]")

    return check


def _positions(checks: list[Check | None]) -> Check | None:
    if not any(checks):
        return None

    def check(value: Any, path: str) -> None:
        if isinstance(value, list):
            for index, (item_check, item) in enumerate(zip(checks, value, strict=False)):
                if item_check is not None:
                    item_check(item, f"{path}[{index}]")

    return check


def _values(value_check: Check | None) -> Check | None:
    if value_check is None:
        return None

    def check(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                value_check(item, f"{path}[{key!r}]")

    return check


def _union(node: mi.UnionType, memo: dict[int, Check | None]) -> Check | None:
    """The member a value decodes as: by tag among tagged Structs, else the one object-like or
    array-like member (msgspec allows at most one of each kind in an untagged union)."""
    objects: list[tuple[Any, Check | None]] = []
    arrays: list[Check | None] = []
    for member in node.types:
        inner = member.type if isinstance(member, mi.Metadata) else member
        built = _build(inner, memo)
        if getattr(inner, "array_like", False) or isinstance(inner, (*_SEQUENCES, mi.TupleType, mi.NamedTupleType)):
            arrays.append(built)
        elif isinstance(inner, (*_RECORDS, *_MAPPINGS)):
            objects.append((inner, built))
    if not any(c for _, c in objects) and not any(arrays):
        return None
    tagged = {m.tag: c for m, c in objects if getattr(m, "tag_field", None)}
    tag_field = next((m.tag_field for m, _ in objects if getattr(m, "tag_field", None)), None)
    object_check = objects[0][1] if len(objects) == 1 else None
    array_check = arrays[0] if len(arrays) == 1 else None

    def check(value: Any, path: str) -> None:
        if isinstance(value, dict):
            chosen = tagged.get(value.get(tag_field)) if tag_field else object_check
            if chosen is not None:
                chosen(value, path)
        elif isinstance(value, list) and array_check is not None:
            array_check(value, path)

    return check
