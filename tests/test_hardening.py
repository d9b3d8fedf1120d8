"""Hardening against hostile or broken input, against a real nats-server: what an attacker or a
careless caller sends gets a clear natsrpc error or is dropped, never a crash, a hang or growth."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats
import pytest
from children import poll
from nats.aio.client import Client as NatsConnection
from nats.aio.msg import Msg

import natsrpc
from natsrpc import NatsServer, Service, protocol, rpc
from natsrpc.embedded import free_port
from natsrpc.proxy import CallOptions
from natsrpc.registry import Registry
from natsrpc.testing import serve
from natsrpc.transport import sync_with_server
from services.kv import KV

BAD_DEADLINE_BUDGET = 0.3  # answered 400 at once: far under the request's 2 s timeout (a loaded 2-core CI
# machine took 101 ms for the first request of a fresh connection on the public-API path)


@pytest.fixture
async def raw(nats_url: str) -> AsyncIterator[NatsConnection]:
    """A plain nats-py connection (the attacker's, or a test's observer)."""
    nc = await nats.connect(nats_url)
    yield nc
    await nc.close()


class Echo(Service):
    """Returns what it was given and the headers it saw."""

    name = "echo"

    @rpc
    async def headers(self) -> dict[str, str]:
        """Returns the request's headers."""
        return dict(natsrpc.current_call().headers)

    @rpc
    async def parent(self) -> str:
        """Returns the traceparent the request carried."""
        return natsrpc.current_call().parent

    @rpc
    async def nested(self, value: Any = None, other: Any = None) -> int:
        """Takes anything."""
        return 0


INJECTED = "x 12 12\r\nPUB injected 2\r\nhi\r\nHPUB y"
BAD_SUBJECTS = {
    "protocol-injection": INJECTED,
    "space": "svc.kv get",
    "tab": "svc.kv\tget",
    "cr": "svc.kv.get\r",
    "lf": "svc.kv.get\n",
    "empty": "",
    "empty-token": "svc..get",
    "leading-dot": ".svc.kv",
    "trailing-dot": "svc.kv.",
    "star": "svc.kv.*",
    "chevron": "svc.>",
    "nul": "svc.kv\x00",
}


class TestSubjects:
    """Item 1: no wire-protocol injection through a subject or a name."""

    @pytest.mark.parametrize("subject", BAD_SUBJECTS.values(), ids=BAD_SUBJECTS.keys())
    async def test_request_refuses_a_subject_before_writing(
        self, client: natsrpc.Client, raw: NatsConnection, subject: str
    ) -> None:
        """Client.request() raises ConfigurationError for a subject that is not publishable; nothing is sent."""
        seen: list[Msg] = []

        async def record(msg: Msg) -> None:
            seen.append(msg)

        await raw.subscribe(">", cb=record)
        await sync_with_server(raw)
        sent = client.nc.stats["out_msgs"]
        with pytest.raises(natsrpc.ConfigurationError, match="not a publishable NATS subject"):
            await client.request(subject, b"", CallOptions(timeout=1.0))
        assert client.nc.stats["out_msgs"] == sent
        await client.nc.flush()
        await sync_with_server(raw)
        assert [m.subject for m in seen if not m.subject.startswith("svc._hb.")] == []

    @pytest.mark.parametrize(
        ("service", "method"),
        [("kv x", "get"), ("kv", "get\r\nPUB a 1"), ("", "get"), ("kv", ""), ("kv.a", "get"), ("kv", "*")],
        ids=["space-in-service", "crlf-in-method", "empty-service", "empty-method", "dot", "wildcard"],
    )
    async def test_call_refuses_bad_names(self, client: natsrpc.Client, service: str, method: str) -> None:
        """Client.call() and the sugar refuse a service or method name that is not one subject token."""
        sent = client.nc.stats["out_msgs"]
        with pytest.raises(natsrpc.ConfigurationError):
            await client.call(service, method)
        with pytest.raises(natsrpc.ConfigurationError):
            await client.call_service[service][method]()
        assert client.nc.stats["out_msgs"] == sent

    @pytest.mark.parametrize(
        "instance", ["a b", "a.b", "*", "", "a\r\n"], ids=["space", "dot", "star", "empty", "crlf"]
    )
    def test_instance_ids_are_tokens(self, client: natsrpc.Client, instance: str) -> None:
        """A per-instance call needs an instance id that is one subject token."""
        with pytest.raises(natsrpc.ConfigurationError, match="instance id"):
            client.call_service["kv"].instance(instance)

    async def test_a_survey_refuses_a_bad_service_name(self, client: natsrpc.Client) -> None:
        """registry.survey() builds $SRV.<verb>.<service>: the name must be one subject token."""
        with pytest.raises(natsrpc.ConfigurationError, match="service name"):
            await natsrpc.registry.survey(client.nc, "PING", "kv x\r\nPUB a 1", 0.1)

    @pytest.mark.parametrize("prefix", ["svc x", "svc.", "", "a.*"], ids=["space", "trailing-dot", "empty", "wildcard"])
    async def test_the_prefix_is_checked_before_connecting(self, nats_url: str, prefix: str) -> None:
        """connect(prefix=...) refuses a prefix that would make unpublishable subjects."""
        with pytest.raises(natsrpc.ConfigurationError, match="prefix"):
            await natsrpc.connect(nats_url, prefix=prefix)


