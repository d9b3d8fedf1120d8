"""natsrpc: service-to-service RPC over NATS request/reply.

Define a :class:`Service` with ``@rpc`` methods, host it with ``python -m natsrpc.run`` (or
:class:`Host`), and call it with ``await client.call_service["kv"].get("a")``.
"""

import importlib.metadata as _metadata

from natsrpc.client import Client
from natsrpc.connection import connect
from natsrpc.context import CallContext, current_call
from natsrpc.embedded import NatsServer
from natsrpc.errors import (
    AuthenticationFailed,
    BadGateway,
    BadReply,
    BadRequest,
    CallError,
    CallTimeout,
    CircuitOpen,
    ClientClosed,
    ConfigurationError,
    ConnectionLost,
    DeadlineExceeded,
    DefinitionError,
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
    StreamInterrupted,
    Unavailable,
)
from natsrpc.events import event
from natsrpc.host import Host
from natsrpc.proxy import CallOptions
from natsrpc.service import Service, ServiceContext, rpc
from natsrpc.sync import SyncClient

__all__ = [
    "AuthenticationFailed",
    "BadGateway",
    "BadReply",
    "BadRequest",
    "CallContext",
    "CallError",
    "CallOptions",
    "CallTimeout",
    "CircuitOpen",
    "Client",
    "ClientClosed",
    "ConfigurationError",
    "ConnectionLost",
    "DeadlineExceeded",
    "DefinitionError",
    "Host",
    "InternalError",
    "NatsRpcError",
    "NatsServer",
    "NoResponders",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "PermissionDenied",
    "RemoteError",
    "ReplyTooLarge",
    "Service",
    "ServiceContext",
    "ServiceError",
    "StreamInterrupted",
    "SyncClient",
    "Unavailable",
    "connect",
    "current_call",
    "event",
    "rpc",
]

try:
    __version__ = _metadata.version("natsrpc")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
