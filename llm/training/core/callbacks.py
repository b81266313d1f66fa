"""Callbacks: code that runs at fixed points of the training loop.

Where each hook fires (every hook takes the engine first)::

    on_train_start(engine)                      # model built, checkpoint restored
    while epochs and steps remain:
        on_epoch_start(engine)
        for each optimizer step:
            forward, backward, clip, optimizer step  (the engine's own work)
            on_step_end(engine)
            on_log(engine, record)              # every logging.log_every_steps steps
            if evaluation is due:
                validate
                on_validation_end(engine, metrics)
                on_log(engine, record)
            if a checkpoint is due: save
        validate, on_validation_end, on_log     # end of epoch
        on_epoch_end(engine, metrics)
        on_log(engine, record)
    on_log(engine, record)                      # the last steps, when off the logging schedule
    validate, on_validation_end, on_log         # the last step, when not validated yet
    on_train_end(engine, metrics)               # also after an error, for cleanup

Metrics reaching a callback are already averaged over ranks, and hooks run on
every rank: callbacks that write files check ``engine.is_main``. A callback adds
metrics with ``engine.log({...})``: to the validation's record in
``on_validation_end``, the epoch's in ``on_epoch_end``, else to the next
training record (none follows ``on_train_end``: refused there). It stops training
with ``engine.request_stop(reason)``; the engine agrees on the stop across ranks.
Callbacks with state implement ``state_dict``/``load_state_dict``; the state is
saved in checkpoints, under the callback's class name. ``engine.continues_run``
says whether the run resumed from its own folder's checkpoint rather than branched
from another run's, and ``engine.interrupted_by`` the signal that stopped it, if any.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm.errors import UsageError, closest
from llm.files import json_text, write_atomically

if TYPE_CHECKING:
    from llm.training.core.engine import TrainingEngine

log = logging.getLogger("llm")


class Callback:
    """Base class: every hook does nothing until overridden."""

    def on_train_start(self, engine: TrainingEngine) -> None: ...

    def on_epoch_start(self, engine: TrainingEngine) -> None: ...

    def on_step_end(self, engine: TrainingEngine) -> None: ...

    def on_validation_end(self, engine: TrainingEngine, metrics: dict[str, float]) -> None: ...

    def on_epoch_end(self, engine: TrainingEngine, metrics: dict[str, float]) -> None: ...

    def on_log(self, engine: TrainingEngine, record: dict[str, Any]) -> None: ...

    def on_train_end(self, engine: TrainingEngine, metrics: dict[str, float]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this callback: rank 0's, which every rank loads on a resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


HOOKS = tuple(name for name in vars(Callback) if name.startswith("on_"))
"""The hook names, in the order they are declared above."""


def improves(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` of a monitored metric beats ``best`` by more than ``min_delta`` (``mode``: min or max).

    NaN never improves, and anything that is not NaN beats a NaN best: one diverged
    evaluation must not become the best for good and hold every later one back.
    """
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return (best - value if mode == "min" else value - best) > min_delta


RECORD_KEYS = ("split", "step", "epoch")
"""The fields of every logged record, before its metrics: engine.log may not set them."""


def scalars(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """The numeric values of a log record as ``(<split>/<name>, value)``; split, step and epoch are the index."""
    split = record["split"]
    for key, value in record.items():
        if key not in RECORD_KEYS and isinstance(value, (int, float)):
            yield f"{split}/{key}", float(value)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"training": {"batch_size": 32}}`` -> ``{"training.batch_size": 32}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


METRICS_FILE = "metrics.jsonl"


def metrics_files(run_dir: str | Path, filename: str = METRICS_FILE) -> tuple[Path, Path]:
    """MetricsLogger's files in ``run_dir``: the records, and the records set aside."""
    path = Path(run_dir) / filename
    return path, path.with_name(f"{path.stem}.dropped{path.suffix}")


