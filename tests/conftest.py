"""Settings of the whole suite, made before any test module imports torch."""

import os

# Tests run on several pytest-xdist workers at once, and most of them start processes of their own (training
# runs, torchrun and its ranks). torch's OpenMP threads, one per core in each of those processes, spin while
# they wait for work: with more processes than cores that burned 1.4-1.6x the suite's CPU time. One thread
# each; subprocesses inherit it.
os.environ["OMP_NUM_THREADS"] = "1"

# A process the tests start that crashes (a SIGABRT in gloo) prints where each of its threads was, in the output
# the failing test shows; helpers.stacks_then_kill has a hung one print it.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

LONGEST_FIRST = ("training/test_interrupted_runs.py", "test_bad_input.py", "training/test_train.py", "test_docs.py",
                 "training/core/test_parallel.py", "training/core/test_engine.py")
"""The files that take longest, longest first (their shares of the suite's time, measured on two workers): a
worker that starts on one while the other takes the next leaves the many short files to even out the end.
Handed out by the number of their tests (pytest-xdist's default), the largest file came last, and one worker
ran on alone for 100 s of a 860 s suite."""


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        path = item.path.as_posix()
        return next((i for i, name in enumerate(LONGEST_FIRST) if path.endswith("tests/" + name)), len(LONGEST_FIRST))
    items.sort(key=rank)  # stable: each file's tests keep their order
