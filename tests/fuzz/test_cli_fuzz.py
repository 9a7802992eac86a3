"""(f) The CLI in process on damaged copies of a real checkpoint: exit 0, 1 or 2, one line on stderr at
most, never a traceback, nothing written, nothing read outside the location."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import pytest

from keystate.storage.format import validation
from tests.fuzz.cli_harness import _under, check_cli_run, run_cli
from tests.fuzz.harness import FuzzContext, Property, run_property
from tests.fuzz.properties import PROPERTIES
from tests.fuzz.samples import CLI_JOB_ID, CliTemplate

CHECKPOINT = Path(CLI_JOB_ID) / "chk-5"
COMMANDS = (("inspect",), ("inspect", "--json"), ("verify",), ("verify", "--json"), ("dump", "--operator", "totals"),
            ("dump", "--operator", "sink"))  # fmt: skip


@pytest.mark.parametrize("prop", [p for p in PROPERTIES if p.target == "cli"], ids=lambda p: p.name)
def test_property(prop: Property, fuzz_context: FuzzContext) -> None:
    assert run_property(prop, fuzz_context) >= prop.ci_examples // 2


@pytest.fixture
def root(fuzz_context: FuzzContext, tmp_path: Path) -> Path:
    """A private copy of the CLI template's storage root."""
    target = tmp_path / "root"
    shutil.copytree(fuzz_context.cli_template().root, target, symlinks=True)
    return target


def _template(fuzz_context: FuzzContext) -> CliTemplate:
    return fuzz_context.cli_template()


def test_the_intact_checkpoint_passes_every_command(fuzz_context: FuzzContext, root: Path) -> None:
    template = _template(fuzz_context)
    for command in COMMANDS:
        result = run_cli([command[0], str(root / CHECKPOINT), *command[1:]])
        check_cli_run(result)
        assert result.code == 0, result
    result = run_cli(["check-restore", str(root), "--topology", str(template.topology), "--json"])
    check_cli_run(result)
    assert json.loads(result.out)["compatible"] is True


