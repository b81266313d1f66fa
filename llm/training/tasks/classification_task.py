"""ClassificationTask: an MLP classifier with cross-entropy, accuracy and macro F1.

Written against the usage guide alone, as a user would write their own task.
It leaves build_scheduler out, so it trains on the schedule the --optimizer-*
flags set.
"""

from __future__ import annotations

import torch
from torch import nn, optim

from llm.errors import UsageError
from llm.training.core.optim import build_optimizer
from llm.training.tasks.base_task import TrainingTask
from llm.training.tasks.regression_task import mlp


IGNORED = -100
"""A label the loss leaves out (cross-entropy's ignore_index): padding, an unlabelled sample."""


class ClassificationTask(TrainingTask):
    default_data_module = "classification"

    def build_model(self) -> nn.Module:
        d, m = self.config.data, self.config.model
        return mlp(d.input_dim, m.n_embd, m.n_layer, d.num_classes, m.dropout)

    def build_optimizer(self, model: nn.Module) -> optim.Optimizer:
        return build_optimizer(model, self.config.optimizer)

    def build_criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss(ignore_index=IGNORED, reduction="sum")

    def train_step(self, batch, model: nn.Module, criterion: nn.Module) -> tuple[torch.Tensor, dict]:
        x, y = batch
        if not y.is_floating_point() and y.dtype != torch.long:  # a data set's own int32 labels: the loss takes long
            y = y.long()
        logits = model(x)
        try:
            loss = criterion(logits, y)
        except IndexError as e:  # on the CPU; on a GPU a label out of range stops the run in a device assert
            raise UsageError(f"a batch holds a label outside 0..{logits.size(-1) - 1} (data.num_classes="
                             f"{logits.size(-1)}): {e}") from None
        predicted = logits.argmax(-1)
        self.collect(predicted=predicted, label=y)  # kept in validation only, for the whole set's F1
        # means over the labels counted (loss_weight): a batch with none has loss 0 and weighs nothing, where a
        # plain mean would be 0/0 = NaN; a label ignored is no miss
        counted = self.loss_weight(batch)
        label = y.argmax(-1) if y.dim() > 1 else y  # soft or one-hot targets: their likeliest class
        hits = ((predicted == label) & (label != IGNORED)).sum()
        return loss / counted.clamp(min=1), {"acc": hits / counted.clamp(min=1)}

    def loss_weight(self, batch) -> torch.Tensor:
        """The labels the loss counts: those not ignored (every row, with soft targets)."""
        y = batch[1]
        return (y != IGNORED).sum() if y.dim() == 1 else torch.tensor(y.shape[0], device=y.device)

    def validation_step(self, batch, model: nn.Module, criterion: nn.Module) -> tuple[torch.Tensor, dict]:
        return self.train_step(batch, model, criterion)

    def score_collected(self, collected: dict[str, torch.Tensor]) -> dict[str, float]:
        """Macro F1 over the whole validation set: each class's F1, 2·TP / (2·TP + FP + FN), averaged over the
        classes that are labels or predictions in it (a class in neither has no F1 to count). Soft or one-hot
        targets count as their likeliest class; a label the loss ignores (IGNORED) is left out."""
        k = self.config.data.num_classes
        label, predicted = collected["label"], collected["predicted"].long()
        label = label.argmax(-1) if label.dim() > 1 else label.long()
        kept = label != IGNORED  # a label the loss ignores has no class
        label, predicted = label[kept], predicted[kept]
        confusion = torch.bincount(label * k + predicted, minlength=k * k).view(k, k).double()
        hits = confusion.diagonal()
        seen = confusion.sum(0) + confusion.sum(1)  # predictions plus labels of each class: 2·TP + FP + FN
        present = seen > 0
        return {"f1": (2 * hits[present] / seen[present]).mean().item() if present.any() else 0.0}
