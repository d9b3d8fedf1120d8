"""Payload and protocol tests (RELIABILITY.md P1-P4): size limits on both sides, and fuzzed bodies.

Also in tests/test_host.py (``TestPayloadLimits``, ``TestBadInput``): a request whose body fits but
not with its headers (P2), a body of exactly max_payload (P1), a reply over the limit as 413 (P3),
and a table of hand-picked malformed bodies. This file adds what those leave out: caller headers and
msgpack bodies over the limit, proof that nothing was sent, 413 seen by a plain NATS caller, and
hypothesis fuzzing of the decode path (2,000 bodies; 10,000 with -m slow) and of a hosted service (500 requests).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import nats
import pytest
from children import loop_probe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NatsConnection
from nats.aio.msg import Msg

import natsrpc
from natsrpc import Service, codec, protocol, rpc
from natsrpc.codec import Signature
from natsrpc.testing import serve

MAX = 4096  # max_payload of this module's server
DECODE_EXAMPLES = 10_000  # P4: bodies fuzzed through Signature.decode_arguments (-m slow; 2,000 by default)
NETWORK_EXAMPLES = 500  # P4: requests fuzzed through a hosted service
REPLY_BUDGET = 1.0  # seconds for one fuzzed request's reply on a shared 2-core machine (typically ~1 ms)


class Point(msgspec.Struct):
    """A Struct argument, to fuzz nested validation."""

    x: int
    y: int


class Shapes(Service):
    """Endpoints with assorted signatures, the targets of the fuzzing."""

    name = "fuzz"

    def __init__(self) -> None:
        self.sizes: list[int] = []

    @rpc
    async def add(self, a: int, b: int) -> int:
        """Returns a + b."""
        return a + b

    @rpc
    async def place(self, p: Point, at: datetime.datetime, tags: list[str] | None = None) -> int:
        """Returns the number of tags."""
        return len(tags or [])

    @rpc
    async def tune(self, level: float | None = None, *, loud: bool = False, extra: dict[str, int] | None = None) -> str:
        """Returns the settings it received, as text."""
        return f"{level} {loud} {extra}"

    @rpc
    async def nothing(self) -> None:
        """Takes no arguments."""

    @rpc
    async def echo(self, data: str) -> int:
        """Returns the length of ``data``."""
        self.sizes.append(len(data))
        return len(data)

    @rpc
    async def make(self, size: int) -> str:
        """Returns ``size`` characters."""
        return "x" * size


SIGNATURES: dict[str, Signature] = {name: ep.signature for name, ep in Shapes.endpoints.items() if name != "make"}


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[natsrpc.NatsServer]:
    """A nats-server with max_payload 4096 (a config option; there is no command-line flag)."""
    config = tmp_path_factory.mktemp("small") / "small.conf"
    config.write_text(f"max_payload: {MAX}\n")
    with natsrpc.NatsServer(config=config) as server:
        yield server


@pytest.fixture
async def hosted(small_server: natsrpc.NatsServer) -> AsyncIterator[tuple[natsrpc.Client, Shapes]]:
    """Shapes hosted on its own connection to the small server; yields a caller and the service."""
    service = Shapes()
    async with (
        natsrpc.connect(small_server.url) as server_side,
        natsrpc.connect(small_server.url, timeout=3.0) as caller,
        serve(server_side, service, discoverable=False),  # heartbeat jitter uses `random`, which hypothesis forbids
    ):
        yield caller, service


@pytest.fixture
async def plain(small_server: natsrpc.NatsServer) -> AsyncIterator[NatsConnection]:
    """A plain nats-py connection to the small server, as a non-Python caller would use."""
    nc = await nats.connect(small_server.url)
    try:
        yield nc
    finally:
        await nc.close()


class TestRequestLimits:
    """P1/P2: a request over max_payload, counting its headers, fails before sending; nothing breaks."""

    @pytest.mark.parametrize(
        ("encoding", "data", "headers"),
        [
            pytest.param("json", "x" * MAX, None, id="body-alone-json"),
            pytest.param("msgpack", "x" * MAX, None, id="body-alone-msgpack"),
            pytest.param("json", "x" * (MAX - 200), {"X-Trace": "t" * 300}, id="caller-headers-push-it-over"),
            pytest.param("msgpack", "x" * (MAX - 200), {"X-Trace": "t" * 300}, id="caller-headers-msgpack"),
        ],
    )
    async def test_over_limit_never_sent(
        self, hosted: tuple[natsrpc.Client, Shapes], encoding: str, data: str, headers: dict[str, str] | None
    ) -> None:
        """PayloadTooLarge is raised locally: the service sees no request and the connection never drops."""
        caller, service = hosted
        fuzz = caller.call_service["fuzz"].options(encoding=encoding, headers=headers)
        with loop_probe() as yielded, pytest.raises(natsrpc.PayloadTooLarge, match="max_payload") as info:
            await fuzz.echo(data=data)
        assert not yielded  # refused at once: it never waited on the event loop (nothing was sent)
        assert info.value.hop == "fuzz.echo"
        assert await fuzz.echo(data="small") == 5  # the connection still works ...
        assert service.sizes == [5]  # ... and the big request never reached the service
        assert caller.nc.is_connected
        assert caller.nc.stats["reconnects"] == 0

    async def test_sync_client_too(
        self, small_server: natsrpc.NatsServer, hosted: tuple[natsrpc.Client, Shapes]
    ) -> None:
        """SyncClient raises the same PayloadTooLarge and keeps working."""

        def call() -> None:
            with natsrpc.SyncClient(small_server.url) as client:
                with pytest.raises(natsrpc.PayloadTooLarge):
                    client.call_service["fuzz"].echo(data="x" * MAX)
                assert client.call_service["fuzz"].echo(data="ok") == 2

        await asyncio.to_thread(call)


class TestReplyLimits:
    """P3: a reply over max_payload becomes a 413 error reply (natsrpc callers: test_host.py)."""

    async def test_plain_caller_gets_413(self, hosted: tuple[natsrpc.Client, Shapes], plain: NatsConnection) -> None:
        """A caller with nothing but a NATS client gets the ADR-32 413 headers and JSON error body."""
        reply = await plain.request("svc.fuzz.make", b'{"size": 5000}', timeout=3)
        assert reply.headers is not None
        assert reply.headers[protocol.ERROR_CODE] == "413"
        error = msgspec.json.decode(reply.data)["error"]
        assert error["type"] == "ReplyTooLarge"
        assert "max_payload" in error["message"]
        ok = await plain.request("svc.fuzz.make", b'{"size": 3}', timeout=3)
        assert ok.data == b'"xxx"'


# --------------------------------------------------------------------------------------------------
# P4: fuzzing.
# --------------------------------------------------------------------------------------------------


def _json(value: Any) -> bytes:
    """Encodes ``value`` as JSON the lax way (NaN and Infinity included: invalid JSON is welcome here)."""
    return json.dumps(value, default=str).encode()


def _msgpack(value: Any) -> bytes:
    return msgspec.msgpack.encode(value)


NAMES = ("a", "b", "p", "x", "y", "at", "tags", "level", "loud", "extra", "data", "zzz", "")
TEXTS = ("2024-01-02T03:04:05Z", "2024-13-45T99:00:00", "yesterday", "", "é", "\x00", "a" * 40)


class Recipe:
    """Builds a request body from a byte string, byte by byte (past the end every byte reads as 0).

    Hypothesis draws only the bytes, which is several times cheaper than drawing nested strategies,
    and still shrinks a failure to a short recipe. Values are JSON-like trees with the signatures'
    argument names, date-like and odd strings, int64 edge integers, NaN and infinities.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def byte(self) -> int:
        """Returns the next byte of the recipe."""
        self.at += 1
        return self.data[self.at - 1] if self.at <= len(self.data) else 0

    def chunk(self, n: int) -> bytes:
        """Returns the next ``n`` bytes."""
        return bytes(self.byte() for _ in range(n))

    def value(self, depth: int = 0) -> Any:
        """Returns one value: a scalar, or below depth 3 a list or an object."""
        kind = self.byte() % (8 if depth < 3 else 6)
        if kind == 0:
            return None
        if kind == 1:
            return bool(self.byte() & 1)
        if kind == 2:
            return int.from_bytes(self.chunk(self.byte() % 9), "big", signed=True)
        if kind == 3:
            return struct.unpack(">d", self.chunk(8))[0]  # any double: NaN, infinities, subnormals
        if kind == 4:
            return TEXTS[self.byte() % len(TEXTS)]
        if kind == 5:
            return self.chunk(self.byte() % 12).decode("utf-8", errors="replace")
        if kind == 6:
            return [self.value(depth + 1) for _ in range(self.byte() % 4)]
        return self.arguments(depth + 1)

    def arguments(self, depth: int = 0) -> dict[str, Any]:
        """Returns an object whose keys are mostly argument names."""
        return {NAMES[self.byte() % len(NAMES)]: self.value(depth) for _ in range(self.byte() % 5)}

    def body(self) -> tuple[bytes, bool]:
        """Returns (body, msgpack): raw bytes, or an encoded object, array, mixed pair or scalar, maybe mangled."""
        form, msgpack = self.byte() % 5, bool(self.byte() & 1)
        if form == 0:
            return self.data[self.at :], msgpack  # the rest of the recipe, as it is
        value: Any = {1: self.arguments, 2: lambda: [self.value(1) for _ in range(self.byte() % 4)]}.get(
            form, lambda: [[self.value(1)], self.arguments()] if form == 3 else self.value()
        )()
        encoded = _msgpack(value) if msgpack else _json(value)
        cut, mangle = self.byte(), self.byte() % 4
        if mangle == 1 and encoded:
            return encoded[: cut % len(encoded)], msgpack  # truncated
        if mangle == 2 and encoded:
            i = cut % len(encoded)
            return encoded[:i] + bytes([self.byte()]) + encoded[i + 1 :], msgpack  # one byte changed
        return encoded, msgpack


