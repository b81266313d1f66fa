"""Loop overhead: the engine against a hand-written PyTorch loop, on a model too small to hide the loop.

    python benchmarks/loop_overhead.py [--out BENCHMARKS.md] [--quick] [--profile]

The same work, done by each contender: a one-hidden-layer MLP (16 -> 32 -> 1, RegressionTask's
model) on the synthetic regression data, through SyntheticDataModule's own
DataLoader and DistributedSampler, with fused AdamW (decay on matrices only), gradient
clipping at 1.0, a cosine schedule, ``zero_grad(set_to_none=True)`` and a full
validation pass per epoch:

- engine: ``TrainingEngine`` with ``default_callbacks(config)``, what a user of
  ``python -m llm.training.train`` gets (metrics.jsonl, early stopping, LR
  logging, TensorBoard; the progress bar off, as without a terminal);
- engine, no TensorBoard: the defaults less TensorBoardLogger (``logging.loggers ""``);
- engine, no callbacks: the same engine with an empty callback list, which
  separates the loop's own cost from that of the callbacks;
- hand: a plain loop, which keeps only the loss sums a validation needs (the target's reference);
- hand, logging: the plain loop plus what the engine's defaults record, written by hand the usual way:
  a step skipped when its gradient norm is not finite, and every logging.log_every_steps steps the
  mean loss, gradient norm and learning rate to TensorBoard (a SummaryWriter) and as a JSON line;
- lightning: PyTorch Lightning's Trainer, when ``lightning`` is installed
  (TensorBoard logger every logging.log_every_steps steps, as the engine; no progress bar, model
  summary or per-epoch checkpoint, none of which the engine does in the loop: its save of a better
  validation, which ``checkpoint.every_n_minutes`` turns on by default, is turned off, as no hand loop saves).

The clock runs from the start of the first epoch to the end of the last
validation: set-up and the engine's final checkpoint are left out. After a
warm-up round, contenders run in turn, round after round, on one torch thread,
and the median steps/s of each is reported, by the wall clock and by the
process's CPU time (steadier on a shared machine). With ``--profile``, or when the engine is below 95% of the hand loop, one more
engine run under cProfile shows where its time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import logging
import math
import pstats
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout: import this llm

from benchmarks import common  # noqa: E402
from llm.data.synthetic_data_module import SyntheticDataModule  # noqa: E402
from llm.training.core.callbacks import Callback  # noqa: E402
from llm.training.core.config import Config  # noqa: E402
from llm.training.core.engine import TrainingEngine  # noqa: E402
from llm.training.tasks.regression_task import RegressionTask, mlp  # noqa: E402
from llm.training.train import default_callbacks  # noqa: E402

INPUT_DIM, WIDTH, LAYERS, BATCH, SEED = 16, 32, 1, 32, 0
LR, WEIGHT_DECAY, CLIP = 1e-3, 0.01, 1.0
"""The engine's defaults (optimizer.lr, optimizer.weight_decay, training.grad_clip), written out for the hand loop."""
TARGET = 0.95
"""engine/hand steps/s the engine should reach."""


@dataclass
class Run:
    steps: int
    start: tuple[float, float]
    stop: tuple[float, float]
    val_loss: float

    @property
    def steps_per_s(self) -> float:
        return self.steps / (self.stop[0] - self.start[0])

    @property
    def steps_per_cpu_s(self) -> float:
        """Steps per second of CPU time: what the process did, less the time other processes took the cores."""
        return self.steps / (self.stop[1] - self.start[1])

    def __str__(self) -> str:
        return (f"{self.steps} steps: {self.steps_per_s:,.0f} steps/s wall, {self.steps_per_cpu_s:,.0f} steps/s CPU, "
                f"val_loss {self.val_loss:.6f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, data_help=None)
    parser.add_argument("--rounds", type=int, default=None, metavar="N",
                        help="repetitions of each contender, interleaved (default: 15; 2 with --quick): the "
                             "median of 7 moved by about 1%% from one run of this benchmark to the next")
    parser.add_argument("--profile", action="store_true", help="profile one engine run even when it meets the target")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 15)
    # --quick: a smoke run of the same code, on a data set of a few hundred steps
    args.samples, args.epochs = (4096, 1) if args.quick else (20480, 2)
    return args


def make_config(log_dir: Path, samples: int, epochs: int) -> Config:
    return Config.from_dict({
        "task": "regression",
        "model": {"n_layer": LAYERS, "n_embd": WIDTH},
        "data": {"input_dim": INPUT_DIM, "num_samples": samples},
        "training": {"epochs": epochs, "batch_size": BATCH, "seed": SEED, "device": "cpu"},
        "optimizer": {"name": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY, "scheduler": "cosine"},
        "logging": {"log_dir": str(log_dir), "progress_bar": False},
        # no save inside the timed steps, which the hand loops do not make: by default (every_n_minutes) the
        # engine saves at each validation that beats the best, here once, after the first epoch (11-13 ms, about
        # 1.5% of the timed run); benchmarks/checkpoint_io.py measures saves
        "checkpoint": {"every_n_minutes": 0},
    })


