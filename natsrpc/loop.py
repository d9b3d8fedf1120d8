"""Choosing the event loop: uvloop when installed (``natsrpc[speed]``), else asyncio's own."""

from __future__ import annotations

import asyncio
import importlib.util


def uvloop_available() -> bool:
    """Whether uvloop can be imported."""
    return importlib.util.find_spec("uvloop") is not None


def runner(use_uvloop: bool | None = None) -> asyncio.Runner:
    """Returns an asyncio runner on uvloop when asked, or by default when it is installed.

    Args:
        use_uvloop: True to require uvloop, False for asyncio's loop, None to use uvloop if present.
    """
    if use_uvloop is None:
        use_uvloop = uvloop_available()
    if use_uvloop:
        import uvloop  # optional: natsrpc[speed]

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()
