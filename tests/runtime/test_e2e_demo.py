"""End to end: the demo job (docs/architecture.md#the-demo-job) ends with a drained savepoint and committed output."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from keystate.runtime.demo import _order, run_demo
from keystate.storage.format.metadata import CheckpointKind, OperatorStatus
from tests.runtime.e2e_support import run


def test_demo_ends_with_drained_savepoint_and_committed_output(tmp_path: Path) -> None:
    location = tmp_path / "demo"
    lines: list[str] = []
    # 12,000 orders at 6,000/s: the bounded branch finishes after ~2 s, leaving margin on a loaded machine.
    savepoint = run(run_demo(str(location), duration=4.0, out=lines.append, interval=0.1))
    metadata = savepoint.metadata
    assert savepoint.kind is CheckpointKind.SAVEPOINT
    assert metadata.properties.synchronous
    assert metadata.properties.drain
    assert Path(savepoint.location).parent == location / "savepoints"
    for uid in ("orders", "order-totals"):
        op = metadata.operator(uid)
        assert op is not None, uid
        assert op.status is OperatorStatus.FULLY_FINISHED, uid
    for uid in ("clicks", "click-counts", "sink"):
        op = metadata.operator(uid)
        assert op is not None, uid
        assert op.status is OperatorStatus.RUNNING, uid
    assert any("orders: finished" in line for line in lines), "the demo shows the bounded branch finishing"
    assert any(line.startswith("savepoint: ") for line in lines)

    output = location / "output"
    records = [line for path in sorted(output.glob("*.jsonl")) for line in path.read_text().splitlines()]
    assert not list((output / "_staging").glob("*.jsonl")), "everything staged was committed"
    assert len(records) == len(set(records)), "a committed record appears twice"
    orders = [json.loads(r) for r in records if '"user"' in r]
    assert sorted(o["order"] for o in orders) == list(range(12_000)), "every order committed exactly once"
    # Per user the running total grows with every order (amounts are positive) and ends at the sum of
    # the user's amounts; within one committed file the totals appear in processing order.
    per_user: dict[str, list[int]] = defaultdict(list)
    for order in orders:
        per_user[order["user"]].append(order["total"])
    expected: dict[str, int] = defaultdict(int)
    for n in range(12_000):
        expected[_order(n)["user"]] += _order(n)["amount"]
    assert set(per_user) == set(expected)
    for user, totals in per_user.items():
        assert len(set(totals)) == len(totals), user
        assert max(totals) == expected[user], user
    for path in output.glob("*.jsonl"):
        seen: dict[str, int] = {}
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "user" in record:
                assert record["total"] > seen.get(record["user"], 0), f"{path.name}: {record}"
                seen[record["user"]] = record["total"]
    clicks = [json.loads(r) for r in records if '"page"' in r]
    assert clicks, "the unbounded branch produced committed output"
    per_page: dict[str, list[int]] = defaultdict(list)
    for click in clicks:
        per_page[click["page"]].append(click["clicks"])
    for page, counts in per_page.items():
        assert sorted(counts) == list(range(1, len(counts) + 1)), f"{page}: click counts not 1..n"
