"""Finalizing a checkpoint (rules D2-D4, I3 of docs/flink-rules.md): Flink's DefaultCheckpointPlanTest scenarios against
``CheckpointCoordinator._build_metadata``, the decline reason of D4, and failure accounting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from keystate.runtime.checkpoint_protocol import (
    CheckpointFailureReason,
    PartialFinishingNotSupportedError,
    SubtaskSnapshot,
)
from keystate.runtime.config import CheckpointConfig
from keystate.runtime.coordinator import CheckpointCoordinator, _Pending
from keystate.runtime.errors import CheckpointFailedError
from keystate.runtime.events import CheckpointOptions
from keystate.runtime.plan import SubtaskId, SubtaskStatus, calculate_plan
from keystate.storage.checkpoints import CheckpointStorage, CompletedCheckpoint
from keystate.storage.format.metadata import (
    CheckpointKind,
    CheckpointMetadata,
    CheckpointProperties,
    DistributionMode,
    OperatorState,
    OperatorStatistics,
    OperatorStatus,
    SubtaskState,
)
from keystate.storage.format.topology import InputEdge, Partitioning, Topology, TopologyOperator
from keystate.storage.uri import open_storage
from tests.runtime.handles import JOB_ID, keyed_handle, operator_handle

CHECKPOINT_ID = 3
UNION = DistributionMode.UNION


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop that only owns the pending checkpoint's future (nothing runs on it)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def storage(tmp_path: Path) -> CheckpointStorage:
    return open_storage(str(tmp_path))


def coordinator(storage: CheckpointStorage, topology: Topology, fatal: list[BaseException]) -> CheckpointCoordinator:
    config = CheckpointConfig(storage=storage.location)
    return CheckpointCoordinator(
        job_id=JOB_ID, topology=topology, storage=storage, config=config, on_fatal=fatal.append
    )


def pending(
    storage: CheckpointStorage,
    topology: Topology,
    finished: Mapping[str, set[int]],
    acks: Mapping[SubtaskId, SubtaskSnapshot],
    future: asyncio.Future[CompletedCheckpoint],
    options: CheckpointOptions | None = None,
) -> _Pending:
    """A pending checkpoint whose plan comes from the statuses and whose acks are all in."""
    status = {
        SubtaskId(op.uid, i): SubtaskStatus.FINISHED if i in finished.get(op.uid, set()) else SubtaskStatus.RUNNING
        for op in topology
        for i in range(op.parallelism)
    }
    plan = calculate_plan(topology, status)
    assert set(acks) == plan.tasks_to_wait_for, "the test must acknowledge exactly the awaited tasks"
    options = options or CheckpointOptions()
    if options.is_savepoint:
        writer = storage.begin_savepoint(JOB_ID, CHECKPOINT_ID)
    else:
        writer = storage.begin_checkpoint(JOB_ID, CHECKPOINT_ID)
    return _Pending(CHECKPOINT_ID, 1_700_000_000_000, options, plan, writer, future, dict(acks))


def single(uid: str, parallelism: int = 2) -> Topology:
    return Topology((TopologyOperator(uid, parallelism),))


def operator(meta: CheckpointMetadata, uid: str) -> OperatorState:
    state = meta.operator(uid)
    assert state is not None, f"{uid!r} is missing from the metadata"
    return state


def union_snapshot(*, finished_operators: bool = False) -> SubtaskSnapshot:
    handle = operator_handle(("offsets", UNION, 2), ("buffer", DistributionMode.SPLIT, 1))
    return SubtaskSnapshot(operator=(handle,), finished_operators=finished_operators)


# --- union list state and partial finishing (D3.2, D3.3) --------------------------------------------


def test_union_state_on_partially_finished_operator_is_declined(
    storage: CheckpointStorage, loop: asyncio.AbstractEventLoop
) -> None:
    topology = single("offsets")
    p = pending(storage, topology, {"offsets": {0}}, {SubtaskId("offsets", 1): union_snapshot()}, loop.create_future())
    with pytest.raises(
        PartialFinishingNotSupportedError,
        match=r"^The vertex offsets \(id = offsets\) has used UnionListState, but part of its tasks are FINISHED\.$",
    ):
        coordinator(storage, topology, [])._build_metadata(p)


@pytest.mark.parametrize("reporter", [0, 1])
def test_union_state_with_some_operators_finished_is_declined(
    storage: CheckpointStorage, loop: asyncio.AbstractEventLoop, reporter: int
) -> None:
    topology = single("offsets")
    acks = {SubtaskId("offsets", i): union_snapshot(finished_operators=i == reporter) for i in range(2)}
    p = pending(storage, topology, {}, acks, loop.create_future())
    with pytest.raises(
        PartialFinishingNotSupportedError,
        match=(
            r"^The vertex offsets \(id = offsets\) has used UnionListState, but part of its tasks has called "
            r"operators' finish method\.$"
        ),
    ):
        coordinator(storage, topology, [])._build_metadata(p)


@pytest.mark.parametrize("finished_operators", [False, True], ids=["none_finished", "all_finished"])
def test_union_state_is_accepted_when_no_or_all_subtasks_finished_operators(
    storage: CheckpointStorage, loop: asyncio.AbstractEventLoop, finished_operators: bool
) -> None:
    topology = single("offsets")
    acks = {SubtaskId("offsets", i): union_snapshot(finished_operators=finished_operators) for i in range(2)}
    meta = coordinator(storage, topology, [])._build_metadata(
        pending(storage, topology, {}, acks, loop.create_future())
    )
    state = meta.operator("offsets")
    assert state is not None
    assert state.status is OperatorStatus.RUNNING
    assert [st.operator for st in state.subtasks] == [acks[SubtaskId("offsets", i)].operator for i in range(2)]


def test_split_state_with_partial_finishing_is_accepted(
    storage: CheckpointStorage, loop: asyncio.AbstractEventLoop
) -> None:
    topology = single("buffers")
    handle = operator_handle(("buffer", DistributionMode.SPLIT, 3), ("rules", DistributionMode.BROADCAST, 1))
    acks = {SubtaskId("buffers", 1): SubtaskSnapshot(operator=(handle,), finished_operators=True)}
    p = pending(storage, topology, {"buffers": {0}}, acks, loop.create_future())
    state = coordinator(storage, topology, [])._build_metadata(p).operator("buffers")
    assert state is not None
    assert state.subtasks == (SubtaskState(0, finished=True), SubtaskState(1, operator=(handle,)))


def test_union_state_of_another_operator_does_not_decline(
    storage: CheckpointStorage, loop: asyncio.AbstractEventLoop
) -> None:
    # "src" is partly finished without union state; "offsets" uses union state with nothing finished.
    topology = Topology((
        TopologyOperator("src", 2),
        TopologyOperator("offsets", 2, None, (InputEdge("src", Partitioning.FORWARD),)),
    ))  # fmt: skip
    acks = {SubtaskId("src", 1): SubtaskSnapshot()} | {SubtaskId("offsets", i): union_snapshot() for i in range(2)}
    meta = coordinator(storage, topology, [])._build_metadata(
        pending(storage, topology, {"src": {0}}, acks, loop.create_future())
    )
    assert operator(meta, "src").status is OperatorStatus.PARTIALLY_FINISHED
    assert operator(meta, "offsets").status is OperatorStatus.RUNNING


# --- fulfilling finished status (D3.4, D3.5) --------------------------------------------------------


def _three_vertices() -> Topology:
    return Topology((
        TopologyOperator("finished", 2),
        TopologyOperator("restored", 3, 64),
        TopologyOperator("partly", 2, None, (InputEdge("finished", Partitioning.FORWARD),)),
    ))  # fmt: skip


def test_fulfill_finished_states(storage: CheckpointStorage, loop: asyncio.AbstractEventLoop) -> None:
    topology = _three_vertices()
    keyed, op_state = keyed_handle(64, 127), operator_handle(("buffer", DistributionMode.SPLIT, 2))
    acks = {
        SubtaskId("restored", i): SubtaskSnapshot(finished_on_restore=True, finished_operators=True) for i in range(3)
    }
    acks[SubtaskId("partly", 1)] = SubtaskSnapshot(keyed=(keyed,), operator=(op_state,))
    p = pending(storage, topology, {"finished": {0, 1}, "partly": {0}}, acks, loop.create_future())
    assert p.plan.fully_finished_operators == {"finished"}

    meta = coordinator(storage, topology, [])._build_metadata(p)

    assert meta.operators == (
        OperatorState("finished", 2, 128, fully_finished=True),
        OperatorState("restored", 3, 64, fully_finished=True),
        OperatorState(
            "partly", 2, 128, (InputEdge("finished", Partitioning.FORWARD),),
            subtasks=(SubtaskState(0, finished=True), SubtaskState(1, keyed=(keyed,), operator=(op_state,))),
            statistics=OperatorStatistics(0, 0, 0, acknowledged_subtasks=1),
        ),
    )  # fmt: skip
    assert meta.statistics is not None
    assert [op.status for op in meta.operators] == [
        OperatorStatus.FULLY_FINISHED,
        OperatorStatus.FULLY_FINISHED,
        OperatorStatus.PARTIALLY_FINISHED,
    ]
    assert operator(meta, "partly").finished_subtasks == [0]
    assert (meta.checkpoint_id, meta.job_id, meta.kind) == (CHECKPOINT_ID, JOB_ID, CheckpointKind.CHECKPOINT)
    # The built metadata is valid _metadata: it commits and loads back unchanged.
    completed = p.writer.commit(meta)
    assert storage.load(completed.directory).metadata == meta


def test_operator_statistics_take_the_maxima_and_the_last_acknowledgement(
    storage: CheckpointStorage, loop: asyncio.AbstractEventLoop
) -> None:
    """Per operator: the largest sync/async/alignment of its subtasks, how many acknowledged, and trigger
    to its last acknowledgement (Flink's per-operator end-to-end duration)."""
    topology = Topology((TopologyOperator("src", 3),))
    acks = {
        SubtaskId("src", i): SubtaskSnapshot(sync_duration_ms=s, async_duration_ms=a, alignment_duration_ms=g)
        for i, (s, a, g) in enumerate([(1, 40, 0), (7, 10, 3), (2, 90, 1)])
    }
    p = pending(storage, topology, {}, acks, loop.create_future())
    p.acked_at = {sub: p.started + delay for sub, delay in zip(acks, (0.05, 0.42, 0.2), strict=True)}

    stats = operator(coordinator(storage, topology, [])._build_metadata(p), "src").statistics

    assert stats == OperatorStatistics(7, 90, 3, acknowledged_subtasks=3, end_to_end_duration_ms=420)


def test_running_subtasks_without_state_leave_no_entry(
    storage: CheckpointStorage, loop: asyncio.AbstractEventLoop
) -> None:
    topology = single("map", 3)
    handle = keyed_handle(43, 85)
    acks = {SubtaskId("map", 0): SubtaskSnapshot(), SubtaskId("map", 1): SubtaskSnapshot(keyed=(handle,))}
    meta = coordinator(storage, topology, [])._build_metadata(
        pending(storage, topology, {"map": {2}}, acks, loop.create_future())
    )
    assert operator(meta, "map").subtasks == (SubtaskState(1, keyed=(handle,)), SubtaskState(2, finished=True))


def test_stop_with_savepoint_metadata(storage: CheckpointStorage, loop: asyncio.AbstractEventLoop) -> None:
    topology = single("map", 1)
    options = CheckpointOptions(CheckpointKind.SAVEPOINT, synchronous=True, drain=True)
    acks = {SubtaskId("map", 0): SubtaskSnapshot(finished_operators=True)}
    p = pending(storage, topology, {}, acks, loop.create_future(), options)
    meta = coordinator(storage, topology, [])._build_metadata(p)
    assert meta.kind is CheckpointKind.SAVEPOINT
    assert meta.properties == CheckpointProperties(synchronous=True, drain=True)


# --- what a failed finalization counts as (D4, I3) --------------------------------------------------


def test_union_decline_fails_the_checkpoint_as_declined_task_closing_uncounted(storage: CheckpointStorage) -> None:
    topology = single("offsets")
    fatal: list[BaseException] = []
    failures: list[CheckpointFailureReason] = []

    async def scenario() -> BaseException | None:
        coord = coordinator(storage, topology, fatal)  # tolerable_failed_checkpoints = 0
        coord.failure_listeners.append(lambda _id, reason, _msg: failures.append(reason))
        acks = {SubtaskId("offsets", 1): union_snapshot()}
        p = pending(storage, topology, {"offsets": {0}}, acks, asyncio.get_running_loop().create_future())
        coord._pending[p.checkpoint_id] = p
        await coord._finalize(p)
        await coord.close()
        assert coord.pending_count == 0
        return p.future.exception()

    error = asyncio.run(scenario(), debug=True)
    assert isinstance(error, CheckpointFailedError)
    assert error.reason is CheckpointFailureReason.CHECKPOINT_DECLINED_TASK_CLOSING
    assert "part of its tasks are FINISHED" in str(error)
    assert failures == [CheckpointFailureReason.CHECKPOINT_DECLINED_TASK_CLOSING]
    assert fatal == [], "a decline for union state must not use up the failure tolerance"
    assert storage.discover() == []


def test_finalize_commits_the_built_metadata(storage: CheckpointStorage) -> None:
    topology = _three_vertices()

    async def scenario() -> tuple[CompletedCheckpoint, CheckpointCoordinator]:
        coord = coordinator(storage, topology, [])
        acks = {SubtaskId("restored", i): SubtaskSnapshot(finished_on_restore=True) for i in range(3)}
        acks[SubtaskId("partly", 1)] = SubtaskSnapshot(keyed=(keyed_handle(64, 127),))
        p = pending(
            storage, topology, {"finished": {0, 1}, "partly": {0}}, acks, asyncio.get_running_loop().create_future()
        )
        coord._pending[p.checkpoint_id] = p
        await coord._finalize(p)
        await coord.close()
        return p.future.result(), coord

    completed, coord = asyncio.run(scenario(), debug=True)
    assert coord.latest is completed
    assert coord.completed == 1
    loaded = storage.load(completed.directory).metadata
    assert loaded == completed.metadata
    assert [op.status for op in loaded.operators] == [
        OperatorStatus.FULLY_FINISHED,
        OperatorStatus.FULLY_FINISHED,
        OperatorStatus.PARTIALLY_FINISHED,
    ]


COUNTED = {
    # Flink CheckpointFailureManager: IO_EXCEPTION, CHECKPOINT_ASYNC_EXCEPTION, CHECKPOINT_DECLINED,
    # CHECKPOINT_EXPIRED and FINALIZE_CHECKPOINT_FAILURE count; everything else is ignored.
    CheckpointFailureReason.CHECKPOINT_DECLINED: True,
    CheckpointFailureReason.CHECKPOINT_ASYNC_EXCEPTION: True,
    CheckpointFailureReason.CHECKPOINT_EXPIRED: True,
    CheckpointFailureReason.FINALIZE_CHECKPOINT_FAILURE: True,
    CheckpointFailureReason.NOT_ALL_REQUIRED_TASKS_RUNNING: False,
    CheckpointFailureReason.TASK_CHECKPOINT_FAILURE: False,
    CheckpointFailureReason.CHECKPOINT_DECLINED_TASK_CLOSING: False,
    CheckpointFailureReason.JOB_FAILOVER: False,
    CheckpointFailureReason.COORDINATOR_SHUTDOWN: False,
    CheckpointFailureReason.CHECKPOINT_SUBSUMED: False,
}


def test_every_failure_reason_has_a_decided_count() -> None:
    assert set(COUNTED) == set(CheckpointFailureReason)


@pytest.mark.parametrize("reason", list(CheckpointFailureReason), ids=lambda r: r.value)
def test_failure_reason_counted_matches_flink(reason: CheckpointFailureReason) -> None:
    assert reason.counted is COUNTED[reason]
