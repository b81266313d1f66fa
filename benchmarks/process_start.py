"""A training command's own cost: its start, set-up and exit, with and without the garbage collector's freeze.

    python benchmarks/process_start.py [--out BENCHMARKS.md] [--quick] [--rounds N]

``llm.training.train.run()``, the entry of ``python -m llm.training.train``, of
torchrun's workers and of ``llm-train``, calls ``gc.freeze()`` before the run:
the objects its imports built (torch's, mostly) are left out of every later
collection, during the run and at the interpreter's exit. This times, in fresh
processes, a run of the regression task so short (20 steps, 256 samples) that
the process's start, set-up and exit are what is timed:

- frozen: ``run()`` as it is;
- not frozen: the same ``run()`` with ``gc.freeze`` made a no-op;
- import only: a process that imports ``llm.training.train`` and exits, the floor under both.

Each process also reports the time its collections took while it ran
(``gc.callbacks``; the collections of the interpreter's exit come after the
last callback can report, so they count only in the wall time). Contenders run
in turn, round after round, after a warm-up round, each on one torch thread;
the table gives medians and each round's ratio to the frozen run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout: import this llm

from benchmarks import common  # noqa: E402

RUN_FLAGS = ["--task", "regression", "--training-max-steps", "20", "--data-num-samples", "256",
             "--logging-progress-bar", "false"]
REPORT = """
import atexit, gc, json, sys, time
spent, started = [0.0, 0], [0.0]
def timed(phase, info):
    if phase == "start":
        started[0] = time.perf_counter()
    else:
        spent[0] += time.perf_counter() - started[0]
        spent[1] += 1
gc.callbacks.append(timed)
atexit.register(lambda: print("GC " + json.dumps(spent), file=sys.stderr))
"""
CONTENDERS = {
    "frozen": REPORT + "from llm.training.train import run\nsys.argv[1:] = ARGS\nrun()\n",
    "not frozen": REPORT + "gc.freeze = lambda: None\nfrom llm.training.train import run\nsys.argv[1:] = ARGS\nrun()\n",
    "import only": REPORT + "import llm.training.train\n",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, data_help=None)
    parser.add_argument("--rounds", type=int, default=10, help="rounds after the warm-up (default: 10)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 2
    return args


def one_process(code: str, folder: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and seconds of garbage collection of one process running code."""
    shutil.rmtree(folder / "runs", ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(common.REPO)}  # this checkout's llm
    before = os.times()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code.replace("ARGS", repr(RUN_FLAGS))], cwd=folder, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = os.times()
    if done.returncode != 0:
        raise SystemExit(f"a contender failed ({done.returncode}): {done.stderr[-2000:]}")
    gc_line = [line for line in done.stderr.splitlines() if line.startswith("GC ")][-1]
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return wall, cpu, json.loads(gc_line[3:])[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="process_start-") as folder:
        rounds = common.interleaved({name: (lambda code=code: one_process(code, Path(folder)))
                                     for name, code in CONTENDERS.items()}, args.rounds)
    frozen = rounds["frozen"]
    rows = []
    for name, values in rounds.items():
        walls, cpus, gcs = ([v[i] for v in values] for i in range(3))
        ratio, low, high = common.paired_ratio(walls, [f[0] for f in frozen])
        rows.append((name, f"{common.median(walls):.2f}", common.spread(walls), f"{common.median(cpus):.2f}",
                     f"{1000 * common.median(gcs):.0f}", f"{ratio:.2f} ({low:.2f}-{high:.2f})"))
    table = common.markdown_table(("contender", "median wall s", "min-max s", "median CPU s",
                                   "median GC ms while running", "wall vs frozen, paired by round"), rows)
    gained = common.median([n[0] - f[0] for n, f in zip(rounds["not frozen"], frozen, strict=True)])
    facts = [("work", "python -c running llm.training.train.run() with " + " ".join(RUN_FLAGS) + ", one torch thread"),
             ("repetitions", f"a warm-up round, then {args.rounds} rounds, contenders interleaved")]
    text = common.section("Process start and exit: gc.freeze() in the training command" +
                          (" (quick)" if args.quick else ""), facts,
                          [table, f"The freeze takes {gained:.2f} s off each training process (median of the "
                                  f"rounds' differences, wall clock)."])
    common.append_section(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
