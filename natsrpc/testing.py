"""pytest helpers: a real nats-server per test session, a client per test, a cluster, and hosting services.

Registered as a pytest plugin (entry point ``natsrpc``): a project that installs ``natsrpc[testing]``
(pytest, pytest-asyncio and the nats-server binary) gets the fixtures ``natsrpc_server``,
``natsrpc_url``, ``natsrpc_client`` and ``natsrpc_cluster``, prefixed so that they never clash
with a project's own ``client`` or ``server``::

    @pytest.mark.asyncio  # not needed with asyncio_mode = "auto"
    async def test_get(natsrpc_client):
        async with natsrpc.testing.serve(natsrpc_client, KV()):
            assert await natsrpc_client.call_service["kv"].get("a") is None

    @pytest.mark.asyncio
    async def test_failover(natsrpc_cluster):   # a fresh 3-node cluster (natsrpc.cluster.NatsCluster)
        async with natsrpc.connect(natsrpc_cluster.urls) as c:
            natsrpc_cluster.nodes[0].kill()      # pause()/resume(), restart(); then wait_for_routes()

``natsrpc_client`` is an async fixture: without pytest-asyncio the tests that use it get a warning
and an error saying so.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

try:
    import pytest_asyncio
except ImportError:  # natsrpc[testing] installs it; without it natsrpc_client says what is missing
    pytest_asyncio = None  # type: ignore[assignment]

from natsrpc.client import Client
from natsrpc.cluster import NatsCluster
from natsrpc.connection import connect
from natsrpc.embedded import NatsServer
from natsrpc.host import Host
from natsrpc.service import Service


@asynccontextmanager
async def serve(client: Client, *services: Service, **host_options: Any) -> AsyncIterator[Host]:
    """Hosts ``services`` on ``client``'s connection for the duration of the block.

    Args:
        client: the connection to serve on.
        *services: the instances to host.
        **host_options: passed to :class:`natsrpc.Host` (max_concurrency, max_queue, ...).
    """
    async with Host(client, list(services), **host_options) as host:
        yield host


NEEDS_PYTEST_ASYNCIO = (
    "natsrpc_client is an async fixture and needs the pytest-asyncio plugin: pip install 'natsrpc[testing]'"
)


@pytest.fixture(scope="session")
def natsrpc_server() -> Iterator[NatsServer]:
    """A nats-server on a free loopback port, shared by the test session."""
    with NatsServer() as server:
        yield server


@pytest.fixture
def natsrpc_url(natsrpc_server: NatsServer) -> str:
    """The URL of the session's nats-server."""
    return natsrpc_server.url


@pytest.fixture
def natsrpc_cluster() -> Iterator[NatsCluster]:
    """A 3-node nats-server cluster of this test alone, its routes formed; stopped after the test.

    Its nodes may be killed, paused or restarted freely: stopping resumes paused nodes first.
    """
    with NatsCluster(3) as cluster:
        yield cluster


if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def natsrpc_client(natsrpc_url: str) -> AsyncIterator[Client]:
        """A natsrpc client connected to the session's nats-server, closed after the test."""
        async with connect(natsrpc_url) as c:
            yield c

else:  # pragma: no cover - exercised in a subprocess without pytest-asyncio

    @pytest.fixture
    def natsrpc_client() -> None:
        """Fails the test: the async fixture needs pytest-asyncio."""
        pytest.fail(NEEDS_PYTEST_ASYNCIO, pytrace=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Warns once when tests use ``natsrpc_client`` but pytest-asyncio is not active."""
    if config.pluginmanager.has_plugin("asyncio"):
        return
    users = [item for item in items if "natsrpc_client" in getattr(item, "fixturenames", ())]
    if users:
        config.issue_config_time_warning(
            pytest.PytestConfigWarning(f"{NEEDS_PYTEST_ASYNCIO} (used by {users[0].nodeid})"), stacklevel=2
        )
