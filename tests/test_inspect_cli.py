"""Tests of the runner's heartbeat option and of ``python -m natsrpc ls|info|stats|ping`` against a runner.

The CLI commands run as subprocesses, all at once, against one ``python -m natsrpc.run services.kv
services.vdb services.memory`` process on the session's nats-server.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from children import REPO, child_env
from micro_schemas import validate

import natsrpc
from natsrpc import run
from natsrpc.embedded import NatsServer
from natsrpc.protocol import DEFAULT_HEARTBEAT_INTERVAL


class TestRunnerHeartbeatOption:
    """``python -m natsrpc.run --heartbeat-interval`` (env ``NATSRPC_HEARTBEAT_INTERVAL``) sets the beat period."""

    @pytest.mark.parametrize(
        ("env", "argv", "expected"),
        [
            (None, [], DEFAULT_HEARTBEAT_INTERVAL),
            ("0.25", [], 0.25),
            ("0.25", ["--heartbeat-interval", "0.1"], 0.1),
        ],
        ids=["default", "env", "option-over-env"],
    )
    def test_value(self, monkeypatch: pytest.MonkeyPatch, env: str | None, argv: list[str], expected: float) -> None:
        """The option wins over the environment, which wins over the discovery default."""
        if env is None:
            monkeypatch.delenv("NATSRPC_HEARTBEAT_INTERVAL", raising=False)
        else:
            monkeypatch.setenv("NATSRPC_HEARTBEAT_INTERVAL", env)
        assert run.parser().parse_args(["services.kv", *argv]).heartbeat_interval == expected

    @pytest.mark.parametrize("value", ["0", "-1", "soon"])
    def test_rejects_non_positive_or_non_numbers(self, value: str, capsys: pytest.CaptureFixture[str]) -> None:
        """A bad value is a usage error (exit 2) naming the option."""
        with pytest.raises(SystemExit) as exited:
            run.parser().parse_args(["services.kv", "--heartbeat-interval", value])
        assert exited.value.code == 2
        assert "--heartbeat-interval" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# The CLI, against one `python -m natsrpc.run services.kv services.vdb services.memory` process.
# --------------------------------------------------------------------------------------------------

CLI_COMMANDS: dict[str, tuple[str, ...]] = {  # run at once, so keep the list short (each is a Python start-up)
    "ls": ("ls",),
    "ls-json": ("ls", "--json"),
    "info": ("info", "kv"),
    "stats": ("stats", "kv"),
    "ping-json": ("ping", "--json"),
    "ping-kv": ("ping", "kv"),
    "info-unknown": ("info", "nosuchsvc"),
    "stats-unknown": ("stats", "nosuchsvc"),
}


@pytest.fixture(scope="class")
def cli_runs(nats_server: NatsServer) -> Iterator[dict[str, subprocess.CompletedProcess[str]]]:
    """Runs kv, vdb and memory in one runner process, stores one memory, then runs every CLI command at once.

    Class-scoped so the runner's kv does not outlive this class (other tests host their own kv).
    """
    url = nats_server.url
    with tempfile.TemporaryFile() as stderr:
        runner = subprocess.Popen(
            [sys.executable, "-m", "natsrpc.run", "services.kv", "services.vdb", "services.memory", "--url", url],
            cwd=REPO,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            with natsrpc.SyncClient(url, circuit=None) as probe:
                deadline = time.monotonic() + 15
                while True:  # poll until the runner serves all three (memory calls kv and vdb)
                    try:
                        probe.call_service["memory"].remember("the cat sat")
                        break
                    except natsrpc.NoResponders:
                        if runner.poll() is not None or time.monotonic() > deadline:
                            stderr.seek(0)
                            pytest.fail(f"runner never served memory:\n{stderr.read().decode()}")
                        time.sleep(0.02)
            with ThreadPoolExecutor(len(CLI_COMMANDS)) as pool:
                futures = {
                    key: pool.submit(
                        subprocess.run,
                        [sys.executable, "-m", "natsrpc", "--url", url, *args],
                        cwd=REPO,
                        env=child_env(),
                        capture_output=True,
                        text=True,
                        timeout=30,
                        check=False,
                    )
                    for key, args in CLI_COMMANDS.items()
                }
                yield {key: future.result() for key, future in futures.items()}
        finally:
            runner.terminate()
            try:
                runner.wait(15)
            except subprocess.TimeoutExpired:
                runner.kill()
                runner.wait()


def rows(output: str) -> list[list[str]]:
    """Returns the data rows of a CLI table (header and rule dropped), split on whitespace."""
    return [line.split() for line in output.strip().splitlines()[2:]]


class TestCli:
    """``python -m natsrpc ls|info|stats|ping`` show the services a runner hosts."""

    def test_ls_lists_every_service_with_instances(self, cli_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
        """``ls`` shows kv, vdb and memory with version, instance count and endpoints."""
        run = cli_runs["ls"]
        assert run.returncode == 0, run.stderr
        table = {row[0]: row for row in rows(run.stdout)}
        assert {"kv", "vdb", "memory"} <= set(table)
        assert table["kv"][1:3] == ["1.0.0", "1"]
        assert table["kv"][3:] == ["delete", "get", "keys", "put", "-"]  # the last column: events handled
        assert table["vdb"][3:] == ["count", "delete", "scan", "search", "upsert", "-"]
        assert table["memory"][3:] == ["forget", "recall", "recall_stream", "remember", "-"]

    def test_ls_json_parses_and_names_instances(self, cli_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
        """``ls --json`` prints schema-valid INFO replies whose instance ids match ``ping --json``."""
        listed = json.loads(cli_runs["ls-json"].stdout)
        pinged = json.loads(cli_runs["ping-json"].stdout)
        for reply in listed:
            validate("INFO", reply)
        ids = {name: {r["id"] for r in listed if r["name"] == name} for name in ("kv", "vdb", "memory")}
        assert all(len(found) == 1 for found in ids.values()), ids
        for name, found in ids.items():
            assert found <= {r["id"] for r in pinged if r["name"] == name}
        assert all(0 < r["rtt_ms"] < 5000 for r in pinged)

    def test_info_lists_endpoints_with_subjects(self, cli_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
        """``info kv`` has a row per endpoint with its subject and queue group."""
        run = cli_runs["info"]
        assert run.returncode == 0, run.stderr
        table = rows(run.stdout)
        assert sorted(row[3] for row in table) == ["delete", "get", "keys", "put"]
        assert all(row[0] == "kv" and row[4] == f"svc.kv.{row[3]}" and row[5] == "q" for row in table)

    def test_stats_counts_the_calls_made(self, cli_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
        """``stats kv`` shows the put that storing one memory made."""
        run = cli_runs["stats"]
        assert run.returncode == 0, run.stderr
        requests = {row[1]: int(row[2]) for row in rows(run.stdout)}
        assert requests == {"put": 1, "get": 0, "delete": 0, "keys": 0}
        assert {int(row[3]) for row in rows(run.stdout)} == {0}  # no errors
        assert run.stdout.splitlines()[0].split()[4:12] == ["AVG", "MS", "P50", "MS", "P90", "MS", "P99", "MS"]
        put = next(row for row in rows(run.stdout) if row[1] == "put")
        p50, p90, p99 = (float(cell) for cell in put[5:8])  # milliseconds
        assert 0 < p50 <= p90 <= p99

    def test_ping_reaches_every_service(self, cli_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
        """``ping --json`` gets a schema-valid reply with a round-trip time from each of the three services."""
        run = cli_runs["ping-json"]
        assert run.returncode == 0, run.stderr
        replies = json.loads(run.stdout)
        assert {"kv", "vdb", "memory"} <= {r["name"] for r in replies}
        for reply in replies:
            assert 0 < reply.pop("rtt_ms") < 5000
            validate("PING", reply)

    def test_ping_one_service(self, cli_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
        """``ping kv`` lists kv's instance only, with its version and round-trip time."""
        run = cli_runs["ping-kv"]
        assert run.returncode == 0, run.stderr
        table = rows(run.stdout)
        kv_ids = [r["id"] for r in json.loads(cli_runs["ping-json"].stdout) if r["name"] == "kv"]
        assert [row[:3] for row in table] == [["kv", kv_ids[0], "1.0.0"]]
        assert 0 < float(table[0][3]) < 5000

    @pytest.mark.parametrize("key", ["info-unknown", "stats-unknown"])
    def test_unknown_service_says_so(self, cli_runs: dict[str, subprocess.CompletedProcess[str]], key: str) -> None:
        """Asking about a service nobody runs exits 1 with a message naming it."""
        run = cli_runs[key]
        assert run.returncode == 1
        assert run.stdout == ""
        assert "no instances of nosuchsvc answered" in run.stderr
