"""Tests for natsrpc.errors: the hierarchy, the wire mapping of error replies, and nats-py translation."""

from __future__ import annotations

import inspect
import json
import pickle

import nats.errors
import pytest

import natsrpc
from natsrpc import protocol
from natsrpc.errors import (
    AuthenticationFailed,
    BadRequest,
    CallError,
    CallTimeout,
    ClientClosed,
    ConnectionLost,
    DeadlineExceeded,
    InternalError,
    NatsRpcError,
    NoResponders,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
    RemoteError,
    ReplyTooLarge,
    ServiceError,
    Unavailable,
    error_from_reply,
    error_reply,
    is_authentication_failure,
    permission_violation,
    remote_error,
    translate_nats_errors,
)

EXCEPTIONS = [value for value in vars(natsrpc).values() if isinstance(value, type) and issubclass(value, BaseException)]


class TestHierarchy:
    """One root exception; callers catch families by base class."""

    @pytest.mark.parametrize("cls", EXCEPTIONS, ids=[cls.__name__ for cls in EXCEPTIONS])
    def test_everything_is_natsrpc_error(self, cls: type[BaseException]) -> None:
        """Every exception natsrpc exports subclasses NatsRpcError and says when it is raised."""
        assert issubclass(cls, NatsRpcError)
        assert cls.__doc__ is not None
        assert cls.__doc__.startswith("Raised ")

    @pytest.mark.parametrize(
        "cls",
        [BadRequest, NotFound, ReplyTooLarge, Overloaded, InternalError, Unavailable, DeadlineExceeded, ServiceError],
        ids=lambda cls: cls.__name__,
    )
    def test_remote_errors(self, cls: type[RemoteError]) -> None:
        """Every per-code error is a RemoteError and a CallError."""
        assert issubclass(cls, RemoteError)
        assert issubclass(cls, CallError)

    @pytest.mark.parametrize(
        "cls",
        [
            NoResponders,
            CallTimeout,
            natsrpc.CircuitOpen,
            PayloadTooLarge,
            PermissionDenied,
            AuthenticationFailed,
            ConnectionLost,
            ClientClosed,
        ],
        ids=lambda cls: cls.__name__,
    )
    def test_local_call_errors(self, cls: type[CallError]) -> None:
        """Errors raised on the caller's side are CallErrors but not RemoteErrors."""
        assert issubclass(cls, CallError)
        assert not issubclass(cls, RemoteError)

    def test_call_timeout_is_timeout_error(self) -> None:
        """CallTimeout is also a TimeoutError, so generic timeout handling catches it."""
        assert issubclass(CallTimeout, TimeoutError)

    def test_definition_and_configuration_errors(self) -> None:
        """DefinitionError is a TypeError and ConfigurationError a ValueError, outside CallError."""
        assert issubclass(natsrpc.DefinitionError, TypeError)
        assert issubclass(natsrpc.ConfigurationError, ValueError)
        assert not issubclass(natsrpc.DefinitionError, CallError)
        assert not issubclass(natsrpc.ConfigurationError, CallError)


class TestRemoteError:
    """RemoteError carries code, type, message and data."""

    @pytest.mark.parametrize(
        ("cls", "code"),
        [
            (BadRequest, 400),
            (NotFound, 404),
            (ReplyTooLarge, 413),
            (Overloaded, 429),
            (InternalError, 500),
            (Unavailable, 503),
            (DeadlineExceeded, 504),
            (RemoteError, 500),
        ],
        ids=lambda value: value.__name__ if isinstance(value, type) else str(value),
    )
    def test_default_codes(self, cls: type[RemoteError], code: int) -> None:
        """Each class has its status code and its class name as type by default."""
        error = cls("boom")
        assert (error.code, error.type, error.message, error.data) == (code, cls.__name__, "boom", None)

    def test_str(self) -> None:
        """``str()`` shows code, type and message."""
        assert str(NotFound("no method kv.nope")) == "404 NotFound: no method kv.nope"

    def test_service_error(self) -> None:
        """ServiceError keeps the handler's code, message and data."""
        error = ServiceError(409, "conflict", {"key": "a"})
        assert (error.code, error.type, error.message, error.data) == (409, "ServiceError", "conflict", {"key": "a"})

    @pytest.mark.parametrize("code", [0, 200, 399, -1], ids=["zero", "ok", "below-400", "negative"])
    def test_service_error_rejects_low_codes(self, code: int) -> None:
        """ServiceError codes must be >= 400."""
        with pytest.raises(ValueError, match="code must be an int >= 400"):
            ServiceError(code, "nope")

    def test_service_error_rejects_non_int(self) -> None:
        """ServiceError codes must be ints."""
        with pytest.raises(ValueError, match="code must be an int"):
            ServiceError("409", "nope")  # type: ignore[arg-type]


