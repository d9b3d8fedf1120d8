"""natsrpc.logs: a library configures no logging; the runner and the CLI do (issue 11, item 4)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import structlog
from children import REPO, child_env
from structlog.testing import capture_logs

from natsrpc import logs

SCRIPT = """
import asyncio
import natsrpc
from natsrpc import NatsServer
from services.vdb import VDB  # kv would warn that this server has no JetStream

async def main():
    with NatsServer() as server:
        async with natsrpc.connect(server.url) as client, natsrpc.Host(client, [VDB()]):
            await client.call_service["vdb"].upsert("a", [1.0, 0.0])
            assert await client.call_service["vdb"].count() == 1
{after}

asyncio.run(main())
"""


def run_script(after: str = "") -> subprocess.CompletedProcess[str]:
    """Runs a client-and-host script in a fresh interpreter that configured no logging."""
    code = SCRIPT.format(after=textwrap.indent(textwrap.dedent(after), " " * 12))
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=60, check=False
    )


class TestALibraryConfiguresNoLogging:
    """Using the client and Host in a script prints nothing unless the application set logging up."""

    def test_a_script_prints_nothing(self) -> None:
        """Connect, host, call and close: stdout and stderr stay empty (no debug lines at exit)."""
        result = run_script()
        assert result.returncode == 0, result.stderr
        assert (result.stdout, result.stderr) == ("", "")

    def test_warnings_go_to_standard_logging_on_stderr(self) -> None:
        """A warning (the server gone) reaches stderr through standard logging, plain text; stdout stays empty."""
        result = run_script(
            """
            server.kill()  # the connection breaks under the client
            await asyncio.sleep(0.5)
            """
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == ""
        assert "nats disconnected" in result.stderr
        assert "\x1b[" not in result.stderr  # no colours: not structlog's default console renderer
        assert "[debug" not in result.stderr


class TestLibraryLogger:
    """LibraryLogger logs through structlog once it is configured, else through standard logging."""

    def test_structlog_when_configured(self) -> None:
        """With structlog configured (as the runner does), fields arrive as structlog key-values."""
        with capture_logs() as captured:
            logs.get_logger("natsrpc.test").bind(service="kv").warning("hello", n=1)
        assert captured == [{"event": "hello", "service": "kv", "n": 1, "log_level": "warning"}]

    def test_standard_logging_when_not(self, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
        """Unconfigured, a line goes to the stdlib logger of its module, at its level, fields appended."""
        monkeypatch.setattr(structlog, "is_configured", lambda: False)
        with caplog.at_level(logging.WARNING, logger="natsrpc.test"):
            log = logs.get_logger("natsrpc.test").bind(service="kv")
            log.debug("hidden")
            log.warning("shown", n=1)
        assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
            ("natsrpc.test", logging.WARNING, "shown service='kv' n=1")
        ]


class TestRunnerAndCliLogging:
    """The runner and the CLI configure logging themselves, with documented flags."""

    @pytest.mark.parametrize("module", ["natsrpc.run", "natsrpc"], ids=["runner", "cli"])
    def test_help_documents_the_flags_and_their_variables(self, module: str) -> None:
        """--help names --log-level and --log-format with their environment variables and choices."""
        result = subprocess.run(
            [sys.executable, "-m", module, "--help"], cwd=REPO, env=child_env(), capture_output=True, text=True,
            timeout=30, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        text = " ".join(result.stdout.split())
        for expected in (
            "--log-level",
            "NATSRPC_LOG_LEVEL",
            "--log-format",
            "NATSRPC_LOG_FORMAT",
            "debug,info,warning",
        ):
            assert expected in text, expected

    def test_a_bad_level_is_refused(self) -> None:
        """--log-level loud exits 2 with argparse's one line naming the choices."""
        result = subprocess.run(
            [sys.executable, "-m", "natsrpc.run", "services.kv", "--log-level", "loud"], cwd=REPO, env=child_env(),
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert result.returncode == 2
        assert "invalid choice: 'loud'" in result.stderr

    def test_json_when_stderr_is_not_a_terminal(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without NATSRPC_LOG_FORMAT the format is console on a terminal and JSON otherwise."""
        monkeypatch.delenv("NATSRPC_LOG_FORMAT", raising=False)
        monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
        assert logs.default_format() == "json"
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
        assert logs.default_format() == "console"
        monkeypatch.setenv("NATSRPC_LOG_FORMAT", "json")
        assert logs.default_format() == "json"
