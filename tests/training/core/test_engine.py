import dataclasses
import errno
import itertools
import json
import math
import os
import shutil
import signal
import threading
import time
import warnings
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from llm.data.synthetic_data_module import SyntheticDataModule
from llm.errors import UsageError
from llm.training.core import checkpoint as checkpoint_module, engine as engine_module, nonfinite, resume
from llm.training.core.callbacks import (Callback, CallbackError, EarlyStopping, HOOKS, LRSchedulerCallback,
                                         MetricsLogger, TensorBoardLogger)
from llm.training.core.checkpoint import CheckpointError
from llm.training.core.config import Config, ConfigError
from llm.training.core.engine import TrainingEngine
from llm.training.core.nonfinite import NonFiniteError
from llm.training.core.optim import lr_factor
from llm.training.core.registry import resolve_data_module
from llm.training.core.signals import TrainingInterrupted
from llm.training.tasks.classification_task import ClassificationTask
from llm.training.tasks.regression_task import RegressionTask
from llm.training.train import default_callbacks, main
from tests.helpers import (CrashAt, LearningRates, NaNRegressionTask, PartlyIgnoredRegressionTask, Recorder, StartedAt,
                           free_port, hold, records_of, reseal, spawn, tiny_config, train, train_cli, weights)


def test_a_warmup_that_outlasts_the_run_is_said_once_for_the_configs_schedule_not_a_tasks_own(tmp_path):
    config = tiny_config(tmp_path, training={"max_steps": 3}, optimizer={"warmup_steps": 100})
    with pytest.warns(UserWarning, match=r"^optimizer.warmup_steps 100 outlasts the run's 3 optimizer steps") as said:
        TrainingEngine(config, RegressionTask(config), 0, 1).train()
    assert len([w for w in said if "outlasts" in str(w.message)]) == 1

    class Constant(RegressionTask):
        def build_scheduler(self, optimizer):
            return None

    config = tiny_config(tmp_path / "own", training={"max_steps": 3}, optimizer={"warmup_steps": 100})
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        TrainingEngine(config, Constant(config), 0, 1).train()
    assert not [w for w in said if "outlasts" in str(w.message)]
    # a resume given a warmup that now outlasts the run says so too
    first = tiny_config(tmp_path / "resumed", training={"max_steps": 3})
    TrainingEngine(first, RegressionTask(first), 0, 1).train()
    config = tiny_config(tmp_path / "resumed", training={"max_steps": 6}, optimizer={"warmup_steps": 8},
                         checkpoint={"resume": "auto", "allow_config_change": True})
    with pytest.warns(UserWarning, match=r"^optimizer.warmup_steps 8 outlasts the run's 6 optimizer steps"):
        TrainingEngine(config, RegressionTask(config), 0, 1).train()


def test_training_lowers_loss_and_fills_the_run_dir(tmp_path):
    config = tiny_config(tmp_path, training={"epochs": 4})
    engine, metrics = train(config, callbacks=default_callbacks(config))
    run_dir = tmp_path / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert train_losses[-1] < 0.5 * train_losses[0]
    assert {r["split"] for r in records} == {"train", "val", "epoch"}
    # epoch: whole epochs trained (14 steps each); the records that close an epoch count it
    assert {(r["split"], r["step"]): r["epoch"] for r in records if r["step"] in (14, 16)} == {
        ("train", 14): 0, ("val", 14): 1, ("epoch", 14): 1, ("train", 16): 1}
    assert all("lr" in r and "grad_norm" in r and "samples_per_s" in r for r in records if r["split"] == "train")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == engine.step == 4 * (230 // 16) and summary["epochs"] == 4
    assert summary["val_loss"] == metrics["val_loss"] and summary["elapsed_s"] > 0
    assert Config.from_yaml(run_dir / "config.yaml") == config
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert len(events.Scalars("train/loss")) == len(train_losses)
    assert events.Scalars("val/val_loss")[-1].value == pytest.approx(metrics["val_loss"], rel=1e-6)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{engine.step:08d}"
    hparams = events.PluginTagToContent("hparams")  # the config, logged as TensorBoard hparams, read back as such
    logged = [HParamsPluginData.FromString(content).session_start_info.hparams for content in hparams.values()]
    logged = next(values for values in logged if values)
    assert logged["training.batch_size"].number_value == config.training.batch_size == 16
    assert logged["optimizer.lr"].number_value == pytest.approx(config.optimizer.lr)
    assert logged["optimizer.name"].string_value == config.optimizer.name
    assert logged["logging.log_dir"].string_value == str(run_dir) and logged["task"].string_value == "regression"


def test_a_config_built_in_code_is_checked_and_writes_under_the_task_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = Config()  # defaults, then fields set by hand: neither from_dict nor the command line has checked it
    config.training.epochs, config.training.max_steps, config.logging.progress_bar = 1, 3, False
    config.data.num_samples, config.data.input_dim, config.training.batch_size = 64, 4, 8
    # as the usage guide builds it: before the engine has filled in log_dir's {task}
    engine, _ = train(config, callbacks=[MetricsLogger(), TensorBoardLogger(log_dir=config.logging.log_dir)])
    assert engine.run_dir == Path("runs/regression") and engine.config.checkpoint.dir == "runs/regression/checkpoints"
    assert (config.logging.log_dir, config.checkpoint.dir) == ("runs/{task}", "")  # filled in the engine's copy
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["regression"]  # no folder named "{task}"
    events = EventAccumulator(str(engine.run_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")][-1] == 3
    bad = Config()
    bad.training.batch_size = 0
    with pytest.raises(UsageError, match=r"training\.batch_size"):
        TrainingEngine(bad, RegressionTask(bad))


class ShiftedTargets(SyntheticDataModule):
    def setup(self, stage=None):
        super().setup(stage)
        for name in ("train_set", "val_set"):
            x, y = getattr(self, name).tensors
            setattr(self, name, torch.utils.data.TensorDataset(x, y + 100.0))


def test_the_engine_trains_on_a_copy_of_the_config_and_leaves_the_callers_as_it_was(tmp_path):
    # a sweep in code: the next run's config made from the last one's, changed after that engine was built
    config = Config()
    config.training.epochs, config.logging.progress_bar, config.logging.log_dir = 1, False, str(tmp_path / "a")
    config.data.num_samples, config.data.input_dim, config.training.batch_size = 64, 4, 8
    config.model.n_embd = 8
    engine = TrainingEngine(config, RegressionTask(config), data_module=ShiftedTargets(config))
    assert (config.task, config.data.module) == ("regression", "")  # the classes are recorded in the engine's copy
    assert engine.config.data.module.endswith(":ShiftedTargets")
    # after the engine was built: neither the engine nor the task and data module it holds see these
    config.training.epochs, config.logging.log_dir, config.model.n_embd = 3, str(tmp_path / "b"), 64
    config.data.num_samples = 32
    engine.train()
    assert engine.epoch == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert engine.raw_model[0].out_features == 8 and engine.samples_seen == 56  # 90% of 64, in batches of 8
    assert yaml.safe_load((tmp_path / "a/config.yaml").read_text())["logging"]["log_dir"] == str(tmp_path / "a")
    plain, metrics = train(config)  # the synthetic data the config names, not the shifted data of the run before
    assert type(plain.data_module) is SyntheticDataModule and metrics["val_loss"] < 100


class OwnConfig(RegressionTask):
    """A task whose config is a read-only property: the engine cannot hand it its copy, and trains anyway."""

    def __init__(self, config):
        self._own, self.data_module, self.total_steps = config, None, 0

    config = property(lambda self: self._own)


def test_a_task_and_data_module_reused_by_the_next_run_of_a_sweep_build_what_its_config_says(tmp_path):
    config = tiny_config(tmp_path / "a", model={"n_embd": 8})
    task, data = RegressionTask(config), SyntheticDataModule(config)
    TrainingEngine(config, task, data_module=data).train()
    config.model.n_embd, config.training.batch_size, config.logging.log_dir = 32, 4, str(tmp_path / "b")
    config.checkpoint.dir = ""
    second = TrainingEngine(config, task, data_module=data)
    second.train()
    assert second.raw_model[0].out_features == 32 and second.train_loader.batch_size == 4
    assert yaml.safe_load((tmp_path / "b/config.yaml").read_text())["model"]["n_embd"] == 32
    own = tiny_config(tmp_path / "c")
    assert TrainingEngine(own, OwnConfig(own)).train()["steps"] == 2 * 14


def test_a_second_train_on_one_engine_starts_from_what_the_first_saved(tmp_path):
    class IntAt(Callback):
        def on_step_end(self, engine):
            if engine.step == 5 and not (engine.run_dir / "interrupted").exists():
                (engine.run_dir / "interrupted").touch()
                os.kill(os.getpid(), signal.SIGINT)

    _, expected = train(tiny_config(tmp_path / "ref", training={"max_steps": 9}))
    engine = TrainingEngine(config := tiny_config(tmp_path, training={"max_steps": 9}), RegressionTask(config),
                            callbacks=[IntAt()])
    try:
        engine.train()
        pytest.fail("Ctrl-C did not stop the run")
    except Exception:  # noqa: BLE001 - what a sweep catches: a Ctrl-C's stop is not among it
        pytest.fail("a stop by Ctrl-C was caught as an Exception")
    except TrainingInterrupted as e:  # not a KeyboardInterrupt either, which torch's spawn drops in its workers
        assert not isinstance(e, KeyboardInterrupt) and e.step == 5
    engine.config.checkpoint.resume = "auto"
    metrics = engine.train()  # the signal of the first call is not taken again
    assert engine.step == 9 and metrics["val_loss"] == expected["val_loss"]
    again = engine.train()  # a finished run started again takes no step: no speed to report
    assert again["steps"] == 9 and again["samples_per_s"] is None


def test_hooks_fire_in_the_order_of_the_documented_loop(tmp_path):
    # 3 steps per epoch, 2 epochs; logs and evaluations every 2 steps. The epoch-end validation of
    # step 6 is the one already run at step 6, not a second one.
    recorder = Recorder()
    config = tiny_config(tmp_path, training={"eval_every_steps": 2}, data={"num_samples": 64, "input_dim": 4})
    train(config, callbacks=[recorder])
    fired = [f"{name} {args['split']} {args['step']}" if name == "on_log" else name for name, args in recorder.calls]
    steps = ["on_step_end"]
    assert fired == [
        "on_train_start", "on_epoch_start",
        *steps * 2, "on_log train 2", "on_validation_end", "on_log val 2",
        *steps, "on_validation_end", "on_log val 3", "on_epoch_end", "on_log epoch 3",
        "on_epoch_start",
        *steps, "on_log train 4", "on_validation_end", "on_log val 4",
        *steps * 2, "on_log train 6", "on_validation_end", "on_log val 6", "on_epoch_end", "on_log epoch 6",
        "on_train_end",
    ]
    assert set(recorder.names()) == set(HOOKS)  # every hook the engine calls is a Callback method, and back


class StopAt(Callback):
    def __init__(self, hook, epoch=0):
        self.hook, self.epoch = hook, epoch

    def on_train_start(self, engine):
        if self.hook == "on_train_start":
            engine.request_stop("enough")

    def on_epoch_start(self, engine):
        if self.hook == "on_epoch_start" and engine.epoch == self.epoch:
            engine.request_stop("enough")


@pytest.mark.parametrize("hook, epoch, steps", [("on_train_start", 0, 0), ("on_epoch_start", 0, 0),
                                                ("on_epoch_start", 1, 14)])
def test_a_stop_asked_for_before_an_epoch_takes_no_step_of_it(tmp_path, hook, epoch, steps):
    recorder = Recorder()
    engine, metrics = train(tiny_config(tmp_path), callbacks=[StopAt(hook, epoch), recorder])
    assert engine.step == metrics["steps"] == steps and metrics["stop_reason"] == "enough"
    assert recorder.names().count("on_step_end") == steps and "val_loss" in metrics  # validated, as any stop


class RefuseToStart(Callback):
    def on_train_start(self, engine):
        raise UsageError("RefuseToStart: bad settings")


def test_a_callback_refusing_to_start_still_lets_every_callback_clean_up(tmp_path):
    recorder = Recorder()
    with pytest.raises(UsageError, match="RefuseToStart"):
        train(tiny_config(tmp_path), callbacks=[recorder, RefuseToStart()])
    assert recorder.names() == ["on_train_start", "on_train_end"]


class ShiftedData(SyntheticDataModule):
    """The synthetic data, targets moved up by one: a data module that no built-in name gives."""

    def setup(self, stage):
        super().setup(stage)
        for split in (self.train_set, self.val_set):
            split.tensors = split.tensors[0], split.tensors[1] + 1


class UnseededData(SyntheticDataModule):
    """Targets moved by noise drawn from the global torch RNG in setup, as a user's data module may draw them;
    prepare_data draws too, while its "cache" (a file beside the run) is missing, as one process a node runs it."""

    def prepare_data(self):
        cache = Path(self.config.logging.log_dir).parent / "cache"
        if not cache.exists():
            cache.write_text(str(torch.rand(3)))

    def setup(self, stage):
        super().setup(stage)
        self.drawn = torch.randn(len(self.val_set), 1)
        self.val_set.tensors = self.val_set.tensors[0], self.val_set.tensors[1] + self.drawn


def test_a_data_module_drawing_from_the_global_rng_in_setup_gets_the_same_data_every_run(tmp_path):
    # seeded from training.seed after prepare_data (one process a node; draws only while its cache is missing)
    # and before setup, the same on every rank: a split or noise drawn in setup is the same whatever ran before
    # in the process, so a run and its resume, and each rank, see one data set
    def drawn(disturb: int) -> torch.Tensor:
        torch.manual_seed(disturb)
        data = UnseededData(config := tiny_config(tmp_path / str(disturb), training={"max_steps": 1}))
        (tmp_path / str(disturb)).mkdir()
        if disturb == 2:
            (tmp_path / str(disturb) / "cache").write_text("made by an earlier run")
        TrainingEngine(config, RegressionTask(config), data_module=data).train()
        return data.drawn

    first = drawn(disturb=1)
    assert torch.equal(first, drawn(disturb=2))
    # and not the numbers the model's initial weights are drawn from (torch.manual_seed(training.seed))
    torch.manual_seed(tiny_config(tmp_path).training.seed)
    assert not torch.equal(first, torch.randn(first.shape))


def test_a_run_records_the_task_and_data_module_that_trained_not_those_the_config_named(tmp_path, capsys):
    # a task and data module passed in code, their config left at its defaults: config.yaml names what ran, so
    # that the command line resumes the run with the same classes (it used to say task: regression)
    config = tiny_config(tmp_path)
    assert (config.task, config.data.module) == ("regression", "")
    TrainingEngine(config, PartlyIgnoredRegressionTask(config), data_module=ShiftedData(config)).train()
    saved = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    assert saved["task"] == "tests.helpers:PartlyIgnoredRegressionTask"
    assert resolve_data_module(saved["data"]["module"]) is ShiftedData  # this file's module:ShiftedData
    more = ["--logging-log-dir", str(tmp_path / "run"), "--checkpoint-resume", "auto", "--epochs", "3",
            "--logging-progress-bar", "false"]
    assert main(["--config", str(tmp_path / "run/config.yaml"), *more]) == 0  # the resume finds no change
    assert "resumed from" in capsys.readouterr().out

    # built-in classes take their short names, and the default data module stays unnamed
    config = tiny_config(tmp_path / "c", task="regression")
    TrainingEngine(config, ClassificationTask(config)).train()
    saved = yaml.safe_load((tmp_path / "c/run/config.yaml").read_text())
    assert (saved["task"], saved["data"]["module"]) == ("classification", "")


def test_grad_accumulation_gives_the_gradient_of_the_larger_batch(tmp_path):
    sgd = {"name": "sgd", "beta1": 0.0, "weight_decay": 0.0, "scheduler": "constant", "lr": 0.05}
    big = tiny_config(tmp_path / "a", training={"batch_size": 32, "grad_clip": 0.0}, optimizer=sgd)
    small = tiny_config(tmp_path / "b", training={"batch_size": 16, "grad_accum_steps": 2, "grad_clip": 0.0}, optimizer=sgd)
    a, _ = train(big)
    b, _ = train(small)
    assert a.step == b.step == 2 * (230 // 32)
    for (name, wa), wb in zip(weights(a.raw_model).items(), weights(b.raw_model).values()):
        torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-6, msg=name)


def test_a_micro_batchs_share_is_of_the_items_over_all_ranks_however_few_they_are(tmp_path, monkeypatch):
    """One item counted on this rank and none on the other is the whole step's, which DDP's mean over two ranks
    halves: its loss is scaled by 2, not by 1 (a count clamped to one item per rank)."""
    config = tiny_config(tmp_path)
    engine = TrainingEngine(config, PartlyIgnoredRegressionTask(config))
    monkeypatch.setattr(engine_module.D, "mean_tensor_over_ranks", lambda total: total / 2)  # the other has none
    one_kept = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]])
    scales, counts = engine._loss_scales([(one_kept, torch.zeros(2, 1))])
    assert [c.item() for c in counts] == [1.0] and [s.item() for s in scales] == [2.0]
    scales, counts = engine._loss_scales([(-one_kept.abs(), torch.zeros(2, 1))])  # none anywhere: no weight
    assert [c.item() for c in counts] == [0.0] and [s.item() for s in scales] == [0.0]


