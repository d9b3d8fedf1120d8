"""Tests of the example memory service, which composes kv and vdb through service-to-service calls.

The same scenario runs with the three services hosted in this process and with each in its own
``python -m natsrpc.run`` subprocess; errors and the trace id must travel the whole chain.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import structlog
import structlog.testing
from children import STARTUP_TIMEOUT, Child, child

import natsrpc
import natsrpc.logs
from natsrpc import context, protocol, rpc
from natsrpc.testing import serve
from services.kv import KV
from services.memory import KEY_PREFIX, Memory, MemoryItem, hashed_bag_of_words
from services.vdb import VDB

TEXTS = [
    "the cat sat on the warm mat",
    "stock prices fell sharply on monday",
    "a recipe for lemon cake with fresh lemons",
]


# --------------------------------------------------------------------------------------------------
# The example services with a log line in each handler, for the trace test. Same service names:
# memory calls "kv" and "vdb" by name.
# --------------------------------------------------------------------------------------------------


class LoggedKV(KV):
    """The example KV, logging each put through a plain structlog logger."""

    @rpc
    async def put(self, key: str, value: str) -> None:
        """Logs, then stores ``value`` under ``key``."""
        structlog.get_logger("tests.kv").info("kv put", key=key)
        await super().put(key, value)


class LoggedVDB(VDB):
    """The example VDB, logging each upsert through the service's bound logger."""

    @rpc
    async def upsert(self, id: str, vector: list[float], metadata: dict[str, str] | None = None) -> None:
        """Logs, then stores the vector."""
        self.ctx.log.info("vdb upsert", id=id)
        await super().upsert(id, vector, metadata)


class LoggedMemory(Memory):
    """The example Memory, logging before and after its downstream calls."""

    @rpc
    async def remember(self, text: str, metadata: dict[str, str] | None = None) -> str:
        """Logs, remembers ``text`` through kv and vdb, logs the new id."""
        self.ctx.log.info("remembering", chars=len(text))
        id_ = await super().remember(text, metadata)
        self.ctx.log.info("remembered", id=id_)
        return id_


# --------------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------------


async def remember_all(memory: natsrpc.Client) -> list[str]:
    """Remembers TEXTS through the memory service and returns their ids, in order."""
    svc = memory.call_service["memory"]
    return [await svc.remember(text) for text in TEXTS]


async def check_remember_recall_forget(client: natsrpc.Client) -> None:
    """The whole scenario, through the services' public endpoints only (wherever they run)."""
    kv = client.call_service["kv"]
    vdb = client.proxy(VDB)
    memory = client.call_service["memory"]
    assert await vdb.count() == 0

    ids = await remember_all(client)
    assert len(set(ids)) == 3
    for id_, text in zip(ids, TEXTS, strict=True):
        assert await kv.get(KEY_PREFIX + id_) == text
    assert sorted(await kv.keys(KEY_PREFIX)) == sorted(KEY_PREFIX + i for i in ids)
    assert await vdb.count() == 3
    top = await vdb.search(hashed_bag_of_words(TEXTS[1]), 1)
    assert top[0].id == ids[1]
    assert top[0].score == pytest.approx(1.0)

    recalled = await memory.recall("where did the cat sit", 3)
    assert recalled[0]["id"] == ids[0]
    assert recalled[0]["text"] == TEXTS[0]
    assert recalled[0]["score"] > recalled[1]["score"]
    assert {r["id"] for r in recalled} == set(ids)
    lemon = await memory.recall("lemon cake", 1)
    assert [r["id"] for r in lemon] == [ids[2]]

    assert await memory.forget(ids[0]) is True
    assert await kv.get(KEY_PREFIX + ids[0]) is None
    assert await vdb.count() == 2
    assert ids[0] not in [h.id for h in await vdb.search(hashed_bag_of_words(TEXTS[0]), 5)]
    assert ids[0] not in [r["id"] for r in await memory.recall("the cat sat on the mat", 5)]
    assert await memory.forget(ids[0]) is False