class MetricsLogger(Callback):
    """Appends every log record to ``<log_dir>/metrics.jsonl``; prints a line per validation and per epoch.

    A record holds its ``split`` (train, val or epoch), ``step`` and ``epoch``: the
    whole epochs trained when it was written (1 in the records that close the
    first epoch, and in the second epoch's training records), then its numbers.

    A resumed run continues the same file from the step it starts at. The records
    an earlier process logged after that step (it was killed before its next
    checkpoint, or the run went back to an older one), and a record a kill cut off
    halfway, are moved to ``metrics.dropped.jsonl``: this run trains and logs
    those steps again, so each step keeps one record, and nothing is deleted. A
    record of the step it starts at is moved there too if this run logs it again
    (a validation that ran after the checkpoint was taken). The training record a
    stop writes off the logging schedule stays: the next record averages the steps
    it covered again, with those that follow, as a run that never stopped does.
    """

    def __init__(self, filename: str = METRICS_FILE):
        self.filename = filename
        self._file = None
        self._path = self._aside = Path(filename)
        self._at_start: set[tuple[Any, Any]] = set()  # (split, step) of the records at the step resumed from

    def on_train_start(self, engine: TrainingEngine) -> None:
        if engine.is_main:
            self._path, self._aside = metrics_files(engine.run_dir, self.filename)
            moved = _move_lines(self._path, self._aside,
                                lambda line: not line.endswith(b"\n") or _step_of(line) > engine.step)
            if moved:
                engine.print(f"{self._path}: {moved} record(s) logged after step {engine.step}, where this run "
                             f"starts, moved to {self._aside.name}")
            if engine.step:
                self._at_start = {key for key in map(_key_of, _lines(self._path)) if key and key[1] == engine.step}
            self._file = open(self._path, "a", buffering=1)

    def on_log(self, engine: TrainingEngine, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        key = (record["split"], record["step"])
        if key in self._at_start:  # logged again: the earlier record goes aside (once, just after a resume)
            self._at_start.discard(key)
            self._file.close()
            _move_lines(self._path, self._aside, lambda line: line.endswith(b"\n") and _key_of(line) == key)
            self._file = open(self._path, "a", buffering=1)
        self._file.write(json_text(record) + "\n")
        if record["split"] == "train":
            return  # the progress bar shows these
        shown = "  ".join(f"{k} {v:.4g}" for k, v in record.items()
                          if k not in (*RECORD_KEYS, "lr") and isinstance(v, (int, float)))
        if record["split"] == "val":
            engine.print(f"step {record['step']}  {shown}")
        else:
            engine.print(f"epoch {record['epoch']}/{engine.config.training.epochs}  step {record['step']}  {shown}")

    def on_train_end(self, engine: TrainingEngine, metrics: dict[str, float]) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _lines(path: Path) -> list[bytes]:
    try:
        return path.read_bytes().splitlines(keepends=True)
    except FileNotFoundError:
        return []


def _move_lines(path: Path, aside: Path, late: Callable[[bytes], bool]) -> int:
    """Move the lines of the JSON lines file ``path`` that are ``late`` to the end of ``aside``; return how many."""
    lines = _lines(path)
    moved = {i for i, line in enumerate(lines) if late(line)}
    if moved:
        with open(aside, "ab") as f:  # first: a kill between the two writes then loses nothing
            f.writelines(line if line.endswith(b"\n") else line + b"\n" for i, line in enumerate(lines) if i in moved)
        write_atomically(path, b"".join(line for i, line in enumerate(lines) if i not in moved))
    return len(moved)


def _record(line: bytes) -> dict[str, Any]:
    """A line of metrics.jsonl as a dict; empty for one that is not a JSON object (cut off, written by hand, not
    UTF-8, nested too deep for the reader)."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return {}
    return record if isinstance(record, dict) else {}


def _key_of(line: bytes) -> tuple[Any, Any] | None:
    """A record's (split, step); None for a line that is not a record."""
    record = _record(line)
    split, step = record.get("split"), record.get("step")
    return (split, step) if isinstance(split, str) and isinstance(step, (int, float)) else None


def _step_of(line: bytes) -> float:
    """A record's step; minus infinity for a line that is not a record with a step."""
    step = _record(line).get("step")
    return step if isinstance(step, (int, float)) else -math.inf


class TensorBoardLogger(Callback):
    """Writes every logged metric as a TensorBoard scalar, tagged ``<split>/<name>``.

    ``log_dir`` defaults to the engine's run directory (``logging.log_dir``; a
    ``{task}`` in it is filled in as there, and the config's own ``log_dir`` is
    the run directory: see ``TrainingEngine.log_dir_of``). Records are handed to the event writer
    in batches, at the first step or record ``flush_secs`` seconds after the last
    batch, and at the end: its writer thread wakes once per batch rather than once
    per record, which cost a few hundred microseconds each. The writer itself puts
    events on disk no more often than that, and at each checkpoint, so that what was
    logged before a checkpoint is on disk with it. A resumed run hides, with
    TensorBoard's purge_step, what an earlier process logged after its checkpoint:
    those steps are trained and logged again.
    """

    def __init__(self, log_dir: str | None = None, flush_secs: float = 30.0):
        self.log_dir, self.flush_secs = log_dir, flush_secs
        self._writer = None
        self._batch: list[tuple[Any, int, float]] = []
        self._handed_at = 0.0

    def on_train_start(self, engine: TrainingEngine) -> None:
        if engine.is_main:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams

            log_dir = engine.run_dir if self.log_dir is None else engine.log_dir_of(self.log_dir)
            # events past the resumed step go, at step 0 too: a run that died before its first save wrote some
            self._writer = SummaryWriter(log_dir=str(log_dir), flush_secs=max(1, round(self.flush_secs)),
                                         purge_step=engine.step + 1)
            # the run's config as hparams, written into this run's own event file
            flat = flatten(dataclasses.asdict(engine.config))  # the paths as filled in
            params = {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool))}
            for summary in hparams(params, {f"val/{engine.config.checkpoint.monitor}": float("nan")}):
                self._writer.file_writer.add_summary(summary)
            self._handed_at = time.monotonic()

    def on_log(self, engine: TrainingEngine, record: dict[str, Any]) -> None:
        if self._writer is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalars(record)]
        self._batch.append((Summary(value=values), record["step"], time.time()))  # the time it was logged
        self._hand_over_if_due()

    def on_step_end(self, engine: TrainingEngine) -> None:
        self._hand_over_if_due()  # a record logged just before a long stretch without records is not held back

    def on_train_end(self, engine: TrainingEngine, metrics: dict[str, float]) -> None:
        if self._writer is not None:
            self._hand_over()
            self._writer.close()
            self._writer = None

    def state_dict(self) -> dict[str, Any]:
        """Nothing to restore; called at each save, it puts what was logged so far on disk."""
        if self._writer is not None:
            self._hand_over()
            self._writer.flush()
        return {}

    def _hand_over_if_due(self) -> None:
        if self._batch and time.monotonic() - self._handed_at >= self.flush_secs:
            self._hand_over()

    def _hand_over(self) -> None:
        for summary, step, walltime in self._batch:
            self._writer.file_writer.add_summary(summary, step, walltime)
        self._batch, self._handed_at = [], time.monotonic()


