"""One contract test suite for the byte-level ObjectStore, run against local, memory and S3 (moto)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from keystate.storage import (
    AlreadyExistsError,
    InvalidURIError,
    LocalObjectStore,
    MemoryObjectStore,
    NotFoundError,
    ObjectStore,
    PutMode,
    S3ObjectStore,
    StorageError,
)
from keystate.storage.faults import OPERATIONS, Fault, FaultRule, FaultyObjectStore
from keystate.storage.retry import RetryingObjectStore, RetryPolicy
from tests.conftest import BUCKET


class ObjectStoreContract:
    """Behaviour every ObjectStore must have. Subclasses provide the ``store`` fixture."""

    def test_put_then_get_returns_the_bytes(self, store: ObjectStore) -> None:
        store.put("a/b/c.bin", b"hello")
        assert store.get("a/b/c.bin") == b"hello"
        assert store.size("a/b/c.bin") == 5
        assert store.exists("a/b/c.bin")

    def test_missing_object_is_not_found_everywhere(self, store: ObjectStore) -> None:
        for call in (
            lambda: store.get("nope/x"),
            lambda: store.size("nope/x"),
            lambda: store.get_range("nope/x", 0, 3),
            lambda: store.open_reader("nope/x"),
        ):
            with pytest.raises(NotFoundError) as info:
                call()
            assert isinstance(info.value, FileNotFoundError)
            assert "nope/x" in str(info.value)
        assert not store.exists("nope/x")

    def test_create_only_put_refuses_existing_object(self, store: ObjectStore) -> None:
        store.put("k", b"first", PutMode.CREATE)
        with pytest.raises(AlreadyExistsError) as info:
            store.put("k", b"second", PutMode.CREATE)
        assert isinstance(info.value, FileExistsError)
        assert store.get("k") == b"first"

    def test_overwrite_replaces(self, store: ObjectStore) -> None:
        store.put("k", b"first")
        store.put("k", b"second", PutMode.OVERWRITE)
        assert store.get("k") == b"second"

    def test_delete_missing_is_a_noop_and_delete_removes(self, store: ObjectStore) -> None:
        store.delete("never/there")
        store.put("x/y", b"1")
        store.delete("x/y")
        assert not store.exists("x/y")
        store.delete_many(["x/y", "also/missing"])

    def test_get_range_and_reader(self, store: ObjectStore) -> None:
        data = bytes(range(256)) * 4
        store.put("r", data)
        assert store.get_range("r", 10, 20) == data[10:30]
        assert store.get_range("r", 1000, 100) == data[1000:]
        assert store.get_range("r", 5000, 10) == b""
        reader = store.open_reader("r", 1000)
        try:
            assert reader.read() == data[1000:]
        finally:
            reader.close()

    def test_writer_is_invisible_until_closed(self, store: ObjectStore) -> None:
        writer = store.open_writer("w/obj", PutMode.CREATE)
        writer.write(b"abc")
        writer.write(memoryview(b"def"))
        assert writer.bytes_written == 6
        assert not store.exists("w/obj")
        assert [o.key for o in store.list_objects("w")] == []
        writer.close()
        assert store.get("w/obj") == b"abcdef"

    def test_aborted_writer_leaves_nothing(self, store: ObjectStore) -> None:
        writer = store.open_writer("w/aborted")
        writer.write(b"x" * 100)
        writer.abort()
        writer.abort()
        assert not store.exists("w/aborted")
        assert list(store.list_objects("w")) == []

    def test_writer_context_manager_aborts_on_error(self, store: ObjectStore) -> None:
        def write_then_fail() -> None:
            with store.open_writer("w/ctx") as writer:
                writer.write(b"partial")
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            write_then_fail()
        assert not store.exists("w/ctx")

    def test_create_only_writer_conflict(self, store: ObjectStore) -> None:
        store.put("w/taken", b"old")
        writer = store.open_writer("w/taken", PutMode.CREATE)
        writer.write(b"new")
        with pytest.raises(AlreadyExistsError):
            writer.close()
        assert store.get("w/taken") == b"old"

    def test_list_objects_and_dirs(self, store: ObjectStore) -> None:
        for key in ("p/a/1", "p/a/2", "p/b/3", "p/top", "q/other"):
            store.put(key, key.encode())
        assert sorted(o.key for o in store.list_objects("p")) == ["p/a/1", "p/a/2", "p/b/3", "p/top"]
        assert {o.key: o.size for o in store.list_objects("p/a")} == {"p/a/1": 5, "p/a/2": 5}
        assert store.list_dirs("p") == ["a", "b"]
        assert store.list_dirs("missing") == []
        assert list(store.list_objects("missing")) == []

    def test_delete_prefix(self, store: ObjectStore) -> None:
        for key in ("d/a/1", "d/a/2", "d/b", "dd/keep"):
            store.put(key, b"x")
        store.delete_prefix("d")
        assert list(store.list_objects("d")) == []
        assert store.exists("dd/keep")
        store.delete_prefix("d")  # missing prefix: no-op

    def test_concurrent_create_has_exactly_one_winner(self, store: ObjectStore) -> None:
        results: list[str] = []
        barrier = threading.Barrier(8)

        def attempt(i: int) -> None:
            barrier.wait()
            try:
                store.put("race/_metadata", f"writer-{i}".encode(), PutMode.CREATE)
                results.append(f"won-{i}")
            except AlreadyExistsError:
                results.append("lost")

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [r for r in results if r.startswith("won")]
        assert len(winners) == 1, results
        assert store.get("race/_metadata") == f"writer-{winners[0][4:]}".encode()

    @pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a", "a/", "a\\b", "a/\x00"])
    def test_invalid_keys_are_rejected(self, store: ObjectStore, key: str) -> None:
        with pytest.raises(InvalidURIError):
            store.put(key, b"x")

    def test_empty_object(self, store: ObjectStore) -> None:
        store.put("empty", b"")
        assert store.get("empty") == b""
        assert store.size("empty") == 0

    def test_close_after_abort_fails_and_leaves_nothing(self, store: ObjectStore) -> None:
        # An abort from another thread (a checkpoint aborted mid-upload) must never let a later
        # close() report success for an object that is not there.
        writer = store.open_writer("w/late", PutMode.CREATE)
        writer.write(b"abc")
        writer.abort()
        with pytest.raises(StorageError):
            writer.close()
        assert not store.exists("w/late")

    def test_close_after_a_failed_close_fails_again(self, store: ObjectStore) -> None:
        store.put("w/taken", b"old")
        writer = store.open_writer("w/taken", PutMode.CREATE)
        writer.write(b"new")
        with pytest.raises(AlreadyExistsError):
            writer.close()
        with pytest.raises(StorageError):
            writer.close()
        assert store.get("w/taken") == b"old"

    def test_close_is_idempotent_after_success_and_abort_then_does_nothing(self, store: ObjectStore) -> None:
        writer = store.open_writer("w/done", PutMode.CREATE)
        writer.write(b"abc")
        writer.close()
        writer.close()
        writer.abort()
        assert store.get("w/done") == b"abc"

    def test_remove_empty_dirs_never_removes_an_object(self, store: ObjectStore) -> None:
        store.put("e/a/b/keep", b"x")
        writer = store.open_writer("e/a/c/gone")
        writer.write(b"y")
        writer.abort()
        store.remove_empty_dirs("e")
        assert store.get("e/a/b/keep") == b"x"
        assert [o.key for o in store.list_objects("e")] == ["e/a/b/keep"]
        assert store.list_dirs("e/a") == ["b"]
        store.delete("e/a/b/keep")
        store.remove_empty_dirs("e")
        assert store.list_dirs("") == [d for d in store.list_dirs("") if d != "e"]
        store.remove_empty_dirs("never/there")


class TestLocalObjectStore(ObjectStoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> ObjectStore:
        return LocalObjectStore(tmp_path / "root")

    def test_temp_files_are_not_listed(self, tmp_path: Path) -> None:
        store = LocalObjectStore(tmp_path)
        writer = store.open_writer("dir/file")
        writer.write(b"x")
        assert [p.name.startswith(".tmp-") for p in (tmp_path / "dir").iterdir()] == [True]
        assert list(store.list_objects("dir")) == []
        writer.close()
        assert [o.key for o in store.list_objects("dir")] == ["dir/file"]
        assert [p.name for p in (tmp_path / "dir").iterdir()] == ["file"]

    def test_describe_is_the_absolute_path(self, tmp_path: Path) -> None:
        assert LocalObjectStore(tmp_path).describe("a/b") == str(tmp_path / "a" / "b")


class TestMemoryObjectStore(ObjectStoreContract):
    @pytest.fixture
    def store(self) -> ObjectStore:
        return MemoryObjectStore()


class TestFaultyObjectStore(ObjectStoreContract):
    """The fault-injection wrapper is a faithful store while no rule fires (rules that never match
    are armed to make sure matching does not change behaviour)."""

    @pytest.fixture(params=["local", "memory"])
    def store(self, request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
        inner: ObjectStore = LocalObjectStore(tmp_path / "root") if request.param == "local" else MemoryObjectStore()
        return FaultyObjectStore(
            inner,
            [
                FaultRule(Fault.THROTTLE, OPERATIONS, key="unused-prefix/*"),
                FaultRule(Fault.CRASH, OPERATIONS, probability=0.0),
                FaultRule(Fault.INTERNAL_ERROR, "put", times=0),
            ],
            seed=1,
        )

    def test_local_empty_directories_are_removed(self, tmp_path: Path) -> None:
        store = FaultyObjectStore(LocalObjectStore(tmp_path))
        writer = store.open_writer("d/e/f")
        writer.write(b"x")
        writer.abort()
        store.remove_empty_dirs("d")
        assert not (tmp_path / "d").exists()


class TestRetryingObjectStore(ObjectStoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> ObjectStore:
        return RetryingObjectStore(LocalObjectStore(tmp_path / "root"), RetryPolicy(max_attempts=3, initial_backoff=0))


class TestS3ObjectStore(ObjectStoreContract):
    @pytest.fixture
    def store(self, s3_client: Any) -> ObjectStore:
        return S3ObjectStore(BUCKET, "prefix/root", client=s3_client)

    def test_multipart_upload_is_used_and_invisible_until_complete(self, s3_client: Any) -> None:
        store = S3ObjectStore(BUCKET, "mp", client=s3_client, part_size=5 * 1024 * 1024, upload_concurrency=2)
        data = bytes(range(256)) * (48 * 1024)  # 12 MiB -> 3 parts
        writer = store.open_writer("big", PutMode.CREATE)
        writer.write(data[: 7 * 1024 * 1024])
        uploads = s3_client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
        assert [u["Key"] for u in uploads] == ["mp/big"]
        assert not store.exists("big")
        writer.write(data[7 * 1024 * 1024 :])
        writer.close()
        assert store.get("big") == data
        assert s3_client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []

    def test_aborted_multipart_upload_is_removed(self, s3_client: Any) -> None:
        store = S3ObjectStore(BUCKET, "mp", client=s3_client, part_size=5 * 1024 * 1024)
        writer = store.open_writer("big")
        writer.write(b"x" * (11 * 1024 * 1024))
        writer.abort()
        assert s3_client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
        assert not store.exists("big")

    def test_multipart_create_only_conflict(self, s3_client: Any) -> None:
        store = S3ObjectStore(BUCKET, "mp", client=s3_client, part_size=5 * 1024 * 1024)
        store.put("taken", b"old")
        writer = store.open_writer("taken", PutMode.CREATE)
        writer.write(b"y" * (6 * 1024 * 1024))
        with pytest.raises(AlreadyExistsError):
            writer.close()
        assert store.get("taken") == b"old"
        assert s3_client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []

    def test_describe_is_an_s3_uri(self, s3_client: Any) -> None:
        assert S3ObjectStore(BUCKET, "a/b", client=s3_client).describe("c") == f"s3://{BUCKET}/a/b/c"

    def test_part_size_below_minimum_is_rejected(self, s3_client: Any) -> None:
        with pytest.raises(ValueError, match="minimum"):
            S3ObjectStore(BUCKET, client=s3_client, part_size=1024)
