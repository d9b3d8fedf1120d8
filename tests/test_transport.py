"""natsrpc.transport: the leaner header parser and encoder, direct delivery and the non-awaiting send.

These replace parts of nats-py on the hot path, so each is checked against what nats-py itself
does: the parser against nats-py's own header parser (hypothesis), the encoder against nats-py's
encoding as a subscriber receives it, and ``send`` against a real server.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import nats
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NatsConnection

import natsrpc
from natsrpc import protocol, transport
from natsrpc.errors import ConfigurationError

REPO = Path(__file__).resolve().parents[1]

# Header names: HTTP tokens (what nats-py sends), plus names nats-py's parser must skip.
TOKEN = st.text(alphabet="!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", min_size=1)
ODD_NAME = st.sampled_from(["bad name", "tab\tname", "naïve", "", "  padded  "])
OWN_NAME = st.sampled_from(sorted(protocol._PROTOCOL_NAMES))  # natsrpc's own: parsed on a shorter path
VALUE = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]), max_size=40)


def block(lines: list[tuple[str, str]]) -> bytes:
    """A header block as a peer would send it (no status line)."""
    return ("NATS/1.0\r\n" + "".join(f"{n}: {v}\r\n" for n, v in lines) + "\r\n").encode()


class TestParseHeaders:
    @settings(max_examples=500, deadline=None)
    @given(st.lists(st.tuples(st.one_of(TOKEN, ODD_NAME, OWN_NAME), VALUE), min_size=1, max_size=6))
    def test_matches_nats_py(self, lines: list[tuple[str, str]]) -> None:
        raw = block(lines)
        theirs = NatsConnection._parse_header_lines(raw[len("NATS/1.0\r\n") :])
        theirs.pop("", None)  # nats-py keeps a header with an empty name; natsrpc skips it
        assert protocol.parse_headers(raw) == (theirs or None)

    def test_strips_only_ascii_whitespace_like_nats_py(self) -> None:
        raw = block([("A", "\u00a0x\u0085"), ("B", " \t y \t ")])
        assert protocol.parse_headers(raw) == {"A": "\u00a0x\u0085", "B": "y"}

    def test_invalid_utf8_value_is_replaced_not_dropped(self) -> None:
        raw = b"NATS/1.0\r\nA: \xff\xfeok\r\nB: 2\r\n\r\n"
        assert protocol.parse_headers(raw) == {"A": "\ufffd\ufffdok", "B": "2"}

    def test_lines_without_a_colon_and_control_characters_in_names_are_skipped(self) -> None:
        raw = b"NATS/1.0\r\ngarbage\r\nX\x01Y: 1\r\nok: 2\r\n\r\n"
        assert protocol.parse_headers(raw) == {"ok": "2"}

    def test_natsrpcs_own_names_follow_the_same_rules(self) -> None:
        """natsrpc's own names take a shorter path: without a colon they are skipped, their values
        are stripped of ASCII whitespace only, and a name with space around it is still read."""
        raw = (
            f"NATS/1.0\r\n{protocol.DEADLINE}\r\n{protocol.CALLER}: \t kv/1 \r\n"
            f" {protocol.TRACEPARENT} :\u00a0x\r\n{protocol.CONTENT_TYPE}:\r\n\r\n"
        ).encode()
        theirs = NatsConnection._parse_header_lines(raw[len("NATS/1.0\r\n") :])
        assert protocol.parse_headers(raw) == theirs
        assert protocol.parse_headers(raw) == {
            protocol.CALLER: "kv/1",
            protocol.TRACEPARENT: "\u00a0x",
            protocol.CONTENT_TYPE: "",
        }

    def test_no_usable_line_is_none(self) -> None:
        assert protocol.parse_headers(b"NATS/1.0\r\n\r\n") is None

    @pytest.mark.parametrize("raw", [b"NATS/1.0\r\nA: b\r\n", b"NATS/1.0\r\nA: b", b"NATS/1.0\r\nA: b\r\n\r\n\r\n"])
    def test_a_block_without_its_final_empty_line_still_parses(self, raw: bytes) -> None:
        assert protocol.parse_headers(raw) == {"A": "b"}


class TestHeaderBlock:
    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(TOKEN, VALUE.map(str.strip), min_size=1, max_size=5))
    def test_round_trips_through_the_parser(self, headers: dict[str, str]) -> None:
        assert protocol.parse_headers(protocol.encode_headers(headers)) == headers

    def test_empty_is_no_block(self) -> None:
        assert protocol.encode_headers({}) == b""

    def test_user_values_are_stripped_and_line_breaks_become_spaces(self) -> None:
        assert protocol.encode_headers({"X-A": " a\r\nb "}) == b"NATS/1.0\r\nX-A: a  b\r\n\r\n"

    def test_a_name_that_is_not_a_token_is_refused(self) -> None:
        with pytest.raises(ValueError, match="not an HTTP token"):
            protocol.encode_headers({"bad name": "1"})

    async def test_bad_header_name_is_refused_when_the_options_are_made(self, client: natsrpc.Client) -> None:
        with pytest.raises(ConfigurationError, match="'bad: name' is not an HTTP token"):
            client.call_service["kv"].options(headers={"bad: name": "1"})


@pytest.mark.skipif(not transport.FAST_PATH, reason="send() is the fast path; NATSRPC_FAST_PATH=0 turns it off")
class TestSend:
    """send() queues a message on nats-py's buffer without awaiting, or declines and queues nothing."""

    async def test_a_plain_subscriber_receives_what_send_queued(self, nats_url: str) -> None:
        nc = await nats.connect(nats_url)
        try:
            sub = await nc.subscribe("transport.send")
            await nc.flush()
            headers = {"Natsrpc-Deadline": "123", "X-Custom": "v"}
            assert transport.send(nc, "transport.send", "reply.to", b"body", protocol.encode_headers(headers))
            msg = await sub.next_msg(timeout=5)
            assert (msg.subject, msg.reply, msg.data, msg.headers) == ("transport.send", "reply.to", b"body", headers)
            assert nc.stats["out_msgs"] >= 1
        finally:
            await nc.close()

    async def test_without_headers_it_is_a_plain_pub(self, nats_url: str) -> None:
        nc = await nats.connect(nats_url)
        try:
            sub = await nc.subscribe("delivery.plain")
            await nc.flush()
            assert transport.send(nc, "delivery.plain", "", b"x")
            msg = await sub.next_msg(timeout=5)
            assert (msg.data, msg.headers, msg.reply) == (b"x", None, "")
        finally:
            await nc.close()

    async def test_a_closed_connection_queues_nothing(self, nats_url: str) -> None:
        nc = await nats.connect(nats_url)
        await nc.close()
        pending = list(nc._pending)
        assert not transport.send(nc, "delivery.closed", "", b"x")
        assert nc._pending == pending

    async def test_a_nats_py_without_the_internals_it_uses_gets_nothing_queued(self, nats_url: str) -> None:
        nc = await nats.connect(nats_url)
        stats = nc.stats
        try:
            del nc.stats  # as if a later nats-py had renamed it
            pending = list(nc._pending)
            assert not transport.send(nc, "delivery.renamed", "", b"x")
            assert nc._pending == pending
        finally:
            nc.stats = stats
            await nc.close()

    async def test_over_the_pending_limit_it_leaves_the_message_to_nats_py(self, nats_url: str) -> None:
        nc = await nats.connect(nats_url, pending_size=64)
        try:
            assert not transport.send(nc, "delivery.big", "", b"x" * 100)
        finally:
            await nc.close()


