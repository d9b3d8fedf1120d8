"""A nats-server cluster on loopback for fault tests: N :class:`~natsrpc.NatsServer` nodes in a full mesh.

Each node gets free client, cluster and monitoring ports, explicit routes to every other node and a
server-side ping of 1 s x 2, so the routes of a hung (SIGSTOPped) node die in ~3 s rather than ~4 min
(RELIABILITY.md fact 3). :meth:`NatsCluster.start` returns once every node's ``/routez`` lists every
other node, polling (a cluster forms in 25-50 ms, sometimes ~1 s)::

    with NatsCluster(3) as cluster:
        client = await natsrpc.connect(cluster.nodes[0].url)
        cluster.nodes[0].kill()              # or pause()/resume(), restart() on the same ports
        cluster.nodes[0].restart()
        cluster.wait_for_routes()            # the mesh of the live nodes is whole again

The pytest fixture ``natsrpc_cluster`` (:mod:`natsrpc.testing`) gives each test a started 3-node cluster.
This lives apart from :mod:`natsrpc.embedded`, which owns one server process.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from pathlib import Path
from types import TracebackType

from natsrpc.embedded import NatsServer, find_binary
from natsrpc.errors import ConfigurationError

_POLL = 0.01

SERVER_PING_INTERVAL = "1s"
"""The nodes' ``ping_interval`` (clients and routes): a silent peer is pinged after 1 s..."""
SERVER_PING_MAX = 2
"""...and dropped after this many unanswered pings, so a hung node's routes die in ~3 s."""


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Returns ``count`` distinct TCP ports that are free on ``host`` right now.

    The sockets stay bound until all ports are chosen, so no port is handed out twice.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


class NatsCluster:
    """N nats-server nodes on loopback routed to each other; a context manager.

    Args:
        size: the number of nodes (at least 1).
        name: the cluster name (``--cluster_name``); node ``i`` is the server ``<name>-<i+1>``.
        host: the address every port listens on.
        ping_interval: the servers' ``ping_interval`` (a Go duration string).
        ping_max: the servers' ``ping_max``.
        binary: the nats-server path; found with :func:`~natsrpc.embedded.find_binary` when None.

    Attributes:
        nodes: the :class:`~natsrpc.NatsServer` of each node (kill, pause, resume, restart it).
        cluster_ports: each node's route port, in node order.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        name: str = "natsrpc",
        host: str = "127.0.0.1",
        ping_interval: str = SERVER_PING_INTERVAL,
        ping_max: int = SERVER_PING_MAX,
        binary: str | None = None,
    ) -> None:
        if size < 1:
            raise ConfigurationError(f"a cluster needs at least one node, got size={size}")
        self.name = name
        binary = binary or find_binary()
        fd, config = tempfile.mkstemp(prefix="nats-cluster-", suffix=".conf")
        with os.fdopen(fd, "w") as file:
            file.write(f'ping_interval: "{ping_interval}"\nping_max: {ping_max}\n')
        self.config_path = config
        ports = free_ports(3 * size, host)
        client_ports, self.cluster_ports, monitor_ports = ports[:size], ports[size : 2 * size], ports[2 * size :]
        self.nodes: list[NatsServer] = []
        for i in range(size):
            routes = ",".join(f"nats://{host}:{p}" for j, p in enumerate(self.cluster_ports) if j != i)
            args = ["--server_name", self.node_name(i), "--cluster_name", name]
            args += ["--cluster", f"nats://{host}:{self.cluster_ports[i]}"]
            if routes:
                args += ["--routes", routes]
            node = NatsServer(
                client_ports[i], host, config=config, args=args, binary=binary, monitor_port=monitor_ports[i]
            )
            self.nodes.append(node)

    def node_name(self, index: int) -> str:
        """Returns the server name of node ``index`` (as other nodes' ``/routez`` shows it)."""
        return f"{self.name}-{index + 1}"

    @property
    def urls(self) -> list[str]:
        """The client URL of each node, in node order."""
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """All client URLs comma-separated, as ``python -m natsrpc.run --url`` takes them."""
        return ",".join(self.urls)

    def start(self, timeout: float = 10.0) -> NatsCluster:
        """Starts every node and returns once the routes form a full mesh (see :meth:`wait_for_routes`).

        Raises:
            ConfigurationError: a node did not start, or the mesh did not form within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        try:
            for node in self.nodes:
                node.start(max(deadline - time.monotonic(), 0.1))
            self.wait_for_routes(max(deadline - time.monotonic(), 0.1))
        except BaseException:
            self.stop()
            raise
        return self

    def live(self) -> list[int]:
        """Returns the indexes of the nodes that run and are not paused."""
        return [
            i
            for i, node in enumerate(self.nodes)
            if node.process is not None and node.process.poll() is None and not node.paused
        ]

    def routes(self, index: int) -> set[str]:
        """Returns the names of the servers node ``index`` has a route to (from its ``/routez``).

        A node keeps several connections per peer (a route pool); this counts peers, not connections.

        Raises:
            OSError: the node's monitoring port did not answer.
        """
        routez = self.nodes[index].monitor("routez")
        return {route["remote_name"] for route in routez.get("routes") or ()}

    def wait_for_routes(self, timeout: float = 10.0) -> None:
        """Returns once every live node has a route to every other live node, and to no other.

        Killed and paused nodes are not live: after a kill this waits for the survivors to drop
        the dead node's routes, after a pause for the ping to drop the hung node's (~3 s), after a
        restart for the node to rejoin. Polls the monitoring endpoints; never sleeps blind.

        Raises:
            ConfigurationError: the routes did not settle within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            live = self.live()
            names = {self.node_name(i) for i in live}
            seen: dict[str, set[str] | str] = {}
            for i in live:
                try:
                    seen[self.node_name(i)] = self.routes(i)
                except OSError as exc:
                    seen[self.node_name(i)] = repr(exc)
            if all(routes == names - {name} for name, routes in seen.items()):
                return
            if time.monotonic() > deadline:
                raise ConfigurationError(f"cluster routes did not settle within {timeout}s: {seen}")
            time.sleep(_POLL)

    def stop(self) -> None:
        """Stops every node (a paused one is resumed first)."""
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        """Stops every node and removes the log and config files."""
        for node in self.nodes:
            node.close()
        Path(self.config_path).unlink(missing_ok=True)

    def __enter__(self) -> NatsCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