@asynccontextmanager
async def runner(*modules: str, url: str) -> AsyncIterator[Child]:
    """Runs ``python -m natsrpc.run *modules --url url``; stops it on the way out if it still runs."""
    async with child("-m", "natsrpc.run", *modules, "--url", url) as running:
        yield running


async def until_served(runners: list[Child], call: Callable[[], Awaitable[Any]]) -> Any:
    """Retries ``call`` while the service is not up yet; returns its result.

    Until a runner subscribes, calls fail with NoResponders, or with CircuitOpen once those failures
    opened the service's circuit (the service's first heartbeat half-opens it again).
    """
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        try:
            return await call()
        except (natsrpc.NoResponders, natsrpc.CircuitOpen):
            if any(r.proc.returncode is not None for r in runners) or time.monotonic() > deadline:
                stderr = "\n---\n".join(r.stderr for r in runners)
                pytest.fail(f"the services never answered; runner stderr:\n{stderr}")
        await asyncio.sleep(0.02)


async def until_all_served(client: natsrpc.Client, runners: list[Child]) -> None:
    """Waits until kv, vdb and memory each answer a harmless call."""
    await until_served(runners, client.call_service["kv"].keys)
    await until_served(runners, client.call_service["vdb"].count)
    await until_served(runners, lambda: client.call_service["memory"].recall("ready?", 1))


# --------------------------------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------------------------------


class TestInOneProcess:
    """With kv, vdb and memory hosted on the test's connection, memory stores through the other two."""

    async def test_remember_recall_forget(self, client: natsrpc.Client) -> None:
        """Remember puts the text in kv and the vector in vdb; recall ranks by shared words; forget removes both."""
        async with serve(client, KV(), VDB(), Memory()):
            await check_remember_recall_forget(client)

    async def test_state_lands_in_the_right_services(self, client: natsrpc.Client) -> None:
        """The kv instance holds memory:<id> -> text and the vdb instance holds <id> -> the text's embedding."""
        kv, vdb = KV(), VDB()
        async with serve(client, kv, vdb, Memory()):
            id_ = await client.call_service["memory"].remember("hello world", {"lang": "en"})
            assert kv.data == {KEY_PREFIX + id_: "hello world"}
            vector, _, metadata = vdb.vectors[id_]
            assert vector == pytest.approx(hashed_bag_of_words("hello world"))
            assert metadata == {"lang": "en"}
            recalled = await client.proxy(Memory).recall("world", 1)
            assert recalled == [MemoryItem(id_, "hello world", recalled[0].score, {"lang": "en"})]

    async def test_recall_skips_vectors_whose_text_is_gone(self, client: natsrpc.Client) -> None:
        """A vector whose kv entry was deleted behind memory's back is not recalled."""
        async with serve(client, KV(), VDB(), Memory()):
            ids = await remember_all(client)
            await client.call_service["kv"].delete(KEY_PREFIX + ids[0])
            recalled = await client.call_service["memory"].recall("cat on the mat", 3)
            assert len(recalled) == 2
            assert {r["id"] for r in recalled} == set(ids[1:])


class TestRecallStream:
    """recall_stream streams memories as kv returns their texts: a stream through one service hop."""

    async def test_streams_the_same_memories_as_recall(self, client: natsrpc.Client) -> None:
        async with serve(client, KV(), VDB(), Memory()):
            ids = await remember_all(client)
            await client.call_service["kv"].delete(KEY_PREFIX + ids[2])  # its text is gone: skipped
            streamed = [m async for m in client.proxy(Memory).recall_stream("cat on the mat", 3)]  # type: ignore[attr-defined]
            recalled = await client.proxy(Memory).recall("cat on the mat", 3)
        assert sorted(streamed, key=lambda m: -m.score) == recalled
        assert {m.id for m in streamed} == set(ids[:2])

    async def test_leaving_early_stops_the_stream(self, client: natsrpc.Client) -> None:
        async with serve(client, KV(), VDB(), Memory()):
            await remember_all(client)
            async for memory in client.call_service["memory"].recall_stream("cat", 3):
                assert memory["text"] in TEXTS
                break
            assert await client.call_service["memory"].recall("cat", 1)  # the service serves on


