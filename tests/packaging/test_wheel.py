"""The built wheel: exactly one top-level import package, and a working CLI from a fresh venv outside the
repository, installed next to PyPI's ``tools`` package (whose name the layers once took)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _run(argv: list[str], *, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the build backend (setuptools, from the test extras) is in this environment.
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)]
    _run(argv, cwd=out)
    (found,) = out.glob("keystate-*.whl")
    return found


def test_the_wheel_has_one_top_level_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        top_level = zf.read(next(n for n in names if n.endswith(".dist-info/top_level.txt"))).decode().split()
    tops = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"keystate"}
    assert top_level == ["keystate"]
    for layer in ("storage", "statebackend", "runtime", "tools"):
        assert f"keystate/{layer}/__init__.py" in names
        assert f"keystate/{layer}/py.typed" in names
    # Sub-packages of the layers come along (they are found through the symlinks, not listed by hand).
    assert "keystate/storage/format/__init__.py" in names
    assert "keystate/storage/format/flink/__init__.py" in names
    assert not [n for n in names if "/tests/" in n or n.startswith("tests/")]


def test_a_fresh_venv_runs_the_cli_next_to_pypis_tools(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", str(wheel), "tools==1.0.38"], cwd=tmp_path, timeout=900)
    _run([str(python), "-m", "pip", "check"], cwd=tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    # A user project with its own ``tools`` package on the path must not break keystate.
    (work / "tools").mkdir()
    (work / "tools" / "__init__.py").write_text("raise ImportError('the user project tools package')\n")
    env = {**os.environ, "PYTHONPATH": str(work)}
    env.pop("PYTHONHOME", None)
    bin_dir = env_dir / "bin"
    _run([str(bin_dir / "keystate"), "demo", "--duration", "2", "--checkpoints", "ckpt"], cwd=work, env=env)
    listing = json.loads(_run([str(bin_dir / "keystate"), "list", "ckpt", "--json"], cwd=work, env=env))
    assert any(row["kind"] == "savepoint" for row in listing["checkpoints"])
    summary = json.loads(_run([str(bin_dir / "inspect-checkpoint"), "ckpt", "--json"], cwd=work, env=env))
    assert {op["uid"] for op in summary["operators"]} >= {"click-counts", "order-totals"}
    imported = _run([str(python), "-c", "import keystate, keystate.storage as s; print(s.__file__)"], cwd=tmp_path)
    assert str(env_dir) in imported
    # PyPI's tools package is untouched by keystate (it once shipped a top-level ``tools`` of its own).
    _run([str(python), "-c", "from tools import Timer"], cwd=tmp_path)
