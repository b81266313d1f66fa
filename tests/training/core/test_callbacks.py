import json
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from llm.training.core.callbacks import (
    EarlyStopping,
    LRSchedulerCallback,
    MetricsLogger,
    ProgressBar,
    TensorBoardLogger,
    improves,
    keyed_by_class,
)
from llm.training.core.config import Config
from llm.training.core.engine import TrainingEngine
from llm.training.tasks.regression_task import RegressionTask
from tests.helpers import StubEngine


def test_improves_compares_by_mode_and_margin_and_never_takes_nan_as_best():
    assert improves(0.9, 1.0, "min") and not improves(1.0, 1.0, "min") and not improves(1.1, 1.0, "min")
    assert improves(1.1, 1.0, "max") and not improves(0.9, 1.0, "max")
    assert not improves(0.95, 1.0, "min", min_delta=0.1) and improves(0.85, 1.0, "min", min_delta=0.1)
    assert improves(5.0, None, "min") and improves(5.0, float("nan"), "max")
    assert not improves(float("nan"), None, "min") and not improves(float("nan"), 1.0, "max")


def test_early_stopping_on_nothing_but_nan_validations_stops_and_says_so():
    engine = StubEngine()
    cb = EarlyStopping(monitor="val_loss", patience=2)
    for loss in [float("nan"), float("nan")]:
        cb.on_validation_end(engine, {"val_loss": loss})
    assert engine.should_stop and cb.best is None
    assert engine.stop_reason == "early stopping: val_loss has not been a number for 2 evaluations"


def test_early_stopping_after_a_nan_validation_waits_for_a_real_improvement():
    engine = StubEngine()
    cb = EarlyStopping(monitor="val_loss", patience=2)
    for loss in [float("nan"), 0.5, 0.4]:  # a diverged first evaluation, then the run recovers
        cb.on_validation_end(engine, {"val_loss": loss})
    assert not engine.should_stop and cb.best == 0.4 and cb.wait == 0


def test_early_stopping_restores_its_state_only_for_the_same_metric_and_direction():
    engine = StubEngine()
    saved = EarlyStopping(monitor="val_loss", patience=3)
    for loss in [1.0, 1.1]:
        saved.on_validation_end(engine, {"val_loss": loss})
    state = saved.state_dict()
    same, other_metric, other_mode = EarlyStopping(patience=3), EarlyStopping("val_acc", 3, "max"), EarlyStopping(mode="max")
    for cb in (same, other_metric, other_mode):
        cb.load_state_dict(state)
    assert (same.best, same.wait) == (1.0, 1)
    assert (other_metric.best, other_metric.wait) == (other_mode.best, other_mode.wait) == (None, 0)
    older = EarlyStopping(patience=3)
    older.load_state_dict({"best": 1.0, "wait": 1})  # saved before the state named its metric
    assert (older.best, older.wait) == (1.0, 1)


def test_early_stopping_waits_patience_validations_then_stops():
    engine = StubEngine()
    cb = EarlyStopping(monitor="val_loss", patience=2)
    for loss in [1.0, 0.5, 0.6]:
        cb.on_validation_end(engine, {"val_loss": loss})
        assert not engine.should_stop
    cb.on_validation_end(engine, {"val_loss": 0.55})  # the second validation in a row without improvement
    assert engine.should_stop and "val_loss" in engine.stop_reason
    assert cb.best == 0.5 and cb.wait == 2


def test_early_stopping_with_patience_0_stops_at_the_first_validation_without_improvement():
    engine = StubEngine()
    cb = EarlyStopping(patience=0)
    cb.on_validation_end(engine, {"val_loss": 1.0})
    cb.on_validation_end(engine, {"val_loss": 0.9})
    assert not engine.should_stop
    cb.on_validation_end(engine, {"val_loss": 0.9})
    assert engine.should_stop


def test_early_stopping_mode_max_and_improvement_resets_wait():
    engine = StubEngine()
    cb = EarlyStopping(monitor="val_acc", patience=2, mode="max")
    for acc in [0.5, 0.4, 0.6, 0.55]:
        cb.on_validation_end(engine, {"val_acc": acc})
    assert not engine.should_stop and cb.best == 0.6 and cb.wait == 1
    cb.on_validation_end(engine, {"val_acc": 0.59})
    assert engine.should_stop


def test_early_stopping_state_roundtrip_and_bad_arguments():
    cb = EarlyStopping(patience=3)
    cb.on_validation_end(StubEngine(), {"val_loss": 2.0})
    cb.on_validation_end(StubEngine(), {"val_loss": 3.0})
    restored = EarlyStopping(patience=3)
    restored.load_state_dict(cb.state_dict())
    assert (restored.best, restored.wait) == (2.0, 1)
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=-1)
    for min_delta in (-0.1, float("nan")):  # below 0, a worse value would count as better and never stop the run
        with pytest.raises(ValueError, match="min_delta"):
            EarlyStopping(min_delta=min_delta)
    with pytest.raises(KeyError, match="val_acc"):
        EarlyStopping(monitor="val_acc").on_validation_end(StubEngine(), {"val_loss": 1.0})


