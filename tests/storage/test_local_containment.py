"""The local store never leaves its root: below it no symbolic link is followed by a read, stat, listing,
delete or write, also when a directory is swapped for a link between two operations or during one.

Every test keeps a decoy outside the root: the same names as the checkpoint's files, holding
:data:`SECRET`. Following a link would read it, list it, write next to it or delete it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from keystate.storage import (
    CheckpointStorage,
    CompletedCheckpoint,
    CompletedCheckpointStore,
    KeystateError,
    LocalObjectStore,
    NotFoundError,
    PutMode,
    StorageError,
)
from keystate.storage.errors import UnsafeLinkError
from tests._environment import unavailable
from tests.storage.checkpoint_support import JOB, OPTIONS, checkpoint, keys

SECRET = b"root:x:0:0:the bytes outside the root that must never be read:/root:/bin/bash\n"
NOT_FOLLOWED = "keystate does not follow links in checkpoint storage"
CHK = f"{JOB}/chk-1"


@dataclass
class Tree:
    root: Path
    store: LocalObjectStore
    storage: CheckpointStorage
    completed: CompletedCheckpoint
    outside: Path
    """A decoy of the job directory outside the root: the same names, every state file holding SECRET."""

    @property
    def exclusive(self) -> str:
        """The key of the checkpoint's exclusive state file, ``<job>/chk-1/op/0/keyed-....ksf``."""
        return next(k for k in keys(self.store, CHK) if k.endswith(".ksf"))

    def link(self, relative: str) -> Path:
        """Replace the directory ``relative`` (under the root) with a link to its decoy."""
        path = self.root / relative
        shutil.rmtree(path)
        path.symlink_to(self.outside / Path(relative).relative_to(JOB), target_is_directory=True)
        return path

    def decoy_files(self) -> dict[str, bytes]:
        return {p.relative_to(self.outside).as_posix(): p.read_bytes() for p in self.outside.rglob("*") if p.is_file()}


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    root = tmp_path / "root"
    store = LocalObjectStore(root)
    storage = CheckpointStorage(store, options=OPTIONS)
    completed, _ = checkpoint(storage, 1)
    outside = tmp_path / "outside"
    shutil.copytree(root / JOB, outside)
    for path in outside.rglob("*.ksf"):
        path.write_bytes(SECRET)
    return Tree(root, store, storage, completed, outside)


