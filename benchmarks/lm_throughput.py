"""LM throughput: tokens/s of the engine's lm task against a hand-written loop on the same GPT and batches.

    python benchmarks/lm_throughput.py --data-path FILE [--out BENCHMARKS.md] [--quick]
    python benchmarks/lm_throughput.py --data-path FILE --gpu-preset

Both sides train ``llm.models.gpt.GPT`` (char tokenizer) on the batches of
TextDataModule's training loader, with AdamW, clipping at 1.0 and a cosine
schedule; the engine through LMTask with ``default_callbacks(config)``. Each
run takes some warm-up steps, then a timed stretch of steps: compilation and
other first-step costs are reported apart from the steady step time.

On the CPU (the default) the rounds also run the engine with
``training.precision bf16`` and with ``training.compile true``, reported
relative to the engine in fp32 eager mode. The CPU runs use one torch thread
(``--threads``) and are measured in the process's CPU time as well as by the
wall clock: on a machine shared with other work the wall clock of a step can
swing several-fold, its CPU time hardly.

``--gpu-preset`` runs GPT-2 124M (12 layers, 12 heads, 768 wide, context
1024, LayerNorm, GELU, learned positions, the vocabulary padded to GPT-2's
50304) in bf16 with torch.compile and a batch of 32 on a CUDA GPU, and reports
model FLOPs utilisation: tokens/s x ``flops_per_token`` over the device's
dense bf16 peak (llm.training.core.throughput.PEAK_FLOPS; ``--peak-flops`` for
other devices). gpu_mfu.py shows what each of these choices is worth.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout: import this llm

from benchmarks import common  # noqa: E402
from llm.data.text_data_module import TextDataModule  # noqa: E402
from llm.errors import UsageError  # noqa: E402
from llm.models.gpt import GPT, GPTConfig  # noqa: E402
from llm.training.core.callbacks import Callback  # noqa: E402
from llm.training.core.config import Config  # noqa: E402
from llm.training.core.engine import TrainingEngine  # noqa: E402
from llm.training.core.throughput import peak_flops_of  # noqa: E402
from llm.training.tasks.lm_task import LMTask  # noqa: E402
from llm.training.train import default_callbacks  # noqa: E402

CPU_SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, "batch_size": 16}
"""The default lm model (and lm_quality's): a CPU trains it at a few steps per second."""
GPU_PRESET = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "batch_size": 32,
              "pos_emb": "learned", "norm": "layernorm", "mlp": "gelu", "vocab_size": 50304}
"""GPT-2 124M: its block and its 50257 tokens padded to 50304 (the corpus's characters fill 65 of them)."""
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "pos_emb", "norm", "mlp", "vocab_size")
"""The entries of a shape that are model settings."""
TARGET = 0.98
"""engine/hand tokens/s the engine should reach."""
MFU_TARGET = 0.50
"""Model FLOPs utilisation the engine should reach with --gpu-preset."""
SEED, LR, WEIGHT_DECAY, CLIP, LOG_EVERY = 0, 1e-3, 0.01, 1.0, 10
"""The engine's defaults, written out for the hand loop."""


