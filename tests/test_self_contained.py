"""The repository is self-contained: nothing in it refers to a file outside it.

A user who clones the repository must be able to follow every reference in the docs, comments,
docstrings and ``--help`` texts. So every text file the repository tracks (or would track: untracked
files that are not ignored count too) is scanned for

- names of documents that live outside the repository (the design notes, the style guide, the shared
  reference pages) and paths into a sibling checkout, or absolute paths of the machine it was written on;
- the Flink fixture directory outside ``tests/`` (tests may name it; the library and the docs may not);
- relative Markdown links ``[text](target)`` whose target does not exist inside the repository, or whose
  ``#anchor`` is not a heading or an ``<a id>`` of the target;
- mentions of a project doc (a ``docs/`` Markdown file, optionally with ``#anchor``) that does not exist.

Every finding names the file and the line. The forbidden strings are built from pieces, so that this
file does not flag itself.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_SKIP_DIRS = frozenset(
    {".git", ".venv", "venv", "build", "dist", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache",
     ".hypothesis", "node_modules", "checkpoints", "bench-out"}
)  # fmt: skip
_SKIP_PREFIXES = ("tests/flink/fixtures/",)
"""Binary and verbatim third-party test data: not ours to word."""

# Built from pieces so that this file does not match itself.
_MD = r"\.md\b"
_FORBIDDEN: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("the design notes live outside the repository", re.compile(r"\b" + "DESIGN" + _MD)),
    ("the style guide lives outside the repository", re.compile(r"\b" + "STYLE" + _MD)),
    ("a path into a sibling checkout", re.compile(r"\.\." + "/" + "shared" + r"\b")),
    ("the shared reference pages live outside the repository", re.compile("shared" + "/" + "reference")),
    ("an absolute path of the machine this was written on", re.compile(r"(?<![\w.~-])/" + "work" + "/")),
)
_FIXTURES = re.compile("flink" + "-" + "fixtures" + "/")
"""Allowed under tests/ only."""

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
_INLINE_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:[^>]*\s)?(?:id|name)=[\"']([^\"']+)[\"']")
_DOC_MENTION = re.compile(r"(?<![\w./-])(docs/[\w./-]*?\.md)(?:#([\w-]+))?")


def _walk() -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            yield (Path(dirpath) / name).relative_to(ROOT).as_posix()


@cache
def repository_files() -> tuple[str, ...]:
    """Paths (relative, POSIX) of the files git tracks or would track; a tree walk without git."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True, timeout=60,
        ).stdout  # fmt: skip
        names = [n for n in out.decode("utf-8", "surrogateescape").split("\0") if n]
    except (OSError, subprocess.SubprocessError):
        names = list(_walk())
    keep = []
    for name in sorted(set(names)):
        path = ROOT / name
        if name.startswith(_SKIP_PREFIXES) or path.is_symlink() or not path.is_file():
            continue  # skipped data, the keystate/ layer symlinks, and files deleted in the work tree
        if any(part in _SKIP_DIRS or part.endswith(".egg-info") for part in Path(name).parts[:-1]):
            continue
        keep.append(name)
    return tuple(keep)


@cache
def text_of(name: str) -> str | None:
    """The file's text, or None for binary files."""
    data = (ROOT / name).read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def text_files() -> Iterator[tuple[str, str]]:
    for name in repository_files():
        text = text_of(name)
        if text is not None:
            yield name, text


def markdown_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code spans removed."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, _CODE_SPAN.sub("", line)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link contributes its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


