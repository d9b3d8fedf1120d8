"""The README, read top to bottom, matches what its commands print.

With the example services running as the README says (``python -m natsrpc.run services.kv
services.vdb services.memory``, an embedded nats-server on 127.0.0.1:4222), every
``python -m natsrpc call`` line of the README is run in order and its output compared with the
``# -> ...`` the README shows, and every complete Python program in it runs and prints what its
``# -> ...`` comments say.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
from children import EXIT_TIMEOUT, REPO, child, child_env

from natsrpc.embedded import is_listening

README = (REPO / "README.md").read_text()
EMBEDDED_LINE = re.compile(r"started an embedded nats-server at (nats://\S+)")
READY_LINE = re.compile(r'"event": "ready"')
PLACEHOLDER_ID = "3f2a…"  # the README's stand-in for a new memory id


def blocks(language: str) -> list[str]:
    """The README's fenced code blocks in ``language``, in order."""
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def calls() -> list[tuple[str, str | None]]:
    """Every ``python -m natsrpc call`` line, with the output its ``# -> ...`` comment shows (if any).

    The comment is at the end of the line, or alone on the next line.
    """
    found: list[tuple[str, str | None]] = []
    for block in blocks("sh"):
        lines = block.splitlines()
        for index, line in enumerate(lines):
            if not line.startswith("python -m natsrpc call "):
                continue
            command, _, comment = line.partition("#")
            if not comment and index + 1 < len(lines) and lines[index + 1].startswith("# -> "):
                comment = lines[index + 1][1:]
            expected = comment.rsplit("-> ", 1)[1].strip() if "-> " in comment else None
            found.append((command.strip(), expected))
    return found


def programs() -> list[str]:
    """The README's complete Python programs: blocks that import natsrpc and are not pytest files."""
    return [b for b in blocks("python") if re.search(r"^import natsrpc", b, re.M) and "def test_" not in b]


def matches(expected: str, output: str, memory_id: str) -> bool:
    """Whether ``output`` is what the README shows, reading ``…`` as "more digits follow"."""
    pattern = re.escape(expected.replace(PLACEHOLDER_ID, memory_id)).replace("…", r"\d*")
    return re.fullmatch(pattern, output) is not None


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=EXIT_TIMEOUT, check=False
    )


class TestTheReadme:
    """The example services, the CLI calls and the Python programs of the README, as a newcomer runs them."""

    def test_the_readme_has_what_this_test_reads(self) -> None:
        """The parsing below finds the calls and programs (so the other test cannot pass vacuously)."""
        assert len([c for c in calls() if c[1] is not None]) >= 5
        assert len(programs()) >= 3

    async def test_every_call_and_program_prints_what_the_readme_shows(self) -> None:
        """Each call prints its ``# -> ...``; each program exits 0 printing its ``# -> ...`` lines."""
        if is_listening("127.0.0.1", 4222):
            pytest.skip("127.0.0.1:4222 is busy, and the README's commands use that port")
        runner_line = next(b for b in blocks("sh") if "natsrpc.run services.kv services.vdb" in b).strip()
        async with child(*shlex.split(runner_line)[1:]) as runner:
            assert (await runner.wait_for_line(EMBEDDED_LINE)).group(1) == "nats://127.0.0.1:4222"
            await runner.wait_for_line(READY_LINE)
            memory_id = ""
            for command, expected in calls():
                command = command.replace(PLACEHOLDER_ID, memory_id)
                result = run([sys.executable, *shlex.split(command)[1:]])
                assert result.returncode == 0, f"{command}: {result.stderr}"
                output = result.stdout.strip()
                if "memory.remember" in command:
                    memory_id = output.strip('"')
                if expected is not None:
                    assert matches(expected, output, memory_id), f"{command}: printed {output}, README says {expected}"
            for program in programs():
                result = run([sys.executable, "-c", program])
                assert result.returncode == 0, f"{program}\n{result.stderr}"
                shown = [
                    line.split("# -> ", 1)[1] for line in program.splitlines() if "print(" in line and "# -> " in line
                ]
                assert result.stdout.splitlines() == shown, program
                assert result.stderr == "", program
            assert await runner.stop() == 0, runner.stderr
