"""``python -m natsrpc``: call services from the shell.

Exit codes: 0 success, 1 the call failed (the error code and message are printed), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

import msgspec

from natsrpc import logs, protocol
from natsrpc.client import DEFAULT_URL, connect
from natsrpc.errors import CallError, ConnectionLost, RemoteError
from natsrpc.proxy import CallOptions


def parser() -> argparse.ArgumentParser:
    """Returns the command-line parser of ``python -m natsrpc``."""
    p = argparse.ArgumentParser(prog="python -m natsrpc", description="Call and inspect natsrpc services.")
    p.add_argument(
        "--url",
        default=os.environ.get("NATS_URL", DEFAULT_URL),
        help="NATS server URL(s), comma-separated (env NATS_URL; default %(default)s)",
    )
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    call = commands.add_parser(
        "call",
        help="call one method and print its JSON reply",
        description="Call SERVICE.METHOD with JSON arguments (an object of named or an array of positional ones).",
        epilog='example: python -m natsrpc call kv.put \'{"key":"a","value":"1"}\'',
    )
    call.add_argument("target", metavar="SERVICE.METHOD")
    call.add_argument("arguments", nargs="?", default="", metavar="JSON", help="arguments as JSON (default: none)")
    call.add_argument("--timeout", type=float, default=5.0, help="seconds (default %(default)s)")
    call.add_argument("-H", "--header", action="append", default=[], metavar="NAME:VALUE", help="extra request header")
    return p


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
        async with connect(args.url.split(","), name="natsrpc-cli") as client:
            options = CallOptions(timeout=args.timeout, headers=headers or None)
            msg = await client.request(protocol.endpoint_subject(service, method, client.prefix), body, options)
    except RemoteError as exc:
        print(f"error {exc.code} {exc.type}: {exc.message}", file=sys.stderr)
        return 1
    except (CallError, ConnectionLost) as exc:
        print(f"error {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(msg.data.decode(errors="replace") if msg.data else "null")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m natsrpc``; returns the process exit code."""
    args = parser().parse_args(argv)
    logs.configure("console", os.environ.get("NATSRPC_LOG_LEVEL", "error"))
    if args.command == "call":
        return asyncio.run(_call(args))
    return 2  # pragma: no cover - argparse rejects unknown commands
