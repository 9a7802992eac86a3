"""What a test needs from the machine: a test that cannot run here skips on a developer's machine but
fails in CI (``CI`` set), where the machine provides everything and no test may be skipped."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["unavailable"]


def unavailable(reason: str) -> NoReturn:
    """Skip (or, in CI, fail) the running test because the machine lacks what it needs."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must provide this: {reason}")
    pytest.skip(reason)
