"""Rendering tool results for people: tables, graphs, one-line verdicts. (``--json`` uses ``to_dict``.)"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from keystate.runtime.restore_rules import RestoreReport
from keystate.storage.flink_checkpoints import SourceFormat, stream_handles
from keystate.storage.format.flink import (
    ByteStreamStateHandle,
    EmptySegmentFileStateHandle,
    FileStateHandle,
    FlinkStreamHandle,
    OperatorStreamStateHandle,
    RelativeFileStateHandle,
    SegmentFileStateHandle,
)
from keystate.storage.format.metadata import OperatorStatus, StreamHandle
from keystate.tools.errors import UsageError
from keystate.tools.summary import CheckpointListing, CheckpointSummary, FlinkCheckpointSummary, VerifyReport

__all__ = [
    "human_bytes",
    "plural",
    "render_graph",
    "render_listing",
    "render_operator",
    "render_report",
    "render_summary",
    "render_verify",
    "table",
]


def plural(n: int, noun: str) -> str:
    """``n`` and the noun, plural unless ``n`` is 1: "1 handle", "0 handles", "2 violations"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


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


def _ms(value: int) -> str:
    return f"{value} ms" if value < 10_000 else f"{value / 1000:.1f} s"


def _sizes_line(checkpointed: int | None, full: int, incremental: bool | None) -> str:
    """Flink's UI's two sizes: "Checkpointed Data Size" (written by this checkpoint) and "Full Checkpoint Data
    Size" (the whole state it represents)."""
    written = "unknown" if checkpointed is None else human_bytes(checkpointed)
    kind = {True: "incremental", False: "full", None: "incremental or full: unknown"}[incremental]
    return f"size      {written} checkpointed (written by this checkpoint), {human_bytes(full)} full ({kind})"


def render_summary(summary: CheckpointSummary | FlinkCheckpointSummary) -> str:
    if isinstance(summary, FlinkCheckpointSummary):
        return _render_flink_summary(summary)
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
        f"format    keystate, metadata v{summary.format_version}",
        f"taken     {_time(m.timestamp)}",
        f"location  {summary.checkpoint.location}",
        f"state     {human_bytes(stored)} stored, {human_bytes(raw)} raw in {plural(handles, 'handle')}{ratio}",
        _sizes_line(summary.incremental_state_bytes, summary.full_state_bytes, summary.incremental),
    ]
    if m.statistics is not None:
        head.append(f"duration  {_ms(m.statistics.duration_ms)} (trigger to completion)")
    head.append("")
    timed = any(op.statistics is not None for op in summary.operators)
    rows = []
    for op in summary.operators:
        if not op.keyed or op.status is OperatorStatus.FULLY_FINISHED:
            groups = "-"
        elif not op.key_groups_covered:
            groups = f"none of {op.max_parallelism}"
        else:
            spans = ",".join(str(r) for r in op.key_group_ranges)
            groups = f"{spans} ({op.key_groups_covered}/{op.max_parallelism})"
        written = "?" if op.incremental_state_bytes is None else human_bytes(op.incremental_state_bytes)
        row = [
            op.uid, str(op.parallelism), str(op.max_parallelism), _status(op.status, op.finished_subtasks),
            written, human_bytes(op.full_state_bytes), str(op.handles), groups,
        ]  # fmt: skip
        if timed:
            s = op.statistics
            row += ["-"] * 4 if s is None else [
                _ms(s.sync_duration_ms), _ms(s.async_duration_ms), _ms(s.alignment_duration_ms),
                "-" if s.end_to_end_duration_ms is None else _ms(s.end_to_end_duration_ms)]  # fmt: skip
        rows.append(row)
    headers = ["OPERATOR", "PARALLELISM", "MAX PARALLELISM", "STATUS", "CHECKPOINTED", "FULL SIZE", "HANDLES",
               "KEY GROUPS"]  # fmt: skip
    right = [1, 2, 4, 5, 6]
    if timed:
        headers += ["SYNC", "ASYNC", "ALIGNMENT", "END TO END"]
        right += [8, 9, 10, 11]
    return "\n".join(head) + table(headers, rows, right=right)


def _flink_properties(summary: FlinkCheckpointSummary) -> list[str]:
    props = summary.properties()
    return [word for word, on in (("stop-with-savepoint", props["synchronous"]), ("drain", props["drain"])) if on]