def valid_arguments(name: str) -> st.SearchStrategy[dict[str, Any]]:
    """Returns arguments that fit endpoint ``name`` (so the fuzz also proves good bodies get through)."""
    when = st.datetimes(timezones=st.just(datetime.UTC))
    return {
        "add": st.fixed_dictionaries({"a": st.integers(-(2**63), 2**63 - 1), "b": st.integers(-(2**63), 2**63 - 1)}),
        "place": st.fixed_dictionaries(
            {"p": st.builds(Point, st.integers(-(2**63), 2**63 - 1), st.integers(-(2**63), 2**63 - 1)), "at": when},
            optional={"tags": st.lists(st.text(max_size=5), max_size=3)},
        ),
        "tune": st.fixed_dictionaries(
            {},
            optional={
                "level": st.floats(allow_nan=False),
                "loud": st.booleans(),
                "extra": st.dictionaries(st.text(max_size=4), st.integers(-5, 5), max_size=3),
            },
        ),
        "nothing": st.just({}),
        "echo": st.fixed_dictionaries({"data": st.text(max_size=30)}),
    }[name]


@st.composite
def valid_bodies(draw: st.DrawFn) -> tuple[str, bytes, bool, bool]:
    """Returns (endpoint, body, msgpack, mixed) for arguments that fit, sent in any of the three forms."""
    name = draw(st.sampled_from(sorted(SIGNATURES)))
    kwargs = draw(valid_arguments(name))
    signature = SIGNATURES[name]
    n_positional = draw(st.integers(0, min(signature.n_positional, len(kwargs))))
    names = [n for n in signature.names[:n_positional] if n in kwargs]
    if len(names) < n_positional:  # positional arguments must be a prefix of the parameters
        names = []
    args = tuple(kwargs.pop(n) for n in names)
    msgpack = draw(st.booleans())
    body, mixed = codec.encode_arguments(args, kwargs, msgpack)
    return name, body, msgpack, mixed


