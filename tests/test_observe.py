"""Prometheus metrics and the health endpoints, against a real nats-server and real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
from children import REPO, child, poll
from nats.aio.msg import Msg
from prometheus_client.parser import text_string_to_metric_families

import natsrpc
import natsrpc.circuit
import natsrpc.retry
from natsrpc import Service, ServiceError, rpc
from natsrpc.observe.health import HealthServer
from natsrpc.observe.metrics import Metrics
from natsrpc.testing import serve


class Flaky(Service):
    """Answers, or fails as asked: its counters can be predicted."""

    name = "obsflaky"

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.running = asyncio.Event()
        self.fit = True

    async def health(self) -> bool:
        return self.fit

    @rpc
    async def maybe(self, fail: bool = False) -> str:
        if fail:
            raise RuntimeError("asked to fail")
        return "ok"

    @rpc
    async def refuse(self) -> None:
        raise ServiceError(409, "conflict")

    @rpc
    async def hold(self) -> None:
        self.running.set()
        await self.gate.wait()

    @rpc
    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i


async def http_get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request to 127.0.0.1:``port``; returns the status, headers and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a Prometheus exposition, by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
async def observed(client: natsrpc.Client) -> AsyncIterator[tuple[Metrics, HealthServer, natsrpc.Host, Flaky]]:
    """Flaky hosted with a Metrics middleware, and a health server on a free loopback port."""
    metrics = Metrics()
    service = Flaky()
    async with serve(client, service, middleware=[metrics]) as host:
        async with HealthServer(0, "127.0.0.1", host.readiness, metrics) as health:
            yield metrics, health, host, service


class TestServerMetrics:
    async def test_ten_calls_two_failing_read_eight_and_two(
        self, client: natsrpc.Client, observed: tuple[Metrics, HealthServer, natsrpc.Host, Flaky]
    ) -> None:
        """After 10 calls of which 2 raise, the scraped counters read 8 (code 200) and 2 (code 500)."""
        _, health, _, _ = observed
        for i in range(10):
            call = client.call_service["obsflaky"].maybe(fail=i in (3, 7))
            if i in (3, 7):
                with pytest.raises(natsrpc.InternalError):
                    await call
            else:
                assert await call == "ok"
        status, headers, body = await http_get(health.port, "/metrics")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain")
        got = samples(body.decode())
        ok = (("code", "200"), ("method", "maybe"), ("service", "obsflaky"))
        failed = (("code", "500"), ("method", "maybe"), ("service", "obsflaky"))
        assert got[("natsrpc_server_requests_total", ok)] == 8
        assert got[("natsrpc_server_requests_total", failed)] == 2
        duration = (("method", "maybe"), ("service", "obsflaky"))
        assert got[("natsrpc_server_request_duration_seconds_count", duration)] == 10
        assert got[("natsrpc_server_in_flight", (("service", "obsflaky"),))] == 0

    async def test_service_errors_keep_their_code_and_streams_count_once(
        self, client: natsrpc.Client, observed: tuple[Metrics, HealthServer, natsrpc.Host, Flaky]
    ) -> None:
        """A ServiceError counts under its own code; a whole stream is one request."""
        metrics, _, _, _ = observed
        with pytest.raises(natsrpc.RemoteError):
            await client.call_service["obsflaky"].refuse()
        assert [i async for i in client.call_service["obsflaky"].count(5)] == [0, 1, 2, 3, 4]
        got = samples(metrics.exposition().decode())
        assert got[("natsrpc_server_requests_total", (("code", "409"), ("method", "refuse"), ("service", "obsflaky")))]
        assert got[("natsrpc_server_requests_total", (("code", "200"), ("method", "count"), ("service", "obsflaky")))]

    async def test_in_flight_and_rejections(self, client: natsrpc.Client) -> None:
        """A held call shows in natsrpc_server_in_flight; a 429 refused before the handler counts as overloaded."""
        metrics = Metrics()
        service = Flaky()
        async with serve(client, service, middleware=[metrics], max_concurrency=1, max_queue=0):
            held = asyncio.ensure_future(client.call_service["obsflaky"].hold())
            await service.running.wait()
            got = samples(metrics.exposition().decode())
            assert got[("natsrpc_server_in_flight", (("service", "obsflaky"),))] == 1
            with pytest.raises(natsrpc.Overloaded):
                await client.call_service["obsflaky"].options(retry=natsrpc.retry.NO_RETRIES).maybe()
            service.gate.set()
            await held
        got = samples(metrics.exposition().decode())
        assert got[("natsrpc_server_rejected_total", (("reason", "overloaded"), ("service", "obsflaky")))] == 1
        assert got[("natsrpc_server_in_flight", (("service", "obsflaky"),))] == 0

    async def test_requests_refused_as_bad_count_as_bad_request(
        self, client: natsrpc.Client, observed: tuple[Metrics, HealthServer, natsrpc.Host, Flaky]
    ) -> None:
        """Arguments that do not fit, a bad Natsrpc-Caller, a bad deadline header and a stream asked
        with no reply subject are each answered 400 before the handler, and counted as bad_request:
        a peer sending garbage shows in the metrics, not only in $SRV.STATS."""
        metrics, _, _, _ = observed
        nc = client.nc
        for body, headers in (
            (b'{"fail": "not a bool"}', None),
            (b"[true, 1, 2]", None),
            (b"not json", None),
            (b"[]", {natsrpc.protocol.CALLER: "c" * 257}),
            (b"[]", {natsrpc.protocol.DEADLINE: "soon"}),
        ):
            reply = await nc.request("svc.obsflaky.maybe", body, timeout=5, headers=headers)
            assert (reply.headers or {}).get(natsrpc.protocol.ERROR_CODE) == "400", reply
        await nc.publish("svc.obsflaky.count", b"[3]")  # no reply subject: nowhere to stream
        reply = await nc.request("svc.obsflaky.maybe", b"[]", timeout=5)  # behind it on the same connection
        assert reply.data == b'"ok"'
        got = samples(metrics.exposition().decode())
        assert got[("natsrpc_server_rejected_total", (("reason", "bad_request"), ("service", "obsflaky")))] == 6
        served = (("code", "200"), ("method", "maybe"), ("service", "obsflaky"))
        assert got[("natsrpc_server_requests_total", served)] == 1


class TestClientMetrics:
    async def test_calls_outcomes_retries_and_circuit_state(self, nats_url: str, client: natsrpc.Client) -> None:
        """A client's Metrics count calls by caller and outcome, retries, and the circuit's state."""
        metrics = Metrics()
        config = natsrpc.circuit.CircuitConfig(min_calls=2, failure_rate=0.5)
        policy = natsrpc.retry.RetryPolicy(max_attempts=2, initial_backoff=0.001, max_backoff=0.002)
        async with (
            serve(client, Flaky()),
            natsrpc.connect(nats_url, middleware=[metrics], circuit=config, discovery=False) as app,
        ):
            for _ in range(3):
                assert await app.call_service["obsflaky"].maybe() == "ok"
            with pytest.raises(natsrpc.RemoteError):
                await app.call_service["obsflaky"].refuse()
            for _ in range(2):
                with pytest.raises(natsrpc.NoResponders):
                    await app.call_service["obsgone"].options(retry=policy, idempotent=True).get()
            with pytest.raises(natsrpc.CircuitOpen):
                await app.call_service["obsgone"].get()
        got = samples(metrics.exposition().decode())

        def calls(service: str, method: str, outcome: str) -> float:
            key = (("caller", "client"), ("method", method), ("outcome", outcome), ("service", service))
            return got.get(("natsrpc_client_requests_total", key), 0)

        assert calls("obsflaky", "maybe", "ok") == 3
        assert calls("obsflaky", "refuse", "error") == 1
        assert calls("obsgone", "get", "no_responders") == 2
        assert calls("obsgone", "get", "circuit_open") == 1
        assert got[("natsrpc_client_retries_total", (("service", "obsgone"),))] == 2
        assert got[("natsrpc_client_circuit_state", (("service", "obsgone"),))] == 2  # open
        timing = (("caller", "client"), ("method", "maybe"), ("service", "obsflaky"))
        assert got[("natsrpc_client_request_duration_seconds_count", timing)] == 3

    async def test_a_handlers_calls_are_labelled_with_its_service(self, nats_url: str, client: natsrpc.Client) -> None:
        """Calls a service makes carry ``caller`` = that service's name."""
        metrics = Metrics()

        class Relay(Service):
            name = "obsrelay"

            @rpc
            async def relay(self) -> str:
                result: str = await self.call_service["obsflaky"].maybe()
                return result

        async with natsrpc.connect(nats_url, middleware=[metrics]) as hosting:
            async with serve(hosting, Relay(), middleware=[metrics]), serve(client, Flaky()):
                assert await client.call_service["obsrelay"].relay() == "ok"
        got = samples(metrics.exposition().decode())
        key = (("caller", "obsrelay"), ("method", "maybe"), ("outcome", "ok"), ("service", "obsflaky"))
        assert got[("natsrpc_client_requests_total", key)] == 1
        served = (("code", "200"), ("method", "relay"), ("service", "obsrelay"))
        assert got[("natsrpc_server_requests_total", served)] == 1

    def test_an_application_registry_is_used(self) -> None:
        """``Metrics(registry=...)`` registers in the application's registry, beside its own metrics."""
        import prometheus_client

        registry = prometheus_client.CollectorRegistry()
        prometheus_client.Counter("app_things", "the application's own", registry=registry)
        Metrics(registry=registry)
        text = prometheus_client.generate_latest(registry).decode()
        assert "app_things_total" in text
        assert "natsrpc_server_in_flight" in text


