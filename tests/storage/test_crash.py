"""Crash tests: a real process writing checkpoints to a local directory is killed with SIGKILL.

The child (``crash_child.py``) loops writing checkpoints 1, 2, 3, ... and reports each one it
committed. It is killed at seeded random times and at chosen points around the commit (see
``crash_child.KILL_POINTS``). After every kill the directory must hold exactly the checkpoints that
have ``_metadata``, every reported one intact to the last byte, and a restarted child must carry on
from ``latest() + 1``.

The random runs are reproducible from the seed printed at the start of the test (shown on failure):
``KEYSTATE_CRASH_SEED=<seed> pytest tests/storage/test_crash.py``. The seed fixes the kill delays and
kill points; where a timed kill lands still depends on the machine's speed.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from keystate.storage import METADATA_FILE, CheckpointKind, CheckpointStorage, CompletedCheckpoint, LocalObjectStore
from tests.storage import crash_child
from tests.storage.crash_child import JOB_ID, KILL_POINTS

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("crash_child.py")
COMMITTED_POINTS = ("after-link", "before-dir-fsync")
"""Kill points after the ``_metadata`` link: the in-flight checkpoint is complete though never reported."""
STARTUP_TIMEOUT = 30.0


@dataclass
class Run:
    """One child process from start to death."""

    ready: int
    """The first checkpoint id the child announced it would write."""
    done: list[int]
    """Checkpoint ids the child reported as committed."""
    returncode: int
    stderr: str
    args: tuple[str, ...]
    """The child's arguments after the root."""

    @property
    def in_flight(self) -> int:
        """The checkpoint the child was writing when it died (if it was killed)."""
        return self.ready + len(self.done)


