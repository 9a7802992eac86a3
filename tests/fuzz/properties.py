"""The registry of fuzzed properties, shared by the CI tests (``tests/fuzz/test_*.py``) and the long-run
script (``python -m tests.fuzz.run``).

The properties themselves live with what they fuzz: ``document_properties`` ((a) ``_metadata``, (d)
topology files), ``statefile_properties`` ((b)), ``snapshot_properties`` ((c) keyed snapshot payloads),
``uri_properties`` ((e) storage locations) and ``cli_properties`` ((f) the CLI); ``harness`` runs them.
"""

from __future__ import annotations

from tests.fuzz.cli_properties import check_cli, cli_examples
from tests.fuzz.document_properties import (
    check_metadata_bytes,
    check_topology_bytes,
    metadata_arbitrary_bytes,
    metadata_arbitrary_json,
    metadata_damaged,
    metadata_mutated,
    metadata_plausible,
    topology_arbitrary,
    topology_mutated,
)
from tests.fuzz.harness import Property
from tests.fuzz.snapshot_properties import check_snapshot, snapshot_mutated
from tests.fuzz.statefile_properties import check_state_file, statefile_arbitrary, statefile_mutated
from tests.fuzz.uri_properties import check_location, locations

__all__ = ["PROPERTIES"]

PROPERTIES: tuple[Property, ...] = (
    Property("metadata", "arbitrary_bytes", metadata_arbitrary_bytes, check_metadata_bytes, 300),
    Property("metadata", "arbitrary_json", metadata_arbitrary_json, check_metadata_bytes, 200),
    Property("metadata", "mutated_golden", metadata_mutated, check_metadata_bytes, 600),
    Property("metadata", "plausible_golden", metadata_plausible, check_metadata_bytes, 400),
    Property("metadata", "damaged_golden", metadata_damaged, check_metadata_bytes, 300),
    Property("statefile", "arbitrary_bytes", lambda ctx: statefile_arbitrary(), check_state_file, 300),
    Property("statefile", "mutated", lambda ctx: statefile_mutated(), check_state_file, 400),
    Property("snapshot", "mutated", lambda ctx: snapshot_mutated(ctx.snapshot()), check_snapshot, 150),
    Property("topology", "arbitrary", topology_arbitrary, check_topology_bytes, 300),
    Property("topology", "mutated_design", topology_mutated, check_topology_bytes, 300),
    Property("uri", "arbitrary", locations, check_location, 600),
    Property("cli", "damaged_checkpoint", lambda ctx: cli_examples(ctx.cli_template()), check_cli, 80),
)
"""Every fuzzed property with the number of examples it runs in CI."""
