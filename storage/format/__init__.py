"""keystate's checkpoint format: what describes bytes, with no I/O.

Everything here is a pure function of bytes and values: the ``_metadata`` model and its versions, the
state-file format (structs, compression, block framing, decoding and verification over a
:class:`ByteSource`), the topology file, key-group arithmetic and the field validation of untrusted
JSON. Nothing here opens a file, a socket or a thread; ``keystate.storage`` moves the bytes (object
stores, checkpoint storage, the threaded state-file writer). Errors are ``keystate.storage.errors``'s,
one exception tree for every layer.

::

    metadata = parse_metadata(data, "chk-12/_metadata")     # any supported format_version
    data = dump_metadata(metadata)                           # the newest format_version
    raw = StateFileReader(BytesSource(blob, "inline"), checksum=handle.checksum).read_all()
    form = handle_to_json(handle)                            # JSON-safe, to ship to another process
    handle = handle_from_json(form, KeyedStateHandle)        # validated like _metadata
"""

from keystate.storage.format._metadata_versions import SUPPORTED_VERSIONS as SUPPORTED_METADATA_VERSIONS
from keystate.storage.format._metadata_versions import dump_metadata, parse_metadata
from keystate.storage.format.keygroups import (
    DEFAULT_LOWER_BOUND_MAX_PARALLELISM,
    UPPER_BOUND_MAX_PARALLELISM,
    KeyGroupRange,
    check_max_parallelism,
    default_max_parallelism,
    key_group_range_for_subtask,
    operator_index_for_key_group,
)
from keystate.storage.format.metadata import (
    CheckpointKind,
    CheckpointMetadata,
    CheckpointProperties,
    CheckpointStatistics,
    DistributionMode,
    HandleScope,
    KeyedStateHandle,
    OperatorState,
    OperatorStateEntry,
    OperatorStateHandle,
    OperatorStatistics,
    OperatorStatus,
    StreamHandle,
    SubtaskState,
)
from keystate.storage.format.statefile import (
    ByteReader,
    ByteSource,
    BytesSource,
    Compression,
    ReadLimits,
    StateFileEncoder,
    StateFileReader,
    StateFileSummary,
    format_checksum,
)
from keystate.storage.format.topology import InputEdge, Partitioning, Topology, TopologyOperator
from keystate.storage.format.transfer import (
    SUPPORTED_TRANSFER_VERSIONS,
    StateHandle,
    handle_from_json,
    handle_to_json,
    subtask_state_from_json,
    subtask_state_to_json,
)

__all__ = [
    "DEFAULT_LOWER_BOUND_MAX_PARALLELISM",
    "SUPPORTED_METADATA_VERSIONS",
    "SUPPORTED_TRANSFER_VERSIONS",
    "UPPER_BOUND_MAX_PARALLELISM",
    "ByteReader",
    "ByteSource",
    "BytesSource",
    "CheckpointKind",
    "CheckpointMetadata",
    "CheckpointProperties",
    "CheckpointStatistics",
    "Compression",
    "DistributionMode",
    "HandleScope",
    "InputEdge",
    "KeyGroupRange",
    "KeyedStateHandle",
    "OperatorState",
    "OperatorStateEntry",
    "OperatorStateHandle",
    "OperatorStatistics",
    "OperatorStatus",
    "Partitioning",
    "ReadLimits",
    "StateFileEncoder",
    "StateFileReader",
    "StateFileSummary",
    "StateHandle",
    "StreamHandle",
    "SubtaskState",
    "Topology",
    "TopologyOperator",
    "check_max_parallelism",
    "default_max_parallelism",
    "dump_metadata",
    "format_checksum",
    "handle_from_json",
    "handle_to_json",
    "key_group_range_for_subtask",
    "operator_index_for_key_group",
    "parse_metadata",
    "subtask_state_from_json",
    "subtask_state_to_json",
]
