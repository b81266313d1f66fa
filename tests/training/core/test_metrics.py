import math

import pytest
import torch

from llm.errors import UsageError
from llm.training.core.callbacks import Callback
from llm.training.core.config import Config
from llm.training.core.metrics import RunningMeans, TrainingSums, _on_host
from llm.training.tasks.regression_task import RegressionTask
from tests.helpers import tiny_config, train


TAKEN, NOT_TAKEN = torch.tensor(True), torch.tensor(False)


def test_running_means_weigh_each_batch_by_its_items():
    means = RunningMeans()
    means.add(torch.tensor(1.0), {"acc": torch.tensor(0.5)}, weight=torch.tensor(3.0))
    means.add(torch.tensor(3.0), {"acc": 1.0}, weight=torch.tensor(1.0))  # numbers and tensors mixed
    assert len(means) == 2
    assert means.totals() == {"loss": (6.0, 4.0), "acc": (2.5, 4.0)}


def test_a_window_is_taken_once_and_its_loss_joins_the_epochs():
    sums = TrainingSums()
    sums.add_step([(torch.tensor(1.0), {}, 1.0), (torch.tensor(2.0), {}, 1.0)], torch.tensor(0.5), TAKEN)
    sums.add_step([(torch.tensor(3.0), {}, 1.0)], torch.tensor(1.5), True)  # a bool: known on the host
    assert sums.take_window() == {"loss": (6.0, 3.0), "grad_norm": (2.0, 2.0)}
    assert len(sums) == 0 and sums.grad_norms == []
    sums.add_step([(torch.tensor(4.0), {}, 1.0)], torch.tensor(1.0), TAKEN)  # still open when the epoch ends
    assert sums.close_epoch() == (10.0, 4.0)
    # the open window is logged in the next epoch: that epoch's sum starts with it taken back off
    sums.add_step([(torch.tensor(5.0), {}, 1.0)], torch.tensor(1.0), TAKEN)
    sums.take_window()
    assert sums.close_epoch() == (5.0, 1.0)


def test_a_step_not_taken_weighs_nothing_and_a_window_of_it_alone_has_no_mean():
    sums = TrainingSums()
    sums.add_step([(torch.tensor(1.0), {"acc": torch.tensor(0.5)}, torch.tensor(3.0))], torch.tensor(2.0), TAKEN)
    nan = torch.tensor(float("nan"))
    sums.add_step([(nan, {"acc": nan}, torch.tensor(5.0))], torch.tensor(float("inf")), NOT_TAKEN)
    assert len(sums) == 2 and sums.take_window() == {"loss": (3.0, 3.0), "acc": (1.5, 3.0), "grad_norm": (2.0, 1.0)}
    sums.add_step([(nan, {}, 1.0)], nan, False)
    assert sums.take_window() == {"loss": (0.0, 0.0), "grad_norm": (0.0, 0.0)}  # the engine logs 0/0 as NaN


def test_a_step_not_taken_with_a_finite_loss_counts_its_loss_but_not_its_norm():
    # a loss scaler's overflow: the batch had its loss, only its gradients overflowed
    for taken, loss in ((NOT_TAKEN, torch.tensor(4.0)), (False, 4.0)):
        sums = TrainingSums()
        sums.add_step([(torch.tensor(2.0), {}, 1.0)], torch.tensor(1.0), TAKEN)
        sums.add_step([(loss, {}, 1.0)], torch.tensor(float("inf")), taken)
        assert sums.take_window() == {"loss": (6.0, 2.0), "grad_norm": (1.0, 1.0)}


def uninterrupted_and_resumed(fill):
    """Sums that ``fill(sums, steps)`` fills with steps 0-39, and sums filled with 0-24, saved, restored and
    filled with 25-39."""
    uninterrupted, before = TrainingSums(), TrainingSums()
    fill(uninterrupted, range(40))
    fill(before, range(25))
    resumed = TrainingSums()
    resumed.load_state_dict(before.state_dict())
    fill(resumed, range(25, 40))
    return uninterrupted, resumed


