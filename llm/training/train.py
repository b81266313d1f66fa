"""Entry point: parse the config, build task, data and callbacks, run the engine.

The same file serves ``python -m llm.training.train`` and
``torchrun --nproc_per_node=N llm/training/train.py``.

Exit codes: 0 done; 1 another rank failed or hung (one line naming it); 2 bad
input (one line on stderr); 3 stopped on a non-finite loss or gradient norm
(training.nan_policy=stop); 75 stopped at training.max_minutes,
validated and saved (0 under torchrun, which restarts workers that exit
otherwise); 128+signal when SIGTERM, SIGINT, SIGHUP or SIGUSR1 stopped the run
after saving a checkpoint (143, 130, 129, 138).
"""

from __future__ import annotations

import errno
import functools
import glob
import re
import shlex
import sys
import threading
import traceback
from pathlib import Path
from typing import NoReturn

if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # run by path (torchrun llm/training/train.py): Python put this file's folder first, whose tasks/ and
    # core/ would hide a user's packages of those names; the checkout that holds this file goes there instead
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import torch.distributed as dist

from llm.cli import exit_on_signals, interrupted, one_line_warnings, run_program, say
from llm.errors import EXIT_USAGE, UsageError, causes, one_line, print_error
from llm.files import FolderLock, run_files
from llm.training.core import distributed as D
from llm.training.core.callbacks import (
    Callback,
    EarlyStopping,
    LRSchedulerCallback,
    MetricsLogger,
    ProgressBar,
    TensorBoardLogger,
)
from llm.training.core.checkpoint import best_checkpoint
from llm.training.core.config import Config
from llm.training.core.engine import OUT_OF_TIME, TrainingEngine
from llm.training.core.nonfinite import NonFiniteError
from llm.training.core.signals import TrainingInterrupted
from llm.training.core.loggers import LOGGERS, missing_package
from llm.training.core.profiler import Profiler
from llm.training.core.registry import data_module_of, resolve_callback, resolve_data_module, resolve_task
from llm.training.core.throughput import ThroughputMonitor

EXIT_NON_FINITE = 3
EXIT_OUT_OF_TIME = 75
"""sysexits' EX_TEMPFAIL, "try again": the run is saved, and goes on with --checkpoint-resume auto."""


def default_callbacks(config: Config) -> list[Callback]:
    """The callbacks of a run from the command line; trackers as ``logging.loggers`` names them."""
    c = config.checkpoint
    stopping = [EarlyStopping(monitor=c.monitor, patience=config.training.patience, mode=c.mode)]
    callbacks: list[Callback] = [MetricsLogger(), *(stopping if config.training.early_stopping else []),
                                 LRSchedulerCallback(), ThroughputMonitor()]
    if config.logging.progress_bar:  # off, it would still be called at every step
        callbacks.append(ProgressBar())
    if config.logging.profile_steps:
        callbacks.append(Profiler(config.logging.profile_from_step, config.logging.profile_steps))
    for name in config.logging.callback_names():
        try:
            cls = resolve_callback(name)
        except UsageError as e:  # named as a setting: the error then says where it was set, a file or a variable
            raise UsageError(f"logging.callbacks: {e}") from None
        try:
            callbacks.append(cls())
        except Exception as e:  # noqa: BLE001 - the user's constructor: one line saying what it wanted
            raise UsageError(f"logging.callbacks: {name} could not be built with no arguments: "
                             f"{type(e).__name__}: {one_line(e)}") from None
    for name in config.logging.logger_names():
        if name == "tensorboard":
            callbacks.append(TensorBoardLogger())  # into the engine's run folder
            continue
        problem = missing_package(name)
        if problem:
            raise UsageError(problem)
        callbacks.append(LOGGERS[name]())
    return callbacks


