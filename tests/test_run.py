"""Tests of ``python -m natsrpc.run``, each in a real subprocess: loading, serving, embedded server, stopping."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from children import EXIT_TIMEOUT, REPO, STARTUP_TIMEOUT, Child, child, child_env, poll
from nats.aio.msg import Msg

import natsrpc
from natsrpc.embedded import is_listening

EMBEDDED_LINE = re.compile(r"started an embedded nats-server at (nats://\S+)")
SECOND_RUNNER_LINE = re.compile(
    r"using the nats-server at nats://127\.0\.0\.1:4222 \(started by another runner, pid (\d+)\)"
)


async def run_cli(*args: str) -> tuple[int, str, str]:
    """Runs ``python -m natsrpc *args`` to completion; returns exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "natsrpc",
        *args,
        cwd=REPO,
        env=child_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), EXIT_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def until_served(runner: Child, call: Callable[[], Awaitable[Any]]) -> Any:
    """Retries ``call`` while it raises NoResponders (the runner is still starting); returns its result.

    Make ``call`` on a client without a circuit breaker (the ``probe`` fixture): the failures while
    the runner starts would otherwise open the circuit of the service under test.
    """
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        try:
            return await call()
        except natsrpc.NoResponders:
            if runner.proc.returncode is not None or time.monotonic() > deadline:
                pytest.fail(f"the service never answered; runner stderr:\n{runner.stderr}")
        await asyncio.sleep(0.02)