def test_a_300_mb_sparse_metadata_is_refused_without_reading_it(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: ``CheckpointStorage.load`` bound the read to the limit imported at start-up, not the
    configured one, so a lowered limit still read 256 MiB of a huge ``_metadata`` before refusing it."""
    limit = 1 << 20
    monkeypatch.setattr(validation, "MAX_DOCUMENT_BYTES", limit)
    with open(root / CHECKPOINT / "_metadata", "r+b") as f:
        f.truncate(300 << 20)  # sparse: nothing is written
    for command in (("inspect",), ("verify", "--json"), ("dump", "--operator", "totals")):
        tracemalloc.start()
        try:
            result = run_cli([command[0], str(root / CHECKPOINT), *command[1:]])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        check_cli_run(result)
        assert result.code == 2
        assert f"over the {limit}-byte limit" in result.err
        assert peak < 4 * limit, peak
    listing = run_cli(["list", str(root), "--json"])
    check_cli_run(listing)
    (row,) = json.loads(listing.out)["checkpoints"]
    assert "byte limit" in row["error"]


@pytest.mark.parametrize("target", ["same", "other", "devnull", "subdir", "dangling", "loop", "root"])
def test_a_state_file_symlinked_outside_the_root(fuzz_context: FuzzContext, root: Path, target: str) -> None:
    template = _template(fuzz_context)
    name = next(n for n in template.state_files if n.startswith("totals/0/"))
    path = root / CHECKPOINT / name
    path.unlink()
    path.symlink_to(template.link_target(name, target, path))
    verify = run_cli(["verify", str(root / CHECKPOINT), "--json"])
    check_cli_run(verify)
    dump = run_cli(["dump", str(root / CHECKPOINT), "--operator", "totals"])
    check_cli_run(dump)
    inspect = run_cli(["inspect", str(root / CHECKPOINT)])
    check_cli_run(inspect)
    assert inspect.code == 0  # the metadata does not depend on the state files
    # The local store opens objects with O_NOFOLLOW: a symlinked state file is refused even when it points
    # at identical bytes, so nothing in a checkpoint can make the tools read outside its root.
    assert verify.code == 1
    failures = json.loads(verify.out)["verification"]["failures"]
    assert [f["handle"] for f in failures] == [f"exclusive:{name}"]
    assert dump.code == 2


@pytest.mark.parametrize("level", ["state-directory", "checkpoint", "job"])
def test_a_directory_symlinked_outside_the_root(
    fuzz_context: FuzzContext, root: Path, tmp_path: Path, level: str
) -> None:
    """Regression: ``O_NOFOLLOW`` guarded only a key's last segment, so a linked directory anywhere on
    its path (inside the checkpoint, the checkpoint or job directory itself) was followed, and the
    audit check, which compared paths lexically, could not see it. The decoy holds identical bytes
    (everything would verify): only where the files really are tells."""
    relative = {
        "state-directory": CHECKPOINT / "totals",
        "checkpoint": CHECKPOINT,
        "job": Path(CLI_JOB_ID),
    }[level]
    outside = tmp_path / "outside"
    shutil.copytree(root / relative, outside)
    shutil.rmtree(root / relative)
    (root / relative).symlink_to(outside, target_is_directory=True)
    results = [
        run_cli(argv)
        for argv in (
            ["verify", str(root), "--json"],
            ["dump", str(root), "--operator", "totals"],
            ["list", str(root), "--json"],
            ["inspect", str(root)],
        )
    ]
    for result in results:
        check_cli_run(result, confined_to=(root,), watched=tmp_path)
    assert not any(_under(path, outside) for result in results for _, path in result.touched)
    verify, dump, listing, inspect = results
    if level == "state-directory":
        assert verify.code == 1
        failures = json.loads(verify.out)["verification"]["failures"]
        assert failures
        assert all("symbolic link" in f["error"] for f in failures), failures
        assert dump.code == 2
        assert "symbolic link" in dump.err
        assert inspect.code == 0  # the metadata is not behind the link
    else:
        # The linked directory is not a checkpoint keystate lists: there is nothing below the root.
        assert json.loads(listing.out)["checkpoints"] == []
        assert inspect.code == 2
        assert "Cannot find checkpoint" in inspect.err


@pytest.mark.parametrize("target", ["dangling", "loop", "subdir", "devnull"])
def test_metadata_symlinked_to_something_unreadable(fuzz_context: FuzzContext, root: Path, target: str) -> None:
    template = _template(fuzz_context)
    path = root / CHECKPOINT / "_metadata"
    path.unlink()
    path.symlink_to(template.link_target("_metadata", target, path))
    for argv in (["inspect", str(root / CHECKPOINT)], ["inspect", str(root)], ["list", str(root), "--json"]):
        result = run_cli(argv)
        check_cli_run(result)
        # list shows an unreadable _metadata as such (even one it cannot stat, a symlink loop) and goes on
        assert result.code == (0 if argv[0] == "list" else 2), result


@pytest.mark.parametrize("timestamp", [253402300800000, 2**62, 2**63 - 1])
def test_a_timestamp_past_year_9999_is_shown(root: Path, timestamp: int) -> None:
    """Regression: ``inspect`` failed with an internal error (``ValueError: year ... is out of range``) on
    valid metadata whose timestamp lies past year 9999."""
    path = root / CHECKPOINT / "_metadata"
    doc = json.loads(path.read_bytes())
    doc["timestamp"] = timestamp
    path.write_text(json.dumps(doc))
    result = run_cli(["inspect", str(root / CHECKPOINT)])
    check_cli_run(result)
    assert result.code == 0
    assert f"taken     {timestamp} ms since the epoch (after year 9999)" in result.out
    for argv in (["inspect", str(root), "--json"], ["list", str(root)], ["verify", str(root)]):
        check_cli_run(result := run_cli(argv))
        assert result.code == 0, result
