"""Job topology: operators, their parallelism and their input edges; and the topology file (JSON).

The topology file is a contract relied on outside this repo (docs/architecture.md#the-topology-file)::

    {"format_version": 1,
     "operators": [
       {"uid": "orders", "parallelism": 2, "max_parallelism": 128, "inputs": []},
       {"uid": "totals", "parallelism": 4, "inputs": [{"from": "orders", "partitioning": "hash"}]}]}

``max_parallelism`` is optional (absent = derived by Flink's default rule, and on restore adopted from
the checkpoint). Checkpoint metadata records the same topology at checkpoint time.

Two optional extensions describe a Flink job exactly (docs/flink.md): an operator's ``operator_id`` (32
hex digits: the ID Flink stores the operator's state under, for an operator without a uid or with
``setUidHash``; by default Flink derives it from the uid with MurmurHash3, see :func:`flink_id_of`) and a
top-level ``"chains": [[uid, ...], ...]``, one list per Flink chain (JobVertex), head first; an operator
in no chain is a vertex of its own. keystate's own job graphs use neither, and write neither.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from keystate.storage.errors import TopologyError, UnsupportedFormatVersionError
from keystate.storage.format.keygroups import UPPER_BOUND_MAX_PARALLELISM, default_max_parallelism
from keystate.storage.format.validation import check_keys, loads_strict, opt_int, req_int, req_list, req_str

__all__ = ["OPERATOR_ID_PATTERN", "UID_PATTERN", "InputEdge", "Partitioning", "Topology", "TopologyOperator"]

TOPOLOGY_FORMAT_VERSION = 1
SUPPORTED_TOPOLOGY_VERSIONS = (1,)

UID_PATTERN = re.compile(r"[^\x00-\x1f\x7f]{1,256}")
"""A uid is 1..256 characters with no control characters (and valid UTF-8: no lone surrogates)."""

OPERATOR_ID_PATTERN = re.compile(r"[0-9a-fA-F]{32}")
"""A Flink operator ID: 16 bytes as 32 hex digits (``OperatorID.toHexString()``; stored lowercase)."""


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
    operator_id: str | None = None
    """Flink's operator ID (32 lowercase hex digits) when it is not the hash of ``uid``: an operator without
    a uid (``uid`` is then only a name) or with ``setUidHash``. ``None``: derived from ``uid``."""

    @property
    def effective_max_parallelism(self) -> int:
        return self.max_parallelism if self.max_parallelism is not None else default_max_parallelism(self.parallelism)

    @property
    def flink_operator_id(self) -> str:
        """The ID Flink stores this operator's state under: ``operator_id``, else the hash of the uid."""
        return self.operator_id if self.operator_id is not None else flink_id_of(self.uid)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"uid": self.uid}
        if self.operator_id is not None:
            d["operator_id"] = self.operator_id
        d["parallelism"] = self.parallelism
        if self.max_parallelism is not None:
            d["max_parallelism"] = self.max_parallelism
        d["inputs"] = [e.to_dict() for e in self.inputs]
        return d


def flink_id_of(uid: str) -> str:
    """Flink's operator ID for an operator with ``.uid(uid)``: MurmurHash3 x64 128, seed 0, as 32 hex digits."""
    # Imported here, not at the top: the flink package imports the metadata model, which imports this module.
    from keystate.storage.format.flink._murmur import flink_operator_id

    return flink_operator_id(uid)