def check_decoded(name: str, decoded: tuple[Any, ...]) -> None:
    """Asserts decoded values fit endpoint ``name``'s parameters (type checks a few by hand)."""
    signature = SIGNATURES[name]
    assert len(decoded) == len(signature.names)
    signature.call_parts(decoded)
    if name == "add":
        assert all(type(v) is int for v in decoded)
    elif name == "place":
        assert isinstance(decoded[0], Point)
        assert isinstance(decoded[1], datetime.datetime)


class TestFuzzDecode:
    """P4: every body either decodes to arguments that fit the signature or raises BadRequest, nothing else."""

    @pytest.mark.parametrize(
        "examples", [2_000, pytest.param(DECODE_EXAMPLES, marks=pytest.mark.slow)], ids=lambda n: f"{n}-bodies"
    )
    def test_random_bodies(self, examples: int) -> None:
        """Hypothesis bodies (random, malformed, mistyped, truncated, mixed form) against five signatures:
        2,000 in the default suite, P4's 10,000 with ``-m slow``."""
        outcomes: Counter[str] = Counter()

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(name=st.sampled_from(sorted(SIGNATURES)), recipe=st.binary(max_size=120), mixed=st.booleans())
        def fuzz(name: str, recipe: bytes, mixed: bool) -> None:
            data, msgpack = Recipe(recipe).body()
            error: natsrpc.BadRequest | None = None
            try:
                decoded = SIGNATURES[name].decode_arguments(data, msgpack, mixed)
            except natsrpc.BadRequest as exc:
                error = exc
            if error is None:
                check_decoded(name, decoded)
                outcomes["decoded"] += 1
            else:
                assert error.code == 400
                assert error.message
                outcomes["400"] += 1

        fuzz()
        assert sum(outcomes.values()) >= examples
        assert outcomes["400"] > outcomes["decoded"] > 0, outcomes  # both paths exercised

    def test_valid_bodies_decode(self) -> None:
        """Arguments that fit, in any form and encoding the client sends, always decode to the same values."""

        @settings(max_examples=1_000, deadline=None, database=None)
        @given(case=valid_bodies())
        def fuzz(case: tuple[str, bytes, bool, bool]) -> None:
            name, body, msgpack, mixed = case
            check_decoded(name, SIGNATURES[name].decode_arguments(body, msgpack, mixed))

        fuzz()