# ---- the engine ---------------------------------------------------------------------------


class Stopwatch(Callback):
    """From on_train_start to the last on_epoch_end: every step and validation, no set-up, no final checkpoint."""

    def on_train_start(self, engine: TrainingEngine) -> None:
        self.start = common.clock()

    def on_epoch_end(self, engine: TrainingEngine, metrics: dict[str, float]) -> None:
        self.stop = common.clock()


def run_engine(config: Config, with_defaults: bool, tensorboard: bool = True) -> Run:
    watch = Stopwatch()
    if not tensorboard:
        config.logging.loggers = ""
    callbacks = [*(default_callbacks(config) if with_defaults else []), watch]
    engine = TrainingEngine(config, RegressionTask(config), callbacks=callbacks)
    with contextlib.redirect_stdout(io.StringIO()):  # the per-epoch lines
        metrics = engine.train()
    return Run(engine.step, watch.start, watch.stop, metrics["val_loss"])


# ---- by hand --------------------------------------------------------------------------------


def run_hand(config: Config, logging_too: bool = False) -> Run:
    data = SyntheticDataModule(config)
    data.setup("fit")
    train_loader, train_sampler = data.train_dataloader(0, 1)
    val_loader, _ = data.val_dataloader(0, 1)
    epochs = config.training.epochs
    total_steps = len(train_loader) * epochs

    torch.manual_seed(SEED)
    model = mlp(INPUT_DIM, WIDTH, LAYERS, 1)
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": WEIGHT_DECAY},
                                   {"params": vectors, "weight_decay": 0.0}], lr=LR, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total_steps))))
    loss_fn = nn.MSELoss()
    every = config.logging.log_every_steps
    if logging_too:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = Path(config.logging.log_dir)
        log_dir.mkdir(parents=True)
        writer, jsonl = SummaryWriter(str(log_dir)), open(log_dir / "metrics.jsonl", "a")
    losses, norms = [], []

    start, steps = common.clock(), 0
    for epoch in range(epochs):
        train_sampler.set_epoch(epoch)
        model.train()
        for x, y in train_loader:
            loss = loss_fn(model(x), y)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            if not logging_too:
                optimizer.step()
            elif math.isfinite(norm):
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                losses.append(loss.item())
                norms.append(norm.item())
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            if logging_too and steps % every == 0:
                record = {"step": steps, "loss": sum(losses) / len(losses), "grad_norm": sum(norms) / len(norms),
                          "lr": lr}
                for name in ("loss", "grad_norm", "lr"):
                    writer.add_scalar(f"train/{name}", record[name], steps)
                jsonl.write(json.dumps(record) + "\n")
                losses, norms = [], []
        model.eval()
        loss_sum, mae_sum, count = torch.zeros(()), torch.zeros(()), 0
        with torch.no_grad():
            for x, y in val_loader:
                pred = model(x)
                loss_sum += len(x) * loss_fn(pred, y)
                mae_sum += len(x) * (pred - y).abs().mean()
                count += len(x)
        val_loss = (loss_sum / count).item()
        if logging_too:
            writer.add_scalar("val/val_loss", val_loss, steps)
            jsonl.write(json.dumps({"step": steps, "val_loss": val_loss}) + "\n")
    stop = common.clock()
    if logging_too:
        writer.close()
        jsonl.close()
    return Run(steps, start, stop, val_loss)


# ---- PyTorch Lightning ----------------------------------------------------------------------


