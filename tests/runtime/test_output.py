"""Hash routing sends a record to the subtask owning its key group, as ``assign_key_group`` computes it.

``OutputEdge.router`` inlines ``assign_key_group`` (it runs per record); ``OutputEdge.route`` calls it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from keystate.runtime.channels import ChannelSender, open_channel
from keystate.runtime.output import OutputEdge
from keystate.statebackend import KeySerializer, assign_key_group, operator_index_for_key_group
from keystate.storage.format.topology import Partitioning

KEYS: list[Any] = [*range(300), "a", "hello", (1, "x"), b"raw", None, True, 2**70, -7]


def _first(record: tuple[Any, int]) -> Any:
    return record[0]


@pytest.mark.parametrize(("max_parallelism", "parallelism"), [(7, 3), (128, 4), (32768, 5)])
def test_hash_routing_follows_assign_key_group(max_parallelism: int, parallelism: int) -> None:
    wakeup = asyncio.Event()
    senders: dict[int, ChannelSender] = {i: open_channel(4, wakeup, f"c{i}")[0] for i in range(parallelism)}
    edge = OutputEdge(
        senders,
        Partitioning.HASH,
        0,
        key_selector=_first,
        downstream_parallelism=parallelism,
        downstream_max_parallelism=max_parallelism,
    )
    buffers: dict[int, list[Any]] = {i: [] for i in range(parallelism)}
    router = edge.router(buffers)
    records = [(key, n) for n, key in enumerate(KEYS)]
    for record in records:
        router(record)

    def owner(record: tuple[Any, int]) -> int:
        key_group = assign_key_group(KeySerializer().serialize(record[0]), max_parallelism)
        return operator_index_for_key_group(max_parallelism, parallelism, key_group)

    assert buffers == {i: [r for r in records if owner(r) == i] for i in range(parallelism)}
    assert all(buffers.values())  # every subtask got records: a router that ignored the key would fail
    assert [edge.route(r) for r in records] == [[owner(r)] for r in records]
