"""Properties of the JSON documents keystate reads: (a) ``_metadata`` files and (d) topology files. Either
the bytes parse into something that round-trips (and, for metadata, that every tool can show), or the
parser raises its typed error with a message naming the file."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from hypothesis import strategies as st

from keystate.runtime.restore_rules import check_restore
from keystate.storage import (
    CheckpointKind,
    CheckpointMetadata,
    CheckpointStorage,
    CompletedCheckpoint,
    HandleScope,
    MemoryObjectStore,
    MetadataError,
    StreamHandle,
    Topology,
    TopologyError,
)
from keystate.storage.base import join_key, validate_key
from keystate.storage.format import dump_metadata, parse_metadata
from keystate.storage.format._metadata_v1 import dump_v1
from keystate.tools.render import render_graph, render_operator, render_report, render_summary
from keystate.tools.summary import summarize
from tests.fuzz import samples
from tests.fuzz.harness import FuzzContext
from tests.fuzz.strategies import (
    encoded_document,
    hostile_numbers,
    hostile_strings,
    json_values,
    mutated_bytes,
    mutated_document,
)

__all__ = [
    "TOPOLOGY_WHERE",
    "WHERE",
    "check_accepted_metadata",
    "check_metadata_bytes",
    "check_topology_bytes",
    "metadata_arbitrary_bytes",
    "metadata_arbitrary_json",
    "metadata_damaged",
    "metadata_mutated",
    "metadata_plausible",
    "topology_arbitrary",
    "topology_mutated",
]

WHERE = "/fuzz/job/chk-1/_metadata"
TOPOLOGY_WHERE = "/fuzz/topology.json"

_Parsed = TypeVar("_Parsed")


def _parse_or_refuse(
    parse: Callable[[bytes, str], _Parsed], error: type[Exception], data: bytes, where: str
) -> _Parsed | None:
    """``parse(data, where)``, or ``None`` when it raised ``error`` with a message that starts with the file
    it is about (docs/format.md section 4.2). Any other exception escapes."""
    try:
        return parse(data, where)
    except error as exc:
        message = str(exc)
        assert message.startswith(where + ":"), message
        return None


# --- (a) _metadata ------------------------------------------------------------------------------------


def _checkpoint_directory(m: CheckpointMetadata) -> str:
    if m.kind is CheckpointKind.SAVEPOINT:
        return f"root/savepoints/savepoint-{m.job_id[:6]}-0123456789ab"
    return f"root/{m.job_id}/chk-{m.checkpoint_id}"


def _check_handle_path(checkpoint: CompletedCheckpoint, handle: StreamHandle) -> None:
    """A handle of accepted metadata resolves to a key inside its checkpoint's directory (or the job's
    ``shared/``): relative, no ``..`` / ``.`` / empty segments, nothing a filesystem would normalize."""
    if handle.scope is HandleScope.INLINE:
        assert handle.path is None
        assert handle.data is not None
        assert len(handle.data) == handle.size
        assert checkpoint.state_key(handle) is None
        return
    path = handle.path
    assert path is not None
    assert handle.data is None
    assert not path.startswith("/"), path
    assert "\\" not in path, path
    assert ":" not in path.split("/")[0], path
    assert all(segment not in ("", ".", "..") for segment in path.split("/")), path
    assert posixpath.normpath(path) == path, path
    assert all(c.isascii() and c.isprintable() for c in path), path
    try:
        key = checkpoint.state_key(handle)
    except MetadataError:
        assert handle.scope is HandleScope.SHARED
        assert checkpoint.kind is CheckpointKind.SAVEPOINT
        return
    if handle.scope is HandleScope.EXCLUSIVE:
        base = checkpoint.directory
    else:
        base = join_key(checkpoint.directory.rsplit("/", 1)[0], "shared")
    assert key == f"{base}/{path}", (key, base, path)
    assert posixpath.normpath(key) == key
    assert key.startswith(base + "/")
    validate_key(key)


def check_accepted_metadata(m: CheckpointMetadata) -> None:
    """Accepted metadata round-trips, keeps its paths inside the checkpoint, and every tool can show it.

    Version 2 is written, except for what only version 1 can hold (a shared file of unknown writer): version 2
    refuses to write it, and version 1 round-trips it."""
    if any(h.scope is HandleScope.SHARED and h.written_by is None for h in m.handles()):
        with pytest.raises(MetadataError, match="written_by"):
            dump_metadata(m)
        dump: Callable[[CheckpointMetadata], bytes] = dump_v1
    else:
        dump = dump_metadata
    data = dump(m)
    again = parse_metadata(data, WHERE)
    assert again == m
    assert dump(again) == data
    assert m.incremental_state_bytes <= m.full_state_bytes
    checkpoint = CompletedCheckpoint(CheckpointStorage(MemoryObjectStore("fuzz"), "root"), _checkpoint_directory(m), m)
    for handle in m.handles():
        _check_handle_path(checkpoint, handle)
    summary = summarize(checkpoint)
    json.dumps(summary.to_dict(), allow_nan=False)
    report = check_restore(m, m.topology())
    json.dumps(report.to_dict(), allow_nan=False)
    texts = [render_summary(summary), render_graph(summary, "mermaid"), render_graph(summary, "dot"),
             render_report(report, len(m.operators))]  # fmt: skip
    texts += [render_operator(summary, op.uid) for op in m.operators]
    for text in texts:
        text.encode("utf-8")  # what a UTF-8 terminal or pipe needs


def check_metadata_bytes(ctx: FuzzContext, data: bytes) -> None:
    """``parse_metadata`` returns metadata that round-trips, or raises ``MetadataError`` naming the file."""
    metadata = _parse_or_refuse(parse_metadata, MetadataError, data, WHERE)
    if metadata is not None:
        check_accepted_metadata(metadata)


def _golden_docs() -> list[Any]:
    return [json.loads(data) for data in samples.golden_documents().values()]


def metadata_arbitrary_bytes(ctx: FuzzContext) -> st.SearchStrategy[bytes]:
    prefix = st.sampled_from([b'{"format_version":1,', b'{"format_version":2,'])
    return st.one_of(st.binary(max_size=300), st.tuples(prefix, st.binary(max_size=64)).map(b"".join))


def metadata_arbitrary_json(ctx: FuzzContext) -> st.SearchStrategy[bytes]:
    top = st.dictionaries(
        st.sampled_from(["format_version", "checkpoint_id", "job_id", "kind", "timestamp", "properties",
                         "operators", "statistics", "x"]),
        json_values(nan=True),
    )  # fmt: skip
    return st.one_of(json_values(nan=True), top).flatmap(encoded_document)


def metadata_mutated(ctx: FuzzContext) -> st.SearchStrategy[bytes]:
    docs = _golden_docs()
    mutated = st.sampled_from(docs).flatmap(lambda doc: mutated_document(doc)).map(lambda pair: pair[0])
    return mutated.flatmap(encoded_document)


def metadata_plausible(ctx: FuzzContext) -> st.SearchStrategy[bytes]:
    docs = _golden_docs()
    mutated = st.sampled_from(docs).flatmap(lambda doc: mutated_document(doc, plausible=True))
    return mutated.map(lambda pair: json.dumps(pair[0], ensure_ascii=False).encode("utf-8", "surrogatepass"))


def metadata_damaged(ctx: FuzzContext) -> st.SearchStrategy[bytes]:
    originals = list(samples.golden_documents().values())
    truncated = st.sampled_from(originals).flatmap(lambda d: st.integers(0, len(d)).map(lambda n: d[:n]))
    flipped = st.sampled_from(originals).flatmap(lambda d: mutated_bytes(d)).map(lambda pair: pair[0])
    return st.one_of(truncated, flipped)


# --- (d) topology files ---------------------------------------------------------------------------------


def check_topology_bytes(ctx: FuzzContext, data: bytes) -> None:
    """``Topology.from_json_bytes`` returns a topology that round-trips, or raises ``TopologyError``."""
    topology = _parse_or_refuse(Topology.from_json_bytes, TopologyError, data, TOPOLOGY_WHERE)
    if topology is None:
        return
    written = topology.to_json_bytes()
    again = Topology.from_json_bytes(written, TOPOLOGY_WHERE)
    assert again == topology
    assert again.to_json_bytes() == written
    order = topology.topological_order()
    assert sorted(op.uid for op in order) == sorted(op.uid for op in topology)
    for op in topology:
        assert op.parallelism <= op.effective_max_parallelism <= 32768


def topology_arbitrary(ctx: FuzzContext) -> st.SearchStrategy[bytes]:
    operator = st.fixed_dictionaries(
        {"uid": st.one_of(st.sampled_from(["a", "b", "c"]), hostile_strings()),
         "parallelism": hostile_numbers()},
        optional={"max_parallelism": st.one_of(st.none(), hostile_numbers()),
                  "inputs": st.lists(st.fixed_dictionaries({"from": st.sampled_from(["a", "b", "c"]),
                                                            "partitioning": st.sampled_from(
                                                                ["forward", "hash", "rescale", "x"])}), max_size=3),
                  "extra": json_values()},
    )  # fmt: skip
    doc = st.fixed_dictionaries(
        {"format_version": st.one_of(st.just(1), hostile_numbers()), "operators": st.lists(operator, max_size=4)}
    )
    return st.one_of(json_values(nan=True), doc).flatmap(encoded_document)


def topology_mutated(ctx: FuzzContext | None = None) -> st.SearchStrategy[bytes]:
    design = json.loads(samples.DESIGN_TOPOLOGY)
    mutated = mutated_document(design).map(lambda pair: pair[0]).flatmap(encoded_document)
    damaged = mutated_bytes(samples.DESIGN_TOPOLOGY).map(lambda pair: pair[0])
    return st.one_of(mutated, damaged)
