"""How good a language model a few CPU minutes buy: train a fixed small char-level GPT, record loss and speed.

    python benchmarks/lm_quality.py --data-path FILE [--max-steps N] [--out BENCHMARKS.md]

Trains through the real entry point (``python -m llm.training.train`` in a
subprocess, into a temporary run folder), then scores the final weights on the
whole validation split with ``llm.evaluate``. Prints a Markdown section and
appends it to ``--out``. Measured, not asserted: compare sections taken on the
same machine only.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout: import this llm

from benchmarks import common  # noqa: E402
from llm.data.text_data_module import TextDataModule  # noqa: E402
from llm.evaluate import evaluate  # noqa: E402
from llm.training.core.config import Config  # noqa: E402
from llm.training.tasks.lm_task import load_lm, perplexity  # noqa: E402

BLOCK_SIZE, BATCH_SIZE, EVAL_EVERY = 128, 16, 50
MODEL_AND_OPTIMIZER = [
    "--task", "lm", "--data-tokenizer", "char", "--data-val-fraction", "0.1",
    "--model-n-layer", "4", "--model-n-head", "4", "--model-n-embd", "128", "--model-block-size", str(BLOCK_SIZE),
    "--training-batch-size", str(BATCH_SIZE), "--training-seed", "0", "--training-epochs", "1000",
    "--optimizer-lr", "1e-3", "--optimizer-warmup-steps", "20", "--optimizer-scheduler", "cosine",
    "--training-eval-every-steps", str(EVAL_EVERY), "--training-eval-batches", "20",
    "--training-patience", "1000",  # a benchmark runs its steps: no early stop
    "--logging-progress-bar", "false",
]
"""The fixed recipe: change it and earlier sections of BENCHMARKS.md stop being comparable."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, data_help="UTF-8 text to train and validate on", quick=False)
    parser.add_argument("--max-steps", type=int, default=400, metavar="N",
                        help="optimizer steps (default: 400: about a minute on 2 idle CPU cores; 1000 for 2-3 minutes)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to train and evaluate (default: auto)")
    args = parser.parse_args(argv)
    common.check_data_path(parser, args.data_path)
    if args.max_steps < EVAL_EVERY:
        parser.error(f"--max-steps: got {args.max_steps}, expected at least {EVAL_EVERY} (one validation)")
    return args


def train(args: argparse.Namespace, work: Path) -> tuple[list[str], float]:
    """Run the entry point; return its flags (less the paths) and the wall time of the whole process."""
    flags = [*MODEL_AND_OPTIMIZER, "--training-max-steps", str(args.max_steps), "--training-device", args.device]
    paths = ["--data-path", str(Path(args.data_path).resolve()), "--data-cache-dir", str(work / "cache"),
             "--logging-log-dir", str(work / "run")]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "llm.training.train", *flags, *paths], cwd=common.REPO,
                          env={**os.environ, "PYTHONPATH": str(common.REPO)}, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"training failed with exit code {done.returncode}")
    return flags, wall


def full_validation(run: Path, device: str) -> tuple[float, int, float, int]:
    """Loss over the whole validation split (training validates on 20 batches of it); and vocab size."""
    config = Config.from_yaml(run / "config.yaml")
    data = TextDataModule(config)
    data.prepare_data()  # a cache hit: the run tokenized the corpus
    data.setup()
    model, tokenizer, _ = load_lm(run, "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    loss, n_tokens = evaluate(model, data.val_set.tokens, model.config.block_size, batch_size=BATCH_SIZE)
    return loss, n_tokens, time.perf_counter() - start, tokenizer.vocab_size


def section(args: argparse.Namespace, flags: list[str], wall: float, run: Path,
            full: tuple[float, int, float, int]) -> str:
    summary = common.run_summary(run)
    records = common.run_records(run)
    evals = [(r["step"], r["val_loss"]) for r in records if r["split"] == "val"]
    best_step, best = min(evals, key=lambda e: e[1])
    full_loss, full_tokens, full_s, vocab = full
    config = Config.from_yaml(run / "config.yaml")
    batch, block = config.training.batch_size, config.model.block_size
    train_s = summary["elapsed_s"]
    tokens = summary["samples_seen"] * block
    minutes, uniform = train_s / 60, math.log(vocab)  # uniform: the loss of guessing every token equally
    rows = [
        ("steps x batch x block", f"{summary['steps']} x {batch} x {block} = {tokens:,} tokens"),
        ("final val loss (20 batches)", f"{summary['val_loss']:.4f} (ppl {perplexity(summary['val_loss']):.2f})"),
        ("best val loss (20 batches)", f"{best:.4f} at step {best_step}"),
        ("val loss, whole split (llm.evaluate)",
         f"{full_loss:.4f} (ppl {perplexity(full_loss):.2f}) over {full_tokens:,} tokens in {full_s:.1f} s"),
        ("last logged train loss (mean over the last logging window)", f"{summary['train_loss']:.4f}"),
        ("training time (engine)", f"{train_s:.1f} s"),
        ("wall time (whole process)", f"{wall:.1f} s"),
        ("training throughput", f"{tokens / train_s:,.0f} tokens/s (validations on the way included, the final save not)"),
        ("loss drop per minute",
         f"{(uniform - best) / minutes:.3f} nats/min (from ln V = {uniform:.3f}, uniform guessing, to best val loss)"),
    ]
    curve = ", ".join(f"{step}: {loss:.3f}" for step, loss in evals)
    return common.section(
        f"LM quality: char-level GPT on {Path(args.data_path).name}, {summary['steps']} steps",
        [("training flags", f"`{shlex.join(flags)}` (plus the data path and temporary cache and log folders)")],
        [common.markdown_table(("metric", "value"), rows), f"Validation loss by step (20 batches): {curve}."],
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lm_quality-") as tmp:
        work = Path(tmp)
        flags, wall = train(args, work)
        full = full_validation(work / "run", args.device)
        text = section(args, flags, wall, work / "run", full)
    common.append_section(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
