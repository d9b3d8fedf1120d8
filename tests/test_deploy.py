"""Tests of the deployment files: compose.yaml and nats-server.conf agree with each other and with the code.

Docker does not run here, so compose.yaml is loaded as YAML and checked piece by piece; then its
services run in-process with its identities against one node started from nats-server.conf, to
prove the permissions there suffice for what the services do (and the server logs no violation).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest
import yaml

import natsrpc
from natsrpc import NatsServer, auth, cli, run
from natsrpc.host import DEFAULT_DRAIN_TIMEOUT
from natsrpc.service import Service
from natsrpc.testing import serve

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose.yaml"
CONFIG = REPO / "nats-server.conf"
NODES = ("n1", "n2", "n3")
SERVICES = ("kv", "vdb", "memory")
SINGLE_NODE = ["-m", "0", "--cluster_listen", "nats://127.0.0.1:-1"]


def load_compose() -> dict[str, Any]:
    """Returns compose.yaml as data."""
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def config_text() -> str:
    """Returns nats-server.conf without its comments."""
    return "\n".join(line.split("#", 1)[0] for line in CONFIG.read_text().splitlines())


def config_users() -> dict[str, str]:
    """Returns each user of nats-server.conf with the block of config that defines it."""
    text = config_text()
    starts = [(m.start(), m[1]) for m in re.finditer(r"\buser:\s*(\w+)\s*\n", text)]
    return {
        name: text[start : (starts[i + 1][0] if i + 1 < len(starts) else len(text))]
        for i, (start, name) in enumerate(starts)
    }


def config_port(pattern: str) -> int:
    """Returns the port that ``pattern`` (one group) finds in nats-server.conf."""
    match = re.search(pattern, config_text(), re.MULTILINE)
    assert match is not None, pattern
    return int(match[1])


def secret_variables() -> set[str]:
    """Returns the environment variables nats-server.conf reads (``$NAME`` not defined in the file)."""
    text = re.sub(r'"[^"]*"', '""', config_text())  # "$SRV.>" is a subject, not a variable
    defined = set(re.findall(r"^\s*(\w+)\s*:", text, re.MULTILINE))
    return set(re.findall(r"\$([A-Z_][A-Z0-9_]*)", text)) - defined


def compose_variable(value: str) -> str:
    """Returns the variable a compose value like ``${KV_PASS}`` or ``${KV_PASS:?why}`` interpolates."""
    match = re.fullmatch(r"\$\{(\w+)(?::?[?-][^}]*)?\}", value)
    assert match is not None, f"{value!r} is not a ${{VARIABLE}}"
    return match[1]


def flag(command: list[str], name: str) -> str:
    """Returns the value after ``name`` in a command list."""
    assert name in command, (name, command)
    return command[command.index(name) + 1]


class TestComposeFile:
    """compose.yaml holds together: files, modules, names, users, ports and URLs agree."""

    def test_services(self) -> None:
        """Three NATS nodes and the three example services, nothing else."""
        assert set(load_compose()["services"]) == {*NODES, *SERVICES}

    def test_referenced_files_exist(self) -> None:
        """Mounted files and everything the inline Dockerfile copies exist in the repository."""
        services = load_compose()["services"]
        for name in NODES:
            for volume in services[name]["volumes"]:
                source = volume.split(":")[0]
                assert (REPO / source).is_file(), source
        for name in SERVICES:
            build = services[name]["build"]
            assert (REPO / build["context"]).is_dir()
            for line in build["dockerfile_inline"].splitlines():
                if line.startswith("COPY"):
                    for source in line.split()[1:-1]:
                        assert (REPO / source).exists(), source

    @pytest.mark.parametrize("name", SERVICES)
    def test_service_command_runs_that_service(self, name: str) -> None:
        """The runner's arguments parse, the module imports, and it holds the Service of the same name."""
        command = load_compose()["services"][name]["command"]
        assert command[:3] == ["python", "-m", "natsrpc.run"]
        args = run.parser().parse_args(command[3:])
        classes: list[type[Service]] = run.load_services(args.services)
        assert [cls.name for cls in classes] == [name]

    @pytest.mark.parametrize("name", SERVICES)
    def test_service_urls_reach_every_node(self, name: str) -> None:
        """--url lists every node at the client port of nats-server.conf."""
        command = load_compose()["services"][name]["command"]
        urls = [urlsplit(url) for url in auth.split_servers(flag(command, "--url"))]
        assert sorted(url.hostname or "" for url in urls) == list(NODES)
        assert {url.port for url in urls} == {config_port(r"^port:\s*(\d+)")}
        assert {url.scheme for url in urls} == {"nats"}

    @pytest.mark.parametrize("name", SERVICES)
    def test_service_identity(self, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """Each service connects as its own user of nats-server.conf, with that user's password and inbox."""
        environment = load_compose()["services"][name]["environment"]
        users = config_users()
        user = environment["NATS_USER"]
        assert user == name
        assert user in users
        password_variable = compose_variable(environment["NATS_PASSWORD"])
        assert re.search(rf"password:\s*\${password_variable}\b", users[user])
        assert f'"{environment["NATS_INBOX_PREFIX"]}.>"' in users[user]  # it may read its own replies
        for key, value in environment.items():
            monkeypatch.setenv(key, value)
        args = run.parser().parse_args(["services.kv"])
        assert auth.from_args(args) == {
            "user": user,
            "password": environment["NATS_PASSWORD"],
            "inbox_prefix": environment["NATS_INBOX_PREFIX"],
        }

    @pytest.mark.parametrize("name", NODES)
    def test_node(self, name: str) -> None:
        """Each node mounts the config it is started with, has its secrets, and routes to the other nodes."""
        node = load_compose()["services"][name]
        command = node["command"]
        config_path = flag(command, "-c")
        assert any(volume.split(":")[:2] == ["./nats-server.conf", config_path] for volume in node["volumes"])
        assert flag(command, "--name") == name
        assert set(node["environment"]) == secret_variables()
        for value in node["environment"].values():
            compose_variable(value)  # interpolated, never a literal secret
        routes = [urlsplit(route) for route in flag(command, "--routes").split(",")]
        assert sorted(route.hostname or "" for route in routes) == sorted(set(NODES) - {name})
        cluster_port = config_port(r"listen:\s*[\d.]+:(\d+)")
        route_user = re.search(r"cluster\s*\{.*?authorization\s*\{\s*user:\s*(\w+)", config_text(), re.DOTALL)
        assert route_user is not None
        for route in routes:
            assert route.scheme == "nats-route"
            assert route.port == cluster_port
            assert route.username == route_user[1]
            assert compose_variable(route.password or "") == "ROUTE_PASS"

    def test_ports(self) -> None:
        """Host ports are distinct and on loopback; each maps to the client port; the health check hits monitoring."""
        services = load_compose()["services"]
        client_port = config_port(r"^port:\s*(\d+)")
        http_port = config_port(r"^http:\s*127\.0\.0\.1:(\d+)")
        published = []
        for name in NODES:
            (mapping,) = services[name]["ports"]
            host, host_port, container_port = mapping.split(":")
            assert host == "127.0.0.1"
            assert int(container_port) == client_port
            published.append(host_port)
            assert f"127.0.0.1:{http_port}/healthz" in " ".join(services[name]["healthcheck"]["test"])
        assert len(set(published)) == len(NODES)

    def test_services_wait_for_the_nodes(self) -> None:
        """Services start once every node is healthy, and get time to drain on stop."""
        services = load_compose()["services"]
        for name in SERVICES:
            assert services[name]["depends_on"] == {node: {"condition": "service_healthy"} for node in NODES}
            grace = int(str(services[name]["stop_grace_period"]).rstrip("s"))
            assert grace > DEFAULT_DRAIN_TIMEOUT


# --------------------------------------------------------------------------------------------------
# The stack, run in-process with compose's identities against nats-server.conf.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def passwords() -> dict[str, str]:
    """A fresh value for each secret nats-server.conf reads."""
    return {variable: "p" + secrets.token_hex(12) for variable in secret_variables()}


@pytest.fixture(scope="module")
def node(passwords: dict[str, str]) -> Iterator[NatsServer]:
    """One node from nats-server.conf, its secrets in its environment."""
    server = NatsServer(config=CONFIG, args=SINGLE_NODE)
    with pytest.MonkeyPatch.context() as patch:
        for variable, value in passwords.items():
            patch.setenv(variable, value)
        server.start()
    try:
        yield server
    finally:
        server.close()


def identity(name: str, passwords: dict[str, str], environment: dict[str, str]) -> dict[str, str]:
    """Returns the connect() security keywords compose gives a service (its environment, interpolated)."""
    return {
        "user": environment["NATS_USER"],
        "password": passwords[compose_variable(environment["NATS_PASSWORD"])],
        "inbox_prefix": environment["NATS_INBOX_PREFIX"],
    }


@contextlib.asynccontextmanager
async def stack(node: NatsServer, passwords: dict[str, str]) -> AsyncIterator[None]:
    """Hosts kv, vdb and memory as compose does: each module's services, each on its own identity."""
    services = load_compose()["services"]
    async with contextlib.AsyncExitStack() as exits:
        for name in SERVICES:
            args = run.parser().parse_args(services[name]["command"][3:])
            security = identity(name, passwords, services[name]["environment"])
            client = await exits.enter_async_context(natsrpc.connect(node.url, **security))
            await exits.enter_async_context(serve(client, *(cls() for cls in run.load_services(args.services))))
        yield


class TestStack:
    """The services, with compose's identities, work under nats-server.conf's permissions."""

    async def test_memory_round_trip_without_violations(self, node: NatsServer, passwords: dict[str, str]) -> None:
        """app calls memory, which calls kv and vdb; discovery works; the server reports no violation."""
        app = {"user": "app", "password": passwords["APP_PASS"], "inbox_prefix": "_INBOX_app"}
        async with stack(node, passwords), natsrpc.connect(node.url, timeout=5.0, **app) as client:
            memory = client.call_service["memory"]
            key = await memory.remember("the cat sat on the mat")
            await memory.remember("stock prices fell")
            found = await memory.recall("where did the cat sit", k=1)
            assert found[0]["id"] == key
            assert await memory.forget(key) is True
            await asyncio.to_thread(self._cli_ls_as_app, node, passwords)
        assert "Violation" not in node.read_log()

    async def test_runner_as_compose_starts_it(self, node: NatsServer, passwords: dict[str, str]) -> None:
        """``python -m natsrpc.run services.kv`` with compose's environment serves app; SIGTERM stops it cleanly."""
        kv = load_compose()["services"]["kv"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "NATSRPC_")) and k != "PYTHONPATH"}
        env.update(kv["environment"])
        env["NATS_PASSWORD"] = passwords[compose_variable(kv["environment"]["NATS_PASSWORD"])]
        command = [*kv["command"][3:]]
        command[command.index("--url") + 1] = node.url  # the compose network's n1..n3 is this one node
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "natsrpc.run", *command, cwd=REPO, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            app = {"user": "app", "password": passwords["APP_PASS"], "inbox_prefix": "_INBOX_app"}
            async with natsrpc.connect(node.url, timeout=2.0, circuit=None, **app) as client:
                async with asyncio.timeout(20):
                    while True:  # poll until the child serves (its start-up time varies with load)
                        try:
                            await client.call_service["kv"].put("a", "1")
                            break
                        except natsrpc.NoResponders:
                            await asyncio.sleep(0.05)
                assert await client.call_service["kv"].get("a") == "1"
            proc.send_signal(signal.SIGTERM)
            output, _ = await asyncio.wait_for(proc.communicate(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, output.decode(errors="replace")
        assert passwords["KV_PASS"] not in output.decode(errors="replace")

    @staticmethod
    def _cli_ls_as_app(node: NatsServer, passwords: dict[str, str]) -> None:
        """Runs ``python -m natsrpc ls --json`` in-process with the security flags, as the app user."""
        with contextlib.redirect_stdout(output := io.StringIO()):
            flags = ["--url", node.url, "--user", "app", "--password", passwords["APP_PASS"]]
            code = cli.main([*flags, "--inbox-prefix", "_INBOX_app", "ls", "--json", "--wait", "0.3"])
        assert code == 0
        printed = next(line for line in output.getvalue().splitlines() if line.startswith("["))  # past log lines
        names = {reply["name"] for reply in msgspec.json.decode(printed)}
        assert names == set(SERVICES)
