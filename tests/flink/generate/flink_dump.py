"""What Apache Flink's own loader reads from a ``_metadata`` file, as JSON (the ``flink-dump.json`` files).

Loads the file with ``org.apache.flink.runtime.checkpoint.Checkpoints.loadCheckpointMetadata`` inside
PyFlink's gateway JVM (py4j) and turns the loaded Java objects into plain JSON. Needs PyFlink (and a JDK)
in the running interpreter; works with Flink 1.20 and 2.x.

Fields (the same as the shared Flink 2.3.0 fixtures' ``flink-dump.json``, plus a few marked *extra*):
``fileSize``, ``magic``, ``metadataVersion`` (the two header ints of the file), ``checkpointId``,
``checkpointProperties`` (Flink's ``toString()``), ``masterStates`` (count), *extra* ``flinkVersion``
(the loading Flink), and ``operators`` sorted by operator ID, each with ``operatorID``, ``name`` and
``uid`` (null when the file has none: format 4 never has them), ``class``, ``fullyFinished``,
``parallelism``, ``maxParallelism``, ``stateSize``, ``coordinatorState``, and ``subtasks`` keyed by index
(``class``, ``finished``, ``hasState``, ``stateSize``, ``managedKeyed``, ``managedOperator``, counts
``rawKeyed``, ``rawOperator``, ``inputChannelState``, ``resultSubpartitionState``). A subtask that Flink
does not list is absent. Handles: ``type`` (Java simple class name), ``stateSize``, and as applicable
``checkpointedSize``, ``keyGroupRange`` ([first, last]), ``delegate`` / ``metaState``, ``sharedFiles`` /
``privateFiles`` (counts), *extra* ``files`` (each ``{"scope": "shared"|"private", "localPath", ...stream
handle}``), ``states`` (name -> ``mode``, ``offsets``). Stream handles: ``ByteStreamStateHandle`` ->
``handleName``; ``FileStateHandle`` -> ``filePath``; ``RelativeFileStateHandle`` -> ``relativePath``.

Every path-like string is passed through ``normalize`` (by default: unchanged); the generator replaces
the scratch directory the job wrote to by ``<checkpoint-root>`` (checkpoints) or ``<savepoint-root>``.
"""

from __future__ import annotations

import contextlib
import importlib
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["dump_metadata", "operator_status"]


def _gw() -> Any:
    return importlib.import_module("pyflink.java_gateway").get_gateway()


def _items(java_collection: Any) -> list[Any]:
    """The elements of any java.util.Collection (py4j converts only List/Set/Map by itself)."""
    return list(java_collection.toArray())


def _opt(java_optional: Any) -> str | None:
    return str(java_optional.get()) if java_optional.isPresent() else None


Norm = Callable[[str], str]


def _stream(h: Any, norm: Norm) -> dict[str, Any] | None:
    if h is None:
        return None
    t = str(h.getClass().getSimpleName())
    d: dict[str, Any] = {"type": t, "stateSize": int(h.getStateSize())}
    if t == "ByteStreamStateHandle":
        d["handleName"] = norm(str(h.getHandleName()))
    elif t == "RelativeFileStateHandle":
        d["relativePath"] = str(h.getRelativePath())  # resolved against the _metadata's directory
    elif t == "FileStateHandle":
        d["filePath"] = norm(str(h.getFilePath().toString()))
    elif t in ("SegmentFileStateHandle",):
        d["filePath"] = norm(str(h.getFilePath().toString()))
        d["startPos"] = int(h.getStartPos())
    return d


def _keyed(h: Any, norm: Norm) -> dict[str, Any]:
    t = str(h.getClass().getSimpleName())
    d: dict[str, Any] = {"type": t, "stateSize": int(h.getStateSize())}
    with contextlib.suppress(Exception):  # not every handle has it (py4j raises Py4JError)
        d["checkpointedSize"] = int(h.getCheckpointedSize())
    kgr = h.getKeyGroupRange()
    d["keyGroupRange"] = [int(kgr.getStartKeyGroup()), int(kgr.getEndKeyGroup())]
    if t in ("KeyGroupsStateHandle", "KeyGroupsSavepointStateHandle"):
        d["delegate"] = _stream(h.getDelegateStateHandle(), norm)
    elif t == "IncrementalRemoteKeyedStateHandle":
        shared = _items(h.getSharedState())
        private = _items(h.getPrivateState())
        d["sharedFiles"] = len(shared)
        d["privateFiles"] = len(private)
        d["metaState"] = _stream(h.getMetaDataStateHandle(), norm)
        files = []
        for scope, lst in (("shared", shared), ("private", private)):
            for hl in lst:
                files.append(
                    {"scope": scope, "localPath": str(hl.getLocalPath()), **(_stream(hl.getHandle(), norm) or {})}
                )
        d["files"] = files
    return d


