"""Rendering tool results for people: tables, graphs, one-line verdicts. (``--json`` uses ``to_dict``.)"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from keystate.runtime.restore_rules import RestoreReport
from keystate.storage.metadata import OperatorStatus
from keystate.tools.summary import CheckpointListing, CheckpointSummary, VerifyReport

__all__ = [
    "human_bytes",
    "render_graph",
    "render_listing",
    "render_operator",
    "render_report",
    "render_summary",
    "render_verify",
    "table",
]


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """A plain-text table; columns in ``right`` are right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _time(ms: int) -> str:
    try:
        return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, ValueError, OSError):  # valid metadata allows up to 2^63-1 ms, past year 9999
        return f"{ms} ms since the epoch (after year 9999)"


def _status(status: OperatorStatus, finished: list[int]) -> str:
    if status is OperatorStatus.PARTIALLY_FINISHED:
        return f"partially finished {finished}"
    return status.value.replace("_", " ")


def _age(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    if seconds < 172800:
        return f"{seconds // 3600}h ago"
    return f"{seconds // 86400}d ago"


def render_summary(summary: CheckpointSummary) -> str:
    m = summary.checkpoint.metadata
    props = []
    if m.properties.synchronous:
        props.append("stop-with-savepoint")
    if m.properties.drain:
        props.append("drain")
    kind = m.kind.value + (f" ({', '.join(props)})" if props else "")
    stored, raw = summary.total_state_bytes, summary.total_raw_bytes
    ratio = f", compression {raw / stored:.1f}x" if stored and raw else ""
    handles = sum(o.handles for o in summary.operators)
    head = [
        f"{kind} {m.checkpoint_id} of job {m.job_id}",
        f"taken     {_time(m.timestamp)}",
        f"location  {summary.checkpoint.location}",
        f"state     {human_bytes(stored)} stored, {human_bytes(raw)} raw in {handles} handles{ratio}",
        "",
    ]
    rows = []
    for op in summary.operators:
        if not op.keyed or op.status is OperatorStatus.FULLY_FINISHED:
            groups = "-"
        elif not op.key_groups_covered:
            groups = f"none of {op.max_parallelism}"
        else:
            spans = ",".join(str(r) for r in op.key_group_ranges)
            groups = f"{spans} ({op.key_groups_covered}/{op.max_parallelism})"
        rows.append([
            op.uid, str(op.parallelism), str(op.max_parallelism), _status(op.status, op.finished_subtasks),
            human_bytes(op.state_bytes), str(op.handles), groups,
        ])  # fmt: skip
    body = table(
        ["OPERATOR", "PARALLELISM", "MAX PARALLELISM", "STATUS", "STATE", "HANDLES", "KEY GROUPS"],
        rows,
        right=(1, 2, 4, 5),
    )
    return "\n".join(head) + body


def render_operator(summary: CheckpointSummary, uid: str) -> str:
    """Per-subtask detail of one operator: every handle with its key groups, file, sizes, checksum."""
    op = summary.checkpoint.metadata.operator(uid)
    assert op is not None
    lines = [f"operator {op.uid}: parallelism {op.parallelism}, max parallelism {op.max_parallelism}, "
             f"{_status(op.status, op.finished_subtasks)}"]  # fmt: skip
    if op.fully_finished:
        lines.append("  fully finished: no subtask state (deployed finished on restore)")
        return "\n".join(lines)
    rows = []
    for st in op.subtasks:
        if st.finished:
            rows.append([str(st.index), "finished", "-", "-", "-", "-", "-"])
            continue
        for k in st.keyed:
            s = k.stream
            rows.append([str(st.index), "keyed", str(k.key_groups), s.describe, human_bytes(s.size),
                         human_bytes(s.raw_size), s.checksum])  # fmt: skip
        for o in st.operator:
            s = o.stream
            names = ", ".join(f"{e.name} ({e.mode.value}, {len(e.offsets)})" for e in o.states)
            rows.append([str(st.index), f"operator: {names}", "-", s.describe, human_bytes(s.size),
                         human_bytes(s.raw_size), s.checksum])  # fmt: skip
    if not rows:
        lines.append("  no state")
        return "\n".join(lines)
    lines.append(table(["SUBTASK", "STATE", "KEY GROUPS", "FILE", "SIZE", "RAW", "CHECKSUM"], rows, right=(0, 4, 5)))
    return "\n".join(lines)


def render_graph(summary: CheckpointSummary, fmt: str = "mermaid") -> str:
    """The topology at checkpoint time with finished operators marked (Mermaid or Graphviz DOT)."""
    ops = summary.checkpoint.metadata.operators
    ids = {op.uid: f"op{i}" for i, op in enumerate(ops)}

    def label(uid: str, status: OperatorStatus, finished: list[int], p: int) -> str:
        text = f"{uid} (p={p})"
        if status is OperatorStatus.FULLY_FINISHED:
            return f"{text}<br/>fully finished" if fmt == "mermaid" else f"{text}\\nfully finished"
        if status is OperatorStatus.PARTIALLY_FINISHED:
            sep = "<br/>" if fmt == "mermaid" else "\\n"
            return f"{text}{sep}finished {finished}"
        return text

    if fmt == "dot":
        lines = ["digraph checkpoint {", "  rankdir=LR;", "  node [shape=box, style=rounded];"]
        for op in ops:
            style = {
                OperatorStatus.FULLY_FINISHED: ', style="rounded,filled", fillcolor="#c8e6c9"',
                OperatorStatus.PARTIALLY_FINISHED: ', style="rounded,filled", fillcolor="#fff9c4"',
            }.get(op.status, "")
            text = label(op.uid, op.status, op.finished_subtasks, op.parallelism).replace('"', '\\"')
            lines.append(f'  {ids[op.uid]} [label="{text}"{style}];')
        for op in ops:
            for e in op.inputs:
                lines.append(f'  {ids[e.source]} -> {ids[op.uid]} [label="{e.partitioning.value}"];')
        lines.append("}")
        return "\n".join(lines)
    lines = ["flowchart LR"]
    for op in ops:
        text = label(op.uid, op.status, op.finished_subtasks, op.parallelism).replace('"', "#quot;")
        lines.append(f'  {ids[op.uid]}["{text}"]')
    for op in ops:
        for e in op.inputs:
            lines.append(f"  {ids[e.source]} -->|{e.partitioning.value}| {ids[op.uid]}")
    lines.append("  classDef finished fill:#c8e6c9,stroke:#2e7d32;")
    lines.append("  classDef partial fill:#fff9c4,stroke:#f9a825;")
    for op in ops:
        if op.status is OperatorStatus.FULLY_FINISHED:
            lines.append(f"  class {ids[op.uid]} finished;")
        elif op.status is OperatorStatus.PARTIALLY_FINISHED:
            lines.append(f"  class {ids[op.uid]} partial;")
    return "\n".join(lines)


def render_listing(rows: Sequence[CheckpointListing], now_ms: int) -> str:
    if not rows:
        return "no completed checkpoints or savepoints"
    out = []
    for r in rows:
        d = r.to_dict(now_ms)
        if r.summary is None:
            out.append([r.kind, str(r.checkpoint_id or "?"), "?", "?", "?", f"unreadable: {r.error}", r.location])
            continue
        ops = d["operators"]
        counts = f"{ops['running']} running, {ops['partially_finished']} partial, {ops['fully_finished']} finished"
        out.append([d["kind"], str(d["checkpoint_id"]), d["job_id"][:8], _age(d["age_seconds"]),
                    human_bytes(d["total_state_bytes"]), counts, r.location])  # fmt: skip
    return table(["KIND", "ID", "JOB", "AGE", "SIZE", "OPERATORS", "LOCATION"], out, right=(1, 4))


def render_report(report: RestoreReport, operators: int) -> str:
    if report.compatible:
        return (
            f"compatible: checkpoint {report.checkpoint_id} can be restored into the topology ({operators} operators)"
        )
    lines = [
        f"incompatible: checkpoint {report.checkpoint_id} cannot be restored ({len(report.violations)} violations)"
    ]
    lines += [f"[{v.rule}] {v.message}" for v in report.violations]
    return "\n".join(lines)


def render_verify(report: VerifyReport) -> str:
    total = sum(c.size for c in report.checks)
    if report.ok:
        return f"verified: {len(report.checks)} handles, {human_bytes(total)}, all sizes and checksums match"
    lines = [f"verification FAILED: {len(report.failures)} of {len(report.checks)} handles are damaged"]
    lines += [f"  {c.operator}[{c.subtask}] {c.handle}: {c.error}" for c in report.failures]
    return "\n".join(lines)