class TestHeaders:
    """Item 2: no header line can be added through a header value."""

    async def test_line_breaks_in_option_values_are_refused(self, client: natsrpc.Client) -> None:
        """A header value with CR or LF, natsrpc's own names included, is refused when the options are made."""
        for name in (protocol.TRACEPARENT, protocol.CALLER, protocol.CONTENT_TYPE, "X-Mine"):
            with pytest.raises(natsrpc.ConfigurationError, match="one line"):
                client.call_service["echo"].options(headers={name: "00-a\r\nX-Evil: 1"})
            with pytest.raises(natsrpc.ConfigurationError, match="one line"):
                await client.request("svc.echo.headers", b"", headers={name: "x\nX-Evil: 1"})

    def test_the_encoder_keeps_every_value_on_its_line(self) -> None:
        """The one header encoder turns line breaks into spaces in every value, natsrpc's own included."""
        for name in (protocol.TRACEPARENT, protocol.CALLER, protocol.DEADLINE, "X-Mine"):
            block = protocol.encode_headers({name: "v\r\nX-Evil: 1"})
            assert block == f"NATS/1.0\r\n{name}: v  X-Evil: 1\r\n\r\n".encode()
            assert protocol.parse_headers(block) == {name: "v  X-Evil: 1"}

    async def test_an_invalid_traceparent_is_replaced(self, client: natsrpc.Client) -> None:
        """A traceparent option that is not W3C Trace Context travels as a fresh, valid one."""
        async with serve(client, Echo()):
            sent = await client.call_service["echo"].options(headers={protocol.TRACEPARENT: "garbage"}).parent()
            assert sent != "garbage"
            assert natsrpc.context.valid_traceparent(sent)
            good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            assert await client.call_service["echo"].options(headers={protocol.TRACEPARENT: good}).parent() == good

    async def test_a_caller_with_a_line_break_is_refused(self, nats_url: str) -> None:
        """connect(caller=...) must be one printable line: it becomes the Natsrpc-Caller header."""
        with pytest.raises(natsrpc.ConfigurationError, match="caller"):
            await natsrpc.connect(nats_url, caller="me\r\nX-Evil: 1")

    async def test_a_caller_longer_than_256_characters_is_refused(self, nats_url: str) -> None:
        """connect(caller=...) is at most 256 characters, as a host takes the header."""
        with pytest.raises(natsrpc.ConfigurationError, match="1 to 256 characters"):
            await natsrpc.connect(nats_url, caller="c" * 257)

    @pytest.mark.parametrize(
        "value", ["c" * 257, "c" * 100_000, "bad\x00caller", "tab\tin"], ids=["257", "100k", "nul", "tab"]
    )
    async def test_a_bad_caller_header_is_400(self, client: natsrpc.Client, raw: NatsConnection, value: str) -> None:
        """A raw request whose Natsrpc-Caller is too long or not printable gets a 400 naming the
        header, before the handler runs (the caller would reach every log line and span); a caller
        of 256 characters is served."""
        kv = KV()
        async with serve(client, kv):
            reply = await raw.request("svc.kv.get", b'{"key":"a"}', timeout=2, headers={protocol.CALLER: value})
            assert reply.headers is not None
            assert reply.headers[protocol.ERROR_CODE] == "400"
            assert protocol.CALLER in reply.headers[protocol.ERROR]
            good = await raw.request("svc.kv.get", b'{"key":"a"}', timeout=2, headers={protocol.CALLER: "c" * 256})
            assert good.data == b"null"
            assert not good.headers or protocol.ERROR_CODE not in good.headers

    async def test_the_handler_sees_no_extra_header(self, client: natsrpc.Client) -> None:
        """What a handler sees is exactly the headers the client meant to send."""
        async with serve(client, Echo()):
            seen = await client.call_service["echo"].options(headers={"X-Mine": "a b"}).headers()
        assert set(seen) == {protocol.DEADLINE, "X-Mine"}


