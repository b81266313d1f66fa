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
