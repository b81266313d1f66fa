"""ThroughputMonitor: speed, data wait, memory and model FLOPs utilisation, every logging step."""

from __future__ import annotations

import re
import resource
import sys
import time
from typing import TYPE_CHECKING

import torch

from llm.training.core.callbacks import Callback

if TYPE_CHECKING:
    from llm.training.core.engine import TrainingEngine

PEAK_FLOPS = (
    # (part of the device name, dense bf16 tensor-core FLOP/s without sparsity; fp16 for V100).
    # The first entry whose part is a whole word of the name wins ("A100" is not in "RTX A1000"), so longer
    # names come before their prefixes.
    ("GB200", 2500e12),
    ("B200", 2250e12),
    ("GH200", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H800 PCIe", 756e12),
    ("H800", 989e12),
    ("H20", 148e12),  # after H200, of which it is a prefix
    ("A100", 312e12),
    ("A800", 312e12),
    ("A10G", 125e12),
    ("A10", 125e12),
    ("A40", 149.7e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("V100S", 130e12),
    ("V100-PCIE", 112e12),
    ("V100", 125e12),
    ("MI355X", 2500e12),  # AMD Instinct, under ROCm's torch.cuda
    ("MI325X", 1307e12),
    ("MI300X", 1307e12),
    ("MI250X", 191.5e12),  # per die: torch sees each of its two as a device
)
"""The MFU denominator per device."""
NO_TF32 = ("V100", "MI250X", "MI355X")
"""Parts whose float32 matmuls have no TensorFloat-32 form at half their bf16 rate: V100 has no such tensor core;
MI250X's float32 matrix rate is a quarter of its bf16 one, and MI355X has no TF32."""


def peak_flops_of(name: str, precision: str = "bf16", tf32: bool = False) -> float | None:
    """The peak for a device name such as ``torch.cuda.get_device_name()`` gives, at the precision its matmuls
    run in, or None where it is not known:

    - bf16 and fp16: the table's;
    - fp32 in TensorFloat-32 (``training.tf32``): half of it, as on every tensor-core part since Ampere and
      on MI300X and MI325X (the parts of NO_TF32 have no such rate: None);
    - fp32 otherwise: None, since its matmuls run on no tensor core and the table holds no such peak;
    - a laptop part (clocked below its desktop namesake) or a MIG slice (a share of the GPU): None.
    """
    if "Laptop" in name or re.search(r"\bMIG\b", name):
        return None
    peak = next((peak for part, peak in PEAK_FLOPS if re.search(rf"(?<![\w-]){re.escape(part)}(?!\w)", name)), None)
    if peak is None or precision in ("bf16", "fp16"):
        return peak
    return peak / 2 if tf32 and not any(part in name for part in NO_TF32) else None


def peak_flops(device: torch.device, precision: str = "bf16", tf32: bool = False) -> float | None:
    """peak_flops_of a CUDA device, or None (CPUs and unknown devices get no MFU)."""
    return peak_flops_of(torch.cuda.get_device_name(device), precision, tf32) if device.type == "cuda" else None


class ThroughputMonitor(Callback):
    """Adds to each training log record:

    ``samples_per_s`` and ``tokens_per_s`` (all ranks together), ``step_time_ms``,
    ``data_wait_pct`` (share of the time spent waiting for the loader),
    ``peak_mem_mb`` (CUDA allocator peak, or the process's peak RSS on CPU; 10**6 bytes) and,
    when the model reports ``flops_per_token`` and the device's peak is known,
    ``mfu``: achieved model FLOP/s over the peak of all devices in the run, at the
    precision the matmuls run in (peak_flops_of: none for plain fp32).
    The figures are of training: the time spent validating, saving and writing a
    profile is left out (``engine.aside_s``), and so is the first step after a start, since it holds
    compilation, unless a record falls on it (``log_every_steps`` 1, a resume one
    step before a record): that record measures the first step alone.
    Samples are counted as validation weighs batches, by the first dimension of a
    batch's first tensor; tokens as ``task.tokens_per_sample`` per sample, the
    positions the model runs on, padding and ignored targets included.
    """

    def __init__(self, peak_flops_per_device: float | None = None):
        self.peak = peak_flops_per_device
        self._mark: tuple[float, int, int, float, float] | None = None
        self._first = True

    def on_train_start(self, engine: TrainingEngine) -> None:
        t = engine.config.training
        self.peak = self.peak or peak_flops(engine.device, t.precision, t.tf32)
        self._first = True
        self._set_mark(engine)

    def on_step_end(self, engine: TrainingEngine) -> None:
        if engine.step % engine.config.logging.log_every_steps == 0:
            engine.log(self.measure(engine))
        elif not self._first:
            return
        self._first = False  # compilation and warm-up stay out of the figures that follow
        self._set_mark(engine)

    def measure(self, engine: TrainingEngine) -> dict[str, float]:
        then, samples, steps, waited, aside = self._mark
        elapsed = max(time.perf_counter() - then - (engine.aside_s - aside), 1e-9)
        done = engine.samples_seen - samples
        metrics = {
            "samples_per_s": done / elapsed,
            "step_time_ms": 1000 * elapsed / max(1, engine.step - steps),
            "data_wait_pct": 100 * (engine.data_wait_s - waited) / elapsed,
            "peak_mem_mb": _peak_memory_mb(engine.device),
        }
        tokens = engine.task.tokens_per_sample
        if tokens:
            metrics["tokens_per_s"] = metrics["samples_per_s"] * tokens
            flops_per_token = getattr(engine.raw_model, "flops_per_token", None)
            if self.peak and callable(flops_per_token):
                achieved = metrics["tokens_per_s"] * flops_per_token(tokens)
                metrics["mfu"] = achieved / (self.peak * engine.world_size)
        return metrics

    def _set_mark(self, engine: TrainingEngine) -> None:
        self._mark = (time.perf_counter(), engine.samples_seen, engine.step, engine.data_wait_s, engine.aside_s)


def _peak_memory_mb(device: torch.device) -> float:
    """In MB of 10**6 bytes, as the benchmarks count them."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e6
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e6
