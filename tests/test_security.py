"""Security tests (RELIABILITY.md A1-A6) against nats-server.conf and TLS servers: permissions, credentials, TLS.

The permission tests start one node from the repository's ``nats-server.conf`` with the passwords in
its environment, as compose.yaml does, and connect as each identity the file defines.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import secrets
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from children import poll
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from nats.aio.client import Client as NatsConnection
from nats.aio.msg import Msg
from stream_service import Streams

import natsrpc
from natsrpc import NatsServer, Service, rpc
from natsrpc.embedded import find_binary, free_port
from natsrpc.errors import permission_violation
from natsrpc.proxy import CallOptions
from natsrpc.testing import serve
from natsrpc.transport import sync_with_server as _sync_with_server
from services.kv import KV

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "nats-server.conf"
# One node from the production file: no monitoring port, a random route port (others run tests too).
SINGLE_NODE = ["-m", "0", "--cluster_listen", "nats://127.0.0.1:-1"]
PASSWORD_ENV = {"kv": "KV_PASS", "vdb": "VDB_PASS", "memory": "MEMORY_PASS", "app": "APP_PASS", "route": "ROUTE_PASS"}
# Budgets with room for a shared 2-core machine; the failures they guard against take seconds.
DENIED_BUDGET = 0.05  # A1: a refused publish fails the call in well under 50 ms (a timeout would be 5 s)
REFUSED_CONNECT_BUDGET = 2.0  # A5 and A6: a refused connection fails within 2 s, no reconnect loop


def start_with_env(server: NatsServer, env: dict[str, str]) -> NatsServer:
    """Starts ``server`` with ``env`` added to the environment it inherits (its config reads secrets there)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        return server.start()


@pytest.fixture(scope="module")
def passwords() -> dict[str, str]:
    """A fresh password per identity (letters first, so the config parser keeps them strings)."""
    return {name: "p" + secrets.token_hex(12) for name in PASSWORD_ENV}


@pytest.fixture(scope="module")
def secured(passwords: dict[str, str]) -> Iterator[NatsServer]:
    """One nats-server started from nats-server.conf, its passwords in its environment."""
    server = NatsServer(config=CONFIG, args=SINGLE_NODE)
    start_with_env(server, {PASSWORD_ENV[name]: password for name, password in passwords.items()})
    try:
        yield server
    finally:
        server.close()


def as_identity(server: NatsServer, passwords: dict[str, str], name: str, **options: Any) -> natsrpc.connect:
    """Returns a natsrpc connect() as ``name``, with that identity's own inbox prefix."""
    return natsrpc.connect(server.url, user=name, password=passwords[name], inbox_prefix=f"_INBOX_{name}", **options)


@dataclass
class Raw:
    """A plain nats-py connection as one identity, recording the permission violations the server reports."""

    nc: NatsConnection
    violations: list[tuple[str, str]]

    async def refused(self, operation: str, subject: str, queue: str = "") -> bool:
        """Subscribes or publishes once, waits until the server processed it, and says whether it refused."""
        before = len(self.violations)
        if operation == "sub":
            await self.nc.subscribe(subject, queue=queue)
        else:
            await self.nc.publish(subject, b"{}")
        await _sync_with_server(self.nc)
        return len(self.violations) > before


@asynccontextmanager
async def raw_as(server: NatsServer, passwords: dict[str, str], name: str) -> AsyncIterator[Raw]:
    """Yields a :class:`Raw` connection as ``name`` (inbox prefix ``_INBOX_<name>``)."""
    violations: list[tuple[str, str]] = []

    async def error_cb(exc: Exception) -> None:
        violation = permission_violation(exc)
        if violation is not None:
            violations.append(violation)

    nc = await nats.connect(
        server.url, user=name, password=passwords[name], inbox_prefix=f"_INBOX_{name}", error_cb=error_cb
    )
    try:
        yield Raw(nc, violations)
    finally:
        await nc.close()


class Billing(Service):
    """A service no identity in nats-server.conf may call or serve."""

    name = "billing"

    @rpc
    async def charge(self, cents: int) -> int:
        """Returns ``cents``."""
        return cents


class Relay(Service):
    """A service, hosted as kv, whose handler tries a call kv's permissions do not allow."""

    name = "kv"

    @rpc
    async def relay(self) -> int:
        """Calls billing (kv may publish only heartbeats and replies)."""
        result: int = await self.call_service["billing"].charge(1)
        return result


# --------------------------------------------------------------------------------------------------
# The permission matrix of nats-server.conf.
# --------------------------------------------------------------------------------------------------

