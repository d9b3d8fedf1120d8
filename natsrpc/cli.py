"""``python -m natsrpc``: call and inspect services from the shell (call, ls, info, stats, ping).

Exit codes: 0 success, 1 the call failed (the error code and message are printed), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any

import msgspec
import nats.errors

import natsrpc
from natsrpc import auth, bench, logs, protocol, registry
from natsrpc.connection import DEFAULT_URL, connect
from natsrpc.errors import CallError, ConfigurationError, ConnectionLost, NoResponders, RemoteError
from natsrpc.proxy import CallOptions


def parser() -> argparse.ArgumentParser:
    """Returns the command-line parser of ``python -m natsrpc``."""
    p = argparse.ArgumentParser(prog="python -m natsrpc", description="Call and inspect natsrpc services.")
    p.add_argument("--version", action="version", version=f"natsrpc {natsrpc.__version__}")
    _add_global_options(p)
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    call = commands.add_parser(
        "call",
        help="call one method and print its JSON reply (a stream's items one per line)",
        description="Call SERVICE.METHOD with JSON arguments (an object of named or an array of positional ones). "
        "A streaming endpoint's items are printed one JSON value per line, as they arrive.",
        epilog='example: python -m natsrpc call kv.put \'{"key":"a","value":"1"}\'',
    )
    call.add_argument("target", metavar="SERVICE.METHOD")
    call.add_argument("arguments", nargs="?", default="", metavar="JSON", help="arguments as JSON (default: none)")
    call.add_argument("--timeout", type=float, default=5.0, help="seconds (default %(default)s)")
    call.add_argument("-H", "--header", action="append", default=[], metavar="NAME:VALUE", help="extra request header")
    call.add_argument(
        "--json",
        action="store_true",
        help='print a failure as {"error": {"code", "type", "message", "data"}} on stdout (a reply is JSON anyway)',
    )
    emit = commands.add_parser(
        "emit",
        help="publish one event (its JSON payload) to every service handling its type",
        description="Publish an event on evt.TYPE: each service with an @event handler of it gets it.",
        epilog='example: python -m natsrpc emit order.created \'{"id":"1"}\'',
    )
    emit.add_argument("event_type", metavar="TYPE")
    emit.add_argument("payload", metavar="JSON", help="the payload as JSON")
    for name, help_text, service_arg in (
        ("ls", "list live services, versions, instances, endpoints and events handled", None),
        ("info", "show one service's instances and endpoints", "SERVICE"),
        ("stats", "show per-endpoint requests, errors, average and p50/p90/p99 latency", "SERVICE"),
        ("ping", "show the round trip to each instance", "SERVICE?"),
    ):
        sp = commands.add_parser(name, help=help_text, description=help_text.capitalize() + " (NATS Service API).")
        if service_arg == "SERVICE":
            sp.add_argument("service", metavar="SERVICE")
        elif service_arg == "SERVICE?":
            sp.add_argument("service", metavar="SERVICE", nargs="?", default="")
        sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
        sp.add_argument("--wait", type=float, default=0.5, help="seconds to collect replies (default %(default)s)")
    bench.add_parser(commands)
    for sub in commands.choices.values():  # the global options work after the command too
        _add_global_options(sub, repeated=True)
    return p


def _add_global_options(p: argparse.ArgumentParser, repeated: bool = False) -> None:
    """Adds --url, the security flags and the logging flags; ``repeated`` for a subcommand's copy (no defaults)."""
    p.add_argument(
        "--url",
        default=argparse.SUPPRESS if repeated else os.environ.get("NATS_URL", DEFAULT_URL),
        help=f"NATS server URL(s), comma-separated (env NATS_URL; default {DEFAULT_URL})",
    )
    auth.add_arguments(p, repeated=repeated)
    logs.add_arguments(p, default_level="error", repeated=repeated)


