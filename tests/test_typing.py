"""Tests that typed proxies are really typed: mypy accepts good calls and reports bad ones."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from mypy import api

ROOT = Path(__file__).resolve().parent.parent
TYPED_PROXY = ROOT / "tests" / "typing" / "typed_proxy.py"

# Each line ends with the mypy error code it must produce; none of them would be reported if
# client.proxy() returned Any.
BAD_CALLS = """\
from __future__ import annotations

import natsrpc
from typed_proxy import Item, Store


async def misuse(client: natsrpc.Client) -> None:
    store = client.proxy(Store)
    await store.put("not an item")  # E: arg-type
    await store.get(42)  # E: arg-type
    wrong: str = await store.get("a")  # E: assignment
    items: list[int] = await store.list_keys()  # E: assignment
    await store.missing("a")  # E: attr-defined
    await store.get()  # E: call-arg
    await store.get("a", "b")  # E: call-arg
    await store.list_keys(limit="ten")  # E: arg-type
    await store.list_keys("a", 10)  # E: call-arg
    await store.get(key="a", other=1)  # E: call-arg
    not_awaited: Item | None = store.get("a")  # E: assignment
    wrong_items: list[int] = [item async for item in store.scan("a")]  # E: misc
    [item async for item in store.scan(prefix=1)]  # E: arg-type
"""

EXPECTED = [
    (number, match.group(1), line.partition("  #")[0].strip())
    for number, line in enumerate(BAD_CALLS.splitlines(), start=1)
    if (match := re.search(r"# E: ([a-z-]+)$", line))
]
_ERROR = re.compile(r"^(?P<path>.+?):(?P<line>\d+): error: (?P<message>.*)  \[(?P<code>[a-z-]+)\]$")


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[int, str, str]]]:
    """Runs mypy once, with the project's config, over typed_proxy.py and a file of bad calls."""
    directory = tmp_path_factory.mktemp("typing")
    (directory / "typed_proxy.py").write_text(TYPED_PROXY.read_text())
    bad = directory / "bad_calls.py"
    bad.write_text(BAD_CALLS)
    limit = sys.getrecursionlimit()  # mypy raises it for the whole process: restore it for later tests
    try:
        stdout, stderr, _ = api.run(
            [
                "--config-file",
                str(ROOT / "pyproject.toml"),
                "--cache-dir",
                str(ROOT / ".mypy_cache"),
                "--no-pretty",
                "--show-error-codes",
                "--no-error-summary",
                str(directory / "typed_proxy.py"),
                str(bad),
            ]
        )
    finally:
        sys.setrecursionlimit(limit)
    assert stderr == ""
    errors: dict[str, list[tuple[int, str, str]]] = {}
    for line in stdout.splitlines():
        match = _ERROR.match(line)
        assert match is not None or ": note: " in line, f"unexpected mypy output: {line}"
        if match:
            errors.setdefault(Path(match["path"]).name, []).append(
                (int(match["line"]), match["code"], match["message"])
            )
    return errors


class TestTypedProxy:
    """``client.proxy(Service)`` is checked by mypy against the Service's own signatures."""

    def test_good_calls_are_clean(self, mypy_errors: dict[str, list[tuple[int, str, str]]]) -> None:
        """mypy (strict, project config) reports nothing for tests/typing/typed_proxy.py."""
        assert mypy_errors.get("typed_proxy.py", []) == []

    @pytest.mark.parametrize(("line", "code", "source"), EXPECTED, ids=[source for _, _, source in EXPECTED])
    def test_bad_call_reported(
        self, mypy_errors: dict[str, list[tuple[int, str, str]]], line: int, code: str, source: str
    ) -> None:
        """Each deliberately wrong call is reported by mypy on its line with the expected error code."""
        reported = [(c, m) for n, c, m in mypy_errors.get("bad_calls.py", []) if n == line]
        assert any(c == code for c, _ in reported), f"{source!r}: mypy reported {reported}"

    def test_no_unexpected_errors(self, mypy_errors: dict[str, list[tuple[int, str, str]]]) -> None:
        """mypy reports errors only on the lines meant to be wrong."""
        expected_lines = {line for line, _, _ in EXPECTED}
        assert [error for error in mypy_errors.get("bad_calls.py", []) if error[0] not in expected_lines] == []
