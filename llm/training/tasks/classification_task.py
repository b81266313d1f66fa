"""ClassificationTask: an MLP classifier with cross-entropy and accuracy.

Written against the usage guide alone, as a user would write their own task.
"""

from __future__ import annotations

import torch
from torch import nn, optim
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

from llm.training.tasks.base_task import TrainingTask


class ClassificationTask(TrainingTask):
    default_data_module = "classification"

    def build_model(self) -> nn.Module:
        d, m = self.config.data, self.config.model
        act = nn.Sequential(nn.ReLU(), nn.Dropout(m.dropout)) if m.dropout else nn.ReLU()  # weight names as without
        return nn.Sequential(nn.Linear(d.input_dim, m.n_embd), act, nn.Linear(m.n_embd, d.num_classes))

    def build_optimizer(self, model: nn.Module) -> optim.Optimizer:
        o = self.config.optimizer
        return optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)

    def build_scheduler(self, optimizer: optim.Optimizer) -> LRScheduler | None:
        # total_steps is set by the engine before this is called
        return CosineAnnealingLR(optimizer, T_max=max(1, self.total_steps), eta_min=self.config.optimizer.min_lr)

    def build_criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    def train_step(self, batch, model: nn.Module, criterion: nn.Module) -> tuple[torch.Tensor, dict]:
        x, y = batch
        logits = model(x)
        return criterion(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}

    def validation_step(self, batch, model: nn.Module, criterion: nn.Module) -> tuple[torch.Tensor, dict]:
        return self.train_step(batch, model, criterion)
