"""The py4j half of keystate.tools.flink_topology, against a real PyFlink job in a real JVM.

It needs a Python with ``apache-flink`` (and keystate) installed, and a JDK; keystate's own environment
does not carry PyFlink (hundreds of MB of jars). ``.ci/run`` installs one and names it in
``KEYSTATE_FLINK_PYTHON``; in CI (``CI`` set) its absence fails the test instead of skipping it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests._environment import unavailable

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "tests" / "flink" / "generate" / "pyflink_example_job.py"
EXPECTED = REPO / "tests" / "flink" / "fixtures" / "pyflink-example-job"

pytestmark = pytest.mark.slow


def _flink_python() -> str:
    python = os.environ.get("KEYSTATE_FLINK_PYTHON")
    if not python:
        unavailable("KEYSTATE_FLINK_PYTHON: a Python with apache-flink==2.3.0 and keystate (.ci/run installs it)")
    return python


def test_the_exporter_writes_the_topology_of_a_real_pyflink_job(tmp_path: Path) -> None:
    python = _flink_python()
    topology, description = tmp_path / "topology.json", tmp_path / "description.json"
    argv = [python, "-m", "keystate.tools.flink_topology", "--pyflink-module", str(JOB)]
    argv += ["--description-out", str(description), "-o", str(topology)]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    # The same graph as the one committed from the generator's run: operator IDs from Flink's own hasher,
    # chains from the JobGraph Flink builds, partitioning from the edges' partitioners.
    assert json.loads(topology.read_text()) == json.loads((EXPECTED / "job-topology.json").read_text())
    got = json.loads(description.read_text())
    want = json.loads((EXPECTED / "job-graph-description.json").read_text())
    assert got["nodes"] == want["nodes"]
    assert got["vertices"] == want["vertices"]
