"""The pure half of keystate.tools.flink_topology (description -> keystate topology file), tested without a JVM.

Also checks the committed data: every topology in tests/flink/fixtures was written by the exporter from
a description that is committed beside it, so converting that description again must give the same
file, and Flink's generated operator IDs must be the uid hashes the shared reference lists.
"""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path
from typing import Any

import pytest

from keystate.storage.errors import TopologyError

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
ex: Any = importlib.import_module("keystate.tools.flink_topology")

# uid -> operator ID as Flink 2.3.0 wrote them (murmur3_x64_128 of the uid)
KNOWN_IDS = {
    "bounded-source": "e7e5d6fa1a72d1ff475985d1c410c0ef",
    "unbounded-source": "473d8374f8f019cd4369606559819113",
    "bounded-map": "e8e11fe0230d367d01a589e65a0bfb5a",
    "unbounded-slow": "13500fd86d8faf53c8ef5d1080365939",
    "bounded-keyed-sum": "3dabe40e8766107282aabc02e5d43e7d",
    "unbounded-keyed-count": "21f201b45f924f2fc85ce4cebecf6144",
    "sink": "2e588ce1c86a9d46e2e85186773ce4fd",
}


def node(nid: int, name: str, uid: str | None, gen: str, p: int = 2, mp: int = -1, inputs: Any = ()) -> dict[str, Any]:
    return {
        "node_id": nid,
        "name": name,
        "uid": uid,
        "user_hash": None,
        "generated_id": gen,
        "parallelism": p,
        "max_parallelism": mp,
        "inputs": [{"from_node": f, "partitioner": part, "pointwise": pw} for f, part, pw in inputs],
    }


def description() -> dict[str, Any]:
    a, b, c, d = ("a" * 32, "b" * 32, "c" * 32, "d" * 32)
    return {
        "description_version": 1,
        "flink_version": "2.3.0",
        "job_name": "t",
        "nodes": [
            node(4, "sink", None, d, inputs=[(3, "ForwardPartitioner", True)]),
            node(1, "Source: src", "src", a),
            node(2, "map", "map", b, inputs=[(1, "ForwardPartitioner", True), (1, "ForwardPartitioner", True)]),
            node(3, "count", "count", c, mp=8, inputs=[(2, "KeyGroupStreamPartitioner", False)]),
        ],
        "vertices": [
            # JobVertex.getOperatorIDs() lists the head last
            {"vertex_id": a, "name": "Source: src -> map", "parallelism": 2, "max_parallelism": -1,
             "operator_ids": [b, a]},
            {"vertex_id": c, "name": "count -> sink", "parallelism": 2, "max_parallelism": 8,
             "operator_ids": [d, c]},
        ],
    }  # fmt: skip


def test_partitioning_of_known_and_fallback_partitioners() -> None:
    assert ex.partitioning_of("ForwardPartitioner", True) == "forward"
    assert ex.partitioning_of("RescalePartitioner", True) == "rescale"
    assert ex.partitioning_of("KeyGroupStreamPartitioner", False) == "hash"
    assert ex.partitioning_of("RebalancePartitioner", False) == "rebalance"
    assert ex.partitioning_of("BroadcastPartitioner", False) == "broadcast"
    assert ex.partitioning_of("ShufflePartitioner", False) == "rebalance"
    assert ex.partitioning_of("GlobalPartitioner", False) == "rebalance"
    assert ex.partitioning_of("SomeCustomPointwisePartitioner", True) == "rescale"


def test_topology_from_description() -> None:
    topo = ex.topology_from_description(description())
    assert topo == {
        "format_version": 1,
        "operators": [
            {"uid": "src", "operator_id": "a" * 32, "parallelism": 2, "inputs": []},
            {"uid": "map", "operator_id": "b" * 32, "parallelism": 2,
             "inputs": [{"from": "src", "partitioning": "forward"}]},
            {"uid": "count", "operator_id": "c" * 32, "parallelism": 2, "max_parallelism": 8,
             "inputs": [{"from": "map", "partitioning": "hash"}]},
            # no uid: the operator ID stands in; max parallelism is its vertex's
            {"uid": "d" * 32, "operator_id": "d" * 32, "parallelism": 2, "max_parallelism": 8,
             "inputs": [{"from": "count", "partitioning": "forward"}]},
        ],
        "chains": [["src", "map"], ["count", "d" * 32]],
    }  # fmt: skip


def test_user_hash_is_the_operator_id() -> None:
    desc = description()
    desc["nodes"][2]["user_hash"] = "e" * 32
    topo = ex.topology_from_description(desc)
    assert [op["operator_id"] for op in topo["operators"] if op["uid"] == "map"] == ["e" * 32]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(description_version=2), "description_version"),
        (lambda d: d["vertices"][0]["operator_ids"].remove("b" * 32), "is in no vertex"),
        (lambda d: d["vertices"][1]["operator_ids"].append("a" * 32), "in two vertices"),
        (lambda d: d.update(vertices=[{**d["vertices"][0], "vertex_id": "f" * 32}, d["vertices"][1]]), "head"),
        (lambda d: d["nodes"][0]["inputs"].append({"from_node": 9, "partitioner": "x", "pointwise": True}), "unknown"),
        (lambda d: d["nodes"][3].update(uid="map"), "duplicate uids"),
    ],
)
def test_malformed_descriptions_are_rejected(mutate: Any, message: str) -> None:
    desc = copy.deepcopy(description())
    mutate(desc)
    with pytest.raises(TopologyError, match=message):
        ex.topology_from_description(desc)


def committed_pairs() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    pairs = []
    exp = FIXTURES / "restore-experiments.json"
    if exp.exists():
        for e in json.loads(exp.read_text())["experiments"]:
            pairs.append((f"{e['flink_version']} {e['variant']}", e["job_graph"], e["topology"]))
    for desc_file in sorted(FIXTURES.glob("*/**/job-graph-description.json")):
        topo = json.loads((desc_file.parent / "job-topology.json").read_text())
        pairs.append((str(desc_file.parent.relative_to(FIXTURES)), json.loads(desc_file.read_text()), topo))
    return pairs


@pytest.mark.parametrize(("name", "desc", "topology"), committed_pairs(), ids=lambda x: x if isinstance(x, str) else "")
def test_committed_topologies_follow_from_their_descriptions(name: str, desc: Any, topology: Any) -> None:
    assert ex.topology_from_description(desc) == topology, name
    for op in topology["operators"]:
        if op["uid"] in KNOWN_IDS:
            assert op["operator_id"] == KNOWN_IDS[op["uid"]], (name, op["uid"])