@pytest.mark.parametrize("keep_best, minutes", [(1, 30.0), (0, 30.0), (1, 0.0)])
def test_a_validation_that_beats_the_best_is_saved_where_checkpoints_are_kept_for_their_score(tmp_path, keep_best,
                                                                                            minutes):
    # a rate high enough that the validations go up and down; no saves by steps, none due by the clock (with
    # minutes 0 none at all before the end: no save for a score either)
    config = tiny_config(tmp_path, training={"eval_every_steps": 2}, data={"num_samples": 256},
                         optimizer={"lr": 0.5, "scheduler": "constant"},
                         checkpoint={"keep_best": keep_best, "every_n_minutes": minutes})
    records = []
    engine, metrics = train(config, callbacks=[Recorded(records)])
    scores = {r["step"]: r["val_loss"] for r in records if r["split"] == "val"}
    best = min(scores, key=scores.get)
    assert best != engine.step and metrics["best_val_loss"] == scores[best]  # the last is not the best
    saved = sorted(p.name for p in (tmp_path / "run/checkpoints").glob("step_*"))
    if keep_best and minutes:  # the best's weights are kept, and named
        assert f"step_{best:08d}" in saved
        assert (tmp_path / "run/checkpoints/best").read_text().strip() == f"step_{best:08d}"
    else:  # checkpoints kept for being new only, or no saves before the end: the schedule's alone, the last
        assert saved == [f"step_{engine.step:08d}"]


def test_the_validation_that_closes_an_epoch_carries_the_epoch_it_closes_whatever_the_cadence(tmp_path):
    # 14 steps an epoch: eval_every_steps 7 lands on each epoch's last step, whose validation is the epoch's own
    records = []
    engine, _ = train(tiny_config(tmp_path, training={"eval_every_steps": 7}), callbacks=[Recorded(records)])
    assert engine.step == 28
    assert [(r["step"], r["epoch"]) for r in records if r["split"] == "val"] == \
        [(7, 0), (14, 1), (21, 1), (28, 2)]  # once each, as a run without eval_every_steps labels them


class Recorded(Callback):
    def __init__(self, records):
        self.records = records

    def on_log(self, engine, record):
        self.records.append(record)


class WeightsAtStart(Callback):
    """The weights, the optimizer's state and the step a run starts from, as on_train_start sees them."""

    def on_train_start(self, engine):
        self.weights, self.step = weights(engine.raw_model), engine.step
        self.optimizer_state = len(engine.optimizer.state)


def test_init_from_starts_a_new_run_on_a_checkpoints_weights_and_nothing_else_of_it(tmp_path):
    source, _ = train(tiny_config(tmp_path / "a", training={"max_steps": 6}))
    lrs = {}
    for name, init_from in (("fresh", ""), ("tuned", str(tmp_path / "a" / "run"))):  # a run's folder: its newest
        start, records = WeightsAtStart(), []
        config = tiny_config(tmp_path / name, training={"max_steps": 4}, optimizer={"warmup_steps": 2},
                             logging={"log_every_steps": 1}, checkpoint={"init_from": init_from})
        train(config, callbacks=[start, LRSchedulerCallback(), Recorded(records)])
        lrs[name] = [r["lr"] for r in records if r["split"] == "train"]
        assert start.step == 0 and start.optimizer_state == 0
    final = weights(source.raw_model)
    assert all(torch.equal(start.weights[k], final[k]) for k in final)  # the tuned run's, from the source's end
    assert lrs["tuned"] == lrs["fresh"] and lrs["tuned"][0] < lrs["tuned"][1]  # its own warm-up, from step 1
    # stopped and continued, the run resumes from its own checkpoint, not from the weights it started with
    resumed = StartedAt()
    config = tiny_config(tmp_path / "tuned", training={"max_steps": 6}, optimizer={"warmup_steps": 2},
                         checkpoint={"init_from": str(tmp_path / "a" / "run"), "resume": "auto"})
    train(config, callbacks=[resumed])
    assert resumed.step == 4


def test_init_from_a_checkpoint_of_another_model_or_beside_a_resume_path_is_one_line(tmp_path):
    train(tiny_config(tmp_path / "a", training={"max_steps": 2}))
    with pytest.raises(CheckpointError, match=r"^checkpoint.init_from: the weights in .*step_00000002 belong to a "
                                              r"different model than this run's: size mismatch for 0.weight"):
        train(tiny_config(tmp_path / "b", model={"n_embd": 8}, checkpoint={"init_from": str(tmp_path / "a/run")}))
    with pytest.raises(CheckpointError, match=r"^checkpoint.init_from: checkpoint path .*nowhere does not exist$"):
        train(tiny_config(tmp_path / "c", checkpoint={"init_from": str(tmp_path / "nowhere")}))
    with pytest.raises(ConfigError, match=r"checkpoint.init_from.*no checkpoint.resume path beside it"):
        tiny_config(tmp_path / "d", checkpoint={"init_from": str(tmp_path / "a/run"), "resume": str(tmp_path / "a/run")})
    assert not (tmp_path / "b" / "run").exists() and not (tmp_path / "c" / "run").exists()


def test_a_callback_given_the_state_of_another_class_of_its_name_is_one_line(tmp_path):
    class Counter(Callback):  # a user's, in one module
        def state_dict(self):
            return {"a": 1}

    first = Counter

    class Counter(Callback):  # noqa: F811 - another of the same name, in another module, on the resume
        def state_dict(self):
            return {"b": 2}

        def load_state_dict(self, state):
            self.b = state["b"]

    train(tiny_config(tmp_path, training={"max_steps": 2}), callbacks=[first()])
    with pytest.raises(CheckpointError, match=r"^callback Counter cannot take the state .*step_00000002 holds under "
                                              r"its class name \(KeyError: 'b'\): one saved by another version"):
        train(tiny_config(tmp_path, training={"max_steps": 4}, checkpoint={"resume": "auto"}), callbacks=[Counter()])


def test_a_run_started_from_weights_and_killed_before_its_first_save_is_not_continued_from_others(tmp_path):
    source = str(tmp_path / "a" / "run")
    final = weights(train(tiny_config(tmp_path / "a", training={"max_steps": 2}))[0].raw_model)
    train(tiny_config(tmp_path / "b", training={"max_steps": 2}, checkpoint={"init_from": source}))
    shutil.rmtree(tmp_path / "b" / "run" / "checkpoints")  # as if killed before its first save
    (tmp_path / "b" / "run" / "summary.json").unlink()
    with pytest.raises(UsageError, match=r"holds a run with other settings \(checkpoint.init_from\) and no checkpoint"):
        train(tiny_config(tmp_path / "b", training={"max_steps": 2}, checkpoint={"resume": "auto"}))
    start = WeightsAtStart()
    train(tiny_config(tmp_path / "b", training={"max_steps": 2}, checkpoint={"resume": "auto", "init_from": source}),
          callbacks=[start])
    assert all(torch.equal(start.weights[k], final[k]) for k in final)  # started from the source's weights again


class LogsOnOddSteps(Callback):
    """engine.log on steps that log no record: the value waits for the next one, across a save."""

    def on_step_end(self, engine):
        if engine.step % 2:
            engine.log({"odd_step": engine.step})


@pytest.mark.parametrize("crash_step", [9, 14, 20])
def test_resume_after_a_crash_matches_the_uninterrupted_run_bit_for_bit(tmp_path, crash_step):
    # saves every 5 steps (and none for a validation's score), logs every 2: the saves at 5 and 15 hold a log
    # window still open, and a logged value waiting for the next record
    settings = {"training": {"epochs": 3, "eval_every_steps": 4}, "checkpoint": {"every_n_steps": 5, "keep_best": 0},
                "model": {"dropout": 0.1}}
    ref = tiny_config(tmp_path / "ref", **settings)
    reference, _ = train(ref, callbacks=[*default_callbacks(ref), LogsOnOddSteps()])
    crashed = tiny_config(tmp_path / "crash", **settings)
    with pytest.raises(CallbackError, match="CrashAt.on_step_end failed: RuntimeError: simulated crash"):
        train(crashed, callbacks=[CrashAt(crash_step), *default_callbacks(crashed), LogsOnOddSteps()])
    resumed_config = tiny_config(tmp_path / "crash", checkpoint={"every_n_steps": 5, "keep_best": 0, "resume": "auto"},
                                 **{k: v for k, v in settings.items() if k != "checkpoint"})
    started = StartedAt()
    resumed, _ = train(resumed_config, callbacks=[*default_callbacks(resumed_config), LogsOnOddSteps(), started])
    assert started.step == (crash_step - 1) // 5 * 5 and resumed.step == reference.step  # the last save's step
    for (name, w_ref), w in zip(weights(reference.raw_model).items(), weights(resumed.raw_model).values()):
        assert torch.equal(w_ref, w), name

    def logged(run):  # the last record of each split and step: a resumed run logs again the steps after its save
        records = [json.loads(line) for line in (tmp_path / run / "run/metrics.jsonl").read_text().splitlines()]
        timings = ("samples_per_s", "tokens_per_s", "step_time_ms", "data_wait_pct", "peak_mem_mb", "mfu")
        return {(r["split"], r["step"]): {k: v for k, v in r.items() if k not in timings} for r in records}

    assert logged("crash") == logged("ref")  # to the bit: the open log window was saved entry by entry


