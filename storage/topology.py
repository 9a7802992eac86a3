"""Job topology: operators, their parallelism and their input edges; and the topology file (JSON).

The topology file is a contract relied on outside this repo (DESIGN.md section 8)::

    {"format_version": 1,
     "operators": [
       {"uid": "orders", "parallelism": 2, "max_parallelism": 128, "inputs": []},
       {"uid": "totals", "parallelism": 4, "inputs": [{"from": "orders", "partitioning": "hash"}]}]}

``max_parallelism`` is optional (absent = derived by Flink's default rule, and on restore adopted from
the checkpoint). Checkpoint metadata records the same topology at checkpoint time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from keystate.storage.errors import TopologyError, UnsupportedFormatVersionError
from keystate.storage.keygroups import UPPER_BOUND_MAX_PARALLELISM, default_max_parallelism
from keystate.storage.validation import check_keys, loads_strict, opt_int, req_int, req_list, req_str

__all__ = ["UID_PATTERN", "InputEdge", "Partitioning", "Topology", "TopologyOperator"]

TOPOLOGY_FORMAT_VERSION = 1
SUPPORTED_TOPOLOGY_VERSIONS = (1,)

UID_PATTERN = re.compile(r"[^\x00-\x1f\x7f]{1,256}")
"""A uid is 1..256 characters with no control characters (and valid UTF-8: no lone surrogates)."""


def check_uid(uid: str) -> str:
    """Raise ``TopologyError`` unless ``uid`` matches :data:`UID_PATTERN` and encodes as UTF-8."""
    if not isinstance(uid, str) or not UID_PATTERN.fullmatch(uid):
        raise TopologyError(f"operator uid {uid!r} must be 1..256 characters without control characters")
    try:
        uid.encode("utf-8")
    except UnicodeEncodeError:
        raise TopologyError(f"operator uid {uid!r} is not valid UTF-8 text (lone surrogate)") from None
    return uid


class Partitioning(StrEnum):
    """How records travel along an edge. ``forward`` and ``rescale`` are pointwise, the rest all-to-all."""

    FORWARD = "forward"
    RESCALE = "rescale"
    HASH = "hash"
    REBALANCE = "rebalance"
    BROADCAST = "broadcast"

    @property
    def pointwise(self) -> bool:
        return self in (Partitioning.FORWARD, Partitioning.RESCALE)


@dataclass(frozen=True, slots=True)
class InputEdge:
    """An input of an operator: the upstream operator's uid (``from`` in JSON) and the partitioning."""

    source: str
    partitioning: Partitioning

    def to_dict(self) -> dict[str, Any]:
        return {"from": self.source, "partitioning": self.partitioning.value}


@dataclass(frozen=True, slots=True)
class TopologyOperator:
    """One operator of a job graph as the topology file describes it."""

    uid: str
    parallelism: int
    max_parallelism: int | None = None
    """``None`` means derived (Flink's default rule); an explicit value may not change across restores."""
    inputs: tuple[InputEdge, ...] = ()

    @property
    def effective_max_parallelism(self) -> int:
        return self.max_parallelism if self.max_parallelism is not None else default_max_parallelism(self.parallelism)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"uid": self.uid, "parallelism": self.parallelism}
        if self.max_parallelism is not None:
            d["max_parallelism"] = self.max_parallelism
        d["inputs"] = [e.to_dict() for e in self.inputs]
        return d