async def connect_when_up(url: str, runner: Child) -> natsrpc.Client:
    """Connects to ``url`` (no circuit breaker), retrying while the runner's embedded server comes up."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        try:
            return await natsrpc.connect(url, circuit=None)
        except natsrpc.ConnectionLost:
            if runner.proc.returncode is not None or time.monotonic() > deadline:
                pytest.fail(f"cannot connect to {url}; runner stderr:\n{runner.stderr}")


@pytest_asyncio.fixture
async def probe(nats_url: str) -> AsyncIterator[natsrpc.Client]:
    """A client of the session server without a circuit breaker, for readiness polls."""
    async with natsrpc.connect(nats_url, circuit=None) as client:
        yield client


class TestGracefulStop:
    """SIGTERM drains: every call in flight is answered and the runner exits 0."""

    async def test_sigterm_with_200_calls_in_flight_loses_none(
        self, client: natsrpc.Client, probe: natsrpc.Client, nats_url: str
    ) -> None:
        """All 200 calls running when SIGTERM arrives succeed, and the exit code is 0."""
        started: list[int] = []
        all_started = asyncio.Event()

        async def on_started(msg: Msg) -> None:
            started.append(int(msg.data))
            if len(started) == 200:
                all_started.set()

        sub = await client.nc.subscribe("test.started", cb=on_started)
        try:
            async with child(
                "-m", "natsrpc.run", "tests.slow_service", "--url", nats_url, "--max-concurrency", "200"
            ) as runner:
                assert await until_served(runner, probe.call_service["slowrun"].ping) == "pong"
                calls = [client.call_service_async["slowrun"].options(timeout=10).work(i) for i in range(200)]
                await asyncio.wait_for(all_started.wait(), 10)
                runner.proc.send_signal(signal.SIGTERM)
                results = await asyncio.gather(*calls, return_exceptions=True)
                code = await runner.wait()
        finally:
            await sub.unsubscribe()
        assert results == list(range(200)), runner.stderr
        assert sorted(started) == list(range(200))
        assert code == 0, runner.stderr


def _host_port(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("nats://").rpartition(":")
    return host, int(port)


class TestCtrlC:
    """A terminal's Ctrl-C (SIGINT to the whole process group) drains; a second one exits at once.

    The runner is started in a process group of its own, as a shell starts a command, and the
    signal goes to that whole group, as a terminal sends it. The embedded server runs in a session
    of its own, so the signal does not reach it: the runner stops it after draining.
    """

    async def _start_call(self, runner: Child, seconds: float) -> tuple[natsrpc.Client, str, asyncio.Future[int]]:
        """Starts ``slowrun.work(7, seconds)`` on the runner's embedded server; returns once it runs."""
        url = (await runner.wait_for_line(EMBEDDED_LINE)).group(1)
        local = await connect_when_up(url, runner)
        started = asyncio.Event()

        async def on_started(_msg: Msg) -> None:
            started.set()

        await local.nc.subscribe("test.started", cb=on_started)
        assert await until_served(runner, local.call_service["slowrun"].ping) == "pong"
        call = asyncio.ensure_future(local.call_service["slowrun"].options(timeout=20).work(7, seconds))
        await asyncio.wait_for(started.wait(), 10)
        return local, url, call

    async def test_sigint_to_the_group_drains_the_call_in_flight_and_exits_0(self) -> None:
        """The call in flight succeeds, the count is logged each second, then server and runner stop."""
        async with child("-m", "natsrpc.run", "tests.slow_service", "--embedded", new_session=True) as runner:
            local, url, call = await self._start_call(runner, seconds=1.4)
            try:
                os.killpg(runner.proc.pid, signal.SIGINT)
                assert await asyncio.wait_for(call, 10) == 7
                assert await runner.wait() == 0, runner.stderr
            finally:
                await local.close()
        events = [json.loads(line) for line in runner.lines if line.startswith("{")]
        stopping = [e for e in events if e["event"].startswith("stopping")]
        assert [e["in_flight"] for e in stopping] == [1], runner.stderr
        assert [e["in_flight"] for e in events if e["event"] == "draining"] == [1], runner.stderr
        assert "Error" not in runner.stderr  # no ConnectionRefusedError / FlushTimeoutError storm
        assert not is_listening(*_host_port(url))

    async def test_a_second_sigint_exits_at_once_with_130(self) -> None:
        """During the drain, a second Ctrl-C ends the runner at once, and its embedded server with it."""
        async with child("-m", "natsrpc.run", "tests.slow_service", "--embedded", new_session=True) as runner:
            local, url, call = await self._start_call(runner, seconds=30)
            try:
                os.killpg(runner.proc.pid, signal.SIGINT)
                await runner.wait_for_line(re.compile("stopping: draining"))
                os.killpg(runner.proc.pid, signal.SIGINT)
                assert await asyncio.wait_for(runner.proc.wait(), 2) == 130, runner.stderr
                call.cancel()
            finally:
                await local.close()
        assert "second signal: exiting at once, 1 calls unanswered" in runner.stderr
        await poll(lambda: not is_listening(*_host_port(url)), "the embedded server stops with the runner")

    async def test_a_sigkilled_runner_takes_its_embedded_server_down(self, tmp_path: Path) -> None:
        """The embedded server exits when the pipe from its runner closes, so it never outlives a
        SIGKILL, and its log and scratch JetStream store go with it (the runner's own clean-up
        never ran)."""
        scratch = tmp_path / "tmp"
        scratch.mkdir()
        env = {"TMPDIR": str(scratch)}
        async with child("-m", "natsrpc.run", "services.kv", "--embedded", new_session=True, env=env) as runner:
            url = (await runner.wait_for_line(EMBEDDED_LINE)).group(1)
            local = await connect_when_up(url, runner)
            await local.close()
            made = sorted(path.name.split("-")[0:2][-1] for path in scratch.iterdir())
            assert made == ["jetstream", "server"], made  # natsrpc-jetstream-*, nats-server-*.log
            runner.proc.kill()
            await runner.wait()
        await poll(lambda: not is_listening(*_host_port(url)), "the embedded server exits after its runner", 10)
        await poll(lambda: not any(scratch.iterdir()), "the log and the scratch store removed", 10)