ALLOW, DENY = True, False
MATRIX: dict[str, list[tuple[str, str, str, bool]]] = {
    "kv": [
        ("sub", "svc.kv.get", "q", ALLOW),
        ("sub", "svc.kv.get", "", DENY),  # no plain subscription: it would see every request
        ("sub", "svc.kv.get", "spy", DENY),
        ("sub", "svc.kv.*.INSTANCE1", "", ALLOW),
        ("sub", "svc.vdb.get", "q", DENY),
        ("sub", "$SRV.PING", "", ALLOW),
        ("sub", "$SRV.INFO.kv", "", ALLOW),
        ("sub", "$SRV.STATS.kv.INSTANCE1", "", ALLOW),
        ("sub", "$SRV.INFO.vdb", "", DENY),
        ("sub", "$SRV.>", "", DENY),  # "$SRV.*" would admit this literal, and with it every service's $SRV
        ("sub", "$SRV.*", "", DENY),
        ("sub", "$SRV.PING.vdb.*", "", DENY),
        ("sub", "svc._hb.>", "", ALLOW),
        ("sub", "_INBOX_kv.X.*", "", ALLOW),
        ("sub", "_INBOX_app.>", "", DENY),
        ("sub", "_INBOX.>", "", DENY),
        ("sub", "svc._ctl.kv.INSTANCE1.*", "", ALLOW),  # its streams' control messages
        ("sub", "svc._ctl.vdb.INSTANCE1.*", "", DENY),
        ("sub", "svc._ctl.>", "", DENY),
        ("sub", "svc._cancel.kv", "", ALLOW),  # cancels of its calls
        ("sub", "svc._cancel.vdb", "", DENY),
        ("sub", "svc._cancel.*", "", DENY),
        ("sub", "svc._inval.*", "", ALLOW),  # cache invalidations of the services it calls
        ("pub", "svc._inval.kv", "", ALLOW),  # invalidating its own cached replies
        ("pub", "svc._inval.vdb", "", DENY),
        ("pub", "$JS.API.STREAM.INFO.KV_kv", "", ALLOW),  # its own key-value bucket
        ("pub", "$JS.API.STREAM.INFO.EVENTS", "", DENY),
        ("pub", "$KV.other.x", "", DENY),
        ("pub", "svc._hb.kv.INSTANCE1", "", ALLOW),
        ("pub", "svc._hb.vdb.INSTANCE1", "", DENY),
        ("pub", "svc.vdb.get", "", DENY),
        ("pub", "svc.kv.get", "", DENY),
        ("pub", "$SRV.PING", "", DENY),
    ],
    "vdb": [
        ("sub", "svc.vdb.search", "q", ALLOW),
        ("sub", "svc.vdb.search", "", DENY),
        ("sub", "svc.kv.get", "q", DENY),
        ("sub", "$SRV.PING.vdb", "", ALLOW),
        ("sub", "$SRV.STATS", "", ALLOW),
        ("sub", "$SRV.PING.kv", "", DENY),  # vdb cannot answer discovery as kv
        ("sub", "$SRV.>", "", DENY),
        ("sub", "$SRV.*.kv", "", DENY),
        ("sub", "_INBOX_vdb.X.*", "", ALLOW),
        ("pub", "svc._hb.vdb.INSTANCE1", "", ALLOW),
        ("pub", "svc.kv.put", "", DENY),
    ],
    "memory": [
        ("sub", "svc.memory.remember", "q", ALLOW),
        ("sub", "svc.memory.remember", "", DENY),
        ("sub", "svc.kv.get", "q", DENY),
        ("sub", "_INBOX_memory.X.*", "", ALLOW),
        ("sub", "_INBOX_kv.>", "", DENY),
        ("pub", "svc.kv.put", "", ALLOW),
        ("pub", "svc.kv.get.INSTANCE1", "", ALLOW),
        ("pub", "svc.vdb.upsert", "", ALLOW),
        ("pub", "svc.billing.charge", "", DENY),
        ("pub", "svc._hb.memory.INSTANCE1", "", ALLOW),
        ("pub", "svc._hb.kv.INSTANCE1", "", DENY),
        ("pub", "svc._cancel.kv", "", ALLOW),  # cancelling the calls it makes
        ("pub", "svc._ctl.vdb.INSTANCE1.TOKEN", "", ALLOW),  # and the streams it reads
        ("pub", "svc._cancel.billing", "", DENY),
        ("pub", "svc._inval.memory", "", ALLOW),
        ("pub", "evt.memory.remembered", "", ALLOW),  # its events
        ("pub", "evt.order.created", "", DENY),
        ("pub", "svc._inval.kv", "", DENY),  # no dropping another service's cached replies
        ("pub", "svc._ctl.billing.INSTANCE1.TOKEN", "", DENY),
    ],
    "app": [
        ("pub", "svc.kv.get", "", ALLOW),
        ("pub", "svc.memory.recall", "", ALLOW),
        ("pub", "$SRV.PING", "", ALLOW),
        ("pub", "svc._hb.kv.INSTANCE1", "", DENY),  # no forged heartbeats
        ("pub", "svc._inval.kv", "", DENY),  # nor invalidations
        ("pub", "elsewhere", "", DENY),
        ("sub", "svc._inval.*", "", ALLOW),
        ("sub", "_INBOX_app.X.*", "", ALLOW),
        ("sub", "svc._hb.>", "", ALLOW),
        ("sub", "svc.kv.get", "q", DENY),
        ("sub", "svc.>", "", DENY),
        ("sub", "_INBOX_memory.>", "", DENY),
        ("sub", "_INBOX.>", "", DENY),
        ("sub", "$SRV.PING", "", DENY),
    ],
}


class TestConfigFile:
    """nats-server.conf is a valid, single-node-startable config whose secrets must come from the environment."""

    def test_refuses_to_start_without_its_secrets(self) -> None:
        """Without KV_PASS and the others in the environment, the server rejects the file (no empty passwords)."""
        env = {"PATH": "/usr/bin:/bin"}
        result = subprocess.run(
            [find_binary(), "-c", str(CONFIG), "-t"], env=env, capture_output=True, text=True, timeout=10, check=False
        )
        assert result.returncode != 0
        assert "_PASS" in result.stdout + result.stderr

    @pytest.mark.parametrize("identity", sorted(MATRIX), ids=sorted(MATRIX))
    async def test_permission_matrix(self, secured: NatsServer, passwords: dict[str, str], identity: str) -> None:
        """Each identity may subscribe and publish exactly what the matrix allows (least privilege)."""
        expected = {(op, subject, queue): allowed for op, subject, queue, allowed in MATRIX[identity]}
        async with raw_as(secured, passwords, identity) as raw:
            actual = {
                (op, subject, queue): not await raw.refused(op, subject, queue)
                for op, subject, queue, _ in MATRIX[identity]
            }
        assert actual == expected


