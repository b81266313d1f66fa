"""Training metrics between log records: what each step adds, and the sums a record averages.

A step only appends its values (tensors left on the device; on the CPU, numbers): nothing
is summed, and nothing leaves the device, until a record asks for the means, which it
reads with one device sync for all of them.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from llm.errors import UsageError, one_line
from llm.training.core import distributed as D
from llm.training.core.callbacks import RECORD_KEYS
from llm.training.tasks.base_task import TrainingTask


class TrainingSums:
    """One rank's training metrics since the last log record, and its loss over the epoch's records so far.

    The engine averages what ``take_window`` and ``close_epoch`` return over the
    ranks. A checkpoint holds each rank's ``state_dict()``, so that a resumed run
    logs the same means as one that never stopped.
    """

    def __init__(self) -> None:
        self.window = RunningMeans()  # losses and metrics since the last training record
        self.steps = 0  # optimizer steps since then, skipped ones included
        self.grad_norms: list[tuple[Any, Any]] = []  # each step's norm and whether it was taken
        self.epoch_loss = (0.0, 0.0)  # loss sum and count over the epoch's records so far

    def __len__(self) -> int:
        """Optimizer steps since the last training record."""
        return self.steps

    def add_step(self, micro_batches: list[tuple[float | torch.Tensor, dict[str, Any], float | torch.Tensor]],
                 grad_norm: float | torch.Tensor, taken: bool | torch.Tensor) -> None:
        """A step: each micro-batch's (loss, metrics, weight), and its gradient norm. ``taken`` (a bool, or a
        boolean tensor left on the device) says whether the optimizer took it; one not taken (a non-finite
        norm: a skipped step, an fp16 overflow) counts in the means only where its loss is finite, so that a
        NaN leaves them finite, and its gradient norm not at all."""
        for loss, metrics, weight in micro_batches:
            self.window.add(loss, metrics, weight, kept=taken)
        self.steps += 1
        self.grad_norms.append((grad_norm, taken))  # clip_grad_norm_'s: no graph to let go of

    def take_window(self) -> dict[str, tuple[float, float]]:
        """Each metric's weighted sum and total weight since the last record, ``grad_norm`` among them (the same
        on every rank); the window's loss joins the epoch's, and a new window starts."""
        local = self.window.totals()
        local.setdefault("loss", (0.0, 0.0))  # a window of skipped steps only: its loss is NaN, not absent
        loss_sum, count = local["loss"]
        self.epoch_loss = (self.epoch_loss[0] + loss_sum, self.epoch_loss[1] + count)
        local["grad_norm"] = self._grad_norm_total()
        self.window, self.steps, self.grad_norms = RunningMeans(), 0, []
        return local

    def _grad_norm_total(self) -> tuple[float, float]:
        """The window's sum of gradient norms over the steps taken, and how many were taken."""
        taken = self._taken_norms()
        return _sum(taken), float(len(taken))

    def _taken_norms(self) -> list[float]:
        """The window's gradient norms of the steps taken, on the host: the norms and the flags each of one kind
        (tensors, or the CPU's numbers), read apart; the second read waits for nothing."""
        if not self.grad_norms:
            return []
        norms, taken = zip(*self.grad_norms)
        return [norm for norm, kept in zip(_on_host(list(norms)), _on_host(list(taken))) if kept]

    def close_epoch(self) -> tuple[float, float]:
        """The epoch's loss sum and count: the windows already logged plus the one still open.

        That open window will be logged in the next epoch, so the next epoch's sum starts with its
        totals taken back off. Reset here, not when an epoch starts: a resumed epoch starts with its saved sum.
        """
        loss_sum, count = self.epoch_loss
        open_sum, open_count = self.window.total("loss")
        self.epoch_loss = (-open_sum, -open_count)
        return loss_sum + open_sum, count + open_count

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_loss": self.epoch_loss, "window_entries": self.window.entries(), "steps": self.steps,
                "grad_norms": self._taken_norms()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch_loss = tuple(state["epoch_loss"])
        if "window_entries" in state:
            self.window = RunningMeans.from_entries(state["window_entries"])
        else:  # saved by an earlier version, as totals: the same means, maybe not to the last bit
            self.window = RunningMeans.resumed(state["window"])
        self.grad_norms = [(norm, 1.0) for norm in state["grad_norms"]]
        self.steps = state.get("steps", len(self.grad_norms))  # saved before skipped steps were counted apart


