import enum
import itertools
import re
import threading
import warnings

import pytest
import torch

from llm.data.synthetic_data_module import SyntheticDataModule
from llm.errors import UsageError
from llm.training.core.callbacks import Callback
from llm.training.core.engine import TrainingEngine
from llm.training.tasks.regression_task import RegressionTask
from tests.helpers import tiny_config, train


class SqueezedTrainStepTask(RegressionTask):
    """A train_step that squeezes its predictions to (B,) against (B, 1) targets: MSE over a B x B grid."""

    def train_step(self, batch, model, criterion):
        x, y = batch
        return criterion(model(x).squeeze(-1), y), {}


class WarningTrainStepTask(RegressionTask):
    """A train_step that warns of something else on its first call."""

    def train_step(self, batch, model, criterion):
        warnings.warn("a warning of the task's own")
        return super().train_step(batch, model, criterion)


def test_another_warning_that_an_outer_filter_makes_an_error_is_left_as_it_is(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # python -W error
        with pytest.raises(UserWarning, match="^a warning of the task's own$"):
            train(tiny_config(tmp_path), WarningTrainStepTask)


def test_a_train_step_whose_loss_broadcasts_its_targets_stops_at_the_first_step_in_one_line(tmp_path):
    # its validation_step is right, so the check of the first validation batch passed it
    with pytest.raises(UsageError, match=r"^SqueezedTrainStepTask.train_step: the loss would broadcast its targets "
                                         r"against predictions of another shape: Using a target size "
                                         r"\(torch.Size\(\[16, 1\]\)\) that is different to the input size "
                                         r"\(torch.Size\(\[16\]\)\) \(\S+test_checks.py:\d+\); make them the same "
                                         r"shape$"):
        train(tiny_config(tmp_path), SqueezedTrainStepTask)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("returned, words", [
    ("loader", "train_dataloader() returned DataLoader, expected a (DataLoader, DistributedSampler) pair"),
    ("no sampler", "train_dataloader() returned the sampler NoneType, expected one with set_epoch"),
    ("no validation", "val_dataloader() returned (NoneType, NoneType), expected a (DataLoader, DistributedSampler) "
                      "pair, as self.build_dataloader(...) gives; without data for it, a loader over an empty data"),
    ("two batches", "train_dataloader() returned (list, list), expected a (DataLoader, DistributedSampler) pair"),
])
def test_a_data_module_that_returns_no_loader_and_sampler_pair_is_refused_in_one_line(tmp_path, returned, words):
    class Odd(SyntheticDataModule):
        def train_dataloader(self, rank, world_size):
            loader, sampler = super().train_dataloader(rank, world_size)
            batches = {"two batches": list(itertools.islice(loader, 2))}  # the loader's batches, listed
            return {"loader": loader, "no sampler": (loader, None), **batches}.get(returned, (loader, sampler))

        def val_dataloader(self, rank, world_size):
            return (None, None) if returned == "no validation" else super().val_dataloader(rank, world_size)

    config = tiny_config(tmp_path)
    with pytest.raises(UsageError) as refused:
        TrainingEngine(config, RegressionTask(config), data_module=Odd(config)).train()
    assert str(refused.value).startswith("Odd.") and words in str(refused.value), str(refused.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("returned, shown", [(lambda loss, m: loss, "Tensor"), (lambda loss, m: (loss, None), "(Tensor, NoneType)")])
def test_a_train_step_that_returns_no_loss_and_metrics_pair_is_one_line(tmp_path, returned, shown):
    class LossOnly(RegressionTask):
        def train_step(self, batch, model, criterion):
            return returned(*super().train_step(batch, model, criterion))

    with pytest.raises(UsageError, match=rf"^LossOnly.train_step returned {re.escape(shown)}, expected \(loss, metrics\)"):
        train(tiny_config(tmp_path), task_cls=LossOnly)


PER_SAMPLE = [  # a .mean() forgotten: a value per sample where one number is due
    ("train_step", lambda loss, metrics, n: (loss.expand(n), metrics), r"a loss of shape \(16,\), expected one number"),
    ("train_step", lambda loss, metrics, n: (loss, {**metrics, "mae": torch.ones(n)}),
     r"metric 'mae' as a tensor of shape \(16,\), expected a number or a one-element tensor"),
    ("validation_step", lambda loss, metrics, n: (loss, {"mae": "low"}), r"metric 'mae' as a str, expected a number"),
]


@pytest.mark.parametrize("method, returned, message", PER_SAMPLE)
def test_a_step_that_returns_a_value_per_sample_is_one_line_before_any_training(tmp_path, method, returned, message):
    class PerSample(RegressionTask):
        def train_step(self, batch, model, criterion):
            result = super().train_step(batch, model, criterion)
            return returned(*result, len(batch[0])) if method == "train_step" else result

        def validation_step(self, batch, model, criterion):
            result = super().validation_step(batch, model, criterion)
            return returned(*result, len(batch[0])) if method == "validation_step" else result

    engine = TrainingEngine(tiny_config(tmp_path), PerSample(tiny_config(tmp_path)))
    with pytest.raises(UsageError, match=rf"^PerSample.{method} returned {message}"):
        engine.train()
    assert engine.step == 0  # the first micro-step, not the first log step, tells
    # validation_step's is found before any write; train_step's after, and what the run wrote is taken back
    assert not (tmp_path / "run").exists()


def test_a_metric_missing_from_some_batches_or_named_loss_is_one_line(tmp_path):
    class SometimesOutliers(RegressionTask):  # a metric reported only by the batches that have a value for it
        calls = 0

        def train_step(self, batch, model, criterion):
            loss, metrics = super().train_step(batch, model, criterion)
            self.calls += 1
            return loss, ({"outlier_mae": loss} if self.calls % 3 == 0 else {})

    class LossMetric(RegressionTask):
        def train_step(self, batch, model, criterion):
            loss, metrics = super().train_step(batch, model, criterion)
            return loss, {"loss": loss}

    with pytest.raises(UsageError, match=r"^a step returned the metrics \[.*\] after \[.*\]: train_step and "
                                         r"validation_step must return the same metric names for every batch$"):
        train(tiny_config(tmp_path / "a", training={"epochs": 3}), task_cls=SometimesOutliers)
    with pytest.raises(UsageError, match=r"^LossMetric.train_step returned a metric named 'loss'"):
        train(tiny_config(tmp_path / "b"), task_cls=LossMetric)


@pytest.mark.parametrize("later, words", [
    (torch.ones(3), r"^a step returned metric 'mae' as a tensor of shape \(3,\), expected a number or a "
                    r"one-element tensor: the batch's mean, such as .mean\(\)$"),
    ("n/a", r"^a step returned metric 'mae' as a str, expected a number or a one-element tensor$"),
])
@pytest.mark.parametrize("saved", [False, True], ids=["logged", "saved-before-logged"])
def test_a_metric_that_turns_into_no_number_after_the_first_step_is_one_line(tmp_path, later, words, saved):
    """The first step's metrics are checked; a later step's that are not one number are found by the window,
    when it is logged or when a checkpoint saves it (which gave torch's error)."""
    class Turns(RegressionTask):
        calls = 0

        def train_step(self, batch, model, criterion):
            loss, _ = super().train_step(batch, model, criterion)
            self.calls += 1
            return loss, {"mae": later if self.calls == 3 else loss.detach()}

    with pytest.raises(UsageError, match=words):
        train(tiny_config(tmp_path, logging={"log_every_steps": 4}, checkpoint={"every_n_steps": 3 if saved else 0}),
              task_cls=Turns)


def test_a_training_metric_named_like_the_engines_figures_is_refused_and_a_validation_one_is_not(tmp_path):
    class Norms(RegressionTask):  # the record's grad_norm would be the engine's, the task's dropped unseen
        def train_step(self, batch, model, criterion):
            loss, metrics = super().train_step(batch, model, criterion)
            return loss, {**metrics, "grad_norm": 123.0}

        def validation_step(self, batch, model, criterion):
            loss, metrics = super().validation_step(batch, model, criterion)
            return loss, {**metrics, "grad_norm": 1.5}  # logged as val_grad_norm: no clash

    with pytest.raises(UsageError, match=r"^Norms.train_step returned a metric named 'grad_norm'"):
        train(tiny_config(tmp_path), task_cls=Norms)
    Norms.train_step = RegressionTask.train_step
    _, metrics = train(tiny_config(tmp_path / "val", training={"max_steps": 2}), task_cls=Norms)
    assert metrics["val_grad_norm"] == 1.5


def test_an_allocation_too_large_is_one_line_with_its_size_from_either_allocator():
    from llm.training.core.checks import out_of_memory

    for error, size in ((RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                      "64000000000 bytes. Error code 12"), "59.6"),
                        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0)"), "20.0")):
        with pytest.raises(UsageError, match=rf"^build_model\(\) ran out of memory: it asked for {size} GiB at once; "
                                             rf"ask for less, or use a machine with more memory$"):
            with out_of_memory("build_model()", "less"):
                raise error
    with pytest.raises(RuntimeError, match="^another error$"):  # anything else goes through as it is
        with out_of_memory("build_model()", "less"):
            raise RuntimeError("another error")


def test_a_build_model_returning_no_module_is_one_line_before_the_run_folder_is_made(tmp_path):
    class ReturnsAFunction(RegressionTask):
        def build_model(self):
            return lambda x: x

    config = tiny_config(tmp_path)
    with pytest.raises(UsageError, match=r"^ReturnsAFunction.build_model\(\) returned a function, not a "
                                         r"torch.nn.Module$"):
        TrainingEngine(config, ReturnsAFunction(config), 0, 1).train()
    assert not (tmp_path / "run").exists()


def test_a_task_or_data_module_whose_init_skipped_the_base_classs_is_given_the_runs_config(tmp_path):
    class Unset(RegressionTask):
        def __init__(self, config):
            pass  # no super().__init__(config): no self.config for build_model

    class Unready(SyntheticDataModule):
        def __init__(self, config):
            pass

    config = tiny_config(tmp_path, training={"max_steps": 3})
    engine = TrainingEngine(config, Unset(config), data_module=Unready(config))
    assert engine.train()["steps"] == 3 and engine.task.config is engine.data_module.config is engine.config


def test_a_loss_per_sample_on_a_later_step_is_the_same_one_line(tmp_path):
    class ForgetsTheMeanLater(RegressionTask):
        calls = 0

        def train_step(self, batch, model, criterion):
            loss, metrics = super().train_step(batch, model, criterion)
            self.calls += 1
            return (loss.expand(len(batch[0])) if self.calls == 3 else loss), metrics

    engine = TrainingEngine(tiny_config(tmp_path), ForgetsTheMeanLater(tiny_config(tmp_path)))
    with pytest.raises(UsageError, match=r"^ForgetsTheMeanLater.train_step returned a loss of shape \(16,\), "
                                         r"expected one number"):
        engine.train()
    assert engine.step == 2


@pytest.mark.parametrize("when", [1, 3])
def test_a_loss_cut_off_from_the_model_is_one_line_on_its_first_step_or_a_later_one(tmp_path, when):
    """It gave torch's "element 0 of tensors does not require grad" traceback."""
    class Detaches(RegressionTask):
        calls = 0

        def train_step(self, batch, model, criterion):
            loss, metrics = super().train_step(batch, model, criterion)
            self.calls += 1
            return (loss.detach() if self.calls == when else loss), metrics

    engine = TrainingEngine(tiny_config(tmp_path), Detaches(tiny_config(tmp_path)))
    with pytest.raises(UsageError, match=r"^Detaches.train_step returned a loss that no gradient flows back from "
                                         r"\(requires_grad False\): compute it from the model's output"):
        engine.train()
    assert engine.step == when - 1


def test_a_finalize_metrics_that_returns_nothing_is_one_line_before_the_run_writes(tmp_path):
    class ChangesInPlace(RegressionTask):
        def finalize_metrics(self, metrics):
            metrics["val_rmse"] = metrics.get("val_loss", 0.0) ** 0.5

    config = tiny_config(tmp_path)
    engine = TrainingEngine(config, ChangesInPlace(config))
    with pytest.raises(UsageError, match=r"^ChangesInPlace.finalize_metrics returned NoneType, expected the dict of "
                                         r"metrics: return it, changed or not$"):
        engine.train()
    assert engine.step == 0 and not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("default", [None, ""])
def test_a_task_without_a_data_module_name_is_one_line(tmp_path, default):
    class NoData(RegressionTask):
        default_data_module = default

    config = tiny_config(tmp_path)
    with pytest.raises(UsageError, match=rf"^NoData.default_data_module: got {default!r}, expected a built-in name "
                                         r"\(synthetic, classification, text\) or package.module:Class; or give "
                                         r"--data-module \(in code, the engine's data_module=\)$"):
        TrainingEngine(config, NoData(config))
    given = TrainingEngine(config, NoData(config), data_module=SyntheticDataModule(config))  # given: not needed
    assert given.config.data.module == "synthetic"  # config.yaml names it
    config.data.module = "synthetic"  # named by the config, the task's default is not needed
    assert isinstance(TrainingEngine(config, NoData(config)).data_module, SyntheticDataModule)


class Phase(enum.IntEnum):
    WARM = 1


def test_what_a_checkpoint_cannot_hold_is_one_line_naming_where_it_came_from(tmp_path):
    import collections

    class Recent(Callback):
        def state_dict(self):
            return {"last": collections.deque([1.0, 2.0])}

    class Worded(RegressionTask):
        def finalize_metrics(self, metrics):
            return {**metrics, "grade": "good"}

    class Phased(Callback):
        def state_dict(self):
            return {"phase": Phase.WARM}  # an int, as the loader sees it, of a class it will not run

    with pytest.raises(UsageError, match=r"^Recent.state_dict\(\) holds a collections.deque, which a checkpoint "
                                         r"cannot hold: .*\(a NumPy array as a tensor, a deque as a list, an Enum as "
                                         r"its value\)$"):
        train(tiny_config(tmp_path / "deque", training={"max_steps": 2}), callbacks=[Recent()])
    with pytest.raises(UsageError, match=r"^Phased.state_dict\(\) holds a test_checks.Phase, which a checkpoint"):
        train(tiny_config(tmp_path / "enum", training={"max_steps": 2}), callbacks=[Phased()])

    class Locked(Callback):
        def state_dict(self):
            return {"lock": threading.Lock()}  # which no deep copy takes either

    with pytest.raises(UsageError, match=r"^Locked.state_dict\(\) holds a _thread.lock, which a checkpoint"):
        train(tiny_config(tmp_path / "lock", training={"max_steps": 2}), callbacks=[Locked()])
    with pytest.raises(UsageError, match=r"^Worded.finalize_metrics returned 'grade' as a str, expected a number"):
        train(tiny_config(tmp_path / "str"), Worded)

    class Stepped(RegressionTask):  # a metric named like a field of its record would replace it
        def train_step(self, batch, model, criterion):
            loss, metrics = super().train_step(batch, model, criterion)
            return loss, {**metrics, "epoch": 0.25}

    with pytest.raises(UsageError, match=r"^Stepped.train_step returned a metric named 'epoch', a field its record "
                                         r"has already \(loss, grad_norm, skipped_steps, loss_scale, overflow_steps, "
                                         r"split, step, epoch\): name the metric otherwise$"):
        train(tiny_config(tmp_path / "field"), Stepped)


def test_the_first_validation_batch_names_what_validation_reports_and_refuses_one_the_task_cannot_take(tmp_path):
    from contextlib import nullcontext

    from llm.training.core.checks import check_task_takes_the_data

    config = tiny_config(tmp_path)
    task = RegressionTask(config)
    model, criterion = task.build_model(), task.build_criterion()
    x = torch.randn(4, config.data.input_dim)
    step = (task, "Numbers", model, criterion)
    after = (torch.device("cpu"), nullcontext(), config.checkpoint)
    assert check_task_takes_the_data(*step, (x, torch.randn(4, 1)), *after, warn=True) == ["val_loss", "val_mae"]
    assert model.training  # put back as it was found
    with pytest.raises(UsageError, match=r"^RegressionTask.validation_step failed on the first batch of Numbers: "
                                         r"RuntimeError: .*does the data module yield what the task takes\?"):
        check_task_takes_the_data(*step, (x[:, :1], torch.randn(4, 1)), *after, warn=True)

    class Pair(tuple):  # a batch that cannot be rebuilt on the device from its moved items
        def __new__(cls, x, y):
            return super().__new__(cls, (x, y))

    with pytest.raises(UsageError, match="failed on the first batch of Numbers: TypeError"):
        check_task_takes_the_data(*step, Pair(x, torch.randn(4, 1)), torch.device("meta"), *after[1:], warn=True)
    config.checkpoint.monitor = "val_acc"  # not among them
    with pytest.raises(UsageError, match="val_acc"):
        check_task_takes_the_data(*step, (x, torch.randn(4, 1)), *after, warn=True)


class TrainBatchesOfThree(SyntheticDataModule):
    """Training batches of 3 features, where the model takes data.input_dim; validation batches that fit."""

    def setup(self, stage):
        super().setup(stage)
        n = len(self.train_set)
        self.train_set = torch.utils.data.TensorDataset(torch.randn(n, 3), torch.randn(n, 1))


def test_a_training_batch_the_task_cannot_take_stops_the_first_step_in_one_line_and_leaves_no_run(tmp_path):
    # the validation batch checked in set-up fits: the training one does not
    config = tiny_config(tmp_path)
    with pytest.raises(UsageError, match=r"^RegressionTask.train_step failed on the first batch of "
                                         r"TrainBatchesOfThree: RuntimeError: mat1 and mat2 shapes cannot be multiplied \(16x3 and 4x\d+\) "
                                         r"\(\S+regression_task.py:\d+\); does the data module yield what the task "
                                         r"takes\? Choose another with --data-module"):
        TrainingEngine(config, RegressionTask(config), data_module=TrainBatchesOfThree(config)).train()
    assert not (tmp_path / "run").exists()  # taken back: the same command, mended, trains there


def test_a_compiled_models_first_step_errors_are_the_compilers_not_read_as_the_datas(tmp_path):
    config = tiny_config(tmp_path, training={"compile": True})
    with pytest.raises(Exception, match=r"same reduction dim, but got \[16, 3\]") as raised:
        TrainingEngine(config, RegressionTask(config), data_module=TrainBatchesOfThree(config)).train()
    assert not isinstance(raised.value, UsageError)