class TestWhatTheConfigDoesNotStop:
    """What nats-server.conf leaves open, and what natsrpc does about it (docs/security.md says the same)."""

    async def test_an_empty_password_variable_is_accepted_by_the_server_not_by_natsrpc(
        self, passwords: dict[str, str]
    ) -> None:
        """With KV_PASS="" the server starts and takes kv with an empty password; natsrpc refuses to send one,
        and compose.yaml refuses to start with any password variable empty (``${VAR:?...}``)."""
        server = NatsServer(config=CONFIG, args=SINGLE_NODE)
        start_with_env(server, {**{PASSWORD_ENV[n]: p for n, p in passwords.items()}, "KV_PASS": ""})
        try:
            nc = await nats.connect(server.url, user="kv", password="", allow_reconnect=False)
            assert nc.is_connected  # the hole: nats-server itself has no minimum password length
            await nc.close()
            with pytest.raises(natsrpc.ConfigurationError, match="empty password"):
                await natsrpc.connect(server.url, user="kv", password="")
        finally:
            server.close()
        compose = (REPO / "compose.yaml").read_text()
        for variable in PASSWORD_ENV.values():
            assert f"{variable}: ${{{variable}:?" in compose, variable

    async def test_a_beat_naming_another_service_passes_the_server_but_not_the_registry(
        self, secured: NatsServer, passwords: dict[str, str]
    ) -> None:
        """vdb may publish on its own svc._hb.vdb.X with a body naming kv; the app's registry ignores it."""
        async with (
            as_identity(secured, passwords, "kv") as kv_client,
            serve(kv_client, KV()) as host,
            as_identity(secured, passwords, "app") as app,
            raw_as(secured, passwords, "vdb") as vdb,
        ):
            kv_id = host.instances[0].id
            assert app.registry is not None
            await poll(lambda: bool(app.registry and app.registry.live("kv")))
            ignored = app.registry.ignored_beats
            beat = {"name": "kv", "id": kv_id, "version": "1.0.0", "endpoints": ["get"], "in_flight": 0,
                    "healthy": False, "draining": True, "interval": 2.0, "idempotent": ["put"]}  # fmt: skip
            assert not await vdb.refused("pub", "svc._hb.vdb.X")  # the server lets vdb publish there
            await vdb.nc.publish("svc._hb.vdb.X", json.dumps(beat).encode())
            await _sync_with_server(vdb.nc)
            await poll(lambda: app.registry is not None and app.registry.ignored_beats > ignored)
            assert [i.id for i in app.registry.live("kv")] == [kv_id]
            assert not app.registry.idempotent("kv", "put")
            assert not app.registry.known("vdb")
            assert app.circuit("kv").state is natsrpc.circuit.State.CLOSED
            assert await app.call_service["kv"].get("missing") is None

    async def test_the_caller_header_is_only_informational(
        self, secured: NatsServer, passwords: dict[str, str]
    ) -> None:
        """app may send any Natsrpc-Caller: it reaches the handler as sent, so it must never authorise anything."""
        seen: list[str] = []

        class Who(Service):
            name = "kv"

            @rpc
            async def get(self, key: str) -> str | None:
                seen.append(natsrpc.current_call().caller)
                return None

        async with (
            as_identity(secured, passwords, "kv") as kv_client,
            serve(kv_client, Who()),
            as_identity(secured, passwords, "app", caller="memory/forged") as app,
        ):
            await app.call_service["kv"].get("a")
        assert seen == ["memory/forged"]


