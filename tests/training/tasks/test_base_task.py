import pytest
import torch
from torch import nn

from llm.training.core.engine import TrainingEngine
from llm.training.tasks.base_task import TrainingTask
from tests.helpers import tiny_config


class WithoutScheduler(TrainingTask):
    """The five methods a task must have, and no build_scheduler."""

    def build_model(self):
        return nn.Linear(self.config.data.input_dim, 1)

    def build_optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=self.config.optimizer.lr)

    def build_criterion(self):
        return nn.MSELoss()

    def train_step(self, batch, model, criterion):
        x, y = batch
        return criterion(model(x), y), {}

    def validation_step(self, batch, model, criterion):
        return self.train_step(batch, model, criterion)


def test_build_scheduler_is_optional_and_follows_the_optimizer_flags(tmp_path):
    config = tiny_config(tmp_path, training={"epochs": 1}, optimizer={"lr": 0.01, "scheduler": "linear", "min_lr": 0.0})
    engine = TrainingEngine(config, WithoutScheduler(config))
    engine.train()
    assert engine.step == engine.total_steps == 230 // 16
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # decayed to min_lr at the end
