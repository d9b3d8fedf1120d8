"""The pytest plugin as a user meets it: the README's example copied into a new project, run by pytest."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from children import EXIT_TIMEOUT, REPO, child_env

import natsrpc.testing
from natsrpc.testing import NEEDS_PYTEST_ASYNCIO


def readme_example() -> str:
    """The Python block of the README's "Testing your services" section."""
    section = (REPO / "README.md").read_text().split("## Testing your services", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "the README's testing section has no python block"
    return match.group(1)


def run_pytest(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs pytest in ``project`` (outside this repository, so none of its configuration applies)."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=project,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT * 4,
        check=False,
    )


class TestPluginInANewProject:
    """The fixtures come from the installed package alone: no conftest, no configuration."""

    def test_the_readme_example_passes(self, tmp_path: Path) -> None:
        """The README's example, saved as a test file of an empty project, passes under pytest."""
        (tmp_path / "test_greeter.py").write_text(readme_example())
        result = run_pytest(tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "1 passed" in result.stdout

    def test_without_pytest_asyncio_the_client_fixture_says_what_is_missing(self, tmp_path: Path) -> None:
        """With pytest-asyncio turned off, a test using natsrpc_client is not passed, and a warning says why."""
        (tmp_path / "test_greeter.py").write_text(readme_example())
        result = run_pytest(tmp_path, "-p", "no:asyncio")
        assert result.returncode != 0, result.stdout + result.stderr
        assert NEEDS_PYTEST_ASYNCIO in result.stdout + result.stderr

    def test_the_fixtures_are_prefixed(self, request: pytest.FixtureRequest) -> None:
        """The plugin defines natsrpc_server, natsrpc_url, natsrpc_client and natsrpc_cluster, and no
        unprefixed ``client`` or ``nats_url`` that would clash with a project's own fixtures."""
        plugin = request.config.pluginmanager.get_plugin("natsrpc")
        assert plugin is natsrpc.testing
        defined = {name for name, value in vars(plugin).items() if hasattr(value, "_get_wrapped_function")}
        assert defined == {"natsrpc_server", "natsrpc_url", "natsrpc_client", "natsrpc_cluster"}