class TestDeniedPublish:
    """A1: a call the server refuses raises PermissionDenied at once, not a timeout."""

    async def test_denied_call_fails_fast(self, secured: NatsServer, passwords: dict[str, str]) -> None:
        """memory may not call billing: each of 20 calls raises PermissionDenied in < 50 ms; the connection stays up."""
        async with as_identity(secured, passwords, "memory", timeout=5.0) as client:
            elapsed = []
            for _ in range(20):
                started = time.perf_counter()
                with pytest.raises(natsrpc.PermissionDenied, match=r"svc\.billing\.charge") as info:
                    await client.call_service["billing"].charge(1)
                elapsed.append(time.perf_counter() - started)
                assert not isinstance(info.value, natsrpc.CallTimeout)
                assert info.value.hop == "billing.charge"
            elapsed.sort()
            # 19 of 20 within the budget (one scheduling hiccup on a shared 2-core box is noise),
            # and none anywhere near the 5 s call timeout: a refusal is never a silent timeout.
            assert elapsed[-2] < DENIED_BUDGET, f"second-slowest refusal took {elapsed[-2] * 1e3:.1f} ms"
            assert elapsed[-1] < 1.0, f"slowest refusal took {elapsed[-1] * 1e3:.1f} ms"
            assert client.nc.is_connected
            assert client.pending_calls == 0
            assert client.circuit("billing").state is natsrpc.circuit.State.CLOSED  # a refusal is not an outage
            with pytest.raises(natsrpc.NoResponders):  # an allowed subject still goes out
                await client.call_service["kv"].get("a")

    async def test_denied_stream_fails_fast(self, secured: NatsServer, passwords: dict[str, str]) -> None:
        """A stream request the server refuses raises PermissionDenied at once, not CallTimeout at
        the end of its 5 s timeout (it did until 2026-12-03)."""
        async with as_identity(secured, passwords, "memory", timeout=5.0) as client:
            started = time.perf_counter()
            with pytest.raises(natsrpc.PermissionDenied, match=r"svc\.billing\.items"):
                async for _ in client.stream("billing", "items"):
                    pass
            assert time.perf_counter() - started < 1.0
            assert client.nc.is_connected
            assert client.pending_calls == 0

    async def test_only_the_refused_calls_fail(self, secured: NatsServer, passwords: dict[str, str]) -> None:
        """A refusal fails the calls to that subject only: a call pending on an allowed subject still gets its reply."""
        async with (
            raw_as(secured, passwords, "kv") as kv,
            as_identity(secured, passwords, "memory", timeout=5.0) as client,
        ):
            requests: list[Msg] = []
            arrived = asyncio.Event()

            async def hold(msg: Msg) -> None:
                requests.append(msg)
                arrived.set()

            await kv.nc.subscribe("svc.kv.get", queue="q", cb=hold)
            await _sync_with_server(kv.nc)
            allowed = asyncio.ensure_future(client.request("svc.kv.get", b'{"key": "a"}'))
            await asyncio.wait_for(arrived.wait(), 5)
            denied = [asyncio.ensure_future(client.call_service["billing"].charge(i)) for i in range(3)]
            results = await asyncio.gather(*denied, return_exceptions=True)
            assert all(isinstance(r, natsrpc.PermissionDenied) for r in results), results
            assert not allowed.done()
            assert requests[0].reply.startswith("_INBOX_memory.")  # the client's inbox uses its prefix
            await requests[0].respond(b'"1"')
            assert (await asyncio.wait_for(allowed, 5)).data == b'"1"'

    async def test_refused_reply_inbox_fails_calls(self, secured: NatsServer, passwords: dict[str, str]) -> None:
        """app without its inbox prefix may not subscribe _INBOX.>: calls fail at once, naming inbox_prefix."""
        async with natsrpc.connect(secured.url, user="app", password=passwords["app"], timeout=5.0) as client:
            started = time.perf_counter()
            with pytest.raises(natsrpc.PermissionDenied, match="inbox_prefix"):
                await client.call_service["kv"].get("a")
            assert time.perf_counter() - started < DENIED_BUDGET
            assert client.nc.is_connected

    async def test_handler_call_refused_is_a_fast_502(self, secured: NatsServer, passwords: dict[str, str]) -> None:
        """A handler hosted as kv calling billing fails fast; its caller gets 502 naming PermissionDenied."""
        async with (
            as_identity(secured, passwords, "kv") as kv,
            as_identity(secured, passwords, "app", timeout=5.0) as app,
            serve(kv, Relay()),
        ):
            started = time.perf_counter()
            with pytest.raises(natsrpc.BadGateway, match="PermissionDenied") as info:
                await app.call_service["kv"].relay()
            assert time.perf_counter() - started < 1.0
            assert "billing.charge" in info.value.message


def one_narrow_user(
    directory: Path, user: str, publish: list[str], subscribe: list[str], *, with_srv: bool = True
) -> Path:
    """Writes a server config with ``user`` (password ``<user>pass``, inbox prefix ``_INBOX_<user>``)
    allowed only ``publish`` and ``subscribe``, and (``with_srv``) ``srv``/``srvpass`` allowed all."""
    srv = '{ user: srv, password: srvpass, permissions: { publish: ">", subscribe: ">" } }'
    users = [srv] if with_srv else []
    users.append(
        f"{{ user: {user}, password: {user}pass, permissions: {{ publish: {{ allow: {json.dumps(publish)} }}, "
        f"subscribe: {{ allow: {json.dumps([f'_INBOX_{user}.>', *subscribe])} }} }} }}"
    )
    config = directory / f"{user}.conf"
    config.write_text("authorization { users: [\n  " + "\n  ".join(users) + "\n] }\n")
    return config


def as_narrow(server: NatsServer, user: str, **options: Any) -> natsrpc.connect:
    """Returns a natsrpc connect() as a :func:`one_narrow_user` identity."""
    return natsrpc.connect(server.url, user=user, password=f"{user}pass", inbox_prefix=f"_INBOX_{user}", **options)


class SecWho(Service):
    """Says which instance served the call."""

    name = "secwho"

    def __init__(self, label: str) -> None:
        self.label = label

    @rpc
    async def who(self) -> str:
        """Returns this instance's label."""
        return self.label


class TestNarrowCallerDuringALeave:
    """A caller allowed to publish a service's queue-group subject only (not its instances' own
    subjects) still gets its calls served while an instance leaves, when natsrpc would send them to
    the staying instance's own subject."""

    async def test_a_refused_detour_goes_through_the_queue_group(self, tmp_path: Path) -> None:
        config = one_narrow_user(tmp_path, "narrow", ["svc.secwho.who"], ["svc._hb.>"])
        with NatsServer(config=config) as server:
            async with (
                natsrpc.connect(server.url, user="srv", password="srvpass") as leaving_nc,
                natsrpc.connect(server.url, user="srv", password="srvpass") as staying_nc,
                as_narrow(server, "narrow") as app,
                serve(leaving_nc, SecWho("leaving"), leave_grace=2.0) as leaving,
                serve(staying_nc, SecWho("staying")),
            ):
                for registry in (app.registry, leaving_nc.registry):
                    assert registry is not None
                    await poll(lambda r=registry: len(r.live("secwho")) == 2, "both instances heard")
                stopping = asyncio.create_task(leaving.stop())
                assert app.registry is not None
                await poll(lambda: any(i.draining for i in app.registry.instances("secwho")), "the draining beat heard")
                assert "secwho" in app._detours
                assert await app.call_service["secwho"].who() in ("leaving", "staying")
                assert "secwho" not in app._detours  # no second refusal during this leave
                assert {await app.call_service["secwho"].who() for _ in range(5)} <= {"leaving", "staying"}
                assert "secwho" not in app._detours
                assert not stopping.done(), "the leave grace ended before the calls: nothing was shown"
                await stopping


