"""(d) Topology files: arbitrary JSON and mutations of the documented example."""

from __future__ import annotations

import pytest

from keystate.storage import Topology
from tests.fuzz.document_properties import TOPOLOGY_WHERE, check_topology_bytes
from tests.fuzz.harness import FuzzContext, Property, run_property
from tests.fuzz.properties import PROPERTIES
from tests.fuzz.samples import DESIGN_TOPOLOGY


@pytest.mark.parametrize("prop", [p for p in PROPERTIES if p.target == "topology"], ids=lambda p: p.name)
def test_property(prop: Property, fuzz_context: FuzzContext) -> None:
    assert run_property(prop, fuzz_context) >= prop.ci_examples // 2


def test_the_design_example_is_accepted(fuzz_context: FuzzContext) -> None:
    check_topology_bytes(fuzz_context, DESIGN_TOPOLOGY)
    topology = Topology.from_json_bytes(DESIGN_TOPOLOGY, TOPOLOGY_WHERE)
    assert [op.uid for op in topology] == ["orders", "totals"]
