"""Long fuzzing runs of the same properties as ``tests/fuzz``, for a time budget.

Usage (from the repository root)::

    python -m tests.fuzz.run --seconds 600                       # every target, 600 s in all
    python -m tests.fuzz.run --seconds 120 --target metadata      # one target
    python -m tests.fuzz.run --property metadata.mutated_golden --seed 1234 --examples 200   # replay

The budget is shared equally by the chosen targets; within a target the properties take turns, each
turn a batch of examples under a fresh hypothesis seed. A failure is shrunk by hypothesis and reported
with the command that replays it exactly (same property, seed and batch size; no example database is
used). Known bugs already reported to their owners (``harness.KNOWN_BUGS``) are counted, not failed.
Exit code: 0 when nothing failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from hypothesis.reporting import with_reporter

from tests.fuzz.harness import KNOWN_BUGS, KNOWN_HITS, FuzzContext, Property, run_property
from tests.fuzz.properties import PROPERTIES

__all__ = ["Failure", "Tally", "fuzz", "main"]

TARGETS = tuple(dict.fromkeys(p.target for p in PROPERTIES))


@dataclass
class Failure:
    prop: Property
    seed: int
    examples: int
    error: str
    report: str

    def replay(self) -> str:
        return (
            f"python -m tests.fuzz.run --property {self.prop.qualified} --seed {self.seed} --examples {self.examples}"
        )


@dataclass
class Tally:
    prop: Property
    examples: int = 0
    batches: int = 0
    seconds: float = 0.0
    failures: list[Failure] = field(default_factory=list)


def _batch(prop: Property, ctx: FuzzContext, seed: int, examples: int, tally: Tally) -> None:
    lines: list[str] = []
    started = time.monotonic()
    count = 0
    try:
        with with_reporter(lambda value: lines.append(str(value))):
            count = run_property(prop, ctx, max_examples=examples, seed=seed)
    except Exception as exc:
        found = list(exc.exceptions) if isinstance(exc, ExceptionGroup) else [exc]
        errors = []
        for error in found:
            text = " ".join("".join(traceback.format_exception_only(type(error), error)).split())[:600]
            where = traceback.extract_tb(error.__traceback__)
            if where:
                text += f" (at {where[-1].filename}:{where[-1].lineno} in {where[-1].name})"
            errors.append(text)
            lines.extend(getattr(error, "__notes__", []))  # hypothesis's "Falsifying example: ..."
        tally.failures.append(Failure(prop, seed, examples, "\n  ".join(errors), "\n".join(lines)))
        count = examples  # at least as many ran before hypothesis found and shrank the failure
    tally.examples += count
    tally.batches += 1
    tally.seconds += time.monotonic() - started


def fuzz(
    props: Sequence[Property],
    ctx: FuzzContext,
    seconds: float,
    *,
    seed: int | None = None,
    examples: int | None = None,
    out: TextIO | None = None,
) -> list[Tally]:
    """Run ``props`` for ``seconds`` in all (targets share it equally); returns what ran and failed.
    Ctrl-C ends the run early with what ran so far."""
    out = out or sys.stdout
    seeds = random.Random(seed) if seed is not None and examples is None else random.SystemRandom()
    tallies = [Tally(p) for p in props]
    targets = list(dict.fromkeys(p.target for p in props))
    if examples is not None and seed is not None:  # a replay: exactly one batch of each property
        for tally in tallies:
            _batch(tally.prop, ctx, seed, examples, tally)
        return tallies
    started = time.monotonic()
    try:
        _rounds(tallies, targets, ctx, seconds, started, seeds, examples, out)
    except KeyboardInterrupt:
        print("interrupted: summary of what ran", file=out)
    return tallies


def _rounds(
    tallies: list[Tally],
    targets: list[str],
    ctx: FuzzContext,
    seconds: float,
    started: float,
    seeds: random.Random,
    examples: int | None,
    out: TextIO,
) -> None:
    end = started + seconds
    for n, target in enumerate(targets):
        own = [t for t in tallies if t.prop.target == target]
        # What is left is shared by the targets still to come (a slow batch cannot starve the next).
        deadline = time.monotonic() + max(0.0, end - time.monotonic()) / (len(targets) - n)
        turn = 0
        while time.monotonic() < deadline:
            tally = own[turn % len(own)]
            turn += 1
            left = deadline - time.monotonic()
            if examples is not None:
                size = examples
            elif not tally.batches:
                size = 20  # a first small batch measures how fast this property runs
            else:
                rate = tally.seconds / max(tally.examples, 1)
                share = min(left / len(own), 30.0)  # the properties of a target take turns
                size = int(max(5, min(5000, share / max(rate, 1e-5))))
            _batch(tally.prop, ctx, seeds.randrange(2**32), size, tally)
        for tally in own:
            print(
                f"  {tally.prop.qualified:<34} {tally.examples:>8} examples in {tally.batches:>4} batches "
                f"{tally.seconds:7.1f}s  {len(tally.failures)} failures",
                file=out,
                flush=True,
            )


def _summary(tallies: Sequence[Tally], elapsed: float) -> str:
    lines = [
        "",
        f"fuzzed for {elapsed:.0f}s",
        f"{'PROPERTY':<36}{'EXAMPLES':>10}{'BATCHES':>9}{'SECONDS':>9}  FAILURES",
    ]
    for t in tallies:
        lines.append(f"{t.prop.qualified:<36}{t.examples:>10}{t.batches:>9}{t.seconds:>9.1f}  {len(t.failures)}")
    for target in dict.fromkeys(t.prop.target for t in tallies):
        own = [t for t in tallies if t.prop.target == target]
        lines.append(
            f"target {target:<29}{sum(t.examples for t in own):>10}{sum(t.batches for t in own):>9}"
            f"{sum(t.seconds for t in own):>9.1f}  {sum(len(t.failures) for t in own)}"
        )
    lines.append(f"{'all':<36}{sum(t.examples for t in tallies):>10}")
    hits = {bug: n for bug, n in KNOWN_HITS.items() if n}
    if hits:
        lines.append("")
        lines.append("known bugs (reported, not yet fixed), examples that hit them:")
        lines += [f"  {bug}: {n}  ({KNOWN_BUGS[bug]})" for bug, n in hits.items()]
    failures = [f for t in tallies for f in t.failures]
    if failures:
        lines.append("")
        lines.append(f"{len(failures)} FAILURES")
        for f in failures:
            lines += ["", f"{f.prop.qualified}: {f.error}", f"  replay: {f.replay()}"]
            lines += [f"  {line}" for line in f.report[:4000].splitlines()]
    else:
        lines.append("no failures")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="time budget for the whole run")
    parser.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    parser.add_argument("--property", choices=[p.qualified for p in PROPERTIES], help="one property only")
    parser.add_argument("--seed", type=int, help="seed of the run (with --examples: replay one batch)")
    parser.add_argument("--examples", type=int, help="examples per batch (default: sized to the budget)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    if args.property is not None:
        props = [p for p in PROPERTIES if p.qualified == args.property]
    else:
        props = [p for p in PROPERTIES if args.target in ("all", p.target)]
    os.environ.pop("KEYSTATE_DEBUG", None)  # the properties check what users see: no tracebacks
    scratch = Path(tempfile.mkdtemp(prefix="keystate-fuzz-"))
    started = time.monotonic()
    try:
        tallies = fuzz(props, FuzzContext(scratch), args.seconds, seed=args.seed, examples=args.examples)
    finally:
        if args.keep:
            print(f"scratch directory kept: {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(_summary(tallies, time.monotonic() - started))
    return 1 if any(t.failures for t in tallies) else 0


if __name__ == "__main__":
    sys.exit(main())