def _render_flink_summary(summary: FlinkCheckpointSummary) -> str:
    checkpoint, m = summary.checkpoint, summary.checkpoint.metadata
    props = _flink_properties(summary)
    kind = checkpoint.kind.value + (f" ({', '.join(props)})" if props else "")
    details = [] if m.properties is None else [m.properties.type_name, m.properties.sharing_files_strategy,
                                                m.properties.savepoint_format]  # fmt: skip
    shown = ", ".join(d for d in details if d)
    prefix = checkpoint.job_id_prefix
    job = checkpoint.job_id or (f"{prefix}... (a savepoint's name holds 6 digits)" if prefix else "unknown")
    handles = sum(o.handles for o in summary.operators)
    head = [
        f"{kind} {m.checkpoint_id} of job {job}",
        f"format    Apache Flink, metadata v{m.format_version}" + (f" ({shown})" if shown else ""),
        "taken     unknown (Flink's _metadata records no time)",
        f"location  {checkpoint.location}",
        f"state     {human_bytes(summary.total_state_bytes)} in {plural(handles, 'handle')}",
        _sizes_line(summary.incremental_state_bytes, summary.full_state_bytes, summary.incremental),
        "",
    ]
    rows = []
    for op in summary.operators:
        if not op.keyed or op.status is OperatorStatus.FULLY_FINISHED:
            groups = "-"
        else:
            spans = ",".join(str(r) for r in op.key_group_ranges)
            groups = f"{spans} ({op.key_groups_covered}/{op.max_parallelism})"
        uid = op.state.uid or "-"
        written = "?" if op.incremental_state_bytes is None else human_bytes(op.incremental_state_bytes)
        rows.append([
            uid, op.operator_id, str(op.parallelism), str(op.max_parallelism),
            _status(op.status, op.finished_subtasks), written, human_bytes(op.full_state_bytes), str(op.handles),
            groups,
        ])  # fmt: skip
    body = table(
        ["OPERATOR", "OPERATOR ID", "PARALLELISM", "MAX PARALLELISM", "STATUS", "CHECKPOINTED", "FULL SIZE",
         "HANDLES", "KEY GROUPS"],
        rows,
        right=(2, 3, 5, 6, 7),
    )  # fmt: skip
    notes = ["", "note: Flink's _metadata stores no edges: the operators' inputs at checkpoint time are unknown"]
    if any(op.state.uid is None for op in summary.operators):
        notes.append(
            f"note: operators without a uid here have none in the file (format {m.format_version} stores uids "
            "from format 5, Flink 2.0, on; or the operator had no uid); they are matched by operator ID"
        )
    return "\n".join(head) + body + "\n".join(notes)


def _stream_name(stream: FlinkStreamHandle) -> str:
    if isinstance(stream, ByteStreamStateHandle):
        return "inline"
    if isinstance(stream, RelativeFileStateHandle):
        return stream.relative_path
    if isinstance(stream, FileStateHandle):
        return stream.path
    if isinstance(stream, SegmentFileStateHandle):
        return f"{stream.file_path} [{stream.start_pos}, {stream.start_pos + stream.size})"
    if isinstance(stream, EmptySegmentFileStateHandle):
        return "empty segment"
    return stream.flink_class


def _render_flink_operator(summary: FlinkCheckpointSummary, name: str) -> str:
    found = summary.find_operator(name)
    assert found is not None
    op = found.state
    title = f"operator {found.uid}" + (f" (ID {op.operator_id})" if found.uid != op.operator_id else "")
    lines = [f"{title}: {f'name {op.name!r}, ' if op.name else ''}parallelism {op.parallelism}, max parallelism "
             f"{op.max_parallelism}, {_status(found.status, found.finished_subtasks)}"]  # fmt: skip
    if op.fully_finished:
        lines.append("  fully finished: no subtask state (deployed finished on restore)")
        return "\n".join(lines)
    rows = []
    if op.coordinator_state is not None:
        rows.append(["-", "coordinator", "-", "inline", human_bytes(op.coordinator_state.state_size)])
    for st in op.subtasks:
        if st.finished:
            rows.append([str(st.index), "finished", "-", "-", "-"])
            continue
        for handle in st.handles():
            streams = list(stream_handles(handle))
            if len(streams) == 1:
                where = _stream_name(streams[0])
            else:
                inline = sum(isinstance(x, ByteStreamStateHandle) for x in streams)
                where = f"{len(streams)} files ({inline} inline)"
            if isinstance(handle, OperatorStreamStateHandle):
                names = ", ".join(f"{e.name} ({e.mode.name.lower()}, {len(e.offsets)})" for e in handle.states)
                what = f"operator: {names}"
            else:
                what = handle.flink_class
            groups = str(handle.key_groups) if hasattr(handle, "key_groups") else "-"
            rows.append([str(st.index), what, groups, where, human_bytes(handle.state_size)])
    if not rows:
        lines.append("  no state")
        return "\n".join(lines)
    lines.append(table(["SUBTASK", "STATE", "KEY GROUPS", "FILE", "SIZE"], rows, right=(4,)))
    return "\n".join(lines)


