"""Score a trained language model on a text file: ``python -m llm.evaluate --checkpoint PATH --data-path FILE``.

Prints one line, ``loss L  ppl P  tokens N  checkpoint C``: the mean next-token
cross-entropy (nats per token) over the whole file, its perplexity, the number of
tokens scored and the checkpoint used. Exit codes: 0 done; 2 bad input (one line
on stderr).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llm.cli import ArgParser, add_checkpoint, add_device, run_tool
from llm.data.text_data_module import encode_pieces, read_pieces
from llm.data.tokenizers import Tokenizer, UncoveredText
from llm.errors import UsageError
from llm.training.tasks.lm_task import load_lm, perplexity


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


def read_tokens(path: str | Path, tokenizer: Tokenizer) -> np.ndarray:
    """The token ids of a UTF-8 text file; UsageError (one line) if it is missing, empty or untokenizable.

    Read and encoded in pieces, as training's cache is: a large file is never held whole as text, nor as
    the tokenizer's objects for every token, only as its ids.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"--data-path: {path} does not exist")
    if not path.is_file():
        raise UsageError(f"--data-path: {path} is not a file")
    try:
        parts = list(encode_pieces(tokenizer, read_pieces(path, setting="--data-path")))
    except UncoveredText as e:
        raise UsageError(f"--data-path: {path}: {e}") from None
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


def build_parser() -> argparse.ArgumentParser:
    parser = ArgParser(prog="llm-evaluate",
                       description="Loss and perplexity of a language model trained by --task lm on a text file.")
    add_checkpoint(parser)
    parser.add_argument("--data-path", required=True, metavar="FILE", help="UTF-8 text file to score")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B",
                        help="windows of block_size tokens per forward pass (default: 8)")
    add_device(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_tool(lambda: _score(argv), if_interrupted="no loss computed")


def _score(argv: list[str] | None) -> str:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size: got {args.batch_size}, expected an integer >= 1")
    model, tokenizer, ckpt = load_lm(args.checkpoint, args.device)
    ids = read_tokens(args.data_path, tokenizer)
    loss, n_tokens = evaluate(model, ids, model.config.block_size, args.batch_size)
    return f"loss {loss:.4f}  ppl {perplexity(loss):.3f}  tokens {n_tokens}  checkpoint {ckpt}"


if __name__ == "__main__":
    sys.exit(main())
