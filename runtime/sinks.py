"""Two-phase-commit sinks (Flink's ``TwoPhaseCommitSinkFunction``; rules H2-H3 of docs/flink-rules.md).

Each checkpoint closes the current transaction (pre-commit) and records it in state under the
checkpoint id; ``notify_checkpoint_complete(n)`` commits every pending transaction up to ``n``. The
final checkpoint after ``finish()`` pre-commits the last transaction, so a bounded job commits all
its output; with checkpointing disabled, ``finish()`` commits the last transaction itself (H4). On
restore, transactions recorded in the checkpoint are committed (they belonged to a completed
checkpoint) and the in-flight one is aborted. Commits are idempotent.

A transaction pre-committed for a checkpoint that never completes is aborted on restore only if it
was the in-flight one of the restored checkpoint; one staged after that (a later checkpoint that
failed, or any when the job restarts without a checkpoint) stays under ``_staging/`` uncommitted,
as with Flink's ``TwoPhaseCommitSinkFunction``: harmless for exactly-once, but not cleaned up.

:class:`TransactionalFileSink` stages JSON lines as objects under ``<location>/_staging/`` and commits
by writing ``<location>/<txn>.jsonl`` create-only and deleting the staged object, through the same
object stores as checkpoints (local disk or S3).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from abc import abstractmethod
from collections.abc import Callable
from typing import Any

from keystate.runtime import faults
from keystate.runtime.operators import Operator
from keystate.statebackend.serializers import JsonSerializer
from keystate.statebackend.state import ListStateDescriptor
from keystate.storage.base import ObjectStore, PutMode, join_key
from keystate.storage.errors import AlreadyExistsError, NotFoundError
from keystate.storage.retry import RetryPolicy, with_retries
from keystate.storage.uri import open_store, parse_location

__all__ = ["TransactionalFileSink", "TwoPhaseCommitSink"]

_encode = json.JSONEncoder(separators=(",", ":")).encode  # built once: json.dumps builds one per call

_PENDING = ListStateDescriptor[Any](name="2pc-pending", serializer=JsonSerializer())
_CURRENT = ListStateDescriptor[Any](name="2pc-current", serializer=JsonSerializer())


class TwoPhaseCommitSink(Operator):
    """Base of transactional sinks: subclasses implement the transaction primitives."""

    def __init__(self) -> None:
        self._current: str | None = None
        self._pending: list[tuple[int, str, Any]] = []
        self._finished = False

    # --- primitives ----------------------------------------------------------------------------------

    @abstractmethod
    def begin_transaction(self) -> str:
        """Start a transaction; returns its id."""

    @abstractmethod
    def write(self, transaction: str, record: Any) -> None:
        """Add a record to a transaction."""

    @abstractmethod
    async def pre_commit(self, transaction: str) -> Any:
        """Make the transaction durable and ready to commit (no more writes).

        Returns:
            JSON-serializable facts ``commit`` needs later (kept in the checkpoint with the id).
        """

    @abstractmethod
    async def commit(self, transaction: str, info: Any) -> None:
        """Make the transaction visible; must be idempotent (it may run again after a restore)."""

    @abstractmethod
    async def abort(self, transaction: str) -> None:
        """Discard the transaction; must tolerate an unknown or already aborted one."""

    # --- lifecycle -----------------------------------------------------------------------------------

    async def initialize_state(self) -> None:
        pending = self.ctx.get_list_state(_PENDING)
        current = self.ctx.get_list_state(_CURRENT)
        for entry in sorted(pending.get(), key=lambda e: (e["checkpoint_id"], e["txn"])):
            # recoverAndCommit: part of a completed checkpoint
            await self._commit_traced(entry["checkpoint_id"], entry["txn"], entry["info"])
        for txn in current.get():
            await self.abort(txn)  # recoverAndAbort: written after the checkpoint
        pending.clear()
        current.clear()
        self._current = self.begin_transaction()

    def process(self, record: Any, input_index: int) -> None:
        assert self._current is not None, "write after the final pre-commit"
        self.write(self._current, record)

    async def finish(self) -> None:
        self._finished = True
        if not self.ctx.checkpointing and self._current is not None:
            # No checkpoint will follow: commit the last transaction now, as Flink's committer does
            # at end of input when checkpointing is off (rule H4). Without checkpoints there is
            # no exactly-once anyway: a failover restarts the job from scratch.
            transaction, self._current = self._current, None
            await self.commit(transaction, await self.pre_commit(transaction))

    async def snapshot_state(self, checkpoint_id: int) -> None:
        if self._current is not None:
            info = await self.pre_commit(self._current)
            self._pending.append((checkpoint_id, self._current, info))
            self._current = None if self._finished else self.begin_transaction()
        self.ctx.get_list_state(_PENDING).update(
            [{"checkpoint_id": c, "txn": t, "info": i} for c, t, i in self._pending]
        )
        self.ctx.get_list_state(_CURRENT).update([] if self._current is None else [self._current])

    async def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        for c, txn, info in self._pending:
            if c <= checkpoint_id:
                await self._commit_traced(c, txn, info)
        self._pending = [p for p in self._pending if p[0] > checkpoint_id]

    async def _commit_traced(self, checkpoint_id: int, transaction: str, info: Any) -> None:
        context = {"uid": self.ctx.uid, "index": self.ctx.subtask_index, "checkpoint_id": checkpoint_id}
        faults.point("sink.commit.before", txn=transaction, **context)
        await self.commit(transaction, info)
        faults.point("sink.commit.after", txn=transaction, **context)

    async def close(self) -> None:
        if self._current is not None:
            await self.abort(self._current)
            self._current = None


class TransactionalFileSink(TwoPhaseCommitSink):
    """Writes records as JSON lines into ``location`` (a path, ``file://`` or ``s3://`` URI),
    one committed object per transaction: ``<location>/<uid>-<subtask>-<random>.jsonl``.

    Args:
        location: where committed files go (staged ones under ``_staging/``).
        endpoint_url: S3 endpoint override.
        retry: retries of transient storage failures for stores that do not retry on their own
            (``keystate.storage.retry``); ``None``: none.
        wrap_store: wraps the object store before the retry layer (e.g. ``FaultyObjectStore``).
    """

    def __init__(
        self,
        location: str,
        *,
        endpoint_url: str | None = None,
        retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008 - frozen, shared safely
        wrap_store: Callable[[ObjectStore], ObjectStore] | None = None,
    ) -> None:
        super().__init__()
        self.location = location
        self._endpoint_url = endpoint_url
        self._retry = retry
        self._wrap_store = wrap_store
        self._store: ObjectStore | None = None
        self._base = ""
        self._buffers: dict[str, list[str]] = {}

    async def initialize_state(self) -> None:
        parsed = parse_location(self.location)
        store = open_store(parsed, endpoint_url=self._endpoint_url)
        if self._wrap_store is not None:
            store = self._wrap_store(store)
        self._store = with_retries(store, self._retry)
        self._base = parsed.path
        await super().initialize_state()

    def _store_or_fail(self) -> ObjectStore:
        assert self._store is not None, "the sink is not initialized"
        return self._store

    def begin_transaction(self) -> str:
        name = f"{self.ctx.uid}-{self.ctx.subtask_index}-{uuid.uuid4().hex[:12]}"
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        self._buffers[safe] = []
        return safe

    def write(self, transaction: str, record: Any) -> None:
        self._buffers[transaction].append(_encode(record))

    def _staged(self, transaction: str) -> str:
        return join_key(self._base, "_staging", f"{transaction}.jsonl")

    def _final(self, transaction: str) -> str:
        return join_key(self._base, f"{transaction}.jsonl")

    async def pre_commit(self, transaction: str) -> Any:
        lines = self._buffers.pop(transaction, [])
        if lines:
            data = ("\n".join(lines) + "\n").encode()
            await asyncio.to_thread(self._store_or_fail().put, self._staged(transaction), data, PutMode.CREATE)
        return {"records": len(lines)}

    async def commit(self, transaction: str, info: Any) -> None:
        if info["records"]:
            await asyncio.to_thread(self._commit, transaction)

    def _commit(self, transaction: str) -> None:
        store = self._store_or_fail()
        staged, final = self._staged(transaction), self._final(transaction)
        try:
            data = store.get(staged)
        except NotFoundError:
            if store.exists(final):
                return  # committed before: a commit after a restore repeats it
            raise
        try:
            store.put(final, data, PutMode.CREATE)
        except AlreadyExistsError:
            if store.get(final) != data:
                raise
        store.delete(staged)

    async def abort(self, transaction: str) -> None:
        self._buffers.pop(transaction, None)
        await asyncio.to_thread(self._store_or_fail().delete, self._staged(transaction))
