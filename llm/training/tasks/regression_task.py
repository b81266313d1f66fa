"""RegressionTask: an MLP fitted with mean squared error."""

from __future__ import annotations

import torch
from torch import nn, optim

from llm.training.core.optim import build_optimizer
from llm.training.tasks.base_task import TrainingTask


def mlp(n_in: int, n_hidden: int, n_layers: int, n_out: int, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n_layers):
        # dropout goes with the activation: a layer of its own would renumber the weights after it
        act = nn.Sequential(nn.GELU(), nn.Dropout(dropout)) if dropout else nn.GELU()
        layers += [nn.Linear(n_in if i == 0 else n_hidden, n_hidden), act]
    layers.append(nn.Linear(n_hidden if n_layers else n_in, n_out))
    return nn.Sequential(*layers)


class RegressionTask(TrainingTask):
    """Predict one number from ``data.input_dim`` features."""

    default_data_module = "synthetic"

    def build_model(self) -> nn.Module:
        m = self.config.model
        return mlp(self.config.data.input_dim, m.n_embd, m.n_layer, 1, m.dropout)

    def build_optimizer(self, model: nn.Module) -> optim.Optimizer:
        return build_optimizer(model, self.config.optimizer)

    def build_criterion(self) -> nn.Module:
        return nn.MSELoss()

    def train_step(self, batch, model: nn.Module, criterion: nn.Module) -> tuple[torch.Tensor, dict]:
        x, y = batch
        return criterion(model(x), y), {}

    def validation_step(self, batch, model: nn.Module, criterion: nn.Module) -> tuple[torch.Tensor, dict]:
        x, y = batch
        pred = model(x)
        return criterion(pred, y), {"mae": (pred - y).abs().mean()}
