"""Data pipeline: how long the lm task's steps wait for data, and how fast each tokenizer prepares a corpus.

    python benchmarks/data_pipeline.py --data-path FILE [--out BENCHMARKS.md] [--quick]

Data wait: the engine trains the lm task (TextDataModule, char tokenizer, the
loader as configured: ``data.num_workers`` 0) while a thin wrapper around the
training loader times every ``next()`` on it. The share is the time spent in
those calls over the wall time of the same steps, first step excluded (it
builds the iterator). Two models: the default lm GPT, and a tiny one whose
steps are short enough to show the loader's own cost. Beside each, a
hand-written loop trains the same model with the engine's optimizer and
clipping, and fetches its batches the way many do by hand (nanoGPT's
``get_batch``: one slice per window, stacked), timed the same way, as a
reference for what a fetch costs on this machine.

Tokenization: ``TextDataModule.prepare_data()`` with an empty cache folder, for
the byte, char and bpe tokenizers (bpe trains its vocabulary first): corpus
bytes over seconds. Encoding alone (the prepared tokenizer's ``encode`` over
the whole text) is timed apart.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout: import this llm

from benchmarks import common  # noqa: E402
from llm.data.text_data_module import TOKENIZER, TOKENS, TextDataModule, read_text  # noqa: E402
from llm.data.tokenizers import load_tokenizer  # noqa: E402
from llm.models.gpt import GPT, GPTConfig  # noqa: E402
from llm.training.core.callbacks import Callback  # noqa: E402
from llm.training.core.config import Config  # noqa: E402
from llm.training.core.engine import TrainingEngine  # noqa: E402
from llm.training.core.optim import build_optimizer  # noqa: E402
from llm.training.tasks.lm_task import LMTask  # noqa: E402
from llm.training.train import default_callbacks  # noqa: E402

TARGET_PCT = 2.0
"""Data wait as a share of step time the engine should stay under."""
MODELS = {
    "default lm GPT (4 layers, 128 wide, context 128, batch 16)":
        {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, "batch_size": 16},
    "tiny GPT (1 layer, 32 wide, context 64, batch 16)":
        {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64, "batch_size": 16},
}
TOKENIZERS = ("byte", "char", "bpe")
ENGINE, HAND = "engine", "hand-written, get_batch"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    common.check_data_path(parser, args.data_path)
    args.steps, args.rounds = (10, 1) if args.quick else (60, 3)
    return args


# ---- data wait ------------------------------------------------------------------------------


class TimedLoader:
    """A DataLoader that records how long each ``next()`` takes; everything else is the loader's own."""

    def __init__(self, loader: Any):
        self.loader, self.waits = loader, []

    def __getattr__(self, name: str) -> Any:  # batch_sampler, dataset...: the engine's resume path reads them
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self.loader)
        while True:
            start = common.clock()
            try:
                batch = next(batches)
            except StopIteration:
                return
            stop = common.clock()
            self.waits.append((stop[0] - start[0], stop[1] - start[1]))
            yield batch


class TimedTextData(TextDataModule):
    def train_dataloader(self, rank: int, world_size: int):
        loader, sampler = super().train_dataloader(rank, world_size)
        self.timed = TimedLoader(loader)
        return self.timed, sampler


class StepEnds(Callback):
    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []

    def on_step_end(self, engine: TrainingEngine) -> None:
        self.times.append(common.clock())


@dataclass
class Wait:
    wait_s: float  # wall time in next() over the timed steps
    wall_s: float  # wall time of the same steps
    wait_cpu_s: float  # the same two in CPU time
    cpu_s: float
    steps: int

    @property
    def share(self) -> float:
        return self.wait_s / self.wall_s

    @property
    def cpu_share(self) -> float:
        return self.wait_cpu_s / self.cpu_s

    def __str__(self) -> str:
        return (f"{self.steps} steps of {1000 * self.wall_s / self.steps:.1f} ms: data wait {100 * self.share:.2f}% "
                f"(wall), {100 * self.cpu_share:.2f}% (CPU time)")


