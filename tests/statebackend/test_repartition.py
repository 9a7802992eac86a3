"""Operator-state repartitioning as Flink's RoundRobinOperatorStateRepartitioner (rules F4, F5 of
docs/flink-rules.md),
checked by restoring the repartitioned handles into real OperatorStateBackends."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import pytest

from keystate.statebackend import (
    ListState,
    ListStateDescriptor,
    OperatorStateBackend,
    StrSerializer,
    repartition_operator_state,
)
from keystate.storage import CheckpointStorage, CompletedCheckpoint, DistributionMode, OperatorStateHandle
from tests.statebackend.support import write_operator

SPLIT, UNION, BROADCAST = DistributionMode.SPLIT, DistributionMode.UNION, DistributionMode.BROADCAST

Layout = Mapping[str, tuple[DistributionMode, Sequence[str]]]
"""One subtask's operator state: name -> (mode, elements)."""


def _state(backend: OperatorStateBackend, name: str, mode: DistributionMode) -> ListState[str]:
    descriptor = ListStateDescriptor[str](name=name, serializer=StrSerializer())
    if mode is SPLIT:
        return backend.get_list_state(descriptor)
    if mode is UNION:
        return backend.get_union_list_state(descriptor)
    return backend.get_broadcast_list_state(descriptor)


def checkpoint(
    storage: CheckpointStorage, layouts: Sequence[Layout]
) -> tuple[CompletedCheckpoint, list[list[OperatorStateHandle]]]:
    """Old subtasks with the given state (an empty layout = a finished or stateless subtask)."""
    snapshots = []
    for index, layout in enumerate(layouts):
        backend = OperatorStateBackend("src", index)
        for name, (mode, elements) in layout.items():
            _state(backend, name, mode).add_all(elements)
        snapshots.append(backend.snapshot())
    completed, handles = write_operator(storage, 1, snapshots)
    return completed, [[h] if h is not None else [] for h in handles]


def restore(
    completed: CompletedCheckpoint, assigned: list[list[OperatorStateHandle]], modes: Mapping[str, DistributionMode]
) -> list[dict[str, list[str]]]:
    """Each new subtask's elements per name, as a restored OperatorStateBackend shows them."""
    out = []
    for index, handles in enumerate(assigned):
        backend = OperatorStateBackend("src", index)
        backend.restore([(completed, h) for h in handles])
        out.append({name: _state(backend, name, mode).get() for name, mode in modes.items()})
    return out


def test_same_parallelism_without_union_is_unchanged(storage: CheckpointStorage) -> None:
    layouts = [{"a": (SPLIT, ["1", "2"]), "r": (BROADCAST, ["x"])}, {"a": (SPLIT, ["3"]), "r": (BROADCAST, ["x"])}]
    completed, previous = checkpoint(storage, layouts)
    assigned = repartition_operator_state(previous, 2)
    assert assigned == previous
    assert all(a[0] is p[0] for a, p in zip(assigned, previous, strict=True))
    restored = restore(completed, assigned, {"a": SPLIT, "r": BROADCAST})
    assert restored == [{"a": ["1", "2"], "r": ["x"]}, {"a": ["3"], "r": ["x"]}]


@pytest.mark.parametrize("new_p", [2, 3, 1])
def test_union_gives_every_subtask_every_entry(storage: CheckpointStorage, new_p: int) -> None:
    layouts = [
        {"u": (UNION, ["w0"]), "s": (SPLIT, ["s0"])},
        {"u": (UNION, ["w1a", "w1b"]), "s": (SPLIT, ["s1"])},
    ]
    completed, previous = checkpoint(storage, layouts)
    restored = restore(completed, repartition_operator_state(previous, new_p), {"u": UNION, "s": SPLIT})
    assert [sorted(r["u"]) for r in restored] == [["w0", "w1a", "w1b"]] * new_p
    assert all(r["u"].index("w1a") + 1 == r["u"].index("w1b") for r in restored)  # one handle's order is kept
    assert Counter(e for r in restored for e in r["s"]) == Counter(["s0", "s1"])  # split: no loss, no copy
    if new_p == 2:
        assert [r["s"] for r in restored] == [["s0"], ["s1"]]  # same parallelism: each keeps its own


def test_split_deals_contiguous_chunks_with_rotation(storage: CheckpointStorage) -> None:
    five = ["1", "2", "3", "4", "5"]
    layouts = [
        {"alpha": (SPLIT, ["a", "b", "c"]), "beta": (SPLIT, five[:1]), "gamma": (SPLIT, five[:4])},
        {"alpha": (SPLIT, ["d", "e"]), "beta": (SPLIT, five[1:]), "gamma": (SPLIT, five[4:])},
    ]
    completed, previous = checkpoint(storage, layouts)
    assigned = repartition_operator_state(previous, 3)
    restored = restore(completed, assigned, {"alpha": SPLIT, "beta": SPLIT, "gamma": SPLIT})
    # 5 over 3: chunk sizes 2, 2, 1 in old-subtask order; alpha starts at subtask 0,
    # beta where alpha ran out of odd partitions (2), gamma where beta did (1)
    # (the order of elements coming from different old files is not defined, as in Flink)
    assert [sorted(r["alpha"]) for r in restored] == [["a", "b"], ["c", "d"], ["e"]]
    assert [sorted(r["beta"]) for r in restored] == [["3", "4"], ["5"], ["1", "2"]]
    assert [sorted(r["gamma"]) for r in restored] == [["5"], ["1", "2"], ["3", "4"]]
    # a chunk spanning two old files is two handles in the new subtask's list
    assert len(assigned[1]) == 2


