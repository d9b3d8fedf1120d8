"""The wire protocol v1: subjects, headers and their encoding, status codes, heartbeats (DESIGN.md §2).

Everything that both ends of a call must agree on lives here, as constants and pure functions:
the subject of each kind (one builder each, names checked where they enter), the header table with
its encoder and parser, and the heartbeat message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Final

import msgspec

DEFAULT_PREFIX: Final = "svc"
QUEUE_GROUP: Final = "q"
DEFAULT_HEARTBEAT_INTERVAL: Final = 2.0  # seconds between an instance's heartbeats
MIN_HEARTBEAT_INTERVAL: Final = 0.01  # the shortest a beat may announce (100 beats a second)
MAX_HEARTBEAT_INTERVAL: Final = 3600.0  # the longest a beat may announce: an instance it names expires within 3 hours

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
# Streams (docs/protocol.md): the request asks for one, each message the server sends is numbered.
STREAM: Final = "Natsrpc-Stream"  # request: the window, the most items sent beyond the client's ack
SEQ: Final = "Natsrpc-Seq"  # server message: 0 the start, 1.. the items, then the end or an error
CONTROL: Final = "Natsrpc-Control"  # start message: the subject the client sends acks, keepalives, cancel to
KEEPALIVE: Final = "Natsrpc-Keepalive"  # start message: the interval (s); alone: a keepalive
END: Final = "Natsrpc-End"  # the end message: the number of items sent
ACK: Final = "Natsrpc-Ack"  # control message: the client consumed the items up to this seq
CANCEL: Final = "Natsrpc-Cancel"  # control message: the client gives up; the generator is closed
CHUNKED: Final = "Natsrpc-Chunked"  # start message: a reply over max_payload, this many bytes in chunks

# Header values.
JSON: Final = "application/json"
MSGPACK: Final = "application/msgpack"
MIXED_ARGS: Final = "mixed"  # body is [[positional...], {named...}]

DEFAULT_WINDOW: Final = 64  # items a stream may have sent and not yet acknowledged
MAX_WINDOW: Final = 1024  # the largest window a server grants
DEFAULT_KEEPALIVE: Final = 1.0  # seconds between keepalives of an idle stream; 3 missed = dead peer
MIN_KEEPALIVE: Final = 0.01  # the keepalive intervals a stream's peer takes
MAX_KEEPALIVE: Final = 3600.0
MAX_SEQ_DIGITS: Final = 12  # the longest sequence number or ack a peer may send
DEFAULT_MAX_REPLY_SIZE: Final = 64 * 1024 * 1024  # the largest reply sent (or taken) in chunks
CHUNK_OVERHEAD: Final = 512  # bytes a chunk leaves under max_payload for its header block (the first names more)

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

# A subject natsrpc publishes to: dot-separated tokens, none empty, no whitespace or control
# characters (they would end the protocol line: wire-protocol injection), no wildcards.
PUBLISH_SUBJECT: Final = re.compile(r"[^\s.*>\x00-\x1f\x7f]+(?:\.[^\s.*>\x00-\x1f\x7f]+)*")


def valid_name(name: object) -> bool:
    """Returns whether ``name`` may be used as a service or method name (one subject token)."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


MAX_CALLER: Final = 256
"""The longest ``Natsrpc-Caller`` value: ``<service>/<instance-id>``, or a client's ``caller`` name."""


def valid_caller(value: object) -> bool:
    """Returns whether ``value`` may name a call's caller: a printable one-line string of 1 to
    :data:`MAX_CALLER` characters (it reaches logs, span attributes and the handler's context)."""
    return isinstance(value, str) and 0 < len(value) <= MAX_CALLER and value.isprintable()


BAD_CALLER: Final = f"the {CALLER} header must be a printable one-line string of 1 to {MAX_CALLER} characters"


def valid_subject(subject: object) -> bool:
    """Returns whether ``subject`` may be published to: tokens, no whitespace, control characters or wildcards."""
    return isinstance(subject, str) and PUBLISH_SUBJECT.fullmatch(subject) is not None


def valid_prefix(prefix: object) -> bool:
    """Returns whether ``prefix`` may start subjects (``svc``, ``acme.svc``): one or more publishable tokens."""
    return valid_subject(prefix)


