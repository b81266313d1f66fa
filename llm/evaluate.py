"""Score a trained model: ``python -m llm.evaluate --checkpoint PATH [--data-path FILE] [--split val|test]``.

With ``--data-path``, a language model (``--task lm``) is scored on a text file,
or on the files of a folder or a glob read as training reads a corpus (the run's
``data.separator`` between two of them): one line, ``loss L  ppl P  tokens N
checkpoint C``, the mean next-token cross-entropy (nats per token) over every
token, its perplexity, the number of tokens scored and the checkpoint used.

Without it, a checkpoint of any task is scored on a whole split of the data
module it trained on, built from the run's config as training built it: the
validation split (``--split val``, the default), or the test split of a data
module that has one (``test_dataloader``; the built-in regression and
classification data have one). The line holds the task's validation metrics,
named for the split (``val_loss 0.0112  val_mae 0.0843  samples 204  checkpoint
C``), weighted as training's validation weights them: over the whole split, not
a tenth of it as ``--training-eval-batches`` may have had them.

Exit codes: 0 done; 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import itertools
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llm.cli import ArgParser, add_checkpoint, add_device, run_program, run_tool
from llm.data.text_data_module import corpus_files, encode_pieces, read_pieces
from llm.data.tokenizers import Tokenizer, UncoveredText
from llm.errors import UsageError
from llm.training.core import distributed as D, resume
from llm.training.core.checkpoint import load_weights_strictly, model_weights, read_checkpoint
from llm.training.core.batches import batch_len, moved_to
from llm.training.core.checks import loaders_of
from llm.training.core.engine import AUTOCAST_DTYPES
from llm.training.core.loading import (SETUP_STREAM, VAL_STREAM, SeededBatches, WorkerStart, mixed_seed,
                                       seed_everything)
from llm.training.core.metrics import RunningMeans, collecting, finalized_metrics, whole_set_metrics
from llm.training.core.registry import data_module_of, resolve_data_module, resolve_task
from llm.training.tasks.lm_task import load_lm, perplexity, usable_device

SPLITS = ("val", "test")


def evaluate(model: nn.Module, ids: Sequence[int] | np.ndarray | torch.Tensor, block_size: int,
             batch_size: int = 8) -> tuple[float, int]:
    """Mean next-token cross-entropy of ``model`` over the token stream ``ids``, and how many tokens it scored.

    The stream is cut into windows of ``block_size + 1`` tokens that start ``block_size``
    apart (the split training validates on), so every token but the first is predicted
    exactly once, from the tokens before it in its window; a shorter last window scores
    the rest. The mean is over tokens, so ``n_tokens = len(ids) - 1``. The softmax spans
    all of the model's ids, those a padded vocabulary never uses too, as training's
    validation loss does.
    """
    if block_size < 1 or batch_size < 1:
        raise ValueError(f"block_size and batch_size must be >= 1, got {block_size} and {batch_size}")
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64)) if not torch.is_tensor(ids) else ids.long()
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"evaluate needs a 1-D stream of at least 2 tokens, got shape {tuple(ids.shape)}")
    device = next(model.parameters()).device
    n_full = (ids.numel() - 1) // block_size
    windows = ids[:n_full * block_size + 1].unfold(0, block_size + 1, block_size) if n_full else None
    tail = ids[n_full * block_size:]
    total = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, n_full, batch_size):
                total += _summed_loss(model, windows[start:start + batch_size].to(device))
            if tail.numel() >= 2:
                total += _summed_loss(model, tail.unsqueeze(0).to(device))
    finally:
        model.train(was_training)
    n_tokens = ids.numel() - 1
    return total / n_tokens, n_tokens


def _summed_loss(model: nn.Module, windows: torch.Tensor) -> float:
    logits = model(windows[:, :-1])
    # .item() is a device-to-host sync per batch; summing in Python keeps float64 over a long file
    return F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten(), reduction="sum").item()


def read_tokens(path: str | Path, tokenizer: Tokenizer, separator: str = "") -> np.ndarray:
    """The token ids of a UTF-8 text file, or of the files of a folder or a glob (as a corpus is read, in
    sorted order) with ``separator`` between two of them; UsageError (one line) if they are missing, empty or
    untokenizable.

    Read and encoded in pieces, as training's cache is: a large file is never held whole as text, nor as
    the tokenizer's objects for every token, only as its ids.
    """
    files = corpus_files(str(path), "--data-path")
    path = Path(path).expanduser()
    parts = []
    for i, file in enumerate(files):
        pieces = read_pieces(file, setting="--data-path")  # a generator: a list would hold the file whole
        try:
            parts += encode_pieces(tokenizer, itertools.chain([separator] if i and separator else [], pieces))
        except UncoveredText as e:
            raise UsageError(f"--data-path: {file}: {e}") from None
    if not parts:
        raise UsageError(f"--data-path: {path} is empty")
    ids = np.concatenate(parts)
    if len(ids) < 2:
        raise UsageError(f"--data-path: {path} holds {len(ids)} token; at least 2 are needed to score a prediction")
    unknown = tokenizer.count_unknown(ids)
    if unknown:  # each scores as one token, whatever text it stands for: the loss is not the text's
        warnings.warn(f"--data-path: {unknown:,} of the {len(ids):,} tokens of {path} ({unknown / len(ids):.2%}) are "
                      f"the unknown token: the tokenizer does not cover all of the text")
    return ids


def score_split(checkpoint: str | Path, split: str = "val", device: str = "cpu",
                batch_size: int | None = None) -> tuple[dict[str, float], int, Path]:
    """A checkpoint's validation metrics over a whole split (``val`` or ``test``) of the data module its run
    trained on, built from the run's config as training built it; also the samples scored and the checkpoint.

    The metrics are ``validation_step``'s, weighted as training's validation weights
    them (by ``loss_weight``, else by samples), with ``score_collected``'s over the
    whole split, then ``finalize_metrics``; named ``val_*`` or ``test_*`` for the
    split. One process; ``batch_size`` replaces the run's. The data's relative paths
    are taken from the folder the run was started in.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    device = usable_device(device)
    ckpt, weights = read_checkpoint(Path(checkpoint), lambda ckpt: (ckpt, model_weights(ckpt)))
    if not isinstance(weights, dict):
        raise UsageError(f"{ckpt} holds no model weights")
    config, where_to_run = resume.config_as_started(ckpt)
    config.training.device = device.type
    if batch_size is not None:
        config.training.batch_size = batch_size
    task = resolve_task(config.task)(config)
    data_module = resolve_data_module(data_module_of(config, task))(config)
    try:  # it may tokenize a corpus into its cache again, if the cache is gone
        data_module.prepare_data()
        # the random numbers training's set-up drew from: a split drawn at random is the one it validated on
        seed_everything(mixed_seed(config.training.seed, SETUP_STREAM))
        data_module.setup("fit" if split == "val" else "test")
    except UsageError as e:
        raise UsageError(f"{e}{where_to_run}") from None
    loader, _ = loaders_of(data_module, f"{split}_dataloader", 0, 1)
    # what a data set draws at random in loader workers, from the seeds training's validation gave each batch
    with warnings.catch_warnings():  # of a data set that takes no seed: said of a resume, not of a score
        warnings.simplefilter("ignore")
        SeededBatches.install(loader, mixed_seed(config.training.seed, 0, VAL_STREAM))
    WorkerStart.install(loader)
    task.data_module = data_module
    model = task.build_model()
    changed = resume.weights_changes(task, ckpt)  # a tokenizer built otherwise here would number tokens otherwise
    if changed:
        raise UsageError(f"the data here gives the model otherwise than {ckpt} holds it ({', '.join(changed)}): "
                         f"run where the run was started, with its data and tokenizer")
    if "corpus.json" in resume.changed_artifacts(task, ckpt):  # a language model's corpus, edited since
        corpus = f"data.path {config.data.path}" if config.data.path else \
            "the default corpus (this Python's standard library)"
        raise UsageError(f"{corpus} is not the corpus {ckpt} was trained on (edited since, or another), so its "
                         f"{split} split is not the run's: score a text file with --data-path FILE instead"
                         f"{where_to_run}")
    load_weights_strictly(model, weights, f"the weights in {ckpt}", than=f" than {config.task} builds from its config")
    model.to(device).eval()
    criterion = task.build_criterion().to(device)
    dtype = AUTOCAST_DTYPES.get(config.training.precision)
    sums, samples = RunningMeans(), 0
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None), \
            collecting(task) as collected:
        for batch in loader:
            batch = moved_to(batch, device)
            loss, metrics = task.validation_step(batch, model, criterion)
            count = task.loss_weight(batch)
            sums.add(loss, metrics, weight=batch_len(batch) if count is None else count)
            samples += batch_len(batch)
    if not samples:
        raise UsageError(f"the {split} split of {type(data_module).__name__} is empty: nothing to score")
    # as validation names and finalizes them (val_ppl from val_loss); the split's own name goes on after
    means = D.weighted_mean_over_ranks({f"val_{k}": v for k, v in sums.totals().items()})
    means = finalized_metrics(task, {**means, **whole_set_metrics(task, collected, beside=means)})
    return {f"{split}_{key[4:]}" if key.startswith("val_") else key: value for key, value in means.items()}, \
        samples, ckpt


