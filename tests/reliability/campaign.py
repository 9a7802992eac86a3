"""Crash campaigns: run ``job_child.py`` again and again on one checkpoint root, killing it, until the job completes.

One campaign (:func:`run_campaign`) is a sequence of child processes on one storage root and one sink
location. Each child restores from the latest completed checkpoint or savepoint and is SIGKILLed at a
random time after it is ready, or dies at an armed kill point (``keystate.runtime.faults`` points and the
storage points of ``job_child.STORAGE_POINTS``); the last child runs until the job completes. After
every child the campaign checks that every completed checkpoint and savepoint loads and every state
handle verifies, that discovery lists exactly the directories with ``_metadata``, that the next child
restores exactly the latest of them, and that the committed output has no duplicate; at the end, that
the committed output is exactly the expected output (no loss, no duplicate) and every key's running
counts are 1, 2, 3, ... Violations are collected, not raised, so a long campaign reports them all.

Used by ``tests/reliability/test_crash_campaigns.py`` and ``benchmarks/crashes.py``.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keystate.runtime import faults
from keystate.statebackend.inspection import read_operator_elements
from keystate.storage import (
    CheckpointKind,
    CompletedCheckpoint,
    KeystateError,
    open_storage,
    open_store,
    parse_location,
)
from tests.reliability import job_child

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("job_child.py")
CHILD_TIMEOUT = 30.0

RUNTIME_POINTS = tuple(sorted(faults.POINTS))
LOCAL_STORE_POINTS = ("store.metadata.mid-write", "store.state.mid-write", "store.state.before-complete",
                      "store.sink.mid-commit", "store.subsume.metadata-delete",
                      "store.subsume.shared-delete")  # fmt: skip
S3_POINTS = ("s3.metadata.in-flight", "s3.multipart.in-flight")
NTH = {"snapshot.async": 14, "snapshot.async.done": 14, "snapshot.sync": 14, "store.state.mid-write": 8,
       "store.state.before-complete": 8, "sink.commit.before": 6, "sink.commit.after": 6,
       "store.subsume.metadata-delete": 5, "store.subsume.shared-delete": 5}  # fmt: skip
"""The largest ``--nth`` drawn per point (others: 3); points hit many times per checkpoint get more."""


@dataclass(frozen=True)
class Plan:
    """One campaign.

    Attributes:
        seed: everything random in the campaign (kill delays, points, hits) follows from it.
        kills: children killed before the one that must complete.
        mode: ``bounded`` (the job ends by itself) or ``savepoint`` (stop-with-savepoint --drain).
        s3: checkpoints and output on S3 (``endpoint`` of :func:`run_campaign`), else local disk.
        flaky: probability of a transient storage fault per store call (retried by the runtime).
        ballast: MiB of operator state (a multipart upload per checkpoint on S3).
        inline: the inline threshold in bytes (small: every snapshot writes state files).
        points: the kill points to draw from; a child is killed at a point or at a random time, half and half.
        forced: kill points for the first children, in order (then as ``points`` says).
    """

    seed: int
    kills: int = 5
    mode: str = "bounded"
    s3: bool = False
    flaky: float = 0.0
    ballast: int = 0
    inline: int = 256
    points: tuple[str, ...] = RUNTIME_POINTS + LOCAL_STORE_POINTS
    forced: tuple[str, ...] = ()

    def __str__(self) -> str:
        where = "s3" if self.s3 else "local"
        extra = f", flaky {self.flaky}" if self.flaky else ""
        extra += f", ballast {self.ballast} MiB" if self.ballast else ""
        return f"seed {self.seed} ({self.mode}, {where}, {self.kills} kills{extra})"


@dataclass
class Outcome:
    """What a campaign did and found."""

    plan: Plan
    runs: int = 0
    kills: int = 0
    points_hit: Counter[str] = field(default_factory=Counter)
    records: int = 0
    lost: int = 0
    duplicates: int = 0
    checkpoints_verified: int = 0
    verified: set[str] = field(default_factory=set)
    """Checkpoint directories already verified (a completed checkpoint never changes)."""
    shared_refs: dict[str, frozenset[str]] = field(default_factory=dict)
    """Per completed checkpoint directory: the shared files (keys) it references."""
    completed: bool = False
    violations: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def violate(self, message: str) -> None:
        self.violations.append(f"{self.plan}: {message}")


@dataclass
class Child:
    args: list[str]
    lines: list[str]
    returncode: int
    stderr: str
    killed_by_parent: bool

    def value(self, prefix: str) -> str | None:
        return next((line[len(prefix) + 1 :] for line in self.lines if line.startswith(prefix + " ")), None)


def run_child(args: list[str], env: dict[str, str], *, kill_after: float | None, deadline: float) -> Child:
    """Run one child; SIGKILL it ``kill_after`` seconds after it printed ``ready`` (``None``: never, but
    at ``deadline`` seconds after the start, which is a hang)."""
    lines: queue.Queue[str | None] = queue.Queue()
    with subprocess.Popen(
        [sys.executable, str(CHILD), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        stdout, stderr_pipe = proc.stdout, proc.stderr
        errors: list[str] = []

        def pump() -> None:
            for line in stdout:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        readers = [threading.Thread(target=pump, daemon=True),
                   threading.Thread(target=lambda: errors.append(stderr_pipe.read()), daemon=True)]  # fmt: skip
        for reader in readers:
            reader.start()
        seen: list[str] = []
        started = time.monotonic()
        kill_at: float | None = None
        killed = False
        while True:
            now = time.monotonic()
            timeout = min(0.02 if kill_at is None else max(0.0, kill_at - now), max(0.0, started + deadline - now))
            try:
                line = lines.get(timeout=max(timeout, 0.001))
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line:
                seen.append(line)
                if line == "ready" and kill_after is not None:
                    kill_at = time.monotonic() + kill_after
            now = time.monotonic()
            if (kill_at is not None and now >= kill_at) or now >= started + deadline:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                kill_at = None
                deadline = float("inf")
        proc.wait()
        for reader in readers:
            reader.join(timeout=5)
    return Child(args, seen, proc.returncode, "".join(errors), killed)


def child_env(endpoint: str | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if endpoint is not None:
        env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                   AWS_DEFAULT_REGION="us-east-1", AWS_MAX_ATTEMPTS="5")  # fmt: skip
    return env


# --- checks ----------------------------------------------------------------------------------------------


def check_storage(root: str, outcome: Outcome, endpoint: str | None) -> CompletedCheckpoint | None:
    """Every listed checkpoint is complete and verifies; every complete one is listed. Returns the latest."""
    storage = open_storage(root, endpoint_url=endpoint)
    store = storage.store
    listed = {p.directory for p in storage.discover()}
    on_storage: set[str] = set()
    for top in (f"{storage.base}/{job_child.JOB_ID}", f"{storage.base}/{storage.savepoint_dir}"):
        for name in store.list_dirs(top):
            directory = f"{top}/{name}"
            if (name.startswith(("chk-", "savepoint-"))) and store.exists(f"{directory}/_metadata"):
                on_storage.add(directory)
    if listed != on_storage:
        extra, missing = sorted(listed - on_storage), sorted(on_storage - listed)
        outcome.violate(f"discovery lists {extra} without _metadata and misses complete {missing}")
    for directory in sorted(listed - outcome.verified):
        outcome.verified.add(directory)
        try:
            checkpoint = storage.load(directory)
            for handle in checkpoint.metadata.handles():
                checkpoint.open_state(handle).verify()
            outcome.shared_refs[directory] = frozenset(
                key for h in checkpoint.metadata.handles() if (key := checkpoint.state_key(h)) and "/shared/" in key
            )
        except KeystateError as exc:
            outcome.violate(f"completed checkpoint {directory} is unreadable: {exc}")
        outcome.checkpoints_verified += 1
    # Verified once, but its shared files must stay as long as the checkpoint does (later runs delete others).
    shared = shared_files(storage)
    for directory in sorted(listed):
        lost = outcome.shared_refs.get(directory, frozenset()) - shared
        if lost:
            outcome.violate(f"completed checkpoint {directory} lost shared files {sorted(lost)[:3]}")
    try:
        return storage.latest()
    except KeystateError as exc:
        outcome.violate(f"latest() failed: {exc}")
        return None


def shared_files(storage: Any) -> set[str]:
    """Keys of every file under the job's ``shared/`` directory."""
    return {info.key for info in storage.store.list_objects(f"{storage.base}/{job_child.JOB_ID}/shared".lstrip("/"))}