def claim_run_dir(config: Config) -> tuple[str, FolderLock | None]:
    """A fresh run never writes into an earlier run's directory: it takes the next free name (runs/lm-2, ...).

    Rank 0 holds the directory from the moment it picks it (release the lock returned
    when the run ends): runs started together in one log_dir (a sweep) each take a
    directory of their own. Workers that torchrun restarted after a failure take the
    directory their launch claimed, found by the launch the engine records there, and
    resume from its checkpoints; never an earlier run's. Returns the line that says
    where the run moved to, or "", with the lock.
    """
    if config.checkpoint.resume:  # the user named what to continue
        return "", None
    chosen, lock = None, None
    if D.env_ranks()[0] == 0:
        folder, lock = _free_run_dir(Path(config.logging.log_dir))
        chosen = str(folder)
    try:
        chosen = D.broadcast_from_rank0(chosen)
        if Path(chosen) == Path(config.logging.log_dir):  # "runs/lm/" is "runs/lm"
            return "", lock
        note = f"{config.logging.log_dir} holds an earlier run: this one writes to {chosen}"
        old, checkpoints = Path(config.logging.log_dir).resolve(), Path(config.checkpoint.dir).resolve()
        given = config.given("checkpoint.dir")  # "" when filled in from log_dir: validate() fills it anew
        if given and checkpoints.is_relative_to(old):  # a checkpoint folder given inside the earlier run's moves too
            config.checkpoint.dir = str(Path(chosen) / checkpoints.relative_to(old))
        config.logging.log_dir = chosen
        config.validate()  # a checkpoint.dir filled in from the old folder moves with it
        return note, lock
    except BaseException:  # another rank gone, Ctrl-C: the folder is let go, and removed if it was made here
        if lock is not None:
            lock.release()
        raise


class Announce(Callback):
    """Prints a line when training starts: after the checks of setup, so that a run refused there
    announces nothing it will not do. News, not a problem: on stdout, above the progress bar."""

    def __init__(self, line: str):
        self.line = line

    def on_train_start(self, engine: TrainingEngine) -> None:
        engine.print(self.line)


def _free_run_dir(base: Path) -> tuple[Path, FolderLock | None]:
    """``base``, or ``base-2``, ``base-3``...: the one this launch wrote before a restart (not held here: the
    engine takes it), else the first that holds no run, held from now on (the lock returned)."""
    if D.restarted():
        launch = D.launch_id()
        numbered = (p for p in base.parent.glob(f"{glob.escape(base.name)}-*")
                    if p.name[len(base.name) + 1:].isdigit())  # base-2, base-3...: in any order, gaps and all
        ours = next((p for p in (base, *numbered) if launch in D.launched_by(p)), None)
        if ours is not None:
            return ours, None
    candidate, n = base, 1
    while True:
        lock = _hold_if_free(candidate)
        if lock is not None:
            return candidate, lock
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")


def _hold_if_free(folder: Path) -> FolderLock | None:
    """A lock on ``folder`` if it holds no run: no file but a lock file, and no live process holding it (a run
    still setting up). A lock file alone, left by a run killed in set-up, holds nothing; one that cannot be taken
    (a symlink, another user's file this one cannot write) is passed over, as a held one is."""
    if run_files(folder):
        return None
    try:
        lock = FolderLock(folder)
    except UsageError:  # another run holds it and has written nothing there yet, or its lock file is not ours
        return None
    if run_files(folder):  # a run wrote there and let go between the look above and the lock
        lock.release()
        return None
    return lock


def train_worker(rank: int, world_size: int, config: Config) -> dict[str, float]:
    """Train on this process; with world_size > 1, in the process group main() made."""
    D.check_same_settings(config)  # first: whether to claim a run folder, below, depends on them
    task = resolve_task(config.task)(config)
    data_module = resolve_data_module(data_module_of(config, task))(config)
    note, claim = claim_run_dir(config)  # first: callbacks built from config.logging.log_dir see the folder chosen
    try:
        callbacks = default_callbacks(config)  # a tracker that cannot be imported stops the run before any file
        if note:
            callbacks.append(Announce(note))
        engine = TrainingEngine(config, task, rank, world_size, data_module=data_module, callbacks=callbacks)
        engine.exit_on_second_signal = True  # a second Ctrl-C ends the process at once, saving nothing
        return engine.train()  # its engine shares the claim's hold on the folder
    finally:
        if claim is not None:
            claim.release()