@dataclass(frozen=True)
class Topology:
    """A validated job topology: unique uids, known inputs, no cycles, consistent parallelism.

    Raises:
        TopologyError: on construction, if any of those does not hold.
    """

    operators: tuple[TopologyOperator, ...]
    _by_uid: dict[str, TopologyOperator] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_uid: dict[str, TopologyOperator] = {}
        for op in self.operators:
            check_uid(op.uid)
            if op.uid in by_uid:
                raise TopologyError(f"operator uid {op.uid!r} appears twice; uids must be unique")
            by_uid[op.uid] = op
            if not 1 <= op.parallelism <= UPPER_BOUND_MAX_PARALLELISM:
                raise TopologyError(
                    f"operator {op.uid!r}: parallelism must be in 1..{UPPER_BOUND_MAX_PARALLELISM}, "
                    f"found {op.parallelism}"
                )
            if op.max_parallelism is not None:
                if not 1 <= op.max_parallelism <= UPPER_BOUND_MAX_PARALLELISM:
                    raise TopologyError(
                        f"operator {op.uid!r}: max_parallelism is not in valid bounds "
                        f"(1..{UPPER_BOUND_MAX_PARALLELISM}), found: {op.max_parallelism}"
                    )
                if op.parallelism > op.max_parallelism:
                    raise TopologyError(
                        f"operator {op.uid!r}: parallelism {op.parallelism} is not smaller or equal to "
                        f"max parallelism {op.max_parallelism}"
                    )
        object.__setattr__(self, "_by_uid", by_uid)
        for op in self.operators:
            for edge in op.inputs:
                upstream = by_uid.get(edge.source)
                if upstream is None:
                    raise TopologyError(f"operator {op.uid!r} has an input from unknown operator {edge.source!r}")
                if edge.partitioning is Partitioning.FORWARD and upstream.parallelism != op.parallelism:
                    raise TopologyError(
                        f"operator {op.uid!r}: forward input from {edge.source!r} needs equal parallelism "
                        f"(found {upstream.parallelism} -> {op.parallelism}); use rescale or rebalance"
                    )
        self.topological_order()  # raises on cycles

    def __iter__(self) -> Iterator[TopologyOperator]:
        return iter(self.operators)

    def __contains__(self, uid: object) -> bool:
        return uid in self._by_uid

    def operator(self, uid: str) -> TopologyOperator:
        try:
            return self._by_uid[uid]
        except KeyError:
            raise KeyError(f"no operator with uid {uid!r} in the topology") from None

    def get(self, uid: str) -> TopologyOperator | None:
        return self._by_uid.get(uid)

    def predecessors(self, uid: str) -> list[tuple[TopologyOperator, InputEdge]]:
        """The upstream operators of ``uid`` with the edge that connects each."""
        return [(self._by_uid[e.source], e) for e in self.operator(uid).inputs]

    def successors(self, uid: str) -> list[tuple[TopologyOperator, InputEdge]]:
        return [(op, e) for op in self.operators for e in op.inputs if e.source == uid]

    def topological_order(self) -> list[TopologyOperator]:
        """Operators with every operator after all its inputs (stable: file order breaks ties).

        Raises:
            TopologyError: the graph has a cycle.
        """
        done: set[str] = set()
        order: list[TopologyOperator] = []
        pending = list(self.operators)
        while pending:
            progressed = False
            rest: list[TopologyOperator] = []
            for op in pending:
                if all(e.source in done for e in op.inputs):
                    done.add(op.uid)
                    order.append(op)
                    progressed = True
                else:
                    rest.append(op)
            if not progressed:
                names = ", ".join(repr(op.uid) for op in rest)
                raise TopologyError(f"the topology has a cycle through {names}; a job graph must be acyclic")
            pending = rest
        return order

    # --- the topology file ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": TOPOLOGY_FORMAT_VERSION,
            "operators": [op.to_dict() for op in self.operators],
        }

    def to_json_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode()

    @classmethod
    def from_json_bytes(cls, data: bytes, where: str) -> Topology:
        """Parse a topology file.

        Raises:
            TopologyError: not JSON, unsupported ``format_version``, or any invalid field.
        """
        doc = loads_strict(data, where, TopologyError)
        if not isinstance(doc, dict):
            raise TopologyError(f"{where}: a topology file must be a JSON object, found {type(doc).__name__}")
        return cls.from_dict(doc, where)

    @classmethod
    def from_dict(cls, doc: dict[str, Any], where: str) -> Topology:
        version = doc.get("format_version")
        if "format_version" not in doc:
            raise TopologyError(f"{where}: required field 'format_version' is missing")
        # ``True == 1`` and ``1.0 == 1`` in Python: only a JSON integer names a version.
        if isinstance(version, bool) or not isinstance(version, int) or version not in SUPPORTED_TOPOLOGY_VERSIONS:
            raise UnsupportedTopologyVersionError("topology", version, SUPPORTED_TOPOLOGY_VERSIONS, where)
        check_keys(doc, where, ("format_version", "operators"), error=TopologyError)
        operators: list[TopologyOperator] = []
        for i, raw in enumerate(req_list(doc, "operators", where, TopologyError)):
            operators.append(parse_topology_operator(raw, f"{where}: operators[{i}]"))
        try:
            return cls(tuple(operators))
        except TopologyError as exc:
            raise TopologyError(f"{where}: {exc}") from exc


class UnsupportedTopologyVersionError(UnsupportedFormatVersionError, TopologyError):
    """A topology file's ``format_version`` is unknown or newer than this keystate supports."""


def parse_input_edge(raw: object, where: str, error: type[Exception] = TopologyError) -> InputEdge:
    if not isinstance(raw, dict):
        raise error(f"{where}: an input must be an object with 'from' and 'partitioning'")
    check_keys(raw, where, ("from", "partitioning"), error=error)
    source = req_str(raw, "from", where, error, pattern=UID_PATTERN)
    mode = req_str(raw, "partitioning", where, error, choices=[p.value for p in Partitioning])
    return InputEdge(source, Partitioning(mode))


def parse_topology_operator(raw: object, where: str) -> TopologyOperator:
    if not isinstance(raw, dict):
        raise TopologyError(f"{where}: an operator must be a JSON object")
    check_keys(raw, where, ("uid", "parallelism"), ("max_parallelism", "inputs"), error=TopologyError)
    uid = req_str(raw, "uid", where, TopologyError, pattern=UID_PATTERN)
    parallelism = req_int(raw, "parallelism", where, TopologyError, min_value=1, max_value=UPPER_BOUND_MAX_PARALLELISM)
    max_p = opt_int(raw, "max_parallelism", where, TopologyError, min_value=1, max_value=UPPER_BOUND_MAX_PARALLELISM)
    raw_inputs = req_list(raw, "inputs", where, TopologyError) if "inputs" in raw else []
    inputs = tuple(parse_input_edge(e, f"{where}.inputs[{j}]") for j, e in enumerate(raw_inputs))
    return TopologyOperator(uid, parallelism, max_p, inputs)
