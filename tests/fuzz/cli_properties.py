"""Properties of (f) the CLI: inspect / verify / dump / check-restore / list on damaged copies of a real
checkpoint (rewritten, deleted, symlinked or sparse files, symlinked directories, extra checkpoints and
savepoints, a damaged topology file) exit 0, 1 or 2, with at most one line on stderr, no traceback, no
write and no file outside the location touched."""

from __future__ import annotations

import contextlib
import itertools
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from keystate.storage.checkpoints import METADATA_FILE
from keystate.storage.format import validation
from tests.fuzz import samples
from tests.fuzz.cli_harness import check_cli_run, run_cli
from tests.fuzz.document_properties import topology_mutated
from tests.fuzz.harness import FuzzContext
from tests.fuzz.samples import CliTemplate
from tests.fuzz.strategies import encoded_document, hostile_strings, mutated_bytes, mutated_document

__all__ = ["CliExample", "check_cli", "cli_examples", "document_limit"]


@dataclass(frozen=True)
class CliExample:
    mutations: tuple[tuple[Any, ...], ...]
    location: str
    uid: str
    key_group: int | None
    json_output: bool
    topology: bytes | None
    limit_document: bool

    def __repr__(self) -> str:  # file contents are rebuilt from the seed; their bytes would flood the report
        def short(value: Any) -> str:
            return f"<{len(value)} bytes>" if isinstance(value, bytes) and len(value) > 64 else repr(value)

        mutations = [tuple(short(v) for v in m) for m in self.mutations]
        return (
            f"CliExample(mutations={mutations}, location={self.location!r}, uid={self.uid[:40]!r}, "
            f"key_group={self.key_group}, json={self.json_output}, topology={short(self.topology)}, "
            f"limit_document={self.limit_document})"
        )


@st.composite
def cli_examples(draw: st.DrawFn, template: CliTemplate) -> CliExample:
    mutations: list[tuple[Any, ...]] = []
    files = template.state_files
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["metadata-plausible", "metadata-plausible", "metadata-json", "metadata-bytes",
                                     "state-bytes", "state-bytes", "delete", "symlink", "dir-symlink",
                                     "directory", "sparse-metadata", "metadata-symlink", "extra-checkpoint",
                                     "savepoint"]))  # fmt: skip
        if kind in ("metadata-json", "metadata-plausible"):
            doc, _ = draw(mutated_document(template.document, plausible=kind == "metadata-plausible"))
            mutations.append(("metadata", draw(encoded_document(doc))))
        elif kind == "metadata-bytes":
            mutations.append(("metadata", draw(mutated_bytes(template.metadata))[0]))
        elif kind == "state-bytes":
            name = draw(st.sampled_from(files))
            data = (template.root / template.checkpoint / name).read_bytes()
            boundaries, _ = samples.block_boundaries(data)
            fields = [0, 4, 6, 7, *itertools.chain.from_iterable((b, b + 4, b + 8) for b in boundaries)]
            mutations.append(("state", name, draw(mutated_bytes(data, positions=fields))[0]))
        elif kind in ("delete", "directory"):
            mutations.append((kind, draw(st.sampled_from(files))))
        elif kind == "symlink":
            target = draw(st.sampled_from(["same", "other", "devnull", "dangling", "subdir", "loop", "root"]))
            mutations.append(("symlink", draw(st.sampled_from(files)), target))
        elif kind == "dir-symlink":
            mutations.append(("dir-symlink", draw(st.sampled_from(template.state_dirs))))
        elif kind == "metadata-symlink":
            mutations.append(("symlink", METADATA_FILE, draw(st.sampled_from(["same", "dangling", "subdir",
                                                                                "loop", "devnull"]))))  # fmt: skip
        elif kind == "sparse-metadata":
            mutations.append(("sparse", draw(st.sampled_from([(1 << 20) + 1, 300 << 20]))))
        else:
            doc, _ = draw(mutated_document(template.document, max_mutations=2))
            if kind == "savepoint" and isinstance(doc, dict):
                doc["kind"] = "savepoint"
            mutations.append((kind, draw(st.integers(0, 12)), draw(encoded_document(doc))))
    location = draw(st.sampled_from(["root", "job", "checkpoint", "metadata", "file-uri"]))
    uid = draw(st.one_of(st.sampled_from(["totals", "sink", "audit", "src"]), hostile_strings()))
    key_group = draw(st.one_of(st.none(), st.integers(-1, 9)))
    topology = draw(st.one_of(st.none(), topology_mutated()))
    return CliExample(tuple(mutations), location, uid, key_group, draw(st.booleans()), topology,
                      any(m[0] == "sparse" for m in mutations))  # fmt: skip