async def _emit(args: argparse.Namespace) -> int:
    """``emit TYPE JSON``: publishes the event and flushes it to the server; exit 0, or 2 for bad input."""
    if not protocol.valid_event_type(args.event_type):
        print(f"error: {args.event_type!r} is not an event type (dot-separated name tokens)", file=sys.stderr)
        return 2
    try:
        payload = msgspec.json.decode(args.payload.encode())
    except msgspec.DecodeError as exc:
        print(f"error: the payload is not valid JSON: {exc}", file=sys.stderr)
        return 2
    try:
        async with connect(args.url, name="natsrpc-cli", **auth.from_args(args)) as client:
            await client.emit(args.event_type, payload)
            await client.nc.flush()
    except CallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


async def _call(args: argparse.Namespace) -> int:
    service, _, method = args.target.partition(".")
    if not (protocol.valid_name(service) and protocol.valid_name(method)):
        print(f"error: {args.target!r} is not SERVICE.METHOD", file=sys.stderr)
        return 2
    body = args.arguments.encode()
    if body.strip():
        try:
            msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            print(f"error: the arguments are not valid JSON: {exc}", file=sys.stderr)
            return 2
    headers = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            print(f"error: header {item!r} is not NAME:VALUE", file=sys.stderr)
            return 2
        headers[name.strip()] = value.strip()
    if args.timeout <= 0:
        print("error: --timeout must be positive", file=sys.stderr)
        return 2
    try:
        async with connect(args.url, name="natsrpc-cli", **auth.from_args(args)) as client:
            options = CallOptions(timeout=args.timeout, headers=headers or None)
            subject = protocol.endpoint_subject(service, method, client.prefix)
            # Asked as a stream: a streaming endpoint's items come one JSON line each, and a unary
            # endpoint's reply as the only item.
            try:
                async for item in client.stream_request(subject, body, options):
                    print(item.decode(errors="replace") if item else "null", flush=True)
            except NoResponders:
                missing = await _missing_method(client.nc, service, method)
                if missing is None:
                    raise
                return _failed(args.json, protocol.NOT_FOUND, "NotFound", missing, None)
    except RemoteError as exc:
        return _failed(args.json, exc.code, exc.type, exc.message, exc.data)
    except (CallError, ConnectionLost) as exc:
        return _failed(args.json, None, type(exc).__name__, str(exc), None)
    return 0


async def _missing_method(nc: Any, service: str, method: str) -> str | None:
    """Tells a method that does not exist from a service that is not running, when nothing answered
    a call: asks the service's instances for their endpoints ($SRV.INFO). Returns what to say when
    they run without ``method``; None when none answers (the service is not running) or one has it."""
    try:
        infos = await registry.survey(nc, "INFO", service, wait=2.0, quiet=0.1)
    except (ConfigurationError, nats.errors.Error, OSError):
        return None
    methods = sorted({endpoint["name"] for info, _ in infos for endpoint in info["endpoints"]})
    if not infos or method in methods:
        return None
    shown_methods = ", ".join(methods[:_SHOWN_METHODS]) + (", ..." if len(methods) > _SHOWN_METHODS else "")
    return f"{service} has no method {method!r} (it has: {shown_methods}; {len(infos)} instance(s) answered)"


_SHOWN_METHODS = 30  # an error line names at most this many of a service's methods


def _failed(as_json: bool, code: int | None, type_: str, message: str, data: Any) -> int:
    """Prints a failed call: as the JSON error object on stdout, or as text on stderr; returns 1.

    The text is ``error <code> <type>: <message>`` (no code when no reply came), then
    ``data: <JSON>`` when the service sent data with its error (``ServiceError(409, "...", data)``).
    """
    if as_json:
        print(msgspec.json.encode({"error": {"code": code, "type": type_, "message": message, "data": data}}).decode())
        return 1
    print(f"error {'' if code is None else f'{code} '}{shown(type_)}: {shown(message)}", file=sys.stderr)
    if data is not None:
        print(f"data: {msgspec.json.encode(data).decode()}", file=sys.stderr)
    return 1