class TestWireMapping:
    """error_reply() and error_from_reply() carry errors over the wire (ADR-32 headers + JSON body)."""

    @pytest.mark.parametrize(
        ("error", "cls"),
        [
            (BadRequest("kv.put: invalid arguments: missing `value`"), BadRequest),
            (NotFound("no method kv.nope"), NotFound),
            (ReplyTooLarge("reply of 2 MB exceeds max_payload"), ReplyTooLarge),
            (Overloaded("queue full"), Overloaded),
            (InternalError("division by zero", type="ZeroDivisionError"), InternalError),
            (Unavailable("draining"), Unavailable),
            (DeadlineExceeded("deadline passed"), DeadlineExceeded),
            (ServiceError(409, "conflict", {"key": "a", "have": [1, 2]}), ServiceError),
            (ServiceError(418, "teapot", type="Teapot"), ServiceError),
        ],
        ids=["400", "404", "413", "429", "500", "503", "504", "409-with-data", "418-custom-type"],
    )
    def test_round_trip(self, error: RemoteError, cls: type[RemoteError]) -> None:
        """An error sent by a service arrives as the same class with the same fields."""
        headers, body = error_reply(error)
        received = error_from_reply(headers, body)
        assert type(received) is cls
        assert (received.code, received.type, received.message, received.data) == (
            error.code,
            error.type,
            error.message,
            error.data,
        )

    def test_headers(self) -> None:
        """The Nats-Service-Error and Nats-Service-Error-Code headers are set as ADR-32 defines."""
        headers, _ = error_reply(ServiceError(409, "conflict"))
        assert headers == {"Nats-Service-Error": "conflict", "Nats-Service-Error-Code": "409"}
        assert protocol.ERROR == "Nats-Service-Error"
        assert protocol.ERROR_CODE == "Nats-Service-Error-Code"

    def test_header_is_first_line(self) -> None:
        """A multi-line message puts only its first line, at most 1 KiB, in the header."""
        headers, body = error_reply(InternalError("first\nsecond"))
        assert headers[protocol.ERROR] == "first"
        assert json.loads(body)["error"]["message"] == "first\nsecond"
        headers, _ = error_reply(InternalError("x" * 5000))
        assert len(headers[protocol.ERROR]) == 1024

    def test_header_for_empty_message(self) -> None:
        """An error without a message puts its type in the header, never an empty value."""
        headers, _ = error_reply(Overloaded())
        assert headers[protocol.ERROR] == "Overloaded"

    def test_body_shape(self) -> None:
        """The body is the documented JSON envelope, with data null when absent."""
        _, body = error_reply(BadRequest("bad"))
        assert json.loads(body) == {"error": {"code": 400, "type": "BadRequest", "message": "bad", "data": None}}

    def test_unserialisable_data_dropped(self) -> None:
        """Data that cannot be encoded is dropped; the error itself still travels."""
        headers, body = error_reply(ServiceError(409, "conflict", {"sock": object()}))
        received = error_from_reply(headers, body)
        assert (type(received), received.code, received.message, received.data) == (ServiceError, 409, "conflict", None)

    @pytest.mark.parametrize(
        ("headers", "body", "cls", "code", "message"),
        [
            ({protocol.ERROR: "conflict", protocol.ERROR_CODE: "409"}, b"not json", ServiceError, 409, "conflict"),
            ({protocol.ERROR: "draining", protocol.ERROR_CODE: "503"}, b"", Unavailable, 503, "draining"),
            ({protocol.ERROR: "bad", protocol.ERROR_CODE: "400"}, b'{"other": 1}', BadRequest, 400, "bad"),
            ({protocol.ERROR: "odd", protocol.ERROR_CODE: "abc"}, b"\xff", InternalError, 500, "odd"),
            ({}, b"<html>", InternalError, 500, ""),
        ],
        ids=["text-body", "empty-body", "other-json", "non-numeric-code", "no-headers"],
    )
    def test_fallback_to_headers(
        self, headers: dict[str, str], body: bytes, cls: type[RemoteError], code: int, message: str
    ) -> None:
        """A body that is not the JSON envelope falls back to the ADR-32 headers (e.g. other NATS services)."""
        received = error_from_reply(headers, body)
        assert (type(received), received.code, received.message) == (cls, code, message)

    @pytest.mark.parametrize(
        ("code", "cls"),
        [(400, BadRequest), (404, NotFound), (409, ServiceError), (599, ServiceError), (302, RemoteError)],
        ids=["400", "404", "409", "599", "below-400"],
    )
    def test_remote_error_by_code(self, code: int, cls: type[RemoteError]) -> None:
        """remote_error() picks the class for known codes, ServiceError for other error codes."""
        error = remote_error(code, "m", data=[1])
        assert (type(error), error.code, error.data) == (cls, code, [1])


