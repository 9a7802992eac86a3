"""Checks the incremental end-to-end tests share: shared files on storage against what checkpoints
reference, and a checkpoint's merged keyed state against the source position it recorded."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from keystate.statebackend.inspection import read_keyed_entries, read_operator_elements
from keystate.statebackend.serializers import IntSerializer
from keystate.storage.base import join_key
from keystate.storage.checkpoints import SHARED_DIR, CheckpointStorage, CompletedCheckpoint
from keystate.storage.format.metadata import HandleScope

KEYS = 40


def shared_on_storage(storage: CheckpointStorage, job_id: str) -> set[str]:
    """Paths (relative to ``<job>/shared/``) of every shared file in storage."""
    directory = join_key(storage.job_directory(job_id), SHARED_DIR)
    return {info.key[len(directory) + 1 :] for info in storage.store.list_objects(directory)}


def referenced(checkpoints: list[CompletedCheckpoint]) -> set[str]:
    """Shared paths the checkpoints reference (bases and deltas)."""
    return {
        h.path
        for c in checkpoints
        for h in c.metadata.handles()
        if h.scope is HandleScope.SHARED and h.path is not None
    }


def source_position(checkpoint: CompletedCheckpoint, uid: str = "source", *, length: int | None = None) -> int:
    """Records the one-split source had emitted at the checkpoint (its split position; ``length``, the
    whole split, once the source finished)."""
    op = checkpoint.metadata.operator(uid)
    assert op is not None
    if op.fully_finished:
        if length is None:
            raise AssertionError(f"{checkpoint}: {uid} is fully finished and the source length is unknown")
        return length
    for st in op.subtasks:
        for handle in st.operator:
            for element in read_operator_elements(checkpoint, handle):
                if element.name == "source-splits":
                    return int(json.loads(element.value)["position"] or 0)
    return 0


def keyed_counts(checkpoint: CompletedCheckpoint, uid: str = "counts") -> Counter[int]:
    """How many keys hold each count in the checkpoint's merged keyed state (bases plus deltas)."""
    op = checkpoint.metadata.operator(uid)
    assert op is not None
    counts: Counter[int] = Counter()
    ints = IntSerializer()
    for st in op.subtasks:
        for handle in st.keyed:
            for entry in read_keyed_entries(checkpoint, handle, uid, state_name="count"):
                counts[ints.deserialize(entry.values[0])] += 1
    return counts


def expected_counts(position: int, keys: int = KEYS) -> Counter[int]:
    """The counts keyed by ``n % keys`` hold after records ``0 .. position - 1``."""
    per_key = Counter(n % keys for n in range(position))
    return Counter(per_key.values())


def check_checkpoint(checkpoint: CompletedCheckpoint, *, keys: int = KEYS, length: int | None = None) -> list[str]:
    """Every file of the checkpoint verifies and its merged keyed state is exactly what the source
    position says (running counts per key). Returns what is wrong (empty: nothing)."""
    problems: list[str] = []
    try:
        for handle in checkpoint.metadata.handles():
            checkpoint.open_state(handle).verify()
        op = checkpoint.metadata.operator("counts")
        if op is not None and not op.fully_finished:
            got, want = keyed_counts(checkpoint), expected_counts(source_position(checkpoint, length=length), keys)
            if got != want:
                problems.append(f"{checkpoint}: merged counts {sorted(got.items())[:8]} != {sorted(want.items())[:8]}")
    except Exception as exc:
        problems.append(f"{checkpoint}: {type(exc).__name__}: {exc}")
    return problems


def describe(values: Any) -> str:
    return ", ".join(sorted(map(str, values))[:6])