def shown(text: object) -> str:
    """``text`` as it may reach a terminal: a character that is not printable (an escape sequence's
    ESC, a line break) as its ``\\x..`` escape, so a peer's reply cannot move the cursor, recolour
    or retitle the terminal, or forge lines of the output."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def table(rows: list[list[str]], header: list[str]) -> str:
    """Returns ``rows`` as an aligned text table under ``header`` (each cell :func:`shown`)."""
    rows = [[shown(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def _inspect(args: argparse.Namespace) -> int:
    verb = {"ls": "INFO", "info": "INFO", "stats": "STATS", "ping": "PING"}[args.command]
    service = getattr(args, "service", "")
    if service and not protocol.valid_name(service):
        print(f"error: {service!r} is not a service name", file=sys.stderr)
        return 2
    try:
        async with connect(args.url, name="natsrpc-cli", **auth.from_args(args)) as client:
            replies = await registry.survey(client.nc, verb, service, args.wait)
    except CallError as exc:
        print(f"error {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    replies.sort(key=lambda r: (r[0].get("name", ""), r[0].get("id", "")))
    if args.json:
        out = [dict(reply, rtt_ms=round(rtt * 1e3, 3)) if verb == "PING" else reply for reply, rtt in replies]
        print(msgspec.json.encode(out).decode())
    elif not replies:
        print(f"no instances{' of ' + service if service else ''} answered", file=sys.stderr)
    else:
        print(_render(args.command, replies))
    return 0 if replies or not service else 1


def _render(command: str, replies: list[tuple[dict[str, Any], float]]) -> str:
    if command == "ls":
        grouped: dict[str, list[dict[str, Any]]] = {}
        for reply, _ in replies:
            grouped.setdefault(reply["name"], []).append(reply)
        rows = [
            [
                name,
                ",".join(sorted({i["version"] for i in items})),
                str(len(items)),
                " ".join(sorted({e["name"] for i in items for e in i["endpoints"]})),
                " ".join(sorted({t for i in items for t in str(i["metadata"].get("events", "")).split(",") if t}))
                or "-",
            ]
            for name, items in sorted(grouped.items())
        ]
        return table(rows, ["SERVICE", "VERSION", "INSTANCES", "ENDPOINTS", "EVENTS"])
    if command == "info":
        rows = [
            [r["name"], r["id"], r["version"], e["name"], e["subject"], e.get("queue_group", "")]
            for r, _ in replies
            for e in r["endpoints"] or [{"name": "-", "subject": "-"}]  # an instance without endpoints shows too
        ]
        return table(rows, ["SERVICE", "INSTANCE", "VERSION", "ENDPOINT", "SUBJECT", "QUEUE"])
    if command == "stats":
        rows = [
            [
                r["id"],
                e["name"],
                str(e["num_requests"]),
                str(e["num_errors"]),
                f"{e['average_processing_time'] / 1e6:.3f}",
                *_percentiles_ms(e),
                e["last_error"],
            ]
            for r, _ in replies
            for e in r["endpoints"]
        ]
        headings = ["INSTANCE", "ENDPOINT", "REQUESTS", "ERRORS", "AVG MS", "P50 MS", "P90 MS", "P99 MS", "LAST ERROR"]
        return table(rows, headings)
    rows = [[r["name"], r["id"], r["version"], f"{rtt * 1e3:.2f}"] for r, rtt in replies]
    return table(rows, ["SERVICE", "INSTANCE", "VERSION", "RTT MS"])


def _percentiles_ms(endpoint: dict[str, Any]) -> list[str]:
    """An endpoint's p50, p90 and p99 from its STATS ``data`` in milliseconds ("-" from a service without them)."""
    data = endpoint.get("data")
    data = data if isinstance(data, dict) else {}
    cells = []
    for name, _ in protocol.STATS_PERCENTILES:
        value = data.get(name)
        cells.append(f"{value / 1e6:.3f}" if isinstance(value, int) and not isinstance(value, bool) else "-")
    return cells


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m natsrpc``; returns the process exit code."""
    args = parser().parse_args(argv)
    logs.configure(args.log_format, args.log_level)
    try:
        if args.command == "bench":
            return bench.run(args)
        if args.command == "call":
            return asyncio.run(_call(args))
        if args.command == "emit":
            return asyncio.run(_emit(args))
        return asyncio.run(_inspect(args))
    except ConfigurationError as exc:  # e.g. a credentials or TLS file that does not exist
        print(f"error: {exc}", file=sys.stderr)
        return 2
