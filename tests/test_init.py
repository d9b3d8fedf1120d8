"""Tests for natsrpc/__init__.py: ``__all__`` and the real public exports agree."""

from __future__ import annotations

import ast
import inspect
import types
from pathlib import Path

import natsrpc


def defined_public_names() -> set[str]:
    """Returns the public names natsrpc/__init__.py binds at top level (imports, assignments, defs)."""
    tree = ast.parse(Path(inspect.getfile(natsrpc)).read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            names.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.asname or alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
    return {name for name in names if not name.startswith("_")}


class TestAll:
    """``natsrpc.__all__`` is the exact, sorted list of public names."""

    def test_sorted(self) -> None:
        """``__all__`` is sorted (upper-case classes first, as ``sorted()`` orders them)."""
        assert natsrpc.__all__ == sorted(natsrpc.__all__)

    def test_no_duplicates(self) -> None:
        """``__all__`` names each export once."""
        assert len(natsrpc.__all__) == len(set(natsrpc.__all__))

    def test_every_name_exists(self) -> None:
        """Every name in ``__all__`` is an attribute of the package."""
        missing = [name for name in natsrpc.__all__ if not hasattr(natsrpc, name)]
        assert missing == []

    def test_matches_definitions(self) -> None:
        """``__all__`` equals the public names that natsrpc/__init__.py imports or defines."""
        assert set(natsrpc.__all__) == defined_public_names()

    def test_every_public_attribute_listed(self) -> None:
        """Every public non-module attribute of the package is in ``__all__``."""
        public = {
            name
            for name, value in vars(natsrpc).items()
            if not name.startswith("_") and not isinstance(value, types.ModuleType)
        }
        assert public - set(natsrpc.__all__) == set()

    def test_star_import(self) -> None:
        """``from natsrpc import *`` binds exactly ``__all__``."""
        namespace: dict[str, object] = {}
        exec("from natsrpc import *", namespace)
        assert set(namespace) - {"__builtins__"} == set(natsrpc.__all__)


class TestPackaging:
    """The installed package: its version, console scripts, and nothing but natsrpc in site-packages."""

    def test_version(self) -> None:
        """natsrpc.__version__ is the installed distribution's version, and --version prints it."""
        import importlib.metadata
        import subprocess
        import sys

        assert natsrpc.__version__ == importlib.metadata.version("natsrpc")
        for command in ([sys.executable, "-m", "natsrpc", "--version"], ["natsrpc", "--version"]):
            out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout
            assert out.strip() == f"natsrpc {natsrpc.__version__}"

    def test_console_scripts_and_no_services_package(self) -> None:
        """natsrpc and natsrpc-run are console scripts; the example services are not installed as a package."""
        import importlib.metadata

        dist = importlib.metadata.distribution("natsrpc")
        scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
        assert scripts == {"natsrpc": "natsrpc.cli:main", "natsrpc-run": "natsrpc.run:main"}
        assert dist.metadata["License-Expression"] == "Apache-2.0"
        assert (dist.read_text("top_level.txt") or "").split() == ["natsrpc"]