class TestPickling:
    """Errors survive pickling, e.g. when a SyncClient future crosses threads or processes."""

    @pytest.mark.parametrize(
        "error",
        [
            RemoteError("boom", code=502, type="Gateway", data={"a": 1}),
            BadRequest("missing `value`"),
            InternalError("division by zero", type="ZeroDivisionError"),
            DeadlineExceeded("late", data=[1, 2]),
            ServiceError(409, "conflict", {"key": "a"}),
            ServiceError(418, "teapot", type="Teapot"),
        ],
        ids=["remote", "bad-request", "internal", "deadline", "service-error", "service-error-type"],
    )
    def test_round_trip(self, error: RemoteError) -> None:
        """Unpickling gives the same class with the same code, type, message and data."""
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert (copy.code, copy.type, copy.message, copy.data) == (error.code, error.type, error.message, error.data)
        assert str(copy) == str(error)

    def test_local_error(self) -> None:
        """Plain CallErrors pickle too."""
        copy = pickle.loads(pickle.dumps(NoResponders("nobody")))
        assert type(copy) is NoResponders
        assert str(copy) == "nobody"


class TestTranslateNatsErrors:
    """translate_nats_errors() is the one boundary where nats-py exceptions become natsrpc errors."""

    @pytest.mark.parametrize(
        ("raised", "expected", "fragment"),
        [
            (nats.errors.NoRespondersError(), NoResponders, "svc.kv.get"),
            (nats.errors.TimeoutError(), CallTimeout, "svc.kv.get"),
            (TimeoutError(), CallTimeout, "svc.kv.get"),
            (nats.errors.MaxPayloadError(), PayloadTooLarge, "max_payload"),
            (nats.errors.AuthorizationError(), AuthenticationFailed, "refused this connection's credentials"),
            (nats.errors.ConnectionClosedError(), ClientClosed, "closed"),
            (nats.errors.ConnectionDrainingError(), ConnectionLost, "ConnectionDrainingError"),
            (nats.errors.OutboundBufferLimitError(), ConnectionLost, "OutboundBufferLimitError"),
            (nats.errors.StaleConnectionError(), ConnectionLost, "connection lost"),
            (nats.errors.UnexpectedEOF(), ConnectionLost, "connection lost"),
            (ConnectionResetError(), ConnectionLost, "connection lost"),
            (nats.errors.NoServersError(), ConnectionLost, "nats error"),
        ],
        ids=[
            "no-responders",
            "nats-timeout",
            "builtin-timeout",
            "max-payload",
            "authorization",
            "connection-closed",
            "draining",
            "outbound-buffer",
            "stale",
            "eof",
            "reset",
            "other-nats-error",
        ],
    )
    def test_maps(self, raised: Exception, expected: type[CallError], fragment: str) -> None:
        """Each nats-py (or socket) exception becomes its natsrpc error, chained to the original."""
        with pytest.raises(expected) as info, translate_nats_errors("svc.kv.get"):
            raise raised
        assert fragment in str(info.value)
        assert info.value.__cause__ is raised

    def test_natsrpc_errors_pass_through(self) -> None:
        """natsrpc's own errors are not translated again."""
        error = BadRequest("bad")
        with pytest.raises(BadRequest) as info, translate_nats_errors("svc.kv.get"):
            raise error
        assert info.value is error

    def test_other_errors_pass_through(self) -> None:
        """Exceptions that are not from nats-py or the network propagate unchanged."""
        with pytest.raises(KeyError), translate_nats_errors("svc.kv.get"):
            raise KeyError("x")

    @pytest.mark.parametrize(
        "cls",
        sorted(
            (c for c in vars(nats.errors).values() if isinstance(c, type) and issubclass(c, nats.errors.Error)),
            key=lambda c: c.__name__,
        ),
        ids=lambda c: c.__name__,
    )
    def test_every_nats_py_error_becomes_a_natsrpc_error(self, cls: type[nats.errors.Error]) -> None:
        """No nats-py exception class leaks through: each one is raised as a natsrpc CallError, chained."""
        params = inspect.signature(cls.__init__).parameters
        needed = [p for p in list(params.values())[1:] if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
        raised = cls(*["x"] * len(needed))
        with pytest.raises(natsrpc.CallError) as info, translate_nats_errors("svc.kv.get"):
            raise raised
        assert info.value.__cause__ is raised


class TestErrorCallbackReports:
    """permission_violation() and is_authentication_failure() read what nats-py reports on error_cb."""

    @pytest.mark.parametrize(
        ("reported", "expected"),
        [
            (
                nats.errors.Error('nats: permissions violation for publish to "svc.billing.charge"'),
                ("publish", "svc.billing.charge"),
            ),
            (
                nats.errors.Error('nats: permissions violation for subscription to "_inbox.abc.*"'),
                ("subscription", "_inbox.abc.*"),
            ),
            (
                nats.errors.Error('nats: permissions violation for subscription to "svc.kv.get" using queue "q"'),
                ("subscription", "svc.kv.get"),
            ),
            (nats.errors.Error("nats: 'Authorization Violation'"), None),
            (nats.errors.StaleConnectionError(), None),
            (ConnectionResetError(), None),
        ],
        ids=["publish", "subscription", "queue-subscription", "authorization", "stale", "reset"],
    )
    def test_permission_violation(self, reported: Exception, expected: tuple[str, str] | None) -> None:
        """A permissions violation yields (operation, subject); anything else None."""
        assert permission_violation(reported) == expected

    @pytest.mark.parametrize(
        ("reported", "expected"),
        [
            (nats.errors.Error("nats: 'Authorization Violation'"), True),
            (nats.errors.AuthorizationError(), True),
            (nats.errors.Error("nats: 'User Authentication Expired'"), True),
            (nats.errors.Error("nats: 'User Authentication Revoked'"), True),
            (nats.errors.Error('nats: permissions violation for publish to "x"'), False),
            (ConnectionRefusedError(), False),
        ],
        ids=["violation", "nats-py-class", "expired", "revoked", "permission", "refused"],
    )
    def test_is_authentication_failure(self, reported: Exception, expected: bool) -> None:
        """Refused, expired or revoked credentials are authentication failures; subject permissions are not."""
        assert is_authentication_failure(reported) is expected

    def test_authentication_failed_is_a_permission_denied(self) -> None:
        """Catching PermissionDenied catches refused credentials too (neither is retried nor opens a circuit)."""
        assert issubclass(AuthenticationFailed, PermissionDenied)
