"""Test hygiene shared by every test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """Undoes structlog configuration a test made (the CLI and runner configure it in-process).

    Otherwise a level filter or a captured, since-closed stderr would leak into later tests.
    """
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