class TestEmbeddedServer:
    """With no server running, the runner starts an embedded one on 127.0.0.1:4222 and stops it on exit."""

    async def test_no_server_starts_an_embedded_one_on_4222(self) -> None:
        """`natsrpc.run services.kv` with nothing on 4222 serves the CLI's calls there, then frees the port."""
        if is_listening("127.0.0.1", 4222):
            pytest.skip("127.0.0.1:4222 is busy, so the runner would use that server instead of an embedded one")
        async with child("-m", "natsrpc.run", "services.kv") as runner:
            match = await runner.wait_for_line(EMBEDDED_LINE)
            assert match.group(1) == "nats://127.0.0.1:4222"
            local = await connect_when_up("nats://127.0.0.1:4222", runner)
            try:
                await until_served(runner, local.call_service["kv"].keys)
            finally:
                await local.close()
            assert await run_cli("call", "kv.put", '{"key":"a","value":"1"}') == (0, "null\n", "")
            code, out, err = await run_cli("call", "kv.get", '{"key":"a"}')
            assert (code, json.loads(out)) == (0, "1"), err
            assert await runner.stop(signal.SIGINT) == 0, runner.stderr
        assert not is_listening("127.0.0.1", 4222)

    async def test_a_second_runner_says_whose_server_it_uses(self) -> None:
        """A runner that finds another runner's embedded server on 4222 says so, naming that runner's pid."""
        if is_listening("127.0.0.1", 4222):
            pytest.skip("127.0.0.1:4222 is busy")
        async with child("-m", "natsrpc.run", "services.kv") as first:
            await first.wait_for_line(EMBEDDED_LINE)
            await connect_when_up("nats://127.0.0.1:4222", first)
            async with child("-m", "natsrpc.run", "services.vdb") as second:
                line = re.compile(
                    r"using the nats-server at nats://127\.0\.0\.1:4222 \(started by another runner, pid (\d+)\)"
                )
                match = await second.wait_for_line(line)
                assert int(match.group(1)) == first.proc.pid
                assert await second.stop(signal.SIGTERM) == 0, second.stderr
            assert await first.stop(signal.SIGTERM) == 0, first.stderr

    async def test_embedded_flag_forces_an_embedded_server(self, probe: natsrpc.Client, nats_url: str) -> None:
        """--embedded starts its own server even when --url names a running one."""
        async with child("-m", "natsrpc.run", "services.kv", "--embedded", "--url", nats_url) as runner:
            url = (await runner.wait_for_line(EMBEDDED_LINE)).group(1)
            assert url != nats_url
            local = await connect_when_up(url, runner)
            try:
                assert await until_served(runner, local.call_service["kv"].keys) == []
            finally:
                await local.close()
            with pytest.raises(natsrpc.NoResponders):
                await probe.call_service["kv"].keys()
            assert await runner.stop(signal.SIGTERM) == 0, runner.stderr
        assert not is_listening(*_host_port(url))


class TestOptions:
    """Module selection and log format options."""

    async def test_log_format_json_writes_json_lines(self, probe: natsrpc.Client, nats_url: str) -> None:
        """--log-format json makes every stderr line a JSON object, including the lifecycle events."""
        async with child("-m", "natsrpc.run", "services.kv", "--url", nats_url, "--log-format", "json") as runner:
            await until_served(runner, probe.call_service["kv"].keys)
            assert await runner.stop(signal.SIGTERM) == 0, runner.stderr
        records = [json.loads(line) for line in runner.lines if line.strip()]
        assert all(isinstance(r, dict) for r in records)
        events = {r["event"] for r in records}
        assert {"serving", "ready", "stopped"} <= events, events
        serving = next(r for r in records if r["event"] == "serving")
        assert serving["service"] == "kv"
        assert serving["level"] == "info"

    async def test_module_colon_class_selects_one_class(self, probe: natsrpc.Client, nats_url: str) -> None:
        """`module:Class` hosts that class only, not the module's other services."""
        async with child("-m", "natsrpc.run", "tests.slow_service:Other", "--url", nats_url) as runner:
            assert await until_served(runner, probe.call_service["slowother"].ping) == "other"
            with pytest.raises(natsrpc.NoResponders):
                await probe.call_service["slowrun"].ping()
            assert await runner.stop(signal.SIGTERM) == 0, runner.stderr

    @pytest.mark.parametrize(
        ("spec", "message"),
        [
            ("no_such_module_for_natsrpc", "cannot import 'no_such_module_for_natsrpc'"),
            ("tests.slow_service:Missing", "'Missing' is not a Service class"),
        ],
        ids=["unknown-module", "unknown-class"],
    )
    async def test_bad_module_exits_nonzero_with_a_clear_message(self, nats_url: str, spec: str, message: str) -> None:
        """A module or class that cannot be loaded ends the runner with an error naming it."""
        async with child("-m", "natsrpc.run", spec, "--url", nats_url) as runner:
            code = await runner.wait()
        assert code != 0
        assert message in runner.stderr
        assert "Traceback" not in runner.stderr


CALC = """
from natsrpc import Service, rpc


class Calc(Service):
    name = "pathcalc"

    @rpc
    async def compute(self, x: int) -> int:
        return 2 * x
"""