class HeldSave(Callback):
    """Holds the writing of checkpoint ``step``, when it runs on a thread of its own, until training has gone two
    steps past it; records the engine's step each time that save writes a file."""

    def __init__(self, monkeypatch, step):
        self.step, self.release, self.steps_at_writes = step, threading.Event(), []
        write = checkpoint_module._save_torch

        def held(state, path):
            if path.parent.name == f".staging-step_{step:08d}" and threading.current_thread() is not threading.main_thread():
                assert self.release.wait(timeout=60), "training did not go on while the checkpoint was written"
                self.steps_at_writes.append(self.engine.step)
            write(state, path)
        monkeypatch.setattr(checkpoint_module, "_save_torch", held)

    def on_step_end(self, engine):
        self.engine = engine
        if engine.step == self.step + 2:
            self.release.set()


def test_a_checkpoint_saved_in_the_background_holds_its_steps_state_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    # the save at step 5 writes its files while steps 6 and 7 change the live weights, moments and log window:
    # what it wrote must be the state of step 5, copied when it was taken, for the resume to end where a run
    # that never stopped (and saved in the loop) ends
    settings = {"training": {"epochs": 3, "eval_every_steps": 4}, "model": {"dropout": 0.1}}
    ref = tiny_config(tmp_path / "ref", checkpoint={"every_n_steps": 5, "keep_best": 0}, **settings)
    reference, _ = train(ref, callbacks=[*default_callbacks(ref), LogsOnOddSteps()])
    crashed = tiny_config(tmp_path / "crash", checkpoint={"every_n_steps": 5, "keep_best": 0, "async_save": True},
                          **settings)
    held = HeldSave(monkeypatch, 5)
    with pytest.raises(CallbackError, match="simulated crash"):
        train(crashed, callbacks=[held, CrashAt(9), *default_callbacks(crashed), LogsOnOddSteps()])
    # the shared state and rank 0's, written two steps (or more) after the save began
    assert len(held.steps_at_writes) == 2 and min(held.steps_at_writes) >= 7
    resumed_config = tiny_config(tmp_path / "crash", checkpoint={"every_n_steps": 5, "keep_best": 0, "resume": "auto",
                                                                 "async_save": True}, **settings)
    started = StartedAt()
    resumed, _ = train(resumed_config, callbacks=[*default_callbacks(resumed_config), LogsOnOddSteps(), started])
    assert started.step == 5 and resumed.step == reference.step
    for (name, w_ref), w in zip(weights(reference.raw_model).items(), weights(resumed.raw_model).values()):
        assert torch.equal(w_ref, w), name
    records = {run: [json.loads(line) for line in (tmp_path / run / "run/metrics.jsonl").read_text().splitlines()]
               for run in ("ref", "crash")}
    timings = ("samples_per_s", "step_time_ms", "data_wait_pct", "peak_mem_mb")
    assert [{k: v for k, v in r.items() if k not in timings} for r in records["crash"]] == \
        [{k: v for k, v in r.items() if k not in timings} for r in records["ref"]]
    # the run's end waited for its last save: the checkpoint is whole, and named latest
    last = tmp_path / "crash/run/checkpoints" / f"step_{reference.step:08d}"
    assert checkpoint_module.verify(last) is None
    assert (tmp_path / "crash/run/checkpoints/latest").read_text().strip() == last.name


def test_a_run_saving_in_the_background_writes_its_summary_once_its_last_checkpoint_is_in_place(tmp_path, monkeypatch):
    write, summary, latest_at_summary = checkpoint_module._save_torch, TrainingEngine._summary, []

    def slow_last_save(state, path):
        if path.parent.name == ".staging-step_00000012" and threading.current_thread() is not threading.main_thread():
            time.sleep(0.5)
        write(state, path)

    def summarised(self, *args, **kwargs):
        latest_at_summary.append((self.checkpoints.directory / "latest").read_text().strip())
        return summary(self, *args, **kwargs)
    monkeypatch.setattr(checkpoint_module, "_save_torch", slow_last_save)
    monkeypatch.setattr(TrainingEngine, "_summary", summarised)
    train(tiny_config(tmp_path, training={"max_steps": 12}, checkpoint={"every_n_steps": 5, "async_save": True}))
    assert latest_at_summary == ["step_00000012"]


def test_a_checkpoint_that_fails_in_the_background_fails_the_run_at_the_next_save_keeping_the_last_good(
        tmp_path, monkeypatch):
    write = checkpoint_module._save_torch

    def full_disk_at_step_10(state, path):
        if path.parent.name == ".staging-step_00000010":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(state, path)
    monkeypatch.setattr(checkpoint_module, "_save_torch", full_disk_at_step_10)
    config = tiny_config(tmp_path, training={"max_steps": 20},
                         checkpoint={"every_n_steps": 5, "keep_best": 0, "async_save": True})
    steps = []

    class Steps(Callback):
        def on_step_end(self, engine):
            steps.append(engine.step)
    with pytest.raises(CheckpointError, match=r"^checkpoint step_00000010 not saved \(writing failed on rank 0: "
                                              r"\[Errno 28\] No space left on device\)$"):
        train(config, callbacks=[Steps()])
    assert steps[-1] == 15  # raised where the next save waited for it
    checkpoints = tmp_path / "run/checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000005"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000005"]


