"""LMTask: train a GPT on next-token prediction over a text corpus."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn, optim
from torch.optim.lr_scheduler import LRScheduler

from llm.errors import UsageError
from llm.models.gpt import GPT, GPTConfig
from llm.training.core.config import Config
from llm.training.core.optim import build_optimizer, build_scheduler
from llm.training.tasks.base_task import TrainingTask


class LMTask(TrainingTask):
    """Next-token cross-entropy over every position of (inputs, targets) windows."""

    default_data_module = "text"

    def __init__(self, config: Config):
        super().__init__(config)
        self.tokens_per_sample = config.model.block_size

    def gpt_config(self) -> GPTConfig:
        """The model's config: ``config.model`` plus the data module's vocabulary."""
        if self.data_module is None:
            raise RuntimeError("LMTask needs task.data_module (set up) before building the model")
        tokenizer = getattr(self.data_module, "tokenizer", None)
        if tokenizer is None:
            raise UsageError(
                f"task lm needs a data module with a tokenizer (such as text), "
                f"got {type(self.data_module).__name__}"
            )
        m = self.config.model
        return GPTConfig(
            vocab_size=tokenizer.vocab_size, block_size=m.block_size, n_layer=m.n_layer, n_head=m.n_head,
            n_embd=m.n_embd, dropout=m.dropout, bias=m.bias, pos_emb=m.pos_emb, norm=m.norm, mlp=m.mlp,
            tie_embeddings=m.tie_embeddings,
        )

    def build_model(self) -> nn.Module:
        return GPT(self.gpt_config())

    def build_optimizer(self, model: nn.Module) -> optim.Optimizer:
        return build_optimizer(model, self.config.optimizer)

    def build_scheduler(self, optimizer: optim.Optimizer) -> LRScheduler | None:
        return build_scheduler(optimizer, self.config.optimizer, self.total_steps)

    def build_criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    def train_step(self, batch, model: nn.Module, criterion: nn.Module) -> tuple[torch.Tensor, dict]:
        x, y = batch
        logits = model(x)
        return criterion(logits.flatten(0, 1), y.flatten()), {}

    def validation_step(self, batch, model: nn.Module, criterion: nn.Module) -> tuple[torch.Tensor, dict]:
        return self.train_step(batch, model, criterion)

    def finalize_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Add perplexity, exp(mean loss): ``ppl`` from ``loss``, ``val_ppl`` from ``val_loss``."""
        out = dict(metrics)
        for loss_key, ppl_key in (("loss", "ppl"), ("val_loss", "val_ppl")):
            if loss_key in metrics:
                loss = float(metrics[loss_key])
                out[ppl_key] = math.exp(loss) if loss < 700 else math.inf  # exp overflows past ~709
        return out

    def save_artifacts(self, directory: Path) -> None:
        """``tokenizer.json`` and ``model_config.json``: with the weights, all a user needs to sample."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.gpt_config()
        self.data_module.tokenizer.save(directory / "tokenizer.json")
        tmp = directory / f".model_config.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        os.replace(tmp, directory / "model_config.json")
