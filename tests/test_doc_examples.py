"""The Python examples in README.md and docs/*.md that are presented as runnable do run.

The marker: an HTML comment ``<!-- runnable -->`` on the line right before a fenced block opened with
```` ```python ````. Markdown renderers hide the comment, so readers see an ordinary example::

    <!-- runnable -->
    ```python
    from keystate.storage import open_storage
    ...
    ```

Each marked block runs as its own script (``python example.py``) in a fresh subprocess whose working
directory is an empty temporary directory, with a timeout; it passes when it exits with status 0, so an
example checks its own results with ``assert``. Blocks without the marker are fragments (they name
things defined elsewhere or need what the suite does not install) and are not run. A marker that is
not followed by a ``python`` fence is an error, so a block is never silently left out.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- runnable -->"
TIMEOUT = 90.0
"""Seconds one example may run (the test timeout in pyproject.toml is 120)."""
_FENCE = re.compile(r"^(`{3,}|~{3,})(.*)$")


@dataclass(frozen=True)
class Example:
    path: Path
    line: int
    """1-based line of the opening fence."""
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}:{self.line}"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def extract(path: Path) -> list[Example]:
    """The runnable examples of one Markdown file.

    Raises:
        ValueError: a marker is not right before a ``python`` fence, or a marked block is never closed.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    examples: list[Example] = []
    i = 0
    fence: str | None = None  # the fence of the block we are inside, if any
    while i < len(lines):
        line = lines[i]
        m = _FENCE.match(line.strip())
        if fence is not None:
            if m and m.group(1).startswith(fence) and not m.group(2).strip():
                fence = None
            i += 1
            continue
        if m:
            fence = m.group(1)
        elif line.strip() == MARKER:
            opening = _FENCE.match(lines[i + 1].strip()) if i + 1 < len(lines) else None
            if opening is None or opening.group(2).strip() != "python":
                raise ValueError(f"{path}:{i + 1}: {MARKER} must be on the line right before a ```python fence")
            end = i + 2
            while end < len(lines) and lines[end].strip() != opening.group(1):
                end += 1
            if end == len(lines):
                raise ValueError(f"{path}:{i + 2}: the runnable block is never closed")
            examples.append(Example(path, i + 2, "\n".join(lines[i + 2 : end]) + "\n"))
            i = end + 1
            continue
        i += 1
    return examples


def all_examples() -> list[Example]:
    return [example for path in doc_files() for example in extract(path)]


def run_example(code: str, directory: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as ``python example.py`` in ``directory`` (which should be empty)."""
    script = directory / "example.py"
    script.write_text(code, encoding="utf-8")
    return subprocess.run(
        [sys.executable, script.name],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.mark.slow
@pytest.mark.parametrize("example", all_examples(), ids=lambda e: e.name)
def test_example_runs(example: Example, tmp_path: Path) -> None:
    result = run_example(example.code, tmp_path)
    assert result.returncode == 0, (
        f"{example.name} exited with {result.returncode}\n"
        f"--- stdout ---\n{_tail(result.stdout)}\n--- stderr ---\n{_tail(result.stderr)}"
    )


def test_the_documented_examples_are_found() -> None:
    """The extraction finds the examples the docs promise (an extractor that finds none passes nothing)."""
    names = {e.name.split(":")[0] for e in all_examples()}
    assert {"docs/embedding.md", "docs/statebackend.md", "docs/runtime.md", "docs/reliability.md"} <= names


def test_a_raising_example_fails(tmp_path: Path) -> None:
    result = run_example("assert 1 + 1 == 3, 'wrong'\n", tmp_path)
    assert result.returncode != 0
    assert "AssertionError: wrong" in result.stderr


def test_extract_marked_blocks_only(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "intro\n\n```python\nfragment()\n```\n\n<!-- runnable -->\n```python\nprint('a')\n\nprint('b')\n```\n"
        "\n````md\n<!-- runnable -->\n```python\ninside_another_block()\n```\n````\n",
        encoding="utf-8",
    )
    [example] = extract(doc)
    assert example.line == 8
    assert example.code == "print('a')\n\nprint('b')\n"


@pytest.mark.parametrize(
    "text",
    [
        "<!-- runnable -->\n\n```python\nx = 1\n```\n",  # a blank line between marker and fence
        "<!-- runnable -->\n```sh\nls\n```\n",
        "<!-- runnable -->\n```python\nx = 1\n",  # never closed
    ],
)
def test_a_misplaced_marker_is_an_error(tmp_path: Path, text: str) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=r"doc\.md:\d+"):
        extract(doc)