def test_a_run_failing_while_its_background_save_fails_raises_its_own_error_and_warns_of_the_save(
        tmp_path, monkeypatch):
    def full_disk(state, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(checkpoint_module, "_save_torch", full_disk)
    config = tiny_config(tmp_path, checkpoint={"every_n_steps": 5, "keep_best": 0, "async_save": True})
    with pytest.warns(UserWarning, match=r"^the checkpoint saved in the background failed too: checkpoint "
                                         r"step_00000005 not saved \(writing failed on rank 0: \[Errno 28\] No "
                                         r"space left on device\)$"):
        with pytest.raises(CallbackError, match="simulated crash"):
            train(config, callbacks=[CrashAt(7)])
    assert not (tmp_path / "run/checkpoints/latest").exists()


def saved_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step_")) for p in (run_dir / "checkpoints").glob("step_*"))


def train_a_minute_per_step(config, monkeypatch, callbacks=()):
    """train(), with the engine's clock (time.monotonic, which every_n_minutes reads) at one minute a step."""
    engine = TrainingEngine(config, RegressionTask(config), 0, 1, callbacks=list(callbacks))
    clock = SimpleNamespace(perf_counter=time.perf_counter, monotonic=lambda: 60.0 * engine.step)
    monkeypatch.setattr(engine_module, "time", clock)
    try:
        return engine, engine.train()
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("minutes, saved", [(2.5, [3, 6, 9, 10]), (0, [10])])
def test_a_save_comes_at_the_first_step_every_n_minutes_after_the_last(tmp_path, monkeypatch, minutes, saved):
    config = tiny_config(tmp_path, training={"max_steps": 10}, checkpoint={"every_n_minutes": minutes, "keep_last": 20})
    train_a_minute_per_step(config, monkeypatch)
    assert saved_steps(tmp_path / "run") == saved  # 10: the end of training


def test_a_run_killed_without_warning_resumes_from_its_last_save_by_the_clock(tmp_path, monkeypatch):
    # every_n_steps: 0, the default; and no save for a validation's score
    settings = {"training": {"epochs": 3}, "checkpoint": {"every_n_minutes": 4, "keep_best": 0}}
    reference, _ = train(tiny_config(tmp_path / "ref", **settings))
    with pytest.raises(CallbackError, match="simulated crash"):
        train_a_minute_per_step(tiny_config(tmp_path / "crash", **settings), monkeypatch, callbacks=[CrashAt(18)])
    assert saved_steps(tmp_path / "crash/run") == [8, 12, 16]  # the last three (keep_last): 4 was pruned
    started = StartedAt()
    resumed, _ = train(tiny_config(tmp_path / "crash", training={"epochs": 3},
                                   checkpoint={"resume": "auto", "keep_best": 0}), callbacks=[started])
    assert started.step == 16 and resumed.step == reference.step
    assert all(torch.equal(a, b) for a, b in zip(weights(reference.raw_model).values(), weights(resumed.raw_model).values()))


class Ticks(Callback):
    """Counts the steps this process took: a clock for time.monotonic that reads one minute a step."""

    steps = 0

    def on_step_end(self, engine):
        self.steps += 1

    def minutes(self) -> float:
        return 60.0 * self.steps


def test_a_run_stopped_at_its_time_limit_goes_on_from_there_to_the_weights_of_a_run_never_stopped(
        tmp_path, monkeypatch):
    """A job's time limit: each process trains 3.5 minutes (4 steps of one), validates, saves and stops; the same
    command then goes on from there. The stop is not held in the checkpoint, as request_stop's is."""
    reference, _ = train(tiny_config(tmp_path / "ref", training={"epochs": 3}))
    config = tiny_config(tmp_path / "timed", training={"epochs": 3, "max_minutes": 3.5},
                         checkpoint={"resume": "auto"})
    stops = []
    for _ in range(20):
        ticks = Ticks()
        engine = TrainingEngine(config, RegressionTask(config), 0, 1, callbacks=[MetricsLogger(), ticks])
        monkeypatch.setattr(engine_module, "time", SimpleNamespace(perf_counter=time.perf_counter,
                                                                   monotonic=ticks.minutes))
        metrics = engine.train()
        monkeypatch.undo()
        stops.append((engine.step, metrics["stop_reason"]))
        if engine.step == reference.step:
            break
    assert stops[:2] == [(4, "reached training.max_minutes=3.5"), (8, "reached training.max_minutes=3.5")]
    assert stops[-1] == (42, "trained training.epochs=3") and len(stops) == 11
    records = [json.loads(line) for line in (tmp_path / "timed/run/metrics.jsonl").read_text().splitlines()]
    assert {4, 8, 40} <= {r["step"] for r in records if r["split"] == "val"}  # validated at each stop
    assert all(torch.equal(a, b) for a, b in zip(weights(reference.raw_model).values(), weights(engine.raw_model).values()))


def test_a_run_whose_clock_passes_its_limit_at_its_last_step_has_finished(tmp_path, monkeypatch):
    ticks = Ticks()
    config = tiny_config(tmp_path, training={"epochs": 1, "max_minutes": 13.5})  # 14 steps of a minute
    engine = TrainingEngine(config, RegressionTask(config), 0, 1, callbacks=[ticks])
    monkeypatch.setattr(engine_module, "time", SimpleNamespace(perf_counter=time.perf_counter, monotonic=ticks.minutes))
    assert engine.train()["stop_reason"] == "trained training.epochs=1" and engine.step == 14


class StopAt3(Callback):
    def on_step_end(self, engine):
        if engine.step == 3 and engine.rank == 0:
            engine.request_stop("the target was reached")
        if engine.step == 3 and engine.rank == 1:
            engine._deadline = 0.0  # this rank's clock passes its limit at the same step


def stop_reason_worker(rank: int, directory: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        config = tiny_config(Path(directory), training={"max_steps": 6, "max_minutes": 1000})
        engine = TrainingEngine(config, RegressionTask(config), rank, 2, callbacks=[StopAt3()])
        assert engine.train()["stop_reason"] == "the target was reached"  # on both ranks: the asked-for stop
    finally:
        dist.destroy_process_group()


def test_every_rank_gives_one_stop_reason_an_asked_for_stop_before_a_ranks_clock(tmp_path):
    """Its exit code follows the reason: a rank out of time beside one whose stop is held would tell a job to go
    on with a run that has finished."""
    spawn(stop_reason_worker, str(tmp_path), free_port())


def clock_save_worker(rank: int, directory: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        config = tiny_config(Path(directory), training={"max_steps": 6},
                             checkpoint={"every_n_minutes": 1, "keep_last": 20})
        engine = TrainingEngine(config, RegressionTask(config), rank, 2)
        # only rank 1's clock passes the minute, at step 4: a save there alone would leave rank 0 behind
        minutes = (lambda: 60.0 if engine.step >= 4 else 0.0) if rank == 1 else (lambda: 0.0)
        engine_module.time = SimpleNamespace(perf_counter=time.perf_counter, monotonic=minutes)
        engine.train()
    finally:
        dist.destroy_process_group()


def test_a_save_one_ranks_clock_calls_for_is_made_by_every_rank(tmp_path):
    spawn(clock_save_worker, str(tmp_path), free_port())
    assert saved_steps(tmp_path / "run") == [4, 6]
    assert sorted(p.name for p in (tmp_path / "run/checkpoints/step_00000004").glob("rank_*.pt")) == \
        ["rank_00000.pt", "rank_00001.pt"]


def damage_in_rank_1s_share(checkpoint: Path, rank: int) -> str:
    """Zero a file of ``checkpoint`` that rank 1 hashes when the ranks share the check out, its size kept (not
    state.pt, which every rank loads), written by rank 1 between barriers of two ranks; its name."""
    files = json.loads((checkpoint / "manifest.json").read_text())["files"]
    name, size = [f for f in checkpoint_module._share([(n, e["size"]) for n, e in files.items()], 1, 2)
                  if f[0] != "state.pt"][0]
    dist.barrier()
    if rank == 1:
        (checkpoint / name).write_bytes(bytes(size))
    dist.barrier()
    return name


def lagging_listing_worker(rank: int, directory: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        config = tiny_config(Path(directory), training={"max_steps": 6}, checkpoint={"every_n_steps": 2})
        TrainingEngine(config, RegressionTask(config), rank, 2).train()
        if rank == 1:  # this rank's view of the folder lags: no checkpoint in it yet
            checkpoint_module._checkpoints = lambda directory: []
        config = dataclasses.replace(config, training=dataclasses.replace(config.training, max_steps=8),
                                     checkpoint=dataclasses.replace(config.checkpoint, resume="auto"))
        engine = TrainingEngine(config, RegressionTask(config), rank, 2)
        hashed, sha256 = [], checkpoint_module._sha256
        checkpoint_module._sha256 = lambda path, sync=False: hashed.append(path.name) or sha256(path, sync)
        engine.setup()
        at_resume = list(hashed)  # those of the resume above
        # and a rank that cannot see the checkpoint rank 0 found: every rank stops with its one line
        verify = engine_module.verify
        if rank == 1:
            engine_module.verify = lambda path, hashes=True: "state.pt is missing"
        try:
            TrainingEngine(config, RegressionTask(config), rank, 2).setup()
            refused = ""
        except UsageError as e:
            refused = str(e)
        engine_module.verify = verify
        # a file of step 6 that rank 1 hashes, damaged (its size kept): every rank goes on from step 4
        damaged = damage_in_rank_1s_share(Path(directory, "run/checkpoints/step_00000006"), rank)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            past_damage = TrainingEngine(config, RegressionTask(config), rank, 2)
            past_damage.setup()
        skipped = [str(w.message) for w in said if "skipping" in str(w.message)]
        Path(directory, f"resumed_rank{rank}").write_text(
            json.dumps([engine.step, at_resume, refused, past_damage.step, skipped, damaged]))
    finally:
        dist.destroy_process_group()


def test_every_rank_resumes_the_checkpoint_rank_0_found_and_checked_though_its_own_view_of_the_folder_lags(tmp_path):
    spawn(lagging_listing_worker, str(tmp_path), free_port(), timeout=90)
    (step0, hashed0, refused0, past0, skipped0, damaged), (step1, hashed1, refused1, past1, skipped1, _) = \
        (json.loads((tmp_path / f"resumed_rank{r}").read_text()) for r in range(2))
    assert step0 == step1 == 6  # rank 1 did not start over
    assert refused0 == refused1 == f"checkpoint {tmp_path / 'run/checkpoints/step_00000006'} is not valid on rank 1: " \
        "state.pt is missing"
    # the ranks read the files of the checkpoint between them to check their hashes, each file once (each rank
    # read all of them, before; then rank 0 alone)
    files = json.loads((tmp_path / "run/checkpoints/dropped/step_00000006/manifest.json").read_text())["files"]
    assert sorted(hashed0 + hashed1) == sorted(Path(name).name for name in files) and hashed0 and hashed1
    # the damage that rank 1 found passed over on both (step 6 then set aside): rank 0 said so, once
    assert past0 == past1 == 4
    assert len(skipped0) == 1 and f"{damaged} does not match its sha256 checksum" in skipped0[0] and skipped1 == []


def init_from_worker(rank: int, directory: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        source = tiny_config(Path(directory, "a"), training={"max_steps": 2}, checkpoint={"every_n_steps": 1})
        TrainingEngine(source, RegressionTask(source), rank, 2).train()
        checkpoints = Path(directory, "a/run/checkpoints")
        hashed, sha256, stale = [], checkpoint_module._sha256, [False]

        def counted(path: Path, sync: bool = False) -> str:
            hashed.append(path.name)
            return "0" * 64 if stale[0] and path.parent.name == "step_00000002" else sha256(path, sync)
        checkpoint_module._sha256 = counted
        starts = {}
        for name in ("b", "stale", "c"):
            stale[0] = name == "stale" and rank == 1  # rank 1's view of step 2's files differs from rank 0's
            if name == "c":  # a file of step 2 that rank 1 hashes, damaged (its size kept): step 1's weights
                damaged = damage_in_rank_1s_share(checkpoints / "step_00000002", rank)
            config = tiny_config(Path(directory, name), checkpoint={"init_from": str(Path(directory, "a/run"))})
            engine = TrainingEngine(config, RegressionTask(config), rank, 2)
            hashed.clear()
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                engine.setup()
            at_start = engine.raw_model.state_dict()
            started_from = [step for step in (1, 2) if all(torch.equal(at_start[k], v) for k, v in
                            checkpoint_module.model_weights(checkpoints / f"step_{step:08d}").items())]
            starts[name] = [started_from, list(hashed), [str(w.message) for w in said if "skipping" in str(w.message)]]
        Path(directory, f"started_rank{rank}").write_text(json.dumps([starts, damaged]))
    finally:
        dist.destroy_process_group()


def test_every_rank_starts_from_the_init_from_checkpoint_rank_0_picked_whose_files_the_ranks_hashed_between_them(
        tmp_path):
    spawn(init_from_worker, str(tmp_path), free_port(), timeout=90)
    (starts0, damaged), (starts1, _) = (json.loads((tmp_path / f"started_rank{r}").read_text()) for r in range(2))
    assert starts0["b"][0] == starts1["b"][0] == [2]  # the run's newest checkpoint
    # each file of it hashed once, by one rank or the other (rank 0 hashed them all, before, while rank 1 waited)
    files = json.loads((tmp_path / "a/run/checkpoints/step_00000002/manifest.json").read_text())["files"]
    assert sorted(starts0["b"][1] + starts1["b"][1]) == sorted(Path(name).name for name in files)
    assert starts0["b"][1] and starts1["b"][1]
    # files that rank 1 alone reads otherwise than saved (a lagging view of a shared folder, whose bytes it would
    # load) pass step 2 over too
    assert starts0["stale"][0] == starts1["stale"][0] == [1] and len(starts0["stale"][2]) == 1
    # the damage that rank 1 found passes step 2 over on both ranks: rank 0 says so, once
    assert starts0["c"][0] == starts1["c"][0] == [1]
    (skipped,), none = starts0["c"][2], starts1["c"][2]
    assert f"{damaged} does not match its sha256 checksum" in skipped and none == []


def test_a_run_started_in_the_folder_of_a_run_still_training_is_refused(tmp_path):
    train(tiny_config(tmp_path, training={"max_steps": 3}))
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    holder = hold(tmp_path / "run")  # the processes of a job requeued while they still ran
    try:
        with pytest.raises(UsageError, match=rf"run is in use by process {holder.pid} on .+: let it end, or stop it"):
            train(tiny_config(tmp_path, training={"max_steps": 6}, checkpoint={"resume": "auto"}))
        assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != ".llm.lock"} == before
    finally:
        holder.kill()
        holder.wait()
    engine, _ = train(tiny_config(tmp_path, training={"max_steps": 6}, checkpoint={"resume": "auto"}))
    assert engine.step == 6 and not (tmp_path / "run/.llm.lock").exists()


def test_a_run_given_the_checkpoint_folder_of_a_run_still_training_is_refused_before_its_first_save(tmp_path):
    """Two runs of a sweep given one checkpoint.dir: before the first one's first save, nothing there told the
    second that the folder was taken, and each went on to write over and prune the other's checkpoints."""
    shared = tmp_path / "shared"

    class StartAnother(Callback):
        def on_train_start(self, engine):
            self.other = train_cli("--task", "regression", "--training-max-steps", "2", "--checkpoint-dir",
                                   str(shared), "--logging-log-dir", str(tmp_path / "other"), cwd=tmp_path)

    another = StartAnother()
    engine, _ = train(tiny_config(tmp_path, training={"max_steps": 4}, checkpoint={"dir": str(shared)}),
                      callbacks=[another])
    assert another.other.returncode == 2 and another.other.stderr.count("\n") == 1, another.other.stderr
    assert f"error: checkpoint.dir: {shared} is in use by process {os.getpid()} on " in another.other.stderr
    assert not (tmp_path / "other").exists()  # refused before it wrote anything
    assert sorted(p.name for p in shared.iterdir()) == ["best", "latest", "step_00000004"] and engine.step == 4


def test_a_run_in_a_held_folder_is_refused_before_it_prepares_data_or_reads_a_checkpoint(tmp_path, monkeypatch):
    def find_start(*args):
        raise AssertionError("looked for a checkpoint to resume from in a folder another process holds")

    class Watched(SyntheticDataModule):
        prepared = 0

        def prepare_data(self):
            Watched.prepared += 1

    config = tiny_config(tmp_path, training={"max_steps": 3})
    train(config)
    holder = hold(tmp_path / "run")
    try:
        again = tiny_config(tmp_path, training={"max_steps": 6}, checkpoint={"resume": "auto"})
        engine = TrainingEngine(again, RegressionTask(again), data_module=Watched(again))
        monkeypatch.setattr(resume, "find_start", find_start)
        with pytest.raises(UsageError, match="in use by process"):
            engine.train()
        assert Watched.prepared == 0
    finally:
        holder.kill()
        holder.wait()


def test_a_run_that_fails_in_setup_lets_go_of_its_folder_and_leaves_no_trace(tmp_path):
    refused = tiny_config(tmp_path, training={"grad_accum_steps": 100})
    with pytest.raises(UsageError, match="fewer than training.grad_accum_steps=100"):
        train(refused)
    assert not (tmp_path / "run").exists()
    train(tiny_config(tmp_path, training={"max_steps": 3}))
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(UsageError, match="fewer than training.grad_accum_steps=100"):
        train(tiny_config(tmp_path, training={"max_steps": 6, "grad_accum_steps": 100}, checkpoint={"resume": "auto"}))
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before  # no .llm.lock left


def test_a_run_stopped_in_a_callbacks_cleanup_still_lets_go_of_its_folder(tmp_path):
    class SlowUpload(Callback):
        def on_train_end(self, engine, metrics):
            raise KeyboardInterrupt  # Ctrl-C while a tracker uploads, after the engine's own handler is gone

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path, training={"max_steps": 2}), callbacks=[SlowUpload()])
    assert (tmp_path / "run/summary.json").exists() and not (tmp_path / "run/.llm.lock").exists()


def test_a_lock_file_left_by_a_killed_run_is_no_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run/.llm.lock").write_text("process 1 on elsewhere\n")  # its holder is gone: the kernel let go
    engine, _ = train(tiny_config(tmp_path, training={"max_steps": 2}))
    assert engine.step == 2 and not (tmp_path / "run/.llm.lock").exists()


def test_a_refused_run_leaves_a_lock_file_of_another_programs_alone(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run/notes.txt").write_text("mine\n")
    (tmp_path / "run/.lock").write_text("another tool's\n")
    with pytest.raises(UsageError, match="already holds a run"):
        train(tiny_config(tmp_path))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "notes.txt"]
    assert (tmp_path / "run/.lock").read_text() == "another tool's\n"


def test_a_run_that_died_before_its_first_save_starts_afresh_in_its_folder_and_another_run_is_refused(tmp_path):
    settings = {"training": {"max_steps": 4}, "checkpoint": {"every_n_steps": 100}}
    died = tiny_config(tmp_path, **settings)
    with pytest.raises(CallbackError, match="simulated crash"):  # after its first record, at step 2
        train(died, callbacks=[CrashAt(3), *default_callbacks(died)])
    assert (tmp_path / "run/config.yaml").exists() and not list((tmp_path / "run/checkpoints").glob("step_*"))
    again = tiny_config(tmp_path, **{**settings, "checkpoint": {"every_n_steps": 100, "resume": "auto"}})
    other = tiny_config(tmp_path, **{**settings, "checkpoint": {"every_n_steps": 100, "resume": "auto"}},
                        model={"n_embd": 8})
    with pytest.raises(UsageError, match=r"run holds a run with other settings \(model.n_embd\) and no checkpoint"):
        train(other)
    engine, _ = train(again, callbacks=default_callbacks(again))
    assert engine.step == 4


def test_time_in_validation_and_epoch_hooks_is_set_aside_from_training_time(tmp_path):
    class SlowHooks(Callback):  # a sample of text after each validation, a report at each epoch's end
        calls = 0

        def on_validation_end(self, engine, metrics):
            self.slow()

        def on_epoch_end(self, engine, metrics):
            self.slow()

        def slow(self):
            SlowHooks.calls += 1
            time.sleep(0.05)

    engine, _ = train(tiny_config(tmp_path, training={"epochs": 2, "eval_every_steps": 4}), callbacks=[SlowHooks()])
    assert SlowHooks.calls >= 6
    assert engine.aside_s >= 0.05 * SlowHooks.calls  # throughput figures leave all of it out


class CountsValidationBatches(RegressionTask):
    batches = 0

    def validation_step(self, batch, model, criterion):
        self.batches += 1
        return super().validation_step(batch, model, criterion)


def test_max_steps_and_eval_batches(tmp_path):
    recorder = Recorder()  # 64 validation samples: 4 batches of 16, of which eval_batches 1 scores one
    config = tiny_config(tmp_path, training={"max_steps": 5, "eval_batches": 1}, data={"num_samples": 640})
    engine = TrainingEngine(config, task := CountsValidationBatches(config), 0, 1, callbacks=[recorder])
    metrics = engine.train()
    assert engine.step == 5 and metrics["stop_reason"] == "reached max_steps=5"
    assert recorder.names().count("on_validation_end") == 1  # no full epoch: only the final validation
    assert task.batches == 1 + 1  # set-up's check of the task on the first batch, then the validation's one


def test_an_evaluation_that_ends_an_epoch_is_not_run_twice(tmp_path):
    recorder = Recorder()  # 14 steps an epoch, validation every 7: steps 7, 14, 21, 28 and no more
    train(tiny_config(tmp_path, training={"epochs": 2, "eval_every_steps": 7, "patience": 1}), callbacks=[recorder])
    validations = [metrics for name, metrics in recorder.calls if name == "on_validation_end"]
    epochs = [metrics for name, metrics in recorder.calls if name == "on_epoch_end"]
    assert len(validations) == 4 and len(epochs) == 2
    assert epochs[0]["val_loss"] == validations[1]["val_loss"] and epochs[1]["val_loss"] == validations[3]["val_loss"]


@pytest.mark.parametrize("plus", ["0", "1"])  # gradients NaN too, or finite
def test_nan_policy_stop_names_the_step_and_saves_nothing(tmp_path, monkeypatch, plus):
    monkeypatch.setenv("NAN_AT_STEP", "4")
    monkeypatch.setenv("NAN_PLUS", plus)
    config = tiny_config(tmp_path, checkpoint={"every_n_steps": 2})
    with pytest.raises(NonFiniteError, match=r"^non-finite loss at step 4 on rank\(s\) \[0\]: stopping"):
        train(config, task_cls=NaNRegressionTask)
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step_00000002"


@pytest.mark.filterwarnings("error")
def test_a_skipped_first_step_and_its_schedule_step_raise_no_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("NAN_AT_STEP", "1")
    engine, metrics = train(tiny_config(tmp_path, training={"nan_policy": "skip", "max_steps": 3}),
                            task_cls=NaNRegressionTask)
    assert metrics["skipped_steps"] == 1 and engine.scheduler.last_epoch == 3


class LossScaled(Callback):
    """The fp16 path on the CPU: a gradient scaler, which the engine turns on only for fp16 on CUDA."""

    def on_train_start(self, engine):
        engine.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)


class OverflowAt(RegressionTask):
    """A finite loss at step 3 whose scaled gradients overflow, as fp16 gradients do now and then."""

    calls, factor = 0, 1e36

    def train_step(self, batch, model, criterion):
        loss, metrics = super().train_step(batch, model, criterion)
        OverflowAt.calls += 1
        return (loss * OverflowAt.factor if OverflowAt.calls == 3 else loss), metrics


def test_with_a_loss_scaler_an_overflow_is_skipped_by_the_scaler_and_a_nan_loss_is_not(tmp_path, monkeypatch):
    OverflowAt.calls, OverflowAt.factor = 0, 1e36
    engine, metrics = train(tiny_config(tmp_path / "a", training={"max_steps": 5}), task_cls=OverflowAt,
                            callbacks=[LossScaled()])
    assert engine.step == 5 and metrics["skipped_steps"] == 0 and engine.scaler.get_scale() == 2.0**15
    assert {int(state["step"]) for state in engine.optimizer.state.values()} == {4}
    # gradients each finite, scaled and unscaled, whose norm overflows: no overflow of the scaler's, which keeps
    # its scale, but a step not taken all the same, which training.nan_policy counts or stops on
    OverflowAt.calls, OverflowAt.factor = 0, 1e30
    engine, metrics = train(tiny_config(tmp_path / "c", training={"max_steps": 5, "nan_policy": "skip"}),
                            task_cls=OverflowAt, callbacks=[LossScaled()])
    assert {int(state["step"]) for state in engine.optimizer.state.values()} == {4} and metrics["skipped_steps"] == 1
    assert engine.scaler.get_scale() == 2.0**16
    assert all(torch.isfinite(w).all() for w in weights(engine.raw_model).values())
    OverflowAt.calls = 0
    with pytest.raises(NonFiniteError, match=r"^non-finite gradient norm at step 3, every rank's loss finite: stopping"):
        train(tiny_config(tmp_path / "d", training={"max_steps": 5}), task_cls=OverflowAt, callbacks=[LossScaled()])
    monkeypatch.setenv("NAN_AT_STEP", "3")
    with pytest.raises(NonFiniteError, match=r"^non-finite loss at step 3 on rank\(s\) \[0\]"):
        train(tiny_config(tmp_path / "b", training={"max_steps": 5}), task_cls=NaNRegressionTask,
              callbacks=[LossScaled()])


def test_an_fp16_run_logs_its_loss_scale_and_counts_the_steps_the_scaler_skipped_across_a_resume(tmp_path):
    records = []

    class Records(Callback):
        def on_log(self, engine, record):
            records.append(record)

    OverflowAt.calls, OverflowAt.factor = 0, 1e36
    config = tiny_config(tmp_path, training={"max_steps": 4}, logging={"log_every_steps": 1})
    engine, metrics = train(config, task_cls=OverflowAt, callbacks=[LossScaled(), Records()])
    logged = {r["step"]: (r["loss_scale"], r["overflow_steps"]) for r in records if r["split"] == "train"}
    assert logged == {1: (2.0**16, 0), 2: (2.0**16, 0), 3: (2.0**15, 1), 4: (2.0**15, 1)}
    assert metrics["overflow_steps"] == 1 and metrics["skipped_steps"] == 0
    # the count goes on from the checkpoint: the resumed steps overflow none
    OverflowAt.calls, records[:] = 0, []
    config = tiny_config(tmp_path, training={"max_steps": 6}, logging={"log_every_steps": 1},
                         checkpoint={"resume": "auto"})
    engine, metrics = train(config, task_cls=OverflowAt, callbacks=[LossScaled(), Records()])
    assert engine.step == 6 and metrics["overflow_steps"] == 1
    assert [r["overflow_steps"] for r in records if r["split"] == "train"] == [1, 1]
    # no scaler, no such figures
    records[:] = []
    _, metrics = train(tiny_config(tmp_path / "fp32", training={"max_steps": 2}), callbacks=[Records()])
    assert "overflow_steps" not in metrics and not any("loss_scale" in r for r in records)


@pytest.mark.parametrize("plus", ["0", "1"])  # gradients NaN too, or finite: the step is skipped all the same
def test_nan_policy_skip_counts_the_skipped_step_and_leaves_it_out_of_the_means(tmp_path, monkeypatch, plus):
    monkeypatch.setenv("NAN_AT_STEP", "4")
    monkeypatch.setenv("NAN_PLUS", plus)
    records = []

    class Records(Callback):
        def on_log(self, engine, record):
            records.append(record)

    class KeepsLosses(NaNRegressionTask):
        losses = []

        def train_step(self, batch, model, criterion):
            loss, metrics = super().train_step(batch, model, criterion)
            self.losses.append(loss.item())
            return loss, metrics

    engine, metrics = train(tiny_config(tmp_path, training={"nan_policy": "skip"}, logging={"log_every_steps": 5}),
                            task_cls=KeepsLosses, callbacks=[Records()])
    assert metrics["skipped_steps"] == 1 and engine.step == 2 * (230 // 16)
    assert all(torch.isfinite(w).all() for w in weights(engine.raw_model).values())
    # the window and the epoch that held the skipped step average the steps taken: 1, 2, 3 and 5
    [window] = [r for r in records if r["split"] == "train" and r["step"] == 5]
    first = KeepsLosses.losses[:5]
    assert math.isnan(first[3]) and window["loss"] == pytest.approx(sum(first[:3] + first[4:]) / 4, rel=1e-12)
    assert math.isfinite(window["grad_norm"]) and window["skipped_steps"] == 1
    epochs = [r["train_loss"] for r in records if r["split"] == "epoch"]
    assert len(epochs) == 2 and all(map(math.isfinite, epochs)) and math.isfinite(metrics["train_loss"])
    # a window of the skipped step alone has no loss to average: NaN, not a number made up
    records.clear()
    train(tiny_config(tmp_path / "b", training={"nan_policy": "skip", "max_steps": 5}, logging={"log_every_steps": 1}),
          task_cls=NaNRegressionTask, callbacks=[Records(), MetricsLogger()])
    losses = {r["step"]: r["loss"] for r in records if r["split"] == "train"}
    assert math.isnan(losses.pop(4)) and all(map(math.isfinite, losses.values())) and len(losses) == 4
    # on disk it is null, which any JSON reader takes (NaN is not JSON: JavaScript's JSON.parse and jq refuse it)
    written = [strict_json(line) for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in written if r["split"] == "train" and r["step"] == 4] == [None]
    # and so does the last, off the logging schedule, when it is the run's last step
    records.clear()
    monkeypatch.setenv("NAN_AT_STEP", "5")
    train(tiny_config(tmp_path / "c", training={"nan_policy": "skip", "max_steps": 5}, logging={"log_every_steps": 2}),
          task_cls=NaNRegressionTask, callbacks=[Records()])
    last = [r for r in records if r["split"] == "train"][-1]
    assert last["step"] == 5 and math.isnan(last["loss"]) and last["skipped_steps"] == 1
    summary = strict_json((tmp_path / "c" / "run" / "summary.json").read_text())
    assert summary["train_loss"] is None and summary["skipped_steps"] == 1


def strict_json(text: str) -> Any:
    """``text`` read as a strict JSON reader reads it: NaN and Infinity refused."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("optimizer, on_device, plus", [("adamw", True, "0"), ("adamw", False, "0"),
                                                        ("muon", False, "0"), ("adamw", True, "1"),
                                                        ("adamw", False, "1")])
def test_a_skipped_step_leaves_the_weights_and_the_optimizer_as_they_were(tmp_path, monkeypatch, optimizer,
                                                                          on_device, plus):
    """On a GPU adamw is skipped on the device (the fused optimizer's found_inf), with no sync; here on the
    CPU too, for the test. On the CPU, and for muon anywhere, the host decides. Either way the run ends where
    the one that stopped before that step does."""
    monkeypatch.setenv("NAN_AT_STEP", "3")
    monkeypatch.setenv("NAN_PLUS", plus)  # a NaN loss whose gradients are finite: skipped too
    monkeypatch.setattr(nonfinite, "_skips_on_device",
                        lambda opt, device: on_device and opt._step_supports_amp_scaling)
    monkeypatch.setattr(nonfinite, "_read_now", lambda device: not on_device)  # the flag stays a tensor there
    runs = {}
    for steps in (2, 3):  # a constant schedule: the first two steps are the same in both runs
        config = tiny_config(tmp_path / str(steps), training={"nan_policy": "skip", "max_steps": steps},
                             model={"n_layer": 2}, optimizer={"name": optimizer, "scheduler": "constant"})
        runs[steps] = train(config, task_cls=NaNRegressionTask)
    (clean, _), (skipped, metrics) = runs[2], runs[3]
    assert metrics["skipped_steps"] == 1 and skipped.step == 3
    assert weights(clean.raw_model).keys() == weights(skipped.raw_model).keys()
    for name, value in weights(clean.raw_model).items():
        assert torch.equal(value, weights(skipped.raw_model)[name]), name
    # every group's state (muon's holds the inner AdamW's groups too): moments and step counts
    pairs = [(p, q) for g, h in zip(clean.optimizer.param_groups, skipped.optimizer.param_groups, strict=True)
             for p, q in zip(g["params"], h["params"], strict=True)]
    assert len(pairs) == len(list(clean.raw_model.parameters()))
    for p, q in pairs:
        mine, theirs = clean.optimizer.state[p], skipped.optimizer.state[q]
        assert mine.keys() == theirs.keys() and mine
        for key, value in mine.items():
            assert torch.equal(value, theirs[key]), key


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_first_step_skipped_on_the_device_leaves_the_optimizer_as_the_hosts_skip_does(tmp_path, monkeypatch,
                                                                                       optimizer):
    """Fused SGD made its momentum buffers (uninitialised memory, empty_like) at its first step, also one that
    found_inf skips, and the next step read them: build_optimizer makes them beforehand, as zeros."""
    monkeypatch.setenv("NAN_AT_STEP", "1")
    runs = []
    for on_device in (True, False):
        monkeypatch.setattr(nonfinite, "_skips_on_device",
                            lambda opt, device, on_device=on_device: on_device and opt._step_supports_amp_scaling)
        monkeypatch.setattr(nonfinite, "_read_now", lambda device, on_device=on_device: not on_device)
        config = tiny_config(tmp_path / str(on_device), training={"nan_policy": "skip", "max_steps": 3},
                             optimizer={"name": optimizer, "scheduler": "constant"})
        runs.append(train(config, task_cls=NaNRegressionTask)[0])
    device, host = runs
    assert device.optimizer.defaults.get("fused") and device.step_checks.skips_on_device  # the device's own skip was there
    for name, value in weights(host.raw_model).items():
        assert torch.equal(value, weights(device.raw_model)[name]), name
    for p, q in zip(host.optimizer.param_groups[0]["params"], device.optimizer.param_groups[0]["params"]):
        assert host.optimizer.state[p].keys() == device.optimizer.state[q].keys()
        for key, value in host.optimizer.state[p].items():
            assert torch.equal(value, device.optimizer.state[q][key]), key


def test_sgd_given_momentum_by_a_resume_skips_its_first_step_on_the_device_as_the_host_does(tmp_path, monkeypatch):
    """A run without momentum (beta1 0) saved no momentum buffers; resumed with beta1 0.9, its settings come back
    after the load that made the missing buffers for skipping on the device: fused SGD then made them from
    uninitialised memory at a skipped step, and the next step read them (1.8e31 seen in a weight)."""
    runs = []
    for on_device in (True, False):
        monkeypatch.setattr(nonfinite, "_skips_on_device",
                            lambda opt, device, on_device=on_device: on_device and opt._step_supports_amp_scaling)
        monkeypatch.setattr(nonfinite, "_read_now", lambda device, on_device=on_device: not on_device)
        sections = {"optimizer": {"name": "sgd", "beta1": 0.0, "scheduler": "constant"},
                    "training": {"nan_policy": "skip", "max_steps": 2}}
        monkeypatch.setenv("NAN_AT_STEP", "100")
        train(tiny_config(tmp_path / str(on_device), **sections), task_cls=NaNRegressionTask)
        monkeypatch.setenv("NAN_AT_STEP", "1")  # the resumed run's first step
        sections["optimizer"]["beta1"], sections["training"]["max_steps"] = 0.9, 5
        runs.append(train(tiny_config(tmp_path / str(on_device), **sections, checkpoint={"resume": "auto"}),
                          task_cls=NaNRegressionTask)[0])
    device, host = runs
    assert device.step_checks.skips_on_device and device.optimizer.param_groups[0]["momentum"] == 0.9
    for name, value in weights(host.raw_model).items():
        assert torch.equal(value, weights(device.raw_model)[name]), name


def test_whether_a_step_was_taken_is_read_during_the_next_step_not_its_own(tmp_path, monkeypatch):
    """On a GPU, reading a step's own flag would make the host wait for that step's work; read during the
    next step, after its backward is queued, the flag is long on the host and the GPU never idles."""
    events = []
    made, wait = nonfinite._HostCopy.__init__, nonfinite._HostCopy.wait

    def made_at(copy, tensor):
        made(copy, tensor)
        copy.step = len([e for e in events if e[0] == "made"]) + 1
        events.append(("made", copy.step))

    def read(copy):
        events.append(("read", copy.step))
        return wait(copy)

    class Ends(Callback):
        def on_step_end(self, engine):
            events.append(("end", engine.step))

    monkeypatch.setattr(nonfinite, "_read_now", lambda device: False)  # as on a GPU: the CPU reads at once
    monkeypatch.setattr(nonfinite._HostCopy, "__init__", made_at)
    monkeypatch.setattr(nonfinite._HostCopy, "wait", read)
    engine, _ = train(tiny_config(tmp_path, training={"max_steps": 6}, logging={"log_every_steps": 1000}),
                      callbacks=[Ends()])
    assert engine.step == 6 and sorted(e for e in events if e[0] == "read") == [("read", k) for k in range(1, 7)]
    for k in range(1, 7):
        assert events.index(("read", k)) > events.index(("end", k)), events
    for k in range(1, 6):  # and while the next step runs, not at its end
        assert events.index(("read", k)) < events.index(("end", k + 1)), events


def test_the_summary_rate_leaves_out_the_first_step_and_the_time_validating_and_saving(tmp_path, monkeypatch):
    now = [0.0]  # the engine's clock, which the run moves: 100 s compiling, 1 s a step, 10 s a validation batch
    monkeypatch.setattr(engine_module, "time", SimpleNamespace(perf_counter=lambda: now[0], monotonic=lambda: now[0]))

    class Clocked(RegressionTask):
        steps = 0

        def train_step(self, batch, model, criterion):
            Clocked.steps += 1
            now[0] += 100.0 if Clocked.steps == 1 else 1.0
            return super().train_step(batch, model, criterion)

        def validation_step(self, batch, model, criterion):
            now[0] += 10.0
            return super().validation_step(batch, model, criterion)

    class SlowStart(Callback):  # a tracker that takes its time to connect
        def on_train_start(self, engine):
            now[0] += 50.0

    config = tiny_config(tmp_path, training={"max_steps": 10, "eval_every_steps": 5},
                         checkpoint={"every_n_steps": 5})
    _, metrics = train(config, task_cls=Clocked, callbacks=[SlowStart()])
    assert metrics["elapsed_s"] > 50 + 100 + 9 + 10  # the wall clock holds it all: start, compiling, steps, validation
    assert metrics["samples_per_s"] == 16.0 and metrics["first_step_s"] == 100.0  # 16 samples a step


def test_a_callback_instance_used_again_gives_a_fresh_run_a_fresh_start(tmp_path):
    stopper = EarlyStopping(patience=1)  # made once in a notebook, passed to each run
    first, again = (train(tiny_config(tmp_path / name, training={"epochs": 4}), callbacks=[stopper])[1] for name in "ab")
    assert again["steps"] == first["steps"] and again["stop_reason"] == first["stop_reason"]


def test_engine_log_takes_tensors_and_numpy_numbers_and_refuses_the_rest_in_one_line(tmp_path):
    np = pytest.importorskip("numpy")

    class Extra(Callback):
        def __init__(self, value):
            self.value = value

        def on_validation_end(self, engine, metrics):
            engine.log({"a": torch.tensor(0.5), "b": np.float32(0.25), "c": np.int64(3), "d": self.value})

    train(tiny_config(tmp_path / "a"), callbacks=[Extra(1.5), MetricsLogger()])
    record = [json.loads(line) for line in (tmp_path / "a/run/metrics.jsonl").read_text().splitlines()][-2]
    assert record["split"] == "val" and (record["a"], record["b"], record["c"], record["d"]) == (0.5, 0.25, 3, 1.5)
    with pytest.raises(UsageError, match=r"^engine.log in on_validation_end: logged 'd' as a list, expected a number or a "
                                         r"one-element tensor$"):
        train(tiny_config(tmp_path / "b"), callbacks=[Extra([1.0])])


class PaddedValidation(SyntheticDataModule):
    """A validation loader over 2 ranks' shares, as a data module of its own would build it for 2 processes
    (the usage guide's signature: a DataLoader and its DistributedSampler)."""

    rank = 1

    def val_dataloader(self, rank, world_size):
        sampler = torch.utils.data.DistributedSampler(self.val_set, num_replicas=2, rank=self.rank, shuffle=False)
        return torch.utils.data.DataLoader(self.val_set, batch_size=8, sampler=sampler), sampler


class PaddedBatches(PaddedValidation):
    """The same sampler under a batch sampler of the data module's own, which the engine cannot reach into."""

    class Pairs:
        def __init__(self, sampler):
            self._of = sampler

        def __iter__(self):
            items = iter(self._of)
            return iter(lambda: list(itertools.islice(items, 2)), [])

        def __len__(self):
            return (len(self._of) + 1) // 2

    def val_dataloader(self, rank, world_size):
        sampler = torch.utils.data.DistributedSampler(self.val_set, num_replicas=2, rank=1, shuffle=False)
        return torch.utils.data.DataLoader(self.val_set, batch_sampler=self.Pairs(sampler)), sampler


def test_a_validation_sampler_that_repeats_items_validates_each_item_once(tmp_path):
    config = tiny_config(tmp_path / "odd", data={"num_samples": 113, "val_fraction": 0.1})  # 11: rank 1 repeats one
    engine = TrainingEngine(config, RegressionTask(config), data_module=PaddedValidation(config))
    engine.setup()
    assert list(engine.val_sampler) == [1, 3, 5, 7, 9] and len(engine.val_loader) == 1  # not [1, 3, 5, 7, 9, 0]
    assert sum(len(x) for x, _ in engine.val_loader) == 5
    config = tiny_config(tmp_path / "mine", data={"num_samples": 113, "val_fraction": 0.1})
    with pytest.raises(UsageError, match=r"^PaddedBatches.val_dataloader\(\): its DistributedSampler repeats 1 of "
                                         r"the 11 validation items to even out 2 ranks' shares, .* self.build_dataloader\(dataset, rank, world_size, "
                                         r"train=False\), whose sampler does not$"):
        TrainingEngine(config, RegressionTask(config), data_module=PaddedBatches(config)).setup()


def test_a_run_without_validation_data_trains_and_reports_no_validation(tmp_path, capsys):
    class NoValidation(SyntheticDataModule):
        def val_dataloader(self, rank, world_size):
            empty = torch.utils.data.TensorDataset(torch.zeros(0, 4), torch.zeros(0, 1))
            return self.build_dataloader(empty, rank, world_size, train=False)

    config = tiny_config(tmp_path, training={"epochs": 2, "eval_every_steps": 2})
    engine = TrainingEngine(config, RegressionTask(config), callbacks=default_callbacks(config),
                            data_module=NoValidation(config))
    metrics = engine.train()
    assert engine.epoch == 2 and "val_loss" not in metrics and math.isfinite(metrics["train_loss"])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "epoch"}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["best_val_loss"] is None


def test_a_non_finite_validation_loss_is_said_and_training_goes_on(tmp_path, capsys):
    class NaNValidation(SyntheticDataModule):
        def setup(self, stage):
            super().setup(stage)
            self.val_set.tensors[0][0, 0] = float("nan")

    config = tiny_config(tmp_path, training={"epochs": 2})
    engine = TrainingEngine(config, RegressionTask(config), data_module=NaNValidation(config))
    metrics = engine.train()
    assert engine.epoch == 2 and math.isnan(metrics["val_loss"]) and math.isfinite(metrics["train_loss"])
    out = capsys.readouterr().out
    for step in (engine.step // 2, engine.step):
        assert f"warning: val_loss is nan at step {step}: non-finite values in the validation data" in out


def test_a_failing_callback_is_named_and_the_others_still_clean_up(tmp_path):
    class Broken(Callback):
        def on_epoch_end(self, engine, metrics):
            raise ValueError("bad callback")

        def on_train_end(self, engine, metrics):
            raise OSError("its clean-up fails too")  # neither hides the first error nor stops the others' clean-up

    recorder = Recorder()
    with pytest.raises(CallbackError, match="Broken.on_epoch_end failed: ValueError: bad callback"):
        train(tiny_config(tmp_path), callbacks=[Broken(), recorder])
    assert recorder.names()[-1] == "on_train_end"


def test_a_clean_up_failing_after_a_good_run_is_raised_once_every_callback_cleaned_up(tmp_path):
    class Upload(Callback):
        def on_train_end(self, engine, metrics):
            raise ConnectionError("artifact store unreachable")

    config = tiny_config(tmp_path, training={"max_steps": 7}, logging={"log_every_steps": 5})
    with pytest.raises(CallbackError, match="Upload.on_train_end failed: ConnectionError: artifact store unreachable"):
        train(config, callbacks=[Upload(), TensorBoardLogger()])
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [5, 7]  # the writer was closed: the last record is in


def test_the_last_training_record_off_the_logging_schedule_has_the_loss_and_no_figure_of_another_step(tmp_path):
    config = tiny_config(tmp_path, training={"max_steps": 7}, logging={"log_every_steps": 3})
    train(config, callbacks=default_callbacks(config))
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [3, 6, 7]
    assert all("lr" in r and "samples_per_s" in r for r in train_records[:2])
    # the callbacks log on the schedule's steps: a value they logged for the run's last step would wait, in the
    # checkpoint, for the record after a resume, and be logged there again as that step's
    assert {"loss", "grad_norm"} <= train_records[2].keys() and not {"lr", "samples_per_s"} & train_records[2].keys()


def test_run_directory_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = tiny_config(tmp_path, logging={"log_dir": str(blocker / "run")})
    with pytest.raises(UsageError, match="cannot write to the run directory"):
        train(config)


def test_the_config_is_saved_as_yaml_that_loads_back_equal(tmp_path):
    config = tiny_config(tmp_path, optimizer={"lr": 0.003})
    train(config)
    saved = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    assert saved["optimizer"]["lr"] == 0.003 and saved["checkpoint"]["dir"] == ""  # filled in from log_dir again
    assert Config.from_yaml(tmp_path / "run/config.yaml") == config


def test_retention_keeps_the_newest_and_an_old_best_checkpoint(tmp_path):
    # mode max on a falling loss: the first validated checkpoint stays the best, however old it gets
    config = tiny_config(tmp_path, training={"epochs": 2, "eval_every_steps": 2},
                         checkpoint={"every_n_steps": 2, "keep_last": 2, "mode": "max"})
    engine, _ = train(config, callbacks=default_callbacks(config))
    kept = sorted(p.name for p in (tmp_path / "run/checkpoints").glob("step_*"))
    last = engine.step  # 28: saved every 2 steps, and at the end
    assert kept == ["step_00000002", f"step_{last - 2:08d}", f"step_{last:08d}"]
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == f"step_{last:08d}"
    # killed between its last save and the pruning after it: the finished run started again saves nothing,
    # and prunes as it loads
    shutil.copytree(tmp_path / "run/checkpoints/step_00000002", tmp_path / "run/checkpoints/step_00000004")
    again = tiny_config(tmp_path, training={"epochs": 2, "eval_every_steps": 2},
                        checkpoint={"every_n_steps": 2, "keep_last": 2, "mode": "max", "resume": "auto"})
    train(again, callbacks=default_callbacks(again))
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").glob("step_*")) == kept


def test_a_save_that_fails_mid_run_stops_training_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):

    from llm.training.core import checkpoint

    saves = []
    real_save = torch.save

    def disk_fills_up(obj, f, *args, **kwargs):
        if str(getattr(f, "name", f)).endswith("state.pt"):
            saves.append(f)
            if len(saves) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_up)
    config = tiny_config(tmp_path, checkpoint={"every_n_steps": 4})
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device") as failed:
        train(config, callbacks=[MetricsLogger()])
    assert "\n" not in str(failed.value)
    directory = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in directory.iterdir()) == ["latest", "step_00000004", "step_00000008"]
    assert checkpoint.verify(directory / "step_00000008") is None  # the last good one is still whole
    steps = [json.loads(line)["step"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 12  # training stopped at the failed save instead of going on without it


def test_a_run_stopped_early_stays_stopped_when_resumed_and_says_so(tmp_path, capsys):
    settings = {"training": {"epochs": 20, "eval_every_steps": 2, "patience": 0},
                "optimizer": {"lr": 0.3, "scheduler": "constant"}, "checkpoint": {"every_n_steps": 2}}
    first, metrics = train(tiny_config(tmp_path, **settings), callbacks=default_callbacks(tiny_config(tmp_path, **settings)))
    assert metrics["stop_reason"].startswith("early stopping") and first.step < 20 * 14
    again = tiny_config(tmp_path, **{**settings, "checkpoint": {"every_n_steps": 2, "resume": "auto"}})
    capsys.readouterr()
    resumed, metrics = train(again, callbacks=default_callbacks(again))
    assert resumed.step == first.step and metrics["stop_reason"] == first.stop_reason  # not trained any further
    assert (f"holds the stop asked for at step {first.step} ({first.stop_reason}): this run ends there too"
            in capsys.readouterr().out)
    for (name, w_first), w in zip(weights(first.raw_model).items(), weights(resumed.raw_model).values()):
        assert torch.equal(w_first, w), name
    patient = tiny_config(tmp_path, **{**settings, "training": {**settings["training"], "patience": 2},
                                       "checkpoint": {"every_n_steps": 2, "resume": "auto"}})
    longer, metrics = train(patient, callbacks=default_callbacks(patient))  # more patience: it trains on
    assert longer.step > first.step and metrics["stop_reason"].startswith("early stopping")
    # the same patience, a best sought the other way: the stop held for the other best is lifted
    other_way = dataclasses.replace(patient, checkpoint=dataclasses.replace(patient.checkpoint, mode="max"))
    lifted, _ = train(other_way, callbacks=default_callbacks(other_way))
    assert lifted.step > longer.step


def test_a_resume_that_monitors_another_metric_starts_its_best_and_patience_afresh(tmp_path):
    # the saved best is val_loss's, about log(4) after one step: held as val_acc's best, no accuracy beats it
    from llm.training.tasks.classification_task import ClassificationTask

    def run(**settings):
        config = tiny_config(tmp_path, task="classification", **settings)
        return train(config, ClassificationTask, callbacks=default_callbacks(config))

    first, metrics = run(training={"max_steps": 1, "eval_every_steps": 1})
    assert metrics["best_val_loss"] > 1.0
    resumed, metrics = run(training={"max_steps": 12, "eval_every_steps": 2, "patience": 1},
                           checkpoint={"resume": "auto", "monitor": "val_acc", "mode": "max"})
    accuracies = [r["val_acc"] for r in records_of(tmp_path / "run", "val") if r["step"] > 1]
    assert resumed.step > 2 and metrics["best_val_acc"] == max(accuracies) > accuracies[0]
    assert metrics["stop_reason"] in ("reached max_steps=12", f"early stopping: val_acc has not improved on "
                                      f"{max(accuracies):.6g} for 1 evaluations")


def test_the_epoch_train_loss_is_the_epochs_own_whatever_the_log_window(tmp_path):
    by_window = {}
    for every in (1, 4):  # 14 steps an epoch: a window of 4 is still open at each epoch's end
        config = tiny_config(tmp_path / str(every), training={"epochs": 3}, logging={"log_every_steps": every})
        train(config, callbacks=default_callbacks(config))
        by_window[every] = [r["train_loss"] for r in records_of(tmp_path / str(every) / "run", "epoch")]
    assert len(by_window[1]) == 3 and by_window[4] == pytest.approx(by_window[1], rel=1e-12)


def test_a_save_at_an_epochs_end_comes_after_its_validation_and_holds_its_score(tmp_path):
    config = tiny_config(tmp_path, training={"epochs": 3}, checkpoint={"every_n_steps": 14, "keep_last": 10})
    engine, _ = train(config, callbacks=default_callbacks(config))
    for step in (14, 28):  # each epoch's last step: saved once, after the epoch's validation
        manifest = json.loads((tmp_path / f"run/checkpoints/step_{step:08d}/manifest.json").read_text())
        validated = next(r for r in records_of(tmp_path / "run", "val") if r["step"] == step)
        assert manifest["metrics"]["val_loss"] == validated["val_loss"], step
        state = torch.load(tmp_path / f"run/checkpoints/step_{step:08d}/state.pt", weights_only=False)
        assert state["progress"]["epoch"] == step // 14 and state["progress"]["batch_in_epoch"] == 0


def test_max_steps_on_an_epochs_last_step_still_ends_the_epoch(tmp_path):
    config = tiny_config(tmp_path, training={"epochs": 3, "max_steps": 28})
    engine, metrics = train(config, callbacks=default_callbacks(config))
    assert engine.step == 28 and engine.epoch == 2 and metrics["stop_reason"] == "reached max_steps=28"
    assert [r["step"] for r in records_of(tmp_path / "run", "epoch")] == [14, 28]
    assert json.loads((tmp_path / "run/summary.json").read_text())["epochs"] == 2


class CosineClassificationTask(ClassificationTask):
    """A user's scheduler, recursive: each rate is computed from the last one."""

    def build_scheduler(self, optimizer):
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.total_steps),
                                                          eta_min=self.config.optimizer.min_lr)


class ConstantClassificationTask(ClassificationTask):
    def build_scheduler(self, optimizer):
        return None


@pytest.mark.parametrize("task_cls", [RegressionTask, CosineClassificationTask])  # LambdaLR, and CosineAnnealingLR
def test_a_resume_with_more_steps_follows_the_longer_schedule_from_the_resumed_step(tmp_path, task_cls):
    task = "classification" if task_cls is CosineClassificationTask else "regression"

    def config(name, max_steps, **more):
        return tiny_config(tmp_path / name, task=task, training={"epochs": 100, "max_steps": max_steps},
                           logging={"log_every_steps": 1}, optimizer={"scheduler": "cosine", "warmup_steps": 0}, **more)

    def lrs(name):
        return {r["step"]: r["lr"] for r in records_of(tmp_path / name / "run", "train")}

    for name, max_steps in (("long", 12), ("cut", 6)):
        train(config(name, max_steps), task_cls, callbacks=default_callbacks(config(name, max_steps)))
    assert lrs("cut")[6] < lrs("long")[6]  # the short schedule had decayed further
    resumed = config("cut", 12, checkpoint={"resume": "auto"})
    train(resumed, task_cls, callbacks=default_callbacks(resumed))
    long, cut = lrs("long"), lrs("cut")
    assert [cut[s] for s in range(7, 13)] == pytest.approx([long[s] for s in range(7, 13)], rel=1e-12)


def test_a_wsd_run_given_more_steps_while_still_stable_trains_on_as_one_given_them_from_the_start(tmp_path):
    def config(name, max_steps, **more):
        return tiny_config(tmp_path / name, training={"epochs": 100, "max_steps": max_steps},
                           optimizer={"scheduler": "wsd", "decay_fraction": 0.25, "warmup_steps": 2}, **more)

    long, _ = train(config("long", 26), callbacks=default_callbacks(config("long", 26)))
    short = config("short", 14, checkpoint={"every_n_steps": 8})  # decays from step 11 on
    train(short, callbacks=default_callbacks(short))
    resumed = config("short", 26, checkpoint={"resume": str(tmp_path / "short/run/checkpoints/step_00000008")})
    extended, _ = train(resumed, callbacks=default_callbacks(resumed))
    assert extended.step == long.step == 26
    for (name, a), b in zip(weights(long.raw_model).items(), weights(extended.raw_model).values()):
        assert torch.equal(a, b), name


def test_the_lr_in_each_record_is_the_rate_its_step_took(tmp_path):
    config = tiny_config(tmp_path, training={"epochs": 1}, logging={"log_every_steps": 1},
                         optimizer={"lr": 0.01, "warmup_steps": 4, "scheduler": "constant"})
    train(config, callbacks=default_callbacks(config))
    lrs = [r["lr"] for r in records_of(tmp_path / "run", "train")]
    assert lrs[:6] == pytest.approx([0.002, 0.004, 0.006, 0.008, 0.01, 0.01], rel=1e-12)
    assert records_of(tmp_path / "run", "epoch")[0]["lr"] == pytest.approx(0.01, rel=1e-12)


def test_the_classification_task_takes_the_schedule_the_flags_set(tmp_path):
    config = tiny_config(tmp_path, task="classification", training={"epochs": 1}, logging={"log_every_steps": 1},
                         optimizer={"lr": 0.01, "warmup_steps": 4, "scheduler": "linear", "min_lr": 0.001})
    train(config, ClassificationTask, callbacks=default_callbacks(config))
    lrs = [r["lr"] for r in records_of(tmp_path / "run", "train")]
    assert lrs == pytest.approx([0.01 * lr_factor(s, config.optimizer, len(lrs)) for s in range(len(lrs))], rel=1e-12)
    assert lrs[:5] == pytest.approx([0.002, 0.004, 0.006, 0.008, 0.01], rel=1e-12) and lrs[-1] < 0.01


SCHEDULES = {
    "built-in": ClassificationTask.build_scheduler,
    "cosine": CosineClassificationTask.build_scheduler,
    "none": ConstantClassificationTask.build_scheduler,
    "multiplicative": lambda self, optimizer: torch.optim.lr_scheduler.MultiplicativeLR(optimizer, lambda _: 0.8),
    "plateau": lambda self, optimizer: torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer),
}


