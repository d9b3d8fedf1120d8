"""OpenTelemetry spans through the Tracing middleware, against a real nats-server (the SDK only here)."""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from children import child, poll
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanContext, SpanKind, StatusCode, TraceFlags

import natsrpc
import natsrpc.circuit
import natsrpc.retry
from natsrpc import Service, ServiceError, current_call, rpc
from natsrpc.observe import Invocation
from natsrpc.observe import tracing as tracing_module
from natsrpc.observe.tracing import Tracing
from natsrpc.testing import serve


class Leaf(Service):
    name = "trleaf"

    @rpc
    async def get(self, key: str) -> str:
        return key.upper()

    @rpc
    async def fail(self) -> None:
        raise ServiceError(409, "conflict")

    @rpc
    async def parent(self) -> str:
        return current_call().headers.get("traceparent", "")


class Branch(Service):
    name = "trbranch"

    @rpc
    async def both(self, key: str) -> list[str]:
        leaf = self.call_service["trleaf"]
        return [await leaf.get(key), await leaf.get(key + "2")]


def recorded(sampler: Sampler | None = None) -> tuple[TracerProvider, InMemorySpanExporter]:
    """A private SDK tracer provider (with ``sampler``, else the SDK's default) whose finished
    spans are kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler) if sampler is not None else TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """A private SDK tracer provider whose finished spans are kept in memory."""
    provider, exporter = recorded()
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
async def traced(nats_url: str, spans: tuple[TracerProvider, InMemorySpanExporter]) -> AsyncIterator[natsrpc.Client]:
    """Leaf and Branch hosted on a traced connection; returns a traced client to call them with."""
    tracing = Tracing(tracer_provider=spans[0])
    async with (
        natsrpc.connect(nats_url, middleware=[tracing]) as hosting,
        serve(hosting, Leaf(), Branch(), middleware=[tracing]),
        natsrpc.connect(nats_url, middleware=[tracing]) as app,
    ):
        yield app


def by_name(finished: tuple[ReadableSpan, ...]) -> dict[tuple[str, SpanKind], list[ReadableSpan]]:
    out: dict[tuple[str, SpanKind], list[ReadableSpan]] = {}
    for span in finished:
        out.setdefault((span.name, span.kind), []).append(span)
    return out


class TestSpans:
    async def test_a_call_is_a_client_span_parenting_a_server_span(
        self, traced: natsrpc.Client, spans: tuple[TracerProvider, InMemorySpanExporter]
    ) -> None:
        """One call: a CLIENT and a SERVER span in one trace, the server's parent the client, with RPC attributes."""
        assert await traced.call_service["trleaf"].get("a") == "A"
        found = by_name(spans[1].get_finished_spans())
        (client,) = found[("trleaf/get", SpanKind.CLIENT)]
        (server,) = found[("trleaf/get", SpanKind.SERVER)]
        assert client.context is not None
        assert server.context is not None
        assert server.parent is not None
        assert server.context.trace_id == client.context.trace_id
        assert server.parent.span_id == client.context.span_id
        assert server.parent.is_remote
        assert client.parent is None  # a root: nothing was current
        for span in (client, server):
            attributes = dict(span.attributes or {})
            assert attributes["rpc.system"] == "natsrpc"
            assert attributes["rpc.service"] == "trleaf"
            assert attributes["rpc.method"] == "get"
            assert span.status.status_code == StatusCode.UNSET

    async def test_a_service_calling_services_nests_its_client_spans_under_its_server_span(
        self, traced: natsrpc.Client, spans: tuple[TracerProvider, InMemorySpanExporter]
    ) -> None:
        """branch.both calls leaf twice: client -> branch server -> 2 clients -> 2 leaf servers, one trace."""
        assert await traced.call_service["trbranch"].both("k") == ["K", "K2"]
        found = by_name(spans[1].get_finished_spans())
        (root,) = found[("trbranch/both", SpanKind.CLIENT)]
        (branch,) = found[("trbranch/both", SpanKind.SERVER)]
        calls = found[("trleaf/get", SpanKind.CLIENT)]
        served = found[("trleaf/get", SpanKind.SERVER)]
        assert len(calls) == len(served) == 2
        assert root.context is not None
        assert branch.context is not None
        assert {s.context.trace_id for s in (root, branch, *calls, *served) if s.context} == {root.context.trace_id}
        assert branch.parent is not None
        assert branch.parent.span_id == root.context.span_id
        assert all(c.parent is not None and c.parent.span_id == branch.context.span_id for c in calls)
        call_ids = {c.context.span_id for c in calls if c.context}
        assert {s.parent.span_id for s in served if s.parent} == call_ids
        assert str(dict(calls[0].attributes or {})["natsrpc.caller"]).startswith("trbranch/")

    async def test_a_failure_sets_error_status_and_records_the_exception(
        self, traced: natsrpc.Client, spans: tuple[TracerProvider, InMemorySpanExporter]
    ) -> None:
        """A 409: both spans ERROR, error.type and natsrpc.code set, an exception event on each."""
        with pytest.raises(natsrpc.RemoteError):
            await traced.call_service["trleaf"].fail()
        found = by_name(spans[1].get_finished_spans())
        for kind in (SpanKind.CLIENT, SpanKind.SERVER):
            (span,) = found[("trleaf/fail", kind)]
            assert span.status.status_code == StatusCode.ERROR
            attributes = dict(span.attributes or {})
            assert attributes["error.type"] == "ServiceError"
            assert attributes["natsrpc.code"] == 409
            assert [event.name for event in span.events] == ["exception"]

    async def test_the_server_sees_the_client_spans_traceparent(
        self, traced: natsrpc.Client, spans: tuple[TracerProvider, InMemorySpanExporter]
    ) -> None:
        """The request's traceparent header is the client span's context."""
        header = await traced.call_service["trleaf"].parent()
        (client,) = by_name(spans[1].get_finished_spans())[("trleaf/parent", SpanKind.CLIENT)]
        assert client.context is not None
        flags = int(client.context.trace_flags)
        assert flags & 1  # sampled
        assert header == f"00-{client.context.trace_id:032x}-{client.context.span_id:016x}-{flags:02x}"

    async def test_a_tracestate_is_carried_and_an_oversized_one_dropped_unparsed(
        self, nats_url: str, spans: tuple[TracerProvider, InMemorySpanExporter], caplog: pytest.LogCaptureFixture
    ) -> None:
        """A caller's tracestate reaches the server span; one over 512 characters (a peer's flood) is
        dropped without being parsed (and logged cut to 200 characters), and the call still answers."""
        tracing = Tracing(tracer_provider=spans[0])
        parent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
        async with (
            natsrpc.connect(nats_url, middleware=[tracing]) as hosting,
            serve(hosting, Leaf(), middleware=[tracing]),
            natsrpc.connect(nats_url) as plain,
        ):
            for state in ("vendor=abc", "x" * 100_000):
                headers = {"traceparent": parent, "tracestate": state}
                assert await plain.call_service["trleaf"].options(headers=headers).get("a") == "A"
        first, second = by_name(spans[1].get_finished_spans())[("trleaf/get", SpanKind.SERVER)]
        assert first.context is not None
        assert second.context is not None
        assert first.context.trace_state.to_header() == "vendor=abc"
        assert second.context.trace_state.to_header() == ""
        assert not any("x" * 1000 in record.getMessage() for record in caplog.records)

    async def test_a_tracestate_breaking_the_w3c_rules_is_dropped_without_a_log_per_request(
        self, nats_url: str, spans: tuple[TracerProvider, InMemorySpanExporter], caplog: pytest.LogCaptureFixture
    ) -> None:
        """A tracestate that is not key=value members, names a key twice or has over 32 members
        leaves the server span's trace state empty; the API never sees it (it would log a warning
        for each request), and natsrpc counts it. A valid one, with optional spaces, is carried."""
        tracing = Tracing(tracer_provider=spans[0])
        parent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
        bad = ["bad value!!", "a=1,a=2", ",".join(f"k{i}=v" for i in range(33)), "Upper=1", "a=1,b"]
        async with (
            natsrpc.connect(nats_url, middleware=[tracing]) as hosting,
            serve(hosting, Leaf(), middleware=[tracing]),
            natsrpc.connect(nats_url) as plain,
        ):
            leaf = plain.call_service["trleaf"]
            for state in [*bad * 20, "a=1 , b=x@y, tenant@sys=v", ""]:
                assert await leaf.options(headers={"traceparent": parent, "tracestate": state}).get("a") == "A"
        served = by_name(spans[1].get_finished_spans())[("trleaf/get", SpanKind.SERVER)]
        states = [span.context.trace_state.to_header() for span in served if span.context is not None]
        assert states[:-2] == [""] * 100
        assert states[-2:] == ["a=1,b=x@y,tenant@sys=v", ""]
        assert tracing.ignored_tracestates == 100
        assert not [r for r in caplog.records if r.name.startswith("opentelemetry")], caplog.records[:3]

    async def test_retries_and_circuit_refusals_are_span_events(
        self, nats_url: str, spans: tuple[TracerProvider, InMemorySpanExporter]
    ) -> None:
        """A retried call's span has a natsrpc.retry event per retry; an open circuit's refusal an event too."""
        tracing = Tracing(tracer_provider=spans[0])
        config = natsrpc.circuit.CircuitConfig(min_calls=2, failure_rate=0.5)
        policy = natsrpc.retry.RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.002)
        async with natsrpc.connect(nats_url, middleware=[tracing], circuit=config, discovery=False) as app:
            for _ in range(2):
                with pytest.raises(natsrpc.NoResponders):
                    await app.call_service["trgone"].options(retry=policy, idempotent=True).get()
            with pytest.raises(natsrpc.CircuitOpen):
                await app.call_service["trgone"].get()
        first, _, refused = by_name(spans[1].get_finished_spans())[("trgone/get", SpanKind.CLIENT)]
        assert [e.name for e in first.events] == ["natsrpc.retry", "natsrpc.retry", "exception"]
        assert [e.name for e in refused.events] == ["natsrpc.circuit_open", "exception"]

    async def test_a_cached_call_says_whether_the_cache_answered(
        self, client: natsrpc.Client, nats_url: str, spans: tuple[TracerProvider, InMemorySpanExporter]
    ) -> None:
        """Two calls of a cached method: the first span has natsrpc.cache_hit False and a server
        span below it, the second True and none."""

        class Cached(Service):
            name = "trcached"

            @rpc(idempotent=True, cache_ttl=30)
            async def get(self, key: str) -> str:
                return key

        tracing = Tracing(tracer_provider=spans[0])
        async with (
            serve(client, Cached(), heartbeat_interval=0.2),
            natsrpc.connect(nats_url, middleware=[tracing]) as app,
        ):
            assert app.registry is not None
            await poll(lambda: ("trcached", "get") in app.registry.cached, "the beat is seen")
            assert await app.call_service["trcached"].get("k") == "k"
            assert await app.call_service["trcached"].get("k") == "k"
        calls = by_name(spans[1].get_finished_spans())[("trcached/get", SpanKind.CLIENT)]
        assert [dict(span.attributes or {})["natsrpc.cache_hit"] for span in calls] == [False, True]

    async def test_streams_are_spans_too(
        self, nats_url: str, spans: tuple[TracerProvider, InMemorySpanExporter]
    ) -> None:
        """A stream makes a CLIENT and a SERVER span, in one trace, ending with the stream."""

        class Counter(Service):
            name = "trcount"

            @rpc
            async def count(self, n: int) -> AsyncIterator[int]:
                for i in range(n):
                    yield i

        tracing = Tracing(tracer_provider=spans[0])
        async with (
            natsrpc.connect(nats_url, middleware=[tracing]) as app,
            serve(app, Counter(), middleware=[tracing]),
        ):
            assert [i async for i in app.call_service["trcount"].count(3)] == [0, 1, 2]
            await poll(lambda: len(spans[1].get_finished_spans()) == 2, "both spans end")
        found = by_name(spans[1].get_finished_spans())
        (client,) = found[("trcount/count", SpanKind.CLIENT)]
        (server,) = found[("trcount/count", SpanKind.SERVER)]
        assert server.parent is not None
        assert client.context is not None
        assert server.parent.span_id == client.context.span_id

    async def test_an_unsampled_trace_records_nothing_and_calls_still_work(self, nats_url: str) -> None:
        """With a sampler that drops everything no span is exported, and calls answer as usual."""
        provider, exporter = recorded(ALWAYS_OFF)
        tracing = Tracing(tracer_provider=provider)
        async with (
            natsrpc.connect(nats_url, middleware=[tracing]) as app,
            serve(app, Leaf(), middleware=[tracing]),
        ):
            header = await app.call_service["trleaf"].parent()
        assert exporter.get_finished_spans() == ()
        assert not int(header[-2:], 16) & 1  # the decision not to sample travels downstream

    @pytest.mark.parametrize("trust", [True, False])
    async def test_an_unsampled_parent_gets_no_span_unless_told_to_ask_the_sdk(
        self, nats_url: str, trust: bool
    ) -> None:
        """A request whose traceparent says "not sampled": no SDK span by default (its context still
        travels on to the calls it makes); with trust_parent_sampling=False a sampler that records
        below unsampled parents is asked, and records the server span and its child."""
        provider, exporter = recorded(ParentBased(ALWAYS_ON, remote_parent_not_sampled=ALWAYS_ON))
        tracing = Tracing(tracer_provider=provider, trust_parent_sampling=trust)
        parent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-00"
        async with (
            natsrpc.connect(nats_url, middleware=[tracing]) as hosting,
            serve(hosting, Leaf(), Branch(), middleware=[tracing]),
            natsrpc.connect(nats_url) as plain,
        ):
            both = plain.call_service["trbranch"].options(headers={"traceparent": parent})
            assert await both.both("k") == ["K", "K2"]
        names = sorted((s.name, s.kind.name) for s in exporter.get_finished_spans())
        if trust:
            assert names == []
        else:
            assert ("trbranch/both", "SERVER") in names
            assert names.count(("trleaf/get", "CLIENT")) == 2
        for span in exporter.get_finished_spans():
            assert span.context is not None
            assert f"{span.context.trace_id:032x}" == "ab" * 16

    async def test_without_an_sdk_nothing_is_recorded(self, nats_url: str) -> None:
        """The API's default (no SDK set up): the middleware runs, calls work, natsrpc's own trace id travels."""
        assert not isinstance(trace.get_tracer_provider(), TracerProvider)
        tracing = Tracing()
        async with (
            natsrpc.connect(nats_url, middleware=[tracing]) as app,
            serve(app, Leaf(), Branch(), middleware=[tracing]),
        ):
            assert await app.call_service["trbranch"].both("x") == ["X", "X2"]