def test_lr_callback_logs_the_rate_the_step_took_not_the_next_ones():
    engine = StubEngine()
    cb = LRSchedulerCallback()
    cb.on_train_start(engine)
    engine.step, engine.optimizer.param_groups[0]["lr"] = 50, 0.25  # the scheduler has set step 51's rate
    cb.on_step_end(engine)
    assert engine.logged == {"lr": 0.5}
    engine.logged = {}
    cb.on_epoch_end(engine, {})
    assert engine.logged == {"lr": 0.5}


def test_lr_callback_logs_every_group_when_their_rates_differ():
    engine = StubEngine()
    backbone, head = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    engine.optimizer = torch.optim.SGD([{"params": [backbone], "lr": 0.01}, {"params": [head]}], lr=0.1)
    cb = LRSchedulerCallback()
    cb.on_train_start(engine)
    engine.step = 50
    for group in engine.optimizer.param_groups:
        group["lr"] /= 2  # the next step's
    cb.on_step_end(engine)
    assert engine.logged == {"lr": 0.01, "lr_group1": 0.1}
    engine.logged = {}
    torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda step: step / 10)  # a warmup: every group at 0
    cb.on_train_start(engine)
    cb.on_step_end(engine)
    assert engine.logged == {"lr": 0.0, "lr_group1": 0.0}
    engine.logged = {}
    engine.optimizer = torch.optim.SGD([{"params": [backbone]}, {"params": [head]}], lr=0.1)
    cb.on_train_start(engine)  # groups at one rate: lr alone
    cb.on_step_end(engine)
    assert engine.logged == {"lr": 0.1}


def test_metrics_logger_writes_one_json_object_per_record_on_rank_0_only(tmp_path):
    for is_main in (True, False):
        run_dir = tmp_path / str(is_main)
        run_dir.mkdir()
        engine = StubEngine(is_main=is_main, run_dir=run_dir)
        cb = MetricsLogger()
        cb.on_train_start(engine)
        cb.on_log(engine, {"split": "train", "step": 1, "epoch": 0, "loss": 2.5})
        cb.on_log(engine, {"split": "val", "step": 1, "epoch": 0, "val_loss": 3.0})
        cb.on_train_end(engine, {})
        path = run_dir / "metrics.jsonl"
        if is_main:
            assert engine.printed == ["step 1  val_loss 3"]
            lines = [json.loads(line) for line in path.read_text().splitlines()]
            assert lines == [{"split": "train", "step": 1, "epoch": 0, "loss": 2.5},
                             {"split": "val", "step": 1, "epoch": 0, "val_loss": 3.0}]
        else:
            assert not path.exists()


def test_metrics_logger_resumed_at_a_step_moves_the_records_logged_after_it_aside(tmp_path):
    records = [json.dumps({"split": "train", "step": step, "epoch": 0, "loss": 1.0 / step}) + "\n" for step in (2, 4, 6)]
    # not even UTF-8, or nested too deep for the JSON reader: left where they are
    not_a_record = "written by hand \xe9\n".encode("latin-1") + b"[" * 100_000 + b"]" * 100_000 + b"\n"
    cut_off = b'{"split": "train", "st'  # killed mid-write
    (tmp_path / "metrics.jsonl").write_bytes("".join(records[:2]).encode() + not_a_record + records[2].encode() + cut_off)
    engine = StubEngine(run_dir=tmp_path)
    engine.step = 4  # the checkpoint this run resumes from
    cb = MetricsLogger()
    cb.on_train_start(engine)
    cb.on_log(engine, {"split": "train", "step": 6, "epoch": 0, "loss": 0.2})
    cb.on_train_end(engine, {})
    again = json.dumps({"split": "train", "step": 6, "epoch": 0, "loss": 0.2}) + "\n"
    assert (tmp_path / "metrics.jsonl").read_bytes() == "".join(records[:2]).encode() + not_a_record + again.encode()
    assert (tmp_path / "metrics.dropped.jsonl").read_bytes() == records[2].encode() + cut_off + b"\n"
    assert engine.printed == [f"{tmp_path / 'metrics.jsonl'}: 2 record(s) logged after step 4, where this run "
                              f"starts, moved to metrics.dropped.jsonl"]


def test_tensorboard_logger_events_read_back(tmp_path, monkeypatch):
    engine = StubEngine()
    cb = TensorBoardLogger(log_dir=str(tmp_path))  # records held together for up to 30 s, then written at once
    cb.on_train_start(engine)
    for step in (1, 2, 3):
        monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0 + 10 * step)
        cb.on_log(engine, {"split": "train", "step": step, "epoch": 0, "loss": 1.0 / step})
    cb.on_log(engine, {"split": "val", "step": 3, "epoch": 1, "val_loss": 0.25})
    monkeypatch.undo()
    cb.on_train_end(engine, {})
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, 0.333333)]
    assert [e.value for e in events.Scalars("val/val_loss")] == [0.25]
    # each at the time it was logged, not the time the batch was written: TensorBoard's wall-time axis
    assert [e.wall_time - 1_700_000_000 for e in events.Scalars("train/loss")] == [10, 20, 30]