class TestHealthEndpoints:
    async def test_healthz_readyz_and_errors(self, observed: tuple[Metrics, HealthServer, natsrpc.Host, Flaky]) -> None:
        """/healthz is 200; /readyz is 200 while healthy and 503 naming the unhealthy service; others 404/405."""
        _, health, _, service = observed
        status, _, body = await http_get(health.port, "/healthz")
        assert (status, json.loads(body)) == (200, {"live": True})
        status, _, body = await http_get(health.port, "/readyz")
        assert status == 200
        assert json.loads(body)["ready"] is True
        service.fit = False
        status, _, body = await http_get(health.port, "/readyz?verbose=1")
        assert status == 503
        assert json.loads(body)["reasons"] == [f"{next(iter(json.loads(body)['services']))}: health() is false"]
        assert (await http_get(health.port, "/nothing"))[0] == 404
        assert (await http_get(health.port, "/healthz", method="POST"))[0] == 405
        status, _, body = await http_get(health.port, "/healthz", method="HEAD")
        assert (status, body) == (200, b"")

    async def test_a_garbage_or_endless_request_head_is_refused(
        self, observed: tuple[Metrics, HealthServer, natsrpc.Host, Flaky]
    ) -> None:
        """A head over 8 KiB and a request line that is not HTTP get 400; the server keeps serving."""
        _, health, _, _ = observed
        reader, writer = await asyncio.open_connection("127.0.0.1", health.port)
        writer.write(b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n")
        await writer.drain()
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 400")
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", health.port)
        writer.write(b"hello\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 400")
        writer.close()
        assert (await http_get(health.port, "/healthz"))[0] == 200

    async def test_a_peer_that_stops_reading_is_cut_off(self) -> None:
        """A scraper that asks for /metrics and reads nothing is dropped after the write timeout: its
        connection closes with the answer untaken, and the server keeps serving."""

        class Huge:
            CONTENT_TYPE = "text/plain"

            def exposition(self) -> bytes:
                return b"x" * (64 << 20)  # far over what the socket buffers hold

        async with HealthServer(0, "127.0.0.1", metrics=Huge(), write_timeout=0.3) as health:
            reader, writer = await asyncio.open_connection("127.0.0.1", health.port, limit=1 << 16)
            writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
            await writer.drain()
            await poll(lambda: health.connections == 0, "the stalled connection dropped")
            taken = 0
            with contextlib.suppress(ConnectionError):
                while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
                    taken += len(chunk)
            assert taken < 64 << 20
            writer.close()
            assert (await http_get(health.port, "/healthz"))[0] == 200

    async def test_connections_over_the_limit_are_closed_at_once(self) -> None:
        """With 2 connections open (idle), a third is closed unanswered, well before the 5 s read
        timeout; once they close, requests are answered again. Stopping closes idle ones at once."""
        async with HealthServer(0, "127.0.0.1", max_connections=2) as health:
            idle = [await asyncio.open_connection("127.0.0.1", health.port) for _ in range(2)]
            await poll(lambda: health.connections == 2, "two connections open")
            reader, writer = await asyncio.open_connection("127.0.0.1", health.port)
            writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), 2) == b""
            writer.close()
            for _, idle_writer in idle:
                idle_writer.close()
            await poll(lambda: health.connections == 0, "the idle connections closed")
            assert (await http_get(health.port, "/healthz"))[0] == 200
            idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", health.port)
            await poll(lambda: health.connections == 1, "one connection open")
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(idle_reader.read(), 1) == b""
        idle_writer.close()

    async def test_readyz_turns_503_while_the_host_drains(
        self, client: natsrpc.Client, observed: tuple[Metrics, HealthServer, natsrpc.Host, Flaky]
    ) -> None:
        """During a graceful stop (a call in flight) /readyz is 503 saying draining; the call still succeeds."""
        _, health, host, service = observed
        held = asyncio.ensure_future(client.call_service["obsflaky"].hold())
        await service.running.wait()
        stopping = asyncio.ensure_future(host.stop())
        await poll(lambda: host.instances[0].draining, "the host drains")
        status, _, body = await http_get(health.port, "/readyz")
        assert status == 503
        assert json.loads(body)["reasons"][0].startswith("draining")
        service.gate.set()
        await held
        await stopping


