"""The topology file (docs/format.md section 7) and key-group arithmetic (Flink's KeyGroupRangeAssignment)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keystate.storage import (
    InputEdge,
    KeyGroupRange,
    Partitioning,
    Topology,
    TopologyError,
    TopologyOperator,
    UnsupportedFormatVersionError,
    default_max_parallelism,
    key_group_range_for_subtask,
    operator_index_for_key_group,
)
from keystate.storage.format.keygroups import UPPER_BOUND_MAX_PARALLELISM, check_max_parallelism

WHERE = "topology.json"

# Verbatim from docs/architecture.md#the-topology-file and docs/format.md section 7.
DESIGN_EXAMPLE = b"""{"format_version": 1,
 "operators": [
   {"uid": "orders", "parallelism": 2, "max_parallelism": 128, "inputs": []},
   {"uid": "totals", "parallelism": 4, "inputs": [{"from": "orders", "partitioning": "hash"}]}]}
"""


def parse(doc: object) -> Topology:
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return Topology.from_json_bytes(data, WHERE)


def example_doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DESIGN_EXAMPLE)
    return doc


# --- the topology file --------------------------------------------------------------------------------


def test_design_example_parses() -> None:
    topology = parse(DESIGN_EXAMPLE)
    assert topology == Topology(
        (
            TopologyOperator("orders", 2, 128, ()),
            TopologyOperator("totals", 4, None, (InputEdge("orders", Partitioning.HASH),)),
        )
    )
    assert topology.operator("orders").effective_max_parallelism == 128
    assert topology.operator("totals").max_parallelism is None
    assert topology.operator("totals").effective_max_parallelism == 128  # Flink's default for p=4
    assert "orders" in topology
    assert "nope" not in topology
    assert [op.uid for op in topology] == ["orders", "totals"]


def test_round_trip() -> None:
    topology = Topology(
        (
            TopologyOperator("src", 3),
            TopologyOperator("a", 3, 64, (InputEdge("src", Partitioning.FORWARD),)),
            TopologyOperator(
                "b", 200, None, (InputEdge("a", Partitioning.REBALANCE), InputEdge("src", Partitioning.BROADCAST))
            ),
            TopologyOperator("c", 100, 32768, (InputEdge("b", Partitioning.RESCALE),)),
            TopologyOperator("ünïcode uid with spaces", 1, None, (InputEdge("c", Partitioning.HASH),)),
        )
    )
    data = topology.to_json_bytes()
    assert Topology.from_json_bytes(data, WHERE) == topology
    doc = json.loads(data)
    assert doc["format_version"] == 1
    assert "max_parallelism" not in doc["operators"][0], "a derived max_parallelism is not written"
    assert doc["operators"][1]["max_parallelism"] == 64
    assert doc["operators"][2]["inputs"] == [
        {"from": "a", "partitioning": "rebalance"},
        {"from": "src", "partitioning": "broadcast"},
    ]
    assert topology.operator("b").effective_max_parallelism == 512  # p=200: 300 -> 512


def test_inputs_and_max_parallelism_are_optional() -> None:
    topology = parse({"format_version": 1, "operators": [{"uid": "only", "parallelism": 86}]})
    op = topology.operator("only")
    assert op.inputs == ()
    assert op.max_parallelism is None
    assert op.effective_max_parallelism == 256


def test_topological_order_predecessors_and_successors() -> None:
    # Listed out of order: the order puts every operator after its inputs, file order breaking ties.
    topology = parse(
        {
            "format_version": 1,
            "operators": [
                {"uid": "sink", "parallelism": 1, "inputs": [{"from": "join", "partitioning": "rebalance"}]},
                {"uid": "left", "parallelism": 2, "inputs": []},
                {
                    "uid": "join",
                    "parallelism": 2,
                    "inputs": [{"from": "left", "partitioning": "forward"}, {"from": "right", "partitioning": "hash"}],
                },
                {"uid": "right", "parallelism": 4, "inputs": []},
                {"uid": "audit", "parallelism": 1, "inputs": [{"from": "left", "partitioning": "rescale"}]},
            ],
        }
    )
    order = [op.uid for op in topology.topological_order()]
    assert order == ["left", "right", "audit", "join", "sink"]
    assert [(op.uid, e.partitioning) for op, e in topology.predecessors("join")] == [
        ("left", Partitioning.FORWARD),
        ("right", Partitioning.HASH),
    ]
    assert [op.uid for op, _ in topology.successors("left")] == ["join", "audit"]
    assert topology.successors("sink") == []
    assert topology.predecessors("left") == []
    with pytest.raises(KeyError, match="nope"):
        topology.predecessors("nope")
    assert topology.get("nope") is None


def test_pointwise_partitionings() -> None:
    assert {p for p in Partitioning if p.pointwise} == {Partitioning.FORWARD, Partitioning.RESCALE}
    assert not Partitioning.HASH.pointwise
    assert not Partitioning.REBALANCE.pointwise
    assert not Partitioning.BROADCAST.pointwise


def hostile(change: Any) -> dict[str, Any]:
    doc = example_doc()
    change(doc)
    return doc


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (b"", "empty"),
        (b"not json", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[]", "must be a JSON object"),
        (b"[" * 100_000, "not valid JSON"),
        (b'{"format_version": 1, "format_version": 1, "operators": []}', "duplicate key"),
        (b'{"format_version": 1, "operators": [{"uid": "a", "parallelism": NaN}]}', "NaN"),
        ({"operators": []}, "'format_version' is missing"),
        ({"format_version": 1}, "'operators' is missing"),
        ({"format_version": 1, "operators": {}}, "field 'operators'"),
        ({"format_version": 1, "operators": [], "extra": 1}, "unknown field 'extra'"),
        ({"format_version": 1, "operators": ["a"]}, "operators[0]: an operator must be a JSON object"),
        (hostile(lambda d: d["operators"][0].pop("uid")), "'uid' is missing"),
        (hostile(lambda d: d["operators"][0].pop("parallelism")), "'parallelism' is missing"),
        (hostile(lambda d: d["operators"][0].update(uid=7)), "field 'uid'"),
        (hostile(lambda d: d["operators"][0].update(uid="")), "field 'uid'"),
        (hostile(lambda d: d["operators"][0].update(uid="x" * 257)), "field 'uid'"),
        (hostile(lambda d: d["operators"][0].update(uid="a\nb")), "field 'uid'"),
        (hostile(lambda d: d["operators"][0].update(parallelism="2")), "field 'parallelism'"),
        (hostile(lambda d: d["operators"][0].update(parallelism=2.0)), "field 'parallelism'"),
        (hostile(lambda d: d["operators"][0].update(parallelism=True)), "field 'parallelism'"),
        (hostile(lambda d: d["operators"][0].update(parallelism=0)), "field 'parallelism'"),
        (hostile(lambda d: d["operators"][0].update(parallelism=40_000)), "field 'parallelism'"),
        (hostile(lambda d: d["operators"][0].update(max_parallelism="128")), "field 'max_parallelism'"),
        (hostile(lambda d: d["operators"][0].update(max_parallelism=0)), "field 'max_parallelism'"),
        (hostile(lambda d: d["operators"][0].update(max_parallelism=32_769)), "field 'max_parallelism'"),
        (hostile(lambda d: d["operators"][0].update(parallelism=129)), "parallelism 129 is not smaller or equal"),
        (hostile(lambda d: d["operators"][0].update(inputs={})), "field 'inputs'"),
        (hostile(lambda d: d["operators"][0].update(inputs=["orders"])), "inputs[0]: an input must be an object"),
        (hostile(lambda d: d["operators"][0].update(extra=1)), "unknown field 'extra'"),
        (hostile(lambda d: d["operators"][1]["inputs"][0].pop("from")), "'from' is missing"),
        (hostile(lambda d: d["operators"][1]["inputs"][0].pop("partitioning")), "'partitioning' is missing"),
        (hostile(lambda d: d["operators"][1]["inputs"][0].update(partitioning="shuffle")), "field 'partitioning'"),
        (hostile(lambda d: d["operators"][1]["inputs"][0].update(partitioning="HASH")), "field 'partitioning'"),
        (hostile(lambda d: d["operators"][1]["inputs"][0].update({"from": 1})), "field 'from'"),
        (hostile(lambda d: d["operators"][1]["inputs"][0].update(extra=1)), "unknown field 'extra'"),
        (hostile(lambda d: d["operators"][1].update(uid="orders")), "operator uid 'orders' appears twice"),
        (hostile(lambda d: d["operators"][1]["inputs"][0].update({"from": "nope"})), "unknown operator 'nope'"),
        (
            hostile(lambda d: d["operators"][0]["inputs"].append({"from": "totals", "partitioning": "hash"})),
            "cycle through 'orders', 'totals'",
        ),
        (
            hostile(lambda d: d["operators"][1]["inputs"].append({"from": "totals", "partitioning": "rebalance"})),
            "cycle through 'totals'",
        ),
        (
            hostile(lambda d: d["operators"][1]["inputs"][0].update(partitioning="forward")),
            "forward input from 'orders' needs equal parallelism (found 2 -> 4)",
        ),
    ],
)
def test_hostile_topology_files(doc: object, message: str) -> None:
    with pytest.raises(TopologyError) as info:
        parse(doc)
    assert message in str(info.value), str(info.value)
    assert str(info.value).startswith(WHERE)


@pytest.mark.parametrize("version", [2, 0, "1", True, None, 1.0, 1.5, [1]])
def test_unsupported_topology_version(version: object) -> None:
    doc = example_doc()
    doc["format_version"] = version
    with pytest.raises(TopologyError) as info:
        parse(doc)
    assert isinstance(info.value, UnsupportedFormatVersionError)
    assert "format_version" in str(info.value)
    assert info.value.found == version


def test_rescale_and_other_edges_allow_unequal_parallelism() -> None:
    for mode in ("rescale", "hash", "rebalance", "broadcast"):
        doc = example_doc()
        doc["operators"][1]["inputs"][0]["partitioning"] = mode
        assert parse(doc).operator("totals").inputs[0].partitioning == Partitioning(mode)


def test_topology_built_in_code_is_validated() -> None:
    with pytest.raises(TopologyError, match="appears twice"):
        Topology((TopologyOperator("a", 1), TopologyOperator("a", 1)))
    with pytest.raises(TopologyError, match="unknown operator 'b'"):
        Topology((TopologyOperator("a", 1, None, (InputEdge("b", Partitioning.HASH),)),))
    with pytest.raises(TopologyError, match="cycle"):
        Topology((TopologyOperator("a", 1, None, (InputEdge("a", Partitioning.FORWARD),)),))
    with pytest.raises(TopologyError, match="parallelism"):
        Topology((TopologyOperator("a", 0),))
    with pytest.raises(TopologyError, match="max_parallelism"):
        Topology((TopologyOperator("a", 1, 0),))
    with pytest.raises(TopologyError, match="not smaller or equal"):
        Topology((TopologyOperator("a", 5, 4),))


# --- the Flink extensions: operator_id and chains ---------------------------------------------------

# The fixture job of tests/flink/fixtures/flink-2.3.0 (README.md there): uid -> Flink operator ID.
SUM_ID = "3dabe40e8766107282aabc02e5d43e7d"
SOURCE_ID = "e7e5d6fa1a72d1ff475985d1c410c0ef"


def flink_doc() -> dict[str, Any]:
    return {
        "format_version": 1,
        "operators": [
            {"uid": "bounded-source", "operator_id": SOURCE_ID, "parallelism": 2, "inputs": []},
            {"uid": "map", "parallelism": 2, "inputs": [{"from": "bounded-source", "partitioning": "forward"}]},
            {"uid": "sum", "operator_id": SUM_ID, "parallelism": 2, "max_parallelism": 64,
             "inputs": [{"from": "map", "partitioning": "hash"}]},
            {"uid": "tag", "parallelism": 2, "max_parallelism": 64,
             "inputs": [{"from": "sum", "partitioning": "forward"}]},
        ],
        "chains": [["bounded-source", "map"], ["sum", "tag"]],
    }  # fmt: skip


def test_operator_id_and_chains_parse_and_round_trip() -> None:
    topology = parse(flink_doc())
    assert topology.operator("sum").operator_id == SUM_ID
    assert topology.operator("map").operator_id is None
    assert topology.chains == (("bounded-source", "map"), ("sum", "tag"))
    assert [op.uid for op in topology.vertex("tag")] == ["sum", "tag"]
    assert [[op.uid for op in v] for v in topology.vertices()] == [["bounded-source", "map"], ["sum", "tag"]]
    again = Topology.from_json_bytes(topology.to_json_bytes(), WHERE)
    assert again == topology
    assert json.loads(topology.to_json_bytes()) == flink_doc()


def test_the_flink_operator_id_is_the_uid_hash_unless_given() -> None:
    topology = parse(flink_doc())
    # bounded-source's given ID happens to be its uid's hash (Flink's default); "sum"'s is another one's.
    assert topology.operator("bounded-source").flink_operator_id == SOURCE_ID
    assert topology.operator("sum").flink_operator_id == SUM_ID
    assert topology.operator("map").flink_operator_id == "23ab3a59b17e9c45f95cff4c728611fc"


def test_an_operator_in_no_chain_is_its_own_vertex() -> None:
    topology = parse(example_doc())
    assert topology.chains == ()
    assert [[op.uid for op in v] for v in topology.vertices()] == [["orders"], ["totals"]]
    assert "chains" not in json.loads(topology.to_json_bytes())


def test_upper_case_operator_ids_are_read_as_lower_case() -> None:
    doc = flink_doc()
    doc["operators"][2]["operator_id"] = SUM_ID.upper()
    assert parse(doc).operator("sum").operator_id == SUM_ID


def test_a_topology_written_from_a_job_graph_has_neither_extension() -> None:
    topology = Topology((TopologyOperator("a", 2), TopologyOperator("b", 2, 128, (InputEdge("a", Partitioning.HASH),))))
    doc = json.loads(topology.to_json_bytes())
    assert set(doc) == {"format_version", "operators"}
    assert all("operator_id" not in op for op in doc["operators"])


RESCALE_FROM_SUM = {"from": "sum", "partitioning": "rescale"}


def flink_hostile(change: Any) -> dict[str, Any]:
    doc = flink_doc()
    change(doc)
    return doc


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (flink_hostile(lambda d: d["operators"][0].update(operator_id="xyz")), "operators[0]: field 'operator_id'"),
        (flink_hostile(lambda d: d["operators"][0].update(operator_id=SUM_ID[:31])), "field 'operator_id'"),
        (flink_hostile(lambda d: d["operators"][0].update(operator_id=SUM_ID + "0")), "field 'operator_id'"),
        (flink_hostile(lambda d: d["operators"][0].update(operator_id="g" * 32)), "field 'operator_id'"),
        (flink_hostile(lambda d: d["operators"][0].update(operator_id=7)), "field 'operator_id'"),
        (flink_hostile(lambda d: d["operators"][0].update(operator_id=None)), "field 'operator_id'"),
        (flink_hostile(lambda d: d["operators"][0].update(operator_id=SUM_ID)), "the same Flink operator ID"),
        (flink_hostile(lambda d: d["operators"][0].update(operator_id="23ab3a59b17e9c45f95cff4c728611fc")),
         "operators 'bounded-source' and 'map' have the same Flink operator ID"),
        (flink_hostile(lambda d: d.update(chains={})), "field 'chains'"),
        (flink_hostile(lambda d: d.update(chains=["sum"])), "chains[0] must be an array"),
        (flink_hostile(lambda d: d["chains"].append([])), "chains[2] is empty"),
        (flink_hostile(lambda d: d["chains"][1].append(7)), "chains[1][2] must be an operator uid"),
        (flink_hostile(lambda d: d["chains"][1].append("nope")), "chains[1][2]: unknown operator uid 'nope'"),
        (flink_hostile(lambda d: d["chains"].append(["map"])), "chains[2][0]: operator 'map' is in two chains"),
        (flink_hostile(lambda d: d["chains"][1].append("sum")), "chains[1][2]: operator 'sum' is in two chains"),
        (flink_hostile(lambda d: d["operators"][3].update(parallelism=1, inputs=[RESCALE_FROM_SUM])),
         "chains[1][1]: operator 'tag' has parallelism 1"),
        (flink_hostile(lambda d: d["operators"][3].pop("max_parallelism")),
         "chains[1][1]: operator 'tag' has parallelism 2 and max_parallelism None, but its chain head 'sum'"),
    ],
)  # fmt: skip
def test_hostile_flink_extensions(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(TopologyError) as info:
        parse(doc)
    assert message in str(info.value), str(info.value)
    assert str(info.value).startswith(WHERE)


def test_flink_extensions_built_in_code_are_validated() -> None:
    a, b = TopologyOperator("a", 1), TopologyOperator("b", 1)
    with pytest.raises(TopologyError, match="32 lowercase hex digits"):
        Topology((TopologyOperator("a", 1, operator_id=SUM_ID.upper()),))
    with pytest.raises(TopologyError, match="chains\\[0\\] is empty"):
        Topology((a, b), ((),))
    with pytest.raises(TopologyError, match="unknown operator uid 'c'"):
        Topology((a, b), (("a", "c"),))
    with pytest.raises(TopologyError, match="in two chains"):
        Topology((a, b), (("a",), ("b", "a")))


# --- key groups ---------------------------------------------------------------------------------------


def ranges(max_p: int, p: int) -> list[tuple[int, int]]:
    return [(r.start, r.end) for r in (key_group_range_for_subtask(max_p, p, i) for i in range(p))]


def test_flink_range_vectors() -> None:
    assert ranges(128, 4) == [(0, 31), (32, 63), (64, 95), (96, 127)]
    assert ranges(128, 3) == [(0, 42), (43, 85), (86, 127)]
    assert ranges(128, 1) == [(0, 127)]
    assert ranges(128, 128) == [(i, i) for i in range(128)]
    assert ranges(10, 4) == [(0, 2), (3, 4), (5, 7), (8, 9)]


def test_flink_operator_index_vectors() -> None:
    assert [operator_index_for_key_group(128, 3, kg) for kg in (0, 42, 43, 85, 86, 127)] == [0, 0, 1, 1, 2, 2]
    assert [operator_index_for_key_group(128, 4, kg) for kg in (31, 32, 127)] == [0, 1, 3]


@pytest.mark.parametrize(
    ("parallelism", "expected"),
    [(1, 128), (2, 128), (85, 128), (86, 256), (170, 256), (171, 256), (172, 512), (1000, 2048), (21_845, 32_768),
     (21_846, 32_768), (32_768, 32_768)],
)  # fmt: skip
def test_default_max_parallelism(parallelism: int, expected: int) -> None:
    assert default_max_parallelism(parallelism) == expected


def test_default_max_parallelism_bounds() -> None:
    assert all(default_max_parallelism(p) == 128 for p in range(1, 86))
    assert all(default_max_parallelism(p) == 256 for p in range(86, 171))
    assert max(default_max_parallelism(p) for p in range(1, 40_000, 97)) == UPPER_BOUND_MAX_PARALLELISM
    assert UPPER_BOUND_MAX_PARALLELISM == 32_768
    assert check_max_parallelism(32_768) == 32_768
    for bad in (0, -1, 32_769):
        with pytest.raises(ValueError, match="max_parallelism"):
            check_max_parallelism(bad)


def test_range_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="parallelism"):
        key_group_range_for_subtask(4, 5, 0)
    with pytest.raises(ValueError, match="parallelism"):
        key_group_range_for_subtask(4, 0, 0)
    with pytest.raises(ValueError, match="index"):
        key_group_range_for_subtask(4, 2, 2)
    with pytest.raises(ValueError, match="index"):
        key_group_range_for_subtask(4, 2, -1)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, UPPER_BOUND_MAX_PARALLELISM).flatmap(lambda m: st.tuples(st.just(m), st.integers(1, m))))
def test_ranges_partition_the_key_groups_and_invert_operator_index(args: tuple[int, int]) -> None:
    max_p, p = args
    expected_start = 0
    for i in range(p):
        r = key_group_range_for_subtask(max_p, p, i)
        assert r.start == expected_start, "ranges are contiguous, in subtask order"
        assert len(r) in (max_p // p, -(-max_p // p)), "ranges differ in size by at most one"
        assert len(r) >= 1
        # operator_index_for_key_group is monotone, so its ends decide the whole range.
        assert operator_index_for_key_group(max_p, p, r.start) == i
        assert operator_index_for_key_group(max_p, p, r.end) == i
        expected_start = r.end + 1
    assert expected_start == max_p


@pytest.mark.parametrize(("max_p", "p"), [(128, 3), (7, 7), (300, 7), (1000, 999), (32_768, 3)])
def test_every_key_group_maps_back_to_its_owner(max_p: int, p: int) -> None:
    owner = {kg: i for i in range(p) for kg in key_group_range_for_subtask(max_p, p, i)}
    assert sorted(owner) == list(range(max_p))
    assert all(operator_index_for_key_group(max_p, p, kg) == i for kg, i in owner.items())


def test_key_group_range_value() -> None:
    r = KeyGroupRange(3, 7)
    assert len(r) == 5
    assert list(r) == [3, 4, 5, 6, 7]
    assert 3 in r
    assert 8 not in r
    assert "3" not in r
    assert str(r) == "3..7"
    assert r.intersection(KeyGroupRange(6, 10)) == KeyGroupRange(6, 7)
    assert not r.intersection(KeyGroupRange(8, 10))
    assert KeyGroupRange.empty() == KeyGroupRange(0, -1)
    assert len(KeyGroupRange.empty()) == 0
    assert str(KeyGroupRange.empty()) == "(empty)"
    for start, end in ((-1, 3), (5, 3), (0, UPPER_BOUND_MAX_PARALLELISM)):
        with pytest.raises(ValueError, match="invalid key-group range"):
            KeyGroupRange(start, end)
