"""Logging: natsrpc's own loggers, and the set-up the runner and the CLI use.

A library configures no logging. natsrpc's loggers (:func:`get_logger`) log through structlog
when the application configured structlog, and otherwise through standard logging (logger
``natsrpc.<module>``), so a script that configured nothing sees warnings and errors on stderr only,
as Python's logging does by default, and never the debug chatter. :func:`configure` is what the
runner and the CLI call: structlog rendering to the console or as JSON lines, on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import structlog
from structlog.typing import EventDict

from natsrpc.context import active_call


def add_call_context(_logger: Any, _method: str, event: EventDict) -> EventDict:
    """A structlog processor: adds trace_id, service, method and caller of the call being handled.

    It reads natsrpc's call context when a line is logged, so handlers pay nothing per request for
    it; :func:`configure` installs it. Add it to your own structlog processors if you configure
    structlog yourself.
    """
    call = active_call()
    if call is not None:
        event.setdefault("trace_id", call.trace_id)
        event.setdefault("service", call.service)
        event.setdefault("method", call.method)
        event.setdefault("caller", call.caller)
    return event


class LibraryLogger:
    """A natsrpc logger: structlog's when the application configured structlog, else standard logging.

    Offers what natsrpc calls: ``debug``, ``info``, ``warning``, ``error``, ``exception`` (each
    ``(event, **fields)``) and ``bind(**fields)``.
    """

    __slots__ = ("_fields", "_name", "_std")

    def __init__(self, name: str, fields: Mapping[str, Any] | None = None) -> None:
        self._name = name
        self._fields = dict(fields or {})
        self._std = logging.getLogger(name)

    def bind(self, **fields: Any) -> LibraryLogger:
        """Returns a logger that adds ``fields`` to every line."""
        return LibraryLogger(self._name, {**self._fields, **fields})

    def _log(self, level: int, method: str, event: str, fields: dict[str, Any]) -> None:
        if structlog.is_configured():
            getattr(structlog.get_logger(self._name), method)(event, **self._fields, **fields)
            return
        if self._std.isEnabledFor(level):
            shown = " ".join(f"{key}={value!r}" for key, value in {**self._fields, **fields}.items())
            self._std.log(level, f"{event} {shown}" if shown else event, exc_info=method == "exception")

    def debug(self, event: str, **fields: Any) -> None:
        """Logs at DEBUG."""
        self._log(logging.DEBUG, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        """Logs at INFO."""
        self._log(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Logs at WARNING."""
        self._log(logging.WARNING, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        """Logs at ERROR."""
        self._log(logging.ERROR, "error", event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """Logs at ERROR with the exception being handled."""
        self._log(logging.ERROR, "exception", event, fields)


class Ignored:
    """Counts peer input that was ignored (a bad heartbeat, invalidation or trace header) and logs
    a warning for the 1st, 2nd, 4th, 8th... of it, so a flood logs little; text fields are cut to
    200 characters.

    Attributes:
        count: how many were ignored.
    """

    __slots__ = ("_log", "count")

    def __init__(self, logger: LibraryLogger) -> None:
        self._log = logger
        self.count = 0

    def __call__(self, event: str, **fields: Any) -> None:
        """Counts one, and logs ``event`` with ``fields`` if its number is a power of two."""
        self.count += 1
        if self.count & (self.count - 1) == 0:
            cut = {key: value[:200] if isinstance(value, str) else value for key, value in fields.items()}
            self._log.warning(event, **cut, ignored=self.count)


def get_logger(name: str) -> LibraryLogger:
    """Returns natsrpc's logger ``name`` (see :class:`LibraryLogger`)."""
    return LibraryLogger(name)


LEVELS = ("debug", "info", "warning", "error", "critical")


def default_format() -> str:
    """Returns ``NATSRPC_LOG_FORMAT``, else ``console`` when stderr is a terminal and ``json`` when not."""
    return os.environ.get("NATSRPC_LOG_FORMAT") or ("console" if sys.stderr.isatty() else "json")


def add_arguments(parser: argparse.ArgumentParser, default_level: str, *, repeated: bool = False) -> None:
    """Adds ``--log-format`` and ``--log-level`` to ``parser``, defaulting to their environment variables.

    With ``repeated`` (a subcommand's copy) they have no default, so the main parser's value stands.
    """
    env_level = os.environ.get("NATSRPC_LOG_LEVEL", "").lower()
    parser.add_argument(
        "--log-format",
        choices=["console", "json"],
        default=argparse.SUPPRESS if repeated else default_format(),
        help="how log lines look, always on stderr: console for people, json for collectors "
        "(env NATSRPC_LOG_FORMAT; default console on a terminal, json otherwise)",
    )
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LEVELS,
        default=argparse.SUPPRESS if repeated else env_level if env_level in LEVELS else default_level,
        help=f"lowest level logged (env NATSRPC_LOG_LEVEL; default {default_level})",
    )


def configure(log_format: str = "console", level: str = "info") -> None:
    """Configures structlog (and stdlib logging) for a natsrpc process.

    Args:
        log_format: ``"console"`` for people, ``"json"`` for log collectors.
        level: minimum level name (``"debug"``, ``"info"``, ``"warning"``...).
    """
    if log_format not in ("console", "json"):
        raise ValueError(f"log format must be 'console' or 'json', got {log_format!r}")
    numeric = logging.getLevelNamesMapping()[level.upper()]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_call_context,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,  # True would hide later loggers from capture_logs (tests)
    )
    logging.basicConfig(level=numeric, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
