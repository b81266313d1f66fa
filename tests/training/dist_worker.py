"""``llm/training/train.py`` plus faults on demand, for tests.

Also saves each rank's final weights to ``<log_dir>/weights_rank<r>.pt``.
Faults, set by environment variables (each fires once per run directory, so a
restarted worker does not fault again):
  KILL_AT_STEP=N [KILL_RANK=r]     SIGKILL this rank after optimizer step N
  KILL_IN_SAVE=N [KILL_RANK=r]     SIGKILL this rank in the middle of writing checkpoint N
  TERM_AT_STEP=N [TERM_RANK=r]     SIGTERM this rank after optimizer step N
  INT_AT_STEP=N [INT_RANK=r]       SIGINT (Ctrl-C) this rank after optimizer step N
  TWICE_AT_STEP=N [TWICE_RANK=r]   SIGTERM this rank twice after optimizer step N
  STOP_AT_STEP=N [STOP_RANK=r]     this rank's callback asks the run to stop after optimizer step N
  STOP_AT_EPOCH_START=N [STOP_RANK=r]  this rank's callback asks the run to stop as epoch N starts
  KILL_AGENT_AT_STEP=N             rank 0 SIGKILLs its parent, the torchrun agent, after optimizer step N
  KILL_AGENT_BEFORE_ENGINE=1       rank 0 SIGKILLs its parent, the torchrun agent, before any rank builds its engine
  TERM_THEN_KILL_AGENT_AT_STEP=N   rank 0 has its parent, the torchrun agent, sent SIGTERM after optimizer step N
                                   and SIGKILL a second later (a supervisor's grace period running out)
  ALL_AT_STEP=N ALL_SIGNAL=TERM    SIGTERM (or INT, HUP) this rank and its data loader workers after optimizer
                                   step N, sent by another process (a job's signal reaches every process of it)
  TERM_ALL_AT_STEP=N               rank 0 sends SIGTERM to its parent, the torchrun agent, and to itself after
                                   optimizer step N (SLURM and systemd signal every process of a job)
  SLOW_FROM_STEP=N SLOW_S=x        every rank's steps from optimizer step N on take x seconds more
"""

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from llm.training import train
from llm.training.core.callbacks import Callback
from llm.training.core.engine import TrainingEngine


def _fire_once(engine, name: str, step: int) -> bool:
    wanted = os.environ.get(name)
    rank = int(os.environ.get(name.split("_")[0] + "_RANK", 0))
    if wanted is None or int(wanted) != step or engine.rank != rank:
        return False
    marker = Path(engine.run_dir) / f".fired-{name}"
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("")
    return True


class Faults(Callback):
    def on_epoch_start(self, engine):
        if _fire_once(engine, "STOP_AT_EPOCH_START", engine.epoch):
            engine.request_stop(f"asked by rank {engine.rank} as epoch {engine.epoch} starts")

    def on_step_end(self, engine):
        if _fire_once(engine, "KILL_AT_STEP", engine.step):
            os.kill(os.getpid(), signal.SIGKILL)
        if _fire_once(engine, "TERM_AT_STEP", engine.step):
            os.kill(os.getpid(), signal.SIGTERM)
        if _fire_once(engine, "INT_AT_STEP", engine.step):
            os.kill(os.getpid(), signal.SIGINT)
        if _fire_once(engine, "TWICE_AT_STEP", engine.step):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        if _fire_once(engine, "KILL_AGENT_AT_STEP", engine.step):
            os.kill(os.getppid(), signal.SIGKILL)
        if _fire_once(engine, "TERM_THEN_KILL_AGENT_AT_STEP", engine.step):
            agent = os.getppid()
            # in a session of its own: the agent's SIGTERM goes to this worker's process group
            subprocess.Popen(["sh", "-c", f"kill -TERM {agent}; sleep 1; kill -KILL {agent}"], start_new_session=True)
        if _fire_once(engine, "ALL_AT_STEP", engine.step):
            # by another process, as a job's signal is: a worker takes its parent's SIGTERM as the loader's
            name = os.environ["ALL_SIGNAL"]
            subprocess.run(["kill", f"-{name}", str(os.getpid()),
                            *(str(worker.pid) for worker in multiprocessing.active_children())], check=True)
            for _ in range(1000):  # taken by this step, however busy the machine: the thread it reached may wait
                if engine._signal is not None:
                    break
                time.sleep(0.01)
        if _fire_once(engine, "TERM_ALL_AT_STEP", engine.step):
            os.kill(os.getppid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        if engine.step >= int(os.environ.get("SLOW_FROM_STEP", sys.maxsize)):
            time.sleep(float(os.environ["SLOW_S"]))
        if _fire_once(engine, "STOP_AT_STEP", engine.step):
            engine.request_stop(f"asked by rank {engine.rank}")

    def on_train_end(self, engine, metrics):
        # under FSDP each rank holds a shard: save the local tensors
        state = {k: getattr(v, "to_local", lambda v=v: v)() for k, v in engine.raw_model.state_dict().items()}
        torch.save(state, Path(engine.run_dir) / f"weights_rank{engine.rank}.pt")


_write_artifacts = TrainingEngine._write_artifacts


def _write_artifacts_then_maybe_die(self, directory):
    _write_artifacts(self, directory)  # state.pt is written; the manifest is not
    # the step saved, from the staging folder's name: a save in the background is written while the loop goes on
    if _fire_once(self, "KILL_IN_SAVE", int(directory.name.rsplit("_", 1)[1])):
        os.kill(os.getpid(), signal.SIGKILL)


TrainingEngine._write_artifacts = _write_artifacts_then_maybe_die
_init = TrainingEngine.__init__


def _init_after_maybe_killing_the_agent(self, config, task, rank=0, *args, **kwargs):
    if os.environ.get("KILL_AGENT_BEFORE_ENGINE"):
        agent = os.getppid()  # before the barrier, after which rank 0 may kill it before this rank looks
        torch.distributed.barrier()  # every rank has joined the group, which needs the agent's store to form
        if rank == 0:
            os.kill(agent, signal.SIGKILL)
        while os.getppid() == agent:  # every rank orphaned: no engine sees its agent as its parent
            time.sleep(0.01)
    _init(self, config, task, rank, *args, **kwargs)


TrainingEngine.__init__ = _init_after_maybe_killing_the_agent
_default_callbacks = train.default_callbacks
train.default_callbacks = lambda config: [*_default_callbacks(config), Faults()]

if __name__ == "__main__":
    train.run()
