"""Tests of natsrpc.cluster: a loopback nats-server cluster forms, routes messages, and re-forms after faults."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

import natsrpc
from natsrpc.cluster import NatsCluster, free_ports
from natsrpc.embedded import is_listening

NAMES = {"natsrpc-1", "natsrpc-2", "natsrpc-3"}


async def served_across(publisher_url: str, responder_url: str, subject: str) -> bytes:
    """Subscribes a responder on one node and returns the reply to a request sent from another.

    The subscription takes a few ms to reach the other node: requests are repeated while the
    server answers "no responders".
    """
    responder = await nats.connect(responder_url)
    requester = await nats.connect(publisher_url)
    try:

        async def answer(msg: Msg) -> None:
            await msg.respond(b"served by " + responder_url.encode())

        await responder.subscribe(subject, cb=answer)
        await responder.flush()
        deadline = time.monotonic() + 5
        while True:
            try:
                reply = await requester.request(subject, b"", timeout=1)
                return bytes(reply.data)
            except nats.errors.NoRespondersError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.005)
    finally:
        await requester.close()
        await responder.close()


class TestFreePorts:
    """free_ports hands out distinct ports that are free."""

    def test_distinct_and_free(self) -> None:
        """Twelve ports at once are all different and none is listening."""
        ports = free_ports(12)
        assert len(set(ports)) == 12
        assert not any(is_listening("127.0.0.1", p) for p in ports)


class TestForming:
    """A started cluster is a full mesh of routes on loopback."""

    def test_every_node_routes_to_every_other(self, nats_cluster: NatsCluster) -> None:
        """Each node's /routez lists the other two nodes by name."""
        for i, name in enumerate(nats_cluster.node_name(i) for i in range(3)):
            assert nats_cluster.routes(i) == NAMES - {name}

    def test_nodes_listen_on_distinct_loopback_ports(self, nats_cluster: NatsCluster) -> None:
        """Client, route and monitoring ports are all different, and the client URLs are loopback."""
        ports = [n.port for n in nats_cluster.nodes] + nats_cluster.cluster_ports
        ports += [n.monitor_port for n in nats_cluster.nodes if n.monitor_port is not None]
        assert len(set(ports)) == 9
        assert all(url.startswith("nats://127.0.0.1:") for url in nats_cluster.urls)
        assert nats_cluster.url == ",".join(nats_cluster.urls)

    def test_server_ping_is_tuned(self, nats_cluster: NatsCluster) -> None:
        """Every node pings every second and gives up after two missed pings (varz reports it)."""
        for node in nats_cluster.nodes:
            varz = node.monitor("varz")
            assert varz["ping_interval"] == 1_000_000_000
            assert varz["ping_max"] == 2
            assert varz["cluster"]["name"] == "natsrpc"

    def test_a_single_node_needs_no_routes(self) -> None:
        """A one-node cluster starts with no routes to wait for."""
        with NatsCluster(1) as cluster:
            assert cluster.routes(0) == set()

    def test_zero_nodes_is_a_configuration_error(self) -> None:
        """A cluster of no nodes is refused."""
        with pytest.raises(natsrpc.ConfigurationError):
            NatsCluster(0)

    def test_close_stops_every_node_and_removes_files(self) -> None:
        """Leaving the context manager stops all nodes and removes the generated config and logs."""
        with NatsCluster(2) as cluster:
            config, logs = cluster.config_path, [n.log_path for n in cluster.nodes]
        assert all(n.process is not None and n.process.returncode is not None for n in cluster.nodes)
        assert not any(is_listening("127.0.0.1", n.port) for n in cluster.nodes)
        assert not Path(config).exists()
        assert not any(Path(log).exists() for log in logs)


class TestRouting:
    """Messages cross the routes."""

    async def test_request_on_node_1_is_served_on_node_3(self, nats_cluster: NatsCluster) -> None:
        """A request published on node 1 reaches a responder connected to node 3, and the reply comes back."""
        reply = await served_across(nats_cluster.urls[0], nats_cluster.urls[2], "cluster.test.echo")
        assert reply == b"served by " + nats_cluster.urls[2].encode()

    async def test_natsrpc_client_learns_every_node(self, nats_cluster: NatsCluster) -> None:
        """A client given one URL learns the other nodes from the cluster (for reconnects)."""
        async with natsrpc.connect(nats_cluster.urls[0]) as client:
            known = {(s.uri.hostname, s.uri.port) for s in client.nc._server_pool}
        assert {("127.0.0.1", n.port) for n in nats_cluster.nodes} <= known


class TestFaults:
    """kill, restart, pause and resume act on one node; wait_for_routes tracks the mesh of the live nodes."""

    async def test_kill_then_restart_reforms_the_mesh(self, nats_cluster: NatsCluster) -> None:
        """After a kill the survivors drop the dead node; after a restart on the same ports all routes are back."""
        node = nats_cluster.nodes[1]
        port = node.port
        node.kill()
        assert nats_cluster.live() == [0, 2]
        nats_cluster.wait_for_routes(5)
        assert nats_cluster.routes(0) == {"natsrpc-3"}
        node.restart()
        assert node.port == port
        nats_cluster.wait_for_routes(5)
        assert all(nats_cluster.routes(i) == NAMES - {nats_cluster.node_name(i)} for i in range(3))
        reply = await served_across(nats_cluster.urls[0], nats_cluster.urls[1], "cluster.test.restarted")
        assert reply.endswith(nats_cluster.urls[1].encode())

    def test_paused_nodes_routes_die_within_seconds(self, nats_cluster: NatsCluster) -> None:
        """The others drop a SIGSTOPped node's routes in about 3 s (ping 1 s x 2), and take it back on resume."""
        node = nats_cluster.nodes[2]
        node.pause()
        try:
            started = time.monotonic()
            nats_cluster.wait_for_routes(10)
            dropped = time.monotonic() - started
            assert nats_cluster.routes(0) == {"natsrpc-2"}
        finally:
            node.resume()
        print(f"\nFIGURE cluster: a paused node's routes dropped after {dropped:.2f} s")
        assert 1.0 < dropped < 6.0
        nats_cluster.wait_for_routes(10)
        assert nats_cluster.routes(2) == {"natsrpc-1", "natsrpc-2"}

    def test_wait_for_routes_times_out_with_what_it_saw(self, nats_cluster: NatsCluster) -> None:
        """When routes cannot settle in time, ConfigurationError says what each node reported."""
        nats_cluster.nodes[0].pause()
        try:
            with pytest.raises(natsrpc.ConfigurationError, match="natsrpc-2"):
                nats_cluster.wait_for_routes(0.05)
        finally:
            nats_cluster.nodes[0].resume()