def lightning_runner() -> tuple[Callable[[Config], Run] | None, str]:
    """A function running the Lightning contender, and its version; (None, why) when it cannot run."""
    try:
        import lightning as L
        from lightning.pytorch.loggers import TensorBoardLogger
    except ImportError as e:
        return None, f"not installed ({e.name}): pip install lightning"
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # "GPU available: False ..." banners
    warnings.filterwarnings("ignore", module=r"lightning\..*")  # "consider more num_workers" and the like

    class Regression(L.LightningModule):
        def __init__(self, total_steps: int):
            super().__init__()
            self.total_steps = total_steps
            self.model = mlp(INPUT_DIM, WIDTH, LAYERS, 1)
            self.loss_fn = nn.MSELoss()

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = self.loss_fn(self.model(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            pred = self.model(x)
            self.log("val_loss", self.loss_fn(pred, y), batch_size=len(x))
            self.log("val_mae", (pred - y).abs().mean(), batch_size=len(x))

        def configure_optimizers(self):
            matrices = [p for p in self.parameters() if p.ndim >= 2]
            vectors = [p for p in self.parameters() if p.ndim < 2]
            optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": WEIGHT_DECAY},
                                           {"params": vectors, "weight_decay": 0.0}], lr=LR, fused=True)
            total = self.total_steps
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total))))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    class LitStopwatch(L.Callback):
        def on_train_start(self, trainer, module):
            self.start = common.clock()

        def on_train_epoch_end(self, trainer, module):  # after that epoch's validation
            self.stop = common.clock()

    def run(config: Config) -> Run:
        data = SyntheticDataModule(config)
        data.setup("fit")
        train_loader, _ = data.train_dataloader(0, 1)
        val_loader, _ = data.val_dataloader(0, 1)
        epochs = config.training.epochs
        torch.manual_seed(SEED)
        module = Regression(len(train_loader) * epochs)
        watch = LitStopwatch()
        trainer = L.Trainer(
            max_epochs=epochs, accelerator="cpu", devices=1, gradient_clip_val=CLIP,
            logger=TensorBoardLogger(save_dir=config.logging.log_dir, name=""), log_every_n_steps=config.logging.log_every_steps,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            num_sanity_val_steps=0, callbacks=[watch], default_root_dir=config.logging.log_dir,
        )
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
        return Run(trainer.global_step, watch.start, watch.stop, float(trainer.callback_metrics["val_loss"]))

    return run, f"lightning {L.__version__}"


# ---- where the engine's time goes ----------------------------------------------------------------


def profile_engine(config: Config) -> tuple[str, int]:
    """One engine run under cProfile: the cumulative time of llm's functions, per step."""
    profiler = cProfile.Profile()
    watch = Stopwatch()
    engine = TrainingEngine(config, RegressionTask(config), callbacks=[*default_callbacks(config), watch])
    with contextlib.redirect_stdout(io.StringIO()):
        profiler.runcall(engine.train)
    steps = engine.step
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, callers)

    def where(key: tuple[str, int, str]) -> str:
        file, line, name = key
        if file == "~":
            return name  # a builtin such as {method 'item' of 'torch._C.TensorBase' objects}
        for marker in ("/llm/", "/torch/", "/lightning/"):
            if marker in file:
                file = marker.strip("/") + "/" + file.split(marker, 1)[1]
                break
        else:
            file = Path(file).name
        return f"{file}:{line} {name}"

    def row(key, values) -> tuple[str, str, str, str]:
        _, calls, own, cumulative, _ = values
        return (f"`{where(key)}`", f"{calls / steps:.2f}", f"{1e6 * own / steps:.1f}", f"{1e6 * cumulative / steps:.1f}")

    header = ("function", "calls/step", "own us/step", "cumulative us/step")
    ours = [kv for kv in stats.items() if "/llm/" in kv[0][0] and "/benchmarks/" not in kv[0][0]]
    by_cumulative = sorted(ours, key=lambda kv: kv[1][3], reverse=True)[:15]
    return common.markdown_table(header, [row(k, v) for k, v in by_cumulative]), steps


# ---- the report ---------------------------------------------------------------------------------


