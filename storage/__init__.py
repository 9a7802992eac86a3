"""keystate storage: checkpoint format, state files, and checkpoint storage on local disk, S3 and memory.

Start with :func:`open_storage`::

    storage = open_storage("s3://bucket/checkpoints")        # or "/var/ckpt", "file:///var/ckpt"
    writer = storage.begin_checkpoint(job_id, 1)
    with writer.open_stream("orders/0/keyed") as stream:
        stream.write(b"...")
        handle = stream.close()
    completed = writer.commit(metadata)                       # _metadata last, create-only
"""

from keystate.storage._local import LocalObjectStore
from keystate.storage._memory import MemoryObjectStore
from keystate.storage._s3 import S3ObjectStore, make_s3_client
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
    NotFoundError,
    RequestOutcomeUnknownError,
    StateFileError,
    StorageAccessDeniedError,
    StorageError,
    StorageUnavailableError,
    TopologyError,
    UnsafePathError,
    UnsupportedFormatVersionError,
)
from keystate.storage.faults import Fault, FaultRule, FaultyObjectStore
from keystate.storage.keygroups import (
    KeyGroupRange,
    default_max_parallelism,
    key_group_range_for_subtask,
    operator_index_for_key_group,
)
from keystate.storage.metadata import (
    CheckpointKind,
    CheckpointMetadata,
    CheckpointProperties,
    DistributionMode,
    HandleScope,
    KeyedStateHandle,
    OperatorState,
    OperatorStateEntry,
    OperatorStateHandle,
    OperatorStatus,
    StreamHandle,
    SubtaskState,
)
from keystate.storage.retention import CompletedCheckpointStore
from keystate.storage.retry import RetryingObjectStore, RetryPolicy, with_retries
from keystate.storage.statefile import Compression, StateFileReader, StateFileWriter
from keystate.storage.streams import StateOutputStream, StreamOptions
from keystate.storage.topology import InputEdge, Partitioning, Topology, TopologyOperator
from keystate.storage.uri import Location, open_storage, open_store, parse_location

__all__ = [
    "METADATA_FILE",
    "AlreadyExistsError",
    "BucketNotFoundError",
    "CheckpointKind",
    "CheckpointMetadata",
    "CheckpointNotFoundError",
    "CheckpointPointer",
    "CheckpointProperties",
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
    "NotFoundError",
    "ObjectInfo",
    "ObjectReader",
    "ObjectStore",
    "ObjectWriter",
    "OperatorState",
    "OperatorStateEntry",
    "OperatorStateHandle",
    "OperatorStatus",
    "Partitioning",
    "PutMode",
    "RequestOutcomeUnknownError",
    "RetryPolicy",
    "RetryingObjectStore",
    "S3ObjectStore",
    "StateFileError",
    "StateFileReader",
    "StateFileWriter",
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
    "UnsafePathError",
    "UnsupportedFormatVersionError",
    "default_max_parallelism",
    "key_group_range_for_subtask",
    "make_s3_client",
    "open_storage",
    "open_store",
    "operator_index_for_key_group",
    "parse_location",
    "with_retries",
]

if __name__ != "keystate.storage":
    # One import root: this folder is installed as keystate.storage. Refusing the bare name keeps every file
    # importable under exactly one module name (two copies of one module mean two copies of its classes).
    raise ImportError(f"import keystate.storage, not {__name__!r}: keystate installs a single top-level package")