@pytest.mark.parametrize("numbers", [False, True], ids=["tensors", "numbers"])  # a GPU's window, the CPU's
@pytest.mark.parametrize("seed", range(30))
def test_a_resumed_window_gives_the_means_the_uninterrupted_one_gives_to_the_bit(seed, numbers):
    generator = torch.Generator().manual_seed(seed)
    losses = torch.rand(40, generator=generator).tolist()
    counts = torch.randint(1, 500, (40,), generator=generator).tolist()  # token counts: entries weigh unevenly

    def fill(sums, steps):
        for i in steps:
            taken = torch.tensor(i != 3)  # step 3 is not taken: its NaN weighs nothing
            value = torch.tensor(losses[i] if taken else float("nan"))
            if numbers:
                value, taken = value.item(), bool(taken)
                sums.add_step([(value, {"mae": value / 3, "acc": 1.0}, float(counts[i]))], value / 7, taken)
                continue
            sums.add_step([(value, {"mae": value / 3, "acc": 1.0}, torch.tensor(counts[i]))], value / 7, taken)

    uninterrupted, resumed = uninterrupted_and_resumed(fill)
    assert resumed.take_window() == uninterrupted.take_window()  # the same sums in the same order
    assert resumed.close_epoch() == uninterrupted.close_epoch()


def test_a_window_saved_as_totals_by_an_earlier_version_resumes_with_its_means():
    sums = TrainingSums()
    sums.load_state_dict({"epoch_loss": (0.0, 0.0), "window": {"loss": (6.0, 4.0), "acc": (2.0, 4.0)},
                          "steps": 2, "grad_norms": [0.5, 1.5]})
    sums.add_step([(torch.tensor(4.0), {"acc": 1.0}, 4.0)], torch.tensor(1.0), TAKEN)
    assert sums.take_window() == {"loss": (22.0, 8.0), "acc": (6.0, 8.0), "grad_norm": (3.0, 3.0)}


def test_a_resumed_log_window_keeps_double_precision():
    assert _on_host([torch.tensor(1.0), 0.1])[1] == 0.1  # not float32's 0.10000000149


def test_on_host_keeps_each_entry_exact_whatever_the_mix_of_dtypes_and_shapes():
    big = 2**25 + 1  # a token count float32 cannot hold: stacked with a float32 loss, it would round
    items = [torch.tensor(0.25), 0.1, torch.tensor(big), torch.tensor(True), torch.tensor([1.5]), 3,
             torch.tensor(False)]
    assert _on_host(items) == [0.25, 0.1, float(big), 1.0, 1.5, 3.0, 0.0]
    assert _on_host([]) == [] and _on_host([2, 0.5]) == [2.0, 0.5]


@pytest.mark.parametrize("seed", range(5))
def test_numbers_and_tensors_of_any_mix_reach_the_host_as_their_float64_values(seed):
    import random

    rng = random.Random(seed)
    makers = [lambda: rng.random(), lambda: rng.random() < 0.5, lambda: torch.tensor(rng.random()),
              lambda: torch.tensor(rng.random() < 0.5), lambda: torch.tensor([rng.randrange(10**8)]),  # a count
              lambda: torch.tensor(rng.random(), dtype=torch.float64)]
    for kinds in ([0, 1], [2], [3], [2, 4], [0, 2, 3, 4, 5], [4]):  # numbers only, one dtype, and mixes
        items = [makers[rng.choice(kinds)]() for _ in range(rng.randrange(1, 40))]
        assert _on_host(items) == [float(x) for x in items], items


@pytest.mark.parametrize("seed", range(10))
def test_a_window_of_numbers_sums_to_what_the_same_window_of_tensors_does(seed):
    """The CPU's window (numbers) and a GPU's (tensors) give the same sums, to the bit."""
    generator = torch.Generator().manual_seed(seed)
    losses, norms = torch.rand(50, generator=generator).tolist(), (10 * torch.rand(50, generator=generator)).tolist()
    skipped = set(torch.randint(0, 50, (3,), generator=generator).tolist())  # steps not taken: NaN losses
    as_numbers, as_tensors = TrainingSums(), TrainingSums()
    for i, (loss, norm) in enumerate(zip(losses, norms)):
        taken = i not in skipped
        loss, norm = (loss, norm) if taken else (float("nan"), float("inf"))
        as_numbers.add_step([(loss, {"mae": loss / 2}, 1.0)], norm, taken)
        tensor = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
        as_tensors.add_step([(tensor(loss), {"mae": tensor(loss / 2)}, 1.0)], tensor(norm), torch.tensor(taken))
    got, expected = as_numbers.take_window(), as_tensors.take_window()
    assert got == expected and got["loss"][1] == 50 - len(skipped) and math.isfinite(got["mae"][0])


