"""TrainingEngine: the loop. The task computes; the engine optimises.

``train()`` reads top to bottom: set up, then epochs of optimizer steps with
validation, logging and checkpoints at their intervals, then a summary.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import os
import re
import shutil
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from llm.cli import stdout_gone
from llm.data.data_module import BaseDataModule
from llm.errors import UsageError, one_line
from llm.files import FolderLock, json_text, run_files, write_atomically
from llm.training.core import distributed as D
from llm.training.core import parallel, resume
from llm.training.core.batches import batch_len, on_device
from llm.training.core.callbacks import (HOOKS, Callback, ProgressBar, callback_error, callback_keys, flatten,
                                         improves, keyed_by_class)
from llm.training.core.checkpoint import (
    BackgroundSave,
    CheckpointError,
    CheckpointManager,
    copied_to_cpu,
    hash_for_rank_0,
    hashes_shared_out,
    load_rank_state,
    load_shared_state,
    load_weights_strictly,
    model_weights,
    name_for_every_node,
    resolve_checkpoint,
    step_name,
    verify,
)
from llm.training.core.checks import (broadcast_refused, check_plateau, check_task_takes_the_data, checkpointable,
                                      first_training_batch, loaders_of, loss_and_metrics, no_monitor, out_of_memory)
from llm.training.core.config import Config, fitted_settings, settings_of
from llm.training.core.loading import (SETUP_STREAM, TRAIN_STREAM, VAL_STREAM, SeededBatches, TrainingBatches,
                                       WorkerStart, is_stream, iterate, mixed_seed, rank_seed, rng_state,
                                       seed_everything, set_rng_state, validation_batches)
from llm.training.core.metrics import (RunningMeans, TrainingSums, collecting, finalized_metrics, record_numbers,
                                       whole_set_metrics)
from llm.training.core.nonfinite import StepChecks, overflowed
from llm.training.core.optim import WeightAverage, warmup_outlasting, zero_missing_momentum
from llm.training.core.registry import data_module_name, data_module_of, resolve_data_module, task_name
from llm.training.core.signals import TrainingInterrupted, stop_on_signals
from llm.training.tasks.base_task import TrainingTask

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SHARED_STATE = ("scheduler", "scaler", "best_metric", "val_metrics", "train_metrics", "progress", "callbacks", "config")
"""The entries of a checkpoint's state.pt, beside the weights, that a resume needs (``pending_log`` and
``scheduler_kind`` are read when there: checkpoints of earlier versions lack them)."""
RECORD_OF_HOOK = {"on_validation_end": "val", "on_epoch_end": "epoch"}
"""The log record that engine.log() adds to, by the hook it is called from; any other hook's: the training one."""


OUT_OF_TIME = "reached training.max_minutes"
"""How the stop_reason of a run stopped by its time limit begins."""
SAID_BY_RANK_0 = ("resuming .*-process state on ",
                  "resuming mid-epoch with ", ".* takes no new attribute", "the training loader's batch sampler is not",
                  "resuming a stream with ", "replaying the ", "the stream's loader keeps its workers",
                  "the stream's loader was saved with ", "a pass over the stream took ")
"""The starts of the warnings every rank meets alike in set-up: loading a checkpoint (rank 0 alone looks for it), a
data set that its loader workers cannot seed batch by batch."""