@dataclass(frozen=True)
class Topology:
    """A validated job topology: unique uids, known inputs, no cycles, consistent parallelism; with
    ``chains``, every chain names known operators, none twice, and its operators share one parallelism
    and one max parallelism (a Flink JobVertex has one of each).

    Raises:
        TopologyError: on construction, if any of those does not hold.
    """

    operators: tuple[TopologyOperator, ...]
    chains: tuple[tuple[str, ...], ...] = ()
    """Flink's operator chains (JobVertices) by uid, head first; an operator in none is its own vertex."""
    _by_uid: dict[str, TopologyOperator] = field(init=False, repr=False, compare=False)
    _vertex_of: dict[str, tuple[TopologyOperator, ...]] = field(init=False, repr=False, compare=False)

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
        self._check_operator_ids()
        object.__setattr__(self, "_vertex_of", self._check_chains())

    def _check_operator_ids(self) -> None:
        explicit = [op for op in self.operators if op.operator_id is not None]
        if not explicit:
            return  # derived IDs are 128-bit hashes of distinct uids: they do not collide
        for op in explicit:
            assert op.operator_id is not None
            if not OPERATOR_ID_PATTERN.fullmatch(op.operator_id) or op.operator_id != op.operator_id.lower():
                raise TopologyError(
                    f"operator {op.uid!r}: operator_id must be 32 lowercase hex digits (a Flink operator ID), "
                    f"found {op.operator_id!r}"
                )
        owner: dict[str, str] = {}
        for op in self.operators:
            oid = op.flink_operator_id
            if oid in owner:
                raise TopologyError(
                    f"operators {owner[oid]!r} and {op.uid!r} have the same Flink operator ID {oid}; an operator ID "
                    "names one operator: fix the operator_id of one of them"
                )
            owner[oid] = op.uid

    def _check_chains(self) -> dict[str, tuple[TopologyOperator, ...]]:
        vertex_of: dict[str, tuple[TopologyOperator, ...]] = {}
        for i, chain in enumerate(self.chains):
            if not chain:
                raise TopologyError(f"chains[{i}] is empty; a chain lists at least its head operator")
            members: list[TopologyOperator] = []
            for j, uid in enumerate(chain):
                op = self._by_uid.get(uid)
                if op is None:
                    raise TopologyError(
                        f"chains[{i}][{j}]: unknown operator uid {uid!r}; a chain lists uids of this topology's "
                        "operators"
                    )
                if uid in vertex_of or any(m.uid == uid for m in members):
                    raise TopologyError(
                        f"chains[{i}][{j}]: operator {uid!r} is in two chains (or twice in one); an operator belongs "
                        "to one Flink job vertex"
                    )
                members.append(op)
            head = members[0]
            for j, op in enumerate(members[1:], 1):
                if (op.parallelism, op.max_parallelism) != (head.parallelism, head.max_parallelism):
                    raise TopologyError(
                        f"chains[{i}][{j}]: operator {op.uid!r} has parallelism {op.parallelism} and max_parallelism "
                        f"{op.max_parallelism}, but its chain head {head.uid!r} has {head.parallelism} and "
                        f"{head.max_parallelism}; a chain is one Flink job vertex with one parallelism and one max "
                        "parallelism (its head's): give every operator of the chain the head's values"
                    )
            vertex = tuple(members)
            for op in members:
                vertex_of[op.uid] = vertex
        for op in self.operators:
            vertex_of.setdefault(op.uid, (op,))
        return vertex_of

    def vertex(self, uid: str) -> tuple[TopologyOperator, ...]:
        """The Flink job vertex (chain) of operator ``uid``, head first; ``(op,)`` when it is in no chain."""
        self.operator(uid)
        return self._vertex_of[uid]

    def vertices(self) -> list[tuple[TopologyOperator, ...]]:
        """Every vertex once, in the topological order of the first of its operators to appear."""
        seen: set[str] = set()
        result: list[tuple[TopologyOperator, ...]] = []
        for op in self.topological_order():
            vertex = self._vertex_of[op.uid]
            if vertex[0].uid not in seen:
                seen.add(vertex[0].uid)
                result.append(vertex)
        return result

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
        doc: dict[str, Any] = {
            "format_version": TOPOLOGY_FORMAT_VERSION,
            "operators": [op.to_dict() for op in self.operators],
        }
        if self.chains:
            doc["chains"] = [list(chain) for chain in self.chains]
        return doc

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
        check_keys(doc, where, ("format_version", "operators"), ("chains",), error=TopologyError)
        operators: list[TopologyOperator] = []
        for i, raw in enumerate(req_list(doc, "operators", where, TopologyError)):
            operators.append(parse_topology_operator(raw, f"{where}: operators[{i}]"))
        chains = parse_chains(doc, where) if "chains" in doc else ()
        try:
            return cls(tuple(operators), chains)
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


def parse_chains(doc: dict[str, Any], where: str) -> tuple[tuple[str, ...], ...]:
    """The ``chains`` field: an array of non-empty arrays of uids (which uids exist is checked by ``Topology``)."""
    chains: list[tuple[str, ...]] = []
    for i, raw in enumerate(req_list(doc, "chains", where, TopologyError)):
        if not isinstance(raw, list):
            raise TopologyError(
                f"{where}: chains[{i}] must be an array of operator uids (one Flink chain, head first), "
                f"found {type(raw).__name__}"
            )
        if not raw:
            raise TopologyError(f"{where}: chains[{i}] is empty; a chain lists at least its head operator")
        for j, uid in enumerate(raw):
            if not isinstance(uid, str) or not UID_PATTERN.fullmatch(uid):
                raise TopologyError(f"{where}: chains[{i}][{j}] must be an operator uid (a string), found {uid!r}")
        chains.append(tuple(raw))
    return tuple(chains)


def parse_topology_operator(raw: object, where: str) -> TopologyOperator:
    if not isinstance(raw, dict):
        raise TopologyError(f"{where}: an operator must be a JSON object")
    check_keys(raw, where, ("uid", "parallelism"), ("max_parallelism", "inputs", "operator_id"), error=TopologyError)
    uid = req_str(raw, "uid", where, TopologyError, pattern=UID_PATTERN)
    operator_id = None
    if "operator_id" in raw:
        operator_id = req_str(raw, "operator_id", where, TopologyError, pattern=OPERATOR_ID_PATTERN).lower()
    parallelism = req_int(raw, "parallelism", where, TopologyError, min_value=1, max_value=UPPER_BOUND_MAX_PARALLELISM)
    max_p = opt_int(raw, "max_parallelism", where, TopologyError, min_value=1, max_value=UPPER_BOUND_MAX_PARALLELISM)
    raw_inputs = req_list(raw, "inputs", where, TopologyError) if "inputs" in raw else []
    inputs = tuple(parse_input_edge(e, f"{where}.inputs[{j}]") for j, e in enumerate(raw_inputs))
    return TopologyOperator(uid, parallelism, max_p, inputs, operator_id)