class TestReplySubjects:
    """Item 4: reply subjects carry a random, unguessable token; stray replies are dropped and counted."""

    async def test_tokens_are_random(self, client: natsrpc.Client, raw: NatsConnection) -> None:
        """100 calls use 100 different 96-bit tokens, none the successor of another."""
        replies: list[str] = []

        async def answer(msg: Msg) -> None:
            replies.append(msg.reply)
            await msg.respond(b"null")

        await raw.subscribe("svc.tokens.get", queue="q", cb=answer)
        await sync_with_server(raw)
        for _ in range(100):
            await client.request("svc.tokens.get", b"")
        tokens = [reply.rsplit(".", 1)[1] for reply in replies]
        assert len(set(tokens)) == 100
        assert all(len(token) == 24 and int(token, 16) >= 0 for token in tokens)
        numbers = sorted(int(token, 16) for token in tokens)
        assert all(b - a > 1 for a, b in itertools.pairwise(numbers))

    async def test_a_guessed_reply_is_dropped_and_counted(self, client: natsrpc.Client, raw: NatsConnection) -> None:
        """Replies aimed at guessed tokens (counter-style) never resolve a pending call; each is counted."""
        held: list[Msg] = []
        arrived = asyncio.Event()

        async def hold(msg: Msg) -> None:
            held.append(msg)
            arrived.set()

        await raw.subscribe("svc.slow.get", queue="q", cb=hold)
        await sync_with_server(raw)
        call = asyncio.ensure_future(client.request("svc.slow.get", b"", CallOptions(timeout=5.0)))
        await asyncio.wait_for(arrived.wait(), 5)
        inbox = held[0].reply.rsplit(".", 1)[0]
        for guess in range(1, 21):
            await raw.publish(f"{inbox}.{guess}", b'"FORGED"')
        await sync_with_server(raw)
        await poll(lambda: client.stray_replies >= 20, "forged replies counted")
        assert not call.done()
        await held[0].respond(b'"real"')
        assert (await asyncio.wait_for(call, 5)).data == b'"real"'