class TrainingEngine:
    def __init__(
        self,
        config: Config,
        task: TrainingTask,
        rank: int | None = None,
        world_size: int | None = None,
        data_module: BaseDataModule | None = None,
        callbacks: list[Callback] | None = None,
    ):
        """``rank`` and ``world_size`` not given are torchrun's (RANK, WORLD_SIZE), or 0 and 1 when run plainly:
        a script that builds an engine trains on all the processes torchrun starts.

        The engine trains on a copy of ``config`` taken here (``engine.config``), which the task and data module
        that held the caller's object read too: that object is left as it was, and changing it afterwards (the
        next run of a sweep) does not reach this engine."""
        config = copy.deepcopy(config)
        if rank is None or world_size is None:
            env_rank, env_world_size, _ = D.env_ranks()
            rank = env_rank if rank is None else rank
            world_size = env_world_size if world_size is None else world_size
        # a config built in code has not been through from_dict or the command line: check it and fill
        # in its derived paths ({task} in logging.log_dir, checkpoint.dir) here; validate() is idempotent
        self.config, self.task, self.rank, self.world_size = config.validate(), task, rank, world_size
        self.local_rank = int(os.environ.get("LOCAL_RANK", rank))  # set by torchrun; a rank of its own when spawned
        if data_module is None:
            data_module = resolve_data_module(data_module_of(config, task))(config)
        self.data_module = data_module
        for holder in (task, data_module):  # what builds the model and the data reads what config.yaml records
            # none: an __init__ that skipped super().__init__(config), whose build_model or setup may read it
            if isinstance(getattr(holder, "config", config), Config):  # else the caller's, or an earlier engine's
                with contextlib.suppress(AttributeError):  # a config of its own, read-only
                    holder.config = config
        # config.yaml names the classes that train, not those the config named: a resume and the tools rebuild them
        # the run directory as the caller's config names it: filled in for its own task, which a task given in
        # code may not be (Config.from_yaml, then TensorBoardLogger(log_dir=config.logging.log_dir) and MyTask)
        self._log_dir_given = config.logging.log_dir
        named_task, config.task = config.task, task_name(type(task), config.task)
        config.custom = fitted_settings(config, settings_of(type(task)), config.task)
        if config.task != named_task:  # Config() left at its default task: {task} in log_dir is this task's
            config.validate()
        named = config.data.module or task.default_data_module
        if (recorded := data_module_name(type(data_module), named if isinstance(named, str) else "")) != named:
            config.data.module = recorded  # the task's default stays unnamed
        self.callbacks = list(callbacks or [])
        # per hook, only the callbacks that override it: most hooks of most callbacks do nothing
        self._listeners = {hook: [cb for cb in self.callbacks if getattr(type(cb), hook) is not getattr(Callback, hook)]
                           for hook in HOOKS}
        self.is_main = rank == 0
        self.run_dir = Path(config.logging.log_dir)
        self.device = D.pick_device(config, self.local_rank)
        self.exit_on_second_signal = False  # the command line's choice: see stop_on_signals
        self._started = False  # train() was called: a second call starts from the state below again
        self._start_afresh()

    def log_dir_of(self, path: str | os.PathLike) -> Path:
        """Where a callback given ``path`` for its files writes: ``{task}`` filled in with this run's task, and
        the caller's ``logging.log_dir``, filled in before the engine named the run after its task, taken as
        the run directory it now names."""
        if os.path.realpath(os.path.expanduser(path)) == os.path.realpath(self._log_dir_given):
            return self.run_dir
        return Path(self.config.fill_in(os.path.expanduser(path)))

    @property
    def data_wait_s(self) -> float:
        """Seconds spent waiting for the training loader (ThroughputMonitor reads it)."""
        return self.train_batches.wait_s if self.train_batches is not None else 0.0

    def _start_afresh(self) -> None:
        """The state of a run that has not started; setup() and a resume fill it in."""
        # progress: what a checkpoint must hold to continue exactly
        self.step = 0  # optimizer steps taken
        self.epoch = 0  # epochs completed
        self.batch_in_epoch = 0  # micro-batches consumed in the current epoch
        self.train_batches: TrainingBatches | None = None  # the training loader's, built in setup
        self._steps_a_pass: int | None = None  # a stream's: the steps of the first whole pass this process made
        self.samples_seen = 0  # training samples over all ranks
        self.step_checks: StepChecks | None = None  # which steps were taken, and the count of those not: in setup
        self.aside_s = 0.0  # time spent validating, saving and writing profiles, which throughput figures leave out
        self.first_step_s: float | None = None  # the first step of this process, compilation included
        self._after_first_step = (0.0, 0.0, 0)  # when that step ended, aside_s then, samples_seen then
        self.should_stop, self.stop_reason = False, ""
        self._deadline: float | None = None  # time.monotonic() of training.max_minutes, set when training starts
        self._held_stop = ""  # a stop asked for with request_stop, which a resume from here keeps
        self.validation_metrics: list[str] | None = None  # the names validation reports, once checked in setup
        self.ema: WeightAverage | None = None  # the weight average (training.ema_decay), built in setup
        self._saved_step: int | None = None  # the step of this process's last checkpoint (maybe still being written)
        self._saves: BackgroundSave | None = None  # the save in flight, with checkpoint.async_save
        self._saved_at = 0.0  # time.monotonic() at that save, or when training started: for every_n_minutes
        self._run_locks: list[FolderLock] = []  # rank 0's holds on the run and checkpoint folders while it trains
        self._per_step_scheduler: Any = None  # the scheduler, unless it steps on validations (ReduceLROnPlateau)
        self._found_empty = False  # rank 0 found the run folder empty: nothing there is another run's
        self._logged = False  # a record went to the loggers: a failure leaves the run's folder as it is
        self._loaded: Path | None = None  # the checkpoint this run resumed from
        self.continues_run = False  # resumed from a checkpoint of its own folder, not branched from another run's
        self.train_metrics: dict[str, float] = {}  # the last logged training record
        self.val_metrics: dict[str, float] = {}  # the last validation, with the step it ran at
        self.best_metric: float | None = None  # best value of checkpoint.monitor so far
        self._best_step: int | None = None  # the step whose validation set it, in this process
        self._pending: dict[str, dict[str, float]] = {}  # engine.log() values by the record they go to
        self._clashed: set[tuple[str, str]] = set()  # (split, key) of engine.log() values that a record had
        self._hook = ""  # the hook now firing
        self._sums = TrainingSums()  # this rank's training metrics since the last log, and the epoch's loss
        self._signal: int | None = None  # a signal this process received
        self._signalled_at = 0.0  # time.monotonic() when it came
        self._agent = D.torchrun_agent()  # the pid of the torchrun agent that started this process, if one did
        self._agent_gone = False  # it, or another rank's, died before any signal came: the stop is taken as SIGTERM
        self.interrupted_by: signal.Signals | None = None  # a signal some rank received, agreed by all of them

    # ---- the loop ------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        """Train until epochs or max_steps run out, or a stop is agreed; return the final metrics.

        With world_size > 1 and no process group yet, the engine joins one from the variables torchrun sets,
        and leaves it when the process exits.
        """
        if self._started:  # again, on this engine: nothing of the last call carries over but what it saved
            if self._saves is not None:  # a save the last call was stopped (Ctrl-C) from waiting for ends first
                with contextlib.suppress(Exception):
                    self._saves.wait()
            self._start_afresh()
        self._started, self._began = True, time.monotonic()  # set-up counts against training.max_minutes
        D.join_process_group(self.config, self.rank, self.world_size, self.local_rank)
        try:
            self.setup()
        except BaseException:  # its check of the first batches may have started the loaders' workers
            self._stop_workers()
            raise
        started, metrics, ok = time.perf_counter(), {}, False
        self._saved_at = time.monotonic()
        minutes = self.config.training.max_minutes
        self._deadline = self._began + 60 * minutes if minutes else None
        self._first_sample = self.samples_seen
        try:
            self._fire("on_train_start")
            self._stop_before_a_step()
            with stop_on_signals(self):
                while not self._finished():
                    self.train_epoch()
                metrics, checkpoint = self.finish(time.perf_counter() - started)
            ok = True
        finally:
            try:
                self._wait_for_save(failing=not ok)  # a run failing: the save in flight is work kept
                self._fire_cleanup(metrics, ok)
            finally:  # even when Ctrl-C ends a callback's cleanup (a tracker's upload)
                self.model = self.raw_model  # let go of the DDP wrapper and its pending communication
                self._stop_workers()
                self._let_go_of_run_dir(failed=not ok)
        if self.interrupted_by is not None:
            raise TrainingInterrupted(self.interrupted_by, self.step, checkpoint, self._agent_gone)
        return metrics

    def train_epoch(self) -> None:
        """Optimizer steps until the epoch ends or a stop is agreed, with logs, evaluations and saves due."""
        t = self.config.training
        self.train_batches.set_epoch(self.epoch)
        self._fire("on_epoch_start")
        if self._stop_before_a_step():
            return
        first_step, whole = self.step, self.batch_in_epoch == 0  # a whole pass, to count a stream's steps by
        self.model.train()  # once per epoch, not per step: validate() puts the mode back as it found it
        for micro_batches, last_of_epoch in self.train_batches.groups(self.epoch, self.batch_in_epoch):
            self.optimizer_step(micro_batches)
            self._fire("on_step_end")
            if self._due(self.config.logging.log_every_steps):
                self._flush_log("train", self._window_metrics())
            if self._due(t.eval_every_steps) and not last_of_epoch:  # the epoch's own comes below, as it closes
                self.validate()
            if last_of_epoch:
                break  # the epoch's end comes first: its validation, then the stop and the save below
            if self._end_step():
                return
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        if self.train_batches.stream and whole and self._steps_a_pass is None:
            self._steps_a_pass = self.step - first_step
            self._warn_if_passes_end_first()
        metrics = {"train_loss": self._close_epoch_loss(), **self._validated()}
        began = time.perf_counter()  # the validation counts itself aside
        self._fire("on_epoch_end", metrics)
        self._flush_log("epoch", metrics)
        self.aside_s += time.perf_counter() - began
        self._end_step()

    def _warn_if_passes_end_first(self) -> None:
        """After a stream's first whole pass: warn if training.epochs passes like it end the run before max_steps,
        which the learning-rate schedule spans (it would end far from its end)."""
        t = self.config.training
        ends_at = self.step + (t.epochs - self.epoch) * self._steps_a_pass
        if ends_at < t.max_steps:
            with self._warned_by_rank_0():
                warnings.warn(f"a pass over the stream took {self._steps_a_pass} steps: training.epochs={t.epochs} "
                              f"passes end the run at about step {ends_at}, before training.max_steps="
                              f"{t.max_steps}, which the learning-rate schedule spans; raise training.epochs to "
                              f"train to max_steps")

    def _end_step(self) -> bool:
        """After a step, and after the epoch it ends: agree whether to stop and whether the clock or a better
        validation calls for a save, then save if due. A run about to finish is saved by finish(), after its last
        validation. Returns whether to stop."""
        self._stop_at_max_steps()
        if self._deadline is not None and not self._finished() and time.monotonic() >= self._deadline:
            # not held in the checkpoint, as request_stop's is: a resume has a time limit of its own
            self.should_stop = True
            self.stop_reason = f"{OUT_OF_TIME}={self.config.training.max_minutes:g}"
        c = self.config.checkpoint
        clock_due = bool(c.every_n_minutes) and time.monotonic() - self._saved_at >= 60 * c.every_n_minutes
        # a validation that beat the best is saved (where checkpoints are kept for their score, and saved before
        # the end), so that the best checkpoint holds the best weights validated, not the best of those the
        # schedule happened to save; agreed with the clock's, as a task's whole-set score may differ between ranks
        # in its last bit
        best_due = self._best_step == self.step and c.keep_best > 0 and bool(c.every_n_steps or c.every_n_minutes)
        stop, save_due = self._agree_to_stop(clock_due or best_due)
        due = save_due or self._due(c.every_n_steps)
        if due and not self._finished() and self._saved_step != self.step:
            self.save_checkpoint()
        return stop

    def _stop_before_a_step(self) -> bool:
        """Whether a stop asked for in on_train_start or on_epoch_start, on any rank, holds: agreed there, so that
        every rank leaves the loop before the step, rather than the others taking it and waiting on that rank."""
        return (self.should_stop or self.world_size > 1) and self._agree_to_stop(save_due=False)[0]

    def _stop_at_max_steps(self) -> None:
        max_steps = self.config.training.max_steps
        if max_steps and self.step >= max_steps and not self.should_stop:  # a resume may raise it
            self.should_stop = True
            self.stop_reason = f"reached max_steps={max_steps}" if self.step == max_steps else \
                f"resumed at step {self.step}, past max_steps={max_steps}"  # a lower one: no step taken

    def finish(self, elapsed: float) -> tuple[dict[str, float], Path]:
        """Log the last steps, validate the final weights, save them, write the summary.

        The checkpoint holds the state from before that last log and validation, which
        may fall off their schedule: a run continued from it (a higher max_steps, after
        the time limit) logs the open window with the steps that follow and counts, for
        early stopping, only the validations a run that never stopped would have made.
        A run stopped by a signal with steps left neither logs nor validates off schedule.
        """
        self._stop_at_max_steps()  # a run resumed at max_steps took no step to say so
        state = self._resumable_state()
        rate = self._samples_per_s(elapsed)  # before the last validation and save below
        trained = self.first_step_s is not None  # else a finished run started again: its last record is logged
        if trained and len(self._sums):
            window = self._window_metrics()
            if self.interrupted_by is None or self._held_stop or self._out_of_steps():  # no step follows a resume
                self._flush_log("train", window)
            else:  # for summary.json alone: the resumed run logs these steps with the window they are part of, as
                self.train_metrics = window  # the run that never stopped does, and the records are the same
        validating = self.interrupted_by is None and self.val_metrics.get("step") != self.step
        if self.interrupted_by is None:
            self._validated()
        if trained or validating or self._saved_step != self.step:
            checkpoint = self.save_checkpoint(state)  # first: what the summary fails to write must not cost it
            self._wait_for_save()
            return self._summary(elapsed, rate), checkpoint
        # nothing new to save: the checkpoints are pruned, as a save that was killed before pruning would have,
        # and summary.json stays the run's (it is written if a full disk lost it)
        if self._loaded is not None:
            self.checkpoints.retain(keep=self._loaded)
        return self._summary(elapsed, rate, write=not (self.run_dir / "summary.json").exists()), self._loaded

    def optimizer_step(self, micro_batches: list[Any]) -> None:
        """Forward and backward over the micro-batches, then one clipped optimizer step."""
        began = time.perf_counter()
        k, first = len(micro_batches), self.first_step_s is None
        scaler = self.scaler if self.scaler.is_enabled() else None
        checks = self.step_checks
        batches = self._to_device(micro_batches)
        scales, counts = self._loss_scales(batches)
        losses, recorded = [], []
        for i, batch in enumerate(batches):
            # the steps after the first enter a context that does nothing: no cost added to the loop
            with self._first_batch_checked() if first else _UNCHECKED:
                if self._bare_forward:  # one process in fp32: no context to enter
                    returned = self.task.train_step(batch, self.model, self.criterion)
                else:  # gradients are all-reduced once, on the last micro-step, not k times
                    with self._gradient_sync(i == k - 1), self._autocast():
                        returned = self.task.train_step(batch, self.model, self.criterion)
            try:
                # checked on this process's first step; a later step's only if it fails below (a loss per sample
                # fails backward), which costs the steps that return what the first one did nothing
                loss, metrics = loss_and_metrics(self.task, returned) if first else returned
                scaled = loss * scales[i] if k > 1 or counts else loss
                (scaled if scaler is None else scaler.scale(scaled)).backward()
                # the window and the check below keep its value, not its graph: on the CPU a number, read at no cost
                loss = loss.item() if checks.host_reads else loss.detach()
            except Exception:
                loss_and_metrics(self.task, returned)  # one line if what it returned is amiss
                raise
            recorded.append((loss, metrics, counts[i] if counts else 1.0))
            losses.append(loss)
        found_inf = None
        if scaler is not None:
            scaler.unscale_(self.optimizer)
            found_inf = overflowed(scaler, self.optimizer)
        grad_norm = parallel.full_tensor(torch.nn.utils.clip_grad_norm_(self._params, self._clip))
        if checks.host_reads:
            grad_norm = grad_norm.item()
        taken = checks.taken(grad_norm, losses)
        checks.check()  # the last step's: its work is done by now, so reading it stalls nothing
        checks.update(taken, scaler)
        if self.ema is not None:
            self.ema.update(self.step + 1, taken)
        if self._per_step_scheduler is not None:
            if first:  # a first step skipped (not finite; a loss scaler's overflow) is no loop stepping them misordered
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
                    self._per_step_scheduler.step()
            else:
                self._per_step_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._sums.add_step(recorded, grad_norm, taken)
        checks.note(self.step + 1, taken, losses, found_inf)
        self.step += 1
        self.batch_in_epoch += k
        # counted in this rank's batches, which a loader of the data module's own may size otherwise (a short last
        # one), times the ranks: a DistributedSampler gives every rank as many
        self.samples_seen += sum(map(batch_len, micro_batches)) * self.world_size
        if first:
            self._after_first_step = (time.perf_counter(), self.aside_s, self.samples_seen)
            self.first_step_s = self._after_first_step[0] - began

    def _first_batch_checked(self) -> contextlib.AbstractContextManager:
        """The context of the first step's forward: its errors of a batch the task cannot take, one line each
        (checks.first_training_batch); a compiled model's are the compiler's, left as they are, but for a loss
        that broadcasts its targets."""
        if self.config.training.compile:
            return broadcast_refused(self.task, "train_step")
        return first_training_batch(self.task, type(self.data_module).__name__)

    def _loss_scales(self, batches: list[Any]) -> tuple[list[Any], list[torch.Tensor]]:
        """What each micro-batch's loss is multiplied by before backward, and the task's item counts.

        1/k for k micro-batches, so that they give the gradient of one batch k times
        as large. When the task counts the items each loss is a mean over
        (``loss_weight``), each micro-batch's share of the step's items over all
        ranks instead: DDP and FSDP average gradients over ranks, so the share is
        taken against the mean over ranks of each rank's total. Counts and shares
        stay tensors on the device: no CPU-GPU sync.
        """
        k = len(batches)
        first = self.task.loss_weight(batches[0])
        if first is None:
            return [1.0 / k] * k, []
        counts = [first, *(self.task.loss_weight(batch) for batch in batches[1:])]
        counts = [torch.as_tensor(c, dtype=torch.float32, device=self.device) for c in counts]
        total = D.mean_tensor_over_ranks(torch.stack(counts).sum())
        # clamped only to keep a step with no items anywhere at 0/tiny = 0: not to one item a rank, which would
        # scale down a step whose few items (fewer than the ranks) sit on some ranks
        return [c / total.clamp(min=torch.finfo(total.dtype).tiny) for c in counts], counts

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean loss and metrics over the validation set (or eval_batches of it), averaged over ranks."""
        began = time.perf_counter()
        model = self.raw_model
        if self.world_size > 1:  # every rank scores its shard with rank 0's buffers, which DDP and FSDP (parallel.wrap)
            D.broadcast_buffers(self._buffers)  # train with and the checkpoint saves
        was_training = model.training
        model.eval()
        sums = RunningMeans()
        with collecting(self.task) as collected, self.ema.swapped_in() if self.ema else contextlib.nullcontext():
            for batch, counted in validation_batches(self.val_loader, self.config.training.seed, self.rank, self.step,
                                                     self.config.training.eval_batches or None, self.sharded):
                batch = self._to_device(batch)
                kept = len(collected or ())
                with self._autocast():
                    loss, metrics = self.task.validation_step(batch, model, self.criterion)
                if counted:
                    count = self.task.loss_weight(batch)
                    sums.add(loss, metrics, weight=batch_len(batch) if count is None else count)
                elif collected is not None:  # a batch repeated for FSDP's collectives: its rows are no more
                    del collected[kept:]
        model.train(was_training)
        local = {f"val_{k}": v for k, v in sums.totals().items()}
        means = D.weighted_mean_over_ranks(local)
        metrics = self._finalized({**means, **whole_set_metrics(self.task, collected, beside=means)})
        self.val_metrics = {**metrics, "step": self.step}
        if local and self.config.checkpoint.monitor not in metrics:  # a name set-up could not check
            no_monitor(self.config.checkpoint.monitor, sorted(metrics), self.task)
        if local:  # else there is no validation data (an empty set, a run without validation): nothing to report
            if not math.isfinite(metrics.get("val_loss", 0.0)):  # training goes on: its weights are not at fault
                self.print(f"warning: val_loss is {metrics['val_loss']} at step {self.step}: non-finite values in "
                           f"the validation data, or in the model's outputs on it")
            self._note_best(metrics)
            if isinstance(self.scheduler, ReduceLROnPlateau):  # the monitor is among them: checked above
                self.scheduler.step(metrics[self.config.checkpoint.monitor])
            self._fire("on_validation_end", metrics)
            self._flush_log("val", metrics)
        self.aside_s += time.perf_counter() - began  # what its hooks do (a sample of text, ...) is not training
        return metrics

    # ---- setup ---------------------------------------------------------------------

    def setup(self) -> None:
        """Data, model, optimizer, resume, wrapping; in that order, agreed across ranks.

        First, rank 0 takes the run folder for this run alone (sharing the hold the
        command line took when it picked the folder), until train() ends or
        setup fails: a second run started in it meanwhile (a job requeued while the
        first one's processes live on) is refused before it reads a checkpoint the
        first may prune, or prepares any data.
        """
        D.agree_on_errors(self._hold_run_dir, run_here=self.is_main)
        try:
            self._set_up()
        except BaseException:
            self._let_go_of_run_dir(failed=True)
            raise

    def _set_up(self) -> None:
        cfg = self.config
        # again: it sets this run's GPU and float32 matmul precision, which another engine built since may have set
        self.device = D.pick_device(cfg, self.local_rank)
        D.check_same_settings(cfg)  # before anything the settings steer: the checkpoint to resume, the data
        start = self._find_start()
        D.agree_on_errors(lambda: resume.check_run_dir(cfg, self.run_dir, start), run_here=self.is_main)
        self._set_up_data()
        self._set_up_model(start)
        self._set_up_run(start)

    def _set_up_data(self) -> None:
        """The data module prepared and set up, its loaders checked and seeded, and the steps the run takes."""
        cfg = self.config
        D.agree_on_errors(self.data_module.prepare_data, run_here=self.local_rank == 0)
        # the same random numbers on every rank, run and resume for a data module that draws them in setup (a
        # split, a shuffle, generated data) without a generator of its own: after prepare_data, which one process
        # a node runs, and only when its cache is missing; not the model's initial weights' (torch's seed below)
        seed_everything(mixed_seed(cfg.training.seed, SETUP_STREAM))
        with out_of_memory(f"{type(self.data_module).__name__}.setup()", "smaller data (data.num_samples, ...)"):
            self.data_module.setup("fit")
        ranks = self.rank, self.world_size
        self.train_loader, self.train_sampler = loaders_of(self.data_module, "train_dataloader", *ranks)
        self.val_loader, self.val_sampler = loaders_of(self.data_module, "val_dataloader", *ranks)
        # with loader workers, what a data set draws at random comes from a seed per batch, kept by no worker: the
        # training batches' differ by epoch, and each validation draws the same numbers as the others
        t, name = cfg.training, type(self.data_module).__name__
        with self._warned_by_rank_0():  # a data set that takes no seeding: the same on every rank
            for loader, stream in ((self.train_loader, TRAIN_STREAM), (self.val_loader, VAL_STREAM)):
                SeededBatches.install(loader, mixed_seed(t.seed, self.rank, stream))
        for loader in (self.train_loader, self.val_loader):  # before the workers start: the first batch checked
            WorkerStart.install(loader)
        if is_stream(self.val_loader) and not t.eval_batches:
            with self._warned_by_rank_0():  # an endless one would hold the run at its first evaluation for ever
                warnings.warn(f"{name}.val_dataloader() is a stream: each evaluation reads it to its end; if it has "
                              f"none, set training.eval_batches, the batches an evaluation reads")
        self.train_batches = TrainingBatches(self.train_loader, self.train_sampler, t.seed, t.grad_accum_steps,
                                             t.max_steps, *ranks, name, self._warned_by_rank_0)
        self.total_steps = self._last_step(self.train_batches.length)

    def _set_up_model(self, start: resume.Start) -> None:
        """The model (checked on a validation batch, started from init_from's weights if given), its loss, the
        optimizer, the schedule, the weight average and the loss scaler."""
        cfg = self.config
        torch.manual_seed(cfg.training.seed)  # identical initial weights on every rank
        self.task.data_module, self.task.total_steps = self.data_module, self.total_steps
        with out_of_memory(f"{type(self.task).__name__}.build_model()", "a smaller model (model.n_embd, ...)"):
            model = self.task.build_model()
            if not isinstance(model, torch.nn.Module):
                raise UsageError(f"{type(self.task).__name__}.build_model() returned a {type(model).__name__}, "
                                 f"not a torch.nn.Module")
            model = model.to(self.device)
        self.criterion = self.task.build_criterion().to(self.device)
        D.agree_on_errors(lambda: self._check_task_takes_the_data(model))
        if cfg.checkpoint.init_from and start.checkpoint is None:  # a resume takes this run's own weights
            self._start_from_weights(model, cfg.checkpoint.init_from)
        if cfg.training.compile:  # a fused loss: an LM's eager one makes float32 copies of all the logits
            # after the check, whose step would compile it untimed: compilation is the first step's, reported apart
            parallel.compile_in_place(self.criterion, cfg.training.compile_mode)
        self.raw_model = parallel.prepare(model, cfg, self.world_size)
        self.sharded = parallel.is_sharded(cfg, self.world_size)
        self.optimizer = self.task.build_optimizer(self.raw_model)
        self.scheduler = self.task.build_scheduler(self.optimizer)
        check_plateau(self.scheduler, cfg, type(self.task).__name__)
        decay = cfg.training.ema_decay
        self.ema = WeightAverage(self.raw_model, decay) if decay else None  # validation's weights, and the tools'
        precision = cfg.training.precision
        if precision == "fp16" and self.device.type != "cuda":
            raise UsageError("training.precision fp16 needs a CUDA device: use bf16 or fp32 on the CPU")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.step_checks = StepChecks(self.optimizer, self.device, cfg.training.nan_policy, self.print)

    def _set_up_run(self, start: resume.Start) -> None:
        """The checkpoints: the resume from ``start``, if any, and the ones to save; then the model wrapped for
        DDP or FSDP, and the run's config and artifacts written."""
        cfg = self.config
        seed_everything(rank_seed(cfg.training.seed, self.rank))  # dropout and the like differ per rank
        background = cfg.checkpoint.async_save
        group = D.background_group() if background and D.active() else None
        self.checkpoints = CheckpointManager(
            cfg.checkpoint.dir, self.rank, self.world_size, cfg.checkpoint.keep_last,
            cfg.checkpoint.monitor, cfg.checkpoint.mode, cfg.checkpoint.keep_best, group,
        )
        self._saves = BackgroundSave() if background else None
        if start.checkpoint is not None:
            with self._warned_by_rank_0():  # resuming on another number of processes, samples seen again
                self.load_checkpoint(start.checkpoint)
        outlasting = warmup_outlasting(cfg.optimizer, self.total_steps)  # over the steps of the run's own layout
        if outlasting and self.is_main and type(self.task).build_scheduler is TrainingTask.build_scheduler:
            warnings.warn(outlasting)  # the config's schedule; a task's own may not warm up
        # a ReduceLROnPlateau steps on checkpoint.monitor after each validation (see validate), any other per step
        self._per_step_scheduler = None if isinstance(self.scheduler, ReduceLROnPlateau) else self.scheduler
        self.model = parallel.wrap(self.raw_model, cfg, self.world_size, self.device)
        self._buffers = D.persistent_buffers(self.raw_model)  # running statistics, given rank 0's (validate)
        self._gradient_sync = parallel.gradient_sync(self.model, self.raw_model)
        # one process in fp32 enters no context around the forward: entering two that do nothing cost a small
        # model's step 0.4% (benchmarks/loop_overhead.py)
        self._bare_forward = self.world_size == 1 and self._autocast() is parallel.NO_CONTEXT
        self._params = list(self.model.parameters())
        self._clip = cfg.training.grad_clip or math.inf
        launches = D.gather(D.launch_id())  # each node's: rank 0 may start on another one after a restart
        if self.continues_run:  # from one of its own checkpoints: those of the steps after it go aside
            D.agree_on_errors(self._set_aside_later_checkpoints, run_here=self.is_main)
        if self.is_main:
            cfg.save_to_yaml(self.run_dir / "config.yaml")
            self.task.save_artifacts(self.run_dir)
            if D.launch_id() is not None:  # so that workers torchrun restarts come back to this folder
                (self.run_dir / D.LAUNCH_FILE).write_text("".join(f"{launch}\n" for launch in sorted(set(launches))))

    def _stop_workers(self) -> None:
        """End the worker processes the loaders keep between epochs (persistent_workers), which would otherwise
        live as long as the engine does: a sweep that keeps its engines kept every run's workers. A loader's next
        epoch, if any, starts new ones. Through DataLoader's own attributes: torch has no public call for it."""
        for loader in (getattr(self, "train_loader", None), getattr(self, "val_loader", None)):
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
                loader._iterator = None

    def _find_start(self) -> resume.Start:
        """Where this run starts, as rank 0 finds it: every rank goes on from that checkpoint, and a node whose
        view of a shared folder lags does not go on from an older one (_searched_by_rank_0). Each other rank
        then checks that it sees the checkpoint whole, by its files' sizes: one that does not says so, rather than
        fail alone later."""
        found: list[resume.Start] = []
        directory = Path(self.config.checkpoint.dir)
        self._searched_by_rank_0(lambda: found.append(resume.find_start(self.config, self.run_dir)), directory)
        start = found[0] if found else None
        named = name_for_every_node(start.checkpoint, directory) if start and start.checkpoint else ""
        start, named = D.broadcast_from_rank0((start, named))
        if not self.is_main and named:
            start = start._replace(checkpoint=directory / named)  # an absolute path stays one

        def seen() -> None:
            reason = verify(start.checkpoint, hashes=False)
            if reason is not None:
                raise CheckpointError(f"checkpoint {start.checkpoint} is not valid on rank {self.rank}: {reason}")
        if start.checkpoint is not None:  # rank 0's start, on every rank
            D.agree_on_errors(seen, run_here=not self.is_main)
        return start

    def _searched_by_rank_0(self, search: Callable[[], None], directory: Path) -> None:
        """Run ``search``, a look for a checkpoint, on rank 0, while the other ranks hash their share of the files
        of each checkpoint it checks (checkpoint.hashes_shared_out): rank 0 alone would read every file, every
        rank's FSDP shards included, while the others wait. ``directory``: where the checkpoints are, which each
        node may mount at another path. A UsageError it raises is raised on every rank."""
        def on_rank_0() -> None:
            with hashes_shared_out(directory) if D.active() else contextlib.nullcontext():
                search()
        D.agree_on_errors(on_rank_0 if self.is_main else lambda: hash_for_rank_0(directory))

    @contextlib.contextmanager
    def _warned_by_rank_0(self) -> Iterator[None]:
        """Warnings of what every rank finds alike (the checkpoints, the run's position), said once: by rank 0.
        Any other warning, a callback's say, is each rank's own."""
        with warnings.catch_warnings():
            if not self.is_main:
                for alike in SAID_BY_RANK_0:
                    warnings.filterwarnings("ignore", message=alike)
            yield

    def _set_aside_later_checkpoints(self) -> None:
        moved = self.checkpoints.set_aside_after(self.step)
        if moved:
            self.print(f"{self.checkpoints.directory}: {len(moved)} checkpoint(s) of steps after {self.step}, where "
                       f"this run goes on from, moved to {moved[0].parent} (kept, not pruned: delete them there "
                       f"when no longer needed)")

    def _hold_run_dir(self) -> None:
        """Hold the run folder, and the checkpoint folder where it lies outside it: two runs given one
        checkpoint.dir (a sweep's settings) would each write over and prune the other's checkpoints, and the
        check that refuses another run's checkpoints finds none before the first save."""
        self._run_locks = [FolderLock(self.run_dir)]
        self._found_empty = not run_files(self.run_dir)
        checkpoints = Path(self.config.checkpoint.dir).resolve()
        if not checkpoints.is_relative_to(self.run_dir.resolve()):
            try:
                self._run_locks.append(FolderLock(checkpoints))
            except UsageError as e:
                self._run_locks.pop().release()
                raise UsageError(f"checkpoint.dir: {e}") from None

    def _let_go_of_run_dir(self, failed: bool) -> None:
        """Let go of this engine's hold on the run folder. The last hold on it to go (the command line's, when it
        picked the folder) removes the folders made for it if nothing was written there: a run refused in
        set-up leaves no trace (see FolderLock).

        A run that found the folder empty and failed before it logged or saved
        anything (a task that breaks at its first step) takes back what it wrote
        there, its config.yaml and an event file: the same command, once the cause
        is mended, trains in that folder, not in the next free one.
        """
        if not self._run_locks:
            return
        if failed and self._found_empty and not self._logged and self._saved_step is None:
            for name in run_files(self.run_dir):
                entry = self.run_dir / name
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        for lock in reversed(self._run_locks):
            lock.release()
        self._run_locks = []

    def _start_from_weights(self, model: torch.nn.Module, init_from: str) -> None:
        """Load the weights of the checkpoint ``init_from`` names into the model, before it is sharded or wrapped:
        a fine-tune, which keeps nothing else of that run. Rank 0 picks the checkpoint and every rank loads that
        one, even while the run it belongs to saves newer ones. Refused in one line when the task would write
        another tokenizer beside the weights than the checkpoint holds (the weights would read other tokens), or
        model settings under which they compute otherwise (resume.weights_changes); another corpus is what a
        fine-tune is for, and a model of another shape fails the strict load."""
        picked: list[Path] = []

        def pick() -> None:
            try:
                picked.append(resolve_checkpoint(init_from))
            except CheckpointError as e:
                raise CheckpointError(f"checkpoint.init_from: {e}") from None

        # the folder as rank 0 sees it, whatever each one's cwd: a checkpoint in it reaches the others by its name
        self._searched_by_rank_0(pick, Path(D.broadcast_from_rank0(os.path.abspath(init_from))))
        ckpt = Path(D.broadcast_from_rank0(str(picked[0].resolve()) if picked else ""))  # whatever each one's cwd

        def load() -> None:
            differ = resume.weights_changes(self.task, ckpt)
            if differ == ["tokenizer.json"]:
                raise UsageError(f"checkpoint.init_from: this run's tokenizer differs from the one in {ckpt}, whose "
                                 f"weights were trained with it (they would read other tokens); train with "
                                 f"--data-tokenizer {ckpt / 'tokenizer.json'}")
            if differ:  # the same shapes, maybe, but not the same computation: another number of heads, another norm
                raise UsageError(f"checkpoint.init_from: this run's model differs from the one in {ckpt} in "
                                 f"{', '.join(differ)}, with which its weights would compute otherwise")
            weights = model_weights(ckpt)
            if hasattr(model, "fit_weights"):  # a model's own way to start from a variant of itself (GPT's context)
                weights = model.fit_weights(weights)
            load_weights_strictly(model, weights, f"checkpoint.init_from: the weights in {ckpt}", " than this run's")

        D.agree_on_errors(load)
        self.print(f"started from the weights of {ckpt}: the optimizer, schedule, step and data order start afresh")

    def _check_task_takes_the_data(self, model: torch.nn.Module) -> None:
        """One validation step on the first batch, before anything is written or wrapped
        (checks.check_task_takes_the_data), and the names validation reports, found there."""
        batch = next(iterate(self.val_loader, self.config.training.seed, self.rank, 0), None)
        if batch is not None:
            self.validation_metrics = check_task_takes_the_data(
                self.task, type(self.data_module).__name__, model, self.criterion, batch, self.device,
                self._autocast(), self.config.checkpoint, warn=self.is_main)

    # ---- checkpoints ---------------------------------------------------------------

    def save_checkpoint(self, state: dict[str, Any] | None = None) -> Path:
        """Save everything needed to continue exactly; every rank must call this. ``state``: what
        _resumable_state() gave earlier in this step, for the parts that have changed since."""
        began = time.perf_counter()
        self.step_checks.check()  # a non-finite step with nan_policy=stop leaves the last checkpoint as it was
        self._wait_for_save()  # one save at a time, and one copy of the state in host memory
        state = state or self._resumable_state()
        if self.sharded:  # each rank's buffers are saved as one: rank 0's, as DDP's are, which a resume trains on
            D.broadcast_buffers(self._buffers)
        background = self._saves is not None
        weights, write_sharded = {}, None  # rank 0 alone writes the shared state; under FSDP every rank its shards
        if self.sharded or self.is_main:  # (in the background, the other ranks of DDP copy no weights)
            weights, write_sharded = parallel.model_and_optimizer_state(
                self.raw_model, self.optimizer, self.sharded, self.ema.state() if self.ema else None,
                copy=background, group=self.checkpoints.group)
        others = {
            "scheduler": state["scheduler"],
            "scheduler_kind": resume.schedule_kind(self.scheduler),
            "scaler": self.scaler.state_dict(),
            "best_metric": state["best_metric"],
            "val_metrics": self.val_metrics,  # a resume at a step already validated does not validate it again
            "train_metrics": self.train_metrics,  # the last training record, for the summary
            "pending_log": state["pending"],  # engine.log() values waiting for the next record
            "progress": {
                "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "samples_seen": self.samples_seen, "skipped_steps": self.step_checks.skipped,
                "overflow_steps": self.step_checks.overflows, "world_size": self.world_size, "stop": state["held_stop"],
            },
            "callbacks": state["callbacks"],
            "config": dataclasses.asdict(self.config),
        }
        per_rank = state["rank"]
        if background:  # copies, as the weights are: the steps that follow change these while the thread writes
            others, per_rank = copied_to_cpu((others, per_rank))
        metrics = {k: v for k, v in self.val_metrics.items() if k != "step"} if self.val_metrics.get("step") == self.step else {}
        save = functools.partial(self.checkpoints.save, self.step, {**weights, **others}, per_rank, metrics=metrics,
                                 write_extra=self._write_artifacts, write_sharded=write_sharded)
        if background:
            self._saves.start(save)
            saved = self.checkpoints.directory / step_name(self.step)
        else:
            saved = save()
        self._saved_step, self._saved_at = self.step, time.monotonic()
        self.aside_s += time.perf_counter() - began
        return saved

    def _wait_for_save(self, failing: bool = False) -> None:
        """Wait for the save in flight in the background, if any, and raise its error; ``failing``: the run is
        failing already, with an error of its own, which this one must not replace: this one is warned of, and
        a Ctrl-C while waiting gives the save up."""
        if self._saves is None:
            return
        try:
            self._saves.wait()
        except KeyboardInterrupt:
            if not failing:
                raise
            warnings.warn("the checkpoint being saved in the background was not waited for (Ctrl-C): if this "
                          "process ends before it is saved, a resume takes the one before it")
        except Exception as e:
            if not failing:
                raise
            if self.is_main:
                warnings.warn(f"the checkpoint saved in the background failed too: {one_line(e)}")

    def _resumable_state(self) -> dict[str, Any]:
        """The state that logging and validating change: the callbacks', the best metric, a stop they asked
        for, engine.log() values waiting for their record, and each rank's own (random streams, and the losses
        of the epoch and of the log window so far)."""
        # checked first: what a checkpoint cannot hold may not copy either (a lock), and is refused in one line
        callbacks = {key: copy.deepcopy(checkpointable(cb.state_dict(), f"{type(cb).__name__}.state_dict()"))
                     for key, cb in zip(callback_keys(self.callbacks), self.callbacks)}
        rank = {"rng": rng_state(self.device), **self._sums.state_dict()}
        if self.train_batches.stream and self.batch_in_epoch and self.train_batches.loader_state is not None:
            rank["loader"] = self.train_batches.loader_state
        # the scheduler's too: a ReduceLROnPlateau counts validations, and the last one of a run may be off schedule
        scheduler = copy.deepcopy(self.scheduler.state_dict()) if self.scheduler is not None else None
        return {"callbacks": callbacks, "best_metric": self.best_metric, "held_stop": self._held_stop, "rank": rank,
                "pending": copy.deepcopy(self._pending), "scheduler": scheduler}

    def _write_artifacts(self, directory: Path) -> None:
        self.config.save_to_yaml(directory / "config.yaml")
        self.task.save_artifacts(directory)

    def load_checkpoint(self, path: Path) -> None:
        """Continue from the checkpoint at ``path``: its config compared with this run's (changes refused unless
        allowed, or said), then its progress, weights, optimizer, schedule, scaler, callbacks, and each rank's
        random streams and data position; called in set-up, after the model and optimizer are built."""
        shared = load_shared_state(path)
        missing = [key for key in SHARED_STATE if key not in shared]
        if missing:
            raise CheckpointError(f"{path} lacks {', '.join(missing)}: it was written by another version of llm; "
                                  f"start a new run with --logging-log-dir DIR, or export its weights")
        saved, now = resume.with_defaults(flatten(shared["config"]), self.config), flatten(dataclasses.asdict(self.config))
        saved["world_size"], now["world_size"] = shared["progress"]["world_size"], self.world_size
        changed = resume.config_changes(saved, now)
        # the task's files, but those a changed setting already says why they differ (model.*, data.*)
        files = resume.unexplained(resume.changed_artifacts(self.task, path), changed)
        resume.check_changes(changed, self.config.checkpoint.allow_config_change, path, files, saved, now)
        if changed or files:
            self.print("resuming with a changed config: " + ", ".join(
                [resume.change(k, saved, now) for k in changed] + [f"{name} differs" for name in files]))
        progress = shared["progress"]
        self.step, self.epoch = progress["step"], progress["epoch"]
        self.batch_in_epoch = resume.batches_done_in_epoch(progress, shared["config"]["training"]["batch_size"],
                                                           self.config.training.batch_size, self.world_size,
                                                           self.train_batches.stream)
        self.samples_seen, self.step_checks.skipped = progress["samples_seen"], progress["skipped_steps"]
        self.step_checks.overflows = progress.get("overflow_steps", 0)  # absent from checkpoints before it was counted
        monitor_changed = bool({"checkpoint.monitor", "checkpoint.mode"} & set(changed))  # a best of another metric
        stopping_changed = {"training.patience", "training.early_stopping"} & set(changed)
        if progress["stop"] and not monitor_changed and not stopping_changed:  # early stop holds
            self.should_stop, self.stop_reason = True, progress["stop"]
            self._held_stop = progress["stop"]
            self.print(f"{path} holds the stop asked for at step {self.step} ({progress['stop']}): this run ends "
                       f"there too (another training.patience, training.early_stopping or checkpoint.monitor "
                       f"lifts it)")
        last_step = self._last_step(self.train_batches.length)
        if last_step != self.total_steps:  # resumed in another layout, now or before: the schedule spans the steps
            # this run takes, counted in its own; built before the optimizer's state is loaded, like the first one
            self.total_steps = self.task.total_steps = last_step
            self.scheduler = self.task.build_scheduler(self.optimizer)
        # another optimizer cannot take the saved one's state: it starts afresh, at the saved step of the schedule
        same_optimizer = "optimizer.name" not in changed
        fresh_groups = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        averaged = parallel.load_model_and_optimizer(self.raw_model, self.optimizer if same_optimizer else None,
                                                     shared, path, self.sharded, self.ema)
        if self.ema is not None and not averaged:  # saved without one: it starts from the weights resumed
            self.ema.restart()
            self.print(f"the weight average (training.ema_decay {self.config.training.ema_decay}) starts at step "
                       f"{self.step}, from the weights resumed: {path} holds none")
        self._restore_schedule(shared, changed, fresh_groups)
        if self.step_checks.skips_on_device and isinstance(self.optimizer, torch.optim.SGD):
            # this run's settings, back after the load, may give momentum to a run saved without it: its buffers
            # made now, as for a fresh run, else a step skipped on the device leaves them uninitialised
            zero_missing_momentum(self.optimizer)
        if self.scaler.is_enabled() and shared["scaler"]:  # saved without fp16: the scaler starts afresh
            self.scaler.load_state_dict(shared["scaler"])
        self.val_metrics = shared["val_metrics"]
        if not monitor_changed:
            self.best_metric = shared["best_metric"]
        self._restore_callbacks(shared["callbacks"], path)
        if progress["world_size"] == self.world_size:
            mine = load_rank_state(path, self.rank)
            set_rng_state(mine["rng"], self.device)
            self._sums.load_state_dict(mine)
            if self.train_batches.stream and self.batch_in_epoch and "loader" in mine:
                self.train_batches.restore(mine["loader"])
        else:
            warnings.warn(f"resuming {progress['world_size']}-process state on {self.world_size} processes: random streams restart")
        self.train_metrics = shared["train_metrics"]
        self._pending = shared.get("pending_log", {})  # absent from checkpoints of earlier versions
        self._loaded = path
        self.continues_run = path.parent.resolve() == Path(self.config.checkpoint.dir).resolve()
        if self.continues_run:
            self._saved_step = self.step  # this run's own checkpoint: finish() need not write it again
        self.print(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")

    def _restore_schedule(self, shared: dict[str, Any], changed: list[str],
                          fresh_groups: list[dict[str, Any]]) -> None:
        """The learning-rate schedule where the checkpoint's stood, with this run's settings (``fresh_groups``:
        the optimizer's groups as this run built them) where they changed, or this run's schedule where its kind
        did (another task's build_scheduler, or none)."""
        settings_changed = any(k not in resume.HARMLESS_CONFIG for k in changed)
        # the task's build_scheduler may have changed since (another class, or none): this run's schedule takes over
        saved_kind = shared.get("scheduler_kind", resume.UNRECORDED)  # absent from earlier versions' checkpoints
        same_schedule = resume.same_kind_of_schedule(self.scheduler, shared["scheduler"], saved_kind)
        if not same_schedule:
            was = "none" if shared["scheduler"] is None else \
                "unrecorded" if saved_kind == resume.UNRECORDED else saved_kind.rsplit(".", 1)[-1]
            kind = (resume.schedule_kind(self.scheduler) or "none").rsplit(".", 1)[-1]
            self.print(f"learning-rate schedule changed ({was} -> {kind}): the rate follows this run's from step "
                       f"{self.step}")
        if isinstance(self.scheduler, ReduceLROnPlateau):  # this run's settings, at the saved one's standing
            if settings_changed or not same_schedule:
                resume.keep_optimizer_settings(self.optimizer, fresh_groups, None, self.step)
            standing = shared["scheduler"] if same_schedule else None  # another kind's is none of its own
            resume.resume_plateau(self.optimizer, self.scheduler, standing, changed)
        elif settings_changed or not same_schedule:  # the settings are this run's, the moments saved
            # replayed up to the schedule's end: a run resumed past it (a lower max_steps) takes no step, and a
            # OneCycleLR refuses a step beyond its total
            resume.keep_optimizer_settings(self.optimizer, fresh_groups, self.scheduler, min(self.step, self.total_steps))
        elif self.scheduler is not None:
            self.scheduler.load_state_dict(shared["scheduler"])

    def _restore_callbacks(self, states: dict[str, Any], path: Path) -> None:
        """Each callback's saved state, found by its class name; one that cannot take it is refused in one line."""
        states = keyed_by_class(states)
        for key, cb in zip(callback_keys(self.callbacks), self.callbacks):
            if key in states:
                try:
                    cb.load_state_dict(states[key])
                except Exception as e:  # noqa: BLE001 - a state saved by another callback of the same class name
                    raise CheckpointError(f"callback {key} cannot take the state {path} holds under its class name "
                                          f"({type(e).__name__}: {one_line(e)}): one saved by another version of "
                                          f"that class, or by another class of that name; make its load_state_dict "
                                          f"take it, or give the other class another name") from None

    # ---- what callbacks use ----------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop after this step (asked in on_train_start or on_epoch_start: before the epoch's
        first step); the stop is agreed across ranks, and a resume keeps it."""
        reason = reason or "a stop asked for without a reason"
        if not self.should_stop:
            self.should_stop, self.stop_reason = True, reason
        self._held_stop = self._held_stop or reason

    def log(self, metrics: dict[str, float]) -> None:
        """Add metrics to the record of the current hook: the validation's in on_validation_end, the epoch's in
        on_epoch_end, else the next training record (on a step that logs none, the values wait for it)."""
        if self._hook == "on_train_end":  # the last record was written, and the checkpoint that would keep values
            raise UsageError("engine.log in on_train_end: no record follows the end of training; log in "
                             "on_validation_end or on_epoch_end, or write the value yourself")
        values = record_numbers(metrics, f"engine.log in {self._hook or 'training'}: logged", "log it under another name")
        self._pending.setdefault(RECORD_OF_HOOK.get(self._hook, "train"), {}).update(values)

    def print(self, line: str) -> None:
        """A line of output on rank 0, above the progress bar if there is one."""
        if not self.is_main:
            return
        try:
            if not any(cb.write(line) for cb in self.callbacks if isinstance(cb, ProgressBar)):
                print(line, flush=True)
        except OSError:  # `train | head`, a terminal gone (EIO), a full disk: the run goes on, its records still in
            stdout_gone()  # metrics.jsonl

    # ---- helpers -------------------------------------------------------------------

    def _validated(self) -> dict[str, float]:
        """The validation of the current step: run now unless it already ran (eval_every_steps may end an epoch)."""
        if self.val_metrics.get("step") == self.step:
            metrics = {k: v for k, v in self.val_metrics.items() if k != "step"}
            self._note_best(metrics)  # a resumed best can predate it: saved before a validation off the schedule
            return metrics
        return self.validate()

    def _note_best(self, metrics: dict[str, float]) -> None:
        monitor = self.config.checkpoint.monitor
        if monitor in metrics and improves(metrics[monitor], self.best_metric, self.config.checkpoint.mode):
            self.best_metric, self._best_step = metrics[monitor], self.step

    def _last_step(self, batches: int | None) -> int:
        """The step this run will end at, from where it stands: the rest of this epoch and the epochs after it,
        in groups of grad_accum_steps of its ``batches`` per epoch, capped by max_steps (a stream's, of no
        known length: max_steps).

        From step 0 that is epochs x steps per epoch. A run resumed with another
        number of processes or batch size counts the rest in its own steps, which
        the checkpoint's layout would have counted otherwise.
        """
        t = self.config.training
        if batches is None:
            return t.max_steps
        k = t.grad_accum_steps
        left = (batches - self.batch_in_epoch) // k + max(0, t.epochs - self.epoch - 1) * (batches // k)
        last = self.step + (left if self.epoch < t.epochs else 0)
        return min(last, t.max_steps) if t.max_steps else last

    def _finished(self) -> bool:
        return self.should_stop or self._out_of_steps()

    def _out_of_steps(self) -> bool:
        t = self.config.training
        return self.epoch >= t.epochs or bool(t.max_steps and self.step >= t.max_steps)

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _agree_to_stop(self, save_due: bool) -> tuple[bool, bool]:
        """Whether any rank asked to stop or was signalled, and whether any rank's clock (or a better validation)
        says a save is due (``save_due``: this rank's); every rank gets the same answers, from one agreement.

        A signal that lands after the last agreement is not acted on: every rank then
        finishes the same way, validating and saving, rather than some skipping the
        validation's collectives and waiting on the others forever.
        """
        stop, signalled = self.should_stop, self._signal is not None
        if self.world_size > 1:
            stop, signalled, save_due, agent_gone = D.any_rank([stop, signalled, save_due, self._agent_gone])
            # or'ed, not assigned: signals._watch_agent may have found the agent gone while the all-reduce waited
            self._agent_gone = self._agent_gone or agent_gone
        if signalled:  # a rank that got none stops as if by SIGTERM
            self.interrupted_by = signal.Signals(self._signal or signal.SIGTERM)
            if not self.should_stop:
                self.stop_reason = "a torchrun agent of this job is gone" if self._agent_gone else \
                    f"stopped by signal {self.interrupted_by.name}"
        if (stop or signalled) and D.active():  # once, at the stop: every rank gives the asking rank's reason
            # one reason on every rank, as its exit code follows it: a stop asked for (held in the checkpoint)
            # before what one rank's clock said, else the first rank's
            reasons = D.gather((self.stop_reason, self._held_stop))
            self._held_stop = next((h for _, h in reasons if h), "")
            self.stop_reason = self._held_stop or next((r for r, _ in reasons if r), "")
        self.should_stop = stop or signalled
        return self.should_stop, save_due

    def _close_epoch_loss(self) -> float:
        """Mean training loss of the epoch over micro-batches and ranks, the window not yet logged included."""
        return D.weighted_mean_over_ranks({"loss": self._sums.close_epoch()})["loss"]

    def _window_metrics(self) -> dict[str, float]:
        """Training metrics since the last log: means over micro-batches and ranks."""
        self.step_checks.check()
        local = self._sums.take_window()
        metrics = self._finalized(D.weighted_mean_over_ranks(local))
        if self.step_checks.skipped:
            metrics["skipped_steps"] = float(self.step_checks.skipped)
        if self.scaler.is_enabled():  # what an fp16 run's health is read from: a scale that keeps falling is not
            metrics["loss_scale"] = self.scaler.get_scale()
            metrics["overflow_steps"] = float(self.step_checks.overflows)
        return metrics

    def _finalized(self, metrics: dict[str, float]) -> dict[str, float]:
        return finalized_metrics(self.task, metrics)

    def _flush_log(self, split: str, metrics: dict[str, float]) -> None:
        if split == "train":
            self.train_metrics = metrics
        logged = self._pending.pop(split, {})
        for key in logged.keys() & metrics.keys():  # the record would show one value, the run acting on another
            del logged[key]
            if (split, key) not in self._clashed and self.is_main:  # found at a record, maybe the last: a
                self._clashed.add((split, key))  # warning, not a lost run
                warnings.warn(f"engine.log: {key!r} is one of the {split} record's own metrics (the task's or the "
                              f"engine's): the record keeps its own; log the value under another name")
        record = {"split": split, "step": self.step, "epoch": self.epoch, **metrics, **logged}
        self._logged = True
        self._fire("on_log", record)

    def _summary(self, elapsed: float, samples_per_s: float | None, write: bool = True) -> dict[str, float]:
        final = {
            "train_loss": self.train_metrics.get("loss"),  # None when this run took no step
            **{k: v for k, v in self.val_metrics.items() if k != "step"},
            "steps": self.step, "epochs": self.epoch, "samples_seen": self.samples_seen,
            "skipped_steps": self.step_checks.skipped, "elapsed_s": elapsed,
            "stop_reason": self.stop_reason or f"trained training.epochs={self.config.training.epochs}",
            f"best_{self.config.checkpoint.monitor}": self.best_metric,
            "samples_per_s": samples_per_s,
            "first_step_s": self.first_step_s,
        }
        if self.task.tokens_per_sample:
            final["tokens_per_s"] = final["samples_per_s"] and final["samples_per_s"] * self.task.tokens_per_sample
        if self.scaler.is_enabled():
            final["overflow_steps"] = self.step_checks.overflows
        if self.is_main and write:
            write_atomically(self.run_dir / "summary.json", json_text(final, indent=2) + "\n")
        return final

    def _samples_per_s(self, elapsed: float) -> float | None:
        """The training rate since the first step ended, as ThroughputMonitor counts it: the first step
        (compilation), what came before it and the time validating and saving left out; over the whole run
        when it took one step. None when this process took no step (a finished run started again)."""
        if self.first_step_s is None:
            return None
        then, aside_then, samples_then = self._after_first_step
        seconds = time.perf_counter() - then - (self.aside_s - aside_then)
        if self.samples_seen > samples_then and seconds > 0:
            return (self.samples_seen - samples_then) / seconds
        return (self.samples_seen - self._first_sample) / max(elapsed - self.aside_s, 1e-9)

    def _fire(self, hook: str, *args: Any) -> None:
        self._hook = hook
        for cb in self._listeners[hook]:
            try:
                getattr(cb, hook)(self, *args)
            except UsageError:
                raise  # a callback refusing its settings: one line, exit 2
            except Exception as e:
                raise callback_error(cb, hook, e) from e

    def _fire_cleanup(self, metrics: dict[str, float], ok: bool) -> None:
        """on_train_end for every callback, though one fails (a tracker's upload): every writer is closed. After
        an error theirs are dropped, the run's own is raised; after a run that went well, the first failure."""
        self._hook, failed = "on_train_end", None
        for cb in self._listeners["on_train_end"]:
            try:
                cb.on_train_end(self, metrics)
            except Exception as e:
                failed = failed or (cb, e)
        if ok and failed:
            cb, e = failed
            if isinstance(e, UsageError):
                raise e
            raise callback_error(cb, "on_train_end", e) from e

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = AUTOCAST_DTYPES.get(self.config.training.precision)
        if dtype is None:
            return parallel.NO_CONTEXT
        return torch.autocast(self.device.type, dtype=dtype)

    def _to_device(self, batch: Any) -> Any:
        return on_device(batch, self.device)


_UNCHECKED = contextlib.nullcontext()
"""The context of the steps after the first (optimizer_step): entered again and again, it does nothing."""