def run_child(root: Path, *args: str, kill_after: float | None = None) -> Run:
    """Run the child; with ``kill_after``, SIGKILL it that many seconds after it is ready, else let it end."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    stderr_path = root.with_name(f"{root.name}-stderr.txt")
    lines: queue.Queue[str | None] = queue.Queue()
    with (
        open(stderr_path, "w+") as stderr,
        subprocess.Popen(
            [sys.executable, str(CHILD), str(root), *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=REPO,
            env=env,
        ) as proc,
    ):
        assert proc.stdout is not None
        stdout = proc.stdout

        def pump() -> None:
            for line in stdout:
                lines.put(line.strip())
            lines.put(None)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            first = lines.get(timeout=STARTUP_TIMEOUT)
            if first is not None and kill_after is not None:
                time.sleep(kill_after)
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=STARTUP_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(timeout=STARTUP_TIMEOUT)
        stderr.seek(0)
        errors = stderr.read()
    assert first is not None, f"child did not start:\n{errors}"
    assert first.startswith("ready "), f"child did not start: {first!r}\n{errors}"
    rest: list[str] = []
    while (line := lines.get_nowait()) is not None:
        rest.append(line)
    assert all(line.startswith("done ") for line in rest), rest
    return Run(int(first.split()[1]), [int(line.split()[1]) for line in rest], proc.returncode, errors, args)


def assert_checkpoint_intact(checkpoint: CompletedCheckpoint, *, every_byte: bool) -> None:
    """Every handle verifies (size and checksums); with ``every_byte``, each key group and element
    equals what the child wrote, read the way a restore reads it."""
    cid = checkpoint.checkpoint_id
    assert checkpoint.kind is CheckpointKind.CHECKPOINT
    assert checkpoint.metadata.job_id == JOB_ID
    assert checkpoint.metadata.timestamp == crash_child.timestamp(cid)
    for handle in checkpoint.metadata.handles():
        assert checkpoint.open_state(handle).verify() == handle.raw_size, (cid, handle.describe)
    if not every_byte:
        return
    counts = checkpoint.metadata.operator("counts")
    source = checkpoint.metadata.operator("source")
    assert counts is not None
    assert source is not None
    assert [st.index for st in counts.subtasks] == [st.index for st in source.subtasks] == [0, 1]
    for st in counts.subtasks:
        (keyed,) = st.keyed
        for kg in keyed.key_groups:
            start, end = keyed.offset_range(kg)
            restored = b"".join(checkpoint.open_state(keyed.stream).iter_range(start, end))
            assert restored == crash_child.key_group_bytes(cid, kg), (cid, kg)
    for st in source.subtasks:
        (operator,) = st.operator
        elements = crash_child.operator_elements(cid, st.index)
        assert checkpoint.open_state(operator.stream).read_all() == b"".join(elements), (cid, st.index)
        assert operator.states[0].offsets == tuple(sum(map(len, elements[:i])) for i in range(len(elements)))


def unreferenced_files(checkpoint: CompletedCheckpoint, directory: Path) -> list[str]:
    """Files in a checkpoint directory that are neither ``_metadata`` nor named by one of its handles."""
    referenced = {METADATA_FILE} | {h.path for h in checkpoint.metadata.handles() if h.path is not None}
    files = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
    return sorted(files - referenced)


@dataclass
class History:
    """What the test knows about one checkpoint directory across child runs."""

    root: Path
    complete: set[int] = field(default_factory=set)
    """Checkpoints known to be complete: reported by a child, or found complete after a kill."""
    checked_bytes: set[int] = field(default_factory=set)

    @property
    def next_id(self) -> int:
        return max(self.complete, default=0) + 1

    def directories_on_disk(self) -> dict[int, bool]:
        """chk-<id> directory -> whether it holds a ``_metadata`` file."""
        job = self.root / JOB_ID
        if not job.is_dir():
            return {}
        return {int(d.name[4:]): (d / METADATA_FILE).is_file() for d in job.iterdir() if d.name.startswith("chk-")}

    def check(self, run: Run, *, killed: bool, context: str) -> list[int]:
        """Check the directory after a child ended; returns the discovered checkpoint ids."""
        where = f"{context} (run: ready {run.ready}, done {run.done}, exit {run.returncode})"
        expected_exit = -signal.SIGKILL if killed else 0
        assert run.returncode == expected_exit, f"{where}: the child failed on its own:\n{run.stderr}"
        assert run.stderr == "", where
        assert run.ready == self.next_id, f"{where}: a restarted child must continue from latest() + 1"
        assert run.done == list(range(run.ready, run.ready + len(run.done))), where

        storage = CheckpointStorage(LocalObjectStore(self.root), "")
        pointers = storage.discover()
        discovered = [p.checkpoint_id for p in pointers if p.checkpoint_id is not None]
        on_disk = self.directories_on_disk()
        with_metadata = sorted((cid for cid, complete in on_disk.items() if complete), reverse=True)
        assert discovered == with_metadata, f"{where}: discover() must list exactly the directories with _metadata"
        assert all(p.kind is CheckpointKind.CHECKPOINT for p in pointers), where
        assert len(discovered) == len(pointers), where
        assert discovered == list(range(len(discovered), 0, -1)), f"{where}: ids are consecutive from 1"
        reported = self.complete | set(run.done)
        assert reported <= set(discovered), f"{where}: reported checkpoints {sorted(reported - set(discovered))} lost"
        unreported = set(discovered) - reported
        assert unreported <= ({run.in_flight} if killed else set()), f"{where}: unexpected checkpoints {unreported}"

        for pointer in pointers:
            assert pointer.checkpoint_id is not None
            checkpoint = storage.load(pointer.directory)
            assert checkpoint.checkpoint_id == pointer.checkpoint_id, where
            assert_checkpoint_intact(checkpoint, every_byte=pointer.checkpoint_id not in self.checked_bytes)
            self.checked_bytes.add(pointer.checkpoint_id)
        latest = storage.latest(JOB_ID)
        assert (latest.checkpoint_id if latest else None) == max(discovered, default=None), where
        self.complete = set(discovered)
        return discovered


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_kill_at_a_chosen_point_then_restart(tmp_path: Path, point: str) -> None:
    history = History(tmp_path / "checkpoints")
    run = run_child(history.root, "--kill-at", point, "--kill-in", "2")
    assert run.done == [1], f"the child dies while writing its second checkpoint: {run}"
    discovered = history.check(run, killed=True, context=f"killed at {point}")

    chk2 = history.root / JOB_ID / "chk-2"
    names = sorted(p.name for p in chk2.rglob("*"))
    if point in COMMITTED_POINTS:
        assert discovered == [2, 1], f"{point}: _metadata was linked, so checkpoint 2 is complete"
    else:
        assert discovered == [1], f"{point}: checkpoint 2 never reached its commit point"
        assert chk2.is_dir(), "the crash left an incomplete checkpoint directory behind"
        assert METADATA_FILE not in names
    if point == "mid-state":
        assert any(n.startswith(".tmp-keyed-") for n in names), names
    if point == "mid-metadata-temp":
        [temp] = [p for p in chk2.iterdir() if p.name.startswith(f".tmp-{METADATA_FILE}-")]
        assert temp.stat().st_size > 0, "half of the metadata was written before the kill"

    restarted = run_child(history.root, "--count", "2")
    assert restarted.ready == discovered[0] + 1
    history.check(restarted, killed=False, context=f"restart after {point}")
    assert all(history.directories_on_disk().values())
    # Checkpoint 2 was either complete already or rewritten after the restart removed the debris.
    storage = CheckpointStorage(LocalObjectStore(history.root), "")
    leftovers = unreferenced_files(storage.load(f"{JOB_ID}/chk-2"), chk2)
    if point == "after-link":
        assert [n.startswith(f".tmp-{METADATA_FILE}-") for n in leftovers] == [True], leftovers
    else:
        assert leftovers == [], "no file of the crashed attempt survives in a completed checkpoint"


def test_sigkill_at_random_times_and_points(tmp_path: Path) -> None:
    seed = int(os.environ.get("KEYSTATE_CRASH_SEED", random.SystemRandom().randrange(2**32)))
    print(f"KEYSTATE_CRASH_SEED={seed}")
    rng = random.Random(seed)
    history = History(tmp_path / "checkpoints")
    points = sorted(KILL_POINTS)
    outcomes: dict[str, int] = {"in flight absent": 0, "in flight complete": 0}
    per_run: list[int] = []
    for i in range(20):
        if rng.random() < 0.7:
            delay = rng.uniform(0.0, 0.1)
            context = f"seed {seed}, run {i}: SIGKILL {delay * 1000:.1f} ms after ready"
            run = run_child(history.root, kill_after=delay)
        else:
            point, kill_in = rng.choice(points), rng.randint(1, 3)
            context = f"seed {seed}, run {i}: killed at {point} in checkpoint {kill_in} of the run"
            run = run_child(history.root, "--kill-at", point, "--kill-in", str(kill_in))
            assert len(run.done) == kill_in - 1, context
        discovered = history.check(run, killed=True, context=context)
        if run.args:
            committed = run.args[1] in COMMITTED_POINTS
            assert (run.in_flight in discovered) == committed, f"{context}: in flight {run.in_flight}, {discovered}"
        outcomes["in flight complete" if run.in_flight in discovered else "in flight absent"] += 1
        per_run.append(len(run.done))
    final = run_child(history.root, "--count", "3")
    history.check(final, killed=False, context=f"seed {seed}: final restart")
    assert len(final.done) == 3
    assert all(history.directories_on_disk().values())
    storage = CheckpointStorage(LocalObjectStore(history.root), "")
    for cid in history.complete:
        leftovers = unreferenced_files(storage.load(f"{JOB_ID}/chk-{cid}"), history.root / JOB_ID / f"chk-{cid}")
        # Only a kill between the link and the unlink of the metadata's temp name leaves a file behind.
        assert all(n.startswith(f".tmp-{METADATA_FILE}-") for n in leftovers), (seed, cid, leftovers)
    print(f"in-flight checkpoints: {outcomes}; checkpoints per run: {per_run}")