class TestRefusedStreamControl:
    """A caller allowed to publish a streaming method's subject but not ``svc._ctl.>`` cannot ack
    the items: its stream fails at once with PermissionDenied naming what to allow, rather than
    stalling until its timeout."""

    async def test_a_stream_whose_acks_are_refused_fails_at_once(self, tmp_path: Path) -> None:
        config = one_narrow_user(tmp_path, "noctl", ["svc.streams.count"], ["svc._hb.>"])
        with NatsServer(config=config) as server:
            async with (
                natsrpc.connect(server.url, user="srv", password="srvpass") as srv,
                as_narrow(server, "noctl", timeout=10.0) as app,
                serve(srv, Streams()),
            ):
                started = time.perf_counter()
                items: list[int] = []

                async def consume() -> None:
                    async for item in app.stream("streams", "count", (10_000,), window=2):
                        items.append(item)

                with pytest.raises(natsrpc.PermissionDenied, match=r"svc\._ctl\.>"):
                    await consume()
                assert time.perf_counter() - started < 3.0
                assert items[:2] == [0, 1]


class TestRefusedDurableEmit:
    """A durable emit the server's permissions refuse raises PermissionDenied at once, not CallTimeout."""

    async def test_a_refused_durable_emit_fails_at_once(self, tmp_path: Path) -> None:
        config = one_narrow_user(tmp_path, "noevt", ["$JS.API.>"], ["_INBOX.>", "svc._hb.>"], with_srv=False)
        with NatsServer(config=config, args=["-js", "-sd", str(tmp_path / "js")]) as server:
            async with as_narrow(server, "noevt", timeout=5.0) as app:
                started = time.perf_counter()
                with pytest.raises(natsrpc.PermissionDenied, match=r"evt\.order\.placed"):
                    await app.emit("order.placed", {"id": 1}, durable=True)
                assert time.perf_counter() - started < 2.5
                assert app.nc.is_connected


class SecStore(Service):
    """A store whose reads are cached; ``put`` invalidates the key it wrote."""

    name = "secstore"

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.reads = 0

    @rpc(idempotent=True, cache_ttl=30.0)
    async def get(self, key: str) -> str | None:
        """Reads a key (counted)."""
        self.reads += 1
        return self.data.get(key)

    @rpc
    async def put(self, key: str, value: str) -> None:
        """Writes a key, then makes every client drop its kept reads of it."""
        self.data[key] = value
        await self.invalidate("get", key=key)


class TestRefusedInvalidations:
    """Cache invalidations the server's permissions stop: a service is told its invalidation did
    not go out, and a client that cannot hear them keeps no reply (one kept could outlive a write)."""

    async def test_a_refused_invalidation_raises_at_once(self, tmp_path: Path) -> None:
        # The service's identity may beat, answer and be asked discovery, not publish invalidations.
        config = one_narrow_user(tmp_path, "noinval", ["svc._hb.>", "_INBOX.>"], ["svc.>", "$SRV.>"])
        with NatsServer(config=config) as server:
            store = SecStore()
            async with (
                as_narrow(server, "noinval", timeout=5.0) as service_nc,
                natsrpc.connect(server.url, user="srv", password="srvpass") as app,
                serve(service_nc, store),
            ):
                started = time.perf_counter()
                with pytest.raises(natsrpc.PermissionDenied, match=r"svc\._inval\.secstore"):
                    await store.invalidate("get", key="a")
                assert time.perf_counter() - started < 1.0  # not the client's 5 s timeout
                with pytest.raises(natsrpc.RemoteError, match=r"PermissionDenied.*svc\._inval\.secstore"):
                    await app.call_service["secstore"].put("a", "1")  # the writer's caller is told too
                assert service_nc.nc.is_connected

    async def test_a_client_refused_the_invalidations_keeps_nothing(self, tmp_path: Path) -> None:
        # The app may call the store and hear its heartbeats (which carry the TTL), not invalidations.
        config = one_narrow_user(tmp_path, "deaf", ["svc.secstore.>"], ["svc._hb.>"])
        with NatsServer(config=config) as server:
            store = SecStore()
            async with (
                natsrpc.connect(server.url, user="srv", password="srvpass") as service_nc,
                as_narrow(server, "deaf") as app,
                serve(service_nc, store),
            ):
                assert app.registry is not None
                await poll(lambda: ("secstore", "get") in app.registry.cached, "the TTL heard")
                for _ in range(3):
                    assert await app.call_service["secstore"].get("a") is None
                assert store.reads == 3  # every read went out: nothing kept without invalidations
                assert not app.hears_invalidations
                assert len(app.cache) == 0