class TestNewTraces:
    """A new trace under the SDK's ratio sampler is decided by natsrpc, exactly as the SDK would."""

    async def test_a_ratio_samplers_decisions_are_the_sdks_own_and_kept_traces_are_recorded(
        self, nats_url: str
    ) -> None:
        """400 root calls at 50%: each request's sampled flag is TraceIdRatioBased's rule on its
        trace id, every kept trace is recorded (client and server span, that trace id) and no
        dropped one is; a plain handler's calls inherit the decision."""
        sampler = TraceIdRatioBased(0.5)
        provider, exporter = recorded(ParentBased(sampler))
        tracing = Tracing(tracer_provider=provider)
        async with (
            natsrpc.connect(nats_url, middleware=[tracing]) as hosting,
            serve(hosting, Leaf(), middleware=[tracing]),
            natsrpc.connect(nats_url, middleware=[tracing]) as app,
        ):
            headers = [await app.call_service["trleaf"].parent() for _ in range(400)]
        kept = set()
        for header in headers:
            assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", header), header
            trace_id = int(header[3:35], 16)
            sampled = bool(int(header[53:], 16) & 1)
            assert sampled == (trace_id & ((1 << 64) - 1) < sampler.bound)
            if sampled:
                kept.add(trace_id)
        assert 120 < len(kept) < 280  # 200 expected: a binomial this far off is one in millions
        finished = by_name(exporter.get_finished_spans())
        for kind in (SpanKind.CLIENT, SpanKind.SERVER):
            assert {s.context.trace_id for s in finished[("trleaf/parent", kind)] if s.context} == kept
        assert len(finished[("trleaf/parent", SpanKind.CLIENT)]) == len(kept)
        provider.shutdown()

    async def test_a_request_without_traceparent_is_a_new_trace_its_calls_follow(self, nats_url: str) -> None:
        """A request with no traceparent (the nats CLI's): the host decides a new trace; the calls
        its handler makes carry that decision and trace id, sampled or not."""
        sampler = TraceIdRatioBased(0.5)
        provider, exporter = recorded(ParentBased(sampler))
        tracing = Tracing(tracer_provider=provider)
        async with (
            natsrpc.connect(nats_url, middleware=[tracing]) as hosting,
            serve(hosting, Leaf(), Branch(), middleware=[tracing]),
            natsrpc.connect(nats_url) as plain,
        ):
            for _ in range(60):
                assert await plain.call_service["trbranch"].both("k") == ["K", "K2"]
        found = by_name(exporter.get_finished_spans())
        roots = found.get(("trbranch/both", SpanKind.SERVER), [])
        assert 5 < len(roots) < 55
        for root in roots:
            assert root.parent is None
            assert root.context is not None
            assert root.context.trace_id & ((1 << 64) - 1) < sampler.bound
        leaf_traces = [s.context.trace_id for s in found.get(("trleaf/get", SpanKind.SERVER), []) if s.context]
        assert sorted(leaf_traces) == sorted([r.context.trace_id for r in roots if r.context] * 2)

    def test_the_samplers_decided_here_are_recognised_by_their_description(self) -> None:
        """The SDK's ratio samplers (alone, or ParentBased's root with default delegates) and
        ALWAYS_OFF are decided here; anything else (a sampler keeping all, other delegates) is not."""
        from natsrpc.observe.tracing import _ratio_bound

        quarter = TraceIdRatioBased(0.25)
        assert _ratio_bound(quarter.get_description()) == quarter.bound
        assert _ratio_bound(ParentBased(quarter).get_description()) == quarter.bound
        assert _ratio_bound(ParentBased(ALWAYS_OFF).get_description()) == 0
        assert _ratio_bound(ALWAYS_OFF.get_description()) == 0
        assert _ratio_bound(TraceIdRatioBased(1.0).get_description()) is None  # keeps all: the SDK decides
        assert _ratio_bound(ALWAYS_ON.get_description()) is None
        assert _ratio_bound(ParentBased(ALWAYS_ON).get_description()) is None
        other = ParentBased(quarter, remote_parent_not_sampled=ALWAYS_ON)
        assert _ratio_bound(other.get_description()) is None

    async def test_another_sampler_is_asked_for_every_new_trace(self, nats_url: str) -> None:
        """A sampler natsrpc does not know is asked for every new trace, and what it keeps is recorded."""
        asked: list[int] = []

        class EveryOther(Sampler):
            def should_sample(self, parent_context: Any, trace_id: int, *args: Any, **kwargs: Any) -> SamplingResult:
                asked.append(trace_id)
                keep = len(asked) % 2 == 0
                return SamplingResult(Decision.RECORD_AND_SAMPLE if keep else Decision.DROP)

            def get_description(self) -> str:
                return "EveryOther"

        provider, exporter = recorded(EveryOther())
        async with natsrpc.connect(nats_url, middleware=[Tracing(tracer_provider=provider)]) as app:
            for _ in range(10):
                with pytest.raises(natsrpc.NoResponders):
                    await app.call_service["trnobody"].get()
        assert len(asked) == 10
        assert len(exporter.get_finished_spans()) == 5
        provider.shutdown()