class EarlyStopping(Callback):
    """Stops training at the ``patience``-th validation in a row that does not improve ``monitor``.

    ``patience=0`` stops at the first validation that is no better than the best so far.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 5, mode: str = "min", min_delta: float = 0.0):
        if patience < 0:
            raise ValueError(f"EarlyStopping patience: got {patience}, expected an integer >= 0")
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping mode: got {mode!r}, expected 'min' or 'max'")
        if not min_delta >= 0:  # below 0, worse values would count as better ones
            raise ValueError(f"EarlyStopping min_delta: got {min_delta}, expected a number >= 0")
        self.monitor, self.patience, self.mode, self.min_delta = monitor, patience, mode, min_delta
        self.best: float | None = None
        self.wait = 0

    def on_train_start(self, engine: TrainingEngine) -> None:
        if engine.step == 0:  # a fresh run: a best and a count left by an earlier run of this instance go
            self.best, self.wait = None, 0
        # None when setup had no validation batch to find them on, or a whole-set score one batch cannot give
        names = engine.validation_metrics
        if names is not None and self.monitor not in names:  # now, not after an epoch of training
            raise UsageError(f"EarlyStopping monitor: got {self.monitor!r}, expected a validation metric of "
                             f"{type(engine.task).__name__}: {', '.join(names)}{closest(self.monitor, names)}")

    def on_validation_end(self, engine: TrainingEngine, metrics: dict[str, float]) -> None:
        if self.monitor not in metrics:
            raise KeyError(f"EarlyStopping monitors {self.monitor!r}, but validation reported {sorted(metrics)}")
        if improves(metrics[self.monitor], self.best, self.mode, self.min_delta):
            self.best, self.wait = metrics[self.monitor], 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            how = "been a number" if self.best is None else f"improved on {self.best:.6g}"  # None: all NaN so far
            engine.request_stop(f"early stopping: {self.monitor} has not {how} for {self.wait} evaluations")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "monitor": self.monitor, "mode": self.mode}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # a best of another metric, or of the other direction, is no bar for this one: it starts afresh
        if (state.get("monitor", self.monitor), state.get("mode", self.mode)) == (self.monitor, self.mode):
            self.best, self.wait = state["best"], state["wait"]


class LRSchedulerCallback(Callback):
    """Adds ``lr``, the learning rate the last step took, to the training records and to each epoch's.

    The scheduler has already set the next step's rate when a step ends, so the
    rate each step takes is read before it: at the end of the step before, or of
    the validation after it (where a ReduceLROnPlateau sets it). ``lr`` is the
    first parameter group's; when the groups' base rates differ (a lower one for a
    pretrained backbone), each further group's is logged too, as ``lr_group1``, ...
    """

    def __init__(self) -> None:
        self._groups = range(1)  # the parameter groups logged
        self._next: list[float] = []  # the rates the coming step takes
        self._last: list[float] = []  # the rates the last step took

    def on_train_start(self, engine: TrainingEngine) -> None:
        groups = engine.optimizer.param_groups  # a scheduler keeps each group's base rate; a warmup starts all at 0
        self._groups = range(len(groups) if len({g.get("initial_lr", g["lr"]) for g in groups}) > 1 else 1)
        self._next = self._rates(engine)

    def on_step_end(self, engine: TrainingEngine) -> None:
        self._last, self._next = self._next, self._rates(engine)
        if engine.step % engine.config.logging.log_every_steps == 0:  # only steps that are logged
            engine.log(self._named(self._last))

    def on_validation_end(self, engine: TrainingEngine, metrics: dict[str, float]) -> None:
        self._next = self._rates(engine)  # a ReduceLROnPlateau sets them here

    def on_epoch_end(self, engine: TrainingEngine, metrics: dict[str, float]) -> None:
        if self._last:
            engine.log(self._named(self._last))

    def _rates(self, engine: TrainingEngine) -> list[float]:
        groups = engine.optimizer.param_groups
        return [groups[i]["lr"] for i in self._groups]

    @staticmethod
    def _named(rates: list[float]) -> dict[str, float]:
        return {"lr": rates[0], **{f"lr_group{i}": rate for i, rate in enumerate(rates[1:], start=1)}}


class ProgressBar(Callback):
    """A tqdm bar on rank 0 with loss and throughput; only when stderr is a terminal."""

    def __init__(self):
        self._bar = None

    def on_train_start(self, engine: TrainingEngine) -> None:
        if engine.is_main and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=engine.total_steps, initial=engine.step, unit="step", dynamic_ncols=True)

    def on_step_end(self, engine: TrainingEngine) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def on_log(self, engine: TrainingEngine, record: dict[str, Any]) -> None:
        if self._bar is not None and record["split"] == "train":
            shown = {k: f"{record[k]:.4g}" for k in ("loss", "samples_per_s", "tokens_per_s") if k in record}
            self._bar.set_postfix(shown, refresh=False)

    def on_train_end(self, engine: TrainingEngine, metrics: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def write(self, line: str) -> bool:
        """Print above the bar; False when there is no bar."""
        if self._bar is None:
            return False
        self._bar.write(line)
        return True


# ---- callbacks in a checkpoint, and their failures ----------------------------------------

class CallbackError(RuntimeError):
    """A user callback raised; the message names it."""


def callback_error(cb: Callback, hook: str, e: Exception) -> CallbackError:
    return CallbackError(f"callback {type(cb).__name__}.{hook} failed: {type(e).__name__}: {e}")


def keyed_by_class(states: dict[str, Any]) -> dict[str, Any]:
    """Callback states as callback_keys names them. Earlier versions keyed them by place in the list
    (``3:EarlyStopping``), which a callback added or left out since shifts: those are matched by class, in order."""
    by_place = sorted((int(key.split(":", 1)[0]), key) for key in states if re.fullmatch(r"\d+:\w+", key))
    if not by_place:
        return states
    return dict(zip(_numbered([key.split(":", 1)[1] for _, key in by_place]), (states[key] for _, key in by_place)))


def callback_keys(callbacks: list[Callback]) -> list[str]:
    """Each callback's key in a checkpoint: its class name, so that adding, dropping or reordering others keeps
    its state its own."""
    return _numbered([type(cb).__name__ for cb in callbacks])


def _numbered(names: list[str]) -> list[str]:
    """``names`` with each repeat numbered from the second on: ``Announce``, ``Announce#2``."""
    seen: dict[str, int] = {}
    keys = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        keys.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return keys