@cache
def anchors_of(name: str) -> frozenset[str]:
    """Every anchor a Markdown file offers: its headings' slugs (with GitHub's -1, -2 for repeats) and
    its explicit ``<a id=...>`` / ``<a name=...>``."""
    text = text_of(name) or ""
    found: set[str] = set(_HTML_ANCHOR.findall(text))
    seen: dict[str, int] = {}
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        heading = None if fenced else _HEADING.match(line)
        if heading:
            slug = github_slug(heading.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return frozenset(found)


def _inside_repository(path: Path) -> bool:
    try:
        path.resolve().relative_to(ROOT)
    except ValueError:
        return False
    return True


def check_target(source: str, target: str, base: Path) -> str | None:
    """Why a link or mention ``target`` (a path relative to ``base``, optionally ``#anchor``) from
    ``source`` does not resolve inside the repository; None if it does."""
    path_part, _, anchor = target.partition("#")
    path_part = path_part.split("?", 1)[0]
    if not path_part:  # "#anchor": this very file
        resolved = ROOT / source
    elif path_part.startswith("/"):
        return f"{target!r} is an absolute path; link relative to {source}"
    else:
        resolved = base / path_part
    if not _inside_repository(resolved):
        return f"{target!r} points outside the repository"
    if not resolved.exists():
        return f"{target!r} does not exist (resolved to {resolved.relative_to(ROOT).as_posix()})"
    if anchor and resolved.is_file() and resolved.suffix == ".md":
        relative = resolved.resolve().relative_to(ROOT.resolve()).as_posix()
        if anchor not in anchors_of(relative):
            return f"{target!r}: {relative} has no heading or <a id> for #{anchor}"
    return None


# --- the checks --------------------------------------------------------------------------------------


def forbidden_references() -> list[str]:
    problems = []
    for name, text in text_files():
        in_tests = name.startswith("tests/")
        for number, line in enumerate(text.splitlines(), 1):
            for why, pattern in _FORBIDDEN:
                if match := pattern.search(line):
                    problems.append(f"{name}:{number}: {why}: {match.group(0)!r} in {line.strip()[:160]!r}")
            if not in_tests and (match := _FIXTURES.search(line)):
                problems.append(
                    f"{name}:{number}: the Flink fixtures are test data (name them under tests/ only): "
                    f"{line.strip()[:160]!r}"
                )
    return problems


def broken_markdown_links() -> list[str]:
    problems = []
    for name, text in text_files():
        if not name.endswith(".md"):
            continue
        base = (ROOT / name).parent
        for number, line in markdown_lines(text):
            targets = _INLINE_LINK.findall(line) + _REFERENCE_LINK.findall(line)
            for target in targets:
                if _SCHEME.match(target):
                    continue  # http(s), mailto: not a file
                if why := check_target(name, target, base):
                    problems.append(f"{name}:{number}: broken link: {why}")
    return problems


def broken_doc_mentions() -> list[str]:
    problems = []
    for name, text in text_files():
        for number, line in enumerate(text.splitlines(), 1):
            for match in _DOC_MENTION.finditer(line):
                target = match.group(1) + (f"#{match.group(2)}" if match.group(2) else "")
                if why := check_target(name, target, ROOT):
                    problems.append(f"{name}:{number}: {why}")
    return problems


def _report(problems: list[str], what: str) -> None:
    if problems:
        pytest.fail(f"{len(problems)} {what}:\n" + "\n".join(problems), pytrace=False)


def test_the_scan_sees_the_repository() -> None:
    files = repository_files()
    assert "README.md" in files
    assert "docs/architecture.md" in files
    assert Path(__file__).relative_to(ROOT).as_posix() in files
    assert not any(f.startswith(_SKIP_PREFIXES) for f in files)


@pytest.mark.parametrize(
    "line",
    [
        "see " + "DESIGN" + ".md section 8",
        "rules in `" + ".." + "/" + "shared" + "/" + "reference" + "/flink-flip147.md`",
        "STYLE" + ".md 13",
        "open " + "/" + "work/shared/x",
    ],
)
def test_the_patterns_catch_outside_references(line: str) -> None:
    assert any(pattern.search(line) for _, pattern in _FORBIDDEN)


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("4. The `_metadata` document (format version 1)", "4-the-_metadata-document-format-version-1"),
        ("Finishing a task: EndOfData, drain and finish()", "finishing-a-task-endofdata-drain-and-finish"),
        ("`finished-predecessor`", "finished-predecessor"),
    ],
)
def test_github_slugs(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_no_reference_to_files_outside_the_repository() -> None:
    _report(forbidden_references(), "references to files outside the repository")


def test_relative_markdown_links_resolve() -> None:
    _report(broken_markdown_links(), "Markdown links that do not resolve inside the repository")


def test_mentions_of_project_docs_resolve() -> None:
    _report(broken_doc_mentions(), "mentions of docs/ files or anchors that do not exist")