class RunningMeans:
    """Losses and metrics of consecutive batches, kept as they come and averaged when read.

    Appending a tensor is all a step costs: nothing is summed, and nothing leaves
    the device, until a log record asks for the means.
    """

    def __init__(self) -> None:
        self.values: dict[str, list[Any]] = {}
        self.weights: list[float | torch.Tensor] = []  # tensors when the task counts items (loss_weight)
        self.kept: list[bool | torch.Tensor] = []  # False (or a false boolean tensor): the entry weighs nothing

    def __len__(self) -> int:
        return len(self.weights)

    def add(self, loss: float | torch.Tensor, metrics: dict[str, Any], weight: float | torch.Tensor = 1.0,
            kept: bool | torch.Tensor = True) -> None:
        if self.weights and (len(metrics) + 1 != len(self.values) or not self.values.keys() >= metrics.keys()):
            # a mean is over the batches of the window: each must have every metric
            earlier = sorted(self.values.keys() - {"loss"})
            raise UsageError(f"a step returned the metrics {sorted(metrics)} after {earlier}: train_step and "
                             f"validation_step must return the same metric names for every batch")
        self.weights.append(weight)
        self.kept.append(kept)
        # the engine's training losses come detached (on the CPU, as numbers): no second detach
        self.values.setdefault("loss", []).append(loss.detach() if getattr(loss, "requires_grad", False) else loss)
        for key, value in metrics.items():
            try:
                self.values.setdefault(key, []).append(value.detach() if isinstance(value, torch.Tensor) else
                                                       float(value))
            except (TypeError, ValueError):  # checked on the first step only: this one returned otherwise
                raise UsageError(f"a step returned metric {key!r} as a {type(value).__name__}, expected a number "
                                 f"or a one-element tensor") from None

    def total(self, key: str, weights: list[float] | None = None) -> tuple[float, float]:
        """The weighted sum of ``key`` and the total weight (``weights``: ``_weights()``, if already read).

        The values reach the host as numbers, whatever they were (tensors on a GPU, numbers on the CPU, numbers
        again in a window a checkpoint restored), and are summed there in one way: the same entries give the
        same sums to the bit, however their kinds were mixed.
        """
        weights = self._weights() if weights is None else weights
        values = self._numbers(key)
        # an entry that weighs nothing adds nothing, not even the NaN of a step not taken
        return _sum(value * weight for value, weight in zip(values, weights) if weight), _sum(weights)

    def _numbers(self, key: str) -> list[float]:
        """``key``'s values on the host, in one sync for the window."""
        try:
            return _on_host(self.values.get(key, []))
        except RuntimeError:  # a tensor of more than one number, where the first step's had one
            shapes = [tuple(v.shape) for v in self.values[key] if isinstance(v, torch.Tensor) and v.numel() != 1]
            if not shapes:
                raise
            raise UsageError(f"a step returned metric {key!r} as a tensor of shape {shapes[0]}, expected a number "
                             f"or a one-element tensor: the batch's mean, such as .mean()") from None

    def _weights(self) -> list[float]:
        """Each entry's weight, or 0 for one not kept whose loss is not finite: a step not taken (a skipped one,
        a loss scaler's overflow) still counts a finite loss, which its batch did have."""
        n = len(self.weights)
        read = _on_host(self.weights + self.kept + self.values.get("loss", []))  # one sync for the three
        return [weight if kept or math.isfinite(loss) else 0.0
                for weight, kept, loss in zip(read[:n], read[n:2 * n], read[2 * n:])]

    def totals(self) -> dict[str, tuple[float, float]]:
        """Every key's weighted sum and total weight, for a mean over ranks in which each item counts once."""
        weights = self._weights()  # read once: with counted items each read is a device sync
        return {key: self.total(key, weights) for key in self.values}

    def entries(self) -> dict[str, Any]:
        """Every entry as numbers on the host, for a checkpoint: a window rebuilt from them (from_entries)
        sums the same numbers in the same order as the one that kept going, so its means match to the bit."""
        return {"values": {key: list(self._numbers(key)) for key in self.values},
                "weights": list(_on_host(self.weights)), "kept": list(_on_host(self.kept))}

    @classmethod
    def from_entries(cls, entries: dict[str, Any]) -> RunningMeans:
        window = cls()
        window.values = {key: list(values) for key, values in entries["values"].items()}
        window.weights, window.kept = list(entries["weights"]), list(entries["kept"])
        return window

    @classmethod
    def resumed(cls, totals: dict[str, tuple[float, float]]) -> RunningMeans:
        """A window that an earlier version saved as its ``totals()``, as one entry of the same means."""
        window = cls()
        weight = next(iter(totals.values()), (0.0, 0.0))[1]  # every key of a window has the same total weight
        if weight:
            window.weights.append(weight)
            window.kept.append(True)
            window.values = {key: [value / weight] for key, (value, _) in totals.items()}
        return window


def _sum(numbers: Iterable[float]) -> float:
    """A sum of numbers, from the left: an infinity gives an infinite or NaN sum, as it should (math.fsum
    raises on +inf and -inf)."""
    return sum(numbers, 0.0)