def render_operator(summary: CheckpointSummary | FlinkCheckpointSummary, uid: str) -> str:
    """Per-subtask detail of one operator: every handle with its key groups, file, sizes, checksum."""
    if isinstance(summary, FlinkCheckpointSummary):
        return _render_flink_operator(summary, uid)
    op = summary.checkpoint.metadata.operator(uid)
    assert op is not None
    lines = [f"operator {op.uid}: parallelism {op.parallelism}, max parallelism {op.max_parallelism}, "
             f"{_status(op.status, op.finished_subtasks)}"]  # fmt: skip
    if op.fully_finished:
        lines.append("  fully finished: no subtask state (deployed finished on restore)")
        return "\n".join(lines)
    rows = []
    checkpoint_id = summary.checkpoint.metadata.checkpoint_id

    def written(s: StreamHandle) -> str:
        if s.written_by is None or s.written_by == checkpoint_id:
            return ""
        return f", written by checkpoint {s.written_by}"

    for st in op.subtasks:
        if st.finished:
            rows.append([str(st.index), "finished", "-", "-", "-", "-", "-"])
            continue
        for k in st.keyed:
            for i, s in enumerate(k.streams()):
                what = "keyed" if not k.deltas else ("keyed base" if i == 0 else f"keyed delta {i}/{len(k.deltas)}")
                rows.append([str(st.index), what + written(s), str(k.key_groups), s.describe, human_bytes(s.size),
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


def render_graph(summary: CheckpointSummary | FlinkCheckpointSummary, fmt: str = "mermaid") -> str:
    """The topology at checkpoint time with finished operators marked (Mermaid or Graphviz DOT).

    Raises:
        UsageError: a Flink checkpoint, which stores no edges to draw.
    """
    if isinstance(summary, FlinkCheckpointSummary):
        raise UsageError(
            "--graph draws the edges between operators, and a Flink checkpoint stores none; use --json or the "
            "table instead"
        )
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
            out.append([r.kind, str(r.checkpoint_id or "?"), "?", "?", "?", "?", "?", "?", f"unreadable: {r.error}",
                        r.location])  # fmt: skip
            continue
        ops = d["operators"]
        counts = f"{ops['running']} running, {ops['partially_finished']} partial, {ops['fully_finished']} finished"
        kind = f"flink {d['kind']}" if d["source_format"] == SourceFormat.FLINK else d["kind"]
        age = "?" if d["age_seconds"] is None else _age(d["age_seconds"])
        job = d["job_id"] or d.get("job_id_prefix") or "?"
        incremental = {True: "yes", False: "no", None: "?"}[d["incremental"]]
        written = "?" if d["incremental_state_bytes"] is None else human_bytes(d["incremental_state_bytes"])
        duration = "-" if d["statistics"] is None else _ms(d["statistics"]["duration_ms"])
        out.append([kind, str(d["checkpoint_id"]), job[:8], age, incremental, written,
                    human_bytes(d["full_state_bytes"]), duration, counts, r.location])  # fmt: skip
    headers = ["KIND", "ID", "JOB", "AGE", "INCREMENTAL", "CHECKPOINTED", "FULL SIZE", "DURATION", "OPERATORS",
               "LOCATION"]  # fmt: skip
    return table(headers, out, right=(1, 5, 6, 7))


def render_report(report: RestoreReport, operators: int, *, kind: str = "checkpoint", location: str = "") -> str:
    """The verdict, naming what was checked (kind, id and location) in the first line, then one line per
    violation."""
    checked = f"{kind} {report.checkpoint_id}" + (f" at {location}" if location else "")
    if report.compatible:
        lines = [f"compatible: {checked} can be restored into the topology ({plural(operators, 'operator')})"]
    else:
        lines = [f"incompatible: {checked} cannot be restored ({plural(len(report.violations), 'violation')})"]
        lines += [f"[{v.rule}] {v.message}" for v in report.violations]
    lines += [f"warning: {w}" for w in report.warnings]
    if report.starts_empty and len(report.starts_empty) < operators:
        names = ", ".join(repr(uid) for uid in report.starts_empty)
        lines.append(f"starts empty (not in the {kind}): {names}")
    return "\n".join(lines)


def render_verify(report: VerifyReport) -> str:
    total = sum(c.size for c in report.checks)
    unchecked = [f"  {c.operator}[{c.subtask}] {c.handle}: {c.not_checkable}" for c in report.unchecked]
    if report.source_format is SourceFormat.FLINK and report.ok:
        checked = len(report.checks) - len(unchecked)
        head = (
            f"verified: {plural(checked, 'handle')} of a Flink checkpoint, "
            f"{human_bytes(total - sum(c.size for c in report.unchecked))}: every file is there with its stated "
            "size and every offset fits (Flink's files carry no checksums)"
        )
        if unchecked:
            head += f"; {plural(len(unchecked), 'handle')} not checkable here:"
        return "\n".join([head, *unchecked])
    if report.ok:
        return (
            f"verified: {plural(len(report.checks), 'handle')}, {human_bytes(total)}, all sizes, checksums and "
            "state framing match"
        )
    damaged = len(report.failures)
    lines = [
        f"verification FAILED: {damaged} of {plural(len(report.checks), 'handle')} "
        f"{'is' if damaged == 1 else 'are'} damaged"
    ]
    lines += [f"  {c.operator}[{c.subtask}] {c.handle}: {c.error}" for c in report.failures]
    if unchecked:
        lines += [f"{plural(len(unchecked), 'handle')} not checkable here (not counted as damaged):", *unchecked]
    return "\n".join(lines)
