"""Tests of discovery against a real nats-server: ``$SRV`` replies, heartbeats (announce) and the registry.

``$SRV`` replies are read with a plain nats-py connection (as ``nats micro`` reads them) and validated
against the official NATS micro JSON schemas (``micro_schemas``). The CLI that reads them is tested in
``test_inspect_cli.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any

import nats
import pytest
import pytest_asyncio
import structlog.testing
from children import child_env, poll
from micro_schemas import VALIDATORS, validate
from nats.aio.client import Client as NatsConnection
from nats.aio.msg import Msg

import natsrpc
from natsrpc import Service, ServiceError, protocol, rpc
from natsrpc.circuit import CircuitConfig, State
from natsrpc.host import Host
from natsrpc.instance import LatencyHistogram
from natsrpc.protocol import Heartbeat
from natsrpc.registry import EXPIRY_INTERVALS, InstanceState, Registry
from natsrpc.testing import serve
from natsrpc.transport import sync_with_server
from services.kv import KV

INTERVAL = 0.1  # heartbeat interval of the services hosted here
WAIT = 5.0  # the longest any poll below waits for its condition
SLACK = 0.25  # scheduling delay allowed on top of protocol times (the test machine is shared and loaded)

# --------------------------------------------------------------------------------------------------
# Services (module level, names unique in the test session: the server is shared).
# --------------------------------------------------------------------------------------------------


class Counted(Service):
    """Answers, refuses and crashes on demand, so its ``$SRV.STATS`` counters can be predicted."""

    name = "discstats"
    version = "2.1.0"
    description = "Stats under test"
    metadata = {"team": "core", "tier": "2"}  # noqa: RUF012 - the Service API declares a class-level mapping

    @rpc(idempotent=True)
    async def echo(self, text: str) -> str:
        """Returns ``text``."""
        return text

    @rpc
    async def refuse(self, code: int) -> None:
        """Raises a business error with ``code``."""
        raise ServiceError(code, f"refused with {code}")

    @rpc(name="crash-now")
    async def crash(self) -> None:
        """Raises an unexpected exception (a 500)."""
        raise RuntimeError("boom")


class Pulse(Service):
    """Beats with a health flag the test flips; ``hold`` keeps a call in flight until released."""

    name = "discpulse"
    version = "3.0.1"

    def __init__(self, *, hang: bool = False) -> None:
        self.fit: bool | None = True  # None: health() raises
        self.hang = hang  # health() never returns
        self.release = asyncio.Event()

    async def health(self) -> bool:
        """Returns the flag the test set (raises when it is None, never returns when hanging)."""
        if self.hang:
            await asyncio.Event().wait()
        if self.fit is None:
            raise RuntimeError("health probe broke")
        return self.fit

    @rpc
    async def hold(self) -> None:
        """Returns once the test releases it."""
        await self.release.wait()

    @rpc(idempotent=True)
    async def look(self) -> str:
        """Returns ``"ok"``."""
        return "ok"


# --------------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------------


def nulls(value: Any, path: str = "") -> list[str]:
    """Returns the paths of every null inside ``value``."""
    if value is None:
        return [path or "/"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in nulls(v, f"{path}/{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in nulls(v, f"{path}/{i}")]
    return []


async def ask(nc: NatsConnection, subject: str, expect: set[str], window: float = 0.05) -> list[dict[str, Any]]:
    """Publishes an empty ``$SRV`` request and returns every reply.

    Replies are collected until each id in ``expect`` answered, then for ``window`` more seconds so
    that any extra (duplicate) reply is caught too.
    """
    replies: list[dict[str, Any]] = []

    async def collect(msg: Msg) -> None:
        replies.append(json.loads(msg.data))

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(subject, b"", reply=inbox)
        await poll(lambda: expect <= {r.get("id") for r in replies}, f"replies from {sorted(expect)} to {subject}")
        await asyncio.sleep(window)  # a bounded collection window: any number of instances may answer
    finally:
        await sub.unsubscribe()
    return replies


async def ask_one(nc: NatsConnection, verb: str, service: str, instance_id: str) -> dict[str, Any]:
    """Returns one instance's reply to ``$SRV.<verb>.<service>.<id>``, validated against its schema."""
    msg = await nc.request(f"$SRV.{verb}.{service}.{instance_id}", b"", timeout=2)
    reply: dict[str, Any] = json.loads(msg.data)
    validate(verb, reply)
    return reply


def endpoint(reply: dict[str, Any], name: str) -> dict[str, Any]:
    """Returns the endpoint called ``name`` of an INFO or STATS reply."""
    found: dict[str, Any] = next(e for e in reply["endpoints"] if e["name"] == name)
    return found


