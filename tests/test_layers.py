"""The layer rules of docs/architecture.md#layers, read from the source with ``ast``: imports point down only.

Every ``import`` of every module under ``keystate/`` is collected, the ones inside a function (which run
only when it is called) and under ``if TYPE_CHECKING:`` (which never run) told apart from the eager,
module-level ones, so a message says where an offending import sits as well as what it is::

    tools  ->  runtime  ->  statebackend  ->  storage (object stores, checkpoint storage)  ->  storage.format

The format (``keystate.storage.format``) describes bytes and moves none; the object stores move bytes and
know no format; boto3 loads only in the S3 store (and S3 fault injection).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("storage", "statebackend", "runtime", "tools")
FORMAT = "keystate.storage.format"
# Third-party packages the format may use: the checksum and the block compression.
FORMAT_THIRD_PARTY = {"zstandard", "xxhash"}
# The standard library minus what runs concurrently or reaches the operating system's I/O.
FORMAT_FORBIDDEN_STDLIB = {
    "_thread", "asyncio", "concurrent", "fcntl", "ftplib", "http", "mmap", "multiprocessing", "os", "pathlib",
    "queue", "select", "selectors", "shutil", "signal", "socket", "socketserver", "ssl", "subprocess",
    "tempfile", "threading", "urllib",
}  # fmt: skip
OBJECT_STORES = {
    f"keystate.storage.{name}"
    for name in ("base", "_local", "_local_writer", "_s3", "_s3_client", "_memory", "retry", "faults", "s3faults")
}
BOTO_MODULES = {"keystate.storage._s3", "keystate.storage._s3_client", "keystate.storage.s3faults"}


@dataclass(frozen=True)
class Import:
    """One imported module as written in ``importer`` (``from a import b`` is ``a.b`` when that is a module)."""

    importer: str
    target: str
    line: int
    where: str
    """``module level``, ``inside a function`` or ``under TYPE_CHECKING``."""

    @property
    def eager(self) -> bool:
        return self.where == "module level"

    def __str__(self) -> str:
        return f"{self.importer} imports {self.target} ({self.where}, line {self.line})"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["keystate", *parts])


def _sources() -> dict[str, Path]:
    found = {"keystate": REPO / "keystate" / "__init__.py"}
    for layer in LAYERS:
        for path in sorted((REPO / layer).rglob("*.py")):
            found[_module_name(path)] = path
    return found


SOURCES = _sources()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, where: str) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, where
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _walk(child, "inside a function" if where == "module level" else where)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), "under TYPE_CHECKING")
            for stmt in child.orelse:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), where)
        else:
            yield from _walk(child, where)


def _imports_of(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []
    for node, where in _walk(tree, "module level"):
        if isinstance(node, ast.Import):
            found.extend(Import(module, alias.name, node.lineno, where) for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        if base == "__future__":
            continue
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            found.append(Import(module, sub if sub in SOURCES else base, node.lineno, where))
    return found


IMPORTS = {module: _imports_of(module, path) for module, path in SOURCES.items()}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _top(name: str) -> str:
    return name.partition(".")[0]


def _violations(importers: Callable[[str], bool], bad: Callable[[Import], bool]) -> list[str]:
    return [str(imp) for module, imps in IMPORTS.items() if importers(module) for imp in imps if bad(imp)]


def _report(rule: str, violations: list[str]) -> str:
    return f"{rule}:\n  " + "\n  ".join(violations)


def test_every_layer_module_was_read() -> None:
    assert {m for m in SOURCES if m.count(".") == 1} >= {f"keystate.{layer}" for layer in LAYERS}
    assert f"{FORMAT}.metadata" in SOURCES
    assert all(IMPORTS[m] for m in ("keystate.storage.checkpoints", "keystate.runtime.task", "keystate.tools.cli"))


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("keystate.storage", ("keystate.statebackend", "keystate.runtime", "keystate.tools")),
        ("keystate.statebackend", ("keystate.runtime", "keystate.tools", "asyncio")),
        ("keystate.runtime", ("keystate.tools",)),
    ],
)
def test_imports_point_down(layer: str, forbidden: tuple[str, ...]) -> None:
    bad = _violations(lambda m: _within(m, layer), lambda imp: any(_within(imp.target, f) for f in forbidden))
    assert not bad, _report(f"{layer} must not import {', '.join(forbidden)}", bad)


def _format_may_import(target: str) -> bool:
    if _within(target, FORMAT) or target == "keystate.storage.errors":
        return True
    top = _top(target)
    if top in FORMAT_THIRD_PARTY:
        return True
    return top in sys.stdlib_module_names and top not in FORMAT_FORBIDDEN_STDLIB


def test_the_format_does_no_io() -> None:
    bad = _violations(lambda m: _within(m, FORMAT), lambda imp: not _format_may_import(imp.target))
    assert not bad, _report(
        f"{FORMAT} may import only itself, keystate.storage.errors, {', '.join(sorted(FORMAT_THIRD_PARTY))} and "
        f"the standard library without {', '.join(sorted(FORMAT_FORBIDDEN_STDLIB))}",
        bad,
    )


def test_object_stores_know_no_format() -> None:
    bad = _violations(lambda m: m in OBJECT_STORES, lambda imp: _within(imp.target, FORMAT))
    assert not bad, _report(f"the object stores ({', '.join(sorted(OBJECT_STORES))}) must not import {FORMAT}", bad)


def test_boto_loads_only_in_the_s3_modules() -> None:
    bad = _violations(lambda m: m not in BOTO_MODULES, lambda imp: _top(imp.target) in ("boto3", "botocore"))
    assert not bad, _report(f"only {', '.join(sorted(BOTO_MODULES))} may import boto3 or botocore", bad)


def test_the_s3_modules_load_only_when_used() -> None:
    """``keystate.storage`` and every other module reach ``_s3`` / ``s3faults`` only inside a function
    (``open_store`` for an ``s3://`` location) or for the type checker, never when they are imported."""
    bad = _violations(lambda m: m not in BOTO_MODULES, lambda imp: imp.target in BOTO_MODULES and imp.eager)
    assert not bad, _report(f"nothing may import {', '.join(sorted(BOTO_MODULES))} at module level", bad)


def _eager_closure(start: str) -> dict[str, Import | None]:
    """Every module (and top-level third-party or stdlib name) that importing ``start`` imports, with the
    import that first reached it. Importing ``a.b.c`` runs ``a`` and ``a.b`` first."""
    reached: dict[str, Import | None] = {}
    todo: list[tuple[str, Import | None]] = [(start, None)]
    while todo:
        name, via = todo.pop()
        if name in reached:
            continue
        reached[name] = via
        parts = name.split(".")
        for i in range(1, len(parts)):
            todo.append((".".join(parts[:i]), via))
        for imp in IMPORTS.get(name, []):
            if imp.eager:
                todo.append((imp.target if imp.target in SOURCES else _top(imp.target), imp))
    return reached


def _chain(reached: dict[str, Import | None], name: str) -> str:
    """How ``name`` was reached: ``boto3 <- keystate.storage._s3 (line 23) <- keystate.storage.uri (line 17)``."""
    hops = [name]
    via = reached[name]
    while via is not None:
        hops.append(f"{via.importer} (line {via.line})")
        via = reached[via.importer]
    return " <- ".join(hops)


@pytest.mark.parametrize(
    "entry", ["keystate.tools.cli", "keystate.tools.summary", "keystate.tools.render", "keystate.runtime.restore_rules"]
)
def test_the_cli_local_paths_import_no_runtime_machinery(entry: str) -> None:
    """What ``inspect``, ``list`` and ``check-restore`` import when they start: no asyncio, no tasks."""
    reached = _eager_closure(entry)
    forbidden = ("asyncio", "boto3", "botocore", "keystate.runtime.execution", "keystate.runtime.task",
                 "keystate.runtime.coordinator")  # fmt: skip
    bad = [_chain(reached, name) for name in forbidden if name in reached]
    assert not bad, _report(f"importing {entry} must not import", bad)


def _cycles(package: str) -> list[list[str]]:
    """Import cycles among the modules of ``package``, counting every import (eager, deferred, typing)."""
    graph = {
        m: {imp.target for imp in IMPORTS[m] if _within(imp.target, package) and imp.target in SOURCES}
        for m in SOURCES
        if _within(m, package)
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: list[str] = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_format_has_no_import_cycles() -> None:
    """The model does not import its parsers: ``_metadata_versions`` -> ``_metadata_v1`` -> ``metadata``."""
    cycles = _cycles(FORMAT)
    assert not cycles, _report(f"import cycles in {FORMAT}", [" <-> ".join(c) for c in cycles])