def summary_table(config: Config, metrics: dict[str, float]) -> str:
    """The lines printed when a run ends: results, speed, and where everything is."""
    monitor = config.checkpoint.monitor
    speed = "tokens_per_s" if "tokens_per_s" in metrics else "samples_per_s"
    rows = [
        (f"best {monitor}", metrics.get(f"best_{monitor}")),
        (f"final {monitor}", metrics.get(monitor)),
        ("final train loss", metrics.get("train_loss")),
        ("steps / epochs", f"{metrics['steps']} / {metrics['epochs']}"),
        ("stopped", metrics.get("stop_reason")),  # max_steps, early stopping, all epochs trained
        (speed.replace("_per_s", "/s"), metrics.get(speed) or None),  # none when this run took no step
        ("elapsed", f"{metrics['elapsed_s']:.1f} s"),
        ("checkpoints", config.checkpoint.dir),
        (f"best by {monitor}", best_checkpoint(config.checkpoint.dir)),
        ("logs", config.logging.log_dir),
    ]
    width = max(len(name) for name, _ in rows)
    shown = [f"{name:<{width}}  {value:.4g}" if isinstance(value, float) else f"{name:<{width}}  {value}"
             for name, value in rows if value is not None]
    return "\n".join(shown)


OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
"""Why a file of the run could not be written that a user fixes on the machine, not in the code."""


def _out_of_space(e: BaseException | None) -> OSError | None:
    """The full disk (or quota, or read-only mount) behind ``e``, through the errors raised while handling it."""
    return next((c for c in causes(e) if isinstance(c, OSError) and c.errno in OUT_OF_SPACE), None)


def _quiet_out_of_space(args: threading.ExceptHookArgs) -> None:
    """A full disk in a logger's writing thread is not printed there: the main thread meets it too, at its
    next write, and says it in one line."""
    if _out_of_space(args.exc_value) is None:
        threading.__excepthook__(args)


def _moved(config: Config | None, asked_dir: str) -> str:
    """The flag that names the folder a fresh run moved to, for the command that continues it; "" if it did not."""
    moved = config is not None and asked_dir and config.logging.log_dir != asked_dir
    return f" --logging-log-dir {shlex.quote(config.logging.log_dir)}" if moved else ""  # a path with a space


def _set_by(config: Config | None, e: UsageError) -> str:
    """Where the field an error found later names (``data.path: ...``) was set, if not by a flag."""
    field = re.match(r"(task|[a-z_]+\.[a-z0-9_]+): ", str(e))
    note = config.set_by(field.group(1)) if config is not None and field else ""
    return "" if note in str(e) else note  # a ConfigError of validate() names it already


def _lost_a_rank(e: RuntimeError) -> bool:
    """A collective that failed because a peer process went away or stopped answering."""
    text = str(e)
    return isinstance(e, dist.DistBackendError) or ("gloo" in text and ("Connection" in text or "Timed out" in text))


