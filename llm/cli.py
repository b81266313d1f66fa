"""What the command-line tools share: a parser that fails in one line, their common flags, one-line warnings,
and output that outlives its reader."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import difflib
import gc
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from llm.errors import EXIT_USAGE, UsageError, on_one_line, output_gone, print_error

EXIT_INTERRUPTED = 128 + signal.SIGINT
"""A tool stopped by Ctrl-C, as the shell counts it."""


class ArgParser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage and exiting, names the flag
    nearest to one it does not know, says how to give a required flag's value given alone (``llm-export runs/lm``:
    ``--checkpoint runs/lm``), and takes no abbreviated flag (``--out`` is not ``--o``)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**{"allow_abbrev": False, **kwargs})
        self._given: list[str] = []
        # a value such as -1e-3 is a number, not a flag (argparse before Python 3.13 takes only -1 and -0.5)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-inf$", re.IGNORECASE)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        unknown = self._unknown_flags()
        if unknown and message.startswith("the following arguments are required"):
            message = f"unrecognized arguments: {unknown[0]}"  # --promt hi: the flag misspelled, not one left out
        if unknown and message.startswith("unrecognized arguments"):
            message += self._meant(unknown[0][2:])
        missing = re.fullmatch(r"the following arguments are required: (--[\w-]+)", message)
        stray = [word for word, value in self._words() if not value and not word.startswith("-")]
        if missing and len(stray) == 1 and not self._get_positional_actions():  # llm-export runs/lm: flag left out
            message += f"; give it as {missing[1]} {stray[0]}"
        raise UsageError(message)

    def _words(self) -> Iterator[tuple[str, bool]]:
        """The words given, up to a ``--``, each with whether it is the value of the flag before it (which may
        start with --: "--prompt '--a story'")."""
        words = self._given
        for i, word in enumerate(words):
            if word == "--":
                return
            before = self._option_string_actions.get(words[i - 1].split("=")[0]) if i else None
            yield word, before is not None and before.nargs != 0 and "=" not in words[i - 1] and \
                self._parse_optional(word) is None

    def _unknown_flags(self) -> list[str]:
        """The flags given that the parser does not know, past the values of those it knows, up to a ``--``."""
        return [word.split("=")[0] for word, value in self._words()
                if not value and word.startswith("--") and word.split("=")[0] not in self._option_string_actions
                and " " not in word]

    def _meant(self, name: str) -> str:
        """' (did you mean --X?)': the flag that is ``name`` after a section's (--lr: --optimizer-lr), else the
        closest."""
        names = [option[2:] for option in self._option_string_actions if option.startswith("--")]
        sectioned = [n for n in names if n.partition("-")[2] == name]
        meant = sectioned if len(sectioned) == 1 else difflib.get_close_matches(name, names, n=1)
        return f" (did you mean --{meant[0]}?)" if meant else ""


def add_checkpoint(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint PATH``: the trained model to load, as ``load_lm`` takes it."""
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a checkpoint, a folder of checkpoints (the newest valid one is used), a run folder, "
                             "or a folder of checkpoints' best file (the best by the run's checkpoint.monitor)")


def add_device(parser: argparse.ArgumentParser) -> None:
    """``--device {cpu,cuda}``, cpu unless asked."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")


def run_tool(work: Callable[[], str], if_interrupted: str) -> int:
    """A tool's whole run: ``work`` does the job and returns the line that reports it, printed on stdout. Bad
    input is one line and exit 2; Ctrl-C one line saying what is left (``if_interrupted``) and exit 130."""
    one_line_warnings()  # "skipping checkpoint ...", on one line as training prints it
    try:
        line = work()
    except UsageError as e:
        print_error(f"error: {e}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return interrupted(if_interrupted)
    say(line)
    return 0


def freeze_imports() -> None:
    """At a command's start: what its imports built (torch's objects, most of the process's), which lives until
    the exit, is left out of the garbage collector's way (gc.freeze). Each full collection then walks a fraction
    of what it did, in the work and at the exit: a short training run's process takes about 0.7 s less
    (BENCHMARKS.md), llm-generate's 0.4 s; a forked loader worker's collections copy none of those pages. For a
    process's entry only: a freeze in code called again and again keeps the reference cycles of that moment."""
    gc.freeze()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
"""The signals that stop a run after its step, with a checkpoint (signals.stop_on_signals), or a tool: a
scheduler's, Ctrl-C's, a terminal's hang-up, and SIGUSR1, which SLURM sends ahead of a job's time limit
(``--signal=USR1@90``) and whose default action ends a process at once."""


def run_program(main: Callable[[], int]) -> NoReturn:
    """A command's process, from its console script or ``python -m``: ``main()`` after freeze_imports(), then
    the exit with main's code.

    Once main has returned, a signal (Ctrl-C as the command ends, a scheduler's
    SIGTERM as the job ends) must not turn work done into work stopped (130,
    143), which a script or scheduler would take for a failure. From then on,
    until the interpreter's teardown, a signal ends the process at once with
    main's code: also while the exit waits for a thread a library left running
    (a compiler's pool). The teardown itself takes most of a second to unload
    torch and runs no Python handler: the last exit function ignores the signals
    for it.
    """
    atexit.register(_ignore_stop_signals)  # registered before main(): run after the exit functions it adds
    freeze_imports()
    code = main()
    exit_on_signals(code)
    sys.exit(code)


def exit_on_signals(code: int) -> None:
    """From now on a stop signal ends the process at once with ``code``: the command's work is done, and its
    output written (the commands flush it line by line, say; what print() left buffered goes out first)."""
    def handler(signum: int, frame: Any) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a reader gone (| head): nothing more to give it
                stream.flush()
        os._exit(code)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


def _ignore_stop_signals() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def interrupted(left: str) -> int:
    """After Ctrl-C: one line on stderr saying what is ``left`` (undone, or half done), not a traceback; returns
    the exit code (130)."""
    print_error(f"interrupted (Ctrl-C): {left}")
    return EXIT_INTERRUPTED


def one_line_warnings() -> None:
    """Print each warning as ``warning: MESSAGE``: the file, line and source Python adds mean nothing to a user."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {on_one_line(str(message))}\n"


def say(line: str) -> None:
    """Print a line on stdout; if its reader has gone away (``| head``), carry on without it (``stdout_gone``)."""
    try:
        print(line, flush=True)
    except OSError:  # BrokenPipeError, or EIO from a terminal that hung up
        stdout_gone()


def stdout_gone() -> None:
    """After stdout failed: the rest of the output goes to devnull (``output_gone``)."""
    output_gone(sys.stdout)
