"""pytest helpers: a real nats-server per test session, a client per test, a cluster, and hosting services.

Registered as a pytest plugin (entry point ``natsrpc``), so any project that installs natsrpc gets
the fixtures ``nats_server``, ``nats_url``, ``client`` and ``nats_cluster``::

    async def test_get(client, nats_url):
        async with natsrpc.testing.serve(client, KV()):
            assert await client.call_service["kv"].get("a") is None

    async def test_failover(nats_cluster):   # a fresh 3-node cluster (natsrpc.cluster.NatsCluster)
        async with natsrpc.connect(nats_cluster.urls) as c:
            nats_cluster.nodes[0].kill()      # pause()/resume(), restart(); then wait_for_routes()
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

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


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """A nats-server on a free loopback port, shared by the test session."""
    with NatsServer() as server:
        yield server


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    """The URL of the session's nats-server."""
    return nats_server.url


@pytest.fixture
def nats_cluster() -> Iterator[NatsCluster]:
    """A 3-node nats-server cluster of this test alone, its routes formed; stopped after the test.

    Its nodes may be killed, paused or restarted freely: stopping resumes paused nodes first.
    """
    with NatsCluster(3) as cluster:
        yield cluster


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the client fixture needs pytest-asyncio
    pass
else:

    @pytest_asyncio.fixture
    async def client(nats_url: str) -> AsyncIterator[Client]:
        """A natsrpc client connected to the session's nats-server, closed after the test."""
        async with connect(nats_url) as c:
            yield c