class MyTask(RegressionTask):
    """A task of the user's own, whose name the run folder takes."""


def test_tensorboard_logger_given_the_configs_log_dir_writes_into_the_run_of_a_task_of_ones_own(tmp_path,
                                                                                               monkeypatch):
    # the usage guide's callbacks: a config read from a file fills {task} in with its own task, regression
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("training: {epochs: 1, batch_size: 16}\ndata: {num_samples: 64, input_dim: 4}\n"
                                     "model: {n_layer: 1, n_embd: 8}\nlogging: {progress_bar: false}\n")
    config = Config.from_yaml("c.yaml")
    assert config.logging.log_dir == "runs/regression"
    engine = TrainingEngine(config, MyTask(config), callbacks=[TensorBoardLogger(log_dir=config.logging.log_dir)])
    engine.train()
    assert engine.run_dir == Path("runs/mytask") and not Path("runs/regression").exists()
    events = EventAccumulator("runs/mytask")
    events.Reload()
    assert events.Scalars("val/val_loss")
    # another folder is the caller's to choose, with {task} filled in
    assert engine.log_dir_of("tb/{task}") == Path("tb/mytask") and engine.log_dir_of("runs/mytask") == engine.run_dir


def test_tensorboard_events_of_a_run_that_died_before_its_first_save_are_purged_when_it_starts_again(tmp_path):
    engine = StubEngine()  # at step 0: nothing saved to resume from
    for loss in (9.0, 1.0):  # the run that died at step 2 wrote its events; the one started again writes its own
        # event files are read in name order, their names start with the second they were made in: a process
        # started again does so in a later second (in one process, a counter in the name can sort 10 before 9)
        time.sleep(1 - time.time() % 1)
        cb = TensorBoardLogger(log_dir=str(tmp_path))
        cb.on_train_start(engine)
        for step in (1, 2):
            cb.on_log(engine, {"split": "train", "step": step, "epoch": 0, "loss": loss})
        cb.on_train_end(engine, {})
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 1.0)]


def test_tensorboard_logger_hands_a_held_record_over_at_a_later_step(tmp_path, monkeypatch):
    engine = StubEngine()
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    cb = TensorBoardLogger(log_dir=str(tmp_path), flush_secs=30)
    cb.on_train_start(engine)
    cb.on_log(engine, {"split": "val", "step": 5, "epoch": 0, "val_loss": 0.5})
    assert cb._batch  # held: less than flush_secs since the start
    now[0] += 31
    cb.on_step_end(engine)  # no record comes for a long while: the step hands it over
    assert not cb._batch
    cb._writer.flush()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.step for e in events.Scalars("val/val_loss")] == [5]
    cb.on_train_end(engine, {})


def test_tensorboard_logger_hands_records_over_every_flush_secs(tmp_path):
    engine = StubEngine()

    def scalars_on_disk(cb, folder):
        if cb._writer is not None:  # None once the run ended, which wrote what it held
            cb._writer.flush()
        events = EventAccumulator(str(folder))
        events.Reload()
        return [e.step for e in events.Scalars("train/loss")] if "train/loss" in events.Tags()["scalars"] else []

    held = TensorBoardLogger(log_dir=str(tmp_path / "held"), flush_secs=3600)
    held.on_train_start(engine)
    held.on_log(engine, {"split": "train", "step": 1, "epoch": 0, "loss": 1.0})
    assert scalars_on_disk(held, tmp_path / "held") == []  # held back until an hour has passed, or the end
    held.on_train_end(engine, {})
    assert scalars_on_disk(held, tmp_path / "held") == [1]
    prompt = TensorBoardLogger(log_dir=str(tmp_path / "prompt"), flush_secs=0)
    prompt.on_train_start(engine)
    prompt.on_log(engine, {"split": "train", "step": 2, "epoch": 0, "loss": 0.5})
    assert scalars_on_disk(prompt, tmp_path / "prompt") == [2]
    prompt.on_train_end(engine, {})


def test_progress_bar_stays_off_without_a_terminal(capsys):
    engine = StubEngine()
    bar = ProgressBar()
    bar.on_train_start(engine)  # pytest's stderr is not a terminal
    assert bar._bar is None and bar.write("x") is False


def test_callback_state_of_earlier_versions_is_matched_by_class_in_order():
    # keyed by place, which a callback added or left out since (a progress bar turned off) would shift
    old = {"0:MetricsLogger": {}, "4:ProgressBar": {}, "5:MLflowLogger": {"run_id": "x"}, "11:Announce": {"n": 2},
           "7:Announce": {"n": 1}}
    assert keyed_by_class(old) == {"MetricsLogger": {}, "ProgressBar": {}, "MLflowLogger": {"run_id": "x"},
                                    "Announce": {"n": 1}, "Announce#2": {"n": 2}}
    new = {"MLflowLogger": {"run_id": "y"}, "Announce#2": {}}
    assert keyed_by_class(new) == new