@pytest.mark.parametrize("saved, now, unrecorded, said, rates", [
    ("cosine", "built-in", False, "(CosineAnnealingLR -> LambdaLR)", "built-in"),
    ("none", "built-in", False, "(none -> LambdaLR)", "built-in"),
    # LambdaLR's state has MultiplicativeLR's names: told apart by the class the checkpoint records
    ("built-in", "multiplicative", False, "(LambdaLR -> MultiplicativeLR)", "multiplicative"),
    ("built-in", "plateau", False, "(LambdaLR -> ReduceLROnPlateau)", "constant"),
    ("built-in", "none", False, "(LambdaLR -> none)", "constant"),
    # a checkpoint of an earlier version, which recorded no class: told apart by the public names of the state
    ("built-in", "cosine", True, "(unrecorded -> CosineAnnealingLR)", "cosine"),
    ("built-in", "built-in", True, None, "built-in"),  # and its private names, which torch versions change, not
])
def test_a_checkpoint_of_another_kind_of_schedule_resumes_on_this_runs_schedule(tmp_path, saved, now, unrecorded,
                                                                               said, rates, capsys, monkeypatch):
    def config(resume=""):
        return tiny_config(tmp_path, task="classification", training={"epochs": 100, "max_steps": 12},
                           logging={"log_every_steps": 1}, optimizer={"lr": 0.01, "min_lr": 0.001},
                           checkpoint={"every_n_steps": 6, "resume": resume})

    with monkeypatch.context() as patch:  # the task's build_scheduler as an earlier version of it had it
        patch.setattr(ClassificationTask, "build_scheduler", SCHEDULES[saved])
        train(config(), ClassificationTask, callbacks=default_callbacks(config()))
    shutil.rmtree(tmp_path / "run/checkpoints/step_00000012")  # as if stopped at step 6, under the same settings
    if unrecorded:
        state_file = tmp_path / "run/checkpoints/step_00000006/state.pt"
        state = torch.load(state_file, weights_only=False)
        del state["scheduler_kind"], state["scheduler"]["_is_initial"]  # as saved under another torch, too
        torch.save(state, state_file)
        reseal(state_file.parent)
    capsys.readouterr()
    monkeypatch.setattr(ClassificationTask, "build_scheduler", SCHEDULES[now])
    resumed = config(resume="auto")
    engine, _ = train(resumed, ClassificationTask, callbacks=default_callbacks(resumed))
    out = capsys.readouterr().out
    assert engine.step == 12
    if said is None:
        assert "schedule changed" not in out
    else:
        assert f"learning-rate schedule changed {said}: the rate follows this run's from step 6" in out
    expected = {  # the rate each of steps 7-12 took, as a run on this schedule from the start would have
        "built-in": [0.01 * lr_factor(s - 1, resumed.optimizer, 12) for s in range(7, 13)],
        "cosine": [0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 12)) for s in range(7, 13)],
        "multiplicative": [0.01 * 0.8 ** (s - 1) for s in range(7, 13)],
        "constant": [0.01] * 6,
    }[rates]
    lrs = {r["step"]: r["lr"] for r in records_of(tmp_path / "run", "train")}
    assert [lrs[s] for s in range(7, 13)] == pytest.approx(expected, rel=1e-9)


