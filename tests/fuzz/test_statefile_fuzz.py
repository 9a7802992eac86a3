"""(b) State files: arbitrary bytes and damaged valid files through every read path, and memory bounds."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from keystate.storage import LocalObjectStore, StateFileError
from keystate.storage.format.statefile import (
    BLOCK_HEADER,
    FILE_HEADER,
    MAGIC,
    MAX_RAW_BLOCK,
    MAX_STORED_BLOCK,
    TRAILER,
    BytesSource,
    Compression,
    StateFileReader,
)
from keystate.storage.statefile_io import StoreSource
from tests.fuzz.harness import FuzzContext, Property, run_property
from tests.fuzz.properties import PROPERTIES

FEW_MB = 4 << 20


@pytest.mark.parametrize("prop", [p for p in PROPERTIES if p.target == "statefile"], ids=lambda p: p.name)
def test_property(prop: Property, fuzz_context: FuzzContext) -> None:
    assert run_property(prop, fuzz_context) >= prop.ci_examples // 2


def _peak(action: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(StateFileError):
            action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _hostile(stored: int, raw: int, compression: Compression) -> bytes:
    """A header, one block header declaring ``stored`` / ``raw`` bytes, a few payload bytes, a trailer."""
    return (
        FILE_HEADER.pack(MAGIC, 1, compression.code, 0)
        + BLOCK_HEADER.pack(stored, raw, 0)
        + b"\x28\xb5\x2f\xfd" * 4
        + TRAILER.pack(0xFFFFFFFF, 1, raw)
    )


@pytest.mark.parametrize("compression", list(Compression))
@pytest.mark.parametrize(("stored", "raw"), [(0xFFFFFFF0, 0xFFFFFFF0), (0xFFFFFFF0, 16), (16, 0xFFFFFFF0),
                                             (0xFFFFFFFE, 0), (0x80000000, 0x80000000)])  # fmt: skip
@pytest.mark.parametrize("size", [None, 2**63 - 1, "true"])
def test_a_huge_declared_block_length_allocates_almost_nothing(
    tmp_path: Path, compression: Compression, stored: int, raw: int, size: int | str | None
) -> None:
    data = _hostile(stored, raw, compression)
    recorded = len(data) if size == "true" else size
    assert recorded is None or isinstance(recorded, int)
    (tmp_path / "f.ksf").write_bytes(data)
    sources: list[BytesSource | StoreSource] = [
        BytesSource(data, "hostile"),
        StoreSource(LocalObjectStore(tmp_path, fsync=False), "f.ksf"),
    ]
    for source in sources:

        def reader() -> StateFileReader:
            return StateFileReader(source, size=recorded)  # noqa: B023

        assert _peak(lambda: reader().verify()) < FEW_MB
        assert _peak(lambda: reader().read_all()) < FEW_MB
        assert _peak(lambda: list(reader().iter_range_with_offsets(FILE_HEADER.size))) < FEW_MB
        assert _peak(lambda: list(reader().iter_range_with_offsets(FILE_HEADER.size, 2**40))) < FEW_MB


def test_the_largest_block_a_reader_accepts_bounds_what_a_tiny_file_can_make_it_allocate(tmp_path: Path) -> None:
    """A block declaring the largest legal stored length (about 16 MiB) in a file of a few bytes, with no
    size to check it against: the read is refused, having allocated at most about that much."""
    data = _hostile(MAX_STORED_BLOCK, MAX_RAW_BLOCK, Compression.ZSTD)
    (tmp_path / "f.ksf").write_bytes(data)
    source = StoreSource(LocalObjectStore(tmp_path, fsync=False), "f.ksf")
    assert _peak(lambda: StateFileReader(source).verify()) < MAX_STORED_BLOCK + FEW_MB