@pytest.mark.parametrize(
    ("sizes", "new_p", "expected"),
    [
        ([3], 4, [1, 1, 1, 0]),
        ([2, 2, 2, 2], 2, [4, 4]),
        ([0, 7], 3, [3, 2, 2]),
        ([1, 0, 0], 2, [1, 0]),
    ],
)
def test_split_chunk_sizes(storage: CheckpointStorage, sizes: list[int], new_p: int, expected: list[int]) -> None:
    layouts: list[Layout] = []
    elements: list[str] = []
    for i, n in enumerate(sizes):
        mine = [f"{i}.{j}" for j in range(n)]
        elements += mine
        layouts.append({"s": (SPLIT, mine)})
    completed, previous = checkpoint(storage, layouts)
    restored = restore(completed, repartition_operator_state(previous, new_p), {"s": SPLIT})
    assert [len(r["s"]) for r in restored] == expected
    starts = [sum(expected[:i]) for i in range(new_p)]
    chunks = [sorted(elements[start : start + n]) for start, n in zip(starts, expected, strict=True)]
    assert [sorted(r["s"]) for r in restored] == chunks  # contiguous chunks in old-subtask order


@pytest.mark.parametrize("new_p", [1, 3, 5])
def test_broadcast_gives_subtask_i_the_copy_of_reporter_i_mod_reporters(storage: CheckpointStorage, new_p: int) -> None:
    layouts = [{"r": (BROADCAST, ["rule", f"from-{i}"])} for i in range(2)]
    completed, previous = checkpoint(storage, layouts)
    restored = restore(completed, repartition_operator_state(previous, new_p), {"r": BROADCAST})
    assert [r["r"] for r in restored] == [["rule", f"from-{i % 2}"] for i in range(new_p)]


def test_partly_reported_broadcast_with_unchanged_parallelism(storage: CheckpointStorage) -> None:
    layouts: list[Layout] = [
        {"r": (BROADCAST, ["rule", "from-0"]), "s": (SPLIT, ["s0"]), "u": (UNION, ["u0"])},
        {},  # finished: reported nothing
        {"s": (SPLIT, ["s2"])},  # running but without the broadcast state
        {"r": (BROADCAST, ["rule", "from-3"]), "s": (SPLIT, ["s3"])},
    ]
    completed, previous = checkpoint(storage, layouts)
    assigned = repartition_operator_state(previous, 4)
    restored = restore(completed, assigned, {"r": BROADCAST, "s": SPLIT, "u": UNION})
    # every subtask gets exactly one copy, taken from the reporters [0, 3] round robin
    assert [r["r"] for r in restored] == [["rule", f"from-{(0, 3)[i % 2]}"] for i in range(4)]
    assert [r["s"] for r in restored] == [["s0"], [], ["s2"], ["s3"]]  # split state stays where it was
    assert [r["u"] for r in restored] == [["u0"]] * 4


def test_fully_finished_broadcast_reporters_only(storage: CheckpointStorage) -> None:
    layouts: list[Layout] = [{"r": (BROADCAST, ["only"])}, {}, {}]
    completed, previous = checkpoint(storage, layouts)
    for new_p in (3, 2):
        restored = restore(completed, repartition_operator_state(previous, new_p), {"r": BROADCAST})
        assert [r["r"] for r in restored] == [["only"]] * new_p


def test_combined_modes_rescale_without_loss_or_duplicates(storage: CheckpointStorage) -> None:
    layouts: list[Layout] = [
        {"s": (SPLIT, [f"{i}.{j}" for j in range(i + 2)]), "u": (UNION, [f"u{i}"]), "b": (BROADCAST, ["cfg"])}
        for i in range(3)
    ]
    all_split = [e for layout in layouts for e in layout["s"][1]]
    completed, previous = checkpoint(storage, layouts)
    for new_p in (1, 2, 4, 7):
        restored = restore(
            completed, repartition_operator_state(previous, new_p), {"s": SPLIT, "u": UNION, "b": BROADCAST}
        )
        assert Counter(e for r in restored for e in r["s"]) == Counter(all_split)
        assert all(sorted(r["u"]) == ["u0", "u1", "u2"] for r in restored)
        assert all(r["b"] == ["cfg"] for r in restored)


def test_invalid_parallelism() -> None:
    with pytest.raises(ValueError, match="positive"):
        repartition_operator_state([[]], 0)