def cpu_us_over_hand(runs: list[Run], hand: list[Run]) -> float:
    """The median over rounds of a round's CPU time per step less the hand loop's in that round, in us: paired
    as the ratios are, so that it agrees with them in sign (a difference of two medians need not)."""
    return common.median([1e6 / r.steps_per_cpu_s - 1e6 / h.steps_per_cpu_s for r, h in zip(runs, hand, strict=True)])



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # the ops are too small for a second thread to help, and on a shared machine a thread
    # waiting for a busy core makes small-op timings swing by several times
    torch.set_num_threads(1)
    lightning, lightning_note = lightning_runner()
    with tempfile.TemporaryDirectory(prefix="loop_overhead-") as tmp:
        work, count = Path(tmp), iter(range(10**6))

        def fresh_config() -> Config:  # a new run folder each time: the engine refuses to write over a run
            return make_config(work / f"run-{next(count)}", args.samples, args.epochs)

        contenders = {
            "engine": lambda: run_engine(fresh_config(), with_defaults=True),
            "engine, no TensorBoard": lambda: run_engine(fresh_config(), with_defaults=True, tensorboard=False),
            "engine, no callbacks": lambda: run_engine(fresh_config(), with_defaults=False),
            "hand": lambda: run_hand(fresh_config()),
            "hand, logging": lambda: run_hand(fresh_config(), logging_too=True),
        }
        if lightning is not None:
            contenders["lightning"] = lambda: lightning(fresh_config())
        runs = common.interleaved(contenders, args.rounds)
        wall = {name: common.median([r.steps_per_s for r in rs]) for name, rs in runs.items()}
        vs_hand = {name: common.paired_ratio([r.steps_per_s for r in rs], [r.steps_per_s for r in runs["hand"]])
                   for name, rs in runs.items()}
        ratio, low, high = vs_hand["engine"]
        profiled = profile_engine(fresh_config()) if args.profile or ratio < TARGET else None

    cpu = {name: common.median([r.steps_per_cpu_s for r in rs]) for name, rs in runs.items()}
    cpu_vs_hand = {name: common.paired_ratio([r.steps_per_cpu_s for r in rs],
                                             [r.steps_per_cpu_s for r in runs["hand"]]) for name, rs in runs.items()}
    cpu_ratio = cpu_vs_hand["engine"][0]
    steps = runs["hand"][0].steps
    rows = []
    for name, rs in runs.items():
        rows.append((name, f"{wall[name]:,.0f}", common.spread([r.steps_per_s for r in rs]),
                     "{:.3f} ({:.3f}-{:.3f})".format(*vs_hand[name]), f"{1e6 / wall[name]:.0f}",
                     f"{cpu[name]:,.0f}", f"{cpu_vs_hand[name][0]:.3f}",
                     "-" if name == "hand" else f"{cpu_us_over_hand(rs, runs['hand']):+.0f}",
                     f"{rs[-1].val_loss:.6f}"))
    table = common.markdown_table(
        ("contender", "median steps/s (wall)", "min-max", "vs hand, paired by round (min-max)", "us/step", "median steps/s (CPU time)",
         "vs hand (CPU time)", "CPU us/step over hand, paired by round", "final val_loss"), rows)
    # met where the median's 90% interval lies above the target on both clocks; missed where either's lies below
    told = {clock: common.against_target([getattr(r, field) for r in runs["engine"]],
                                         [getattr(r, field) for r in runs["hand"]], TARGET)
            for clock, field in (("wall", "steps_per_s"), ("CPU", "steps_per_cpu_s"))}
    said = {verdict for verdict, _, _ in told.values()}  # both clocks have as many rounds: too few for both or neither
    met = said.pop() if len(said) == 1 else "NOT met" if "NOT met" in said else "not told apart from the target"
    best = max(r.steps_per_s for r in runs["engine"]) / max(r.steps_per_s for r in runs["hand"])
    verdicts = [f"engine/hand = {ratio:.3f} on the wall clock (rounds {low:.3f}-{high:.3f}; best run against best "
                f"run {best:.3f}, since noise only slows), {cpu_ratio:.3f} in CPU time, each the median over rounds "
                f"of that round's ratio; 90% intervals of those medians "
                + ", ".join(f"{lo:.3f}-{hi:.3f} ({clock})" for clock, (_, lo, hi) in told.items())
                + f" (target >= {TARGET}: {met})"]
    logged = common.paired_ratio([r.steps_per_s for r in runs["engine"]], [r.steps_per_s for r in runs["hand, logging"]])
    verdicts.append("engine/(hand, logging) = {:.3f} ({:.3f}-{:.3f}): against a hand loop that records what the "
                    "engine's defaults do".format(*logged))
    if "lightning" in wall:
        verdicts.append(f"lightning/hand = {vs_hand['lightning'][0]:.3f} "
                        f"({cpu_vs_hand['lightning'][0]:.3f} in CPU time)")
    losses = [rs[-1].val_loss for rs in runs.values()]
    same = max(losses) - min(losses) <= 1e-5 * abs(min(losses))
    verdicts.append("final val_loss " + ("equal across contenders (to 1e-5): the same arithmetic on the same batches"
                                         if same else "differs between contenders: check that they do the same work"))
    body = [table, "; ".join(verdicts) + "."]
    if profiled is not None:
        by_cumulative, profiled_steps = profiled
        body += [(f"Where the engine's time goes: one more engine run under cProfile ({profiled_steps} steps; "
                  f"the profiler slows Python code, so read shares, not absolute times), llm's functions "
                  f"by cumulative time:"), by_cumulative]
    facts = [
        ("work", (f"MLP {INPUT_DIM} -> {WIDTH} -> 1 (RegressionTask's, n_layer {LAYERS}), batch {BATCH}, "
                  f"{args.samples} synthetic samples (90% train: {steps // args.epochs} steps per epoch), "
                  f"{args.epochs} epochs, AdamW lr {LR}, clip {CLIP}, cosine, full validation per epoch, no checkpoint "
                  f"saved inside the timed steps (checkpoint.every_n_minutes 0), CPU")),
        ("repetitions", (f"a warm-up round, then {args.rounds} rounds, contenders interleaved; the clock runs "
                         f"from the first step to the end of the last validation; 1 torch thread")),
        ("clocks", ("wall time, and the process's CPU time (all its threads, TensorBoard's writer included), "
                    "which other processes on a shared machine disturb far less")),
        ("lightning", lightning_note),
    ]
    text = common.section(f"Loop overhead: engine vs hand-written loop{' (quick)' if args.quick else ''}",
                          facts, body)
    common.append_section(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