DOUBLED = """
from natsrpc import Service, rpc


class One(Service):
    name = "dup"

    @rpc
    async def a(self) -> int:
        return 1


class Two(Service):
    name = "dup"

    @rpc
    async def b(self) -> int:
        return 2
"""


class TestOrdinaryMistakes:
    """Ordinary mistakes end the runner with exit 2 and one line, no traceback (issue 11, item 5)."""

    async def test_a_module_given_as_a_path_is_imported_by_path(
        self, probe: natsrpc.Client, nats_url: str, tmp_path: Any
    ) -> None:
        """``python -m natsrpc.run /some/dir/calc.py`` hosts the Service defined in that file."""
        (tmp_path / "calc.py").write_text(CALC)
        async with child("-m", "natsrpc.run", str(tmp_path / "calc.py"), "--url", nats_url) as runner:
            assert await until_served(runner, lambda: probe.call_service["pathcalc"].compute(21)) == 42
            assert await runner.stop(signal.SIGTERM) == 0, runner.stderr

    def test_a_relative_path_is_imported_too(self, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        """``./calc.py`` and ``calc.py`` load the file from the working directory."""
        from natsrpc.run import load_services

        (tmp_path / "calc.py").write_text(CALC)
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "path", list(sys.path))
        assert [c.name for c in load_services(["./calc.py"])] == ["pathcalc"]
        assert [c.name for c in load_services(["calc.py"])] == ["pathcalc"]

    @pytest.mark.parametrize(
        ("case", "message"),
        [
            ("missing-config", "--config {tmp}/nowhere.toml: No such file or directory"),
            (
                "invalid-config",
                "--config {tmp}/bad.toml: not valid TOML: Expected '=' after a key in a key/value pair (at line 2",
            ),
            ("zero-concurrency", "argument --max-concurrency: must be at least 1, got 0"),
            ("nan-drain", "argument --drain-timeout: must be at least 0 seconds, got 'nan'"),
            ("port-too-high", "argument --metrics-port: must be at most 65535, got 99999"),
            ("long-beats", "argument --heartbeat-interval: must be 0.01-3600 seconds, got '3601'"),
            ("http-url", "--url http://127.0.0.1:8222: not a NATS URL; use nats://host:4222"),
            ("no-server", "cannot connect to nats://127.0.0.1:{port}: connection refused"),
            ("doubled-name", "two services named 'dup' in one process (One, Two): names must be unique"),
            ("missing-file", "no such file 'nowhere.py'"),
        ],
        ids=lambda v: v if not v.startswith(("-", "argument", "cannot", "two", "no such")) else "",
    )
    async def test_exit_2_with_one_line(self, nats_url: str, tmp_path: Any, case: str, message: str) -> None:
        """Each mistake exits 2; stderr is the error line (plus a hint for a missing server), no traceback."""
        from natsrpc.embedded import free_port

        port = free_port()
        (tmp_path / "bad.toml").write_text("[kv]\nsize 10\n")
        (tmp_path / "doubled.py").write_text(DOUBLED)
        args = {
            "missing-config": ["services.kv", "--url", nats_url, "--config", f"{tmp_path}/nowhere.toml"],
            "invalid-config": ["services.kv", "--url", nats_url, "--config", f"{tmp_path}/bad.toml"],
            "zero-concurrency": ["services.kv", "--url", nats_url, "--max-concurrency", "0"],
            "nan-drain": ["services.kv", "--url", nats_url, "--drain-timeout", "nan"],
            "port-too-high": ["services.kv", "--url", nats_url, "--metrics-port", "99999"],
            "long-beats": ["services.kv", "--url", nats_url, "--heartbeat-interval", "3601"],
            "http-url": ["services.kv", "--url", "http://127.0.0.1:8222"],
            "no-server": ["services.kv", "--url", f"nats://127.0.0.1:{port}"],
            "doubled-name": [str(tmp_path / "doubled.py"), "--url", nats_url],
            "missing-file": ["nowhere.py", "--url", nats_url],
        }[case]
        async with child("-m", "natsrpc.run", *args) as runner:
            code = await runner.wait()
        lines = runner.stderr.strip().splitlines()
        assert code == 2, runner.stderr
        assert "Traceback" not in runner.stderr
        assert message.format(tmp=tmp_path, port=port) in lines[0]
        if case == "invalid-config":
            assert "(at line 2, column 6)" in lines[0]
        assert len(lines) == (2 if case == "no-server" else 1), lines
