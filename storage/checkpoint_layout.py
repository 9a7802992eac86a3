"""The checkpoint layout under a storage base: the names of its directories and files, and a pointer to
a completed checkpoint or savepoint before its metadata is read (docs/format.md section 1)::

    <base>/<job_id>/chk-<id>/_metadata      written last, create-only; its presence = complete
    <base>/<job_id>/chk-<id>/...            exclusive state files of that checkpoint
    <base>/<job_id>/shared/...              state files several checkpoints may reference
    <base>/savepoints/savepoint-<job6>-<rand>/   self-contained savepoints
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from keystate.storage.format.metadata import CheckpointKind

__all__ = ["CHECKPOINT_DIR", "METADATA_FILE", "SAVEPOINT_DIR", "SHARED_DIR", "CheckpointPointer"]

METADATA_FILE = "_metadata"
SHARED_DIR = "shared"
CHECKPOINT_DIR = re.compile(r"chk-(0|[1-9][0-9]{0,18})")
SAVEPOINT_DIR = re.compile(r"savepoint-[0-9a-f]{6}-[0-9a-f]{12}")


@dataclass(frozen=True, slots=True)
class CheckpointPointer:
    """Where a completed checkpoint or savepoint lives, before its metadata is read."""

    kind: CheckpointKind
    directory: str
    """The checkpoint directory's key in the store."""
    checkpoint_id: int | None = None
    """Known from the directory name for checkpoints; ``None`` for savepoints until loaded."""