@dataclass
class Measure:
    tokens_per_s: float  # steady state, after warm-up, by the wall clock
    tokens_per_cpu_s: float  # the same steps, per second of the process's CPU time
    first_step_s: float  # the first step, with compilation and other first-use costs
    train_loss: float  # mean over the steps of the last logging window
    params: int
    flops_per_token: int
    mfu: float | None = None

    def __str__(self) -> str:
        mfu = f", MFU {self.mfu:.1%}" if self.mfu is not None else ""
        return (f"{self.tokens_per_s:,.0f} tokens/s wall, {self.tokens_per_cpu_s:,.0f} tokens/s CPU, first step "
                f"{self.first_step_s:.2f} s{mfu}, train loss {self.train_loss:.4f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--gpu-preset", action="store_true",
                        help="GPT-2 124M, bf16, torch.compile, batch 32, on a CUDA GPU; reports MFU")
    parser.add_argument("--peak-flops", type=float, default=None, metavar="FLOPS",
                        help="the device's dense bf16 peak FLOP/s, for a GPU not in the table")
    parser.add_argument("--batch-size", type=int, default=None, metavar="B",
                        help="sequences per step, in place of the shape's (16; 32 with --gpu-preset)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch threads on the CPU (default: 1, so that CPU time measures the work; "
                             "see the docstring)")
    parser.add_argument("--rounds", type=int, default=None, metavar="N",
                        help="repetitions of each contender, interleaved (default: 5; 2 with --gpu-preset; 1 with --quick)")
    args = parser.parse_args(argv)
    common.check_data_path(parser, args.data_path)
    if args.gpu_preset and not torch.cuda.is_available():
        sys.exit("error: --gpu-preset needs a CUDA GPU, and torch.cuda.is_available() is False on this machine")
    args.rounds = args.rounds or (1 if args.quick else 2 if args.gpu_preset else 5)
    args.warmup, args.steps = (2, 4) if args.quick else (10, 40) if args.gpu_preset else (3, 12)
    args.shape = dict(GPU_PRESET if args.gpu_preset else CPU_SHAPE)
    if args.batch_size:
        args.shape["batch_size"] = args.batch_size
    args.device = "cuda" if args.gpu_preset else "cpu"
    return args


def peak_flops(args: argparse.Namespace) -> tuple[float | None, str]:
    """The device's peak and where it came from."""
    if args.peak_flops:
        return args.peak_flops, "--peak-flops"
    if args.device != "cuda":
        return None, "none for a CPU"
    name = torch.cuda.get_device_name()
    peak = peak_flops_of(name)
    if peak is None:
        return None, f"{name} is not in llm.training.core.throughput.PEAK_FLOPS: pass --peak-flops"
    return peak, f"{name}, from llm.training.core.throughput.PEAK_FLOPS"


def make_config(args: argparse.Namespace, work: Path, log_dir: Path, precision: str, compiled: bool) -> Config:
    s = args.shape
    return Config.from_dict({
        "task": "lm",
        "model": {k: s[k] for k in MODEL_KEYS if k in s},
        "data": {"path": str(Path(args.data_path).resolve()), "tokenizer": "char", "cache_dir": str(work / "cache")},
        "training": {
            "batch_size": s["batch_size"], "max_steps": args.warmup + args.steps, "epochs": 1000, "seed": SEED,
            "device": args.device, "precision": precision, "compile": compiled,
            "eval_batches": 1, "patience": 1000,  # the final validation stays short; no early stop
        },
        "optimizer": {"lr": LR, "weight_decay": WEIGHT_DECAY, "scheduler": "cosine"},
        "logging": {"log_dir": str(log_dir), "progress_bar": False, "log_every_steps": LOG_EVERY},
    })


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(config: Config, times: list[tuple[float, float]], start: tuple[float, float], warmup: int,
            loss: float, model: GPT, peak: float | None) -> Measure:
    """From the (wall, CPU) clocks at the end of every step: the steady rate over the steps after warm-up."""
    tokens = (len(times) - warmup) * config.training.batch_size * config.model.block_size
    tokens_per_s = tokens / (times[-1][0] - times[warmup - 1][0])
    tokens_per_cpu_s = tokens / (times[-1][1] - times[warmup - 1][1])
    flops_per_token = model.flops_per_token(config.model.block_size)
    mfu = tokens_per_s * flops_per_token / peak if peak else None
    return Measure(tokens_per_s, tokens_per_cpu_s, times[0][0] - start[0], loss, model.num_params(),
                   flops_per_token, mfu)


# ---- the engine ------------------------------------------------------------------------------


class StepClock(Callback):
    """The time at the end of every step; synchronised with the GPU at the end of warm-up and of the run."""

    def __init__(self, warmup: int, last: int):
        self.warmup, self.last, self.times = warmup, last, []

    def on_train_start(self, engine: TrainingEngine) -> None:
        self.start = common.clock()

    def on_step_end(self, engine: TrainingEngine) -> None:
        if engine.step in (self.warmup, self.last):
            sync(engine.device)
        self.times.append(common.clock())


