"""Tests of ``python -m natsrpc``, run as a subprocess against services hosted by the test's loop."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from nats.aio.msg import Msg

import natsrpc
from natsrpc.embedded import free_port
from natsrpc.testing import serve
from services.kv import KV

REPO = Path(__file__).resolve().parents[1]


async def cli(*args: str) -> tuple[int, str, str]:
    """Runs ``python -m natsrpc *args``; returns exit code, stdout and stderr (the loop keeps serving)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "PYTHONPATH", "NATSRPC_LOG_LEVEL")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "natsrpc",
        *args,
        cwd=REPO,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Refuser(natsrpc.Service):
    """Raises a business error with data."""

    name = "refuser"

    @natsrpc.rpc
    async def take(self, item: str) -> None:
        """Refuses every item with 409 and the item in the data."""
        raise natsrpc.ServiceError(409, f"{item} is taken", {"item": item, "by": "ann"})


@pytest_asyncio.fixture
async def kv(client: natsrpc.Client) -> AsyncIterator[KV]:
    """The example KV service, hosted on the test's client."""
    service = KV()
    async with serve(client, service):
        yield service


class TestCall:
    """`python -m natsrpc call SERVICE.METHOD JSON` prints the reply as JSON."""

    async def test_put_then_get_prints_replies(self, nats_url: str, kv: KV) -> None:
        """A put prints null, and a get prints the stored value as JSON."""
        assert await cli("--url", nats_url, "call", "kv.put", '{"key":"a","value":"1"}') == (0, "null\n", "")
        assert kv.data == {"a": "1"}
        code, out, err = await cli("--url", nats_url, "call", "kv.get", '{"key":"a"}')
        assert (code, json.loads(out), err) == (0, "1", "")

    async def test_positional_arguments_as_a_json_array(self, nats_url: str, kv: KV) -> None:
        """A JSON array sends positional arguments."""
        assert (await cli("--url", nats_url, "call", "kv.put", '["b", "2"]'))[0] == 0
        assert kv.data == {"b": "2"}

    async def test_no_arguments(self, nats_url: str, kv: KV) -> None:
        """Without a JSON argument the call sends an empty body (defaults apply)."""
        kv.data.update(x="1", y="2")
        code, out, _ = await cli("--url", nats_url, "call", "kv.keys")
        assert (code, json.loads(out)) == (0, ["x", "y"])


class TestGlobalOptions:
    """--url, the security flags and the logging flags work before or after the command (issue 11, item 5)."""

    async def test_options_after_the_command(self, nats_url: str, kv: KV) -> None:
        """``call ... --url URL --log-level warning`` works, and a --url after the command wins over one before."""
        assert await cli("call", "kv.put", '["c", "3"]', "--url", nats_url, "--log-level", "warning") == (
            0, "null\n", "",
        )  # fmt: skip
        assert kv.data == {"c": "3"}
        nowhere = f"nats://127.0.0.1:{free_port()}"
        code, out, err = await cli("--url", nowhere, "call", "kv.get", '["c"]', "--url", nats_url)
        assert (code, json.loads(out)) == (0, "3"), err
        code, out, err = await cli("ls", "--json", "--url", nats_url, "--log-format", "json")
        assert code == 0, err
        assert "kv" in {reply["name"] for reply in json.loads(out)}


