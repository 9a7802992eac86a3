"""The fuzz suite's shared context: scratch space and the valid samples the properties mutate."""

from __future__ import annotations

import pytest

from tests.fuzz.harness import FuzzContext


@pytest.fixture(scope="session")
def fuzz_context(tmp_path_factory: pytest.TempPathFactory) -> FuzzContext:
    return FuzzContext(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(autouse=True)
def _no_debug_tracebacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """``KEYSTATE_DEBUG`` would make the CLI re-raise; the properties check the user-facing behaviour."""
    monkeypatch.delenv("KEYSTATE_DEBUG", raising=False)