def request_headers() -> st.SearchStrategy[dict[str, str] | None]:
    """Headers a fuzzed request may carry: content types, the mixed-args marker, a garbage deadline."""
    return st.none() | st.fixed_dictionaries(
        {},
        optional={
            protocol.CONTENT_TYPE: st.sampled_from([protocol.JSON, protocol.MSGPACK, "text/plain", ""]),
            protocol.ARGS_FORM: st.sampled_from([protocol.MIXED_ARGS, "other"]),
            protocol.DEADLINE: st.sampled_from(["soon", "-1", "1e3", ""]),  # unparsable: the default applies
            protocol.TRACEPARENT: st.sampled_from(["00-zz-yy-01", "", "garbage"]),
        },
    )


class TestFuzzService:
    """P4 over the network: a hosted service answers every fuzzed request with a 400 or a result, in time."""

    async def test_five_hundred_requests(self, hosted: tuple[natsrpc.Client, Shapes], plain: NatsConnection) -> None:
        """500 hypothesis requests each get a success or a 400 within 1 s; the service serves normally afterwards."""
        caller, _ = hosted
        loop = asyncio.get_running_loop()
        outcomes: Counter[str] = Counter()
        slowest = 0.0

        async def send(subject: str, body: bytes, headers: dict[str, str] | None) -> tuple[Msg, float]:
            started = time.perf_counter()
            reply = await plain.request(subject, body, timeout=REPLY_BUDGET * 3, headers=headers)
            return reply, time.perf_counter() - started

        @settings(
            max_examples=NETWORK_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(name=st.sampled_from(sorted(SIGNATURES)), recipe=st.binary(max_size=120), headers=request_headers())
        def fuzz(name: str, recipe: bytes, headers: dict[str, str] | None) -> None:
            nonlocal slowest
            body, _ = Recipe(recipe).body()  # the headers say how to read it, right or wrong
            # Runs in a worker thread; the request itself runs on the test's loop, which hosts the service.
            future = asyncio.run_coroutine_threadsafe(send(f"svc.fuzz.{name}", body, headers), loop)
            reply, elapsed = future.result(REPLY_BUDGET * 4)
            slowest = max(slowest, elapsed)
            assert elapsed < REPLY_BUDGET, f"reply took {elapsed * 1e3:.0f} ms"
            code = reply.headers.get(protocol.ERROR_CODE) if reply.headers else None
            if code is None:
                assert reply.headers is None or protocol.STATUS not in reply.headers, (
                    reply.headers
                )  # not "no responders"
                outcomes["ok"] += 1
            else:
                assert code == "400", (code, reply.data)
                assert msgspec.json.decode(reply.data)["error"]["type"] == "BadRequest"
                outcomes["400"] += 1

        await asyncio.to_thread(fuzz)
        assert sum(outcomes.values()) >= NETWORK_EXAMPLES
        assert outcomes["400"] > 0
        assert outcomes["ok"] > 0
        fuzz_service = caller.call_service["fuzz"]
        assert await fuzz_service.add(2, b=3) == 5
        assert await fuzz_service.place(Point(1, 2), datetime.datetime.now(datetime.UTC), ["a"]) == 1
