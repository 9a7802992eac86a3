"""The asynchronous part of a task's checkpoint: write the keyed and operator snapshots the synchronous part
took through the checkpoint's writer (off the event loop), then acknowledge or decline to the coordinator.

A snapshot that fails halfway removes what it wrote: the checkpoint will never use those files, and if
it was aborted meanwhile nobody else removes them any more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from keystate.runtime import faults
from keystate.runtime.checkpoint_protocol import SubtaskSnapshot, TaskCoordinator
from keystate.runtime.plan import SubtaskId
from keystate.statebackend.operator_state import OperatorSnapshot
from keystate.statebackend.state import KeyedSnapshot
from keystate.storage.checkpoints import CheckpointWriter
from keystate.storage.errors import KeystateError
from keystate.storage.format.metadata import KeyedStateHandle, OperatorStateHandle

__all__ = ["ms", "write_and_acknowledge", "write_snapshot"]

log = logging.getLogger(__name__)


def ms(seconds: float) -> int:
    """A duration in whole milliseconds (never negative), as the statistics carry it."""
    return max(0, round(seconds * 1000))


async def write_and_acknowledge(
    coordinator: TaskCoordinator,
    sub: SubtaskId,
    checkpoint_id: int,
    keyed: KeyedSnapshot | None,
    ops: OperatorSnapshot,
    ack: SubtaskSnapshot,
) -> None:
    """Write subtask ``sub``'s snapshots for ``checkpoint_id`` and acknowledge them with ``ack`` (the
    synchronous part's acknowledgement, completed here with the handles and the asynchronous duration),
    or decline the checkpoint if writing failed. A checkpoint no longer pending (aborted, expired) is
    not written: its keyed snapshot is released.
    """
    started = time.perf_counter()
    writer = coordinator.writer_for(checkpoint_id)
    if writer is None:
        if keyed is not None:
            keyed.release()
        return
    try:
        keyed_handle, op_handle = await asyncio.to_thread(write_snapshot, writer, sub, keyed, ops)
    except Exception as exc:
        log.warning("task %s: snapshot for checkpoint %d failed: %s", sub, checkpoint_id, exc)
        coordinator.decline(sub, checkpoint_id, exc)
        return
    snapshot = replace(
        ack,
        keyed=() if keyed_handle is None else (keyed_handle,),
        operator=() if op_handle is None else (op_handle,),
        async_duration_ms=ms(time.perf_counter() - started),
    )
    coordinator.acknowledge(sub, checkpoint_id, snapshot)


def write_snapshot(
    writer: CheckpointWriter, sub: SubtaskId, keyed: KeyedSnapshot | None, ops: OperatorSnapshot
) -> tuple[KeyedStateHandle | None, OperatorStateHandle | None]:
    """Write the snapshots of subtask ``sub`` (blocking: runs in a worker thread), releasing the keyed
    snapshot in any case. Streams are named ``<uid>/<index>/keyed`` and ``<uid>/<index>/operator``.

    Raises:
        Exception: whatever writing raised; the files this snapshot wrote are discarded first.
    """
    hint = f"{sub.uid}/{sub.index}"
    context = {"uid": sub.uid, "index": sub.index, "checkpoint_id": writer.checkpoint_id}
    try:
        faults.point("snapshot.async", **context)
        keyed_handle = keyed.write(writer, f"{hint}/keyed") if keyed is not None else None
    finally:
        if keyed is not None:
            keyed.release()
    op_handle: OperatorStateHandle | None = None
    try:
        op_handle = ops.write(writer, f"{hint}/operator")
        faults.point("snapshot.async.done", **context)
    except BaseException:
        # The checkpoint will never use what this snapshot wrote; if it was aborted meanwhile,
        # nobody else removes these files any more.
        written = [*(keyed_handle.streams() if keyed_handle is not None else ())]
        written += [op_handle.stream] if op_handle is not None else []
        try:
            writer.discard(written)
        except KeystateError as exc:
            log.warning("task %s: could not remove state files of a failed snapshot: %s", sub, exc)
        raise
    return keyed_handle, op_handle