def test_engine_log_adds_to_the_record_of_the_hook_it_is_called_from(tmp_path):
    class Logs(Callback):
        def on_step_end(self, engine):
            engine.log({"from_step": engine.step})

        def on_validation_end(self, engine, metrics):
            engine.log({"from_validation": engine.step})

    config = tiny_config(tmp_path, training={"epochs": 1, "eval_every_steps": 3}, logging={"log_every_steps": 2})
    train(config, callbacks=[MetricsLogger(), Logs()])
    val, logged = records_of(tmp_path / "run", "val"), records_of(tmp_path / "run", "train")
    assert [r["step"] for r in val] == [3, 6, 9, 12, 14]  # step 3 is validated but not logged
    assert all("from_step" not in r and r["from_validation"] == r["step"] for r in val)
    assert all(r["from_step"] == r["step"] and "from_validation" not in r for r in logged)


def test_an_early_stopping_monitor_that_validation_does_not_report_is_refused_before_training(tmp_path):
    config = tiny_config(tmp_path)
    engine = TrainingEngine(config, RegressionTask(config), callbacks=[EarlyStopping(monitor="val_los")])
    with pytest.raises(UsageError, match=r"EarlyStopping monitor: got 'val_los'.*did you mean val_loss\?"):
        engine.train()
    assert engine.step == 0 and not (tmp_path / "run/checkpoints").exists()