class Beats:
    """Every heartbeat published on ``svc._hb.>``, as (monotonic arrival time, decoded JSON)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, dict[str, Any]]] = []

    async def on_msg(self, msg: Msg) -> None:
        self.seen.append((time.monotonic(), json.loads(msg.data)))

    def of(self, instance_id: str) -> list[tuple[float, dict[str, Any]]]:
        """Returns the beats of one instance, oldest first."""
        return [(t, b) for t, b in self.seen if b["id"] == instance_id]


@pytest_asyncio.fixture
async def nc(nats_url: str) -> AsyncIterator[NatsConnection]:
    """A plain nats-py connection, as ``nats micro`` or a non-Python tool would use."""
    conn = await nats.connect(nats_url)
    try:
        yield conn
    finally:
        await conn.drain()


@pytest_asyncio.fixture
async def beats(nc: NatsConnection) -> AsyncIterator[Beats]:
    """Heartbeats seen by a plain subscriber to ``svc._hb.>`` (subscribed before the test's hosts start)."""
    log = Beats()
    sub = await nc.subscribe("svc._hb.>", cb=log.on_msg)
    await sync_with_server(nc)  # nc.flush() can return before the SUB is sent
    try:
        yield log
    finally:
        await sub.unsubscribe()


@pytest_asyncio.fixture
async def kv_pair(client: natsrpc.Client, nats_url: str) -> AsyncIterator[list[str]]:
    """Two KV instances on two connections; yields their instance ids."""
    async with AsyncExitStack() as stack:
        other = await stack.enter_async_context(natsrpc.connect(nats_url))
        first = await stack.enter_async_context(serve(client, KV(), heartbeat_interval=INTERVAL))
        second = await stack.enter_async_context(serve(other, KV(), heartbeat_interval=INTERVAL))
        yield [first.instances[0].id, second.instances[0].id]


@pytest_asyncio.fixture
async def counted(client: natsrpc.Client) -> AsyncIterator[str]:
    """One Counted instance; yields its id."""
    async with serve(client, Counted(), heartbeat_interval=INTERVAL) as host:
        yield host.instances[0].id


class TestSurvey:
    """registry.survey() collects the $SRV replies of any number of instances, and no longer than it must."""

    async def test_nobody_subscribed_ends_it_at_once(self, client: natsrpc.Client) -> None:
        """With no instance of the service, the server's no-responders status ends a 5 s survey at once."""
        started = time.monotonic()
        assert await natsrpc.registry.survey(client.nc, "INFO", "nosuchsvc", wait=5.0) == []
        assert time.monotonic() - started < 2.5

    async def test_quiet_ends_it_after_the_replies_but_waits_for_a_late_first_one(
        self, client: natsrpc.Client, nc: NatsConnection
    ) -> None:
        """With ``quiet``, a survey ends soon after the replies stop, well before ``wait``; and a
        first reply slower than ``quiet`` (a stalled instance) is still waited for and kept."""
        delay = 0.0

        async def answer(msg: Msg) -> None:
            await asyncio.sleep(delay)
            info = {"name": "late", "id": "l1", "version": "1.0.0", "metadata": {}, "endpoints": []}
            await nc.publish(msg.reply, json.dumps(info).encode())

        await nc.subscribe("$SRV.INFO.late", cb=answer)
        await sync_with_server(nc)
        async with serve(client, KV()):
            started = time.monotonic()
            replies = await natsrpc.registry.survey(client.nc, "INFO", "kv", wait=5.0, quiet=0.1)
            assert [reply["name"] for reply, _ in replies] == ["kv"]
            assert time.monotonic() - started < 2.5  # ended by quiet, not by wait
        delay = 0.5  # five times quiet
        replies = await natsrpc.registry.survey(client.nc, "INFO", "late", wait=5.0, quiet=0.1)
        assert [(reply["name"], seconds >= delay) for reply, seconds in replies] == [("late", True)]


class TestSchemaHarness:
    """The validators used here reject what ``nats micro`` would reject, so a passing reply means something."""

    STATS_REPLY: dict[str, Any] = {  # noqa: RUF012 - read-only table data
        "type": "io.nats.micro.v1.stats_response",
        "name": "kv",
        "id": "abc",
        "version": "1.0.0",
        "metadata": {},
        "started": "2024-01-01T00:00:00.123456Z",
        "endpoints": [
            {
                "name": "get",
                "subject": "svc.kv.get",
                "queue_group": "q",
                "num_requests": 0,
                "num_errors": 0,
                "last_error": "",
                "processing_time": 0,
                "average_processing_time": 0,
            }
        ],
    }

    def test_a_valid_reply_passes(self) -> None:
        """A well-formed STATS reply has no violations."""
        validate("STATS", self.STATS_REPLY)

    @pytest.mark.parametrize(
        ("path", "value"),
        [
            (("started",), "2024-01-01 00:00:00"),
            (("started",), "2024-13-01T00:00:00Z"),
            (("metadata",), {"replicas": 2}),
            (("version",), "1.0"),
            (("name",), "k.v"),
            (("type",), "io.nats.micro.v1.info_response"),
            (("endpoints", 0, "processing_time"), 1.5),
            (("endpoints", 0, "last_error"), None),
            (("endpoints", 0, "name"), "a.b"),
        ],
        ids=[
            "started-not-rfc3339",
            "started-impossible-date",
            "metadata-not-string",
            "version-not-semver",
            "name-with-dot",
            "wrong-type",
            "float-nanoseconds",
            "null-last-error",
            "endpoint-name-with-dot",
        ],
    )
    def test_a_broken_reply_fails(self, path: tuple[str | int, ...], value: Any) -> None:
        """One wrong field makes the reply invalid."""
        reply = json.loads(json.dumps(self.STATS_REPLY))
        target = reply
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        assert list(VALIDATORS["STATS"].iter_errors(reply))


# --------------------------------------------------------------------------------------------------
# $SRV.PING / INFO / STATS.
# --------------------------------------------------------------------------------------------------

VERB_CASES = ["PING", "INFO", "STATS"]


class TestControlSubjects:
    """Every instance answers ``$SRV.<verb>``, ``.<name>`` and ``.<name>.<id>`` with schema-valid replies."""

    @pytest.mark.parametrize("verb", VERB_CASES)
    async def test_bare_form_gets_one_reply_per_instance(
        self, nc: NatsConnection, kv_pair: list[str], verb: str
    ) -> None:
        """Two instances give two schema-valid replies to the bare subject, one each."""
        replies = await ask(nc, f"$SRV.{verb}", set(kv_pair))
        ours = [r for r in replies if r["id"] in kv_pair]
        assert Counter(r["id"] for r in ours) == Counter(kv_pair)
        for reply in ours:
            validate(verb, reply)
            assert reply["type"] == f"io.nats.micro.v1.{verb.lower()}_response"
            assert reply["name"] == "kv"

    @pytest.mark.parametrize("verb", VERB_CASES)
    async def test_name_form_gets_every_instance_of_that_service(
        self, nc: NatsConnection, kv_pair: list[str], counted: str, verb: str
    ) -> None:
        """``$SRV.<verb>.kv`` reaches both kv instances and no other service."""
        replies = await ask(nc, f"$SRV.{verb}.kv", set(kv_pair))
        assert {r["name"] for r in replies} == {"kv"}
        assert Counter(r["id"] for r in replies if r["id"] in kv_pair) == Counter(kv_pair)
        for reply in replies:
            validate(verb, reply)

    @pytest.mark.parametrize("verb", VERB_CASES)
    async def test_id_form_gets_exactly_that_instance(self, nc: NatsConnection, kv_pair: list[str], verb: str) -> None:
        """``$SRV.<verb>.kv.<id>`` gets one reply, from that instance."""
        for instance_id in kv_pair:
            replies = await ask(nc, f"$SRV.{verb}.kv.{instance_id}", {instance_id})
            assert [r["id"] for r in replies] == [instance_id]
            validate(verb, replies[0])


class TestReplyConventions:
    """The replies follow the conventions ``nats micro`` relies on, beyond what the schemas require."""

    @pytest.mark.parametrize(
        ("verb", "fields"),
        [
            ("PING", {"type", "name", "id", "version", "metadata"}),
            ("INFO", {"type", "name", "id", "version", "metadata", "description", "endpoints"}),
            ("STATS", {"type", "name", "id", "version", "metadata", "started", "endpoints"}),
        ],
        ids=["ping", "info", "stats"],
    )
    async def test_every_field_present_and_never_null(
        self, nc: NatsConnection, counted: str, verb: str, fields: set[str]
    ) -> None:
        """Every field is sent, with ``""`` or ``{}`` rather than null."""
        reply = await ask_one(nc, verb, "discstats", counted)
        assert set(reply) == fields
        assert nulls(reply) == []
        endpoint_fields = {
            "INFO": {"name", "subject", "queue_group", "metadata"},
            "STATS": {
                "name",
                "subject",
                "queue_group",
                "num_requests",
                "num_errors",
                "last_error",
                "processing_time",
                "average_processing_time",
                "data",
            },
        }.get(verb)
        for ep in reply.get("endpoints", []):
            assert set(ep) == endpoint_fields

    async def test_empty_strings_not_null(self, nc: NatsConnection, kv_pair: list[str]) -> None:
        """A service without metadata sends ``{}`` and a fresh endpoint's last_error is ``""``."""
        info = await ask_one(nc, "INFO", "kv", kv_pair[0])
        stats = await ask_one(nc, "STATS", "kv", kv_pair[0])
        assert info["metadata"] == {}
        assert info["description"] == "Key-value store (JetStream bucket kv, or in memory)"
        assert {e["last_error"] for e in stats["endpoints"]} == {""}

    async def test_metadata_values_are_strings(self, nc: NatsConnection, counted: str) -> None:
        """Service metadata goes out as declared, string to string, in every reply."""
        for verb in VERB_CASES:
            reply = await ask_one(nc, verb, "discstats", counted)
            assert reply["metadata"] == {"team": "core", "tier": "2"}
            assert reply["version"] == "2.1.0"

    async def test_endpoints_named_without_dots_with_subject_and_queue_group(
        self, nc: NatsConnection, counted: str
    ) -> None:
        """Each endpoint is listed under its own name with its load-balanced subject and queue group ``q``."""
        for verb in ("INFO", "STATS"):
            reply = await ask_one(nc, verb, "discstats", counted)
            names = sorted(e["name"] for e in reply["endpoints"])
            assert names == ["crash-now", "echo", "refuse"]
            for ep in reply["endpoints"]:
                assert "." not in ep["name"]
                assert ep["subject"] == f"svc.discstats.{ep['name']}"
                assert ep["queue_group"] == "q"

    async def test_endpoint_metadata_carries_json_schemas(self, nc: NatsConnection, counted: str) -> None:
        """Each endpoint's metadata holds its arguments and result JSON schemas as JSON strings."""
        info = await ask_one(nc, "INFO", "discstats", counted)
        for ep in info["endpoints"]:
            metadata = ep["metadata"]
            assert all(isinstance(v, str) for v in metadata.values())
            assert isinstance(json.loads(metadata["arguments_schema"]), dict), ep["name"]
            assert isinstance(json.loads(metadata["result_schema"]), dict), ep["name"]
        assert "text" in json.dumps(json.loads(endpoint(info, "echo")["metadata"]["arguments_schema"]))
        assert json.loads(endpoint(info, "echo")["metadata"]["result_schema"]) == {"type": "string"}
        assert endpoint(info, "echo")["metadata"]["idempotent"] == "true"
        assert endpoint(info, "refuse")["metadata"]["idempotent"] == "false"

    async def test_started_is_utc_with_z_and_times_are_integer_nanoseconds(
        self, nc: NatsConnection, client: natsrpc.Client, counted: str
    ) -> None:
        """``started`` is RFC3339 UTC ending in ``Z``, close to now; durations are integers."""
        await client.call_service["discstats"].echo("x")
        stats = await ask_one(nc, "STATS", "discstats", counted)
        assert stats["started"].endswith("Z")
        started = datetime.fromisoformat(stats["started"].replace("Z", "+00:00"))
        assert abs((datetime.now(UTC) - started).total_seconds()) < 60
        for ep in stats["endpoints"]:
            for field in ("num_requests", "num_errors", "processing_time", "average_processing_time"):
                assert type(ep[field]) is int, (ep["name"], field, ep[field])
        assert endpoint(stats, "echo")["processing_time"] > 0


class TestStats:
    """``$SRV.STATS`` counts requests, errors and handler time per endpoint, and stays schema-valid."""

    async def test_fresh_instance_counts_nothing(self, nc: NatsConnection, counted: str) -> None:
        """Before any request every counter is zero and last_error is empty."""
        stats = await ask_one(nc, "STATS", "discstats", counted)
        for ep in stats["endpoints"]:
            assert (ep["num_requests"], ep["num_errors"], ep["last_error"]) == (0, 0, "")
            assert (ep["processing_time"], ep["average_processing_time"]) == (0, 0)

    async def test_requests_add_counts_and_time(self, nc: NatsConnection, client: natsrpc.Client, counted: str) -> None:
        """Three successful calls count three requests, no error, and their handler time."""
        for i in range(3):
            assert await client.call_service["discstats"].echo(str(i)) == str(i)
        stats = await ask_one(nc, "STATS", "discstats", counted)
        echo = endpoint(stats, "echo")
        assert (echo["num_requests"], echo["num_errors"], echo["last_error"]) == (3, 0, "")
        assert echo["processing_time"] > 0
        assert echo["average_processing_time"] == echo["processing_time"] // 3
        assert endpoint(stats, "refuse")["num_requests"] == 0

    async def test_data_carries_latency_percentiles(
        self, nc: NatsConnection, client: natsrpc.Client, counted: str
    ) -> None:
        """Each endpoint's ``data`` holds p50/p90/p99 in integer nanoseconds: ordered, 0 before any request,
        and no p99 below the average (a percentile is its bucket's upper bound)."""
        fresh = endpoint(await ask_one(nc, "STATS", "discstats", counted), "refuse")["data"]
        assert fresh == {"p50_processing_time": 0, "p90_processing_time": 0, "p99_processing_time": 0}
        for i in range(20):
            await client.call_service["discstats"].echo(str(i))
        stats = await ask_one(nc, "STATS", "discstats", counted)
        validate("STATS", stats)
        echo = endpoint(stats, "echo")
        p50, p90, p99 = (echo["data"][f"p{q}_processing_time"] for q in (50, 90, 99))
        assert all(type(p) is int for p in (p50, p90, p99))
        assert 0 < p50 <= p90 <= p99
        assert p99 >= echo["average_processing_time"]


class TestLatencyHistogram:
    """The bounded histogram behind the STATS percentiles."""

    def test_percentiles_are_within_a_bucket_of_the_exact_ones(self) -> None:
        """For 10,000 spread times each percentile is at or above the exact one, by at most 25%."""
        histogram = LatencyHistogram()
        times = [int(1000 * 1.001**i) for i in range(10_000)]  # 1 us to about 22 ms
        for ns in times:
            histogram.add(ns)
        for q in (0.5, 0.9, 0.99):
            exact = times[round(q * len(times)) - 1]
            assert exact <= histogram.percentile(q) <= exact * 1.25, q

    def test_it_stays_bounded_and_takes_any_time(self) -> None:
        """Zero, one and the largest 64-bit time all fit; the bucket list never grows."""
        histogram = LatencyHistogram()
        size = len(histogram.counts)
        for ns in (0, 1, 2, 3, 17, 10**9, 2**64 - 1):
            histogram.add(ns)
            assert histogram.percentile(1.0) >= ns
        assert len(histogram.counts) == size
        assert histogram.count == 7

    @pytest.mark.parametrize(
        ("method", "body", "code"),
        [
            ("echo", b'{"wrong": 1}', 400),
            ("echo", b"not json", 400),
            ("refuse", b'{"code": 409}', 409),
            ("refuse", b'{"code": 503}', 503),
            ("crash-now", b"", 500),
        ],
        ids=["unknown-argument", "undecodable", "service-error-409", "service-error-503", "handler-crash"],
    )
    async def test_error_replies_count_as_errors(
        self, nc: NatsConnection, counted: str, method: str, body: bytes, code: int
    ) -> None:
        """A plain request answered with an error reply adds a request, an error and its last_error."""
        before = endpoint(await ask_one(nc, "STATS", "discstats", counted), method)
        reply = await nc.request(f"svc.discstats.{method}", body, timeout=2)
        assert reply.headers is not None
        assert reply.headers["Nats-Service-Error-Code"] == str(code)
        after = endpoint(await ask_one(nc, "STATS", "discstats", counted), method)
        assert after["num_requests"] == before["num_requests"] + 1
        assert after["num_errors"] == before["num_errors"] + 1
        assert after["last_error"].startswith(str(code))
        assert after["processing_time"] >= before["processing_time"]
        assert after["average_processing_time"] == after["processing_time"] // after["num_requests"]

    async def test_success_after_an_error_keeps_the_last_error(
        self, nc: NatsConnection, client: natsrpc.Client, counted: str
    ) -> None:
        """Errors raised through a client count too, and a later success leaves last_error as it was."""
        with pytest.raises(natsrpc.RemoteError) as caught:
            await client.call_service["discstats"].refuse(418)
        assert caught.value.code == 418
        with pytest.raises(natsrpc.BadRequest):
            await client.call_service["discstats"].echo(wrong="x")
        assert await client.call_service["discstats"].echo("fine") == "fine"
        stats = await ask_one(nc, "STATS", "discstats", counted)
        refuse, echo = endpoint(stats, "refuse"), endpoint(stats, "echo")
        assert (refuse["num_requests"], refuse["num_errors"], refuse["last_error"]) == (1, 1, "418 refused with 418")
        assert (echo["num_requests"], echo["num_errors"]) == (2, 1)
        assert echo["last_error"].startswith("400 ")


# --------------------------------------------------------------------------------------------------
# Heartbeats.
# --------------------------------------------------------------------------------------------------


class TestHeartbeats:
    """Each instance publishes a beat on ``svc._hb.<service>.<id>`` every interval, and a last one on stop."""

    async def test_beats_at_the_interval_with_every_field(self, client: natsrpc.Client, beats: Beats) -> None:
        """A plain subscriber sees beats about every 0.1 s carrying name, id, version, endpoints and flags."""
        async with serve(client, Pulse(), heartbeat_interval=INTERVAL) as host:
            instance_id = host.instances[0].id
            await poll(lambda: len(beats.of(instance_id)) >= 8, "8 beats")
        seen = beats.of(instance_id)[:8]
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(seen)]
        mean = sum(gaps) / len(gaps)
        assert 0.07 <= mean <= 0.15, gaps  # jittered down to 80 %, plus scheduling delay
        assert max(gaps) < EXPIRY_INTERVALS * INTERVAL, gaps
        beat = seen[-1][1]
        assert beat["name"] == "discpulse"
        assert beat["id"] == instance_id
        assert beat["version"] == "3.0.1"
        assert beat["endpoints"] == ["hold", "look"]
        assert (beat["in_flight"], beat["healthy"], beat["draining"]) == (0, True, False)
        assert beat["interval"] == INTERVAL
        assert beat["idempotent"] == ["look"]

    async def test_heartbeat_subject_names_service_and_instance(
        self, client: natsrpc.Client, nc: NatsConnection
    ) -> None:
        """Beats arrive on ``svc._hb.<service>.<id>``."""
        subjects: list[str] = []

        async def on_msg(msg: Msg) -> None:
            subjects.append(msg.subject)

        sub = await nc.subscribe("svc._hb.discpulse.*", cb=on_msg)
        await sync_with_server(nc)  # nc.flush() can return before the SUB is sent
        try:
            async with serve(client, Pulse(), heartbeat_interval=INTERVAL) as host:
                await poll(lambda: len(subjects) >= 2, "2 beats")
        finally:
            await sub.unsubscribe()
        assert set(subjects) == {f"svc._hb.discpulse.{host.instances[0].id}"}

    async def test_in_flight_counts_running_calls(self, client: natsrpc.Client, beats: Beats) -> None:
        """A call held in its handler shows as in_flight 1, and 0 again once it returns."""
        pulse = Pulse()
        async with serve(client, pulse, heartbeat_interval=INTERVAL) as host:
            instance_id = host.instances[0].id
            call = client.call_service_async["discpulse"].hold()
            await poll(lambda: any(b["in_flight"] == 1 for _, b in beats.of(instance_id)), "a beat with in_flight 1")
            pulse.release.set()
            await call
            count = len(beats.of(instance_id))
            await poll(
                lambda: any(b["in_flight"] == 0 for _, b in beats.of(instance_id)[count:]), "a beat with in_flight 0"
            )

    @pytest.mark.parametrize("fit", [False, None], ids=["returns-false", "raises"])
    async def test_health_hook_sets_healthy(self, client: natsrpc.Client, beats: Beats, fit: bool | None) -> None:
        """A ``health()`` hook that returns False (or raises) makes the next beats say healthy: false."""
        pulse = Pulse()
        async with serve(client, pulse, heartbeat_interval=INTERVAL) as host:
            instance_id = host.instances[0].id
            await poll(lambda: any(b["healthy"] for _, b in beats.of(instance_id)), "a healthy beat")
            pulse.fit = fit
            took = await poll(
                lambda: any(not b["healthy"] for _, b in beats.of(instance_id)), "a beat with healthy false"
            )
            assert took < INTERVAL + SLACK  # the next beat says so
            pulse.fit = True
            count = len(beats.of(instance_id))
            await poll(lambda: any(b["healthy"] for _, b in beats.of(instance_id)[count:]), "healthy again")

    async def test_hanging_health_hooks_do_not_delay_other_instances(
        self, client: natsrpc.Client, beats: Beats
    ) -> None:
        """Health hooks that never return mark their instances unhealthy without slowing a healthy one's beats."""
        hung = [Pulse(hang=True) for _ in range(3)]
        async with serve(client, *hung, Pulse(), heartbeat_interval=INTERVAL) as host:
            healthy_id = host.instances[-1].id
            await poll(lambda: len(beats.of(healthy_id)) >= 5, "5 beats of the healthy instance")
            hung_ids = [inst.id for inst in host.instances[:-1]]
            await poll(lambda: all(beats.of(i) for i in hung_ids), "a beat of each hung instance")
        seen = beats.of(healthy_id)[:5]
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(seen)]
        assert statistics.median(gaps) < 1.5 * INTERVAL, gaps  # on schedule (hooks run in series: ~4 intervals)
        assert max(gaps) < EXPIRY_INTERVALS * INTERVAL, gaps  # never long enough to expire
        assert all(b["healthy"] for _, b in seen)
        for hung_id in hung_ids:
            assert not any(b["healthy"] for _, b in beats.of(hung_id))

    async def test_beating_ends_with_the_connection(self, nats_url: str) -> None:
        """A host whose connection was closed under it stops beating instead of looping forever."""

        def beating() -> bool:
            names = [getattr(task.get_coro(), "__qualname__", "") for task in asyncio.all_tasks()]
            return "Announcer._beat_forever" in names

        async with natsrpc.connect(nats_url) as other:
            host = Host(other, [Pulse()], heartbeat_interval=INTERVAL)
            await host.start()
            assert beating()
            await other.nc.close()
            await host.stop()
            await poll(lambda: not beating(), "the heartbeat task ended", limit=3 * INTERVAL)

    async def test_graceful_stop_sends_a_last_draining_beat(self, client: natsrpc.Client, beats: Beats) -> None:
        """Leaving the host sends one last beat with draining: true, and then nothing."""
        async with serve(client, Pulse(), heartbeat_interval=INTERVAL) as host:
            instance_id = host.instances[0].id
            await poll(lambda: len(beats.of(instance_id)) >= 2, "2 beats")
        await poll(lambda: beats.of(instance_id)[-1][1]["draining"], "a draining beat")
        count = len(beats.of(instance_id))
        await asyncio.sleep(2 * INTERVAL)  # a stopped instance must stay silent: watch two intervals
        seen = beats.of(instance_id)
        assert len(seen) == count
        assert [b["draining"] for _, b in seen] == [False] * (count - 1) + [True]


