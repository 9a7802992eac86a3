"""keystate storage: checkpoint format, state files, and checkpoint storage on local disk, S3 and memory.

Start with :func:`open_storage`::

    storage = open_storage("s3://bucket/checkpoints")        # or "/var/ckpt", "file:///var/ckpt"
    writer = storage.begin_checkpoint(job_id, 1)
    with writer.open_stream("orders/0/keyed") as stream:
        stream.write(b"...")
        handle = stream.close()
    completed = writer.commit(metadata)                       # _metadata last, create-only

With several worker processes writing one checkpoint, each worker opens its own storage and writer and
ships its handles to the one committer as JSON (:func:`subtask_state_to_json`, :func:`handle_to_json`
and their ``*_from_json`` inverses), which vouches for their files with ``writer.adopt(...)`` before it
commits; ``docs/embedding.md`` walks through it.

The format (``_metadata``, state files, the topology file, key groups) is ``keystate.storage.format``
and does no I/O; the rest of this package moves bytes. boto3 is imported only when an ``s3://``
location is opened or an S3 name below is first used (:class:`S3ObjectStore`, :func:`make_s3_client`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keystate._lazy import lazy_dir, resolve_lazy
from keystate.storage._local import LocalObjectStore
from keystate.storage._memory import MemoryObjectStore
from keystate.storage.base import ObjectInfo, ObjectReader, ObjectStore, ObjectWriter, PutMode
from keystate.storage.checkpoints import (
    METADATA_FILE,
    CheckpointPointer,
    CheckpointStorage,
    CheckpointWriter,
    CompletedCheckpoint,
)
from keystate.storage.errors import (
    AlreadyExistsError,
    BucketNotFoundError,
    CheckpointDiscardedError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CommitConflictError,
    CommitFailedError,
    CommitOutcomeUnknownError,
    CredentialsError,
    FormatError,
    InvalidURIError,
    KeystateError,
    MetadataError,
    MissingStateFilesError,
    NotFoundError,
    RequestOutcomeUnknownError,
    StateFileError,
    StorageAccessDeniedError,
    StorageError,
    StorageUnavailableError,
    TopologyError,
    UnsafeLinkError,
    UnsafePathError,
    UnsupportedFormatVersionError,
    UnsupportedMetadataVersionError,
)
from keystate.storage.faults import Fault, FaultRule, FaultyObjectStore
from keystate.storage.format import (
    CheckpointKind,
    CheckpointMetadata,
    CheckpointProperties,
    CheckpointStatistics,
    Compression,
    DistributionMode,
    HandleScope,
    InputEdge,
    KeyedStateHandle,
    KeyGroupRange,
    OperatorState,
    OperatorStateEntry,
    OperatorStateHandle,
    OperatorStatistics,
    OperatorStatus,
    Partitioning,
    ReadLimits,
    StateFileReader,
    StateHandle,
    StreamHandle,
    SubtaskState,
    Topology,
    TopologyOperator,
    default_max_parallelism,
    dump_metadata,
    handle_from_json,
    handle_to_json,
    key_group_range_for_subtask,
    operator_index_for_key_group,
    parse_metadata,
    subtask_state_from_json,
    subtask_state_to_json,
)
from keystate.storage.retention import CompletedCheckpointStore
from keystate.storage.retry import RetryingObjectStore, RetryPolicy, with_retries
from keystate.storage.statefile_io import StateFileWriter
from keystate.storage.streams import StateOutputStream, StreamOptions
from keystate.storage.uri import Location, open_storage, open_store, parse_location

if TYPE_CHECKING:
    from keystate.storage._s3 import S3ObjectStore, make_s3_client
    from keystate.storage.flink_checkpoints import (
        FlinkCheckpoint,
        open_checkpoint,
        resolve_checkpoint,
        verify_flink_checkpoint,
    )

# name -> the module that defines it, imported on first access (PEP 562): these pull in boto3, or the
# reader of Apache Flink's _metadata.
_LAZY = {
    "S3ObjectStore": "keystate.storage._s3",
    "make_s3_client": "keystate.storage._s3",
    "FlinkCheckpoint": "keystate.storage.flink_checkpoints",
    "open_checkpoint": "keystate.storage.flink_checkpoints",
    "resolve_checkpoint": "keystate.storage.flink_checkpoints",
    "verify_flink_checkpoint": "keystate.storage.flink_checkpoints",
}

__all__ = [
    "METADATA_FILE",
    "AlreadyExistsError",
    "BucketNotFoundError",
    "CheckpointDiscardedError",
    "CheckpointKind",
    "CheckpointMetadata",
    "CheckpointNotFoundError",
    "CheckpointPointer",
    "CheckpointProperties",
    "CheckpointStatistics",
    "CheckpointStorage",
    "CheckpointWriter",
    "ChecksumMismatchError",
    "CommitConflictError",
    "CommitFailedError",
    "CommitOutcomeUnknownError",
    "CompletedCheckpoint",
    "CompletedCheckpointStore",
    "Compression",
    "CredentialsError",
    "DistributionMode",
    "Fault",
    "FaultRule",
    "FaultyObjectStore",
    "FlinkCheckpoint",
    "FormatError",
    "HandleScope",
    "InputEdge",
    "InvalidURIError",
    "KeyGroupRange",
    "KeyedStateHandle",
    "KeystateError",
    "LocalObjectStore",
    "Location",
    "MemoryObjectStore",
    "MetadataError",
    "MissingStateFilesError",
    "NotFoundError",
    "ObjectInfo",
    "ObjectReader",
    "ObjectStore",
    "ObjectWriter",
    "OperatorState",
    "OperatorStateEntry",
    "OperatorStateHandle",
    "OperatorStatistics",
    "OperatorStatus",
    "Partitioning",
    "PutMode",
    "ReadLimits",
    "RequestOutcomeUnknownError",
    "RetryPolicy",
    "RetryingObjectStore",
    "S3ObjectStore",
    "StateFileError",
    "StateFileReader",
    "StateFileWriter",
    "StateHandle",
    "StateOutputStream",
    "StorageAccessDeniedError",
    "StorageError",
    "StorageUnavailableError",
    "StreamHandle",
    "StreamOptions",
    "SubtaskState",
    "Topology",
    "TopologyError",
    "TopologyOperator",
    "UnsafeLinkError",
    "UnsafePathError",
    "UnsupportedFormatVersionError",
    "UnsupportedMetadataVersionError",
    "default_max_parallelism",
    "dump_metadata",
    "handle_from_json",
    "handle_to_json",
    "key_group_range_for_subtask",
    "make_s3_client",
    "open_checkpoint",
    "open_storage",
    "open_store",
    "operator_index_for_key_group",
    "parse_location",
    "parse_metadata",
    "resolve_checkpoint",
    "subtask_state_from_json",
    "subtask_state_to_json",
    "verify_flink_checkpoint",
    "with_retries",
]


def __getattr__(name: str) -> Any:
    return resolve_lazy(globals(), name, _LAZY)


def __dir__() -> list[str]:
    return lazy_dir(globals())


if __name__ != "keystate.storage":
    # One import root: this folder is installed as keystate.storage. Refusing the bare name keeps every file
    # importable under exactly one module name (two copies of one module mean two copies of its classes).
    raise ImportError(f"import keystate.storage, not {__name__!r}: keystate installs a single top-level package")
