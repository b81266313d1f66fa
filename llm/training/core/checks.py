"""What the user's code hands the engine, checked: a task's steps and methods, a data module's loaders.

Each check fails in one line (a UsageError) naming the class, the method and what
it returned, at the first step or in set-up, not with a traceback steps later.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import re
import traceback
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

import numpy as np
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DistributedSampler

from llm.data.data_module import BaseDataModule, ShardSampler
from llm.errors import UsageError, closest, one_line
from llm.training.core import distributed as D
from llm.training.core.batches import on_device
from llm.training.core.callbacks import RECORD_KEYS
from llm.training.core.config import CheckpointConfig, Config
from llm.training.core.metrics import collecting, finalized_metrics, whole_set_metrics
from llm.training.tasks.base_task import TrainingTask

TRAINING_FIGURES = ("grad_norm", "skipped_steps", "loss_scale", "overflow_steps")
"""What the engine adds to a training record beside the loss: a task's metric may not take these names."""


def loss_and_metrics(task: Any, returned: Any, method: str = "train_step") -> tuple[torch.Tensor, dict[str, Any]]:
    """What ``train_step`` (or ``validation_step``) returned, checked: a one-number loss tensor and a dict of
    numbers; else one line naming what is wrong, not an unpacking error or a shape error steps later."""
    where = f"{type(task).__name__}.{method}"
    if isinstance(returned, (tuple, list)) and len(returned) == 2:
        loss, metrics = returned
        if isinstance(loss, torch.Tensor) and isinstance(metrics, Mapping):
            if loss.numel() != 1:
                raise UsageError(f"{where} returned a loss of shape {tuple(loss.shape)}, expected one number: "
                                 f"the batch's mean, such as loss.mean()")
            if method == "train_step" and not loss.requires_grad and torch.is_grad_enabled():
                raise UsageError(f"{where} returned a loss that no gradient flows back from (requires_grad False): "
                                 f"compute it from the model's output, not under torch.no_grad(), .detach() or "
                                 f".item()")
            own = ("loss", *(TRAINING_FIGURES if method == "train_step" else ()), *RECORD_KEYS)
            if clash := [name for name in own if name in metrics]:
                raise UsageError(f"{where} returned a metric named {clash[0]!r}, a field its record has already "
                                 f"({', '.join(own)}): name the metric otherwise")
            for key, value in metrics.items():
                if not (value.numel() == 1 if isinstance(value, torch.Tensor) else isinstance(value, numbers.Real)):
                    shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else \
                        f"a {type(value).__name__}"
                    raise UsageError(f"{where} returned metric {key!r} as {shown}, expected a number or a "
                                     f"one-element tensor: the batch's mean, such as .mean()")
            return loss, metrics
    shown = f"({', '.join(type(x).__name__ for x in returned)})" if isinstance(returned, (tuple, list)) else \
        type(returned).__name__
    raise UsageError(f"{where} returned {shown}, expected (loss, metrics): the loss "
                     f"tensor and a dict of metrics, such as (loss, {{}})")