# --------------------------------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------------------------------


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def heartbeat(
    name: str = "svc1", id: str = "i1", *, healthy: bool = True, draining: bool = False, interval: float = 1.0
) -> Heartbeat:
    """Returns a heartbeat as an instance would send it."""
    return Heartbeat(name, id, "1.0.0", ["get", "put"], 0, healthy, draining, interval, ["get"])


class Events:
    """Records registry change callbacks as (service, instance id, event)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def __call__(self, service: str, instance: InstanceState, event: str) -> None:
        self.seen.append((service, instance.id, event))


class TestRegistryExpiry:
    """The registry expires an instance after 3 missed intervals, on a clock the test moves."""

    @pytest.mark.parametrize(
        ("silence", "present"),
        [(0.0, True), (1.5, True), (2.99, True), (3.0, True), (3.01, False), (60.0, False)],
        ids=["fresh", "1.5-intervals", "just-under-3", "exactly-3", "just-over-3", "long-gone"],
    )
    def test_expiry_after_three_missed_intervals(self, silence: float, present: bool) -> None:
        """An instance is listed until more than 3 of its intervals passed without a beat."""
        clock = FakeClock()
        registry = Registry(clock=clock)
        registry.observe(heartbeat(interval=1.0))
        clock.now += silence
        assert [i.id for i in registry.instances("svc1")] == (["i1"] if present else [])
        registry.sweep()
        assert registry.known("svc1")
        assert [i.id for i in registry.services()["svc1"]] == (["i1"] if present else [])

    def test_each_instance_expires_on_its_own_interval(self) -> None:
        """A 0.1 s instance expires after 0.3 s while a 2 s one lives on."""
        clock = FakeClock()
        registry = Registry(clock=clock)
        registry.observe(heartbeat(id="fast", interval=0.1))
        registry.observe(heartbeat(id="slow", interval=2.0))
        clock.now += 0.31
        registry.sweep()
        assert [i.id for i in registry.instances("svc1")] == ["slow"]

    def test_fresh_beat_restarts_the_count(self) -> None:
        """Beats arriving every interval keep an instance alive indefinitely."""
        clock = FakeClock()
        registry = Registry(clock=clock)
        for _ in range(10):
            registry.observe(heartbeat())
            clock.now += 2.9
            registry.sweep()
            assert len(registry.instances("svc1")) == 1

    def test_restart_expiry_forgives_beats_missed_while_disconnected(self) -> None:
        """After restart_expiry (the client's reconnect), an instance gets 3 fresh intervals for its next beat."""
        clock = FakeClock()
        registry = Registry(clock=clock)
        registry.observe(heartbeat(interval=1.0))
        clock.now += 2.9
        registry.restart_expiry()
        clock.now += 2.9
        registry.sweep()
        assert [i.id for i in registry.instances("svc1")] == ["i1"]
        clock.now += 0.2
        registry.sweep()
        assert registry.instances("svc1") == []

    def test_a_draining_beat_names_valid_staying_instances_only(self) -> None:
        """``staying`` is kept from a draining beat only: names that could not be a subject token,
        the beat's own id and repeats are dropped, and at most MAX_STAYING are read."""
        registry = Registry(clock=FakeClock())
        beat = heartbeat(draining=True)
        beat.staying = ["a", "i1", "b.c", "*", ">", "", "a", "b", *(f"x{n}" for n in range(100))]
        registry.observe(beat)
        (state,) = registry.instances("svc1")
        kept = [name for name in beat.staying[: protocol.MAX_STAYING] if name in ("a", "b") or name.startswith("x")]
        assert state.staying == tuple(dict.fromkeys(kept))
        assert state.staying[:3] == ("a", "b", "x0")
        assert len(state.staying) == 2 + protocol.MAX_STAYING - 8  # 8 names before the x-s, 2 of them kept
        beat = heartbeat()
        beat.staying = ["a"]  # not draining: says nothing of where to go
        registry.observe(beat)
        assert registry.instances("svc1")[0].staying == ()

    async def test_heard_all_once_listening_for_an_interval(self, nc: NatsConnection) -> None:
        """A registry has heard every instance of an interval only once it has listened that long."""
        clock = FakeClock()
        registry = Registry(clock=clock)
        assert registry.heard_all(2.0)  # not started: fed by hand, nothing is unheard
        await registry.start(nc)
        try:
            assert not registry.heard_all(2.0)
            clock.now += 1.99
            assert not registry.heard_all(2.0)
            clock.now += 0.01
            assert registry.heard_all(2.0)
        finally:
            await registry.stop()

    def test_change_events(self) -> None:
        """Callbacks hear added, beat, updated (health or draining changed) and removed, in order."""
        clock = FakeClock()
        registry = Registry(clock=clock)
        events = Events()
        registry.on_change(events)
        registry.observe(heartbeat())
        registry.observe(heartbeat())
        registry.observe(heartbeat(healthy=False))
        registry.observe(heartbeat(healthy=False))
        registry.observe(heartbeat(draining=True))
        registry.observe(heartbeat(name="svc2", id="j1"))
        clock.now += EXPIRY_INTERVALS + 0.01
        registry.sweep()
        registry.sweep()
        assert events.seen == [
            ("svc1", "i1", "added"),
            ("svc1", "i1", "beat"),
            ("svc1", "i1", "updated"),
            ("svc1", "i1", "beat"),
            ("svc1", "i1", "updated"),
            ("svc2", "j1", "added"),
            ("svc1", "i1", "removed"),
            ("svc2", "j1", "removed"),
        ]

    def test_back_after_expiry_is_added_again(self) -> None:
        """An instance beating again after it was removed is announced as added."""
        clock = FakeClock()
        registry = Registry(clock=clock)
        events = Events()
        registry.on_change(events)
        registry.observe(heartbeat())
        clock.now += 10
        registry.sweep()
        registry.observe(heartbeat())
        assert [e for _, _, e in events.seen] == ["added", "removed", "added"]

    @pytest.mark.parametrize(
        ("healthy", "draining", "live"),
        [(True, False, True), (False, False, False), (True, True, False), (False, True, False)],
        ids=["healthy", "unhealthy", "draining", "both"],
    )
    def test_live_means_healthy_and_not_draining(self, healthy: bool, draining: bool, live: bool) -> None:
        """``live()`` lists only instances that take calls; ``instances()`` lists every unexpired one."""
        registry = Registry(clock=FakeClock())
        registry.observe(heartbeat(healthy=healthy, draining=draining))
        assert len(registry.instances("svc1")) == 1
        assert [i.id for i in registry.live("svc1")] == (["i1"] if live else [])

    def test_idempotent_methods_come_from_beats(self) -> None:
        """The methods a beat declares idempotent are known as such."""
        registry = Registry(clock=FakeClock())
        registry.observe(heartbeat())
        assert registry.idempotent("svc1", "get")
        assert not registry.idempotent("svc1", "put")
        assert not registry.idempotent("other", "get")

    def test_failing_callback_does_not_stop_the_others(self) -> None:
        """A callback that raises is logged; the next callbacks still run."""
        registry = Registry(clock=FakeClock())
        events = Events()

        def broken(service: str, instance: InstanceState, event: str) -> None:
            raise RuntimeError("callback bug")

        registry.on_change(broken)
        registry.on_change(events)
        registry.observe(heartbeat())
        assert events.seen == [("svc1", "i1", "added")]


class TestRegistryLive:
    """A client's registry follows real heartbeats: instances appear, go draining, and expire."""

    async def test_lists_live_instances_per_service(self, client: natsrpc.Client, nats_url: str) -> None:
        """Two instances of one service and one of another are listed under their services."""
        assert client.registry is not None
        registry = client.registry
        async with (
            natsrpc.connect(nats_url) as other,
            serve(other, Pulse(), Pulse(), Counted(), heartbeat_interval=INTERVAL) as host,
        ):
            pulses = {i.id for i in host.instances if i.service.name == "discpulse"}
            await poll(lambda: {i.id for i in registry.live("discpulse")} == pulses, "both pulses live")
            await poll(lambda: len(registry.live("discstats")) == 1, "discstats live")
            state = registry.live("discpulse")[0]
            assert (state.service, state.version, state.endpoints) == ("discpulse", "3.0.1", ["hold", "look"])
            assert (state.interval, state.idempotent, state.in_flight) == (INTERVAL, ["look"], 0)
            assert {"discpulse", "discstats"} <= set(registry.services())

    async def test_stopped_instances_drain_then_expire(self, client: natsrpc.Client, nats_url: str) -> None:
        """A graceful stop is seen at once (draining), and the instances are removed after 3 silent intervals."""
        assert client.registry is not None
        registry = client.registry
        events = Events()
        registry.on_change(events)
        async with natsrpc.connect(nats_url) as other:
            host = Host(other, [Pulse(), Pulse()], heartbeat_interval=INTERVAL)
            async with host:
                ids = {i.id for i in host.instances}
                await poll(lambda: {i.id for i in registry.live("discpulse")} == ids, "both live")
                await poll(lambda: registry.heard_all(INTERVAL), "an interval listened: draining beats believed")
            stopped = time.monotonic()
            await poll(lambda: not registry.live("discpulse"), "none live after the draining beats", limit=1)
            assert client.circuit("discpulse").state is State.OPEN  # no live instance: fail fast
            await poll(
                lambda: sum(e == ("discpulse", i, "removed") for e in events.seen for i in ids) == 2,
                "both removed",
            )
            removed_after = time.monotonic() - stopped
        ours = [e for s, i, e in events.seen if s == "discpulse" and i in ids]
        assert Counter(ours) == Counter({"added": 2, "updated": 2, "removed": 2}) + Counter(
            {"beat": ours.count("beat")}
        )
        assert ours.index("updated") < ours.index("removed")
        assert registry.instances("discpulse") == []
        assert EXPIRY_INTERVALS * INTERVAL * 0.9 <= removed_after <= EXPIRY_INTERVALS * INTERVAL + SLACK

    async def test_restart_half_opens_then_probes_close(self, nats_url: str) -> None:
        """After a graceful stop opened the circuit, the new instance's first beat half-opens it; 3 probes close it."""
        async with natsrpc.connect(nats_url, circuit=CircuitConfig(open_wait=60)) as caller:
            assert caller.registry is not None
            registry = caller.registry
            async with serve(caller, Pulse(), heartbeat_interval=INTERVAL):
                await poll(lambda: len(registry.live("discpulse")) == 1, "the first instance live")
            await poll(lambda: caller.circuit("discpulse").state is State.OPEN, "the circuit open", limit=1)
            with pytest.raises(natsrpc.CircuitOpen):
                await caller.call_service["discpulse"].look()
            async with serve(caller, Pulse(), heartbeat_interval=INTERVAL):
                await poll(lambda: caller.circuit("discpulse").state is State.HALF_OPEN, "half-open", limit=1)
                for probe in range(3):
                    assert caller.circuit("discpulse").state is State.HALF_OPEN, probe
                    assert await caller.call_service["discpulse"].look() == "ok"
                assert caller.circuit("discpulse").state is State.CLOSED


class TestNameClashes:
    """One service name served with different endpoints or versions in two processes is a warning."""

    async def test_differing_instances_of_one_name_are_named_in_a_warning(self, nats_url: str) -> None:
        """A second "kv" with other endpoints makes the registry warn once, naming both instance ids."""

        class OtherKV(natsrpc.Service):
            name = "kv"
            version = "2.0.0"

            @natsrpc.rpc
            async def get(self, key: str) -> str | None:
                return None

        with structlog.testing.capture_logs() as captured:
            async with (
                natsrpc.connect(nats_url) as watcher,
                natsrpc.connect(nats_url) as one,
                natsrpc.connect(nats_url) as two,
                serve(one, KV()) as first,
                serve(two, OtherKV()) as second,
            ):
                assert watcher.registry is not None
                await poll(lambda: watcher.registry is not None and len(watcher.registry.instances("kv")) == 2)
                await poll(lambda: any(e["event"] == "two instances of one service name differ" for e in captured))
                ids = {first.instances[0].id, second.instances[0].id}
        warnings = [e for e in captured if e["event"] == "two instances of one service name differ"]
        assert warnings[0]["log_level"] == "warning"
        assert {entry.split(" ")[0] for entry in warnings[0]["instances"]} == ids
        assert any("version 2.0.0: get" in entry for entry in warnings[0]["instances"])


class TestBrokenResponders:
    """A responder on ``$SRV`` that answers nonsense cannot break a listing of the others."""

    BAD = (
        b"not json",
        b"[]",
        b'{"name": 5, "id": "x", "version": "1.0.0"}',
        b'{"name": "broken", "version": "1.0.0"}',
        b'{"name": "broken", "id": "b1", "version": "1.0.0", "endpoints": [{"name": "e"}]}',
        b'{"name": "broken", "id": "b2", "version": "1.0.0", "endpoints": "many"}',
        b'{"name": "broken", "id": "b3", "version": "1.0.0", "metadata": {"a": 1}}',
    )
    # As a Go service may answer: metadata and endpoints null; and a version with an escape
    # sequence (clear the screen) and a line break, which must not reach the terminal as they are.
    NULLS = b'{"type": "x", "name": "gosvc", "id": "g1", "version": "1.0.0", "metadata": null, "endpoints": null}'
    ESCAPES = b'{"name": "esc", "id": "e1", "version": "1.0.0\\u001b[2J\\nforged line", "endpoints": []}'

    async def test_ls_info_stats_and_ping_list_the_others_and_log_little(
        self, client: natsrpc.Client, nc: NatsConnection, nats_url: str
    ) -> None:
        """Against kv and a responder sending the bad replies above (and one with nulls) to every
        question, each command exits 0 listing kv (and the null one), never a traceback; a survey
        returns the valid replies only, their nulls made empty."""

        async def answer(msg: Msg) -> None:
            for body in self.BAD:
                await nc.publish(msg.reply, body)
            if not msg.subject.startswith("$SRV.STATS"):
                await nc.publish(msg.reply, self.NULLS)
                await nc.publish(msg.reply, self.ESCAPES)

        await nc.subscribe("$SRV.>", cb=answer)
        await sync_with_server(nc)
        async with serve(client, KV()):
            with structlog.testing.capture_logs() as logs:
                replies = await natsrpc.registry.survey(client.nc, "INFO", wait=0.3)
            names = sorted(reply["name"] for reply, _ in replies)
            assert names == ["esc", "gosvc", "kv"]
            gosvc = next(reply for reply, _ in replies if reply["name"] == "gosvc")
            assert (gosvc["metadata"], gosvc["endpoints"]) == ({}, [])
            assert [entry["ignored"] for entry in logs if "reply ignored" in entry["event"]] == [1, 2, 4]
            commands = [("ls",), ("info", "gosvc"), ("stats", "kv"), ("ping",)]
            procs = [
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "natsrpc",
                    *command,
                    "--url",
                    nats_url,
                    "--wait",
                    "0.3",
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=child_env(),
                )
                for command in commands
            ]
            outputs = [await asyncio.wait_for(proc.communicate(), 30) for proc in procs]
        for command, proc, (out, err) in zip(commands, procs, outputs, strict=True):
            assert proc.returncode == 0, (command, err.decode())
            assert "Traceback" not in err.decode(), command
            listed = out.decode()
            expected = {"info": "gosvc", "stats": "get"}.get(command[0], "kv")  # stats lists endpoints
            assert expected in listed, (command, listed)
            assert "\x1b" not in listed, command
            assert not any(line.startswith("forged") for line in listed.splitlines()), command
        assert "1.0.0\\x1b[2J\\nforged line" in outputs[0][0].decode()  # ls shows the version, escaped
