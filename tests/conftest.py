"""Settings of the whole suite, made before any test module imports torch."""

import os

# A process the tests start that crashes (a SIGABRT in gloo) prints where each of its threads was, in the output
# the failing test shows; helpers.stacks_then_kill has a hung one print it.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")