def check_shared_exact(root: str, outcome: Outcome, endpoint: str | None) -> None:
    """When the job ended: storage holds exactly the shared files its completed checkpoints reference
    (orphans of killed runs were removed when the next run started, subsumed ones once unneeded)."""
    storage = open_storage(root, endpoint_url=endpoint)
    listed = [p.directory for p in storage.discover() if p.kind is CheckpointKind.CHECKPOINT]
    wanted: set[str] = set()
    for directory in listed:
        checkpoint = storage.load(directory)
        wanted |= {key for h in checkpoint.metadata.handles() if (key := checkpoint.state_key(h)) and "/shared/" in key}
    found = shared_files(storage)
    if found != wanted:
        outcome.violate(f"at the end, shared files not referenced {sorted(found - wanted)[:3]} "
                        f"({len(found - wanted)}), referenced but missing {sorted(wanted - found)[:3]}")  # fmt: skip


def committed(out: str, endpoint: str | None) -> list[list[Any]]:
    location = parse_location(out)
    store = open_store(location, endpoint_url=endpoint)
    records: list[list[Any]] = []
    for info in store.list_objects(location.path):
        if "/_staging/" not in info.key and info.key.endswith(".jsonl"):
            records.extend(json.loads(line) for line in store.get(info.key).decode().splitlines())
    return records