def _exchanger() -> Callable[[Path, Path], None] | None:
    """``renameat2(RENAME_EXCHANGE)``: swaps two names atomically (Linux), so a path is at every instant
    either the directory or the link, never missing (a missing one would let a write recreate it)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return None
    at_fdcwd, rename_exchange = -100, 2

    def exchange(a: Path, b: Path) -> None:
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(a))

    return exchange


def assert_refused(exc: BaseException, key_path: Path, link: Path) -> None:
    message = str(exc)
    assert isinstance(exc, UnsafeLinkError), repr(exc)
    assert isinstance(exc, StorageError)
    assert str(key_path) in message, message
    assert str(link) in message or "it is a symbolic link" in message, message
    assert NOT_FOLLOWED in message, message
    assert "root:x" not in message


def test_a_linked_state_file_is_refused(tree: Tree) -> None:
    key = tree.exclusive
    path = tree.root / key
    path.unlink()
    path.symlink_to(tree.outside / Path(key).relative_to(JOB))
    for call in (
        lambda: tree.store.get(key),
        lambda: tree.store.get_range(key, 0, 8),
        lambda: tree.store.open_reader(key),
        lambda: tree.store.size(key),
        lambda: tree.store.exists(key),
    ):
        with pytest.raises(UnsafeLinkError) as info:
            call()
        assert_refused(info.value, path, path)
    assert key not in keys(tree.store, JOB)


def test_a_linked_directory_inside_a_checkpoint_is_refused(tree: Tree) -> None:
    key = tree.exclusive
    link = tree.link(f"{CHK}/op")
    for call in (
        lambda: tree.store.get(key),
        lambda: tree.store.get_range(key, 0, 8),
        lambda: tree.store.open_reader(key, 4),
        lambda: tree.store.size(key),
        lambda: tree.store.exists(key),
    ):
        with pytest.raises(UnsafeLinkError) as info:
            call()
        assert_refused(info.value, tree.root / key, link)
    # The metadata is not behind the link: the checkpoint loads, its state file does not.
    completed = tree.storage.load(CHK)
    handle = next(h for h in completed.metadata.handles() if h.path is not None and h.path.startswith("op/0/"))
    with pytest.raises(KeystateError) as raised:
        completed.open_state(handle).read_all()
    assert "symbolic link" in str(raised.value)
    assert "root:x" not in str(raised.value)
    # Listings neither report nor descend the link.
    assert keys(tree.store, CHK) == [f"{CHK}/_metadata"]
    assert tree.store.list_dirs(CHK) == []


def test_a_checkpoint_directory_that_is_a_link_is_refused(tree: Tree) -> None:
    link = tree.link(CHK)
    assert tree.storage.discover() == []
    assert tree.storage.latest() is None
    assert tree.store.list_dirs(JOB) == ["shared"]
    for call in (lambda: tree.storage.load(CHK), lambda: tree.store.get(f"{CHK}/_metadata")):
        with pytest.raises(UnsafeLinkError) as info:
            call()
        assert_refused(info.value, tree.root / CHK / "_metadata", link)
    with pytest.raises(UnsafeLinkError):
        list(tree.store.list_objects(CHK))


def test_a_job_directory_that_is_a_link_is_refused(tree: Tree) -> None:
    key = tree.exclusive
    tree.root.joinpath(JOB).rename(tree.root.parent / "moved-job")
    link = tree.root / JOB
    link.symlink_to(tree.outside, target_is_directory=True)
    assert tree.storage.discover() == []
    assert keys(tree.store, "") == []
    for call in (
        lambda: tree.storage.load(CHK),
        lambda: tree.storage.list_checkpoints(JOB),
        lambda: tree.store.get(key),
    ):
        with pytest.raises(UnsafeLinkError) as info:
            call()
        assert NOT_FOLLOWED in str(info.value)
        assert str(link) in str(info.value)


def test_listing_skips_links(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "file").write_bytes(SECRET)
    (outside / "dir" / "inner").write_bytes(SECRET)
    store = LocalObjectStore(tmp_path / "root")
    store.put("a/real", b"1")
    store.put("a/sub/real", b"22")
    (tmp_path / "root" / "a" / "file-link").symlink_to(outside / "file")
    (tmp_path / "root" / "a" / "dir-link").symlink_to(outside / "dir", target_is_directory=True)
    (tmp_path / "root" / "a" / "dangling").symlink_to(outside / "missing")
    assert [(o.key, o.size) for o in store.list_objects("a")] == [("a/real", 1), ("a/sub/real", 2)]
    assert [o.key for o in store.list_objects("")] == ["a/real", "a/sub/real"]
    assert store.list_dirs("a") == ["sub"]


def test_writes_never_go_through_a_link(tree: Tree) -> None:
    link = tree.link(f"{CHK}/op")
    before = tree.decoy_files()
    for key in (f"{CHK}/op/new", f"{CHK}/op/deeper/new"):
        for mode in PutMode:
            with pytest.raises(UnsafeLinkError) as info:
                tree.store.put(key, b"x", mode)
            assert_refused(info.value, tree.root / key, link)
        with pytest.raises(UnsafeLinkError):
            tree.store.open_writer(key, PutMode.CREATE)
    assert tree.decoy_files() == before
    assert not (tree.outside / "chk-1" / "op" / "deeper").exists()


def test_a_directory_swapped_for_a_link_between_two_operations_is_refused(tree: Tree) -> None:
    key = tree.exclusive
    data = tree.store.get(key)
    assert tree.store.size(key) == len(data)
    link = tree.link(f"{CHK}/op")
    with pytest.raises(UnsafeLinkError):
        tree.store.get(key)
    with pytest.raises(UnsafeLinkError):
        tree.store.size(key)
    link.unlink()
    tree.store.put(key, data)  # a real directory again: nothing about the link was remembered
    assert tree.store.get(key) == data


def test_the_root_itself_may_be_a_link_and_is_resolved_once(tmp_path: Path) -> None:
    volume, other = tmp_path / "volume", tmp_path / "other"
    volume.mkdir()
    other.mkdir()
    link = tmp_path / "root-link"
    link.symlink_to(volume, target_is_directory=True)
    store = LocalObjectStore(link)
    assert store.root == volume
    store.put("job/chk-1/_metadata", b"mine")
    assert (volume / "job" / "chk-1" / "_metadata").read_bytes() == b"mine"
    (other / "job" / "chk-1").mkdir(parents=True)
    (other / "job" / "chk-1" / "_metadata").write_bytes(SECRET)
    link.unlink()
    link.symlink_to(other, target_is_directory=True)  # re-pointed after the store was opened
    assert store.get("job/chk-1/_metadata") == b"mine"
    assert store.describe("job") == str(volume / "job")


def test_a_root_replaced_by_a_link_after_opening_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    store = LocalObjectStore(root)
    store.put("k", b"mine")
    root.rename(tmp_path / "gone")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "k").write_bytes(SECRET)
    root.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(UnsafeLinkError, match="has become a symbolic link"):
        store.get("k")


@pytest.mark.parametrize("replacement", ["link", "directory"])
def test_a_directory_swapped_during_a_streaming_write_never_receives_the_object(
    tmp_path: Path, replacement: str
) -> None:
    store = LocalObjectStore(tmp_path / "root")
    writer = store.open_writer("job/chk-1/op/state.ksf", PutMode.CREATE)
    writer.write(b"state bytes")
    directory = tmp_path / "root" / "job" / "chk-1" / "op"
    moved = tmp_path / "outside-op"
    directory.rename(moved)  # the writer's temp file moves along, out of the root
    if replacement == "link":
        directory.symlink_to(moved, target_is_directory=True)
    else:
        directory.mkdir()
    with pytest.raises(StorageError) as info:
        writer.close()
    assert isinstance(info.value, UnsafeLinkError) == (replacement == "link")
    assert "nothing is visible" in str(info.value) or NOT_FOLLOWED in str(info.value)
    assert list(moved.iterdir()) == []  # not linked in there, and its temp file is gone too
    assert not store.exists("job/chk-1/op/state.ksf") if replacement == "directory" else True
    writer.abort()  # still safe


def test_reads_and_writes_racing_a_directory_swapped_for_a_link_never_leave_the_root(tree: Tree) -> None:
    """A thread swaps ``chk-1/op`` and a link to its decoy as fast as it can while reads, listings,
    puts and deletes run: each sees the real directory, no object, or a refusal; never the decoy."""
    exchange = _exchanger()
    if exchange is None:
        unavailable("needs renameat2(RENAME_EXCHANGE) to swap a directory and a link atomically")
    key = tree.exclusive
    data = tree.store.get(key)
    before = tree.decoy_files()
    real = tree.root / CHK / "op"
    partner = tree.root.parent / "op-link"  # outside the root: a link to the decoy, or the real directory
    partner.symlink_to(tree.outside / "chk-1" / "op", target_is_directory=True)
    stop = threading.Event()
    swaps = 0

    def swap() -> None:
        nonlocal swaps
        while not stop.is_set():
            exchange(real, partner)  # now a link
            time.sleep(0)
            exchange(real, partner)  # the directory again
            swaps += 1

    outcomes: dict[str, int] = {}
    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        deadline = time.monotonic() + 1.5
        i = 0
        while (time.monotonic() < deadline or swaps < 50) and swapper.is_alive():
            i += 1
            probe = f"{CHK}/op/0/probe-{i}"
            try:
                if i % 5 == 0:
                    listed = [o.key for o in tree.store.list_objects(CHK)]
                    assert all(k == f"{CHK}/_metadata" or k.startswith(f"{CHK}/op/") for k in listed)
                    got = data
                elif i % 5 == 1:
                    tree.store.put(probe, b"probe", PutMode.CREATE)
                    tree.store.delete(probe)
                    got = data
                elif i % 5 == 2:
                    reader = tree.store.open_reader(key)
                    try:
                        got = reader.read()
                    finally:
                        reader.close()
                elif i % 5 == 3:
                    got = tree.store.get_range(key, 0, len(data))
                else:
                    got = tree.store.get(key)
                outcome = "read"
                assert got == data
            except UnsafeLinkError:
                outcome = "refused"
            except NotFoundError:
                # The open met the link, and the entry was the directory again when it was looked at.
                outcome = "refused as missing"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    finally:
        stop.set()
        swapper.join()
    assert swaps >= 50, swaps
    assert outcomes.get("read", 0) > 0, outcomes
    assert outcomes.get("refused", 0) > 0, outcomes
    assert tree.decoy_files() == before  # nothing written, linked or deleted out there
    assert SECRET not in tree.store.get(key)


def test_discard_through_a_linked_directory_never_deletes_outside(tree: Tree, caplog: pytest.LogCaptureFixture) -> None:
    before = tree.decoy_files()
    tree.link(f"{CHK}/op")
    with pytest.raises(UnsafeLinkError):
        tree.storage.discard(tree.completed)
    assert tree.decoy_files() == before
    # Retention logs it and goes on; the decoy stays whole.
    second, _ = checkpoint(tree.storage, 2)
    retained = CompletedCheckpointStore(tree.storage, JOB, num_retained=1)
    with caplog.at_level(logging.WARNING):
        retained.add(tree.completed)
        assert retained.add(second) == [tree.completed]
    assert "could not discard subsumed checkpoint" in caplog.text
    assert NOT_FOLLOWED in caplog.text
    assert tree.decoy_files() == before


def test_discard_after_the_job_directory_became_a_link_never_deletes_outside(tree: Tree) -> None:
    """Retention holds loaded checkpoints in memory: the job directory may be swapped meanwhile."""
    before = tree.decoy_files()
    tree.root.joinpath(JOB).rename(tree.root.parent / "moved-job")
    (tree.root / JOB).symlink_to(tree.outside, target_is_directory=True)
    with pytest.raises(UnsafeLinkError):
        tree.storage.discard(tree.completed)
    assert tree.decoy_files() == before


def test_deleting_a_checkpoint_removes_links_inside_it_not_their_targets(tree: Tree) -> None:
    before = tree.decoy_files()
    (tree.root / CHK / "extra").symlink_to(tree.outside / "chk-1", target_is_directory=True)
    tree.storage.discard(tree.completed)
    assert not (tree.root / CHK).exists()
    assert tree.decoy_files() == before


def test_remove_empty_dirs_never_leaves_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "chk-9" / "empty").mkdir(parents=True)
    store = LocalObjectStore(tmp_path / "root")
    store.put("job/keep", b"x")
    (tmp_path / "root" / "job" / "chk-9").symlink_to(outside / "chk-9", target_is_directory=True)
    with pytest.raises(UnsafeLinkError):
        store.remove_empty_dirs("job/chk-9")
    (tmp_path / "root" / "job" / "chk-8" / "a").mkdir(parents=True)
    (tmp_path / "root" / "job" / "chk-8" / "link").symlink_to(outside / "chk-9", target_is_directory=True)
    store.remove_empty_dirs("job/chk-8")
    assert not (tmp_path / "root" / "job" / "chk-8" / "a").exists()
    assert (outside / "chk-9" / "empty").is_dir()
    with pytest.raises(UnsafeLinkError):
        store.delete_prefix("job/chk-9")
    assert (outside / "chk-9" / "empty").is_dir()


def test_no_descriptor_is_left_open(tree: Tree) -> None:
    """Every walk closes what it opened, on success and on refusal."""
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        unavailable("needs /proc")
    key = tree.exclusive
    opened = len(os.listdir(fd_dir))
    for _ in range(20):
        tree.store.get(key)
        tree.store.size(key)
        list(tree.store.list_objects(JOB))
        tree.store.put(f"{CHK}/op/x", b"x")
        with tree.store.open_writer(f"{CHK}/op/y") as writer:
            writer.write(b"y")
        tree.store.delete_many([f"{CHK}/op/x", f"{CHK}/op/y"])
    tree.link(f"{CHK}/op")
    for _ in range(20):
        with pytest.raises(UnsafeLinkError):
            tree.store.get(key)
        with pytest.raises(UnsafeLinkError):
            tree.store.put(f"{CHK}/op/x", b"x")
    assert len(os.listdir(fd_dir)) == opened
