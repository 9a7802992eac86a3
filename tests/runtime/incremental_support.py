"""Checks the incremental end-to-end tests share: shared files on storage against what checkpoints
reference, a checkpoint's merged keyed state against the source position it recorded, whether a
checkpoint is incremental (an operator's keyed handles have deltas) and whether a savepoint is full."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from keystate.statebackend.inspection import read_keyed_entries, read_operator_elements
from keystate.statebackend.serializers import IntSerializer, KeySerializer
from keystate.storage.base import join_key
from keystate.storage.checkpoints import SHARED_DIR, CheckpointStorage, CompletedCheckpoint
from keystate.storage.format.metadata import CheckpointKind, HandleScope, KeyedStateHandle

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


# --- is it incremental, is it full -------------------------------------------------------------------------


def keyed_handles(checkpoint: CompletedCheckpoint, uid: str) -> list[KeyedStateHandle]:
    """The keyed handles of ``uid``'s subtasks in the checkpoint (none when it finished or has no state)."""
    op = checkpoint.metadata.operator(uid)
    assert op is not None, f"{checkpoint} has no operator {uid!r}"
    return [k for st in op.subtasks for k in st.keyed]


def has_deltas(checkpoint: CompletedCheckpoint, uid: str) -> bool:
    """Whether some keyed handle of ``uid`` is a base plus deltas."""
    return any(k.deltas for k in keyed_handles(checkpoint, uid))


def assert_incremental(checkpoint: CompletedCheckpoint, uid: str) -> None:
    """The checkpoint built on earlier ones: ``uid``'s keyed state is a chain with deltas, the metadata
    says incremental, and the checkpoint wrote fewer bytes than it references."""
    assert checkpoint.kind is CheckpointKind.CHECKPOINT, f"{checkpoint} is a {checkpoint.kind.value}"
    assert has_deltas(checkpoint, uid), f"{checkpoint}: no keyed handle of {uid!r} has deltas"
    metadata = checkpoint.metadata
    assert metadata.is_incremental, f"{checkpoint}: has deltas but is_incremental is false"
    assert metadata.incremental_state_bytes < metadata.full_state_bytes, (
        f"{checkpoint}: wrote {metadata.incremental_state_bytes} bytes of {metadata.full_state_bytes} referenced"
    )
    for handle in keyed_handles(checkpoint, uid):
        written = [s.written_by for s in handle.streams()]
        assert all(w is not None and w <= checkpoint.checkpoint_id for w in written), f"{checkpoint}: {written}"


def assert_self_contained(savepoint: CompletedCheckpoint) -> None:
    """A savepoint is full: nothing under the job's ``shared/`` directory, every byte its own."""
    assert savepoint.kind is CheckpointKind.SAVEPOINT, f"{savepoint} is a {savepoint.kind.value}"
    metadata = savepoint.metadata
    assert not metadata.is_incremental, f"{savepoint} builds on earlier checkpoints"
    shared = [h.describe for h in metadata.handles() if h.scope is HandleScope.SHARED]
    assert not shared, f"{savepoint} references shared files: {describe(shared)}"
    assert all(not (h.path or "").startswith(f"{SHARED_DIR}/") for h in metadata.handles())
    assert metadata.incremental_state_bytes == metadata.full_state_bytes


# --- what a checkpoint holds --------------------------------------------------------------------------------


def merged_values(checkpoint: CompletedCheckpoint, uid: str, state_name: str = "count") -> dict[Any, int]:
    """``uid``'s int value state ``state_name`` per key, merged over its subtasks (bases plus deltas, as a
    restore loads it). A key in two subtasks' state is an error."""
    keys, ints = KeySerializer(), IntSerializer()
    values: dict[Any, int] = {}
    for handle in keyed_handles(checkpoint, uid):
        for entry in read_keyed_entries(checkpoint, handle, uid, state_name=state_name):
            key = keys.deserialize(entry.key)
            assert key not in values, f"{checkpoint}: key {key!r} of {uid!r} is in two subtasks' state"
            values[key] = ints.deserialize(entry.values[0])
    return values


def split_positions(checkpoint: CompletedCheckpoint, uid: str, lengths: Mapping[str, int]) -> dict[str, int]:
    """How many records each split of source ``uid`` had emitted at the checkpoint, by split name; a split
    of a fully finished source is read to its end (``lengths``)."""
    op = checkpoint.metadata.operator(uid)
    assert op is not None, f"{checkpoint} has no operator {uid!r}"
    if op.fully_finished:
        return dict(lengths)
    positions = {}
    for st in op.subtasks:
        for handle in st.operator:
            for element in read_operator_elements(checkpoint, handle):
                if element.name == "source-splits":
                    split = json.loads(element.value)
                    positions[split["split"]] = int(split["position"] or 0)
    return positions


def counted_by_key(
    positions: Mapping[str, int], key: Callable[[list[int]], Any], *, first_split: int = 0
) -> dict[Any, int]:
    """The per-key counts of every ``MixedSource`` record ``[first_split + i, n]`` before each split's
    position (split ``"split-i"``)."""
    counts: Counter[Any] = Counter()
    for split, position in positions.items():
        tag = first_split + int(split.rsplit("-", 1)[1])
        counts.update(key([tag, n]) for n in range(position))
    return dict(counts)


def assert_state_matches_sources(
    checkpoint: CompletedCheckpoint,
    uid: str,
    source: str,
    key: Callable[[list[int]], Any],
    *,
    first_split: int = 0,
    lengths: Mapping[str, int] | None = None,
) -> None:
    """``uid``'s merged counts per key in ``checkpoint`` (value state ``count``, base plus deltas) are exactly
    what ``MixedSource`` ``source`` had emitted at it, counted by ``key``: nothing lost, nothing twice."""
    want = counted_by_key(split_positions(checkpoint, source, lengths or {}), key, first_split=first_split)
    got = merged_values(checkpoint, uid)
    assert got == want, f"{checkpoint}: {uid} holds {sorted(got.items())}, its source says {sorted(want.items())}"