def check_no_duplicates(records: list[list[Any]], outcome: Outcome, when: str) -> None:
    seen = Counter((r[0], r[1]) for r in records)
    dups = {k: n for k, n in seen.items() if n > 1}
    if dups:
        outcome.violate(f"{when}: duplicate committed records {sorted(dups)[:5]} ({len(dups)} in all)")


def savepoint_position(savepoint: CompletedCheckpoint) -> int:
    """Where the unbounded ``b-src`` stopped in a savepoint: records ``0 .. position - 1`` were emitted."""
    source = savepoint.metadata.operator("b-src")
    assert source is not None
    for subtask in source.subtasks:
        for handle in subtask.operator:
            for element in read_operator_elements(savepoint, handle):
                if element.name == "source-splits":
                    return int(json.loads(element.value)["position"])
    raise AssertionError(f"{savepoint}: no split position for b-src")


def check_final(root: str, out: str, outcome: Outcome, endpoint: str | None) -> None:
    records = committed(out, endpoint)
    b_count = job_child.B_COUNT
    if outcome.plan.mode == "savepoint":
        latest = open_storage(root, endpoint_url=endpoint).latest()
        if latest is None or latest.kind is not CheckpointKind.SAVEPOINT or not latest.metadata.properties.drain:
            outcome.violate(f"the job completed but the latest checkpoint is {latest}, not a drained savepoint")
            return
        b_count = savepoint_position(latest)
    expected = Counter([("a", n) for n in range(job_child.A_COUNT)] + [("b", n) for n in range(b_count)])
    got = Counter((r[0], r[1]) for r in records)
    outcome.records += sum(expected.values())
    lost = expected - got
    extra = got - expected
    outcome.lost += sum(lost.values())
    outcome.duplicates += sum(n - 1 for n in got.values() if n > 1)
    if lost or extra:
        outcome.violate(f"committed output differs: lost {sorted(lost)[:5]} ({sum(lost.values())}), "
                        f"unexpected or duplicated {sorted(extra)[:5]} ({sum(extra.values())})")  # fmt: skip
    keys = {"a": job_child.A_KEYS, "b": job_child.B_KEYS}
    per_key: dict[tuple[str, int], list[int]] = {}
    for branch, n, count in records:
        per_key.setdefault((branch, n % keys[branch]), []).append(count)
    for key, counts in per_key.items():
        if sorted(counts) != list(range(1, len(counts) + 1)):
            outcome.violate(f"key {key}: running counts {sorted(counts)[:10]}... are not 1..{len(counts)}")