@contextlib.contextmanager
def broadcast_refused(task: TrainingTask, method: str) -> Iterator[None]:
    """A loss of ``task.<method>`` that broadcasts its targets against predictions of another shape is a
    UsageError in this context: MSE of (B,) against (B, 1) is the mean of a B x B grid, which trains on nonsense
    with no error, only torch's warning. The first validation batch is checked so too
    (check_task_takes_the_data), but a run may have none, or a train_step of its own."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=BROADCAST_WARNING, category=UserWarning)
        try:
            yield
        except Exception as e:  # the warning itself, or wrapped in torch.compile's error where it traced the loss
            sizes = BROADCAST_SIZES.search(str(e))
            if sizes is None:  # another warning an outer filter (python -W error) made an error, or another failure
                raise
            raise UsageError(f"{type(task).__name__}.{method}: the loss would broadcast its targets against "
                             f"predictions of another shape: {sizes[0]} ({raised_at(e)}); make them the same "
                             f"shape") from None


BROADCAST_WARNING = ".*different to the input size"
"""What torch warns of when a loss broadcasts targets against predictions of another shape (a filter's message)."""


BROADCAST_SIZES = re.compile(r"Using a target size \(torch\.Size\(\[[^\]]*\]\)\) that is different to the input size "
                             r"\(torch\.Size\(\[[^\]]*\]\)\)")
"""The two sizes in that warning."""


@contextlib.contextmanager
def out_of_memory(what: str, instead: str) -> Iterator[None]:
    """An allocation larger than the machine can give, in one line (not one the kernel grants and then kills)."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        # the CPU allocator says "tried to allocate 4000 bytes", CUDA's "Tried to allocate 20.00 GiB"
        asked = re.search(r"(?i)tried to allocate ([\d.]+) ?(bytes|[KMGT]iB)", str(e))
        overflowed = "size calculation overflowed" in str(e)  # more bytes than a 64-bit count holds
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and asked is None and not overflowed:
            raise
        scale = {"bytes": 2**-30, "kib": 2**-20, "mib": 2**-10, "gib": 1, "tib": 2**10}
        size = f": it asked for {float(asked[1]) * scale[asked[2].lower()]:,.1f} GiB at once" if asked else \
            ": it asked for more bytes than a 64-bit count holds" if overflowed else ""
        raise UsageError(f"{what} ran out of memory{size}; ask for {instead}, "
                         f"or use a machine with more memory") from None


def checkpointable(value: Any, where: str) -> Any:
    """``value`` as a checkpoint can hold it, which loads it without running code: numbers, strings, tensors, and
    dicts, lists, tuples and sets of them; a NumPy number becomes a Python one. Anything else is refused in one
    line naming ``where`` it came from, at the first save, not found unreadable at the resume."""
    if isinstance(value, np.generic) and type(value.item()) in _PLAIN:
        return value.item()  # first: a float64 is a float too, but pickled as NumPy's
    if type(value) in _PLAIN or isinstance(value, torch.Tensor):  # not a subclass (an IntEnum): pickled as itself
        return value
    if isinstance(value, dict):  # an OrderedDict or a defaultdict too, as a dict
        return {checkpointable(k, where): checkpointable(v, where) for k, v in value.items()}
    if type(value) in (list, tuple, set):
        return type(value)(checkpointable(v, where) for v in value)
    raise UsageError(f"{where} holds a {type(value).__module__}.{type(value).__qualname__}, which a checkpoint "
                     f"cannot hold: it holds numbers, strings, tensors, and dicts, lists, tuples and sets of them "
                     f"(a NumPy array as a tensor, a deque as a list, an Enum as its value)")


_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.Size, torch.dtype, torch.device)
"""What a checkpoint holds as it is, besides tensors (torch.load with weights_only reads these)."""


def no_monitor(monitor: str, names: list[str], task: TrainingTask) -> NoReturn:
    raise UsageError(f"checkpoint.monitor: got {monitor!r}, expected a validation metric of "
                     f"{type(task).__name__}: {', '.join(names)}{closest(monitor, names)}")


def check_plateau(scheduler: Any, config: Config, task: str) -> None:
    """A ReduceLROnPlateau is stepped with checkpoint.monitor's value: it must count the same direction as better."""
    if isinstance(scheduler, ReduceLROnPlateau) and scheduler.mode != config.checkpoint.mode:
        c = config.checkpoint
        better = "lower" if c.mode == "min" else "higher"
        raise UsageError(f"{task}.build_scheduler returned ReduceLROnPlateau(mode={scheduler.mode!r}), which is "
                         f"stepped with checkpoint.monitor {c.monitor}, better {better} (checkpoint.mode {c.mode}): "
                         f"give it mode={c.mode!r}")


def loaders_of(data_module: BaseDataModule, method: str, rank: int, world_size: int) -> tuple[Any, Any]:
    """The data module's ``method`` (train_dataloader, ...), checked: a (loader, sampler) pair; else one line,
    not a traceback."""
    got = getattr(data_module, method)(rank, world_size)
    name = f"{type(data_module).__name__}.{method}()"
    pair = isinstance(got, (tuple, list)) and len(got) == 2
    # a list of two batches (list(loader)) unpacks as a pair too: a batch where the sampler should be
    if not pair or got[0] is None or _a_batch(got[1]):
        shown = f"({', '.join(type(x).__name__ for x in got)})" if isinstance(got, (tuple, list)) else \
            type(got).__name__
        raise UsageError(f"{name} returned {shown}, expected a (DataLoader, DistributedSampler) pair, as "
                         f"self.build_dataloader(...) gives; without data for it, a loader over an empty data set")
    loader, sampler = got
    if method != "train_dataloader" and isinstance(sampler, DistributedSampler) and not sampler.drop_last and \
            type(sampler).__iter__ is DistributedSampler.__iter__ and sampler.total_size > len(sampler.dataset):
        # it repeats a few items to even out the ranks' shares, which validation would count twice
        batch_sampler = getattr(loader, "batch_sampler", None)
        if getattr(batch_sampler, "sampler", None) is sampler:  # each item once instead, the loader as it was
            sampler = ShardSampler(sampler.dataset, num_replicas=sampler.num_replicas, rank=sampler.rank,
                                   shuffle=False)
            batch_sampler.sampler = sampler
            return loader, sampler
        raise UsageError(f"{name}: its DistributedSampler repeats {sampler.total_size - len(sampler.dataset)} "
                         f"of the {len(sampler.dataset)} {'test' if method == 'test_dataloader' else 'validation'} "
                         f"items to even out {sampler.num_replicas} ranks' "
                         f"shares, which validation would count twice: build the loader with "
                         f"self.build_dataloader(dataset, rank, world_size, train=False), whose sampler does not")
    return loader, sampler


def _a_batch(value: Any) -> bool:
    """Whether ``value`` is what a loader yields, not a sampler: a tensor, or a dict, list or tuple holding one."""
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, torch.Tensor) or (isinstance(value, (list, tuple))
                                               and any(isinstance(v, torch.Tensor) for v in value))