class TestRunner:
    async def test_metrics_port_serves_metrics_and_readyz_through_a_graceful_stop(self, nats_url: str) -> None:
        """``--metrics-port``: /readyz 200 once serving, /metrics counts a call, /readyz 503 while draining."""
        async with child(
            "-m", "natsrpc.run", "tests.slow_service", "--url", nats_url, "--metrics-port", "0",
            "--metrics-host", "127.0.0.1", "--log-format", "console",
        ) as runner:  # fmt: skip
            port = int((await runner.wait_for_line(re.compile(r"http://127\.0\.0\.1:(\d+)"))).group(1))

            async def ready() -> int:
                assert runner.proc.returncode is None, runner.stderr
                return (await http_get(port, "/readyz"))[0]

            async def until(wanted: int) -> None:
                async with asyncio.timeout(15):
                    while await ready() != wanted:  # noqa: ASYNC110 - another process's state, read over HTTP
                        await asyncio.sleep(0.01)

            await until(200)
            async with natsrpc.connect(nats_url) as local:
                started = asyncio.Event()

                async def on_started(_msg: Msg) -> None:
                    started.set()

                await local.nc.subscribe("test.started", cb=on_started)
                assert await local.call_service["slowrun"].ping() == "pong"
                text = (await http_get(port, "/metrics"))[2].decode()
                served = (("code", "200"), ("method", "ping"), ("service", "slowrun"))
                assert samples(text)[("natsrpc_server_requests_total", served)] == 1
                call = asyncio.ensure_future(local.call_service["slowrun"].options(timeout=20).work(1, 1.5))
                await asyncio.wait_for(started.wait(), 10)
                runner.proc.send_signal(signal.SIGTERM)
                await until(503)  # while the call in flight drains
                assert not call.done()
                assert await call == 1
            assert await runner.wait() == 0, runner.stderr

    def test_bad_middleware_specs_are_one_line_errors(self) -> None:
        """``--middleware`` naming nothing usable exits 2 with one line saying why."""
        for spec, why in [
            ("nosuchmodule:X", "--middleware 'nosuchmodule:X': cannot import 'nosuchmodule'"),
            ("tests.slow_service", "give module:attr"),
            ("tests.slow_service:Nothing", "has no attribute"),
            ("tests.slow_service:STARTED_SUBJECT", "is not callable"),
        ]:
            run = subprocess.run(
                [sys.executable, "-m", "natsrpc.run", "tests.slow_service", "--middleware", spec, "--url",
                 "nats://127.0.0.1:1"],
                cwd=REPO, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert run.returncode == 2, (spec, run.stderr)
            assert why in run.stderr, (spec, run.stderr)


@pytest.mark.parametrize("port", [-1, 65536, 99999, True, "9464"])
def test_a_port_that_cannot_be_is_refused(port: object) -> None:
    """HealthServer refuses a port outside 0-65535 when it is made (binding it raised OverflowError)."""
    with pytest.raises(natsrpc.ConfigurationError, match="port must be 0-65535"):
        HealthServer(port)  # type: ignore[arg-type]


def test_import_natsrpc_needs_no_optional_extra() -> None:
    """``import natsrpc`` (and the middleware module) never imports prometheus-client or OpenTelemetry."""
    code = (
        "import sys, natsrpc, natsrpc.observe, natsrpc.run; "
        "print(sorted(m for m in sys.modules if m.startswith(('prometheus_client', 'opentelemetry'))))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert run.stdout.strip() == "[]"