class AccuracyAndDiceLoss(ClassificationTask):
    def validation_step(self, batch, model, criterion):
        loss, metrics = super().validation_step(batch, model, criterion)
        return loss, {**metrics, "dice_loss": loss}  # lower is better, though it says dice


@pytest.mark.parametrize("monitor, mode, warned", [("val_acc", "min", True), ("val_acc", "max", False),
                                                   ("val_dice_loss", "min", False)])
def test_monitoring_an_accuracy_at_its_lowest_is_warned_of(tmp_path, recwarn, monitor, mode, warned):
    config = tiny_config(tmp_path, task="classification", training={"max_steps": 1},
                         checkpoint={"monitor": monitor, "mode": mode})
    TrainingEngine(config, AccuracyAndDiceLoss(config)).train()
    said = [str(w.message) for w in recwarn if "checkpoint.monitor" in str(w.message)]
    assert said == (["checkpoint.monitor val_acc is kept at its lowest (checkpoint.mode min), as a loss is: if "
                     "higher is better, give --checkpoint-mode max"] if warned else [])


def test_a_resume_mid_epoch_with_another_batch_size_goes_on_from_the_samples_already_done(tmp_path):
    first = tiny_config(tmp_path, training={"epochs": 1, "max_steps": 4})  # 4 batches of 16: 64 samples
    train(first)
    bigger = tiny_config(tmp_path, training={"epochs": 1, "batch_size": 32},
                         checkpoint={"resume": "auto", "allow_config_change": True})
    rates = LearningRates()
    engine, metrics = train(bigger, callbacks=[rates])
    # 2 batches of 32 are done; the other 230 - 64 samples of the epoch make 5 whole batches of 32
    assert engine.step == 4 + 5 and metrics["samples_seen"] == 64 + 5 * 32
    # the cosine schedule spans the steps this run takes, counted in batches of 32: it reaches
    # min_lr (0) at the last of them, not at step 4 + 3 (the 7 steps an epoch has in batches of 32)
    assert engine.total_steps == 9 and list(rates.after_step) == [5, 6, 7, 8, 9]
    assert rates.after_step[8] > 0.02 * 0.01 and rates.after_step[9] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(list(rates.after_step.values()), list(rates.after_step.values())[1:]))
    odd = tiny_config(tmp_path / "odd", training={"epochs": 1, "max_steps": 3})  # 48 samples: 1.5 batches of 32
    train(odd)
    again = tiny_config(tmp_path / "odd", training={"epochs": 1, "batch_size": 32},
                        checkpoint={"resume": "auto", "allow_config_change": True})
    with pytest.warns(UserWarning, match="16 samples of the epoch are seen again"):
        engine, _ = train(again)
    assert engine.step == 3 + (230 - 32) // 32