def _remove(path: Path) -> None:
    """Remove what is at ``path``, if anything: a directory (not a link to one) with its contents."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _through_link(root: Path, path: Path) -> bool:
    """Whether a directory between ``root`` and ``path`` is a link (an earlier ``dir-symlink``): a mutation
    there would change the template's decoy, which every example shares."""
    return any(p.is_symlink() for p in path.parents if p != root and p.is_relative_to(root))


def _apply(template: CliTemplate, root: Path, mutation: tuple[Any, ...]) -> None:
    directory = root / template.checkpoint
    kind = mutation[0]
    if kind in ("state", "delete", "directory", "symlink", "dir-symlink") and _through_link(
        root, directory / mutation[1]
    ):
        return
    if kind == "metadata":
        path = directory / METADATA_FILE
        if path.is_symlink() or path.is_dir():
            return
        path.write_bytes(mutation[1])
    elif kind == "state":
        path = directory / mutation[1]
        if path.is_symlink() or not path.is_file():
            return
        path.write_bytes(mutation[2])
    elif kind == "delete":
        _remove(directory / mutation[1])
    elif kind == "directory":
        path = directory / mutation[1]
        if path.is_symlink() or path.is_file():
            path.unlink()
        path.mkdir(exist_ok=True)
    elif kind == "dir-symlink":
        path = directory / mutation[1]
        if path.is_symlink() or not path.is_dir():
            return
        shutil.rmtree(path)
        path.symlink_to(template.outside / "tree" / mutation[1], target_is_directory=True)
    elif kind == "symlink":
        name, target = mutation[1], mutation[2]
        path = directory / name
        _remove(path)
        path.symlink_to(template.link_target(name, target, path))
    elif kind == "sparse":
        path = directory / METADATA_FILE
        if path.is_symlink() or path.is_dir():
            return
        with open(path, "r+b") as f:
            f.truncate(mutation[1])
    else:
        parent = root / samples.CLI_JOB_ID if kind == "extra-checkpoint" else root / "savepoints"
        name = f"chk-{mutation[1]}" if kind == "extra-checkpoint" else f"savepoint-feedfa-{mutation[1]:012x}"
        (parent / name).mkdir(parents=True, exist_ok=True)
        path = parent / name / METADATA_FILE
        if not path.is_symlink() and not path.is_dir():
            path.write_bytes(mutation[2])


@contextlib.contextmanager
def document_limit(limit: int | None) -> Iterator[None]:
    """Lower the ``_metadata`` size limit (so a test need not write hundreds of megabytes)."""
    if limit is None:
        yield
        return
    saved = validation.MAX_DOCUMENT_BYTES
    validation.MAX_DOCUMENT_BYTES = limit
    try:
        yield
    finally:
        validation.MAX_DOCUMENT_BYTES = saved


def check_cli(ctx: FuzzContext, ex: CliExample) -> None:
    """inspect / verify / dump / check-restore / list on a damaged copy of a real checkpoint: exit 0, 1
    or 2, at most one line on stderr, no traceback, no write, no file outside the location touched."""
    template = ctx.cli_template()
    work = ctx.fresh_dir("cli")
    root = work / "root"
    shutil.copytree(template.root, root, symlinks=True)
    try:
        for mutation in ex.mutations:
            _apply(template, root, mutation)
        topology = template.topology
        if ex.topology is not None:
            topology = work / "topology.json"
            topology.write_bytes(ex.topology)
        location = {
            "root": str(root),
            "job": str(root / samples.CLI_JOB_ID),
            "checkpoint": str(root / template.checkpoint),
            "metadata": str(root / template.checkpoint / METADATA_FILE),
            "file-uri": f"file://{root / template.checkpoint}",
        }[ex.location]
        json_flag = ["--json"] if ex.json_output else []
        commands: list[list[str]] = [
            ["inspect", location, *json_flag],
            ["inspect", location, "--operator", ex.uid] if not ex.json_output else ["inspect", location, "--graph"],
            ["verify", location, *json_flag],
            ["dump", location, "--operator", ex.uid]
            + ([] if ex.key_group is None else ["--key-group", str(ex.key_group)]),
            ["check-restore", location, "--topology", str(topology), *json_flag],
            ["list", str(root), *json_flag],
        ]
        # Not template.outside: the links the mutations plant point there, and paths are resolved.
        confined = (root, topology)
        with document_limit(1 << 20 if ex.limit_document else None):
            for argv in commands:
                check_cli_run(run_cli(argv), confined_to=confined, watched=ctx.scratch)
        if not ex.mutations and ex.topology is None:
            assert run_cli(["verify", location]).code == 0
    finally:
        shutil.rmtree(work)