class TestErrors:
    """Failed calls print the error on stderr and exit 1; bad usage exits 2."""

    async def test_error_reply_prints_code_type_and_message(self, nats_url: str, kv: KV) -> None:
        """A 400 reply prints "error 400 BadRequest: ..." on stderr and exits 1."""
        code, out, err = await cli("--url", nats_url, "call", "kv.put", '{"key":"a"}')
        assert code == 1
        assert out == ""
        assert err.startswith("error 400 BadRequest: ")
        assert "value" in err  # the message names the missing field

    async def test_service_error_data_is_printed(self, client: natsrpc.Client, nats_url: str) -> None:
        """A ServiceError's data follows its message, as JSON on a ``data:`` line."""
        async with serve(client, Refuser()):
            code, out, err = await cli("--url", nats_url, "call", "refuser.take", '["pen"]')
        assert (code, out) == (1, "")
        assert err == 'error 409 ServiceError: pen is taken\ndata: {"item":"pen","by":"ann"}\n'

    async def test_an_error_message_reaches_the_terminal_escaped(self, client: natsrpc.Client, nats_url: str) -> None:
        """An error message holding an escape sequence and a line break is printed with them escaped."""
        async with serve(client, Refuser()):
            code, _, err = await cli("--url", nats_url, "call", "refuser.take", '["a\\u001b[2J\\nb"]')
        assert code == 1
        assert err.startswith("error 409 ServiceError: a\\x1b[2J\\nb is taken\n")
        assert "\x1b" not in err

    async def test_json_prints_the_error_object_on_stdout(self, client: natsrpc.Client, nats_url: str) -> None:
        """With --json a failure is the wire's error object on stdout, for scripts; stderr stays empty."""
        async with serve(client, Refuser()):
            code, out, err = await cli("--url", nats_url, "call", "refuser.take", '["pen"]', "--json")
        assert (code, err) == (1, "")
        error = {"code": 409, "type": "ServiceError", "message": "pen is taken", "data": {"item": "pen", "by": "ann"}}
        assert json.loads(out) == {"error": error}

    async def test_json_error_without_a_reply_has_no_code(self, nats_url: str) -> None:
        """A call no service answers is {"error": {"code": null, "type": "NoResponders", ...}}."""
        code, out, err = await cli("--url", nats_url, "call", "nobody.here", "--json")
        assert (code, err) == (1, "")
        error = json.loads(out)["error"]
        assert (error["code"], error["type"], error["data"]) == (None, "NoResponders", None)
        assert "nobody" in error["message"]

    async def test_invalid_json_exits_2_without_sending(self, client: natsrpc.Client, nats_url: str, kv: KV) -> None:
        """Arguments that are not JSON exit 2 and nothing reaches the service's subjects."""
        seen: list[Msg] = []

        async def spy(msg: Msg) -> None:
            seen.append(msg)

        sub = await client.nc.subscribe("svc.kv.>", cb=spy)
        try:
            await client.nc.flush()
            code, out, err = await cli("--url", nats_url, "call", "kv.put", '{"key": bad')
            await client.nc.flush()
        finally:
            await sub.unsubscribe()
        assert code == 2
        assert out == ""
        assert "not valid JSON" in err
        assert seen == []

    async def test_an_unknown_method_of_a_running_service_is_not_found(self, nats_url: str, kv: KV) -> None:
        """A method the running service lacks exits 1 with a 404 naming the methods it has, not a
        NoResponders that reads as if the service were down."""
        code, out, err = await cli("--url", nats_url, "call", "kv.nosuchmethod", "{}")
        assert code == 1
        assert out == ""
        assert err.startswith("error 404 NotFound: kv has no method 'nosuchmethod' (it has: delete, get, keys, put;"), (
            err
        )
        code, out, _ = await cli("--url", nats_url, "call", "kv.nosuchmethod", "{}", "--json")
        assert (code, json.loads(out)["error"]["code"]) == (1, 404)

    async def test_a_service_not_running_is_no_responders(self, nats_url: str, kv: KV) -> None:
        """A service nobody runs exits 1 with NoResponders (kv's instance does not answer for it)."""
        code, out, err = await cli("--url", nats_url, "call", "kvv.get", "{}")
        assert code == 1
        assert out == ""
        assert err.startswith("error NoResponders: no instance answers svc.kvv.get"), err

    async def test_no_server_exits_1_with_connection_lost(self) -> None:
        """A URL where nothing listens exits 1 with ConnectionLost, not a traceback."""
        code, _, err = await cli("--url", f"nats://127.0.0.1:{free_port()}", "call", "kv.get", '{"key":"a"}')
        assert code == 1
        assert "ConnectionLost" in err
        assert "Traceback" not in err

    @pytest.mark.parametrize("target", ["kv", "kv.", "k v.get"], ids=["no-method", "empty-method", "space"])
    async def test_bad_target_exits_2(self, target: str) -> None:
        """A target that is not SERVICE.METHOD is bad usage."""
        code, _, err = await cli("--url", "nats://127.0.0.1:1", "call", target)
        assert code == 2
        assert "SERVICE.METHOD" in err


class TestHelp:
    """--help describes the tool and its call command."""

    async def test_help(self) -> None:
        """`python -m natsrpc --help` exits 0 and lists the call command."""
        code, out, _ = await cli("--help")
        assert code == 0
        assert "call" in out
        assert "--url" in out

    async def test_call_help(self) -> None:
        """`python -m natsrpc call --help` exits 0 and shows an example."""
        code, out, _ = await cli("call", "--help")
        assert code == 0
        assert "SERVICE.METHOD" in out
        assert "kv.put" in out
