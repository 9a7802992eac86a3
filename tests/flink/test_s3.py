"""Flink checkpoints and savepoints on S3 (moto's threaded server, real HTTP): ``inspect``, ``list``,
``verify`` and ``check-restore`` through the CLI with ``--endpoint-url``, exactly as on local disk.

The incremental RocksDB fixture names its two large files by absolute ``file:`` URIs of the machine that
wrote it; on S3 they are found by rebasing ``/<jobId>/...`` onto the bucket prefix that holds the job.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from keystate.tools.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures"
INCREMENTAL = FIXTURES / "flink-2.3.0" / "rocksdb-incremental"  # <jobId>/chk-7 and <jobId>/shared
FINISHED = FIXTURES / "generated-flink-2.3.0" / "hashmap-fully-finished"
SAVEPOINT = FIXTURES / "generated-flink-2.3.0" / "hashmap-savepoint-canonical"
INCREMENTAL_JOB = "88cbe526da62863ea7f78fca9bd3c2f0"
FINISHED_JOB = "190105fada98b55f6a5877580b558e60"


def _files(root: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name not in ("flink-dump.json", "job-topology.json", "job-graph-description.json"):
            yield path.relative_to(root).as_posix(), path


@pytest.fixture
def s3_root(moto_endpoint: str, server_bucket: str) -> str:
    """Three Flink fixtures under one prefix: two jobs' checkpoint directories and a savepoint."""
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    for source, prefix in ((INCREMENTAL, "flink"), (FINISHED, "flink"), (SAVEPOINT, "flink/savepoints")):
        for key, path in _files(source):
            client.put_object(Bucket=server_bucket, Key=f"{prefix}/{key}", Body=path.read_bytes())
    return f"s3://{server_bucket}/flink"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if "--json" in argv and out else out), err


def test_inspect_list_verify_and_check_restore_on_s3(
    s3_root: str, moto_endpoint: str, server_bucket: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    endpoint = ("--endpoint-url", moto_endpoint)
    chk7 = f"{s3_root}/{INCREMENTAL_JOB}/chk-7"

    code, doc, err = run(capsys, "inspect", f"{s3_root}/{INCREMENTAL_JOB}", "--json", *endpoint)
    assert (code, err) == (0, "")
    assert (doc["source_format"], doc["location"], doc["job_id"]) == ("flink", chk7, INCREMENTAL_JOB)
    code, local, _ = run(capsys, "inspect", str(INCREMENTAL), "--json")
    assert {k: v for k, v in doc.items() if k != "location"} == {k: v for k, v in local.items() if k != "location"}
    code, text, _ = run(capsys, "inspect", f"{chk7}/_metadata", *endpoint)
    assert "format    Apache Flink, metadata v6" in text

    code, listing, _ = run(capsys, "list", s3_root, "--json", *endpoint)
    assert code == 0
    rows = [(r["source_format"], r["kind"], r["checkpoint_id"], r["job_id"]) for r in listing["checkpoints"]]
    assert rows == [
        ("flink", "savepoint", 11, None),
        ("flink", "checkpoint", 8, FINISHED_JOB),
        ("flink", "checkpoint", 7, INCREMENTAL_JOB),
    ]

    code, doc, _ = run(capsys, "inspect", chk7, "--verify", "--json", *endpoint)
    assert code == 0
    assert doc["verification"] == {"ok": True, "handles": 22, "bytes": doc["total_state_bytes"], "failures": []}

    # The absolute handles were rebased onto the bucket: deleting one of their files is damage there.
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    shared = [k for k, _ in _files(INCREMENTAL) if "/shared/" in k]
    client.delete_object(Bucket=server_bucket, Key=f"flink/{shared[0]}")
    code, doc, _ = run(capsys, "verify", chk7, "--json", *endpoint)
    assert code == 1
    [failure] = doc["verification"]["failures"]
    assert (failure["handle"], failure["error"]) == (f"{s3_root}/{shared[0]}", "the file is missing")

    experiments = json.loads((FIXTURES / "restore-experiments.json").read_text())["experiments"]
    for variant, expected in (("same-job", 0), ("new-upstream-of-finished-chained", 1)):
        exp = next(e for e in experiments if (e["flink_version"], e["variant"]) == ("2.3.0", variant))
        path = tmp_path / f"{variant}.json"
        path.write_text(json.dumps(exp["topology"]))
        code, doc, err = run(capsys, "check-restore", f"{s3_root}/{FINISHED_JOB}", "--topology", str(path), "--json",
                             *endpoint)  # fmt: skip
        assert (code, err) == (expected, "")
        assert doc["location"] == f"{s3_root}/{FINISHED_JOB}/chk-8"
        assert [v["rule"] for v in doc["violations"]] == ([] if expected == 0 else ["mixed-finished-chain"])
    code, doc, _ = run(capsys, "check-restore", f"{s3_root}/savepoints", "--topology", str(path), "--json", *endpoint)
    assert (code, doc["checkpoint_id"]) == (1, 11)