@pytest.mark.parametrize("seed", range(20))
def test_a_window_whose_kinds_change_across_a_save_resumes_to_the_bit(seed):
    """Tensors before the save, numbers after it (a task whose metric is a tensor on some steps only): the
    resumed window holds numbers only, the uninterrupted one a mix, and both give the same sums."""
    generator = torch.Generator().manual_seed(seed)
    scales = 10.0 ** torch.randint(-8, 8, (40,), generator=generator)  # far apart: the order of a sum shows
    values = (torch.rand(40, generator=generator, dtype=torch.float64) * scales).tolist()

    def fill(sums, steps):
        for i in steps:
            metric = torch.tensor(values[i], dtype=torch.float64) if i < 10 else values[i]
            sums.add_step([(values[i], {"m": metric}, 1.0 + i % 3)], values[i], True)

    uninterrupted, resumed = uninterrupted_and_resumed(fill)
    assert resumed.take_window() == uninterrupted.take_window()


def test_a_window_of_numbers_with_infinite_values_sums_to_what_tensors_would():
    sums = TrainingSums()
    sums.add_step([(1.0, {"m": math.inf}, 1.0)], 1.0, True)
    sums.add_step([(1.0, {"m": -math.inf}, 1.0)], 3e38, True)
    got = sums.take_window()
    assert math.isnan(got["m"][0]) and got["loss"] == (2.0, 2.0) and got["grad_norm"] == (1.0 + 3e38, 2.0)


# ---- in a run: what tasks and callbacks report, whole-set metrics ------------------------------------


def test_numpy_numbers_and_one_element_tensors_from_a_task_or_a_callback_leave_checkpoints_readable(tmp_path):
    import numpy as np

    class NumPyRmse(RegressionTask):
        def finalize_metrics(self, metrics):
            rmse = {"val_rmse": np.sqrt(metrics["val_loss"]), "val_low": np.float64(metrics["val_loss"]) < 0.5} \
                if "val_loss" in metrics else {}
            return {**metrics, **rmse, "doubled": torch.tensor(2.0) * metrics["val_loss" if rmse else "loss"]}

    class Counter(Callback):
        def __init__(self):
            self.state = {"mean": np.float64(0.0), "seen": [np.int64(0)], "names": {"a"}, "dtype": torch.float16,
                          "shape": torch.Size([2]), "device": torch.device("cpu")}

        def on_step_end(self, engine):
            self.state["mean"] += np.float64(1.0)

        def state_dict(self):
            return self.state

        def load_state_dict(self, state):
            self.state = state

    settings = {"training": {"max_steps": 4}, "checkpoint": {"monitor": "val_rmse"}}
    train(tiny_config(tmp_path, **settings), NumPyRmse, callbacks=[Counter()])
    again, counter = tiny_config(tmp_path, **{**settings, "training": {"max_steps": 6}}), Counter()
    again.checkpoint.resume = "auto"
    engine, metrics = train(again, NumPyRmse, callbacks=[counter])  # the checkpoint reads back
    assert engine.step == 6 and counter.state == {"mean": 6.0, "seen": [0], "names": {"a"}, "dtype": torch.float16,
                                                  "shape": torch.Size([2]), "device": torch.device("cpu")}
    assert type(metrics["val_rmse"]) is float and type(engine.best_metric) is float