def _operator(h: Any, norm: Norm) -> dict[str, Any]:
    t = str(h.getClass().getSimpleName())
    d: dict[str, Any] = {
        "type": t,
        "stateSize": int(h.getStateSize()),
        "delegate": _stream(h.getDelegateStateHandle(), norm),
    }
    states = {}
    for name, info in h.getStateNameToPartitionOffsets().items():
        states[str(name)] = {
            "mode": str(info.getDistributionMode().name()),
            "offsets": [int(x) for x in info.getOffsets()],
        }
    d["states"] = dict(sorted(states.items()))
    return d


def _subtask(s: Any, norm: Norm) -> dict[str, Any]:
    return {
        "class": str(s.getClass().getSimpleName()),
        "finished": bool(s.isFinished()),
        "hasState": bool(s.hasState()),
        "stateSize": int(s.getStateSize()),
        "managedKeyed": [_keyed(h, norm) for h in _items(s.getManagedKeyedState())],
        "managedOperator": [_operator(h, norm) for h in _items(s.getManagedOperatorState())],
        "rawKeyed": len(_items(s.getRawKeyedState())),
        "rawOperator": len(_items(s.getRawOperatorState())),
        "inputChannelState": len(_items(s.getInputChannelState())),
        "resultSubpartitionState": len(_items(s.getResultSubpartitionState())),
    }


def _same(s: str) -> str:
    return s


def dump_metadata(metadata_path: str | Path, normalize: Norm = _same) -> dict[str, Any]:
    """Flink's view of one ``_metadata`` file (see the module docstring for the fields)."""
    path = Path(metadata_path).resolve()
    raw = path.read_bytes()
    magic, version = struct.unpack(">ii", raw[:8])
    jvm = _gw().jvm
    stream = jvm.java.io.DataInputStream(jvm.java.io.FileInputStream(str(path)))
    try:
        md = jvm.org.apache.flink.runtime.checkpoint.Checkpoints.loadCheckpointMetadata(
            stream, jvm.Thread.currentThread().getContextClassLoader(), str(path.parent)
        )
    finally:
        stream.close()
    ops: list[dict[str, Any]] = []
    for op in _items(md.getOperatorStates()):
        try:
            name, uid = _opt(op.getOperatorName()), _opt(op.getOperatorUid())
        except Exception:  # Flink 1.x OperatorState has neither (py4j raises Py4JError)
            name = uid = None
        subtasks: dict[str, Any] = {}
        for idx, s in sorted(((int(k), v) for k, v in op.getSubtaskStates().items())):
            subtasks[str(idx)] = _subtask(s, normalize)
        ops.append(
            {
                "operatorID": str(op.getOperatorID().toHexString()),
                "name": name,
                "uid": uid,
                "class": str(op.getClass().getSimpleName()),
                "fullyFinished": bool(op.isFullyFinished()),
                "parallelism": int(op.getParallelism()),
                "maxParallelism": int(op.getMaxParallelism()),
                "stateSize": int(op.getStateSize()),
                "coordinatorState": _stream(op.getCoordinatorState(), normalize),
                "subtasks": subtasks,
            }
        )
    ops.sort(key=lambda o: o["operatorID"])
    return {
        "fileSize": len(raw),
        "magic": f"0x{magic & 0xFFFFFFFF:08x}",
        "metadataVersion": version,
        "flinkVersion": str(jvm.org.apache.flink.runtime.util.EnvironmentInformation.getVersion()),
        "checkpointId": int(md.getCheckpointId()),
        "checkpointProperties": str(md.getCheckpointProperties().toString()),
        "masterStates": len(_items(md.getMasterStates())),
        "operators": ops,
    }


def operator_status(op: dict[str, Any]) -> str:
    """keystate's status word for one dumped operator: fully_finished, partially_finished or running."""
    if op["fullyFinished"]:
        return "fully_finished"
    if any(s["finished"] for s in op["subtasks"].values()):
        return "partially_finished"
    return "running"