class TestHeartbeats:
    """Item 5: a beat counts only for the service and instance its subject names; the maps are bounded."""

    async def test_a_beat_whose_body_names_another_service_is_ignored(
        self, client: natsrpc.Client, raw: NatsConnection
    ) -> None:
        """A beat on svc._hb.kv.x naming vdb with idempotent upsert changes nothing: no vdb, no retried upsert."""
        registry = client.registry
        assert registry is not None
        beat = protocol.Heartbeat("vdb", "x", "1.0.0", ["upsert"], 0, True, False, 2.0, ["upsert"])
        await raw.publish("svc._hb.kv.x", msgspec.json.encode(beat))
        await sync_with_server(raw)
        await poll(lambda: registry.ignored_beats >= 1, "the forged beat ignored")
        assert not registry.known("vdb")
        assert not registry.known("kv")
        assert not registry.idempotent("vdb", "upsert")

    async def test_a_beat_announcing_an_interval_out_of_range_is_ignored(
        self, client: natsrpc.Client, raw: NatsConnection
    ) -> None:
        """An interval of 0 or less would expire the instance at once, and one of days keep a dead
        instance live for days: beats announcing one outside (0, 3600] seconds are ignored."""
        registry = client.registry
        assert registry is not None
        ignored = registry.ignored_beats
        for n, interval in enumerate([0.0, -1.0, 3600.5, 1e300]):
            beat = protocol.Heartbeat("hbodd", f"i{n}", "1.0.0", ["get"], 0, True, False, interval)
            await raw.publish(f"svc._hb.hbodd.i{n}", msgspec.json.encode(beat))
        await raw.publish(
            "svc._hb.hbodd.ok",
            msgspec.json.encode(protocol.Heartbeat("hbodd", "ok", "1.0.0", ["get"], 0, True, False, 3600.0)),
        )
        await sync_with_server(raw)
        await poll(lambda: registry.known("hbodd"), "the beat in range taken")
        assert registry.ignored_beats == ignored + 4
        assert [i.id for i in registry.live("hbodd")] == ["ok"]

    @pytest.mark.parametrize(
        ("option", "value", "why"),
        [
            ("heartbeat_interval", 0.0, "heartbeat_interval must be 0.01-3600 seconds, got 0.0"),
            ("heartbeat_interval", 0.001, "heartbeat_interval must be 0.01-3600 seconds"),
            ("heartbeat_interval", 3601.0, "heartbeat_interval must be 0.01-3600 seconds"),
            ("stream_keepalive", 0.0, "stream_keepalive must be 0.01-3600 seconds"),
            ("stream_keepalive", math.inf, "stream_keepalive must be 0.01-3600 seconds"),
            ("drain_timeout", math.nan, "drain_timeout must be at least 0 seconds, got nan"),
            ("drain_timeout", -1.0, "drain_timeout must be at least 0 seconds"),
        ],
    )
    def test_a_host_refuses_timings_out_of_range(
        self, client: natsrpc.Client, option: str, value: float, why: str
    ) -> None:
        """The host announces only a heartbeat interval its callers take, sends only keepalive
        intervals its streams' callers take (they refuse others: every stream failed), and drains
        for a real number of seconds."""
        with pytest.raises(natsrpc.ConfigurationError, match=why):
            natsrpc.Host(client, [KV()], **{option: value})

    async def test_a_forged_unhealthy_beat_for_a_real_instance_changes_nothing(
        self, client: natsrpc.Client, raw: NatsConnection
    ) -> None:
        """healthy:false for kv's real id, published on another subject, does not open kv's circuit."""
        async with serve(client, KV()) as host:
            kv_id = host.instances[0].id
            registry = client.registry
            assert registry is not None
            await poll(lambda: bool(registry.live("kv")))
            forged = protocol.Heartbeat("kv", kv_id, "1.0.0", ["get"], 0, False, True, 2.0)
            for subject in (f"svc._hb.vdb.{kv_id}", "svc._hb.vdb.X", f"svc._hb.kv.{kv_id}.extra"):
                await raw.publish(subject, msgspec.json.encode(forged))
            await sync_with_server(raw)
            await poll(lambda: registry.ignored_beats >= 3)
            assert [i.id for i in registry.live("kv")] == [kv_id]
            assert client.circuit("kv").state is natsrpc.circuit.State.CLOSED
            for _ in range(20):
                assert await client.call_service["kv"].get("a") is None

    async def test_forged_names_cannot_grow_the_client(self, client: natsrpc.Client, raw: NatsConnection) -> None:
        """Beats of thousands of made-up services stop at the registry's limit, and so do the breakers."""
        registry = client.registry
        assert registry is not None
        assert client.circuits is not None
        registry.max_instances = 200
        for n in range(2000):
            beat = protocol.Heartbeat(f"s{n}", "i", "1.0.0", [], 0, False, False, 2.0)
            await raw.publish(f"svc._hb.s{n}.i", msgspec.json.encode(beat))
        await sync_with_server(raw)
        await poll(lambda: registry.ignored_beats >= 1800, "beats past the limit dropped")
        assert len(registry.services()) == 200
        assert len(client.circuits) <= 200

    def test_the_breaker_and_registry_limits_hold(self) -> None:
        """Circuits forget closed breakers past max_breakers; a Registry forgets names without instances first."""
        circuits = natsrpc.circuit.Circuits(max_breakers=10)
        for n in range(1000):
            circuits.get(f"s{n}")
        assert len(circuits) == 10
        now = [0.0]
        registry = Registry(clock=lambda: now[0], max_services=5)
        for n in range(5):
            registry.observe(protocol.Heartbeat(f"s{n}", "i", "1", [], 0, True, False, 1.0))
        now[0] = 10.0
        registry.sweep()  # every instance expired: the names remain known, with no instance
        registry.observe(protocol.Heartbeat("new", "i", "1", [], 0, True, False, 1.0))
        assert registry.known("new")
        assert len(registry.services()) == 5


