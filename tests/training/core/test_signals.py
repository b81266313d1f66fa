import os
import signal
from pathlib import Path

import pytest
import torch

from llm.training.core import engine as engine_module
from llm.training.core.callbacks import Callback
from llm.training.core.engine import TrainingEngine
from llm.training.core.signals import TrainingInterrupted
from llm.training.tasks.regression_task import RegressionTask
from tests.helpers import tiny_config, train


class TermAt3(Callback):
    def on_step_end(self, engine):
        if engine.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)


def stopped_worker(rank: int, directory: str) -> None:
    config = tiny_config(Path(directory))
    TrainingEngine(config, RegressionTask(config), rank, 1, callbacks=[TermAt3()]).train()


def test_a_stop_by_signal_in_a_worker_of_torchs_spawn_reaches_the_parent_as_a_failure(tmp_path):
    # torch.multiprocessing's spawn drops a KeyboardInterrupt in a worker: a stopped run must not look finished
    with pytest.raises(torch.multiprocessing.ProcessExitedException, match="terminated with exit code 1"):
        torch.multiprocessing.spawn(stopped_worker, args=(str(tmp_path),), nprocs=1)
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step_00000003"


def test_a_second_ctrl_c_in_a_script_raises_keyboard_interrupt_and_keeps_the_checkpoints(tmp_path):
    class TwiceAt(Callback):
        def on_step_end(self, engine):
            if engine.step == 4:
                os.kill(os.getpid(), signal.SIGINT)  # would end the run after this step, with a save
                os.kill(os.getpid(), signal.SIGINT)  # does not wait: Python's own Ctrl-C, the process lives on

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        config = tiny_config(tmp_path, checkpoint={"every_n_steps": 3})
        with pytest.raises(KeyboardInterrupt) as raised:
            train(config, callbacks=[TwiceAt()])
        assert not isinstance(raised.value, TrainingInterrupted)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step_00000003"
    resumed, _ = train(tiny_config(tmp_path, checkpoint={"every_n_steps": 3, "resume": "auto"}))
    assert resumed.step == 2 * 14


def test_a_signal_after_the_last_stop_agreement_lets_the_run_finish_as_every_rank_would(tmp_path):
    class SignalDuringFinalValidation(Callback):
        def on_validation_end(self, engine, metrics):
            if engine.step == 5:  # max_steps reached and agreed: the final validation is under way
                os.kill(os.getpid(), signal.SIGTERM)

    engine, metrics = train(tiny_config(tmp_path, training={"max_steps": 5}),
                            callbacks=[SignalDuringFinalValidation()])
    assert metrics["stop_reason"] == "reached max_steps=5" and engine.step == 5
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step_00000005"


def test_an_agent_found_gone_while_the_ranks_agree_on_stopping_is_still_named_as_the_reason(tmp_path, monkeypatch):
    engine = TrainingEngine(tiny_config(tmp_path), RegressionTask(tiny_config(tmp_path)), 0, 1)
    engine.world_size = 2  # only the agreement is exercised; its all-reduce is the one below

    def any_rank(flags):  # every rank's watch (_watch_agent) sees the agent gone while the all-reduce waits
        engine._agent_gone, engine._signal = True, signal.SIGTERM
        return flags

    monkeypatch.setattr(engine_module.D, "any_rank", any_rank)
    assert engine._agree_to_stop(False) == (False, False)  # asked for after this agreement read the flags
    assert engine._agree_to_stop(False) == (True, False)
    assert engine.stop_reason == "a torchrun agent of this job is gone"
    assert engine.interrupted_by == signal.SIGTERM
