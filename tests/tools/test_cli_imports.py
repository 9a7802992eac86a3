"""What the CLI imports, seen in a fresh interpreter: a local checkpoint never loads boto3, botocore,
asyncio or the runtime's task machinery (they cost start-up time and are not needed to read a checkpoint);
an ``s3://`` location loads boto3 when it is opened."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from keystate.storage import open_storage

NOT_FOR_LOCAL = (
    "asyncio",
    "boto3",
    "botocore",
    "keystate.runtime.coordinator",
    "keystate.runtime.execution",
    "keystate.runtime.task",
)

# Runs one command in process, then reports its exit code and every module it imported, as JSON on the
# last line of stdout (the command's own output comes first).
_PROBE = """
import json, sys
from keystate.tools.cli import run
code = run(sys.argv[1:])
sys.stdout.write("\\n" + json.dumps({"code": code, "modules": sorted(sys.modules)}) + "\\n")
"""


def _probe(*argv: str, cwd: Path) -> tuple[int, set[str], str]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"the probe failed:\n{done.stdout}\n{done.stderr}"
    report = json.loads(done.stdout.rstrip("\n").rpartition("\n")[2])
    return report["code"], set(report["modules"]), done.stderr


@pytest.fixture(scope="module")
def topology_file(golden_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("topology") / "topology.json"
    path.write_bytes(open_storage(str(golden_root)).resolve().metadata.topology().to_json_bytes())
    return path


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["inspect", "{root}"], id="inspect"),
        pytest.param(["inspect", "{root}", "--json", "--verify"], id="inspect-verify"),
        pytest.param(["list", "{root}", "--json"], id="list"),
        pytest.param(["check-restore", "{root}", "--topology", "{topology}"], id="check-restore"),
        pytest.param(["check-restore", "{root}", "--topology", "{topology}", "--json"], id="check-restore-json"),
    ],
)
def test_local_commands_import_no_s3_client_and_no_asyncio_runtime(
    command: list[str], golden_root: Path, topology_file: Path, tmp_path: Path
) -> None:
    argv = [arg.format(root=golden_root, topology=topology_file) for arg in command]
    code, modules, err = _probe(*argv, cwd=tmp_path)
    assert code == 0, f"keystate {' '.join(argv)} exited {code}: {err}"
    loaded = [name for name in NOT_FOR_LOCAL if name in modules]
    assert not loaded, f"keystate {command[0]} on a local checkpoint imported {loaded}"
    if command[0] == "check-restore":
        assert "keystate.runtime.restore_rules" in modules  # the probe really ran the rules


def test_an_s3_location_imports_boto3_when_opened(moto_endpoint: str, server_bucket: str, tmp_path: Path) -> None:
    code, modules, err = _probe(
        "list", f"s3://{server_bucket}/checkpoints", "--json", "--endpoint-url", moto_endpoint, cwd=tmp_path
    )
    assert code == 0, err
    assert {"boto3", "botocore", "keystate.storage._s3"} <= modules