def main(argv: list[str] | None = None, exiting: bool = False) -> int:
    """Train as the command line says; returns the exit code. ``exiting``: the process exits after (run())."""
    one_line_warnings()
    threading.excepthook = _quiet_out_of_space
    argv = sys.argv[1:] if argv is None else argv
    rank, config, asked_dir = 0, None, ""
    try:
        config = Config.from_args_and_env(argv)
        if "--print-config" in argv:
            # a task or data module the run could not import: refused now, not when the config is used
            resolve_data_module(data_module_of(config, resolve_task(config.task)(config)))
            say(config.to_yaml().rstrip("\n"))
            return 0
        rank, world_size, local_rank = D.env_ranks()
        asked_dir = config.logging.log_dir  # a fresh run may move on to the next free name
        try:
            D.init_process_group(config, rank, world_size, local_rank)
            metrics = train_worker(rank, world_size, config)
            out_of_time = str(metrics.get("stop_reason", "")).startswith(OUT_OF_TIME)
            # 75; but under torchrun, which takes any other code than 0 for a failure and restarts the workers
            # (--max-restarts), each with a limit of its own, 0
            code = EXIT_OUT_OF_TIME if out_of_time and D.torchrun_agent() is None else 0
            if exiting:
                exit_on_signals(code)  # a signal now (the job's own time limit, near) does not change it
        except (Exception, TrainingInterrupted) as e:
            if dist.is_initialized():  # else the frames keep their locals, for a post-mortem debugger
                # the frames of the error and of those it came from let go of what they held (the DDP wrapper a
                # task's step was given), which goes before the group: freed after it, a reducer can deadlock
                # gloo's teardown
                for error in causes(e):
                    traceback.clear_frames(error.__traceback__)
            if not (isinstance(e, RuntimeError) and _lost_a_rank(e)):
                # before the group goes: the ranks left waiting look for it; a signal's stop is every rank's
                D.record_failure(rank, e, run_ended=not isinstance(e, TrainingInterrupted))
                raise
            # another rank died or hung: one line here naming it, as far as the store can tell; said before
            # the group goes, whose shutdown (nccl's) may wait for work that the lost rank never joins
            who = D.lost_ranks(rank, world_size) or "another rank failed or hung"
            print_error(f"error: rank {rank} lost contact with the others: {who}: {one_line(e)}")
            return 1
        finally:
            D.destroy_process_group()
    except UsageError as e:
        print_error(f"error: {e}{_set_by(config, e)}")
        return EXIT_USAGE
    except NonFiniteError as e:  # a RuntimeError: caught before the clause below
        print_error(f"error: {e}")
        return EXIT_NON_FINITE
    except TrainingInterrupted as e:
        print_error(f"{e}; continue with --checkpoint-resume auto{_moved(config, asked_dir)}")
        return 128 + e.signum
    except KeyboardInterrupt:  # in training the engine takes Ctrl-C itself: it ends the step and saves
        return interrupted("outside the training steps (setting up, or a callback's work at the start or the end): "
                           "stopped at once; the checkpoints saved before are kept")
    except Exception as e:
        op = D.op_with_no_deterministic_form(e)
        if op and config is not None and config.training.deterministic:
            print_error(f"error: training.deterministic: {op} has no deterministic implementation on this device; "
                        f"train with --training-deterministic false, or compute that step with other ops"
                        f"{config.set_by('training.deterministic')}")
            return EXIT_USAGE
        full = _out_of_space(e)
        if full is not None:  # the logs, the summary or the config: the checkpoints say it themselves
            # no file name when closing a file; no run directory yet for --print-config
            where = full.filename or (f"to the run directory {config.logging.log_dir}" if asked_dir else "its output")
            fix = "make it writable" if full.errno == errno.EROFS else "make room"
            again = f" with --checkpoint-resume auto{_moved(config, asked_dir)}" if asked_dir else ""
            print_error(f"error: cannot write {where}: {full.strerror}; {fix}, then run again{again}")
            return EXIT_USAGE
        raise
    if rank == 0:
        say(summary_table(config, metrics))
        if out_of_time:
            print_error(f"{metrics['stop_reason']} at step {metrics['steps']}; continue with --checkpoint-resume "
                        f"auto{_moved(config, asked_dir)}")
    return code


def run() -> NoReturn:
    """The command line's entry (``python -m``, torchrun, llm-train): main() as a process (cli.run_program), which
    ends it at once with the run's code on a signal once the run has ended: a finished run is not one stopped by
    a scheduler's SIGTERM as the job ends (143), which the scheduler would run again."""
    run_program(functools.partial(main, exiting=True))


if __name__ == "__main__":
    run()