def run_engine(config: Config, warmup: int, peak: float | None) -> Measure:
    clock = StepClock(warmup, config.training.max_steps)
    engine = TrainingEngine(config, LMTask(config), callbacks=[*default_callbacks(config), clock])
    with contextlib.redirect_stdout(io.StringIO()):  # the validation line
        metrics = engine.train()
    return measure(config, clock.times, clock.start, warmup, metrics["train_loss"], engine.raw_model, peak)


# ---- by hand ------------------------------------------------------------------------------------


def run_hand(config: Config, warmup: int, peak: float | None, sync_norm: bool = False,
             regional: bool = False) -> Measure:
    """The same steps written out; compiled, the forward and the loss are one graph. ``sync_norm`` reads the
    gradient norm on the host every step (the engine's non-finite check); ``regional`` compiles block by block
    and the loss apart (the engine's compile)."""
    data = TextDataModule(config)
    data.prepare_data()  # a cache hit after the first run
    data.setup("fit")
    loader, sampler = data.train_dataloader(0, 1)
    sampler.set_epoch(0)
    device = torch.device(config.training.device)
    t, m = config.training, config.model

    torch.manual_seed(SEED)
    raw = GPT(GPTConfig(vocab_size=m.vocab_size or data.tokenizer.vocab_size, block_size=m.block_size,
                        n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, pos_emb=m.pos_emb, norm=m.norm,
                        mlp=m.mlp)).to(device)
    cross_entropy = F.cross_entropy
    if t.compile and regional:  # block by block, and the loss apart
        for block in raw.blocks:
            block.compile()
        cross_entropy = torch.compile(F.cross_entropy)

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cross_entropy(raw(x).flatten(0, 1), y.flatten())

    if t.compile and not regional:  # the forward and the loss in one graph
        loss_of = torch.compile(loss_of)
    params = list(raw.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=LR, fused=True)
    total = t.max_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total))))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if t.precision == "bf16"
                else contextlib.nullcontext())

    losses, times = [], []
    start = common.clock()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            loss = loss_of(x, y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, CLIP)
        if sync_norm:
            float(norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if len(losses) in (warmup, total):
            sync(device)
        times.append(common.clock())
        if len(losses) == total:
            break
    window = total % LOG_EVERY or LOG_EVERY  # the engine's last logged window
    loss = torch.stack(losses[-window:]).float().mean().item()
    return measure(config, times, start, warmup, loss, raw, peak)


def check_corpus(config: Config) -> None:
    """Stop, before any timing, when one epoch of the corpus is shorter than the steps to time.

    The hand-written loop makes one pass; the engine would go on into a second epoch
    and time its validation: the two would not do the same work.
    """
    data = TextDataModule(config)
    try:
        data.prepare_data()  # tokenizes once: the runs then hit the cache
        data.setup("fit")
    except UsageError as e:
        sys.exit(f"error: {e}")
    batches, steps = len(data.train_dataloader(0, 1)[0]), config.training.max_steps
    if batches < steps:
        sys.exit(f"error: {config.data.path or 'the default corpus'} gives {batches} batches of "
                 f"{config.training.batch_size} x {config.model.block_size} tokens, fewer than the {steps} steps "
                 f"to time: give a larger --data-path")


# ---- the report ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    peak, peak_note = peak_flops(args)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="lm_throughput-") as tmp:
        work, count = Path(tmp), iter(range(10**6))
        # an empty compile cache: the first compiled run shows what a user's first run costs
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor-cache")

        def contender(run: Callable[[Config, int, float | None], Measure], precision: str,
                      compiled: bool) -> Callable[[], Measure]:
            def go() -> Measure:  # a new run folder each time: the engine refuses to write over a run
                log_dir = work / f"run-{next(count)}"
                return run(make_config(args, work, log_dir, precision, compiled), args.warmup, peak)
            return go

        check_corpus(make_config(args, work, work / "check", "fp32", False))
        if args.gpu_preset:
            contenders = {"engine, bf16, compiled": contender(run_engine, "bf16", True),
                          "hand, bf16, compiled": contender(run_hand, "bf16", True)}
            engine_name, hand_name = "engine, bf16, compiled", "hand, bf16, compiled"
        else:
            contenders = {"engine, fp32, eager": contender(run_engine, "fp32", False),
                          "hand, fp32, eager": contender(run_hand, "fp32", False),
                          "engine, bf16, eager": contender(run_engine, "bf16", False),
                          "engine, fp32, compiled": contender(run_engine, "fp32", True)}
            engine_name, hand_name = "engine, fp32, eager", "hand, fp32, eager"
        title = "LM throughput: engine vs hand-written loop" + (", GPU preset (GPT-2 124M shape)" if args.gpu_preset
                                                                 else "")
        report = common.GrowingSection(args.out, title + (" (quick)" if args.quick else ""))

        def write(runs: dict[str, list[Measure]], done: bool = False) -> None:  # after each round: a run cut short
            facts, body = summary(args, runs, engine_name, hand_name, peak, peak_note)  # keeps them
            report.write(body, done=done, facts=facts)

        # no warm-up round: each run warms up itself, and the first compiled run shows the cold compile time
        runs = common.interleaved(contenders, args.rounds, warmup=False, after_round=write)
    write(runs, done=True)
    return 0


def summary(args: argparse.Namespace, runs: dict[str, list[Measure]], engine_name: str, hand_name: str,
            peak: float | None, peak_note: str) -> tuple[list[tuple[str, str]], list[str]]:
    """The section's facts and body (table and notes) for the rounds measured so far."""
    # on the CPU, CPU time is the measure: other processes on a shared machine stretch the wall clock
    metric = "tokens_per_cpu_s" if args.device == "cpu" else "tokens_per_s"
    rates = {name: [getattr(m, metric) for m in ms] for name, ms in runs.items()}
    medians = {name: common.median(values) for name, values in rates.items()}
    wall = {name: common.median([m.tokens_per_s for m in ms]) for name, ms in runs.items()}
    tokens_per_step = args.shape["batch_size"] * args.shape["block_size"]
    vs_base = {name: common.paired_ratio(rates[name], rates[engine_name]) for name in runs}
    wall_vs_base = {name: common.paired_ratio([m.tokens_per_s for m in runs[name]],
                                              [m.tokens_per_s for m in runs[engine_name]]) for name in runs}
    rows = []
    for name, ms in runs.items():
        first = [m.first_step_s for m in ms]
        compile_s = first[0] - tokens_per_step / wall[name] if "compiled" in name else None
        mfu = common.median([m.mfu for m in ms]) if ms[0].mfu is not None else None
        ratio, low, high = vs_base[name]
        row = [name, f"{medians[name]:,.0f}", common.spread(rates[name]), f"{ratio:.3f} ({low:.3f}-{high:.3f})"]
        if args.device == "cpu":
            row += [f"{wall[name]:,.0f}", common.spread([m.tokens_per_s for m in ms])]
        row += [f"{first[0]:.2f}" + (f" (later runs {common.median(first[1:]):.2f})" if len(first) > 1 else ""),
                "-" if compile_s is None else f"{compile_s:.1f}"]
        if args.device != "cpu":
            row.append("n/a" if mfu is None else f"{mfu:.1%}")
        rows.append((*row, f"{ms[-1].train_loss:.4f}"))
    central = common.median_label(len(runs[engine_name]))
    header = ["run", f"{central} tokens/s" + (" per CPU second" if args.device == "cpu" else ""), "min-max",
              f"vs {engine_name}, paired by round (min-max)"]
    if args.device == "cpu":
        header += [f"{central} tokens/s (wall)", "min-max"]
    header += ["first step s (first run)", "compile s (first step minus a step)"]
    if args.device != "cpu":
        header.append("MFU")
    table = common.markdown_table((*header, "last logged train loss"), rows)

    ratio, low, high = common.paired_ratio(rates[engine_name], rates[hand_name])
    wall_ratio = common.paired_ratio([m.tokens_per_s for m in runs[engine_name]],
                                     [m.tokens_per_s for m in runs[hand_name]])[0]
    measured = "in CPU time" if args.device == "cpu" else "by the wall clock"
    gap = abs(runs[engine_name][-1].train_loss - runs[hand_name][-1].train_loss)
    # on a GPU the engine compiles block by block and the hand loop the whole model: bf16 kernels fused
    # differently round differently (about 1e-3 after 50 steps on an H200); and some backward kernels add in
    # no fixed order (the embedding's, a 50k-row one above all), so that one contender's own runs differ too
    own = max(max(losses) - min(losses) for losses in
              ([m.train_loss for m in runs[name]] for name in (engine_name, hand_name)))
    tolerance = max(1e-4 if args.device == "cpu" else 1e-2, own)
    best = max(rates[engine_name]) / max(rates[hand_name])
    met, interval_low, interval_high = common.against_target(rates[engine_name], rates[hand_name], TARGET)
    notes = [f"engine/hand tokens/s = {ratio:.3f} {measured}, the median over rounds of each round's ratio "
             f"(rounds {low:.3f}-{high:.3f}; 90% interval of the median {interval_low:.3f}-{interval_high:.3f}; "
             f"best run against best run {best:.3f}, since noise only slows)"
             + (f", {wall_ratio:.3f} by the wall clock" if args.device == "cpu" else "")
             + f" (target >= {TARGET} {measured}: {met}); the engine's and the hand loop's "
             + f"train losses differ by {gap:.1e} (each one's own runs by up to {own:.1e}), "
             + (f"within {tolerance:.0e}: the same work on the same batches." if gap <= tolerance
                else f"more than {tolerance:.0e}: check they do the same work.")]
    engine_mfu = common.median([m.mfu for m in runs[engine_name]]) if runs[engine_name][0].mfu is not None else None
    if engine_mfu is not None:
        notes.append(f"Engine MFU = {engine_mfu:.1%} (target >= {MFU_TARGET:.0%}: "
                     f"{'met' if engine_mfu >= MFU_TARGET else 'NOT met'}).")
    if not args.gpu_preset:
        notes.append("Through the engine, against fp32 eager: "
                     + "; ".join(f"{name.removeprefix('engine, ')}: {vs_base[name][0]:.2f}x the tokens/s "
                                 f"({wall_vs_base[name][0]:.2f}x by the wall clock)"
                                 for name in runs if name.startswith("engine, ") and name != engine_name) + ".")

    s, first = args.shape, runs[engine_name][0]
    facts = [
        ("model", (f"GPT, {s['n_layer']} layers, {s['n_head']} heads, {s['n_embd']} wide, context {s['block_size']}, "
                   + "".join(f"{k} {s[k]}, " for k in MODEL_KEYS[4:] if k in s)
                   + f"{first.params / 1e6:.2f}M parameters, {first.flops_per_token / 1e6:,.1f} MFLOPs per token "
                   f"(GPT.flops_per_token), char tokenizer on {Path(args.data_path).name}, batch {s['batch_size']} "
                   f"({s['batch_size'] * s['block_size']:,} tokens/step), on {args.device}")),
        ("repetitions", (f"{len(runs[engine_name])}"
                         + ("" if len(runs[engine_name]) == args.rounds else f" of {args.rounds}")
                         + f" rounds, contenders interleaved; each run takes {args.warmup} warm-up steps, "
                         f"then {args.steps} timed steps; tokens/s from the timed steps only; the first compiled run "
                         f"starts from an empty inductor cache, later ones reuse what this process compiled")),
        ("clocks", ("the process's CPU time (all threads) and the wall clock; on the CPU with "
                    f"{args.threads} torch thread{'s' if args.threads != 1 else ''}, CPU time is the measure, "
                    "since a shared machine stretches the wall clock" if args.device == "cpu" else
                    "the wall clock, with the GPU synchronised at the end of warm-up and of the run")),
        ("MFU peak", f"{peak / 1e12:,.4g} TFLOP/s ({peak_note})" if peak else peak_note),
    ]
    return facts, [table, " ".join(notes)]


if __name__ == "__main__":
    sys.exit(main())
