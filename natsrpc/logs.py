"""Logging set-up: structlog rendering to the console or as JSON lines on stderr."""

from __future__ import annotations

import logging
import sys
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