class TestAcrossProcesses:
    async def test_memory_remember_is_one_trace_over_four_processes(
        self, nats_url: str, tmp_path: Path, spans: Any
    ) -> None:
        """kv, vdb and memory each in a runner of its own, traced with the SDK writing spans to files:
        the test's client span -> memory's server span -> its kv and vdb client spans -> their server spans."""
        env = {"NATSRPC_TEST_SPANS": str(tmp_path)}
        provider, exporter = spans
        tracing = Tracing(tracer_provider=provider)
        args = ("--url", nats_url, "--middleware", "tests.otel_setup:tracing", "--log-format", "console")
        ready = re.compile(r"\bready\b")
        async with (
            child("-m", "natsrpc.run", "services.kv", *args, env=env) as kv,
            child("-m", "natsrpc.run", "services.vdb", *args, env=env) as vdb,
            child("-m", "natsrpc.run", "services.memory", *args, env=env) as memory,
        ):
            await asyncio.gather(*(runner.wait_for_line(ready) for runner in (kv, vdb, memory)))
            async with natsrpc.connect(nats_url, middleware=[tracing]) as app:
                memory_id = await app.call_service["memory"].options(timeout=20).remember("hello traces")
                assert memory_id

            def records() -> list[dict[str, Any]]:
                lines = [line for f in tmp_path.glob("*.jsonl") for line in f.read_text().splitlines()]
                return [json.loads(line) for line in lines]

            await poll(lambda: len([r for r in records() if r["name"].startswith(("kv/", "vdb/"))]) >= 4, "spans")
        (root,) = exporter.get_finished_spans()
        assert root.context is not None
        trace_id = f"{root.context.trace_id:032x}"
        mine = [r for r in records() if r["trace_id"] == trace_id]
        (server,) = [r for r in mine if r["name"] == "memory/remember" and r["kind"] == "SERVER"]
        assert server["parent_id"] == f"{root.context.span_id:016x}"
        downstream = {r["name"]: r for r in mine if r["kind"] == "CLIENT"}
        assert set(downstream) == {"kv/put", "vdb/upsert"}
        assert all(r["parent_id"] == server["span_id"] for r in downstream.values())
        assert all(r["pid"] == server["pid"] for r in downstream.values())
        for name, record in downstream.items():
            (served,) = [r for r in mine if r["name"] == name and r["kind"] == "SERVER"]
            assert served["parent_id"] == record["span_id"]
            assert served["pid"] != server["pid"]
        assert len({r["pid"] for r in mine}) == 3  # memory, kv, vdb (the root is in this process)