class TestQueueGroups:
    """A2: only the service's own identity can join its queue group; impostors get nothing."""

    async def test_impostors_cannot_join_or_listen(self, secured: NatsServer, passwords: dict[str, str]) -> None:
        """vdb and app cannot join kv's group q, and kv cannot listen outside it; every call reaches the real kv."""
        async with (
            raw_as(secured, passwords, "vdb") as vdb,
            raw_as(secured, passwords, "app") as app_raw,
            raw_as(secured, passwords, "kv") as kv_raw,
            as_identity(secured, passwords, "kv") as kv_client,
            as_identity(secured, passwords, "app", timeout=5.0) as app,
        ):
            stolen: list[Msg] = []

            async def steal(msg: Msg) -> None:
                stolen.append(msg)

            for raw, queue in ((vdb, "q"), (app_raw, "q"), (kv_raw, "")):
                before = len(raw.violations)
                await raw.nc.subscribe("svc.kv.get", queue=queue, cb=steal)
                await _sync_with_server(raw.nc)
                assert raw.violations[before:] == [("subscription", "svc.kv.get")]
            async with serve(kv_client, KV()):
                await app.call_service["kv"].put("a", "1")
                values = [await app.call_service["kv"].get("a") for _ in range(20)]
            assert values == ["1"] * 20
            for raw in (vdb, app_raw, kv_raw):
                await _sync_with_server(raw.nc)
            assert stolen == []


class TestResponses:
    """A3: a service sends at most one reply per request and publishes nothing else."""

    async def test_second_reply_and_other_publishes_refused(
        self, secured: NatsServer, passwords: dict[str, str]
    ) -> None:
        """kv answering twice, calling vdb and forging vdb's heartbeat: both replies go out (a stream's
        messages all go to one reply subject, up to allow_responses.max), the rest does not."""
        async with raw_as(secured, passwords, "kv") as kv, raw_as(secured, passwords, "app") as app:
            answered = asyncio.Event()

            async def misbehave(msg: Msg) -> None:
                await msg.respond(b'"first"')
                await msg.respond(b'"second"')
                await kv.nc.publish("svc.vdb.upsert", b"{}")
                await kv.nc.publish("svc._hb.vdb.FORGED", b"{}")
                answered.set()

            await kv.nc.subscribe("svc.kv.get", queue="q", cb=misbehave)
            await _sync_with_server(kv.nc)
            replies: list[bytes] = []
            got_one = asyncio.Event()

            async def collect(msg: Msg) -> None:
                replies.append(msg.data)
                got_one.set()

            await app.nc.subscribe("_INBOX_app.a3", cb=collect)
            await app.nc.publish("svc.kv.get", b"{}", reply="_INBOX_app.a3")
            await asyncio.wait_for(asyncio.gather(answered.wait(), got_one.wait()), 5)
            await _sync_with_server(kv.nc)  # the server has judged all four publishes ...
            await _sync_with_server(app.nc)  # ... and anything it let through has reached app
            assert replies == [b'"first"', b'"second"']
            assert kv.violations == [
                ("publish", "svc.vdb.upsert"),  # nats-py lower-cases the server's message
                ("publish", "svc._hb.vdb.forged"),
            ]


class TestInboxes:
    """A4: one identity cannot read another's replies (per-identity inbox prefixes)."""

    async def test_app_cannot_read_memory_replies(self, secured: NatsServer, passwords: dict[str, str]) -> None:
        """app's subscriptions to other inboxes are refused and see nothing while memory calls kv."""
        async with (
            raw_as(secured, passwords, "app") as spy,
            as_identity(secured, passwords, "kv") as kv_client,
            as_identity(secured, passwords, "memory", timeout=5.0) as memory,
            serve(kv_client, KV()),
        ):
            seen: list[Msg] = []

            async def read(msg: Msg) -> None:
                seen.append(msg)

            for subject in ("_INBOX_memory.>", "_INBOX.>", "_INBOX_kv.>", ">"):
                await spy.nc.subscribe(subject, cb=read)
            await _sync_with_server(spy.nc)
            assert [subject for _, subject in spy.violations] == ["_inbox_memory.>", "_inbox.>", "_inbox_kv.>", ">"]
            await memory.call_service["kv"].put("secret", "s3cr3t")
            assert await memory.call_service["kv"].get("secret") == "s3cr3t"
            await _sync_with_server(spy.nc)
            assert seen == []


class TestBadCredentials:
    """A5: refused credentials fail connect within 2 s with AuthenticationFailed, without a reconnect loop."""

    @pytest.mark.parametrize(
        "credentials",
        [
            {"user": "app", "password": "wrong"},
            {"user": "nobody", "password": "x"},
            {"token": "not-a-token"},
            {},
        ],
        ids=["wrong-password", "unknown-user", "token", "none"],
    )
    async def test_connect_fails_fast(self, secured: NatsServer, credentials: dict[str, str]) -> None:
        """connect() raises AuthenticationFailed naming who was refused (never the secret), in < 2 s."""
        refusals_before = secured.read_log().count("authentication error")
        started = time.perf_counter()
        with pytest.raises(natsrpc.AuthenticationFailed, match="refused the credentials") as info:
            await asyncio.wait_for(natsrpc.connect(secured.url, **credentials), 10)
        elapsed = time.perf_counter() - started
        assert elapsed < REFUSED_CONNECT_BUDGET
        assert isinstance(info.value, natsrpc.PermissionDenied)
        message = str(info.value)
        assert "wrong" not in message
        assert "not-a-token" not in message
        if "user" in credentials:
            assert repr(credentials["user"]) in message
        # nats-py tried the server at most twice (FIRST_CONNECT_RETRIES), then gave up for good.
        assert secured.read_log().count("authentication error") - refusals_before <= 2

    async def test_several_servers_fail_fast(self, secured: NatsServer) -> None:
        """With a comma-separated list of URLs, each refusing, connect still fails in < 2 s."""
        urls = f"{secured.url},nats://localhost:{secured.port}"
        started = time.perf_counter()
        with pytest.raises(natsrpc.AuthenticationFailed):
            await asyncio.wait_for(natsrpc.connect(urls, user="app", password="wrong"), 10)
        assert time.perf_counter() - started < REFUSED_CONNECT_BUDGET

    async def test_reconnect_refused_ends_the_connection(self, tmp_path: Path) -> None:
        """When a restarted server refuses the credentials, the connection ends: calls pending and new
        fail with AuthenticationFailed at once, and the client stops reconnecting for good."""
        config = tmp_path / "auth.conf"
        config.write_text('authorization { users: [ { user: app, password: "one" } ] }\n')
        with NatsServer(config=config) as server:
            async with natsrpc.connect(server.url, user="app", password="one", timeout=10.0) as client:
                async with serve(client, Billing()):
                    assert await client.call_service["billing"].charge(1) == 1
                config.write_text('authorization { users: [ { user: app, password: "two" } ] }\n')
                server.restart()
                async with asyncio.timeout(5):
                    while not client.nc.is_reconnecting:  # noqa: ASYNC110 - nats-py offers no event for it
                        await asyncio.sleep(0.005)
                started = time.perf_counter()
                with pytest.raises(natsrpc.AuthenticationFailed):
                    await client.request("svc.billing.while-refused", b"[2]", CallOptions(timeout=10.0))
                assert time.perf_counter() - started < REFUSED_CONNECT_BUDGET
                async with asyncio.timeout(5):
                    while not client.nc.is_closed:  # noqa: ASYNC110 - nats-py offers no event for it
                        await asyncio.sleep(0.005)
                config.write_text('authorization { users: [ { user: app, password: "one" } ] }\n')
                server.restart()  # the server would take the credentials again: the client stays down
                with pytest.raises(natsrpc.AuthenticationFailed, match="refused the credentials on reconnect"):
                    await client.request("svc.billing.later", b"[3]", CallOptions(timeout=1.0))
                assert client.nc.is_closed