class TestErrorsThroughMemory:
    """A failure in kv or vdb reaches the client through memory, naming the hop that failed."""

    async def test_vdb_bad_request_names_the_hop(self, client: natsrpc.Client) -> None:
        """vdb rejecting memory's 256-dimension vector reaches the client as 400 'memory.remember -> vdb.upsert'."""
        async with serve(client, KV(), VDB(), Memory(), config={"vdb": {"dim": 3}}):
            with pytest.raises(natsrpc.BadRequest) as info:
                await client.call_service["memory"].remember("some text")
        error = info.value
        assert error.code == 400
        assert "memory.remember -> vdb.upsert" in error.message
        assert "dimension 256" in error.message
        assert error.hop == "memory.remember"

    async def test_bad_k_is_the_callers_bad_request(self, client: natsrpc.Client) -> None:
        """recall with k = 0 is a 400 from vdb, passed on by memory as 400 'memory.recall -> vdb.search'."""
        async with serve(client, KV(), VDB(), Memory()):
            await client.call_service["memory"].remember("anything")
            with pytest.raises(natsrpc.BadRequest) as info:
                await client.call_service["memory"].recall("anything", 0)
        assert info.value.code == 400
        assert "memory.recall -> vdb.search" in info.value.message
        assert "k must be >= 1" in info.value.message

    async def test_missing_kv_fails_fast_naming_the_hop(self, client: natsrpc.Client) -> None:
        """With kv not running, remember fails fast with 502 BadGateway 'memory.remember -> kv.put'."""
        vdb = VDB()
        async with serve(client, vdb, Memory()):
            start = time.perf_counter()
            with pytest.raises(natsrpc.BadGateway) as info:
                await client.call_service["memory"].remember("lost")
            elapsed = time.perf_counter() - start
        assert "memory.remember -> kv.put" in info.value.message
        # NoResponders, or CircuitOpen once the retries of NoResponders opened kv's circuit
        assert info.value.type in ("NoResponders", "CircuitOpen"), info.value
        assert elapsed < 1.0
        assert vdb.vectors == {}

    async def test_failed_remember_leaves_no_orphan_text(self, client: natsrpc.Client) -> None:
        """A remember that failed at vdb (502, not retried) removes the text it put in kv: no orphan."""
        kv = KV()
        async with serve(client, kv, Memory()):
            with pytest.raises(natsrpc.BadGateway, match=r"memory\.remember -> vdb\.upsert"):
                await client.call_service["memory"].remember("once")
        assert kv.data == {}

    async def test_a_large_text_does_not_block_the_process(self, client: natsrpc.Client) -> None:
        """While memory embeds a 1 MB text (half a second of CPU), the process's event loop keeps
        turning (no stall over 300 ms), so a kv call served by the same process is not held up."""

        def slow_embedding(text: str) -> list[float]:
            until = time.thread_time() + 0.5  # a model's CPU time, in this thread
            while time.thread_time() < until:
                pass
            return hashed_bag_of_words(text)

        async with serve(client, KV(), VDB(), Memory(embedder=slow_embedding)):
            memory = client.call_service["memory"].options(timeout=30)
            remember = asyncio.ensure_future(memory.remember("word " * 200_000))
            stall, last = 0.0, time.perf_counter()
            while not remember.done():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                stall, last = max(stall, now - last), now
            await remember
            assert await client.call_service["kv"].get("anything") is None
        # Embedding in line would stall it for the embedding's 0.5 s and more. Off the loop the
        # longest pause is 40-70 ms here (1 MB messages parsed and encoded on the loop, the
        # embedding thread holding the GIL for its switch intervals), about 100 ms on a loaded machine.
        assert stall < 0.3, f"the event loop stalled for {stall * 1e3:.0f} ms"


