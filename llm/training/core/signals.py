"""How a run stops on a signal: after its step, with a checkpoint, agreed by every rank.

The engine enters ``stop_on_signals`` around its loop; the handler only notes the
signal, and the loop acts on it at its next agreement (TrainingEngine._agree_to_stop).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm.cli import STOP_SIGNALS
from llm.training.core import distributed as D

if TYPE_CHECKING:
    from llm.training.core.engine import TrainingEngine


ENDED_WAIT_S = 10.0
"""How long a stuck rank that has learned the run is over waits before it ends itself (_watch_agent)."""


REPEAT_S = 2.0
"""Under torchrun, a signal within this many seconds of the first one is the same request, delivered twice (see
stop_on_signals)."""


class TrainingInterrupted(BaseException):
    """SIGTERM, SIGINT, SIGHUP or SIGUSR1 stopped training after a step, or the death of the torchrun agent (taken as
    SIGTERM, ``agent_gone``); a checkpoint was saved. Not an Exception, as KeyboardInterrupt is not: a sweep's
    ``except Exception`` does not swallow it. Nor a KeyboardInterrupt, which torch.multiprocessing's spawn
    drops in its workers: a stopped run would look finished there."""

    def __init__(self, signum: int, step: int, checkpoint: Path, agent_gone: bool = False):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        why = (f"stopped at step {step}: a torchrun agent of this job is gone (taken as {signal.Signals(signum).name})"
               if agent_gone else f"stopped by {signal.Signals(signum).name} at step {step}")
        super().__init__(f"{why}; checkpoint saved at {checkpoint}")


@contextlib.contextmanager
def stop_on_signals(engine: TrainingEngine) -> Iterator[None]:
    """SIGTERM, SIGINT, SIGHUP (the terminal gone: an SSH connection dropped) and SIGUSR1 (SLURM's warning of
    the time limit) finish the current step, save a checkpoint and stop (see train.py's exit code).

    A second signal does not wait. Under the command line (``exit_on_second_signal``)
    the default action ends the process at once (a second Ctrl-C, or a rank stuck where
    the first one cannot be acted on). In a notebook or a script the handler there before
    train() takes it: a second Ctrl-C raises KeyboardInterrupt, and the interpreter
    lives on. Under torchrun one that comes within REPEAT_S of the first is the same
    request delivered twice: SLURM and systemd signal every process of a job, and
    torchrun forwards the signal it got to its workers as well.

    Under torchrun, a worker whose agent dies stops the same way, and one stuck after another rank gave the
    run up ends (_watch_agent).
    """
    def handler(signum: int, frame: Any) -> None:
        if engine._signal is None:
            engine._signal, engine._signalled_at = signum, time.monotonic()
        elif engine._agent is None or time.monotonic() - engine._signalled_at > REPEAT_S:
            before = previous.get(signum)
            if callable(before) and not engine.exit_on_second_signal:
                signal.signal(signum, before)
                before(signum, frame)  # Python's own for SIGINT raises KeyboardInterrupt here
                return
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    previous: dict[int, Any] = {}  # the handlers before train()'s, put back after it
    try:
        for s in STOP_SIGNALS:
            previous[s] = signal.signal(s, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    done = threading.Event()
    watch = threading.Thread(target=_watch_agent, args=(engine, done), name="llm-watch-agent", daemon=True)
    if engine._agent is not None:
        watch.start()
    try:
        yield
    finally:
        done.set()
        if watch.is_alive():  # gone before train() returns: it holds the engine, whose DDP wrapper and gloo
            watch.join()  # work must be freed before the process group is, not at the interpreter's exit
        for s, h in previous.items():
            signal.signal(s, h)


def _watch_agent(engine: TrainingEngine, done: threading.Event) -> None:
    """Stop as on SIGTERM once the torchrun agent that started this worker has died (checked each second).

    torchrun starts each worker in a session of its own and forwards the signals
    it gets; killed outright (SIGKILL, the OOM killer) it forwards none, and its
    workers would train on unseen, holding the run folder. This asks for the stop
    without a signal: one already received stays the only one.

    Also end this worker, in one line saying where it stood, when it has taken no step
    for min(distributed.timeout_s, 60) s and another rank gave the run up in the
    rendezvous store ENDED_WAIT_S before (it failed, or lost contact: D.run_ended,
    looked up every 5 s while no step is taken, never while steps come). A rank hung
    outside any collective (in a task's step, a loader) never learns of the failure
    itself, and on several nodes its torchrun agent, which sees a worker still
    running, would hold the job's nodes for ever.
    """
    grace = min(engine.config.distributed.timeout_s, 60)
    seen, since, ticks, ended = engine.step, time.monotonic(), 0, None
    while not done.wait(1.0):
        if os.getppid() != engine._agent:
            if engine._signal is None:
                engine._agent_gone = True
                engine._signal, engine._signalled_at = signal.SIGTERM, time.monotonic()
            return
        if engine.step != seen:
            seen, since, ended = engine.step, time.monotonic(), None
            continue
        ticks += 1
        stuck = time.monotonic() - since
        if ended is None and stuck >= grace and ticks % 5 == 0:
            reason = D.run_ended()
            ended = (reason, time.monotonic()) if reason else None
        # not at once: the rank that gave up says why first, and on its node torchrun may end this one anyway
        if ended is not None and time.monotonic() - ended[1] >= ENDED_WAIT_S:
            frame = sys._current_frames().get(threading.main_thread().ident)
            at = traceback.extract_stack(frame)[-1] if frame is not None else None
            where = f"{at.filename}:{at.lineno} in {at.name}" if at else "an unknown place"
            sys.stderr.write(f"error: rank {engine.rank} ends: {ended[0]}, and this rank has taken no step for "
                             f"{stuck:.0f} s (stuck at {where})\n")
            sys.stderr.flush()
            os._exit(1)


def leave_stop_signals() -> None:
    """In a loader's worker process: leave the stop signals to the training process, which saves and then ends
    its workers itself. Ctrl-C and SIGHUP reach the terminal's whole process group: ignored here. SIGTERM is
    obeyed only from the training process (its loader shutting the worker down), or once that process is gone:
    one sent to every process of a job (SLURM, systemd) would otherwise end the worker first, and the training
    process would fail reading from it rather than save."""
    for signum in STOP_SIGNALS:
        if signum != signal.SIGTERM:
            signal.signal(signum, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: no way to read the sender; torch's handler stays
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit it
    parent = os.getppid()

    def wait() -> None:
        while True:
            sent = signal.sigwaitinfo({signal.SIGTERM})
            if sent.si_pid == parent or os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=wait, name="llm-worker-sigterm", daemon=True).start()
