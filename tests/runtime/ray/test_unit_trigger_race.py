"""Rule B7 on Ray, deterministically: a trigger that reaches a worker whose task has just finished (its
FINISHED still on the way to the driver). The coordinator and the driver's gateways are the real ones; the
actors are scripted fakes, so no Ray and no timing is involved.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from keystate.runtime.checkpoint_protocol import CheckpointFailureReason, SubtaskSnapshot
from keystate.runtime.config import CheckpointConfig
from keystate.runtime.coordinator import CheckpointCoordinator
from keystate.runtime.errors import CheckpointFailedError, StopWithSavepointError
from keystate.runtime.executor import open_checkpoint_storage
from keystate.runtime.plan import SubtaskId, SubtaskStatus
from keystate.runtime.ray._driver import RayDeployment, RemoteTask
from keystate.runtime.ray._messages import snapshot_to_json
from keystate.storage.format.metadata import CheckpointKind, OperatorStatus
from keystate.storage.format.topology import InputEdge, Partitioning, Topology, TopologyOperator

SRC0, SRC1, DOWN = SubtaskId("src", 0), SubtaskId("src", 1), SubtaskId("down", 0)
TOPOLOGY = Topology((
    TopologyOperator("src", 2),
    TopologyOperator("down", 1, None, (InputEdge("src", Partitioning.REBALANCE),)),
))  # fmt: skip


class _Method:
    def __init__(self, actor: FakeActor, name: str) -> None:
        self._actor, self._name = actor, name

    async def remote(self, *args: Any) -> Any:
        return self._actor.call(self._name, *args)


class FakeActor:
    """A subtask's actor: records every control message; a trigger is taken (and the barrier acknowledged
    by this task and, for a source, by ``down``) unless the task finished."""

    def __init__(self, sub: SubtaskId, world: World) -> None:
        self.sub, self.world = sub, world
        self.finished = False
        self.calls: list[tuple[str, int]] = []

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, name)

    def call(self, name: str, checkpoint_id: int, *rest: Any) -> Any:
        self.calls.append((name, checkpoint_id))
        if name != "trigger":
            return None
        if self.finished:
            return "finished"  # TaskState.FINISHED: it finished before the trigger arrived
        loop = asyncio.get_running_loop()
        for sub in (self.sub, DOWN) if self.sub.uid == "src" else (self.sub,):
            loop.call_soon(self.world.ack, sub, checkpoint_id)
        return None


class World:
    def __init__(self, tmp_path: Path, *, tolerable: int = 0) -> None:
        config = CheckpointConfig(storage=str(tmp_path), tolerable_failed_checkpoints=tolerable)
        self.fatal: list[BaseException] = []
        self.coordinator = CheckpointCoordinator(
            job_id="0" * 32,
            topology=TOPOLOGY,
            storage=open_checkpoint_storage(config, observed=True),
            config=config,
            on_fatal=self.fatal.append,
        )
        self.actors = {sub: FakeActor(sub, self) for sub in (SRC0, SRC1, DOWN)}
        run: Any = SimpleNamespace(coordinator=self.coordinator, job_id="0" * 32)
        self.deployment = RayDeployment(run, dict(self.actors))
        for task in self.deployment.tasks.values():
            task._on_event(("running",))
        self.coordinator.attach(dict(self.deployment.gateways))

    def task(self, sub: SubtaskId) -> RemoteTask:
        return self.deployment.tasks[sub]

    def ack(self, sub: SubtaskId, checkpoint_id: int) -> None:
        self.task(sub)._on_event(("ack", checkpoint_id, snapshot_to_json(SubtaskSnapshot())))

    def finish_unseen(self, sub: SubtaskId) -> None:
        """The task finishes in its worker; the driver has not heard of it yet (its event is on the way)."""
        self.actors[sub].finished = True
        assert self.task(sub).status is SubtaskStatus.RUNNING

    def sent(self, name: str, checkpoint_id: int) -> set[SubtaskId]:
        return {sub for sub, actor in self.actors.items() if (name, checkpoint_id) in actor.calls}

    async def quiet(self) -> None:
        for _ in range(10):  # let the ordered control messages of every gateway go out
            await asyncio.gather(*(t._last for t in self.deployment.tasks.values() if t._last is not None))
            await asyncio.sleep(0)


def test_a_trigger_that_reaches_a_finished_task_aborts_uncounted_and_the_next_plan_leaves_it_out(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        world = World(tmp_path, tolerable=0)  # a counted failure would fail the job at once
        failures: list[tuple[int, CheckpointFailureReason]] = []
        world.coordinator.failure_listeners.append(lambda cid, reason, _m: failures.append((cid, reason)))
        world.finish_unseen(SRC1)

        with pytest.raises(CheckpointFailedError, match=r"task src\[1\] received a checkpoint request after it "
                                                        r"finished") as raised:  # fmt: skip
            await world.coordinator.trigger()
        assert raised.value.reason is CheckpointFailureReason.TASK_CHECKPOINT_FAILURE
        assert not raised.value.reason.counted
        assert failures == [(1, CheckpointFailureReason.TASK_CHECKPOINT_FAILURE)]
        assert world.fatal == [], "the race is not counted against the tolerance"
        assert world.task(SRC1).status is SubtaskStatus.FINISHED, "the refusal already told the driver"
        await world.quiet()
        assert world.sent("notify_aborted", 1) == {SRC0, DOWN}, "the running tasks hear of the abort"

        completed = await world.coordinator.trigger()
        await world.quiet()
        assert completed.checkpoint_id == 2
        assert world.sent("trigger", 2) == {SRC0}, "a fresh plan: the finished task is not asked again"
        assert world.sent("notify_complete", 2) == {SRC0, DOWN}
        src = next(op for op in completed.metadata.operators if op.uid == "src")
        assert src.status is OperatorStatus.PARTIALLY_FINISHED
        await world.coordinator.close()

    asyncio.run(scenario())


def test_a_stop_with_savepoint_that_meets_the_race_is_triggered_again_and_no_task_fails(tmp_path: Path) -> None:
    async def scenario() -> None:
        world = World(tmp_path)
        world.finish_unseen(SRC1)

        savepoint = await world.coordinator.stop_with_savepoint(drain=True)
        await world.quiet()

        assert savepoint.checkpoint_id == 2, "savepoint 1 met the race, savepoint 2 is its retry"
        assert savepoint.kind is CheckpointKind.SAVEPOINT
        assert world.sent("trigger", 1) == {SRC0, SRC1}
        assert world.sent("trigger", 2) == {SRC0}
        # A task told that its synchronous savepoint was aborted fails over (rule G4): the aborted attempt
        # is not notified, its tasks take the retry and finish on its completion.
        assert world.sent("notify_aborted", 1) == set()
        assert world.sent("notify_complete", 2) == {SRC0, DOWN}
        assert world.fatal == []
        await world.coordinator.close()

    asyncio.run(scenario())


def test_a_stop_with_savepoint_that_fails_otherwise_after_the_race_tells_the_tasks_and_gives_up(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        world = World(tmp_path)
        world.finish_unseen(SRC1)
        refuse = world.actors[SRC1].call

        def refuse_while_down_fails(name: str, checkpoint_id: int, *rest: Any) -> Any:
            world.task(DOWN)._status = SubtaskStatus.NOT_RUNNING  # down failed meanwhile: no retry can plan
            return refuse(name, checkpoint_id, *rest)

        world.actors[SRC1].call = refuse_while_down_fails  # type: ignore[method-assign]

        with pytest.raises(StopWithSavepointError, match=r"Stop-with-savepoint failed: .*not being executed"):
            await world.coordinator.stop_with_savepoint(drain=True)
        await world.quiet()
        assert world.sent("trigger", 1) == {SRC0, SRC1}
        assert world.sent("trigger", 2) == set(), "the retry was rejected before any trigger"
        # src[0] took savepoint 1 and stopped: once the stop-with-savepoint gives up it is told (rule G4).
        assert world.sent("notify_aborted", 1) == {SRC0}
        await world.coordinator.close()

    asyncio.run(scenario())