# --- the campaign ----------------------------------------------------------------------------------------


def run_campaign(plan: Plan, workdir: Path, *, endpoint: str | None = None, bucket: str | None = None) -> Outcome:
    """Run one campaign in ``workdir`` (local) or under ``s3://bucket/<workdir name>`` (``plan.s3``)."""
    started = time.monotonic()
    outcome = Outcome(plan)
    rng = random.Random(plan.seed)
    if plan.s3:
        assert endpoint is not None
        assert bucket is not None
        root, out = f"s3://{bucket}/{workdir.name}/ckpt", f"s3://{bucket}/{workdir.name}/out"
    else:
        root, out = str(workdir / "ckpt"), str(workdir / "out")
    env = child_env(endpoint if plan.s3 else None)
    s3_endpoint = endpoint if plan.s3 else None
    latest = None
    for index in range(plan.kills + 4):
        final = index >= plan.kills
        args = [root, out, "--mode", plan.mode, "--seed", str(rng.randrange(1 << 30))]
        if plan.flaky:
            args += ["--flaky", str(plan.flaky)]
        if plan.ballast:
            args += ["--ballast", str(plan.ballast)]
        args += ["--inline", str(plan.inline)]
        kill_after: float | None = None
        point = None
        if not final:
            if index < len(plan.forced):
                point = plan.forced[index]
            elif rng.random() >= 0.5 and plan.points:
                point = rng.choice(plan.points)
            # A child armed at a point that it does not reach soon is killed at a random time instead.
            kill_after = rng.uniform(0.02, 0.9) if point is None else rng.uniform(0.4, 1.5)
            if index < len(plan.forced):
                kill_after = 8.0  # a forced point must be reached: the first hits come soon enough
            if point is not None:
                nth = 1 if index < len(plan.forced) else rng.randint(1, NTH.get(point, 3))
                args += ["--kill", point, "--nth", str(nth)]
        child = run_child(args, env, kill_after=kill_after, deadline=CHILD_TIMEOUT)
        outcome.runs += 1
        what = f"child {index} ({' '.join(args[2:])}, kill after {kill_after})"
        outcome.log.append(f"{what}: exit {child.returncode}, {child.lines}")
        restored = child.value("restored")
        expected = None if latest is None else f"{latest.checkpoint_id} {latest.kind} {latest.location}"
        if "ready" in child.lines and restored != expected:
            outcome.violate(f"{what} restored {restored!r}, but the latest completed checkpoint is {expected!r}")
        if child.returncode == -signal.SIGKILL:
            outcome.kills += 1
            if not child.killed_by_parent:
                hit = point or "?"
                outcome.points_hit[hit] += 1
                if point is None:
                    outcome.violate(f"{what} died of SIGKILL that nobody sent: {child.stderr[-2000:]}")
        elif child.returncode != 0:
            outcome.violate(f"{what} failed with exit {child.returncode}: {child.stderr[-3000:]}")
        try:
            latest = check_storage(root, outcome, s3_endpoint)
            check_no_duplicates(committed(out, s3_endpoint), outcome, what)
        except KeystateError as exc:
            outcome.violate(f"after {what}: storage check failed: {exc}")
        if child.returncode == 0:
            outcome.completed = child.value("savepoint") is not None or "finished" in child.lines
            if outcome.completed:
                break
    if not outcome.completed:
        outcome.violate("the job never completed")
    else:
        check_final(root, out, outcome, s3_endpoint)
        try:
            check_shared_exact(root, outcome, s3_endpoint)
        except KeystateError as exc:
            outcome.violate(f"the final check of shared files failed: {exc}")
    outcome.seconds = time.monotonic() - started
    return outcome