def build_parser() -> argparse.ArgumentParser:
    parser = ArgParser(prog="llm-evaluate",
                       description="Score a checkpoint: a language model on a text file (--data-path), or any task "
                                   "on a split of the data it trained on.")
    add_checkpoint(parser)
    parser.add_argument("--data-path", metavar="PATH",
                        help="a UTF-8 text file, or a folder or a glob of them, to score a language model on "
                             "(--task lm), every token of it (files as training reads a corpus)")
    parser.add_argument("--split", choices=SPLITS,
                        help="without --data-path: the split of the run's data module to score, the validation "
                             "one (default) or its test one")
    parser.add_argument("--batch-size", type=int, default=None, metavar="B",
                        help="windows of tokens per forward pass with --data-path (default: 8), else "
                             "samples per batch (default: the run's)")
    parser.add_argument("--block-size", type=int, default=None, metavar="T",
                        help="with --data-path: tokens per window, at most the model's block_size (the default); "
                             "a long-context model's whole windows may not fit in memory, each holding "
                             "T x vocab_size logits")
    add_device(parser)
    return parser


def _separator(checkpoint: Path) -> str:
    """The data.separator of the run that saved ``checkpoint``: what stood between its corpus's files."""
    try:
        return resume.config_as_started(checkpoint)[0].data.separator
    except UsageError:  # a checkpoint of no readable config (an export's weights): nothing between them
        return ""


