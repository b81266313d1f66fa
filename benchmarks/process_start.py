"""A command's own cost: its start, set-up and exit, with and without the garbage collector's freeze.

    python benchmarks/process_start.py [--out BENCHMARKS.md] [--quick] [--rounds N]

Each command's entry (``run()`` of ``llm.training.train``, ``llm.generate`` and
the other tools: their console scripts, ``python -m`` and torchrun's workers)
calls ``gc.freeze()`` first (``llm.cli.freeze_imports``): the objects its
imports built (torch's, mostly) are left out of every later collection, during
the work and at the interpreter's exit. This times, in fresh processes:

- train: a run of the regression task so short (20 steps, 256 samples) that
  the process's start, set-up and exit are what is timed;
- generate: 20 new tokens from a one-block character-level GPT the script
  trains first on text it writes;
- each frozen (``run()`` as it is) and not frozen (the same ``run()`` with
  ``gc.freeze`` made a no-op);
- import only: a process that imports ``llm.training.train`` and exits, unfrozen: the floor under train (its
  ratio is to train, frozen).

Each process also reports the time its collections took while it ran
(``gc.callbacks``; the collections of the interpreter's exit come after the
last callback can report, so they count only in the wall time). Contenders run
in turn, round after round, after a warm-up round, each on one torch thread;
the table gives medians and each round's ratio to the same command frozen.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout: import this llm

from benchmarks import common  # noqa: E402

TRAIN_FLAGS = ["--task", "regression", "--training-max-steps", "20", "--data-num-samples", "256",
               "--logging-progress-bar", "false"]
GENERATE_FLAGS = ["--checkpoint", "lm", "--prompt", "to be", "--max-new-tokens", "20"]
LM_FLAGS = ["--task", "lm", "--data-path", "corpus.txt", "--training-max-steps", "2", "--model-n-layer", "1",
            "--model-n-head", "2", "--model-n-embd", "32", "--model-block-size", "32", "--logging-progress-bar",
            "false", "--logging-log-dir", "lm"]
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


def command(module: str, flags: list[str], frozen: bool = True) -> str:
    """The code of a process that runs ``module``'s entry on ``flags``, reporting its collections' time."""
    unfrozen = "" if frozen else "gc.freeze = lambda: None\n"
    return REPORT + unfrozen + f"from {module} import run\nsys.argv[1:] = {flags!r}\nrun()\n"


CONTENDERS = {
    "train, frozen": command("llm.training.train", TRAIN_FLAGS),
    "train, not frozen": command("llm.training.train", TRAIN_FLAGS, frozen=False),
    "generate, frozen": command("llm.generate", GENERATE_FLAGS),
    "generate, not frozen": command("llm.generate", GENERATE_FLAGS, frozen=False),
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


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(common.REPO)}  # this checkout's llm


def trained_lm(folder: Path) -> None:
    """The character-level GPT that generate loads, trained for two steps on text written here."""
    lines = (f"{i}: to be, or not to be, that is the question.\n" for i in range(2000))
    (folder / "corpus.txt").write_text("".join(lines))
    done = subprocess.run([sys.executable, "-m", "llm.training.train", *LM_FLAGS], cwd=folder, env=ENV,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"training the model generate loads failed: {done.stderr[-2000:]}")


def one_process(code: str, folder: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and seconds of garbage collection of one process running code."""
    shutil.rmtree(folder / "runs", ignore_errors=True)  # the training runs': each starts in the same folder
    before = os.times()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=folder, env=ENV, capture_output=True, text=True)
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
        trained_lm(Path(folder))
        rounds = common.interleaved({name: (lambda code=code: one_process(code, Path(folder)))
                                     for name, code in CONTENDERS.items()}, args.rounds)
    rows = []
    for name, values in rounds.items():
        walls, cpus, gcs = ([v[i] for v in values] for i in range(3))
        frozen = rounds[name.split(",")[0] + ", frozen" if "," in name else "train, frozen"]
        ratio, low, high = common.paired_ratio(walls, [f[0] for f in frozen])
        rows.append((name, f"{common.median(walls):.2f}", common.spread(walls), f"{common.median(cpus):.2f}",
                     f"{1000 * common.median(gcs):.0f}", f"{ratio:.2f} ({low:.2f}-{high:.2f})"))
    table = common.markdown_table(("contender", "median wall s", "min-max s", "median CPU s",
                                   "median GC ms while running", "wall vs the same command frozen, paired by round"),
                                  rows)
    gained = {command: common.median([n[0] - f[0] for n, f in zip(rounds[f"{command}, not frozen"],
                                                                   rounds[f"{command}, frozen"], strict=True)])
              for command in ("train", "generate")}
    facts = [("work", f"python -c running run() of llm.training.train with {shlex.join(TRAIN_FLAGS)}, and of "
                      f"llm.generate with {shlex.join(GENERATE_FLAGS)}; one torch thread"),
             ("repetitions", f"a warm-up round, then {args.rounds} rounds, contenders interleaved")]
    text = common.section("Process start and exit: gc.freeze() at each command's start" +
                          (" (quick)" if args.quick else ""), facts,
                          [table, f"The freeze takes {gained['train']:.2f} s off each training process and "
                                  f"{gained['generate']:.2f} s off each generate (median of the rounds' "
                                  f"differences, wall clock)."],
                          threads=1)  # the commands measured run with OMP_NUM_THREADS=1, not on this process's threads
    common.append_section(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
