"""What the Ray executor ships as JSON (acknowledgements, restores) and what it refuses to ship (no Ray needed)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from keystate.runtime import JobGraph, Operator, SequenceSource
from keystate.runtime.checkpoint_protocol import SubtaskSnapshot
from keystate.runtime.ray._messages import snapshot_from_json, snapshot_to_json
from keystate.storage.format.metadata import HandleScope, KeyedStateHandle


def test_an_acknowledgement_survives_the_trip_as_json() -> None:
    from keystate.storage.format.keygroups import KeyGroupRange
    from keystate.storage.format.metadata import StreamHandle
    from keystate.storage.format.statefile import Compression

    stream = StreamHandle(HandleScope.EXCLUSIVE, 400, 400, "xxh3-64:" + "0" * 16, Compression.NONE, path="op/0/keyed-1")
    keyed = KeyedStateHandle(KeyGroupRange(0, 3), (8, 20, 40, 60), stream)
    snapshot = SubtaskSnapshot(
        keyed=(keyed,), finished_operators=True, incremental=True, based_on=7, sync_duration_ms=3, async_duration_ms=9
    )
    text = snapshot_to_json(snapshot)
    assert isinstance(json.loads(text), dict)  # plain JSON, no pickle
    assert snapshot_from_json(text, where="test") == snapshot
    assert snapshot_from_json(snapshot_to_json(SubtaskSnapshot()), where="test") == SubtaskSnapshot()  # None, ()


def test_an_acknowledgement_of_an_unknown_version_is_refused() -> None:
    with pytest.raises(ValueError, match="not an acknowledgement of format version 1"):
        snapshot_from_json(json.dumps({"format_version": 99, "snapshot": {}}), where="test")


class Unpicklable(Operator):
    def __init__(self) -> None:
        self.lock = threading.Lock()  # a lock cannot be pickled

    def process(self, record: Any, input_index: int) -> None:
        self.ctx.emit(record)


def test_an_operator_ray_cannot_pickle_is_named_before_the_job_starts(tmp_path: Path) -> None:
    from keystate.runtime.config import CheckpointConfig, JobConfig
    from keystate.runtime.executor import NotShippableError
    from keystate.runtime.ray import RayExecutor

    job = JobGraph("bad")
    job.source(SequenceSource(10), uid="numbers").transform(Unpicklable(), uid="locked").sink(_Sink(), uid="sink")
    config = JobConfig(checkpoint=CheckpointConfig(storage=str(tmp_path)), executor=RayExecutor())
    with pytest.raises(NotShippableError, match=r"'locked' \(operator Unpicklable\) cannot be shipped to a Ray worker"):
        RayExecutor().check(job, config)


class _Sink(Operator):
    def process(self, record: Any, input_index: int) -> None:
        pass