def _on_host(items: list[float | torch.Tensor]) -> list[float]:
    """Numbers and one-element tensors as floats on the host: a single device sync, whatever the mix.

    A list of numbers alone (the CPU's window) is returned as it is: making tensors of it costs a hundred
    microseconds a window. Tensors are stacked a dtype at a time (stacking mixed dtypes would round a large
    count to a float32 loss's precision): a few operations for a window of any length, not a few per entry.
    """
    kinds = set(map(type, items))
    if kinds <= {float, int, bool}:
        return items
    if not any(issubclass(kind, torch.Tensor) for kind in kinds):  # NumPy numbers and the like
        return [float(item) for item in items]
    first = items[0]
    if all(isinstance(item, torch.Tensor) and item.dtype == first.dtype and item.dim() == 0 for item in items):
        return torch.stack(items).double().cpu().tolist()  # losses, or norms: one dtype, one stack
    out = [0.0 if isinstance(item, torch.Tensor) else float(item) for item in items]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            by_dtype.setdefault(item.dtype, []).append(i)
    stacked = [torch.stack([items[i] if items[i].dim() == 0 else items[i].reshape(()) for i in at]).double()
               for at in by_dtype.values()]
    for i, value in zip([i for at in by_dtype.values() for i in at], torch.cat(stacked).cpu().tolist()):
        out[i] = value
    return out


# ---- what a task's methods return, as the records take them ----------------------------

def finalized_metrics(task: TrainingTask, metrics: dict[str, float]) -> dict[str, float]:
    """The task's finalize_metrics of rank-averaged metrics, as floats; one line for a method that changes
    the dict in place and returns nothing, or returns what is no number (found in setup, on a first batch)."""
    return _as_numbers(task.finalize_metrics(metrics), f"{type(task).__name__}.finalize_metrics",
                    "the dict of metrics: return it, changed or not")


def _as_numbers(returned: Any, where: str, expected: str) -> dict[str, float]:
    """The metrics a task's method returned, as floats; else one line naming what is wrong."""
    if not isinstance(returned, Mapping):
        raise UsageError(f"{where} returned {type(returned).__name__}, expected {expected}")
    return {key: float(number) for key, number in  # a float in a checkpoint, whatever number it was
            record_numbers(returned, f"{where} returned", "name the metric otherwise").items()}


def record_numbers(values: Mapping[str, Any], where: str, advice: str) -> dict[str, int | float]:
    """``values`` as built-in numbers, for a record (see built_in_number); else one line, ``where`` then the
    name: a field every record has, which ``advice`` says what to do about, or a value that is no number."""
    numbers = {}
    for key, value in values.items():
        if key in RECORD_KEYS:
            raise UsageError(f"{where} {key!r}, a field every record has ({', '.join(RECORD_KEYS)}), set by the "
                             f"engine: {advice}")
        number = built_in_number(value)
        if number is None:
            raise UsageError(f"{where} {key!r} as a {type(value).__name__}, expected a number or a one-element tensor")
        numbers[key] = number
    return numbers


def built_in_number(value: Any) -> int | float | None:
    """A number, a NumPy number or a one-element tensor as a built-in int or float, which the JSON and TensorBoard
    writers and a checkpoint take; None for anything else."""
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        value = value.item()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return float(value) if isinstance(value, numbers.Real) else None


@contextlib.contextmanager
def collecting(task: TrainingTask) -> Iterator[list[dict[str, Any]] | None]:
    """What ``task.collect`` keeps while the block runs, a list of each call's tensors; None, and nothing kept,
    for a task that scores nothing over the whole set (no score_collected of its own)."""
    if type(task).score_collected is TrainingTask.score_collected:
        yield None
        return
    task._collected = []
    try:
        yield task._collected
    finally:
        task._collected = None


def whole_set_metrics(task: TrainingTask, collected: list[dict[str, Any]] | None, everywhere: bool = True,
                      beside: Mapping[str, float] = {}) -> dict[str, float]:
    """``task.score_collected`` of what every rank collected (this one's alone unless ``everywhere``), as
    ``val_*`` metrics to log ``beside`` the validation means; {} when nothing was collected."""
    if collected is None:
        return {}
    every = [rows for ranks in (D.gather(collected) if everywhere else [collected]) for rows in ranks]
    if not every:
        return {}
    where, names = type(task).__name__, set(every[0])
    for rows in every:
        if set(rows) != names:
            raise UsageError(f"{where}.collect was given {', '.join(sorted(rows))} for one batch and "
                             f"{', '.join(sorted(names))} for another: collect the same names for every batch")
        for name, value in rows.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                shown = "a one-number tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
                raise UsageError(f"{where}.collect got {name} as {shown}, expected a tensor of rows, one per "
                                 f"sample (or token) of the batch along its first dimension")
    joined = {}
    for name in sorted(names):
        try:
            joined[name] = torch.cat([rows[name] for rows in every])
        except RuntimeError as e:
            raise UsageError(f"{where}.collect: the rows of {name} cannot be joined across batches: "
                             f"{one_line(e)}") from None
    scored = task.score_collected(joined)
    if not isinstance(scored, Mapping):
        raise UsageError(f"{where}.score_collected returned {type(scored).__name__}, expected a dict of metrics")
    # named as logged: a metric "step" is val_step, no field of the record
    metrics = _as_numbers({f"val_{key}": value for key, value in scored.items()}, f"{where}.score_collected",
                       "a dict of metrics")
    if clash := sorted(metrics.keys() & beside.keys()):
        raise UsageError(f"{where}.score_collected returned {clash[0][4:]!r}, a metric validation_step returns "
                         f"too: name one of them otherwise")
    return metrics
