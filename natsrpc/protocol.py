"""The wire protocol v1: subject names, header names and status codes (DESIGN.md §2).

Everything that both ends of a call must agree on lives here, as constants and pure functions.
"""

from __future__ import annotations

import re
from typing import Final

DEFAULT_PREFIX: Final = "svc"
QUEUE_GROUP: Final = "q"

NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
SEMVER_PATTERN: Final = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)

# Header names.
DEADLINE: Final = "Natsrpc-Deadline"
CALLER: Final = "Natsrpc-Caller"
ARGS_FORM: Final = "Natsrpc-Args"
TRACEPARENT: Final = "traceparent"
CONTENT_TYPE: Final = "Content-Type"
ERROR: Final = "Nats-Service-Error"
ERROR_CODE: Final = "Nats-Service-Error-Code"
STATUS: Final = "Status"  # set by nats-py from the server's inline status line

# Header values.
JSON: Final = "application/json"
MSGPACK: Final = "application/msgpack"
MIXED_ARGS: Final = "mixed"  # body is [[positional...], {named...}]

# Status codes used in error replies.
BAD_REQUEST: Final = 400
NOT_FOUND: Final = 404
PAYLOAD_TOO_LARGE: Final = 413
OVERLOADED: Final = 429
INTERNAL: Final = 500
BAD_GATEWAY: Final = 502
UNAVAILABLE: Final = 503
DEADLINE_EXCEEDED: Final = 504
NO_RESPONDERS_STATUS: Final = "503"  # the server's own inline status for "no responders"

HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an HTTP token, as nats-py checks it


def valid_name(name: object) -> bool:
    """Returns whether ``name`` may be used as a service or method name (one subject token)."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


def endpoint_subject(service: str, method: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Returns the load-balanced subject of one method: ``svc.<service>.<method>``."""
    return f"{prefix}.{service}.{method}"


def instance_subject(service: str, method: str, instance_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Returns the subject that reaches one instance: ``svc.<service>.<method>.<id>``."""
    return f"{prefix}.{service}.{method}.{instance_id}"


def instance_wildcard(service: str, instance_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Returns the one subscription an instance needs for all its per-instance subjects."""
    return f"{prefix}.{service}.*.{instance_id}"


def heartbeat_subject(service: str, instance_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Returns the subject an instance publishes its heartbeats on: ``svc._hb.<service>.<id>``."""
    return f"{prefix}._hb.{service}.{instance_id}"
