"""The code stays lint-clean (ruff) and strictly typed (mypy), as pyproject.toml configures them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


class TestQuality:
    """ruff and mypy pass on the whole project."""

    @pytest.mark.timeout(180)
    def test_ruff_is_clean(self) -> None:
        """`ruff check .` finds nothing."""
        result = subprocess.run(
            [sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr

    @pytest.mark.timeout(300)
    def test_mypy_strict_is_clean(self) -> None:
        """`mypy` (strict, natsrpc/ services/ tests/typing) finds nothing."""
        result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
