"""What every benchmark shares: where it ran, on which commit, and how its section reaches BENCHMARKS.md.

A benchmark builds a Markdown section with :func:`section` (title, the
date/machine/commit/command lines, then its own notes and tables) and hands it
to :func:`append_section`, which prints it and appends it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_HEADER = "# Benchmarks\n\nMeasurements, not assertions; each section says where and how it was taken.\n"
"""What a new BENCHMARKS.md starts with."""
T = TypeVar("T")
K = TypeVar("K")


def add_common_args(parser: argparse.ArgumentParser, data_help: str | None = "UTF-8 text corpus to use",
                    quick: bool = True) -> None:
    """``--data-path`` (unless ``data_help`` is None), ``--out`` and ``--quick`` (unless False)."""
    if data_help is not None:
        parser.add_argument("--data-path", required=True, metavar="FILE", help=data_help)
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md", metavar="FILE",
                        help="Markdown file the section is appended to (default: BENCHMARKS.md in the repo)")
    if quick:
        parser.add_argument("--quick", action="store_true",
                            help="fewer and shorter repetitions: a smoke run, not a measurement to record")


def check_data_path(parser: argparse.ArgumentParser, path: str) -> None:
    if not Path(path).is_file():
        parser.error(f"--data-path: {path} is not a file")


def machine(threads: int | None = None) -> str:
    """CPU model, core and thread counts, GPU if any, torch and Python versions, OS.

    ``threads``: the torch threads of the processes measured, where they are not this one (children started
    on one thread); by default this process's own.
    """
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    threads = torch.get_num_threads() if threads is None else threads
    return (f"{cpu}, {os.cpu_count()} CPUs ({threads} torch thread{'s' if threads != 1 else ''}){gpu}, "
            f"torch {torch.__version__}, Python {platform.python_version()}, {platform.system()}")


def git_commit() -> str:
    """The short commit of the checkout, marked when tracked files other than BENCHMARKS.md
    (which a run of several benchmarks keeps appending to) have uncommitted changes, or the
    code measured (llm/, benchmarks/) has files git does not track."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)BENCHMARKS.md") or \
            git("status", "--porcelain", "--", "llm", "benchmarks")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" + uncommitted changes" if dirty else "")


def command_line() -> str:
    """How this process was started, as a shell line to copy."""
    return shlex.join(["python", *sys.argv]) if sys.argv and sys.argv[0] else "(called in-process)"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells are written with str()."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


STARTED = datetime.now(timezone.utc), git_commit()
"""When this benchmark started, and the code it started on: what it measured, even if the checkout changes while
it runs (a commit made meanwhile would otherwise stamp a run of uncommitted code as that commit)."""


def section(title: str, facts: Sequence[tuple[str, str]] = (), body: Sequence[str] = (),
            threads: int | None = None) -> str:
    """A BENCHMARKS.md section: title, start date, machine, commit, command, then ``facts`` as bullets, then ``body``.

    Each entry of ``body`` is a paragraph or a table; they are separated by blank lines. ``threads``: the torch
    threads of the measured processes, for the machine line, when they are child processes; see ``machine``.
    """
    started, commit = STARTED
    bullets = [
        ("date", started.strftime("%Y-%m-%d %H:%M UTC")),
        ("machine", machine(threads)),
        ("commit", commit),
        ("command", f"`{command_line()}`"),
        *facts,
    ]
    lines = [f"## {title}", "", *(f"- {name}: {value}" for name, value in bullets), ""]
    for block in body:
        lines += [block, ""]
    return "\n".join(lines)


def append_section(out: Path, text: str) -> None:
    """Print the section, then append it to ``out`` (started with the usual header if new)."""
    print("\n" + text)
    new_file = not out.exists()
    with open(out, "a", encoding="utf-8") as f:
        if new_file:
            f.write(BENCHMARKS_HEADER)
        f.write("\n" + text)
    print(f"appended to {out}")


class GrowingSection:
    """A section appended to ``out`` as its rows come in, each ``write`` replacing the last in place: a run
    killed midway (on a device lent by the minute) leaves in the file what it measured so far."""

    def __init__(self, out: Path, title: str, facts: Sequence[tuple[str, str]] = ()):
        self.out, self.title, self.facts = out, title, facts
        self._at: int | None = None  # where the section starts in the file

    def write(self, body: Sequence[str], done: bool = False, facts: Sequence[tuple[str, str]] | None = None) -> None:
        """The section with ``body`` (and ``facts``, if given, in place of the earlier ones); ``done``: the last
        write, which prints it."""
        self.facts = self.facts if facts is None else facts
        text = section(self.title, self.facts, body if done else [*body, "(in progress: the run has not ended)"])
        if self._at is None:
            if not self.out.exists():
                self.out.write_text(BENCHMARKS_HEADER, encoding="utf-8")
            self._at = self.out.stat().st_size
        with open(self.out, "r+b") as f:  # (nothing else may append to ``out`` meanwhile: it would be cut)
            f.seek(self._at)
            f.truncate()
            f.write(("\n" + text).encode("utf-8"))
        if done:
            print("\n" + text)
            print(f"appended to {self.out}")