class TestTraceparentFormat:
    """The traceparent written from a span context is the W3C form of its ids and flags."""

    def test_written_as_the_w3c_form(self) -> None:
        """For ids of every size and every flags byte, the text is 00-<32 hex>-<16 hex>-<2 hex>."""
        draw = random.Random(7)
        for flags in range(256):
            trace_id, span_id = draw.getrandbits(draw.randint(1, 128)) | 1, draw.getrandbits(draw.randint(1, 64)) | 1
            expected = f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"
            context = SpanContext(trace_id, span_id, False, TraceFlags(flags))
            headers: dict[str, str] = {}
            tracing_module._inject(context, headers)
            assert headers == {"traceparent": expected}
            assert tracing_module._traceparent(context) == expected
        empty: dict[str, str] = {}
        tracing_module._inject(SpanContext(0, 0, False), empty)  # an invalid context carries nothing
        assert empty == {}


_LOW_64_MAX = (1 << 64) - 1


class _OwnIds(RandomIdGenerator):
    """An id generator that is not the SDK's own class: Tracing asks it for each id."""

    def __init__(self, trace_id: int) -> None:
        self.trace_id = trace_id

    def generate_trace_id(self) -> int:
        return self.trace_id

    def generate_span_id(self) -> int:
        return 0xABC


class TestOwnIdGenerator:
    """Under an id generator of the application's own, a dropped trace carries that generator's ids."""

    def test_a_dropped_trace_carries_the_generators_ids(self) -> None:
        """The traceparent is the W3C form of the ids drawn; ids out of range leave the trace to the SDK."""
        dropped = (1 << 64) | _LOW_64_MAX  # low 64 bits all ones: dropped at any ratio below 1
        tracing = Tracing(TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.5)), id_generator=_OwnIds(dropped)))
        call = Invocation("client", "kv", "get", (), {}, {}, 0.0, "client")
        assert tracing.begin(call) is None
        assert tracing._roots is not None
        assert call.headers == {"traceparent": f"00-{dropped:032x}-{0xABC:016x}{tracing._roots.dropped_flags}"}
        too_large = Tracing(
            TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.5)), id_generator=_OwnIds(1 << 130 | _LOW_64_MAX))
        )
        other = Invocation("client", "kv", "get", (), {}, {}, 0.0, "client")
        assert too_large._dropped(other) is False
        assert other.headers == {}