class OnPlateau(RegressionTask):
    """Halves the rate at each validation whose val_flat, which never improves, does not (patience 0)."""

    mode = "min"

    def build_scheduler(self, optimizer):
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=self.mode, factor=0.5, patience=0)

    def validation_step(self, batch, model, criterion):
        loss, metrics = super().validation_step(batch, model, criterion)
        return loss, {**metrics, "flat": 1.0}


def test_reduce_lr_on_plateau_steps_on_the_monitored_metric_at_each_validation_and_resumes_exactly(tmp_path):
    settings = {"training": {"max_steps": 9, "eval_every_steps": 3}, "checkpoint": {"monitor": "val_flat"},
                "logging": {"log_every_steps": 1}}
    config = tiny_config(tmp_path / "straight", **settings)
    straight, _ = train(config, OnPlateau, callbacks=default_callbacks(config))
    records = [json.loads(line) for line in (tmp_path / "straight/run/metrics.jsonl").read_text().splitlines()]
    lr_by_step = {r["step"]: r["lr"] for r in records if r["split"] == "train"}
    # the first validation sets the best; each later one (6, 9) halves the rate for the steps after it
    assert [lr_by_step[s] for s in (1, 3, 4, 6, 7, 9)] == pytest.approx([0.02, 0.02, 0.02, 0.02, 0.01, 0.01])
    assert straight.optimizer.param_groups[0]["lr"] == 0.005

    class TermAt4(Callback):
        def on_step_end(self, engine):
            if engine.step == 4:
                os.kill(os.getpid(), signal.SIGTERM)

    # stopped at 4 by max_steps, with a last validation off the schedule that must not count for the continuation
    # (the settings changed: max_steps); and by a signal, resumed with the same settings
    resume = {"checkpoint": {"monitor": "val_flat", "resume": "auto"}}
    first = tiny_config(tmp_path / "max_steps", **{**settings, "training": {"max_steps": 4, "eval_every_steps": 3}})
    train(first, OnPlateau)
    resumed, _ = train(tiny_config(tmp_path / "max_steps", **{**settings, **resume}), OnPlateau)
    with pytest.raises(TrainingInterrupted):
        train(tiny_config(tmp_path / "signal", **settings), OnPlateau, callbacks=[TermAt4()])
    signalled, _ = train(tiny_config(tmp_path / "signal", **{**settings, **resume}), OnPlateau)
    for engine in (resumed, signalled):
        assert engine.optimizer.param_groups[0]["lr"] == 0.005
        for name, value in straight.raw_model.state_dict().items():
            assert torch.equal(value, engine.raw_model.state_dict()[name]), name


def test_reduce_lr_on_plateau_counting_the_other_way_from_the_monitor_is_one_line(tmp_path):
    class Backwards(OnPlateau):
        mode = "max"

    with pytest.raises(UsageError, match=r"^Backwards.build_scheduler returned ReduceLROnPlateau\(mode='max'\), which "
                                         r"is stepped with checkpoint.monitor val_loss, better lower \(checkpoint.mode "
                                         r"min\): give it mode='min'$"):
        train(tiny_config(tmp_path), Backwards)


def test_a_run_resumed_past_a_lower_max_steps_says_so_and_keeps_its_summary(tmp_path):
    train(tiny_config(tmp_path, training={"max_steps": 6}))
    lower = tiny_config(tmp_path, training={"max_steps": 4}, checkpoint={"resume": "auto"})
    engine, metrics = train(lower)
    assert engine.step == 6 and metrics["stop_reason"] == "resumed at step 6, past max_steps=4"
    assert json.loads((tmp_path / "run/summary.json").read_text())["stop_reason"] == "reached max_steps=6"


def test_a_plateau_resumed_with_other_settings_keeps_where_it_stood_but_takes_this_runs_settings(tmp_path):
    settings = {"training": {"max_steps": 9, "eval_every_steps": 3}, "checkpoint": {"monitor": "val_flat"}}
    train(tiny_config(tmp_path, **settings), OnPlateau)  # ends with the rate halved twice: 0.005

    class TenthOnPlateau(OnPlateau):
        def build_scheduler(self, optimizer):
            return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=0)

    def resumed(task_cls=OnPlateau, lr=0.02, monitor="val_flat"):
        config = tiny_config(tmp_path, training={"max_steps": 12, "eval_every_steps": 3}, optimizer={"lr": lr},
                             checkpoint={"monitor": monitor, "resume": "auto", "allow_config_change": True})
        engine = TrainingEngine(config, task_cls(config), 0, 1)
        engine.setup()
        engine._let_go_of_run_dir(failed=False)
        return engine, engine.scheduler

    engine, plateau = resumed(TenthOnPlateau)  # another task's factor: the lowered rate, this factor
    assert engine.optimizer.param_groups[0]["lr"] == 0.005 and plateau.factor == 0.1
    assert plateau.best == 1.0 and plateau.last_epoch == 3  # the three validations it saw
    engine, plateau = resumed(lr=0.001)  # a rate given: that one
    assert engine.optimizer.param_groups[0]["lr"] == 0.001 and plateau.best == 1.0
    engine, plateau = resumed(monitor="val_loss")  # another metric: a plateau of its own
    assert engine.optimizer.param_groups[0]["lr"] == 0.02 and plateau.best == math.inf and plateau.mode == "min"


def test_a_one_cycle_schedule_resumed_past_a_lower_max_steps_ends_at_once(tmp_path):
    class OneCycle(RegressionTask):
        def build_scheduler(self, optimizer):
            return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.02, total_steps=self.total_steps)

    train(tiny_config(tmp_path, training={"max_steps": 9}), OneCycle)
    engine, metrics = train(tiny_config(tmp_path, training={"max_steps": 6}, checkpoint={"resume": "auto"}), OneCycle)
    assert engine.step == 9 and metrics["stop_reason"] == "resumed at step 9, past max_steps=6"


def test_a_config_naming_another_task_than_the_one_given_puts_the_run_in_the_given_tasks_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = Config.from_dict({"training": {"max_steps": 2}, "data": {"num_samples": 128},
                               "logging": {"progress_bar": False}})  # task left at regression, runs/{task}
    engine, _ = train(config, ClassificationTask)
    assert engine.run_dir == Path("runs/classification") and (tmp_path / "runs/classification/summary.json").exists()
    assert yaml.safe_load((tmp_path / "runs/classification/config.yaml").read_text())["task"] == "classification"

    class Nested(RegressionTask):  # recorded as module:function.<locals>.Nested, its folder named by the class
        pass

    again = Config.from_dict({"training": {"max_steps": 2}, "logging": {"progress_bar": False}})
    assert train(again, Nested)[0].run_dir == Path("runs/nested")


def test_engine_log_refuses_the_fields_every_record_has_and_a_record_that_never_comes(tmp_path):
    class LogsAnEpoch(Callback):
        def on_step_end(self, engine):
            engine.log({"epoch": engine.step / 14})

    with pytest.raises(UsageError, match=r"^engine.log in on_step_end: logged 'epoch', a field every record has \(split, "
                                         r"step, epoch\), set by the engine: log it under another name$"):
        train(tiny_config(tmp_path), callbacks=[LogsAnEpoch()])

    class LogsAtTheEnd(Callback):  # its value would go to a record that never comes
        def on_train_end(self, engine, metrics):
            engine.log({"total_time": 1.0})

    with pytest.raises(UsageError, match=r"^engine.log in on_train_end: no record follows the end of training"):
        train(tiny_config(tmp_path / "end"), callbacks=[LogsAtTheEnd()])
    assert (tmp_path / "end/run/summary.json").exists()  # the run itself was finished and saved


@pytest.mark.parametrize("hook, key, split", [("on_step_end", "loss", "train"), ("on_validation_end", "val_loss", "val")])
def test_engine_log_of_a_metric_the_record_has_of_its_own_is_dropped_with_a_warning(tmp_path, capsys, hook, key, split):
    class Overrides(Callback):
        def on_step_end(self, engine):
            if hook == "on_step_end":
                engine.log({key: 123.0})

        def on_validation_end(self, engine, metrics):
            if hook == "on_validation_end":
                engine.log({key: -1.0})

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, metrics = train(tiny_config(tmp_path, training={"eval_every_steps": 2}),
                                callbacks=[Overrides(), MetricsLogger()])
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    values = [r[key] for r in records if r["split"] == split]
    assert len(values) > 2 and 123.0 not in values and -1.0 not in values  # the record's own, every time
    warning = (f"engine.log: '{key}' is one of the {split} record's own metrics (the task's or the engine's): "
               f"the record keeps its own; log the value under another name")
    assert [str(w.message) for w in caught].count(warning) == 1  # once, however often it is logged
    assert "engine.log" not in capsys.readouterr().out  # a warning, on stderr with the others