def endpoint_subject(service: str, method: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Returns the load-balanced subject of one method: ``svc.<service>.<method>``."""
    return f"{prefix}.{service}.{method}"


EVENT_PREFIX: Final = "evt"
MAX_EVENT_TYPE: Final = 200  # characters in an event type


def valid_event_type(event_type: object, wildcards: bool = False) -> bool:
    """Returns whether ``event_type`` names events: dot-separated name tokens (``order.created``).

    With ``wildcards`` (a handler's pattern) a token may be ``*``, and the last one ``>``.
    """
    if not isinstance(event_type, str) or not 0 < len(event_type) <= MAX_EVENT_TYPE:
        return False
    tokens = event_type.split(".")
    for index, token in enumerate(tokens):
        if wildcards and (token == "*" or (token == ">" and index == len(tokens) - 1)):
            continue
        if not valid_name(token):
            return False
    return True  # no token starts with "_": evt._dlq.> and the like stay natsrpc's own


def event_subject(event_type: str) -> str:
    """Returns the subject of an event type (or a handler's pattern): ``evt.<type>``."""
    return f"{EVENT_PREFIX}.{event_type}"


def instance_subject(service: str, method: str, instance_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Returns the subject that reaches one instance: ``svc.<service>.<method>.<id>``."""
    return f"{prefix}.{service}.{method}.{instance_id}"


def instance_wildcard(service: str, instance_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Returns the one subscription an instance needs for all its per-instance subjects."""
    return f"{prefix}.{service}.*.{instance_id}"


def heartbeat_subject(service: str, instance_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Returns the subject an instance publishes its heartbeats on: ``svc._hb.<service>.<id>``."""
    return f"{prefix}._hb.{service}.{instance_id}"


def control_subject(service: str, instance_id: str, token: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Returns the control subject of one stream: ``svc._ctl.<service>.<id>.<token>``."""
    return f"{prefix}._ctl.{service}.{instance_id}.{token}"


def control_wildcard(service: str, instance_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Returns the one subscription an instance needs for the control subjects of all its streams."""
    return f"{prefix}._ctl.{service}.{instance_id}.*"


def parse_control_subject(subject: str, service: str, prefix: str = DEFAULT_PREFIX) -> str | None:
    """Returns the stream token of a control subject of ``service``, or None if it is not one.

    A client checks the control subject a server names before sending anything to it, so a
    responder cannot make it publish elsewhere.
    """
    head = f"{prefix}._ctl.{service}."
    if not subject.startswith(head):
        return None
    instance_id, dot, token = subject[len(head) :].partition(".")
    return token if dot and valid_name(instance_id) and valid_name(token) else None


def invalidation_subject(service: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Returns the subject a service announces dropped cache entries on: ``svc._inval.<service>``.

    The body is JSON ``{"method": ..., "arguments": {...}}``; every client keeping replies of the
    service listens (on :func:`invalidation_wildcard`) and drops the entries that match.
    """
    return f"{prefix}._inval.{service}"


def invalidation_wildcard(prefix: str = DEFAULT_PREFIX) -> str:
    """Returns the subject clients hear every service's cache invalidations on: ``svc._inval.*``."""
    return f"{prefix}._inval.*"


MAX_CACHE_TTL: Final = 86_400.0
"""The longest ``cache_ttl`` (a day); a heartbeat announcing more, or less than nothing, is not believed."""


def cancel_subject(service: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Returns the subject every instance of ``service`` hears cancels on: ``svc._cancel.<service>``.

    The body of a cancel is the reply subject of the call to cancel.
    """
    return f"{prefix}._cancel.{service}"


STATS_PERCENTILES: Final = (("p50_processing_time", 0.5), ("p90_processing_time", 0.9), ("p99_processing_time", 0.99))
"""The percentiles an endpoint's ``$SRV.STATS`` ``data`` carries, in nanoseconds (as the durations beside them)."""

SERVICE_API_VERBS: Final = ("PING", "INFO", "STATS")
"""The NATS Service API questions every instance answers."""


def service_api_subject(verb: str, service: str = "", instance_id: str = "") -> str:
    """Returns a NATS Service API subject: ``$SRV.<verb>[.<service>[.<id>]]``."""
    if not service:
        return f"$SRV.{verb}"
    return f"$SRV.{verb}.{service}.{instance_id}" if instance_id else f"$SRV.{verb}.{service}"


def call_service_name(subject: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Returns the service a call subject ``<prefix>.<service>.<method>[.<id>]`` names, or "" if it names none."""
    head = prefix + "."
    if not subject.startswith(head):
        return ""
    service, dot, _ = subject[len(head) :].partition(".")
    return service if dot else ""


def parse_heartbeat_subject(subject: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, str] | None:
    """Returns (service, instance id) of a heartbeat subject ``svc._hb.<service>.<id>``, or None if it is not one."""
    head = f"{prefix}._hb."
    if not subject.startswith(head):
        return None
    service, dot, instance_id = subject[len(head) :].partition(".")
    if not dot or not valid_name(service) or not valid_name(instance_id):
        return None
    return service, instance_id


MAX_STAYING: Final = 64
"""The most instance ids a draining heartbeat names in ``staying`` (receivers ignore the rest)."""


class Heartbeat(msgspec.Struct, omit_defaults=True):
    """What an instance publishes every interval on ``svc._hb.<service>.<id>``.

    ``name`` and ``id`` repeat the subject's tokens; a receiver trusts the subject (which the
    server's permissions guard) and ignores a beat whose body disagrees with it.
    """

    name: str
    id: str
    version: str
    endpoints: list[str]
    in_flight: int
    healthy: bool
    draining: bool
    interval: Annotated[float, msgspec.Meta(ge=MIN_HEARTBEAT_INTERVAL, le=MAX_HEARTBEAT_INTERVAL)]  # else ignored
    idempotent: list[str] = []
    streaming: list[str] = []
    cached: dict[str, float] = {}  # endpoint -> cache_ttl seconds, for those whose replies clients may keep
    staying: list[str] = []  # a draining beat: ids of the service's other live instances the leaving host knows


# Header blocks: encoded and parsed here, in one place, for both sides.

_NEWLINES: Final = str.maketrans({"\r": " ", "\n": " "})
_PROTOCOL_NAMES: Final = frozenset(
    [DEADLINE, CALLER, ARGS_FORM, TRACEPARENT, CONTENT_TYPE, STREAM, SEQ, CONTROL, KEEPALIVE, END, ACK, CANCEL, CHUNKED]
)


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """Encodes headers as nats-py does (``NATS/1.0``, ``Name: value`` lines), or b"" for none.

    Any line break in any value, natsrpc's own included, becomes a space (as nats-py does), so no
    value can add a header line. Names and values of headers other than natsrpc's own are
    stripped, and those names must be HTTP tokens.

    Raises:
        ValueError: a name is not an HTTP token (callers raise ConfigurationError at the options).
    """
    if not headers:
        return b""
    lines = ["NATS/1.0\r\n"]
    for name, value in headers.items():
        if name not in _PROTOCOL_NAMES:
            name = name.strip()
            if not name:
                continue
            if not HEADER_NAME.fullmatch(name):
                raise ValueError(f"header name {name!r} is not an HTTP token")
            value = value.strip()
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    text = "".join(lines)
    if text.count("\n") != len(lines) or text.count("\r") != len(lines):  # a value carries a line break
        return encode_headers({name: clean_header_value(value) for name, value in headers.items()})
    return text.encode()


def clean_header_value(value: str) -> str:
    """Returns a header value as it travels: stripped, line breaks turned into spaces."""
    return value.translate(_NEWLINES).strip()


HEADER_START: Final = b"NATS/1.0\r\n"
_HEADER_START_LEN: Final = len(HEADER_START)
_ASCII_SPACE: Final = " \t\n\r\x0b\x0c"  # what bytes.strip() strips; str.strip() would take Unicode spaces too


def parse_count(value: str, max_digits: int) -> int | None:
    """Returns a header value that holds a whole number of at most ``max_digits`` ASCII digits, or None.

    For every numeric natsrpc header: deadlines, windows, sequence numbers, acks, sizes. No sign,
    space, underscore or non-ASCII digit passes (``int()`` would take them).
    """
    if len(value) <= max_digits and value.isascii() and value.isdigit():
        return int(value)
    return None


_SEQ_BLOCK: Final = b"NATS/1.0\r\nNatsrpc-Seq: "
_SEQ_BLOCK_LEN: Final = len(_SEQ_BLOCK)


def seq_block(seq: int) -> bytes:
    """Returns the header block of a stream item: ``Natsrpc-Seq`` alone (what encode_headers would make)."""
    return b"NATS/1.0\r\nNatsrpc-Seq: %d\r\n\r\n" % seq


def parse_headers(headers: bytes) -> dict[str, str] | None:
    """Parses a header block without a status line (the same dict nats-py's parser returns).

    The block is decoded once (``\\r\\n`` cannot occur inside a UTF-8 sequence, so this equals
    decoding each value), then split: one decode instead of one per name and value. Lines without a
    colon, or with an empty name or whitespace, control characters or non-ASCII in the name, are skipped.
    A stream item's block (``Natsrpc-Seq`` alone, digits) is read without the split.
    """
    if headers.startswith(_SEQ_BLOCK) and headers.endswith(b"\r\n\r\n"):
        digits = headers[_SEQ_BLOCK_LEN:-4]
        if digits.isdigit():
            return {SEQ: digits.decode()}
    end = -4 if headers.endswith(b"\r\n\r\n") else len(headers)  # no empty lines to skip
    out: dict[str, str] = {}
    for line in headers[_HEADER_START_LEN:end].decode("utf-8", "replace").split("\r\n"):
        name, sep, value = line.partition(":")
        if name in _PROTOCOL_NAMES and sep:  # one of natsrpc's own, as written: a name that passes the checks
            out[name] = value.strip(_ASCII_SPACE)
            continue
        if not sep:
            continue
        name = name.strip(_ASCII_SPACE)
        if name and name.isascii() and name.isprintable() and " " not in name:
            out[name] = value.strip(_ASCII_SPACE)
    return out or None