class TestDeadlineHeader:
    """Item 6: an implausible Natsrpc-Deadline is a 400 naming the header, within 100 ms."""

    @pytest.mark.parametrize(
        "value",
        ["soon", "-5", "9" * 400, "1e308", "\u00b2\u00b3", "99999999999999999999"],
        ids=["word", "negative", "400-digits", "float", "unicode-digits", "overflow"],
    )
    async def test_bad_deadline_is_400(self, client: natsrpc.Client, raw: NatsConnection, value: str) -> None:
        """A raw request with a bad deadline gets a 400 naming Natsrpc-Deadline; the service keeps serving."""
        async with serve(client, KV()):
            started = time.perf_counter()
            reply = await raw.request("svc.kv.get", b'{"key":"a"}', timeout=2, headers={protocol.DEADLINE: value})
            elapsed = time.perf_counter() - started
            assert reply.headers is not None
            assert reply.headers[protocol.ERROR_CODE] == "400"
            assert protocol.DEADLINE in reply.headers[protocol.ERROR]
            assert elapsed < BAD_DEADLINE_BUDGET
            assert await client.call_service["kv"].get("a") is None


class TestFailedStarts:
    """Item 9: nothing leaks when connect() or Host.start() fails."""

    @pytest.mark.parametrize(
        "options",
        [{"encoding": "xml"}, {"timeout": 0}, {"timeout": math.inf}, {"user": "nobody", "password": "wrong"}],
        ids=["bad-encoding", "zero-timeout", "infinite-timeout", "refused-credentials"],
    )
    async def test_failed_connect_leaves_no_connection(self, options: dict[str, Any], tmp_path: Any) -> None:
        """connect() that raises leaves no connection on the server and no task behind."""
        config = tmp_path / "auth.conf"
        config.write_text('authorization { users: [ { user: app, password: "right" } ] }\n')
        with NatsServer(config=config, monitor_port=free_port()) as server:
            tasks = len(asyncio.all_tasks())
            with pytest.raises((natsrpc.ConfigurationError, natsrpc.AuthenticationFailed)):
                await natsrpc.connect(server.url, **{"user": "app", "password": "right", **options})
            await asyncio.sleep(0.3)  # a leaked connection would be reconnecting by now: give it the chance
            assert server.monitor("connz")["num_connections"] == 0
            assert len(asyncio.all_tasks()) == tasks

    async def test_failed_setup_cleans_up_what_started(self, client: natsrpc.Client) -> None:
        """A setup() raising runs the cleanup() of the services already set up, and subscribes nothing."""
        events: list[str] = []

        class Good(Service):
            name = "good"

            async def setup(self) -> None:
                events.append("good.setup")

            async def cleanup(self) -> None:
                events.append("good.cleanup")

            @rpc
            async def ping(self) -> int:
                return 1

        class Bad(Good):
            name = "bad"

            async def setup(self) -> None:
                raise RuntimeError("no database")

        subs = len(client.nc._subs)
        host = natsrpc.Host(client, [Good(), Bad()])
        with pytest.raises(RuntimeError, match="no database"):
            await host.start()
        assert events == ["good.setup", "good.cleanup"]
        assert len(client.nc._subs) == subs
        with pytest.raises(natsrpc.NoResponders):
            await client.call_service["good"].options(retry=natsrpc.retry.NO_RETRIES).ping()

    async def test_failed_subscribe_unsubscribes_and_cleans_up(
        self, client: natsrpc.Client, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A subscribe that fails part way unsubscribes the endpoints already subscribed and runs cleanup()."""
        cleaned: list[str] = []

        class Two(Service):  # kv's setup asks JetStream, which would add nats-py's request inbox
            name = "kv"

            @rpc
            async def a(self) -> None: ...

            @rpc
            async def b(self) -> None: ...

            async def cleanup(self) -> None:
                cleaned.append("kv")

        host = natsrpc.Host(client, [Two()])
        real = host._subscribe
        calls = 0

        async def failing(*args: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise natsrpc.PermissionDenied("subscribe refused")
            await real(*args)

        monkeypatch.setattr(host, "_subscribe", failing)
        subs = len(client.nc._subs)
        with pytest.raises(natsrpc.PermissionDenied):
            await host.start()
        assert cleaned == ["kv"]
        assert len(client.nc._subs) == subs


class TestErrorsStayNatsrpcErrors:
    """Item 13: bad options and hostile depth raise natsrpc errors, never OverflowError or RecursionError."""

    @pytest.mark.parametrize(
        "timeout", [math.inf, 1e308, "5", True, math.nan, -1, 0], ids=["inf", "1e308", "str", "bool", "nan", "neg", "0"]
    )
    def test_bad_timeouts(self, client: natsrpc.Client, timeout: Any) -> None:
        """.options(timeout=...) refuses anything but a positive, finite number of seconds."""
        with pytest.raises(natsrpc.ConfigurationError, match="timeout"):
            client.call_service["kv"].options(timeout=timeout)
        with pytest.raises(natsrpc.ConfigurationError, match="attempt_timeout"):
            client.call_service["kv"].options(attempt_timeout=timeout)

    async def test_deep_mixed_arguments_are_400(self, client: natsrpc.Client) -> None:
        """10^4-deep nesting in the mixed-arguments form is a 400 BadRequest, not a 500 RecursionError."""
        deep = b"[" * 10_000 + b"]" * 10_000
        async with serve(client, Echo()):
            for form in (b"[[" + deep + b"],{}]", b"[[]," + b'{"value":' + deep + b"}]"):
                with pytest.raises(natsrpc.BadRequest, match=r"nested too deeply|not valid"):
                    await client.request("svc.echo.nested", form, headers={protocol.ARGS_FORM: protocol.MIXED_ARGS})
            for plain in (deep, b'{"value":' + deep + b"}"):
                with pytest.raises(natsrpc.BadRequest):
                    await client.request("svc.echo.nested", plain)

    async def test_deep_reply_is_bad_reply(self, client: natsrpc.Client, raw: NatsConnection) -> None:
        """A 10^4-deep reply to an untyped call raises BadReply, not RecursionError."""

        async def answer(msg: Msg) -> None:
            await msg.respond(b"[" * 10_000 + b"]" * 10_000)

        await raw.subscribe("svc.deep.get", queue="q", cb=answer)
        await sync_with_server(raw)
        with pytest.raises(natsrpc.BadReply):
            await client.call_service["deep"].get()


def test_heartbeat_subjects_parse() -> None:
    """parse_heartbeat_subject takes (service, id) from svc._hb.<service>.<id> and nothing else."""
    assert protocol.parse_heartbeat_subject("svc._hb.kv.X1") == ("kv", "X1")
    for bad in ("svc._hb.kv", "svc._hb.kv.X.Y", "svc.kv.get.X", "svc._hb..X", "other._hb.kv.X"):
        assert protocol.parse_heartbeat_subject(bad) is None, bad
    assert json.loads(msgspec.json.encode(protocol.Heartbeat("a", "b", "1", [], 0, True, False, 1.0)))["name"] == "a"
