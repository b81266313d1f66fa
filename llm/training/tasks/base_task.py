"""TrainingTask: what to train and how to score it. The engine does the optimising."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn, optim
from torch.optim.lr_scheduler import LRScheduler

from llm.training.core.config import Config, fitted_settings, settings_of
from llm.training.core.optim import build_scheduler

if TYPE_CHECKING:
    from llm.data.data_module import BaseDataModule


class TrainingTask(ABC):
    """Subclass and implement the abstract methods below; build_scheduler is optional.

    A task computes (model, loss, metrics); it never calls ``backward()`` or
    steps the optimizer. Before building anything the engine sets
    ``self.data_module`` (set up, so the task can read e.g. its vocabulary) and
    ``self.total_steps`` (optimizer steps the run will take, for schedules).
    """

    default_data_module: str = "synthetic"
    """Data module used when ``data.module`` is empty: a built-in name or package.module:Class."""
    tokens_per_sample: int | None = None
    """Set by language tasks so throughput is also reported in tokens/s."""
    Settings: type | None = None
    """A dataclass of the task's own settings, read as ``self.config.custom``: each field (int, float, bool, str or
    a Literal of strings, with a default and a docstring under it) is a flag --custom-<field>, a variable
    LLM_CUSTOM_<FIELD> and a key of the YAML section ``custom``, recorded in the run's config.yaml."""

    def __init__(self, config: Config):
        settings = fitted_settings(config, settings_of(type(self)), f"{type(self).__module__}:{type(self).__qualname__}")
        if settings is not config.custom:  # a config built in code, without them: a copy with them at their defaults,
            config = copy.copy(config)     # the caller's left as it was (the engine, too, trains on a copy)
            config.custom = settings
        self.config = config
        self.data_module: BaseDataModule | None = None
        self.total_steps: int = 0
        self._collected: list[dict[str, torch.Tensor]] | None = None  # a list while a validation collects

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model, on the CPU; the engine moves and wraps it."""

    @abstractmethod
    def build_optimizer(self, model: nn.Module) -> optim.Optimizer:
        """The optimizer over the model's parameters."""

    def build_scheduler(self, optimizer: optim.Optimizer) -> LRScheduler | None:
        """A learning-rate scheduler stepped once per optimizer step, or None for a constant rate; a
        ReduceLROnPlateau is stepped after each validation instead, with checkpoint.monitor's value.

        Optional: by default, the schedule the config sets (optimizer.scheduler,
        warmup_steps, min_lr) over the run's ``total_steps``, scaling the rate each
        group of ``optimizer`` starts with.
        """
        return build_scheduler(optimizer, self.config.optimizer, self.total_steps)

    @abstractmethod
    def build_criterion(self) -> nn.Module:
        """The loss function."""

    @abstractmethod
    def train_step(self, batch: Any, model: nn.Module, criterion: nn.Module) -> tuple[torch.Tensor, dict]:
        """Loss of one micro-batch (already on the device) and metrics to log (tensors or numbers)."""

    @abstractmethod
    def validation_step(self, batch: Any, model: nn.Module, criterion: nn.Module) -> tuple[torch.Tensor, dict]:
        """Loss and metrics of one validation batch; the engine averages them."""

    def loss_weight(self, batch: Any) -> float | torch.Tensor | None:
        """How many items the loss of ``batch`` is a mean over (e.g. its target tokens that are not ignored).

        Called on the batch as ``train_step`` gets it, on the device: return a
        tensor there (not a Python number) and the step needs no CPU-GPU sync.
        When it returns a count, the engine weights each micro-batch's loss by its
        share of the items in the whole optimizer step, over every micro-batch and
        rank, so the gradient is that of one mean over all of them however the
        step is split; validation means are weighted the same way. None (the
        default): every micro-batch weighs the same, and validation batches by
        the first dimension of their first tensor, their number of samples when
        they are batch-first (a time-major batch returns its count here).

        A micro-batch may hold no item (every label ignored): its loss must then be
        0, not the NaN of a mean over nothing, which stops the run as any loss that
        is not a number does (training.nan_policy). Compute it as a sum over
        ``count.clamp(min=1)``, as the built-in classification and LM tasks do.
        """
        return None

    def collect(self, **rows: torch.Tensor) -> None:
        """Keep tensors of this validation batch for ``score_collected``, by name: rows along the first dimension
        (a prediction and a label per sample, say). Call it once in ``validation_step`` with the same names for
        every batch; elsewhere (a ``train_step`` that validation_step shares) it keeps nothing. The rows are
        copied to the CPU, half-precision floats (autocast's) as float32."""
        if getattr(self, "_collected", None) is not None:
            self._collected.append({name: _kept(value) for name, value in rows.items()})

    def score_collected(self, collected: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics of the whole validation set that no mean of batches gives (F1, AUC, ...), from what
        ``validation_step`` collected: each name's rows of every batch and rank, concatenated, on the CPU.
        Logged as ``val_<name>`` beside the means. At set-up it is called on the first batch's rows, to learn
        the names (``checkpoint.monitor`` may be one): it returns the same names for any rows. Default: none."""
        return {}

    def finalize_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Add metrics derived from rank-averaged ones (e.g. perplexity from loss); default: none."""
        return metrics

    def save_artifacts(self, directory: Path) -> None:
        """Write files needed to use the model on its own (e.g. a tokenizer) into ``directory``: the same
        files for the same model and data (a resume compares them with the checkpoint's)."""


def _kept(value: Any) -> Any:
    """A collected tensor as score_collected gets it: a copy on the CPU (not a view holding the whole batch's
    storage, nor one that a later in-place change reaches), half-precision floats as float32."""
    if not isinstance(value, torch.Tensor):
        return value  # refused, in one line, when the rows are joined
    value = value.detach()
    if value.dtype in (torch.float16, torch.bfloat16):
        return value.to("cpu", torch.float32)  # a copy already
    return value.to("cpu", copy=True)
