"""Test hygiene shared by every test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

import natsrpc
from natsrpc.cluster import NatsCluster
from natsrpc.embedded import NatsServer

# This project's tests use the plugin's fixtures (natsrpc.testing) under shorter names.


@pytest.fixture(scope="session")
def nats_server(natsrpc_server: NatsServer) -> NatsServer:
    """The plugin's session nats-server (``natsrpc_server``)."""
    return natsrpc_server


@pytest.fixture
def nats_url(natsrpc_url: str) -> str:
    """The plugin's ``natsrpc_url``."""
    return natsrpc_url


@pytest.fixture
def nats_cluster(natsrpc_cluster: NatsCluster) -> NatsCluster:
    """The plugin's fresh 3-node cluster (``natsrpc_cluster``)."""
    return natsrpc_cluster


@pytest.fixture
def client(natsrpc_client: natsrpc.Client) -> natsrpc.Client:
    """The plugin's connected client (``natsrpc_client``)."""
    return natsrpc_client


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """Undoes structlog configuration a test made (the CLI and runner configure it in-process).

    Otherwise a level filter or a captured, since-closed stderr would leak into later tests.
    """
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
