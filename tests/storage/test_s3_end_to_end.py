"""Checkpoints on S3 end to end, over real HTTP against moto's threaded server.

Each test writes through the public checkpoint API (state streams first, ``_metadata`` last and
create-only) and reads back through a *fresh* storage object, so nothing is served from memory.
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest

from keystate.storage import (
    CheckpointKind,
    CheckpointMetadata,
    CheckpointStorage,
    CheckpointWriter,
    CommitConflictError,
    CompletedCheckpoint,
    CompletedCheckpointStore,
    DistributionMode,
    HandleScope,
    InputEdge,
    KeyedStateHandle,
    KeyGroupRange,
    OperatorState,
    OperatorStateEntry,
    OperatorStateHandle,
    Partitioning,
    S3ObjectStore,
    StreamHandle,
    SubtaskState,
    key_group_range_for_subtask,
    open_storage,
)
from keystate.storage.format import dump_metadata

JOB = "5e1f0c3a9b7d4e2f8a6c1b3d5e7f9a0b"
MAX_PARALLELISM = 8
PARALLELISM = 2
MIB = 1024 * 1024
PART_SIZE = 5 * MIB
PREFIX = "tenant/checkpoints"


@dataclass
class Written:
    """What a test wrote: the metadata it committed and the raw bytes behind every handle."""

    metadata: CheckpointMetadata
    keyed: dict[tuple[int, int], bytes] = field(default_factory=dict)
    """(subtask, key group) -> raw bytes of that key group."""
    elements: dict[int, list[bytes]] = field(default_factory=dict)
    """subtask -> operator-state elements."""


@functools.cache
def raw_client(endpoint: str) -> Any:
    """A plain client, without keystate's configuration, to look at the bucket directly."""
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def keys_under(endpoint: str, bucket: str, prefix: str) -> list[str]:
    pages = raw_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def multipart_uploads(endpoint: str, bucket: str) -> list[str]:
    return [u["Key"] for u in raw_client(endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def s3_storage(endpoint: str, bucket: str) -> CheckpointStorage:
    return CheckpointStorage(S3ObjectStore(bucket, "", endpoint_url=endpoint, part_size=PART_SIZE), base=PREFIX)


def write_keyed(
    writer: CheckpointWriter, hint: str, key_groups: KeyGroupRange, data: dict[int, bytes]
) -> KeyedStateHandle:
    """One keyed state file: a block boundary at every key group, its offset recorded in the handle."""
    with writer.open_stream(hint) as stream:
        offsets = []
        for kg in key_groups:
            offsets.append(stream.start_block())
            stream.write(data[kg])
        handle = stream.close()
    return KeyedStateHandle(key_groups, tuple(offsets), handle)


def write_operator(writer: CheckpointWriter, hint: str, elements: list[bytes]) -> OperatorStateHandle:
    with writer.open_stream(hint) as stream:
        offsets = []
        for element in elements:
            offsets.append(stream.tell())
            stream.write(element)
        handle = stream.close()
    entry = OperatorStateEntry("offsets", DistributionMode.SPLIT, tuple(offsets), "bytes")
    return OperatorStateHandle((entry,), handle)


def write_state(
    writer: CheckpointWriter, *, timestamp: int, big_key_group_bytes: int = 0, shared: StreamHandle | None = None
) -> Written:
    """Write a two-operator job's state with one thread per stream, then build (not commit) its metadata.

    ``source`` has operator state: subtask 0 small enough to be inlined, subtask 1 a file. ``counts``
    has keyed state: subtask 0 small key groups (one of them empty), subtask 1 key groups of
    ``big_key_group_bytes`` random bytes each when given (a multipart upload), else medium ones.
    """
    keyed: dict[tuple[int, int], bytes] = {}
    for index in range(PARALLELISM):
        for kg in key_group_range_for_subtask(MAX_PARALLELISM, PARALLELISM, index):
            if index == 1 and big_key_group_bytes:
                keyed[index, kg] = os.urandom(big_key_group_bytes)
            elif kg == 2:
                keyed[index, kg] = b""
            else:
                keyed[index, kg] = os.urandom(500 if index == 0 else 9_000)
    elements = {0: [b"offset-0", b"offset-17"], 1: [os.urandom(4_000) for _ in range(8)]}

    def keyed_job(index: int) -> KeyedStateHandle:
        key_groups = key_group_range_for_subtask(MAX_PARALLELISM, PARALLELISM, index)
        return write_keyed(writer, f"counts/{index}/keyed", key_groups, {kg: keyed[index, kg] for kg in key_groups})

    def operator_job(index: int) -> OperatorStateHandle:
        return write_operator(writer, f"source/{index}/operator", elements[index])

    with ThreadPoolExecutor(4) as pool:
        keyed_handles = list(pool.map(keyed_job, range(PARALLELISM)))
        operator_handles = list(pool.map(operator_job, range(PARALLELISM)))
    source_subtasks = [SubtaskState(i, operator=(operator_handles[i],)) for i in range(PARALLELISM)]
    if shared is not None:
        entry = OperatorStateEntry("shared", DistributionMode.UNION, (0,), "bytes")
        source_subtasks[0] = SubtaskState(0, operator=(operator_handles[0], OperatorStateHandle((entry,), shared)))
    metadata = CheckpointMetadata(
        checkpoint_id=writer.checkpoint_id,
        job_id=JOB,
        kind=writer.kind,
        timestamp=timestamp,
        operators=(
            OperatorState("source", PARALLELISM, 128, subtasks=tuple(source_subtasks)),
            OperatorState(
                "counts",
                PARALLELISM,
                MAX_PARALLELISM,
                (InputEdge("source", Partitioning.HASH),),
                subtasks=tuple(SubtaskState(i, keyed=(keyed_handles[i],)) for i in range(PARALLELISM)),
            ),
        ),
    )
    return Written(metadata, keyed, elements)


def checkpoint(storage: CheckpointStorage, checkpoint_id: int, **options: Any) -> tuple[CompletedCheckpoint, Written]:
    writer = storage.begin_checkpoint(JOB, checkpoint_id)
    written = write_state(writer, timestamp=1_700_000_000_000 + checkpoint_id, **options)
    return writer.commit(written.metadata), written


def assert_restores(completed: CompletedCheckpoint, written: Written, *, full_keyed_ranges: bool = True) -> None:
    """Every handle reads back fully (size and checksums verified) and equals what was written."""
    assert completed.metadata == written.metadata
    assert dump_metadata(completed.metadata) == dump_metadata(written.metadata)
    counts = completed.metadata.operator("counts")
    source = completed.metadata.operator("source")
    assert counts is not None
    assert source is not None
    for st in counts.subtasks:
        (keyed,) = st.keyed
        reader = completed.open_state(keyed.stream)
        assert reader.read_all() == b"".join(written.keyed[st.index, kg] for kg in keyed.key_groups)
        assert reader.verify() == keyed.stream.raw_size
        for kg in keyed.key_groups if full_keyed_ranges else ():
            start, end = keyed.offset_range(kg)
            assert b"".join(completed.open_state(keyed.stream).iter_range(start, end)) == written.keyed[st.index, kg]
    for st in source.subtasks:
        reader = completed.open_state(st.operator[0].stream)
        assert reader.read_all() == b"".join(written.elements[st.index])
        assert reader.verify() == st.operator[0].stream.raw_size


def test_checkpoint_with_a_multipart_stream_round_trips(moto_endpoint: str, server_bucket: str) -> None:
    storage = s3_storage(moto_endpoint, server_bucket)
    assert isinstance(storage.store, S3ObjectStore)
    chk_dir = f"{PREFIX}/{JOB}/chk-1/"
    uploaded_parts: list[int] = []
    # (open multipart uploads, visible objects) seen from outside while the first part is uploaded.
    seen_during_upload: list[tuple[list[str], list[str]]] = []

    def on_part(params: dict[str, Any], **_: Any) -> None:
        uploaded_parts.append(params["PartNumber"])
        if params["PartNumber"] == 1:
            uploads = multipart_uploads(moto_endpoint, server_bucket)
            seen_during_upload.append((uploads, keys_under(moto_endpoint, server_bucket, chk_dir)))

    storage.store.client.meta.events.register("provide-client-params.s3.UploadPart", on_part)
    big = 3 * MIB  # 4 key groups of 3 MiB of random bytes: a ~12 MiB state file, 3 parts of 5 MiB
    completed, written = checkpoint(storage, 1, big_key_group_bytes=big)

    counts = written.metadata.operator("counts")
    assert counts is not None
    big_handle = counts.subtasks[1].keyed[0].stream
    assert big_handle.path is not None
    assert big_handle.size > 4 * big, "random bytes do not compress"
    assert sorted(uploaded_parts) == list(range(1, -(-big_handle.size // PART_SIZE) + 1)) == [1, 2, 3]
    [(uploads, visible)] = seen_during_upload
    assert uploads == [chk_dir + big_handle.path], "the big stream went to a multipart upload"
    assert chk_dir + big_handle.path not in visible, "an object is invisible until its upload completes"
    assert f"{chk_dir}_metadata" not in visible
    assert multipart_uploads(moto_endpoint, server_bucket) == []

    # Small streams were inlined; the others are objects of exactly the handle's size.
    source = written.metadata.operator("source")
    assert source is not None
    assert source.subtasks[0].operator[0].stream.scope is HandleScope.INLINE
    sizes = {
        obj["Key"]: obj["Size"]
        for obj in raw_client(moto_endpoint).list_objects_v2(Bucket=server_bucket, Prefix=chk_dir)["Contents"]
    }
    files = {chk_dir + h.path: h.size for h in written.metadata.handles() if h.path is not None}
    assert sizes == {**files, f"{chk_dir}_metadata": len(dump_metadata(written.metadata))}

    fresh = open_storage(f"s3://{server_bucket}/{PREFIX}", endpoint_url=moto_endpoint)
    [pointer] = fresh.discover()
    assert (pointer.kind, pointer.checkpoint_id) == (CheckpointKind.CHECKPOINT, 1)
    restored = fresh.load(pointer.directory)
    assert restored.location == completed.location == f"s3://{server_bucket}/{PREFIX}/{JOB}/chk-1"
    assert_restores(restored, written, full_keyed_ranges=False)

    # A rescaled restore reads one key group of the big file: the header, then from that key group on.
    assert isinstance(fresh.store, S3ObjectStore)
    ranges: list[str] = []
    fresh.store.client.meta.events.register(
        "provide-client-params.s3.GetObject", lambda params, **_: ranges.append(params.get("Range", "all"))
    )
    keyed = counts.subtasks[1].keyed[0]
    start, end = keyed.offset_range(6)
    assert b"".join(restored.open_state(keyed.stream).iter_range(start, end)) == written.keyed[1, 6]
    assert ranges == ["bytes=0-7", f"bytes={start}-"]


def test_second_writer_of_the_same_checkpoint_conflicts(moto_endpoint: str, server_bucket: str) -> None:
    first = s3_storage(moto_endpoint, server_bucket)
    second = s3_storage(moto_endpoint, server_bucket)
    completed, written = checkpoint(first, 3)
    loser_writer = second.begin_checkpoint(JOB, 3)
    loser = write_state(loser_writer, timestamp=1_800_000_000_000)
    with pytest.raises(CommitConflictError, match="already committed by another writer") as info:
        loser_writer.commit(loser.metadata)
    assert isinstance(info.value, FileExistsError)
    reloaded = open_storage(f"s3://{server_bucket}/{PREFIX}", endpoint_url=moto_endpoint).load(completed.directory)
    assert reloaded.metadata == written.metadata, "the first commit stays"
    assert_restores(reloaded, written)


def test_concurrent_commits_of_one_checkpoint_have_exactly_one_winner(moto_endpoint: str, server_bucket: str) -> None:
    barrier = threading.Barrier(2)
    results: dict[int, CompletedCheckpoint | BaseException] = {}
    candidates: dict[int, Written] = {}

    def attempt(i: int) -> None:
        storage = s3_storage(moto_endpoint, server_bucket)
        writer = storage.begin_checkpoint(JOB, 4)
        candidates[i] = write_state(writer, timestamp=1_700_000_000_000 + i)
        barrier.wait()
        try:
            results[i] = writer.commit(candidates[i].metadata)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in results.items() if isinstance(r, CompletedCheckpoint)]
    losers = [i for i, r in results.items() if isinstance(r, CommitConflictError)]
    assert len(winners) == 1, results
    assert len(losers) == 1, results
    reloaded = open_storage(f"s3://{server_bucket}/{PREFIX}", endpoint_url=moto_endpoint).load(f"{PREFIX}/{JOB}/chk-4")
    assert_restores(reloaded, candidates[winners[0]])


def test_savepoint_is_self_contained_and_relocatable(moto_endpoint: str, server_bucket: str) -> None:
    storage = s3_storage(moto_endpoint, server_bucket)
    writer = storage.begin_savepoint(JOB, 12)
    with writer.open_stream("source/0/shared-state", HandleScope.SHARED) as stream:
        stream.write(os.urandom(30_000))
        requested_shared = stream.close()
    assert requested_shared.scope is HandleScope.EXCLUSIVE, "a savepoint keeps every file inside itself"
    written = write_state(writer, timestamp=1_700_000_000_000)
    completed = writer.commit(written.metadata)

    fresh = open_storage(f"s3://{server_bucket}/{PREFIX}", endpoint_url=moto_endpoint)
    [pointer] = fresh.discover()
    assert pointer.kind is CheckpointKind.SAVEPOINT
    assert pointer.directory == completed.directory
    assert pointer.directory.startswith(f"{PREFIX}/savepoints/savepoint-{JOB[:6]}-")
    assert_restores(fresh.load(pointer.directory), written)
    assert keys_under(moto_endpoint, server_bucket, f"{PREFIX}/{JOB}/") == [], "nothing outside the savepoint"

    # Copy it elsewhere in the bucket: it loads and verifies from there.
    client = raw_client(moto_endpoint)
    name = pointer.directory.rsplit("/", 1)[1]
    for key in keys_under(moto_endpoint, server_bucket, pointer.directory + "/"):
        target = f"moved/{name}/{key[len(pointer.directory) + 1 :]}"
        client.copy_object(Bucket=server_bucket, Key=target, CopySource={"Bucket": server_bucket, "Key": key})
    moved = open_storage(f"s3://{server_bucket}/moved/{name}", endpoint_url=moto_endpoint).resolve()
    assert moved.location == f"s3://{server_bucket}/moved/{name}"
    assert_restores(moved, written)


def test_discover_and_latest_over_http_from_aws_endpoint_url(
    monkeypatch: pytest.MonkeyPatch, moto_endpoint: str, server_bucket: str
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    storage = open_storage(f"s3://{server_bucket}/{PREFIX}")
    written = {cid: checkpoint(storage, cid)[1] for cid in (1, 2, 10)}
    incomplete = storage.begin_checkpoint(JOB, 11)  # state files but no _metadata: never reported
    write_state(incomplete, timestamp=1_700_000_000_011)
    savepoint = storage.begin_savepoint(JOB, 10)
    savepoint.commit(write_state(savepoint, timestamp=1_600_000_000_000).metadata)

    fresh = open_storage(f"s3://{server_bucket}/{PREFIX}")
    found = [(p.kind, p.checkpoint_id) for p in fresh.discover()]
    checkpoints = [(CheckpointKind.CHECKPOINT, cid) for cid in (10, 2, 1)]
    assert found == [*checkpoints, (CheckpointKind.SAVEPOINT, None)]
    assert [p.checkpoint_id for p in fresh.list_checkpoints(JOB)] == [10, 2, 1]
    assert [p.kind for p in fresh.discover("savepoints")] == [CheckpointKind.SAVEPOINT]
    latest = fresh.latest()
    assert latest is not None
    assert latest.checkpoint_id == 10
    assert latest.kind is CheckpointKind.CHECKPOINT, "newest by timestamp: the savepoint is older"
    assert_restores(latest, written[10])
    assert fresh.resolve(JOB).checkpoint_id == 10
    assert fresh.resolve(f"{JOB}/chk-2/_metadata").checkpoint_id == 2

    assert fresh.cleanup_incomplete(JOB, below=12) == [f"{PREFIX}/{JOB}/chk-11"]
    assert keys_under(moto_endpoint, server_bucket, f"{PREFIX}/{JOB}/chk-11/") == []
    assert [p.checkpoint_id for p in fresh.list_checkpoints(JOB)] == [10, 2, 1]


def test_abort_removes_every_object_and_upload(moto_endpoint: str, server_bucket: str) -> None:
    storage = s3_storage(moto_endpoint, server_bucket)
    checkpoint(storage, 1)
    before = keys_under(moto_endpoint, server_bucket, PREFIX)
    writer = storage.begin_checkpoint(JOB, 2)
    write_state(writer, timestamp=1_700_000_000_002)
    in_flight = writer.open_stream("counts/1/keyed")
    in_flight.write(os.urandom(6 * MIB))  # one part uploaded, the upload still open
    assert len(multipart_uploads(moto_endpoint, server_bucket)) == 1
    assert keys_under(moto_endpoint, server_bucket, f"{PREFIX}/{JOB}/chk-2/")

    writer.abort()
    assert keys_under(moto_endpoint, server_bucket, f"{PREFIX}/{JOB}/chk-2/") == []
    assert multipart_uploads(moto_endpoint, server_bucket) == []
    assert keys_under(moto_endpoint, server_bucket, PREFIX) == before, "the completed checkpoint is untouched"
    assert [p.checkpoint_id for p in s3_storage(moto_endpoint, server_bucket).discover()] == [1]


def test_retention_deletes_subsumed_checkpoints_on_s3(moto_endpoint: str, server_bucket: str) -> None:
    storage = s3_storage(moto_endpoint, server_bucket)
    retained = CompletedCheckpointStore(storage, JOB, num_retained=2)
    job_prefix = f"{PREFIX}/{JOB}/"

    # Checkpoint 1 writes a shared file; checkpoints 2 and 3 reference it again, 4 and 5 do not.
    writer = storage.begin_checkpoint(JOB, 1)
    with writer.open_stream("source/0/shared", HandleScope.SHARED) as stream:
        stream.write(os.urandom(50_000))
        shared = stream.close()
    assert shared.path is not None
    shared_key = f"{job_prefix}shared/{shared.path}"
    written = write_state(writer, timestamp=1_700_000_000_001, shared=shared)
    assert retained.add(writer.commit(written.metadata)) == []

    def directories() -> set[str]:
        return {k[len(job_prefix) :].split("/")[0] for k in keys_under(moto_endpoint, server_bucket, job_prefix)}

    expectations = {
        2: ({"chk-1", "chk-2", "shared"}, []),
        3: ({"chk-2", "chk-3", "shared"}, [1]),
        4: ({"chk-3", "chk-4", "shared"}, [2]),
        5: ({"chk-4", "chk-5"}, [3]),
    }
    for cid, (expected_dirs, expected_discarded) in expectations.items():
        completed, _ = checkpoint(storage, cid, shared=shared if cid <= 3 else None)
        assert [c.checkpoint_id for c in retained.add(completed)] == expected_discarded
        assert directories() == expected_dirs, cid
        assert (shared_key in keys_under(moto_endpoint, server_bucket, job_prefix)) == (cid <= 4)

    recovered = CompletedCheckpointStore(s3_storage(moto_endpoint, server_bucket), JOB, num_retained=2).recover()
    assert [c.checkpoint_id for c in recovered] == [4, 5]
    for c in recovered:
        for handle in c.metadata.handles():
            assert c.open_state(handle).verify() == handle.raw_size