def run_summary(run: Path) -> dict[str, Any]:
    """A run's summary.json, a number it writes null (not finite: a diverged loss) read back as NaN."""
    return _nan_for_null(json.loads((run / "summary.json").read_text()))


def run_records(run: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl records, each null read back as NaN."""
    return [_nan_for_null(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _nan_for_null(record: dict[str, Any]) -> dict[str, Any]:
    return {k: math.nan if v is None else v for k, v in record.items()}


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def median_label(rounds: int) -> str:
    """How a table names a figure taken over ``rounds`` rounds: one round's is no median."""
    return "median" if rounds > 1 else "one round's"


def spread(values: Sequence[float]) -> str:
    """``min-max`` of repeated measurements, to show how noisy the median is."""
    def number(v: float) -> str:
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return f"{number(min(values))}-{number(max(values))}"


def paired_ratio(values: Sequence[float], references: Sequence[float]) -> tuple[float, float, float]:
    """Median, min and max over rounds of ``values[r] / references[r]``.

    Interleaved rounds run each pair close together in time, so a slow patch
    of a shared machine stretches both sides of a pair alike: the ratio of a
    pair is steadier than the ratio of two medians taken over all rounds.
    """
    ratios = [v / r for v, r in zip(values, references, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def against_target(values: Sequence[float], references: Sequence[float], target: float) -> tuple[str, float, float]:
    """Whether the median over rounds of ``values[r] / references[r]`` reaches ``target``, told apart from the
    noise: "met" when a 90% interval of that median lies at or above it, "NOT met" when below it, and "not told
    apart from the target" when the interval holds it; with the interval. A median a hair past the target on a
    machine whose rounds spread by 10% says nothing.

    The interval is the order statistics' (distribution-free, exact): the k-th lowest and the k-th highest of the
    n ratios, for the largest k whose interval holds the median with 90% probability or more; under 5 rounds
    there is none (all of them cover it with less), and the figure is "too few rounds to tell".
    """
    ratios = sorted(v / r for v, r in zip(values, references, strict=True))
    n = len(ratios)
    below = 0.0  # P(fewer than k of the n ratios fall below the median), growing with k
    k = 0
    while k < n // 2 and below + math.comb(n, k) / 2**n <= 0.05:
        below += math.comb(n, k) / 2**n
        k += 1
    if k == 0:
        return f"too few rounds to tell ({n})", ratios[0], ratios[-1]
    low, high = ratios[k - 1], ratios[n - k]
    said = "met" if low >= target else "NOT met" if high < target else "not told apart from the target"
    return said, low, high


def clock() -> tuple[float, float]:
    """Wall time, and the CPU time of this process (all its threads).

    On a shared machine other processes stretch the wall time of a step, but
    hardly its CPU time: with one torch thread, CPU time measures the work done.
    """
    return time.perf_counter(), time.process_time()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds ``fn()`` took, and what it returned."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def interleaved(contenders: dict[K, Callable[[], T]], rounds: int, warmup: bool = True,
                after_round: Callable[[dict[K, list[T]]], None] | None = None) -> dict[K, list[T]]:
    """Run every contender once per round, in turn, ``rounds`` times; each call returns one measurement.

    Interleaving spreads the slow patches of a shared machine over all
    contenders instead of letting one of them take a whole slow patch; the
    order turns by one each round, so that what one leaves behind (garbage to
    collect, a grown allocator) does not always land on the same next one. The
    warm-up round, not kept, pays for first-use costs (lazy imports, allocator
    growth) that would otherwise land on whoever runs first. ``after_round`` is
    given the measurements so far after each round (to write them down).
    """
    if warmup:
        for name, run in contenders.items():
            print(f"warm-up: {name}: {run()}", flush=True)
    results: dict[K, list[T]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            run = contenders[name]
            results[name].append(run())
            print(f"round {r + 1}/{rounds}: {name}: {results[name][-1]}", flush=True)
        if after_round is not None:
            after_round(results)
    return results