def raised_at(e: BaseException) -> str:
    """file:line of the innermost frame of ``e`` outside torch: most often the task's own code."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f"{os.sep}torch{os.sep}" not in f.filename]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "inside torch"


HIGHER_IS_BETTER = re.compile(r"(^|_)(acc|accuracy|f1|auc|auroc|precision|recall|bleu|rouge\w*|iou|dice|r2)($|_)",
                              re.IGNORECASE)


LOWER_IS_BETTER = re.compile(r"(^|_)(loss|err|error|errors|mse|mae|rmse|ppl|perplexity)($|_)", re.IGNORECASE)
"""Metric names that usually grow as a model improves, and those that shrink (a dice loss, a recall error):
one of the first, none of the second, monitored with checkpoint.mode min is likely a slip."""


def check_task_takes_the_data(task: TrainingTask, data_name: str, model: torch.nn.Module, criterion: Any, batch: Any,
                          device: torch.device, autocast: contextlib.AbstractContextManager,
                          checkpoint: CheckpointConfig, warn: bool) -> list[str] | None:
    """One validation step of ``task`` on the first ``batch`` of the data module ``data_name``, moved to
    ``device``, in set-up, before anything is written or wrapped; returns the names validation reports, or
    None where one batch cannot tell (a whole-set metric such as an AUC of one class).

    A task given a data module whose batches it cannot use then fails here in
    one line, not at its first training step with a traceback; so does a
    checkpoint.monitor that validation does not report. The step runs in eval
    mode without gradients, and on forked random streams, so the run itself is
    the same with or without it. ``warn``: this process gives the warnings
    (rank 0).
    """
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            with autocast, warnings.catch_warnings(), collecting(task) as collected:
                warnings.filterwarnings("error", message=BROADCAST_WARNING, category=UserWarning)
                returned = task.validation_step(on_device(batch, device), model, criterion)
    except torch.OutOfMemoryError:
        raise
    except (*NOT_FITTING, UserWarning) as e:
        if D.op_with_no_deterministic_form(e):  # the setting's fault, not the data module's
            raise
        raise not_fitting(task, "validation_step", data_name, e) from None
    finally:
        model.train()
    _, metrics = loss_and_metrics(task, returned, "validation_step")
    means = {f"val_{k}": 1.0 for k in ("loss", *metrics)}
    try:
        whole = whole_set_metrics(task, collected, everywhere=False, beside=means)
    except UsageError:
        raise
    except Exception:  # noqa: BLE001 - what one batch cannot give (an AUC of one class): the first validation says
        whole = None
    names = sorted(finalized_metrics(task, {**means, **(whole or {})}))
    monitor = checkpoint.monitor
    if monitor not in names and whole is not None:  # found now, not at the first validation after an epoch
        no_monitor(monitor, names, task)
    if (checkpoint.mode == "min" and HIGHER_IS_BETTER.search(monitor) and not LOWER_IS_BETTER.search(monitor)
            and warn):
        warnings.warn(f"checkpoint.monitor {monitor} is kept at its lowest (checkpoint.mode min), as a loss "
                      f"is: if higher is better, give --checkpoint-mode max")
    return names if whole is not None else None


NOT_FITTING = (TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError)
"""What a task's step raises on a batch it cannot take: a shape, a type, a key or an index that does not fit."""


def not_fitting(task: TrainingTask, method: str, data_name: str, e: BaseException) -> UsageError:
    """The one line for ``task.<method>`` failing with ``e`` on the first batch of the data module ``data_name``:
    the error, the line of the task's code it came from, and what to change."""
    return UsageError(f"{type(task).__name__}.{method} failed on the first batch of {data_name}: {type(e).__name__}: "
                      f"{one_line(e, 200)} ({raised_at(e)}); does the data module yield what the task takes? Choose "
                      f"another with --data-module, or make the task's steps take its batches")


@contextlib.contextmanager
def first_training_batch(task: TrainingTask, data_name: str) -> Iterator[None]:
    """The context of ``task.train_step`` on this process's first training batch, which the validation batch
    checked in set-up (check_task_takes_the_data) may not be like (a data module whose two loaders differ, or
    no validation data): a loss that broadcasts its targets (broadcast_refused), or an error of a batch the task
    cannot take (NOT_FITTING), is a UsageError in one line. Not for a compiled model, whose errors at its first
    step are most often the compiler's."""
    try:
        with broadcast_refused(task, "train_step"):
            yield
    except (UsageError, torch.OutOfMemoryError):
        raise
    except NOT_FITTING as e:
        if D.op_with_no_deterministic_form(e):  # the setting's fault, not the data module's
            raise
        raise not_fitting(task, "train_step", data_name, e) from None