class TestBoundary:
    """The nats-py boundary: every internal natsrpc uses is there, used in transport.py only, and can be turned off."""

    def test_every_internal_natsrpc_uses_is_present(self) -> None:
        """An upgrade of nats-py that removed or renamed an internal fails here, naming it."""
        missing = transport.missing_internals()
        version = importlib.metadata.version("nats-py")
        assert not missing, (
            f"nats-py {version} lacks the internals natsrpc.transport uses: {', '.join(missing)}; "
            "update natsrpc/transport.py (or run with NATSRPC_FAST_PATH=0) and its nats-py pin"
        )

    def test_the_pin_matches_what_the_internals_were_checked_against(self) -> None:
        """pyproject pins nats-py to the minor version transport.py was checked against, and that is installed."""
        pyproject = (REPO / "pyproject.toml").read_text()
        assert '"nats-py>=2.16,<2.17"' in pyproject
        assert importlib.metadata.version("nats-py").startswith("2.16.")

    def test_no_other_module_touches_nats_py_internals(self) -> None:
        """Outside transport.py, no module of natsrpc or services reads a private attribute of a nats-py object."""
        pattern = re.compile(r"\b(?:nc|sub|msg|subscription|connection)\._[a-z]")
        offenders = [
            f"{path.relative_to(REPO)}:{number}: {line.strip()}"
            for folder in ("natsrpc", "services")
            for path in sorted((REPO / folder).rglob("*.py"))
            if path.name != "transport.py"
            for number, line in enumerate(path.read_text().splitlines(), 1)
            if pattern.search(line)
        ]
        assert offenders == []

    def test_fast_path_off_leaves_nats_py_as_it_is(self, nats_url: str) -> None:
        """With NATSRPC_FAST_PATH=0, no patch is applied and a call still works (nats-py's public API only)."""
        script = f"""
import asyncio, natsrpc
from natsrpc import transport
from services.kv import KV
from natsrpc.testing import serve

async def main():
    assert transport.FAST_PATH is False
    async with natsrpc.connect({nats_url!r}) as client, serve(client, KV()):
        assert not transport.send(client.nc, "x", "", b"")
        assert type(client._reply_sub._pending_queue) is asyncio.Queue
        assert "process_headers" not in repr(client.nc.__dict__.get("_process_headers", ""))
        await client.call_service["kv"].put("a", "1")
        assert await client.call_service["kv"].get("a") == "1"
    print("ok")

asyncio.run(main())
"""
        env = {**os.environ, "NATSRPC_FAST_PATH": "0"}
        result = subprocess.run(
            [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith("ok")