def test_whole_set_metrics_see_every_validation_row_once_and_can_be_monitored(tmp_path):
    from tests.helpers import WholeSetTask

    config = tiny_config(tmp_path, training={"epochs": 1}, checkpoint={"monitor": "val_rows", "mode": "max"})
    engine, metrics = train(config, WholeSetTask)
    targets = engine.data_module.val_set.tensors[1]
    assert metrics["val_rows"] == len(targets) == 25  # batches of 16: 16 and 9
    assert metrics["val_target_sum"] == pytest.approx(targets.double().sum().item())
    assert "val_rows" in engine.validation_metrics and engine.best_metric == 25
    assert engine.task._collected is None  # kept only while a validation runs
    _, metrics = train(tiny_config(tmp_path / "b", training={"epochs": 1, "eval_batches": 1}), WholeSetTask)
    assert metrics["val_rows"] == 16


@pytest.mark.parametrize("collect, score, message", [
    (lambda task, batch: task.collect(target=batch[1][: 1 + task._collected.__len__() % 2].sum()), None,
     r"^WholeSetTask\.collect got target as a one-number tensor, expected a tensor of rows"),
    (lambda task, batch: task.collect(**{"target" if task._collected else "first": batch[1]}), None,
     r"^WholeSetTask\.collect was given target for one batch and first for another: collect the same names"),
    (lambda task, batch: task.collect(target=batch[1].T if task._collected else batch[1]), None,
     r"^WholeSetTask\.collect: the rows of target cannot be joined across batches: "),
    (None, lambda task, collected: [1.0], r"^WholeSetTask\.score_collected returned list, expected a dict of metrics$"),
    (None, lambda task, collected: {"loss": 1.0},
     r"^WholeSetTask\.score_collected returned 'loss', a metric validation_step returns too: name one of them"),
])
def test_what_a_task_collects_or_scores_wrongly_is_one_line(tmp_path, collect, score, message):
    from tests.helpers import WholeSetTask

    class Wrong(WholeSetTask):
        def validation_step(self, batch, model, criterion):
            if collect is not None and self._collected is not None:
                collect(self, batch)
                return RegressionTask.validation_step(self, batch, model, criterion)
            return super().validation_step(batch, model, criterion)

        def score_collected(self, collected):
            return score(self, collected) if score is not None else {"rows": sum(map(len, collected.values()))}

    Wrong.__name__ = "WholeSetTask"
    with pytest.raises(UsageError, match=message):
        train(tiny_config(tmp_path, training={"epochs": 1}), Wrong)


def test_a_whole_set_metric_that_one_batch_cannot_give_is_checked_at_the_first_validation(tmp_path):
    from tests.helpers import WholeSetTask

    class OneBatchIsTooFew(WholeSetTask):  # as an AUC is, for a first batch of one class
        def score_collected(self, collected):
            if len(collected["target"]) <= 16:
                raise ValueError("Only one class present in y_true")
            return super().score_collected(collected)

    config = tiny_config(tmp_path, training={"epochs": 1}, checkpoint={"monitor": "val_rows", "mode": "max"})
    engine, metrics = train(config, OneBatchIsTooFew)
    assert metrics["val_rows"] == 25 and engine.best_metric == 25 and engine.validation_metrics is None
    config = tiny_config(tmp_path / "b", training={"epochs": 1}, checkpoint={"monitor": "val_row", "mode": "max"})
    with pytest.raises(UsageError, match=r"^checkpoint\.monitor: got 'val_row', expected a validation metric of "
                                         r"OneBatchIsTooFew: .*\(did you mean val_rows\?\)"):
        train(config, OneBatchIsTooFew)


def test_collected_rows_are_copies_on_the_cpu_and_half_floats_are_widened():
    from llm.training.core.metrics import collecting
    from tests.helpers import WholeSetTask

    task = WholeSetTask(Config())
    with collecting(task) as collected:
        logits = torch.zeros(64, 5000)
        task.collect(score=logits[:, 1], half=torch.ones(3, dtype=torch.bfloat16))
        logits.add_(7)
    score, half = collected[0]["score"], collected[0]["half"]
    assert torch.equal(score, torch.zeros(64)) and score.untyped_storage().nbytes() == 64 * 4  # not the batch's
    assert half.dtype == torch.float32
    task.collect(score=torch.zeros(2))  # outside a validation: nothing kept
    assert len(collected) == 1