def main(argv: list[str] | None = None) -> int:
    return run_tool(lambda: _score(argv), if_interrupted="no loss computed")


def _score(argv: list[str] | None) -> str:
    args = build_parser().parse_args(argv)
    for flag, value in (("--batch-size", args.batch_size), ("--block-size", args.block_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag}: got {value}, expected an integer >= 1")
    if args.data_path is None:
        if args.block_size is not None:
            raise UsageError("--block-size sets the windows of a text file's tokens (--data-path); a split is "
                             "scored in the samples its data module makes")
        split = args.split or "val"
        metrics, samples, ckpt = score_split(args.checkpoint, split, args.device, args.batch_size)
        loss = f"{split}_loss"
        shown = "  ".join(f"{key} {metrics[key]:.6g}" for key in sorted(metrics, key=lambda key: key != loss))
        return f"{shown}  samples {samples}  checkpoint {ckpt}"
    if args.split is not None:
        raise UsageError("--split scores a split of the run's data module, --data-path a text file: give one of them")
    if not args.data_path.strip():  # an unset shell variable: "" would be training's default corpus
        raise UsageError("--data-path: got an empty path; give a text file, a folder or a glob")
    model, tokenizer, ckpt = load_lm(args.checkpoint, args.device)
    block_size = args.block_size or model.config.block_size
    if block_size > model.config.block_size:
        raise UsageError(f"--block-size: got {block_size}, more than the model's block_size "
                         f"{model.config.block_size}, the most it was built to see")
    ids = read_tokens(args.data_path, tokenizer, _separator(ckpt))
    loss, n_tokens = evaluate(model, ids, block_size, args.batch_size or 8)
    return f"loss {loss:.4f}  ppl {perplexity(loss):.3f}  tokens {n_tokens}  checkpoint {ckpt}"


def run() -> NoReturn:
    """The command line's entry (llm-evaluate, ``python -m llm.evaluate``): main() as a process (cli.run_program)."""
    run_program(main)


if __name__ == "__main__":
    run()
