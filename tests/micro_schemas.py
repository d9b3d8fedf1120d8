"""The official NATS micro JSON schemas of ``$SRV`` replies, as validators the tests share.

The schemas in ``tests/schemas/micro/`` are the ones ``nats micro`` checks, copied unchanged; their
``definitions.json#/...`` references resolve to the local copy, and ``date-time`` is checked (jsonschema
checks that format only with an optional package, so it is checked here).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry as SchemaRegistry
from referencing import Resource
from referencing.jsonschema import DRAFT7

SCHEMAS = Path(__file__).resolve().parent / "schemas" / "micro"

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    """RFC3339 ``date-time`` (jsonschema checks it only with an optional package, so check it here)."""
    if not isinstance(value, str):
        return True
    if not _RFC3339.fullmatch(value):
        return False
    datetime.fromisoformat(value.upper().replace("Z", "+00:00"))  # raises on an impossible date
    return True


def _validators() -> dict[str, jsonschema.Draft7Validator]:
    """Returns a draft-07 validator per ``$SRV`` verb; ``definitions.json#/...`` refs resolve locally."""
    schemas = {path.stem: json.loads(path.read_text()) for path in SCHEMAS.glob("*.json")}
    registry: SchemaRegistry[Any] = SchemaRegistry().with_resources(
        (schema["$id"], Resource.from_contents(schema, default_specification=DRAFT7)) for schema in schemas.values()
    )
    return {
        verb: jsonschema.Draft7Validator(schemas[f"{verb.lower()}_response"], registry=registry, format_checker=FORMATS)
        for verb in ("PING", "INFO", "STATS")
    }


VALIDATORS = _validators()


def validate(verb: str, reply: dict[str, Any]) -> None:
    """Fails with every schema violation of a ``$SRV.<verb>`` reply."""
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATORS[verb].iter_errors(reply)]
    assert not errors, f"$SRV.{verb} reply violates the schema: {errors}\n{reply}"