class TestTracing:
    """One trace id covers every log line of a client -> memory -> kv/vdb call."""

    async def test_every_log_line_carries_the_callers_trace_id(self, client: natsrpc.Client) -> None:
        """The client's traceparent trace id is in every handler's log lines (natsrpc.logs.add_call_context)."""
        trace_id = "4bf92f3577b34da6a3ce929d0e0736ab"
        traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
        async with serve(client, LoggedKV(), LoggedVDB(), LoggedMemory()):
            memory = client.call_service["memory"].options(headers={protocol.TRACEPARENT: traceparent})
            with (
                structlog.testing.capture_logs(
                    processors=[structlog.contextvars.merge_contextvars, natsrpc.logs.add_call_context]
                ) as logs,
                structlog.contextvars.bound_contextvars(trace_id=trace_id),
            ):
                structlog.get_logger("tests.client").info("calling memory")
                id_ = await memory.remember("traced text")
                structlog.get_logger("tests.client").info("memory answered", id=id_)
        events = [(line["event"], line.get("service")) for line in logs]
        assert events == [
            ("calling memory", None),
            ("remembering", "memory"),
            ("kv put", "kv"),
            ("vdb upsert", "vdb"),
            ("remembered", "memory"),
            ("memory answered", None),
        ]
        assert {line["trace_id"] for line in logs} == {trace_id}
        downstream = [line for line in logs if line.get("service") in ("kv", "vdb")]
        assert all(line["caller"].startswith("memory/") for line in downstream)
        assert all(line["method"] in ("put", "upsert") for line in downstream)
        assert [line["caller"] for line in logs if line.get("service") == "memory"] == ["client", "client"]

    async def test_a_trace_starts_at_the_first_service_without_a_traceparent(self, client: natsrpc.Client) -> None:
        """Without a caller's traceparent, memory starts a trace; kv and vdb log under it; each call gets its own."""
        async with serve(client, LoggedKV(), LoggedVDB(), LoggedMemory()):
            memory = client.call_service["memory"]
            with structlog.testing.capture_logs(processors=[natsrpc.logs.add_call_context]) as logs:
                await memory.remember("first")
                await memory.remember("second")
        assert len(logs) == 8
        first, second = logs[:4], logs[4:]
        for call in (first, second):
            trace_ids = {line["trace_id"] for line in call}
            assert len(trace_ids) == 1
            assert len(trace_ids.pop()) == 32
        assert first[0]["trace_id"] != second[0]["trace_id"]
        assert context.active_call() is None  # nothing leaked into the test's own context


class TestSeparateProcesses:
    """kv, vdb and memory each in their own `python -m natsrpc.run` process still compose."""

    async def test_remember_recall_forget_across_three_processes(self, client: natsrpc.Client, nats_url: str) -> None:
        """The scenario passes with one runner per service, and each runner drains and exits 0 on SIGTERM."""
        async with AsyncExitStack() as stack:
            runners = [
                await stack.enter_async_context(runner(module, url=nats_url))
                for module in ("services.kv", "services.vdb", "services.memory")
            ]
            await until_all_served(client, runners)
            await check_remember_recall_forget(client)
            codes = await asyncio.gather(*(r.stop() for r in runners))
            assert codes == [0, 0, 0], "\n---\n".join(r.stderr for r in runners)

    async def test_three_services_in_one_runner(self, client: natsrpc.Client, nats_url: str) -> None:
        """`natsrpc.run services.kv services.vdb services.memory` in one process serves remember and recall."""
        async with runner("services.kv", "services.vdb", "services.memory", url=nats_url) as child:
            await until_all_served(client, [child])
            memory = client.call_service["memory"]
            ids = await remember_all(client)
            recalled = await memory.recall("cat mat", 2)
            assert recalled[0]["id"] == ids[0]
            assert recalled[0]["text"] == TEXTS[0]
            assert await child.stop() == 0, child.stderr