# --------------------------------------------------------------------------------------------------
# TLS: certificates made here, servers with client verification.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """Certificate files: a trusted CA and a stranger CA, a server certificate, and client certificates."""

    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate signed by the other CA
    stranger_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "natsrpc"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    usage: str,
) -> x509.Certificate:
    """Returns a certificate for ``key``: a self-signed CA when ``issuer`` is None, else a server or client leaf."""
    now = datetime.datetime.now(datetime.UTC)
    issuer_name = issuer[0].subject if issuer else _name(subject)
    signing_key = issuer[1] if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False)
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    else:
        purpose = ExtendedKeyUsageOID.SERVER_AUTH if usage == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        if usage == "server":
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _write(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Makes the certificates of the TLS tests (P-256 keys: fast to generate)."""
    directory = tmp_path_factory.mktemp("pki")
    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in ("ca", "other", "server", "app", "stranger")}
    ca = _certificate("natsrpc test CA", keys["ca"], None, "ca")
    other = _certificate("stranger CA", keys["other"], None, "ca")
    ca_path, _ = _write(directory, "ca", ca, keys["ca"])
    other_path, _ = _write(directory, "other-ca", other, keys["other"])
    server = _write(
        directory, "server", _certificate("server", keys["server"], (ca, keys["ca"]), "server"), keys["server"]
    )
    app = _write(directory, "app", _certificate("app", keys["app"], (ca, keys["ca"]), "client"), keys["app"])
    stranger_cert = _certificate("app", keys["stranger"], (other, keys["other"]), "client")
    stranger = _write(directory, "stranger", stranger_cert, keys["stranger"])
    return Pki(ca_path, other_path, *server, *app, *stranger)


def tls_config(pki: Pki, directory: Path, extra: str = "") -> Path:
    """Writes a server config requiring TLS with verified client certificates; returns its path."""
    path = directory / "tls.conf"
    path.write_text(
        "tls {\n"
        f'  cert_file: "{pki.server_cert}"\n  key_file: "{pki.server_key}"\n  ca_file: "{pki.ca}"\n'
        f"  {'verify_and_map' if extra else 'verify'}: true\n  timeout: 2\n"
        "}\n" + extra
    )
    return path


@pytest.fixture(scope="module")
def tls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server that requires TLS and a client certificate signed by the test CA (verify: true)."""
    with NatsServer(config=tls_config(pki, tmp_path_factory.mktemp("tls"))) as server:
        yield server


SECRET = "s3cret-" + secrets.token_hex(8)


class Impostor:
    """A plaintext NATS impostor on loopback: sends an INFO without TLS, records every byte it receives."""

    def __init__(self) -> None:
        self.received = b""
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        info = {"server_id": "impostor", "version": "2.15.1", "proto": 1, "headers": True, "max_payload": 1048576}
        writer.write(b"INFO " + json.dumps({**info, "auth_required": True, "port": self.port}).encode() + b"\r\n")
        try:
            await writer.drain()
            while data := await reader.read(4096):
                self.received += data
        except OSError:
            pass
        finally:
            writer.close()


@pytest.fixture
async def plaintext_impostor() -> AsyncIterator[Impostor]:
    """A fake plaintext NATS server on a free loopback port."""
    impostor = Impostor()
    await impostor.start()
    yield impostor
    await impostor.stop()


class TestTls:
    """A6: the TLS server takes only clients with a certificate from its CA, over TLS."""

    async def test_mutual_tls_call_succeeds(self, tls_server: NatsServer, pki: Pki) -> None:
        """With the CA, a client certificate and its key, a service is hosted and called over mTLS."""
        files = {"tls_ca": str(pki.ca), "tls_cert": str(pki.client_cert), "tls_key": str(pki.client_key)}
        async with natsrpc.connect(tls_server.url, **files) as host, natsrpc.connect(tls_server.url, **files) as caller:
            assert host.nc._server_info["tls_required"]
            async with serve(host, Billing()):
                assert await caller.call_service["billing"].charge(7) == 7

    @pytest.mark.parametrize(
        "case",
        ["no-client-cert", "client-cert-from-other-ca", "server-not-trusted", "no-tls-options"],
    )
    async def test_rejected(self, tls_server: NatsServer, pki: Pki, case: str) -> None:
        """A missing or foreign client certificate, or an untrusted server, fails connect within 2 s."""
        options = {
            "no-client-cert": {"tls_ca": str(pki.ca)},
            "client-cert-from-other-ca": {
                "tls_ca": str(pki.ca), "tls_cert": str(pki.stranger_cert), "tls_key": str(pki.stranger_key),
            },
            "server-not-trusted": {
                "tls_ca": str(pki.other_ca), "tls_cert": str(pki.client_cert), "tls_key": str(pki.client_key),
            },
            "no-tls-options": {},  # nats-py upgrades anyway and checks the server against the system CAs
        }[case]  # fmt: skip
        started = time.perf_counter()
        with pytest.raises(natsrpc.ConnectionLost):
            await asyncio.wait_for(natsrpc.connect(tls_server.url, **options), 10)
        assert time.perf_counter() - started < REFUSED_CONNECT_BUDGET

    def test_plaintext_client_rejected(self, tls_server: NatsServer) -> None:
        """A client speaking plain NATS to the TLS port is cut off without a PONG."""
        with socket.create_connection((tls_server.host, tls_server.port), timeout=2) as sock:
            info = sock.recv(4096)
            assert info.startswith(b"INFO")
            assert b'"tls_required":true' in info
            sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
            answer = b""
            try:
                while chunk := sock.recv(4096):
                    answer += chunk
            except (TimeoutError, ConnectionResetError):
                pass
            assert b"PONG" not in answer

    @pytest.mark.parametrize("credential", ["password", "token"])
    async def test_tls_options_refuse_a_plaintext_server_before_connect(
        self, pki: Pki, plaintext_impostor: Impostor, credential: str
    ) -> None:
        """TLS options against a server whose INFO offers no TLS raise ConfigurationError, and not one
        byte of CONNECT, let alone the credential, reaches that server."""
        options = {"password": {"user": "app", "password": SECRET}, "token": {"token": SECRET}}[credential]
        with pytest.raises(natsrpc.ConfigurationError, match="does not use TLS"):
            await asyncio.wait_for(natsrpc.connect(plaintext_impostor.url, tls_ca=str(pki.ca), **options), 10)
        assert plaintext_impostor.connections >= 1
        assert b"CONNECT" not in plaintext_impostor.received
        assert SECRET.encode() not in plaintext_impostor.received

    async def test_a_plaintext_server_learnt_from_the_cluster_is_refused_on_reconnect(
        self, pki: Pki, plaintext_impostor: Impostor, tmp_path: Path
    ) -> None:
        """A server advertised in the cluster's INFO that turns out plaintext gets no CONNECT on reconnect."""
        route_port = free_port()
        tls = (
            f'tls {{ cert_file: "{pki.server_cert}", key_file: "{pki.server_key}", ca_file: "{pki.ca}", '
            "verify: true, timeout: 2 }\n"
        )
        auth = f'authorization {{ users: [ {{ user: app, password: "{SECRET}" }} ] }}\n'
        (tmp_path / "a.conf").write_text(tls + auth + f"cluster {{ name: c, listen: 127.0.0.1:{route_port} }}\n")
        (tmp_path / "b.conf").write_text(
            auth
            + f'client_advertise: "127.0.0.1:{plaintext_impostor.port}"\n'
            + f"cluster {{ name: c, listen: 127.0.0.1:-1, routes: [nats-route://127.0.0.1:{route_port}] }}\n"
        )
        files = {"tls_ca": str(pki.ca), "tls_cert": str(pki.client_cert), "tls_key": str(pki.client_key)}
        with NatsServer(config=tmp_path / "a.conf") as a, NatsServer(config=tmp_path / "b.conf"):
            client = await natsrpc.connect(a.url, user="app", password=SECRET, reconnect_time_wait=0.05, **files)
            try:
                async with asyncio.timeout(10):  # the cluster forms, then A's INFO names B's advertised URL
                    while not any(s.uri.port == plaintext_impostor.port for s in client.nc._server_pool):  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                a.stop()
                async with asyncio.timeout(10):
                    while plaintext_impostor.connections < 2:  # noqa: ASYNC110 - the client tries it on reconnect
                        await asyncio.sleep(0.01)
            finally:
                await client.close()
        assert b"CONNECT" not in plaintext_impostor.received
        assert SECRET.encode() not in plaintext_impostor.received

    async def test_verify_and_map_picks_the_user(self, pki: Pki, tmp_path: Path) -> None:
        """With verify_and_map, the certificate's subject selects the user and its permissions."""
        users = (
            'authorization { users: [ { user: "CN=app,O=natsrpc", '
            'permissions: { publish: ["svc.kv.>"], subscribe: ["_INBOX_app.>"] } } ] }\n'
        )
        with NatsServer(config=tls_config(pki, tmp_path, users)) as server:
            files = {"tls_ca": str(pki.ca), "tls_cert": str(pki.client_cert), "tls_key": str(pki.client_key)}
            async with natsrpc.connect(server.url, inbox_prefix="_INBOX_app", **files) as client:
                with pytest.raises(natsrpc.NoResponders):
                    await client.call_service["kv"].get("a")
                with pytest.raises(natsrpc.PermissionDenied):
                    await client.call_service["billing"].charge(1)
