"""Peak memory of reading hostile state files and ``_metadata``, measured in a child process.

State files (docs/format.md section 3.8): every read path (the reader, keyed and operator restores into
either backend, ``keystate dump`` and ``keystate verify``) holds a small multiple of one block, however
much a file decompresses to. The files are valid (checksums and all) and decode 40 KB into 1 GiB of
zeros, in 64 blocks of the largest size a reader accepts; a restore either refuses them with a typed
error or reads them, and the child's peak RSS (``ru_maxrss``) stays under its baseline plus 8 blocks.
The reader before these bounds needed 14 GiB for the keyed file and 2 GiB for the operator file.

``_metadata`` (docs/format.md section 4.2): parsing a document of the largest size accepted, of the
shapes that cost the parser most, stays under the documented bytes of memory per byte of document.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from keystate.storage.format import validation
from keystate.storage.format.statefile import MAX_RAW_BLOCK
from tests.storage import memory_child

REPO = Path(__file__).resolve().parent.parent.parent
CHILD = Path(__file__).with_name("memory_child.py")
STATE_BOUND = 8 * MAX_RAW_BLOCK
"""Bytes a state-file read may add to the child's peak RSS: 8 blocks of the largest size (128 MiB)."""
PER_BYTE = 17
"""Bytes of memory per byte of a ``_metadata`` document that parsing may take (docs/format.md 4.2) ..."""
PER_CONTAINER = 200
"""... plus this per ``{`` or ``[`` (at most ``MAX_DOCUMENT_CONTAINERS`` are parsed)."""
KEYSTATE_PER_BYTE = 8
"""What a document shaped as keystate writes them takes, per byte (measured: 7.3)."""


def run_child(*args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(CHILD), *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=100, check=False
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def growth(result: dict[str, Any]) -> int:
    return int(result["peak_kib"] - result["baseline_kib"]) * 1024


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bombs")
    memory_child.prepare(root)
    return root


@pytest.mark.parametrize(
    ("action", "outcome"),
    [
        ("verify", "RuntimeError: StateFileError"),  # the 64 MiB-block file is refused, the others verify
        ("restore-heap", "StateRestoreError: "),  # zero bytes are no entry (a key has 8..511 bytes)
        ("restore-lmdb", "StateRestoreError: "),
        ("restore-meta", "StateRestoreError: "),  # a meta section declaring 0 bytes, followed by 1 GiB
        ("restore-operator", "ok"),  # one empty element at offset 0, and 1 GiB nobody refers to
        ("dump", "RuntimeError: dump exit codes 2 0"),  # the keyed file is damage, the operator file dumps
        ("cli-verify", "SystemExit: 1"),  # damage found
    ],
)
def test_reading_a_decompression_bomb_holds_a_few_blocks(bombs: Path, action: str, outcome: str) -> None:
    result = run_child(action, str(bombs))
    assert result["outcome"].startswith(outcome), result
    assert growth(result) < STATE_BOUND, result


def _subtask(i: int) -> bytes:
    """A subtask with a keyed and an operator-state handle, as the runtime writes them (about 500 bytes)."""

    def stream(path: str, size: int) -> str:
        return (
            f'{{"scope":"exclusive","path":"{path}","size":{size},"raw_size":{3 * size},'
            '"checksum":"xxh3-64:22b2968323a74a67","compression":"zstd"}'
        )

    keyed = f'{{"key_groups":[{i},{i}],"offsets":[{8 + i}],"stream":{stream(f"op/{i}/keyed-{i:016x}.ksf", 10**7 + i)}}}'
    states = f'[{{"name":"offsets","mode":"split","offsets":[0,{10**6 + i}],"serializer":"pickle"}}]'
    operator = f'{{"states":{states},"stream":{stream(f"op/{i}/operator-{i:016x}.ksf", 10**7)}}}'
    return f'{{"index":{i},"keyed":[{keyed}],"operator":[{operator}]}}'.encode()


def largest_document() -> bytes:
    """A valid ``_metadata`` just under the size limit: operators of parallelism 32768 with state in files."""
    head = (
        b'{"format_version":1,"checkpoint_id":7,"job_id":"3f2a9c0d5e6b47a8b9c0d1e2f3a4b5c6","kind":"checkpoint",'
        b'"timestamp":1,"properties":{"synchronous":false,"drain":false},"operators":['
    )
    operators: list[bytes] = []
    size = len(head) + 3
    for k in range(1000):
        op_head = b'{"uid":"op%d","parallelism":32768,"max_parallelism":32768,"inputs":[],' % k
        op_head += b'"fully_finished":false,"subtasks":['
        subtasks: list[bytes] = []
        size += len(op_head) + 3
        for i in range(32768):
            sub = _subtask(i)
            if size + len(sub) + 1 > validation.MAX_DOCUMENT_BYTES:
                break
            subtasks.append(sub)
            size += len(sub) + 1
        operators.append(op_head + b",".join(subtasks) + b"]}")
        if len(subtasks) < 32768:
            break
    data = head + b",".join(operators) + b"]}\n"
    assert len(data) <= validation.MAX_DOCUMENT_BYTES
    return data


def tiny_containers_document() -> bytes:
    """The parser's worst case within both limits: the most objects of one key nested in each other
    (about 200 bytes each for 4 bytes of text), the rest of the bytes two-letter strings (60 bytes each
    for 5 bytes of text: the costliest scalar)."""
    depth = 500
    nested = b'{"":' * depth + b"0" + b"}" * depth
    objects = b",".join([nested] * (validation.MAX_DOCUMENT_CONTAINERS // depth - 1))
    strings = b'"ab",' * ((validation.MAX_DOCUMENT_BYTES - len(objects) - 64) // 5)
    data = b'{"format_version":1,"x":[' + strings + objects + b"]}\n"
    assert len(data) <= validation.MAX_DOCUMENT_BYTES
    assert data.count(b"[") + data.count(b"{") <= validation.MAX_DOCUMENT_CONTAINERS
    return data


def nested_arrays_document() -> bytes:
    """16 MiB of nested empty arrays: 50 bytes of memory per byte if parsed; refused before parsing."""
    nested = b"[" * 500 + b"]" * 500
    data = b'{"format_version":1,"x":[' + b",".join([nested] * (validation.MAX_DOCUMENT_BYTES // 1001 - 1)) + b"]}\n"
    assert len(data) <= validation.MAX_DOCUMENT_BYTES
    return data


DOCUMENTS = {"largest": largest_document, "tiny-containers": tiny_containers_document, "nested": nested_arrays_document}


@pytest.mark.parametrize(
    ("shape", "outcome"),
    [("largest", "ok"), ("tiny-containers", "MetadataError: "), ("nested", "MetadataError: ")],
)
def test_parsing_metadata_stays_under_the_documented_bound(tmp_path: Path, shape: str, outcome: str) -> None:
    data = DOCUMENTS[shape]()
    path = tmp_path / "_metadata"
    path.write_bytes(data)
    result = run_child("parse-metadata", str(tmp_path), str(path))
    assert result["outcome"].startswith(outcome), result
    containers = min(data.count(b"[") + data.count(b"{"), validation.MAX_DOCUMENT_CONTAINERS)
    assert growth(result) < PER_BYTE * len(data) + PER_CONTAINER * containers, result
    if shape == "largest":
        assert growth(result) < KEYSTATE_PER_BYTE * len(data), result
    if shape == "nested":
        assert "JSON objects and arrays" in result["outcome"]
