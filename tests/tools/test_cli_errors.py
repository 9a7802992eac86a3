"""Exit codes and one-line errors for bad usage and hostile input, on disk and on S3 (moto server)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.tools.conftest import JOB_ID, Cli

CHK = Path(JOB_ID) / "chk-7"


def assert_one_line_error(result: Any, *fragments: str) -> None:
    assert result.code == 2, (result.code, result.out, result.err)
    assert result.err.endswith("\n"), repr(result.err)
    assert result.err.count("\n") == 1, repr(result.err)
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in result.err, (fragment, result.err)


def test_missing_location(cli: Cli, tmp_path: Path) -> None:
    assert_one_line_error(cli("inspect", str(tmp_path / "nope")), "Cannot find checkpoint", "nope")


def test_directory_without_metadata_is_not_a_checkpoint(cli: Cli, golden_copy: Path) -> None:
    (golden_copy / CHK / "_metadata").unlink()
    assert_one_line_error(cli("inspect", str(golden_copy / CHK)), "Cannot find")
    listing = json.loads(cli("list", str(golden_copy), "--json").out)
    assert listing["checkpoints"] == []


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "empty"),
        (b'{"format_version": 1, "checkpoint_id": 7', "not valid JSON"),
        (b"\xff\xfe garbage", "not UTF-8"),
        (b'{"format_version": 99}', "format_version 99 is not supported"),
        (b'{"format_version": 1, "checkpoint_id": 7}', "required field"),
        (b"[1, 2, 3]", "must be a JSON object"),
    ],
)
def test_corrupt_metadata(cli: Cli, golden_copy: Path, content: bytes, fragment: str) -> None:
    (golden_copy / CHK / "_metadata").write_bytes(content)
    for command in (("inspect",), ("verify",), ("dump", "--operator", "totals")):
        argv = [command[0], str(golden_copy / CHK), *command[1:]]
        assert_one_line_error(cli(*argv), fragment, "_metadata")


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [("checkpoint_id", -1, "checkpoint_id"), ("job_id", "../x", "job_id"), ("timestamp", "now", "timestamp"),
     ("kind", "snapshot", "kind")],
)  # fmt: skip
def test_invalid_metadata_fields(cli: Cli, golden_copy: Path, field: str, value: object, fragment: str) -> None:
    path = golden_copy / CHK / "_metadata"
    doc = json.loads(path.read_bytes())
    doc[field] = value
    path.write_text(json.dumps(doc))
    assert_one_line_error(cli("inspect", str(golden_copy / CHK)), fragment)


def test_truncated_metadata_every_prefix_is_rejected(cli: Cli, golden_copy: Path) -> None:
    path = golden_copy / CHK / "_metadata"
    data = path.read_bytes()
    for cut in range(0, len(data) - 1, max(1, len(data) // 40)):
        path.write_bytes(data[:cut])
        assert_one_line_error(cli("inspect", str(golden_copy / CHK)))


def test_path_escape_in_metadata_is_refused(cli: Cli, golden_copy: Path) -> None:
    path = golden_copy / CHK / "_metadata"
    doc = json.loads(path.read_bytes())
    stream = doc["operators"][1]["subtasks"][0]["keyed"][0]["stream"]
    stream.pop("data", None)
    stream["scope"] = "exclusive"
    stream["path"] = "../../../../etc/passwd"
    path.write_text(json.dumps(doc))
    assert_one_line_error(cli("verify", str(golden_copy / CHK)), "leaves its directory")


def test_corrupt_state_file_fails_verify_with_exit_1(cli: Cli, golden_copy: Path) -> None:
    files = list((golden_copy / CHK).rglob("*.ksf"))
    assert files
    victim = files[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = cli("verify", str(golden_copy / CHK))
    assert result.code == 1
    assert "verification FAILED" in result.out
    assert victim.name in result.out
    assert "offset" in result.out
    doc = json.loads(cli("inspect", str(golden_copy / CHK), "--verify", "--json").out)
    assert doc["verification"]["ok"] is False
    assert victim.name in doc["verification"]["failures"][0]["handle"]
    # dump reports the damage as an unreadable input (exit 2), never as partial output without error.
    assert_one_line_error(cli("dump", str(golden_copy / CHK), "--operator", "totals"), "checksum")


def test_truncated_state_file(cli: Cli, golden_copy: Path) -> None:
    victim = next((golden_copy / CHK).rglob("*.ksf"))
    victim.write_bytes(victim.read_bytes()[:-20])
    result = cli("verify", str(golden_copy / CHK))
    assert result.code == 1
    assert "truncated" in result.out


def test_unknown_operator_and_bad_key_group(cli: Cli, golden_root: Path) -> None:
    assert_one_line_error(cli("dump", str(golden_root), "--operator", "ghost"), "no operator 'ghost'")
    assert_one_line_error(cli("dump", str(golden_root), "--operator", "totals", "--key-group", "999"), "key group 999")
    assert_one_line_error(cli("inspect", str(golden_root), "--operator", "ghost"), "ghost")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"{", "not valid JSON"),
        (b'{"format_version": 2, "operators": []}', "format_version 2"),
        (b'{"format_version": 1, "operators": [{"uid": "a", "parallelism": 0, "inputs": []}]}', "parallelism"),
        (
            b'{"format_version": 1, "operators": [{"uid": "a", "parallelism": 1, "inputs": [{"from": "b", '
            b'"partitioning": "hash"}]}]}',
            "unknown operator 'b'",
        ),
        (b'{"format_version": 1, "operators": [], "extra": 1}', "unknown field 'extra'"),
        (
            b'{"format_version": 1, "operators": [{"uid": "a", "parallelism": 1, "inputs": [{"from": "a", '
            b'"partitioning": "weird"}]}]}',
            "partitioning",
        ),
    ],
)
def test_bad_topology_files(cli: Cli, golden_root: Path, tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "t.json"
    path.write_bytes(content)
    assert_one_line_error(cli("check-restore", str(golden_root), "--topology", str(path)), fragment)


def test_missing_topology_file(cli: Cli, golden_root: Path, tmp_path: Path) -> None:
    assert_one_line_error(cli("check-restore", str(golden_root), "--topology", str(tmp_path / "x.json")), "cannot read")


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from keystate.tools.cli import main

    for argv in (
        ["inspect"],
        ["nosuchcommand"],
        ["check-restore", "x"],
        ["dump", "x"],
        ["inspect", "x", "--graph", "png"],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2, argv
        assert err.count("\n") == 1, (argv, err)
        assert "error:" in err, (argv, err)


@pytest.fixture
def job_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module with job functions, importable from the current directory as --job expects."""
    (tmp_path / "myjobs_for_test.py").write_text(
        "from keystate.runtime import JobGraph, SequenceSource, MapOperator\n"
        "from keystate.storage import Topology, TopologyOperator\n"
        "def same():\n"
        "    job = JobGraph('x')\n"
        "    s = job.source(SequenceSource(10), uid='src', parallelism=2)\n"
        "    t = s.key_by(lambda v: v).transform(MapOperator(lambda v: v), uid='totals', parallelism=2)\n"
        "    t.rebalance().map(lambda v: v, uid='sink', parallelism=1)\n"
        "    return job\n"
        "def added_before_finished():\n"
        "    job = JobGraph('x')\n"
        "    s = job.source(SequenceSource(10), uid='src', parallelism=2)\n"
        "    n = s.map(lambda v: v, uid='new', parallelism=2)\n"
        "    t = n.key_by(lambda v: v).transform(MapOperator(lambda v: v), uid='totals', parallelism=2)\n"
        "    t.rebalance().map(lambda v: v, uid='sink', parallelism=1)\n"
        "    return job\n"
        "def broken():\n"
        "    raise RuntimeError('boom')\n"
        "def not_a_job():\n"
        "    return 42\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "myjobs_for_test"


def test_check_restore_with_job_function(cli: Cli, golden_root: Path, job_module: str, tmp_path: Path) -> None:
    ok = cli("check-restore", str(golden_root), "--job", f"{job_module}:same", "--json")
    assert ok.code == 0
    assert json.loads(ok.out)["compatible"] is True
    bad = cli("check-restore", str(golden_root), "--job", f"{job_module}:added_before_finished", "--json")
    assert bad.code == 1
    doc = json.loads(bad.out)
    assert doc["compatible"] is False
    assert doc["checkpoint_id"] == 7
    # 'totals' is partially finished and now reads (hash, all-to-all) from the new, running 'new'.
    assert [(v["rule"], v["operator"], v.get("predecessor")) for v in doc["violations"]] == [
        ("partial-all-to-all-predecessor", "totals", "new")
    ]
    assert all(set(v) >= {"rule", "operator", "message"} for v in doc["violations"])
    assert_one_line_error(cli("check-restore", str(golden_root), "--job", f"{job_module}:broken"), "boom")
    assert_one_line_error(cli("check-restore", str(golden_root), "--job", f"{job_module}:not_a_job"), "int")
    assert_one_line_error(cli("check-restore", str(golden_root), "--job", "nocolon"), "package.module:function")
    out = tmp_path / "topo.json"
    assert cli("topology", f"{job_module}:same", "-o", str(out)).code == 0
    assert json.loads(out.read_text())["operators"][1] == {
        "uid": "totals", "parallelism": 2, "inputs": [{"from": "src", "partitioning": "hash"}]
    }  # fmt: skip
    assert cli("check-restore", str(golden_root), "--topology", str(out)).code == 0


def test_console_script_has_no_traceback(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "keystate"
    result = subprocess.run(
        [str(exe), "inspect", str(tmp_path / "missing")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert result.stderr.startswith("keystate: error: ")
    assert result.stderr.count("\n") == 1
    alias = Path(sys.executable).parent / "inspect-checkpoint"
    result = subprocess.run([str(alias), str(tmp_path / "missing")], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("inspect-checkpoint: error: ")


# --- S3 over real HTTP (moto's threaded server) -----------------------------------------------------------


def upload(root: Path, endpoint: str, bucket: str, prefix: str) -> None:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for path in root.rglob("*"):
        if path.is_file():
            client.put_object(
                Bucket=bucket, Key=f"{prefix}/{path.relative_to(root).as_posix()}", Body=path.read_bytes()
            )


def test_commands_work_the_same_on_s3(
    cli: Cli, golden_root: Path, moto_endpoint: str, server_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    upload(golden_root, moto_endpoint, server_bucket, "ckpt")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    root = f"s3://{server_bucket}/ckpt"
    local = json.loads(cli("inspect", str(golden_root), "--json").out)
    remote = json.loads(cli("inspect", root, "--json").out)
    assert remote["location"] == f"{root}/{JOB_ID}/chk-7"
    assert {k: v for k, v in remote.items() if k != "location"} == {k: v for k, v in local.items() if k != "location"}
    assert cli("verify", f"{root}/{JOB_ID}/chk-7/_metadata").code == 0
    assert json.loads(cli("list", root, "--json").out)["checkpoints"][0]["checkpoint_id"] == 7
    assert cli("dump", root, "--operator", "totals", "--key-group", "6").out == cli(
        "dump", str(golden_root), "--operator", "totals", "--key-group", "6").out  # fmt: skip
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert cli("inspect", root, "--json", "--endpoint-url", moto_endpoint).code == 0


def test_s3_errors_are_one_line(
    cli: Cli, moto_endpoint: str, server_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    assert_one_line_error(cli("inspect", "s3://no-such-bucket-ks/x"), "no-such-bucket-ks", "does not exist")
    assert_one_line_error(cli("inspect", f"s3://{server_bucket}/empty"), "Cannot find checkpoint")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    result = cli("list", f"s3://{server_bucket}/x", "--endpoint-url", "http://127.0.0.1:9")
    assert_one_line_error(result, "unreachable")


def test_s3_access_denied(cli: Cli, moto_endpoint: str, server_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import botocore.awsrequest

    from keystate.storage import _s3

    real = _s3.make_s3_client

    def denying_client(**kwargs: Any) -> Any:
        client = real(**kwargs)

        def deny(request: Any, **_: Any) -> Any:
            body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
            return botocore.awsrequest.AWSResponse(request.url, 403, {}, _Raw(body))

        client.meta.events.register("before-send.s3.*", deny)
        return client

    monkeypatch.setattr(_s3, "make_s3_client", denying_client)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    assert_one_line_error(cli("list", f"s3://{server_bucket}/x"), "access denied")


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Any:
        yield self._body

    def read(self, *_: Any) -> bytes:
        body, self._body = self._body, b""
        return body


def test_debug_env_shows_traceback(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSTATE_DEBUG", "1")
    from keystate.storage import CheckpointNotFoundError

    with pytest.raises(CheckpointNotFoundError):
        cli("inspect", str(tmp_path / "missing"))
    assert os.environ["KEYSTATE_DEBUG"] == "1"


# --- hostile filesystem objects and names -----------------------------------------------------------


def test_fifo_in_place_of_a_state_file_does_not_hang(cli: Cli, golden_copy: Path) -> None:
    victim = next((golden_copy / CHK).rglob("*.ksf"))
    victim.unlink()
    os.mkfifo(victim)
    result = cli("verify", str(golden_copy / CHK))  # would block forever if the FIFO were opened
    assert result.code == 1
    assert "not a regular file" in result.out


def test_symlinked_state_file_is_not_followed(cli: Cli, golden_copy: Path, tmp_path: Path) -> None:
    victim = next((golden_copy / CHK).rglob("*.ksf"))
    outside = tmp_path / "outside.ksf"
    outside.write_bytes(victim.read_bytes())  # identical bytes: it would even verify
    victim.unlink()
    victim.symlink_to(outside)
    result = cli("verify", str(golden_copy / CHK))
    assert result.code == 1
    assert "symbolic link" in result.out


PASSWD = b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"


@pytest.mark.parametrize("how", ["replaced", "linked-directory"])
def test_a_foreign_file_in_place_of_a_state_file_is_never_quoted(
    cli: Cli, golden_copy: Path, tmp_path: Path, how: str
) -> None:
    """Regression: dump put the first bytes of whatever it found into its error (``magic b'root'``), and a
    linked directory let it find ``/etc/passwd``. Neither the bytes nor the file are reached now."""
    victim = next((golden_copy / CHK).rglob("*.ksf"))
    if how == "replaced":
        victim.write_bytes(PASSWD)
    else:
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / victim.name).write_bytes(PASSWD)
        shutil.rmtree(victim.parent)
        victim.parent.symlink_to(outside, target_is_directory=True)
    uid = victim.relative_to(golden_copy / CHK).parts[0]
    for argv in (("dump", str(golden_copy / CHK), "--operator", uid), ("verify", str(golden_copy / CHK), "--json")):
        result = cli(*argv)
        assert result.code in (1, 2), result
        for text in (result.out, result.err):
            for fragment in ("b'root", "root:x", "daemon", "/bin/bash"):  # not "root": pytest-of-root/...
                assert fragment not in text, text
        if how == "linked-directory":
            assert "symbolic link" in result.out + result.err


def test_list_shows_a_checkpoint_it_cannot_stat_as_unreadable(cli: Cli, golden_copy: Path) -> None:
    metadata = golden_copy / CHK / "_metadata"
    metadata.unlink()
    metadata.symlink_to(metadata)  # a loop: stat fails with ELOOP
    result = cli("list", str(golden_copy), "--json")
    assert result.code == 0, result.err
    [entry] = json.loads(result.out)["checkpoints"]
    assert entry["checkpoint_id"] == 7
    assert "symbolic link" in entry["error"]
    # In its own process (no pytest logging handlers): nothing else on stderr, e.g. no logged warning.
    exe = Path(sys.executable).parent / "keystate"
    proc = subprocess.run([str(exe), "list", str(golden_copy)], capture_output=True, text=True, check=False)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_control_characters_in_names_are_escaped(cli: Cli, golden_copy: Path) -> None:
    path = golden_copy / CHK / "_metadata"
    doc = json.loads(path.read_bytes())
    sink = next(o for o in doc["operators"] if o["uid"] == "sink")
    sink["subtasks"][0]["operator"][0]["states"][0]["name"] = "evil\x1b[2J\x1b]0;pwned\x07"
    path.write_text(json.dumps(doc))
    result = cli("inspect", str(golden_copy / CHK), "--operator", "sink")
    assert result.code == 0, result.err
    assert "\x1b" not in result.out
    assert "\x07" not in result.out
    assert "evil\\x1b[2J\\x1b]0;pwned\\x07" in result.out
