"""Profiler: a window of training steps recorded with torch.profiler, one trace per rank."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from torch.profiler import ProfilerAction, ProfilerActivity, profile

from llm.training.core.callbacks import Callback

if TYPE_CHECKING:
    from llm.training.core.engine import TrainingEngine

TABLE_ROWS = 30
"""Operators in the summary table written beside each trace."""


class Profiler(Callback):
    """Records steps ``first`` to ``first + steps - 1`` (counted as ``engine.step`` counts them, from 1) with
    torch.profiler: the CPU, and CUDA kernels on a GPU. The step before the window, when this run takes it, is a
    warm-up, traced but not kept, so that starting the profiler costs the window nothing. Each rank writes into
    ``<run_dir>/profile/`` a Chrome trace (``steps_<first>-<last>.rank<r>.json``: open it in Perfetto,
    https://ui.perfetto.dev, or chrome://tracing) and a table of the operators that took the most time
    (``.txt``). Step N is the span ``ProfilerStep#N``: from the end of step N-1, which fires on_step_end before
    its log record, validation and save, to the end of step N. So a validation or save due at step N-1 shows in
    the span of step N, and one due at the window's last step is not recorded. A resume inside the window
    records the steps left; one past it records nothing. A run that ends inside the window writes the steps it
    took, and is named after them; its end (the last validation and save) is a span of its own, numbered one
    past its last step.
    """

    def __init__(self, first: int, steps: int):
        self.first, self.last = first, first + steps - 1
        self._profile: profile | None = None

    def on_train_start(self, engine: TrainingEngine) -> None:
        begin = max(self.first, engine.step + 1)
        if begin > self.last:
            return
        if self.first > engine.total_steps and engine.is_main:  # as a warmup that outlasts the run is said
            warnings.warn(f"logging.profile_from_step {self.first} comes after the run's last step "
                          f"{engine.total_steps}: no step is profiled")
        warm_up = begin - 1 if begin - 1 > engine.step else None  # none for a window that starts at once

        def action(step: int) -> ProfilerAction:  # of the step about to run
            if step == warm_up:
                return ProfilerAction.WARMUP
            if begin <= step < self.last:
                return ProfilerAction.RECORD
            return ProfilerAction.RECORD_AND_SAVE if step == self.last else ProfilerAction.NONE

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
        self._profile = profile(activities=activities, schedule=action,
                                on_trace_ready=lambda done: _write(done, begin, min(engine.step, self.last), engine))
        self._profile.step_num = engine.step + 1  # the spans are named after the steps they hold
        self._profile.current_action = action(self._profile.step_num)
        self._profile.start()

    def on_step_end(self, engine: TrainingEngine) -> None:
        if self._profile is None:
            return
        self._profile.step()
        if engine.step >= self.last:  # written by that step(): the profiler is done
            self._profile = None

    def on_train_end(self, engine: TrainingEngine, metrics: dict[str, float]) -> None:
        if self._profile is not None:  # the run ended inside the window (or before it): what was recorded is kept
            profiled, self._profile = self._profile, None
            profiled.stop()


def _write(done: profile, begin: int, end: int, engine: TrainingEngine) -> None:
    """The trace of steps ``begin`` to ``end`` and its table, into the run folder, which every rank makes: on
    other nodes than rank 0's it may not be there yet. Nothing for a run that ended before the window."""
    if end < begin:
        return
    began = time.perf_counter()  # writing is no training: counted aside, as a save is
    out = Path(engine.run_dir) / "profile" / f"steps_{begin}-{end}.rank{engine.rank}"
    out.parent.mkdir(parents=True, exist_ok=True)
    done.export_chrome_trace(str(out.with_name(out.name + ".json")))
    sort_by = "self_device_time_total" if engine.device.type == "cuda" else "self_cpu_time_total"
    out.with_name(out.name + ".txt").write_text(done.key_averages().table(sort_by=sort_by, row_limit=TABLE_ROWS) + "\n")
    engine.print(f"profile of steps {begin}-{end} written to {out.parent}")
    engine.aside_s += time.perf_counter() - began
