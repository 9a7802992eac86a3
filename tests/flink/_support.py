"""The real Flink fixtures of ``tests/flink/fixtures/`` (see its README.md), and how to load them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "flink-2.3.0"
NAMES = (
    "hashmap-all-running",
    "hashmap-final-bounded",
    "hashmap-fully-finished",
    "hashmap-partially-finished-p3",
    "rocksdb-full",
    "rocksdb-incremental",
)


@dataclass(frozen=True)
class Fixture:
    name: str
    directory: Path
    """The fixture's checkpoint directory, holding ``<jobId>/``."""
    metadata_path: Path
    job_id: str
    data: bytes
    dump: dict[str, Any]
    """``flink-dump.json``: what Flink 2.3.0's own loader read from ``data``."""


@cache
def fixture(name: str) -> Fixture:
    directory = FIXTURES / name
    (path,) = directory.glob("*/chk-*/_metadata")
    dump = json.loads((directory / "flink-dump.json").read_text(encoding="utf-8"))
    return Fixture(name, directory, path, path.parent.parent.name, path.read_bytes(), dump)


def normalise_handle_name(name: str, job_id: str) -> str:
    """A parsed handle URI as flink-dump.json shows it: everything before ``/<jobId>/`` -> ``<checkpoint-root>``."""
    marker = f"/{job_id}/"
    return "<checkpoint-root>" + name[name.index(marker) :] if marker in name else name
