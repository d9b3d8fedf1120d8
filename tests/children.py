"""Test helpers shared by the test modules: child processes of the repository, polling, and a
probe that tells whether code handed the event loop control.

Imported by bare name (``from children import ...``), as pytest puts ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 15.0
EXIT_TIMEOUT = 15.0


def child_env() -> dict[str, str]:
    """The environment of child processes: this one without NATS and natsrpc settings."""
    drop = ("NATS_URL", "PYTHONPATH", "NATSRPC_LOG_FORMAT", "NATSRPC_LOG_LEVEL", "NATSRPC_HEARTBEAT_INTERVAL")
    return {k: v for k, v in os.environ.items() if k not in drop}


async def poll(condition: Callable[[], bool], what: str = "the condition", limit: float = 5.0) -> float:
    """Waits until ``condition()`` holds (failing the test after ``limit`` s); returns the seconds it took.

    For states fed by other connections or processes, or by counters with no event to wait on.
    """
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > limit:
            pytest.fail(f"{what}: not true after {limit} s")
        await asyncio.sleep(0.001)
    return time.monotonic() - start


@contextmanager
def loop_probe() -> Iterator[list[bool]]:
    """Schedules a callback as the block starts: the list it gives is not empty afterwards if the
    block handed the event loop control. What "at once" means for a call refused or failed
    before anything is sent (it never yields), without a bound on wall time that the OS or the
    garbage collector could break."""
    ran: list[bool] = []
    handle = asyncio.get_running_loop().call_soon(ran.append, True)
    try:
        yield ran
    finally:
        handle.cancel()


class Child:
    """A child process whose stderr is collected line by line while it runs."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    @property
    def stderr(self) -> str:
        """What the child wrote to stderr so far."""
        return "\n".join(self.lines)

    async def wait_for_line(self, pattern: re.Pattern[str]) -> re.Match[str]:
        """Returns the first stderr match of ``pattern``, polling for up to STARTUP_TIMEOUT seconds."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            for line in self.lines:
                if match := pattern.search(line):
                    return match
            if self.proc.returncode is not None or time.monotonic() > deadline:
                pytest.fail(f"no stderr line matches {pattern.pattern!r}; stderr:\n{self.stderr}")
            await asyncio.sleep(0.01)

    async def wait(self) -> int:
        """Waits (up to EXIT_TIMEOUT seconds) for the child to exit and its stderr to be read; returns the exit code."""
        code = await asyncio.wait_for(self.proc.wait(), EXIT_TIMEOUT)
        await self._reader
        return code

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Sends ``sig`` (default SIGTERM: graceful drain) if it still runs, and returns the exit code."""
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await self.wait()


@asynccontextmanager
async def child(*args: str, new_session: bool = False, env: dict[str, str] | None = None) -> AsyncIterator[Child]:
    """Runs ``python *args`` from the repository root; stops it on the way out if it still runs.

    SIGTERM first, so a runner drains and stops its embedded nats-server. With ``new_session`` the
    child leads a process group of its own, as a command run from a terminal does, so a test can
    signal the whole group (``os.killpg(child.proc.pid, ...)``), as a terminal's Ctrl-C does.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=REPO,
        env={**child_env(), **(env or {})},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=new_session,
    )
    running = Child(proc)
    try:
        yield running
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), EXIT_TIMEOUT)
            except TimeoutError:
                proc.kill()
        await running.wait()
