"""Every failure a user can cause in the state backends is a ``KeystateError`` that says what happened and
what to do: values no serializer can encode (deep nesting, objects whose pickling raises, lone
surrogates), and LMDB's own errors (reader slots used up, a map that cannot grow, a full or read-only
disk, permissions, use after close) translated where LMDB is called. The disk cases run on a real small
tmpfs where one can be mounted."""

from __future__ import annotations

import random
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from keystate.statebackend import (
    BytesSerializer,
    FloatSerializer,
    JsonSerializer,
    KeySerializer,
    MapStateDescriptor,
    PickleSerializer,
    SerializationError,
    StateError,
    StrSerializer,
    ValueStateDescriptor,
)
from keystate.statebackend._kv import KVSnapshot
from keystate.statebackend._lmdb import LmdbKV
from keystate.statebackend.errors import (
    LmdbAccessDeniedError,
    LmdbDiskFullError,
    LmdbError,
    LmdbReadersFullError,
)
from keystate.storage import KeystateError
from tests._environment import unavailable
from tests.small_disk import small_tmpfs
from tests.statebackend.support import BackendFactory

REPO = Path(__file__).resolve().parents[2]


def nested_list(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def nested_tuple(depth: int) -> tuple[Any, ...]:
    value: tuple[Any, ...] = (1,)
    for _ in range(depth):
        value = (value,)
    return value


class RaisesOnPickle:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def __reduce__(self) -> Any:
        raise self.error


# --- serializers ------------------------------------------------------------------------------------------

ENCODE_CASES: list[tuple[str, Callable[[], object], str]] = [
    ("pickle-deep", lambda: PickleSerializer().serialize(nested_list(100_000)), "recursion limit"),
    ("pickle-runtime-error", lambda: PickleSerializer().serialize(RaisesOnPickle(RuntimeError("no"))), "picklable"),
    ("pickle-value-error", lambda: PickleSerializer().serialize(RaisesOnPickle(ValueError("no"))), "picklable"),
    ("str-lone-surrogate", lambda: StrSerializer().serialize("ab\udc80"), "lone surrogate"),
    ("key-lone-surrogate", lambda: KeySerializer().serialize("\ud800"), "lone surrogate"),
    ("key-tuple-lone-surrogate", lambda: KeySerializer().serialize(("a", "\udfff")), "lone surrogate"),
    ("key-deep-tuple", lambda: KeySerializer().serialize(nested_tuple(5000)), "recursion limit"),
    ("key-huge-tuple-element", lambda: KeySerializer().serialize(("x" * 70_000,)), "at most 400 bytes"),
    ("key-huge-int", lambda: KeySerializer().serialize(1 << (8 * 70_000)), "at most 400 bytes"),
    ("json-deep", lambda: JsonSerializer().serialize(nested_list(100_000)), "recursion limit"),
    ("float-huge-int", lambda: FloatSerializer().serialize(10**400), "range of a double"),
]


@pytest.mark.parametrize(("encode", "hint"), [c[1:] for c in ENCODE_CASES], ids=[c[0] for c in ENCODE_CASES])
def test_values_no_serializer_can_encode_are_serialization_errors(encode: Callable[[], object], hint: str) -> None:
    with pytest.raises(SerializationError, match=hint):
        encode()


@pytest.mark.parametrize(
    "garbage",
    [b"garbage", b"\x80\x05" + b"(" * 100_000 + b".", b"\x80\x05\x95\xff\xff\xff\xff\xff\xff\xff\x7f", b""],
    ids=["text", "deep-marks", "huge-frame", "empty"],
)
def test_unpickling_garbage_is_a_serialization_error(garbage: bytes) -> None:
    with pytest.raises(SerializationError, match="cannot decode stored bytes"):
        PickleSerializer().deserialize(garbage)


def test_unencodable_values_and_keys_through_the_backend(new_backend: BackendFactory) -> None:
    backend = new_backend()
    blob = backend.get_state(ValueStateDescriptor[Any](name="blob", serializer=PickleSerializer()))
    tags = backend.get_state(
        MapStateDescriptor[str, bytes](name="tags", key_serializer=StrSerializer(), serializer=BytesSerializer())
    )
    with pytest.raises(SerializationError, match="lone surrogate"):
        backend.set_current_key("user-\udc80")
    backend.set_current_key("user")
    with pytest.raises(SerializationError, match="recursion limit"):
        blob.update(nested_list(100_000))
    with pytest.raises(SerializationError, match="RuntimeError: no"):
        blob.update(RaisesOnPickle(RuntimeError("no")))
    with pytest.raises(SerializationError, match="lone surrogate"):
        tags.put("\udc80", b"x")
    blob.update([1, 2])  # the failures changed nothing
    assert blob.value() == [1, 2]
    assert list(tags.items()) == []


# --- LMDB -------------------------------------------------------------------------------------------------


def key(i: int) -> bytes:
    return struct.pack(">HHI", i % 128, 1, i)


@pytest.fixture
def kv(tmp_path: Path) -> Iterator[LmdbKV]:
    store = LmdbKV(tmp_path / "env", map_size=1 << 20, buffer_entries=10)
    yield store
    store.close()


def test_too_many_open_snapshots_is_a_readers_full_error(kv: LmdbKV) -> None:
    kv.put(key(1), b"x")
    snapshots: list[KVSnapshot] = []

    def take_snapshots() -> None:
        for _ in range(600):
            snapshots.append(kv.snapshot())

    try:
        with pytest.raises(LmdbReadersFullError, match=r"all 512 LMDB reader slots are taken.*release snapshots"):
            take_snapshots()
        assert 500 < len(snapshots) <= 512
    finally:
        for snapshot in snapshots:
            snapshot.release()
    kv.snapshot().release()  # slots come back with the releases
    assert kv.get(key(1)) == b"x"


def test_reading_lmdb_after_close_is_a_state_error(any_backend: BackendFactory) -> None:
    backend = any_backend(buffer_entries=3)
    count = backend.get_state(ValueStateDescriptor[bytes](name="c", serializer=BytesSerializer()))
    for k in range(10):  # past the write buffer: key 0 is read from LMDB
        backend.set_current_key(k)
        count.update(b"v")
    backend.close()
    backend.set_current_key(0)
    with pytest.raises(StateError, match=r"LMDB environment in .* is closed; its backend was closed before this use"):
        count.value()


MAP_CANNOT_GROW = """
import random, resource, sys
from keystate.statebackend._lmdb import LmdbKV
kv = LmdbKV(sys.argv[1], map_size=1 << 20, buffer_entries=4)
vm = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (48 << 20), resource.RLIM_INFINITY))
blob = random.Random(1).randbytes(100_000)
try:
    for i in range(2000):
        kv.put(i.to_bytes(2, "big") + b"\\x00\\x01" + i.to_bytes(4, "big"), blob)
except Exception as exc:
    print("map-full:", type(exc).__name__, exc)
try:
    kv.get(b"\\x00\\x00\\x00\\x01\\x00\\x00\\x00\\x00")
except Exception as exc:
    print("after:", type(exc).__name__, exc)
"""


def test_a_map_that_cannot_grow_is_a_map_full_error(tmp_path: Path) -> None:
    # Growing the map fails when the address space is used up (here: limited with RLIMIT_AS, in a child).
    done = subprocess.run(
        [sys.executable, "-c", MAP_CANNOT_GROW, str(tmp_path / "env")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("map-full: LmdbMapFullError cannot write to the LMDB environment in "), done.stdout
    assert "raise map_size (LmdbStateBackend(map_size=...))" in lines[0]
    assert lines[1].startswith("after: LmdbError "), done.stdout  # py-lmdb drops an environment it failed to resize
    assert "cannot be used any more" in lines[1]
    assert "restore from the last checkpoint" in lines[1]


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "small", "3m") as mount:
        yield mount


def test_a_full_disk_is_a_disk_full_error_and_the_changes_stay_readable(disk: Path) -> None:
    kv = LmdbKV(disk / "env", map_size=64 << 20, buffer_entries=10)
    try:
        blobs = {key(i): random.Random(i).randbytes(100_000) for i in range(100)}  # 10 MB on a 3 MiB disk
        put: list[bytes] = []

        def put_all() -> None:
            for k, v in blobs.items():
                put.append(k)
                kv.put(k, v)

        with pytest.raises(LmdbDiskFullError, match=r"bytes free on its file system; free disk space") as info:
            put_all()
        assert str(disk / "env") in str(info.value)
        assert len(put) > 10
        for k in put:  # every change put before the failure is still readable (buffered, not lost)
            assert kv.get(k) == blobs[k]
    finally:
        kv.close()


def remount_read_only(mount: Path) -> None:
    done = subprocess.run(["mount", "-o", "remount,ro", str(mount)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        unavailable(f"cannot remount the tmpfs read-only: {done.stderr.strip()}")


def test_a_read_only_file_system_is_an_access_denied_error(disk: Path) -> None:
    LmdbKV(disk / "existing").close()
    remount_read_only(disk)
    try:
        for path in (disk / "new", disk / "existing"):
            with pytest.raises(LmdbAccessDeniedError, match="read-only file system") as info:
                LmdbKV(path)
            assert isinstance(info.value, PermissionError)
            assert str(path) in str(info.value)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)


def test_permission_denied_by_lmdb_is_an_access_denied_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root (as the suite may run) is never denied, so LMDB's refusal is injected at its boundary.
    def denied(*args: Any, **kwargs: Any) -> Any:
        raise lmdb.ReadonlyError("mdb_env_open: Permission denied")

    monkeypatch.setattr(lmdb, "open", denied)
    with pytest.raises(LmdbAccessDeniedError, match=r"permission denied.*check the directory's owner") as info:
        LmdbKV(tmp_path / "env")
    assert isinstance(info.value, KeystateError)
    assert isinstance(info.value, PermissionError)
    monkeypatch.undo()
    LmdbKV(tmp_path / "env").close()  # the failed open released the directory's lock


def test_every_lmdb_error_is_a_state_error() -> None:
    assert issubclass(LmdbError, StateError)
    assert issubclass(LmdbError, KeystateError)