def data_wait(args: argparse.Namespace, work: Path, log_dir: Path, shape: dict[str, int]) -> Wait:
    config = Config.from_dict({
        "task": "lm",
        "model": {k: shape[k] for k in ("n_layer", "n_head", "n_embd", "block_size")},
        "data": {"path": str(Path(args.data_path).resolve()), "tokenizer": "char", "cache_dir": str(work / "cache")},
        "training": {"batch_size": shape["batch_size"], "max_steps": args.steps, "epochs": 1000, "device": "cpu",
                     "eval_batches": 1, "patience": 1000},
        "logging": {"log_dir": str(log_dir), "progress_bar": False},
    })
    data, clock = TimedTextData(config), StepEnds()
    engine = TrainingEngine(config, LMTask(config), data_module=data, callbacks=[*default_callbacks(config), clock])
    with contextlib.redirect_stdout(io.StringIO()):
        engine.train()
    # waits[i] is the fetch before step i + 1; step 1's fetch builds the iterator and is left out
    waits, times = data.timed.waits, clock.times
    n = len(times)
    return Wait(sum(w[0] for w in waits[1:n]), times[-1][0] - times[0][0],
                sum(w[1] for w in waits[1:n]), times[-1][1] - times[0][1], n - 1)


def hand_wait(args: argparse.Namespace, work: Path, shape: dict[str, int]) -> Wait:
    """The same model and steps in a hand-written loop that fetches batches as many do by hand:
    random offsets into the token array, and a stack of one slice per window (nanoGPT's get_batch)."""
    config = Config.from_dict({
        "task": "lm", "data": {"path": str(Path(args.data_path).resolve()), "tokenizer": "char",
                               "cache_dir": str(work / "cache")},
        "model": {k: shape[k] for k in ("n_layer", "n_head", "n_embd", "block_size")},
    })
    data = TextDataModule(config)
    data.prepare_data()
    data.setup("fit")
    tokens, bs, batch_size = data.train_set.tokens, shape["block_size"], shape["batch_size"]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=bs, n_layer=shape["n_layer"],
                          n_head=shape["n_head"], n_embd=shape["n_embd"]))
    # The engine's own optimizer (fused AdamW, decay on matrices only), so that only the fetching differs.
    optimizer = build_optimizer(model, config.optimizer)

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(tokens) - bs, (batch_size,)).tolist()
        x = torch.stack([torch.from_numpy(tokens[i:i + bs].astype(np.int64)) for i in starts])
        y = torch.stack([torch.from_numpy(tokens[i + 1:i + 1 + bs].astype(np.int64)) for i in starts])
        return x, y

    waits, times = [], []
    for _ in range(args.steps):
        start = common.clock()
        x, y = get_batch()
        stop = common.clock()
        waits.append((stop[0] - start[0], stop[1] - start[1]))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.training.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(common.clock())
    n = len(times)  # timed like the engine's runs: the steps after the first
    return Wait(sum(w[0] for w in waits[1:n]), times[-1][0] - times[0][0],
                sum(w[1] for w in waits[1:n]), times[-1][1] - times[0][1], n - 1)


# ---- tokenization ---------------------------------------------------------------------------------


@dataclass
class Prepared:
    seconds: float
    encode_s: float
    tokens: int
    vocab: int


def prepare(args: argparse.Namespace, cache: Path, tokenizer: str) -> Prepared:
    config = Config.from_dict({"task": "lm", "data": {"path": str(Path(args.data_path).resolve()),
                                                      "tokenizer": tokenizer, "cache_dir": str(cache)}})
    data = TextDataModule(config)
    seconds, _ = common.timed(data.prepare_data)
    entry = data.cache_path
    tok = load_tokenizer(entry / TOKENIZER)
    text = read_text(Path(args.data_path))
    encode_s, ids = common.timed(lambda: tok.encode(text))
    assert (entry / TOKENS).is_file(), f"prepare_data() wrote no {TOKENS} into {entry}"
    return Prepared(seconds, encode_s, len(ids), tok.vocab_size)


