"""What the Ray executor ships as JSON (acknowledgements, restores) and what it refuses to ship (no Ray needed).

An acknowledgement is untrusted input to the driver: every malformed one (truncated, corrupted, hostile)
is refused with one :class:`AcknowledgementError` naming the subtask, the checkpoint, the field, what was
expected and what was found, and the driver declines that checkpoint instead of handing anything to the
coordinator or the shared-state registry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from keystate.runtime import JobGraph, Operator, SequenceSource
from keystate.runtime.checkpoint_protocol import CheckpointFailureReason, SubtaskSnapshot
from keystate.runtime.errors import CheckpointFailedError
from keystate.runtime.ray import AcknowledgementError
from keystate.runtime.ray._messages import _FIELDS, MAX_ACKNOWLEDGEMENT_CHARS, snapshot_from_json, snapshot_to_json
from keystate.storage.errors import MetadataError
from keystate.storage.format.keygroups import KeyGroupRange
from keystate.storage.format.metadata import HandleScope, KeyedStateHandle, StreamHandle
from keystate.storage.format.statefile import Compression
from tests.runtime.ray.test_unit_trigger_race import SRC1, World

SUB, CID = "counts[1]", 9
MEANING = "the worker runs a keystate version other than the driver's"


def _parse(text: object) -> SubtaskSnapshot:
    return snapshot_from_json(text, subtask=SUB, checkpoint_id=CID)


def _snapshot() -> SubtaskSnapshot:
    stream = StreamHandle(HandleScope.EXCLUSIVE, 400, 400, "xxh3-64:" + "0" * 16, Compression.NONE, path="op/0/keyed-1")
    keyed = KeyedStateHandle(KeyGroupRange(0, 3), (8, 20, 40, 60), stream)
    return SubtaskSnapshot(
        keyed=(keyed,), finished_operators=True, incremental=True, based_on=7, sync_duration_ms=3, async_duration_ms=9
    )


def _doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(snapshot_to_json(_snapshot()))
    return doc


def _refused(text: object, *fragments: str) -> AcknowledgementError:
    with pytest.raises(AcknowledgementError) as refused:
        _parse(text)
    message = str(refused.value)
    assert message.startswith(f"acknowledgement of checkpoint {CID} by {SUB}: "), message
    assert MEANING in message, message
    assert "\n" not in message, "one line"
    for fragment in fragments:
        assert fragment in message, message
    assert isinstance(refused.value, MetadataError), "part of the keystate tree (a FormatError, a ValueError)"
    assert (refused.value.subtask, refused.value.checkpoint_id) == (SUB, CID)
    return refused.value


def _with(path: str, value: Any) -> str:
    """The valid acknowledgement with the field at ``path`` (``"snapshot.based_on"``) set to ``value``."""
    doc = _doc()
    *parents, last = path.split(".")
    target: Any = doc
    for name in parents:
        target = target[int(name)] if name.isdigit() else target[name]
    target[int(last) if last.isdigit() else last] = value
    return json.dumps(doc)


def test_every_snapshot_field_is_in_the_wire_layout() -> None:
    assert list(_FIELDS) == [f.name for f in dataclasses.fields(SubtaskSnapshot)], "a new field needs a new version"
    assert list(_doc()["snapshot"]) == list(_FIELDS)


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
    assert _parse(text) == snapshot
    assert _parse(snapshot_to_json(SubtaskSnapshot())) == SubtaskSnapshot()  # None, ()
    assert _parse(snapshot_to_json(SubtaskSnapshot(finished_on_restore=True))) == SubtaskSnapshot(
        finished_on_restore=True
    )


def test_an_acknowledgement_of_an_unknown_version_is_refused() -> None:
    _refused(_with("format_version", 99), "field 'format_version' must be 1", "found 99")
    _refused(_with("format_version", True), "field 'format_version'", "found True")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("", ["the message is empty"]),
        ("   ", ["the message is empty"]),
        (b"{}", ["expected JSON text, found bytes"]),
        (None, ["expected JSON text, found NoneType"]),
        ("[]", ["field '(document)' must be a JSON object, found an array of 0"]),
        ('"ack"', ["field '(document)' must be a JSON object, found 'ack'"]),
        ('{"format_version": 1}', ["(document): required field 'snapshot' is missing"]),
        ('{"format_version": 1, "snapshot": []}', ["field 'snapshot' must be an object, found an array of 0"]),
    ],
)
def test_not_an_acknowledgement_is_refused(text: object, fragments: list[str]) -> None:
    _refused(text, *fragments)


def test_a_truncated_acknowledgement_is_refused() -> None:
    text = snapshot_to_json(_snapshot())
    for cut in (1, len(text) // 3, len(text) // 2, len(text) - 1):
        _refused(text[:cut], "not valid JSON at line 1", "truncated or garbled")


def test_a_corrupted_acknowledgement_is_refused() -> None:
    text = snapshot_to_json(_snapshot())
    _refused(text.replace(":", ";", 1), "not valid JSON")  # a flipped byte in the syntax
    _refused(text.replace('"keyed"', '"keyet"', 1), "snapshot: required field 'keyed' is missing")
    _refused(text.replace('"size":400', '"size":"400"', 1), "invalid state handle", "keyed[0]", "'size'")
    _refused(text.replace('"key_groups":[0,3]', '"key_groups":[0,2]', 1), "invalid state handle", "keyed[0]")


@pytest.mark.parametrize(
    ("path", "value", "fragments"),
    [
        ("snapshot.based_on", "abc", ["field 'based_on' must be an integer id or null, found 'abc'"]),
        ("snapshot.based_on", 7.0, ["field 'based_on' must be an integer id or null, found 7.0"]),
        ("snapshot.based_on", True, ["field 'based_on' must be an integer id or null, found True"]),
        ("snapshot.based_on", -1, ["field 'based_on' must be an integer in 0..", "found -1"]),
        ("snapshot.based_on", CID, [f"field 'based_on' must be an older checkpoint than {CID}, found {CID}"]),
        ("snapshot.based_on", 1 << 70, ["field 'based_on' must be an integer in 0..9223372036854775807"]),
        ("snapshot.sync_duration_ms", -4, ["field 'sync_duration_ms' must be an integer in 0..", "found -4"]),
        ("snapshot.async_duration_ms", "9", ["field 'async_duration_ms' must be an integer, found '9'"]),
        ("snapshot.alignment_duration_ms", None, ["field 'alignment_duration_ms' must be an integer, found None"]),
        ("snapshot.alignment_duration_ms", 1.5, ["field 'alignment_duration_ms' must be an integer, found 1.5"]),
        ("snapshot.incremental", 1, ["field 'incremental' must be true or false, found 1"]),
        ("snapshot.finished_operators", "false", ["field 'finished_operators' must be true or false, found 'false'"]),
        ("snapshot.keyed", {}, ["field 'keyed' must be an array, found an object"]),
        ("snapshot.operator", "x", ["field 'operator' must be an array, found 'x'"]),
        ("snapshot.keyed.0", {"format_version": 2}, ["field 'keyed[0]' must be an object {\"handle\""]),
        ("snapshot.keyed.0.handle", [], ["invalid state handle", "must be an object, found list"]),
        ("snapshot.keyed.0.handle.handle", "operator", ["invalid state handle", "keyed[0]", "'handle'"]),
        ("snapshot.keyed.0.handle.format_version", 3, ["invalid state handle", "keyed[0]", "format_version 3"]),
        ("snapshot.keyed.0.handle.stream.path", "../../etc/passwd", ["invalid state handle", "keyed[0]"]),
        ("snapshot.surprise", 1, ["snapshot: unknown field 'surprise' (expected only: keyed, operator"]),
        ("extra", 1, ["(document): unknown field 'extra'"]),
    ],
)
def test_a_field_of_the_wrong_type_or_range_is_refused(path: str, value: Any, fragments: list[str]) -> None:
    _refused(_with(path, value), *fragments)


def test_fields_that_contradict_each_other_are_refused() -> None:
    doc = _doc()
    doc["snapshot"]["incremental"] = False
    _refused(json.dumps(doc), "field 'based_on' must be null in a snapshot that is not incremental, found 7")
    doc = _doc()
    doc["snapshot"].update(finished_on_restore=True, based_on=None)
    _refused(json.dumps(doc), "field 'finished_on_restore' must be false in a snapshot with state")


def test_a_missing_field_is_refused() -> None:
    for field in _FIELDS:
        doc = _doc()
        del doc["snapshot"][field]
        _refused(json.dumps(doc), f"snapshot: required field {field!r} is missing")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('{"format_version": NaN, "snapshot": {}}', ["not valid JSON", "NaN is not a JSON number"]),
        ('{"format_version": 1, "snapshot": {"based_on": Infinity}}', ["Infinity is not a JSON number"]),
        ('{"format_version": 1, "format_version": 1, "snapshot": {}}', ["duplicate key 'format_version'"]),
        ('{"format_version": 1, "snapshot": ' + "[" * 100_000 + "]" * 100_000 + "}", ["RecursionError"]),
        ('{"format_version": ' + "9" * 5000 + ', "snapshot": {}}', ["not valid JSON (ValueError"]),
        ("[" * 1_100_000, ["JSON objects and arrays, over the limit"]),
        (" " * (MAX_ACKNOWLEDGEMENT_CHARS + 1) + "{}", [f"over the limit of {MAX_ACKNOWLEDGEMENT_CHARS}"]),
    ],
    ids=["nan", "infinity", "duplicate-key", "deeply-nested", "huge-number", "many-containers", "huge"],
)
def test_hostile_input_is_refused_before_it_costs_much(text: str, fragments: list[str]) -> None:
    _refused(text, *fragments)


def test_a_huge_value_is_shown_shortened() -> None:
    error = _refused(_with("snapshot.based_on", "x" * 100_000), "field 'based_on'")
    assert len(str(error)) < 600


def test_the_driver_declines_a_checkpoint_whose_acknowledgement_it_cannot_read(tmp_path: Path) -> None:
    """Nothing of a bad acknowledgement reaches the coordinator's pending checkpoint or the shared registry:
    the checkpoint is declined (counted) with the parser's message and the next one completes."""

    async def scenario() -> None:
        world = World(tmp_path, tolerable=1)
        good = world.ack

        def ack(sub: Any, checkpoint_id: int) -> None:
            if sub == SRC1 and checkpoint_id == 1:
                bad = _with("snapshot.sync_duration_ms", -4)
                world.task(sub)._on_event(("ack", checkpoint_id, bad))
            else:
                good(sub, checkpoint_id)

        world.ack = ack  # type: ignore[method-assign]
        registered: list[Any] = []
        world.coordinator.store.registry.acknowledged = lambda *a, **k: registered.append(a)  # type: ignore[method-assign]
        with pytest.raises(CheckpointFailedError) as failed:
            await world.coordinator.trigger()
        assert failed.value.reason is CheckpointFailureReason.CHECKPOINT_ASYNC_EXCEPTION
        assert "acknowledgement of checkpoint 1 by src[1]: field 'sync_duration_ms'" in str(failed.value)
        assert all(a[1] != SRC1 for a in registered), "the bad acknowledgement never reached the registry"
        assert world.fatal == [], "one failed checkpoint is within the tolerance"
        completed = await world.coordinator.trigger()
        assert completed.checkpoint_id == 2
        await world.quiet()
        await world.coordinator.close()

    asyncio.run(scenario())


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
