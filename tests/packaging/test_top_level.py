"""``import keystate``: the small top face (version and the names a user needs first), loaded lazily."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import keystate

REPO = Path(__file__).resolve().parents[2]


def test_version_is_the_distributions() -> None:
    assert keystate.__version__ == importlib.metadata.version("keystate")


@pytest.mark.parametrize("name", sorted(set(keystate.__all__) - {"__version__"}))
def test_every_top_level_name_resolves_to_its_layers_object(name: str) -> None:
    value = getattr(keystate, name)
    layer = keystate._LAZY[name]
    assert value is getattr(importlib.import_module(layer), name)
    assert name in dir(keystate)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = keystate.nope


def test_import_keystate_loads_no_layer() -> None:
    code = "import sys, keystate; print(sorted(m for m in sys.modules if m.startswith('keystate.') or m == 'boto3'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "['keystate._lazy']"


@pytest.mark.parametrize("bare", ["storage", "statebackend", "runtime", "tools"])
def test_a_layer_refuses_its_bare_name(bare: str) -> None:
    """From the repository root the layer folders are on sys.path; importing one by its bare name fails,
    so no file is ever importable under two module names."""
    code = f"import {bare}"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False, timeout=60
    )
    assert out.returncode != 0
    assert f"import keystate.{bare}, not '{bare}'" in out.stderr
