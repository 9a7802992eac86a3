"""Properties of (b) state files: arbitrary bytes and damaged valid files through ``verify``, ``read_all``
and ``iter_range_with_offsets``, from memory and from disk, with none, the true or hostile handle
expectations. Either the reads agree and return what was written, or they raise ``StateFileError``."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from keystate.storage import LocalObjectStore
from keystate.storage.errors import StateFileError
from keystate.storage.format.statefile import (
    FILE_HEADER,
    MAGIC,
    BytesSource,
    Compression,
    StateFileReader,
    format_checksum,
)
from keystate.storage.statefile_io import StoreSource
from tests.fuzz import samples
from tests.fuzz.harness import FuzzContext, attempt
from tests.fuzz.strategies import mutated_bytes

__all__ = ["StateFileExample", "check_state_file", "statefile_arbitrary", "statefile_mutated"]

STATE_FILE_NAME = "/fuzz/chk-1/op/0/keyed.ksf"

_STATE_ERRORS = (StateFileError,)  # ChecksumMismatchError and UnsupportedStateFileVersionError are subclasses


@dataclass(frozen=True)
class StateFileExample:
    file: samples.StateFile | None
    """The valid file this example was made from (``None`` for arbitrary bytes)."""
    data: bytes
    params: dict[str, Any]
    """Handle expectations passed to the reader: none, the true ones, or hostile ones."""
    true_params: bool
    start: int
    end: int | None
    on_disk: bool
    log: tuple[str, ...] = ()


def check_state_file(ctx: FuzzContext, ex: StateFileExample) -> None:
    """verify / read_all / iter_range_with_offsets return correct results or raise ``StateFileError``."""
    if ex.on_disk:
        name = f"f-{ctx.next_id()}.ksf"
        (ctx.statefiles / name).write_bytes(ex.data)
        source: BytesSource | StoreSource = StoreSource(LocalObjectStore(ctx.statefiles, fsync=False), name)
    else:
        source = BytesSource(ex.data, STATE_FILE_NAME)

    def reader() -> StateFileReader:
        return StateFileReader(source, **ex.params)

    try:
        ok_verify, verified = attempt(lambda: reader().verify(), _STATE_ERRORS)
        ok_all, everything = attempt(lambda: reader().read_all(), _STATE_ERRORS)
        ok_range, blocks = attempt(lambda: list(reader().iter_range_with_offsets(ex.start, ex.end)), _STATE_ERRORS)
    finally:
        if ex.on_disk:
            (ctx.statefiles / name).unlink()
    assert ok_verify == ok_all, (verified, everything)
    if ok_all:
        assert verified == len(everything)
    else:
        assert type(verified) is type(everything), (verified, everything)
    if ok_range:
        offsets = [offset for offset, _ in blocks]
        assert offsets == sorted(set(offsets))
        assert all(o >= ex.start for o in offsets)
        if ex.end is not None:
            assert all(o < ex.end for o in offsets)
    f = ex.file
    if f is None:
        return
    intact = ex.data == f.data
    if ok_all and ex.params.get("checksum") == f.summary.checksum:
        assert intact, "a changed file passed the whole-file checksum"
    if ok_all and intact:
        assert everything == f.raw
    if intact and ex.true_params:
        assert ok_all, everything
        expected = ex.start in f.boundaries and (ex.end is None or (ex.end in f.boundaries and ex.end >= ex.start))
        if ex.end == ex.start and ok_range:
            assert blocks == []  # an empty range reads nothing, wherever it is
            return
        assert ok_range == expected, (ex.start, ex.end, f.boundaries, blocks)
        if ok_range:
            assert all(o in f.boundaries for o, _ in blocks)
            assert b"".join(b for _, b in blocks) == f.raw_between(ex.start, ex.end)


@st.composite
def _state_files(draw: st.DrawFn) -> samples.StateFile:
    payload = st.one_of(st.binary(max_size=80), st.tuples(st.binary(min_size=1, max_size=4), st.integers(1, 60)).map(
        lambda t: t[0] * t[1]))  # fmt: skip
    chunks = draw(st.lists(st.one_of(st.none(), payload), max_size=8))
    compression = draw(st.sampled_from(list(Compression)))
    block_size = draw(st.sampled_from([1, 3, 16, 64, 1 << 20]))
    return samples.write_state_file(chunks, compression, block_size)


def _reader_params(draw: st.DrawFn, f: samples.StateFile | None) -> tuple[dict[str, Any], bool]:
    mode = draw(st.sampled_from(["true", "none", "hostile"] if f is not None else ["none", "hostile"]))
    if mode == "none":
        return {}, False
    if mode == "true" and f is not None:
        return {"size": f.summary.size, "checksum": f.summary.checksum, "raw_size": f.summary.raw_size,
                "compression": f.compression}, True  # fmt: skip
    sizes = st.one_of(st.integers(0, 2**63 - 1), st.sampled_from([0, 24, 0xFFFFFFF0, 2**63 - 1]))
    params: dict[str, Any] = {
        "size": draw(st.one_of(st.none(), sizes)),
        "checksum": draw(st.one_of(st.none(), st.integers(0, 2**64 - 1).map(format_checksum))),
        "raw_size": draw(st.one_of(st.none(), sizes)),
        "compression": draw(st.one_of(st.none(), st.sampled_from(list(Compression)))),
    }
    if f is not None and draw(st.booleans()):
        params["checksum"] = f.summary.checksum
    return params, False


def _range(draw: st.DrawFn, data: bytes, f: samples.StateFile | None) -> tuple[int, int | None]:
    anywhere = st.integers(0, len(data) + 32)
    points = st.one_of(anywhere, st.sampled_from(f.boundaries)) if f is not None else anywhere
    start = draw(st.one_of(points, st.just(FILE_HEADER.size)))
    end = draw(st.one_of(st.none(), points))
    return start, end


@st.composite
def statefile_mutated(draw: st.DrawFn) -> StateFileExample:
    f = draw(_state_files())
    log: tuple[str, ...] = ()
    data = f.data
    if draw(st.integers(0, 3)):
        fields = [0, 4, 6, 7, *itertools.chain.from_iterable((b, b + 4, b + 8, b + 16) for b in f.boundaries)]
        data, changes = draw(mutated_bytes(f.data, positions=fields))
        log = tuple(changes)
    params, true_params = _reader_params(draw, f)
    start, end = _range(draw, data, f)
    return StateFileExample(f, data, params, true_params, start, end, draw(st.integers(0, 4)) == 0, log)


@st.composite
def statefile_arbitrary(draw: st.DrawFn) -> StateFileExample:
    header = FILE_HEADER.pack(MAGIC, 1, draw(st.integers(0, 2)), 0)
    data = draw(st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(lambda b: header + b)))
    params, _ = _reader_params(draw, None)
    start, end = _range(draw, data, None)
    return StateFileExample(None, data, params, False, start, end, draw(st.integers(0, 4)) == 0)