# ---- the report ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # one thread: compute and data fetching then stretch alike when other processes take the cores
    torch.set_num_threads(1)
    corpus_bytes = Path(args.data_path).stat().st_size
    with tempfile.TemporaryDirectory(prefix="data_pipeline-") as tmp:
        work, count = Path(tmp), iter(range(10**6))
        contenders: dict[tuple[str, str], Callable[[], Wait]] = {}
        for name, shape in MODELS.items():
            contenders[name, ENGINE] = lambda shape=shape: data_wait(args, work, work / f"run-{next(count)}", shape)
            contenders[name, HAND] = lambda shape=shape: hand_wait(args, work, shape)
        waits = common.interleaved(contenders, args.rounds)
        prepared = common.interleaved(
            {name: (lambda name=name: prepare(args, work / f"cache-{next(count)}", name)) for name in TOKENIZERS},
            args.rounds, warmup=False)

    rows = []
    for (name, loop), ws in waits.items():
        share, cpu_share = common.median([w.share for w in ws]), common.median([w.cpu_share for w in ws])
        wait_us = 1e6 * common.median([w.wait_s / w.steps for w in ws])
        vs_hand = common.paired_ratio([w.wait_s / w.steps for w in ws],
                                      [w.wait_s / w.steps for w in waits[name, HAND]])[0]
        target = "" if loop == HAND else "met" if 100 * max(share, cpu_share) < TARGET_PCT else "NOT met"
        rows.append((name, loop, ws[0].steps, f"{1000 * common.median([w.wall_s / w.steps for w in ws]):.1f}",
                     f"{wait_us:.0f}", f"{vs_hand:.2f}", f"{100 * share:.2f}%",
                     f"{100 * min(w.share for w in ws):.2f}-{100 * max(w.share for w in ws):.2f}%",
                     f"{100 * cpu_share:.2f}%", target))
    wait_table = common.markdown_table(
        ("model", "loop", "timed steps", "ms/step (wall)", "data wait us/step (wall)", "wait vs hand (paired by round)",
         "data wait share (wall, median)", "min-max", "data wait share (CPU time, median)",
         f"target < {TARGET_PCT:g}%"), rows)

    rows = []
    for name, ps in prepared.items():
        seconds, encode_s = common.median([p.seconds for p in ps]), common.median([p.encode_s for p in ps])
        rows.append((name, ps[0].vocab, f"{ps[0].tokens:,}", f"{corpus_bytes / ps[0].tokens:.2f}", f"{seconds:.3f}",
                     f"{corpus_bytes / 1e6 / seconds:.1f}", f"{corpus_bytes / 1e6 / encode_s:.1f}"))
    token_table = common.markdown_table(
        ("tokenizer", "vocab", "tokens", "bytes/token", "prepare_data s (median)", "prepare_data MB/s",
         "encode only MB/s"), rows)

    facts = [
        ("data", f"{Path(args.data_path).name}, {corpus_bytes:,} bytes ({corpus_bytes / 1e6:.2f} MB)"),
        ("data wait", (f"engine with default_callbacks, lm task, char tokenizer, data.num_workers 0, CPU, "
                       f"1 torch thread; {args.steps} steps per run, a warm-up run, then {args.rounds} runs per "
                       f"model, interleaved; shares by the wall clock and by the process's CPU time")),
        ("hand", (f"{HAND}: the same model, AdamW and clipping in a plain loop; inputs and targets are "
                  f"batch_size slices each at random offsets of the same token array, stacked (nanoGPT's get_batch)")),
        ("tokenization", (f"prepare_data() into an empty cache folder, {args.rounds} runs per tokenizer, "
                          f"interleaved (bpe: data.vocab_size 512, trained in prepare_data)")),
    ]
    text = common.section(f"Data pipeline: data wait and tokenization on {Path(args.data_path).name}"
                          + (" (quick)" if args.quick else ""), facts,
                          ["Time the training loop waits in next() on the training loader, per step:", wait_table,
                           "Tokenizing the corpus into the cache:", token_table])
    common.append_section(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
