"""Layout features through the engine: activation checkpointing, compile, precision, accumulation."""

import pytest
import torch

from llm.errors import UsageError
from llm.training.core.checkpoint import CheckpointError
from llm.training.core.engine import TrainingEngine
from llm.training.core.parallel import load_model_and_optimizer
from llm.training.tasks.lm_task import IGNORE_INDEX, LMTask
from llm.training.tasks.regression_task import RegressionTask
from tests.helpers import lm_config, tiny_config, weights


def train_lm(config):
    engine = TrainingEngine(config, LMTask(config), 0, 1)
    return engine, engine.train()


def assert_close(a, b, **tol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tol)


def test_activation_checkpointing_gives_the_same_training_and_state_keys(tmp_path):
    plain, _ = train_lm(lm_config(tmp_path / "a", model={"dropout": 0.1}))
    checkpointed, _ = train_lm(lm_config(tmp_path / "b", model={"dropout": 0.1},
                                         training={"activation_checkpointing": True}))
    assert_close(weights(plain.raw_model), weights(checkpointed.raw_model), rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_needs_blocks(tmp_path):
    config = tiny_config(tmp_path, training={"activation_checkpointing": True})
    with pytest.raises(UsageError, match="needs a model with a .blocks list"):
        TrainingEngine(config, RegressionTask(config), 0, 1).train()


def test_compiled_blocks_train_like_eager_and_report_the_first_step_apart(tmp_path):
    # SGD: Adam's normalised update turns last-bit kernel differences of tiny gradients into lr-sized ones
    sgd = {"name": "sgd", "beta1": 0.0, "weight_decay": 0.0, "lr": 0.1}
    eager, _ = train_lm(lm_config(tmp_path / "a", optimizer=sgd))
    compiled, metrics = train_lm(lm_config(tmp_path / "b", training={"compile": True}, optimizer=sgd))
    assert_close(weights(eager.raw_model), weights(compiled.raw_model), rtol=1e-5, atol=1e-6)
    assert metrics["first_step_s"] > 0 and "tokens_per_s" in metrics


def test_bf16_autocast_trains_on_cpu(tmp_path):
    engine, metrics = train_lm(lm_config(tmp_path, training={"precision": "bf16", "max_steps": 30},
                                         optimizer={"lr": 0.01}))
    first = engine.checkpoints  # the run completed and saved
    assert first.latest_valid() is not None
    assert metrics["val_loss"] < 2.5  # from ln(vocab) ~ 3.4


def test_fp16_on_cpu_is_refused(tmp_path):
    config = tiny_config(tmp_path, training={"precision": "fp16"})
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        TrainingEngine(config, RegressionTask(config), 0, 1).train()


class PartlyMaskedLM(LMTask):
    """Targets past a point that varies from window to window are ignored, as padding would be."""

    counts: list[int] = []

    @staticmethod
    def mask(batch):
        x, y = batch
        keep = torch.arange(y.shape[1]) <= x[:, :1] % y.shape[1]
        return x, y.masked_fill(~keep, IGNORE_INDEX)

    def train_step(self, batch, model, criterion):
        return super().train_step(self.mask(batch), model, criterion)

    def loss_weight(self, batch):
        count = super().loss_weight(self.mask(batch))
        self.counts.append(int(count))
        return count


def test_token_weighted_lm_loss_accumulates_to_the_larger_batch(tmp_path):
    sgd = {"name": "sgd", "beta1": 0.0, "weight_decay": 0.0, "scheduler": "constant", "lr": 0.1}
    runs = []
    for name, training in (("a", {"batch_size": 8}), ("b", {"batch_size": 4, "grad_accum_steps": 2})):
        config = lm_config(tmp_path / name, training={**training, "grad_clip": 0.0}, optimizer=sgd)
        engine = TrainingEngine(config, PartlyMaskedLM(config), 0, 1)
        engine.train()
        runs.append(engine)
    big, small = runs
    assert big.step == small.step == 6
    halves = PartlyMaskedLM.counts[-12:]  # the accumulated run's micro-batches, in pairs
    assert any(halves[i] != halves[i + 1] for i in range(0, 12, 2))  # so a plain 1/k would weigh them wrongly
    assert_close(weights(big.raw_model), weights(small.raw_model), rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_whole_tensors_is_refused_by_a_sharded_run_in_one_line(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}  # as DDP and one process save
    with pytest.raises(CheckpointError, match="holds whole tensors.*--distributed-strategy ddp"):
        load_model_and_optimizer(model, optimizer, saved, tmp_path / "step_00000004", fsdp=True)
    load_model_and_optimizer(model, optimizer, saved, tmp_path / "step_00000004", fsdp=False)
