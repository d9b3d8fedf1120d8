"""One exception hierarchy for everything natsrpc raises, and its mapping to the wire.

The tree::

    NatsRpcError
    ├── DefinitionError            a Service or @rpc method is defined wrongly
    ├── ConfigurationError         bad options, missing nats-server binary, ...
    └── CallError                  a call did not produce a return value
        ├── RemoteError            the service replied with an error (.code .type .message .data)
        │   ├── BadRequest         400
        │   ├── NotFound           404
        │   ├── ReplyTooLarge      413
        │   ├── Overloaded         429
        │   ├── InternalError      500
        │   ├── BadGateway         502 a call the handler made failed (the message names the hop)
        │   ├── Unavailable        503
        │   ├── DeadlineExceeded   504 (also raised locally when no time is left)
        │   └── ServiceError       raised by handlers for their own business errors
        ├── NoResponders           nobody subscribes to the subject
        ├── CallTimeout            no reply before the deadline (also a TimeoutError)
        ├── CircuitOpen            the circuit breaker refuses the call
        ├── BadReply               a success reply does not decode as the return type, or a
        │                          stream's messages break the protocol
        ├── StreamInterrupted      a stream's server went silent for 3 keepalive intervals
        ├── PayloadTooLarge        headers + body exceed the server's max_payload
        ├── PermissionDenied       the server refused a publish or subscribe of this connection
        │   └── AuthenticationFailed   the server refused the connection's credentials
        ├── ConnectionLost         the connection broke while the call was pending
        └── ClientClosed           the client was closed by its owner

nats-py exceptions are translated in one place, :func:`translate_nats_errors` (with
:func:`permission_violation` and :func:`is_authentication_failure` reading what nats-py reports on
``error_cb``), and never reach callers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import msgspec
import nats.errors

from natsrpc import protocol


class NatsRpcError(Exception):
    """Raised for every failure natsrpc reports; the root of the hierarchy."""


class DefinitionError(NatsRpcError, TypeError):
    """Raised when a Service class or an @rpc method is defined wrongly."""


class ConfigurationError(NatsRpcError, ValueError):
    """Raised when options or the environment (e.g. the nats-server binary) are unusable."""


class CallError(NatsRpcError):
    """Raised when a call did not produce a return value.

    Attributes:
        hop: ``"<service>.<method>"`` of the call that failed (set by the client that made it).
    """

    hop: str = ""


class RemoteError(CallError):
    """Raised when the service replied with an error.

    Attributes:
        code: the numeric status (400, 404, 429, 500, ... or a handler's own code).
        type: the error type name (``"BadRequest"``, a handler's exception class name, ...).
        message: the human-readable message.
        data: optional structured details, as sent by the service.
    """

    default_code: ClassVar[int] = protocol.INTERNAL

    def __init__(
        self, message: str = "", *, code: int | None = None, type: str | None = None, data: Any = None
    ) -> None:
        self.code = self.default_code if code is None else code
        self.type = type or self.__class__.__name__
        self.message = message
        self.data = data
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.code} {self.type}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:  # keep pickling (e.g. across threads/processes) working
        return (_rebuild_remote, (self.__class__, self.message, self.code, self.type, self.data))


def _rebuild_remote(cls: type[RemoteError], message: str, code: int, type_: str, data: Any) -> RemoteError:
    return cls(message, code=code, type=type_, data=data)


class BadRequest(RemoteError):
    """Raised when the service could not decode or validate the arguments (400)."""

    default_code = protocol.BAD_REQUEST


def streaming_awaited(where: str) -> BadRequest:
    """The 400 for a streaming endpoint that was awaited: its type tells clients to iterate instead."""
    return BadRequest(
        f"{where} is a streaming endpoint: iterate it (async for ...), do not await it", type="StreamingEndpoint"
    )


class NotFound(RemoteError):
    """Raised when the service has no such method (404)."""

    default_code = protocol.NOT_FOUND


class ReplyTooLarge(RemoteError):
    """Raised when the reply would exceed the server's max_payload (413)."""

    default_code = protocol.PAYLOAD_TOO_LARGE


class Overloaded(RemoteError):
    """Raised when the instance's concurrency limit and wait queue are full (429)."""

    default_code = protocol.OVERLOADED


class InternalError(RemoteError):
    """Raised when the handler raised an unexpected exception (500); ``type`` names it."""

    default_code = protocol.INTERNAL


class BadGateway(RemoteError):
    """Raised when a call the service made to another service failed (502); the message names the hop.

    Unlike 429 and 503 it is not retried: the calling handler did run.
    """

    default_code = protocol.BAD_GATEWAY


class Unavailable(RemoteError):
    """Raised when the instance is draining and refuses new work (503)."""

    default_code = protocol.UNAVAILABLE


class DeadlineExceeded(RemoteError):
    """Raised when the call's deadline passed before the work could be done (504)."""

    default_code = protocol.DEADLINE_EXCEEDED


class ServiceError(RemoteError):
    """Raised by handlers for their own business errors; arrives at the caller with its code.

    Args:
        code: any status code >= 400 (e.g. 409 for a conflict).
        message: the human-readable message.
        data: optional JSON-serialisable details.
    """

    def __init__(self, code: int, message: str = "", data: Any = None, *, type: str | None = None) -> None:
        if not isinstance(code, int) or code < 400:
            raise ValueError(f"ServiceError code must be an int >= 400, got {code!r}")
        super().__init__(message, code=code, type=type or "ServiceError", data=data)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_service_error, (self.code, self.message, self.data, self.type))


def _rebuild_service_error(code: int, message: str, data: Any, type_: str) -> ServiceError:
    return ServiceError(code, message, data, type=type_)


class NoResponders(CallError):
    """Raised when no instance subscribes to the subject (the service or method is not running).

    Attributes:
        resubscribing: the service had live instances when this client's connection broke and has
            not beaten since: its instances are most likely resubscribing after the same outage.
            Such a refusal says nothing of the service's health (the circuit ignores it) and its
            retry waits for the service's next heartbeat.
        unseen: this client's registry never saw an instance of the service (not running, or a
            misspelt name): says nothing of any service's health, so the circuit ignores it too.
    """

    resubscribing: bool = False
    unseen: bool = False


class CallTimeout(CallError, TimeoutError):
    """Raised when no reply arrived before the call's deadline (the request may still have run)."""


class BadReply(CallError):
    """Raised when a successful reply cannot be decoded (as the method's declared return type)."""


class StreamInterrupted(CallError):
    """Raised when a stream's server sent nothing (not even a keepalive) for 3 keepalive intervals."""


class CircuitOpen(CallError):
    """Raised when the circuit breaker refuses a call because the service is failing or gone."""


class PayloadTooLarge(CallError):
    """Raised before sending when headers + body exceed the server's max_payload."""


class PermissionDenied(CallError):
    """Raised when the server refused to let this connection publish or subscribe a subject."""


class AuthenticationFailed(PermissionDenied):
    """Raised when the server refused the connection's credentials (user/password, token, NKey, creds, certificate)."""


class ConnectionLost(CallError):
    """Raised when the connection broke (or was closed underneath) while the call was pending."""


class ClientClosed(CallError):
    """Raised when a call is made on, or pending in, a client its owner closed."""


_BY_CODE: dict[int, type[RemoteError]] = {
    cls.default_code: cls
    for cls in (
        BadRequest,
        NotFound,
        ReplyTooLarge,
        Overloaded,
        InternalError,
        BadGateway,
        Unavailable,
        DeadlineExceeded,
    )
}


class _ErrorBody(msgspec.Struct, omit_defaults=False):
    code: int
    type: str
    message: str
    data: Any = None


class _ErrorEnvelope(msgspec.Struct):
    error: _ErrorBody


_envelope_encoder = msgspec.json.Encoder()
_envelope_decoder = msgspec.json.Decoder(_ErrorEnvelope)


def remote_error(code: int, message: str, type: str | None = None, data: Any = None) -> RemoteError:
    """Returns the RemoteError subclass that stands for ``code``, built from wire fields."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return (
            ServiceError(code, message, data, type=type)
            if code >= 400
            else RemoteError(message, code=code, type=type, data=data)
        )
    return cls(message, code=code, type=type or cls.__name__, data=data)


def error_reply(error: RemoteError) -> tuple[dict[str, str], bytes]:
    """Returns the headers and JSON body of an error reply (DESIGN §2, ADR-32 headers)."""
    body = _ErrorEnvelope(_ErrorBody(error.code, error.type, error.message, error.data))
    try:
        payload = _envelope_encoder.encode(body)
    except (TypeError, ValueError):  # data not serialisable: keep the error, drop the data
        payload = _envelope_encoder.encode(_ErrorEnvelope(_ErrorBody(error.code, error.type, error.message)))
    first_line = error.message.splitlines()[0] if error.message else error.type
    headers = {protocol.ERROR: first_line[:1024], protocol.ERROR_CODE: str(error.code)}
    return headers, payload


def error_from_reply(headers: dict[str, str], body: bytes) -> RemoteError:
    """Returns the RemoteError an error reply carries (body preferred, headers as fallback)."""
    try:
        envelope = _envelope_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        code_text = headers.get(protocol.ERROR_CODE, "500")
        code = int(code_text) if code_text.isdigit() else protocol.INTERNAL
        return remote_error(code, headers.get(protocol.ERROR, ""))
    e = envelope.error
    return remote_error(e.code, e.message, e.type, e.data)


def no_responders(subject: str) -> NoResponders:
    """The NoResponders of a call to ``subject`` that nothing subscribes to, when nothing more is
    known of why (a client with discovery says more: ``Client._no_responders``)."""
    return NoResponders(f"no instance answers {subject} (service not running, or no such method)")


@contextmanager
def translate_nats_errors(subject: str = "") -> Iterator[None]:
    """Translates nats-py exceptions raised inside the block into natsrpc errors.

    This is the one boundary between nats-py and natsrpc's callers.
    """
    try:
        yield
    except nats.errors.NoRespondersError as exc:
        raise no_responders(subject) from exc
    except (TimeoutError, nats.errors.TimeoutError) as exc:
        raise CallTimeout(f"no reply from {subject} in time") from exc
    except nats.errors.MaxPayloadError as exc:
        raise PayloadTooLarge(f"message to {subject} exceeds the server's max_payload") from exc
    except nats.errors.AuthorizationError as exc:
        raise AuthenticationFailed(f"not authorized: the server refused this connection's credentials ({exc})") from exc
    except nats.errors.ConnectionClosedError as exc:
        raise ClientClosed("the connection is closed") from exc
    except (nats.errors.ConnectionDrainingError, nats.errors.OutboundBufferLimitError) as exc:
        raise ConnectionLost(f"cannot send to {subject}: {exc.__class__.__name__}") from exc
    except (nats.errors.StaleConnectionError, nats.errors.UnexpectedEOF, ConnectionError, OSError) as exc:
        raise ConnectionLost(f"connection lost: {exc!r}") from exc
    except nats.errors.Error as exc:
        raise ConnectionLost(f"nats error: {exc}") from exc


_VIOLATION = re.compile(r'permissions violation for (publish|subscription) to "([^"]*)"')
_AUTH_FAILURE = re.compile(r"authorization violation|authorization failed|authentication (?:expired|revoked)")


def permission_violation(exc: BaseException) -> tuple[str, str] | None:
    """Returns ``(operation, subject)`` when ``exc`` is a permissions violation nats-py reported on error_cb.

    ``operation`` is ``"publish"`` or ``"subscription"``. nats-py lower-cases the server's message, so
    ``subject`` comes back lower-cased: compare it with ``subject.lower()``.
    """
    match = _VIOLATION.search(str(exc).lower())
    return (match[1], match[2]) if match else None


def is_authentication_failure(exc: BaseException) -> bool:
    """Returns whether ``exc`` (from nats-py, on connect or on error_cb) says the server refused the credentials."""
    return isinstance(exc, nats.errors.AuthorizationError) or _AUTH_FAILURE.search(str(exc).lower()) is not None


def reply_code(exc: BaseException) -> int:
    """Returns the code of the error reply a handler's exception becomes (what its caller gets).

    A service's own error keeps its code. A failed call the handler made downstream keeps a
    business code, but a refusal that means "not executed" (429, 503, no responders, circuit
    open) becomes 502, since this handler did run, and a downstream timeout 504. Anything else is 500.
    """
    if isinstance(exc, RemoteError):
        if exc.hop and exc.code in (protocol.OVERLOADED, protocol.UNAVAILABLE):
            return protocol.BAD_GATEWAY
        return exc.code
    if isinstance(exc, CallError):
        return protocol.DEADLINE_EXCEEDED if isinstance(exc, CallTimeout) else protocol.BAD_GATEWAY
    return protocol.INTERNAL
