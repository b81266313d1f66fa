"""Generation: tokens/s of ``GPT.generate_stream`` (KV cache) against reading the whole context per token.

    python benchmarks/generation.py [--out BENCHMARKS.md] [--quick]

The reference is the loop generation used before the cache: each new token runs
the model over the last block_size tokens. Both pick tokens greedily on the same
random model from the same one-token prompt, and each token must be, within
float rounding, the most likely one after those before it (a near tie can fall
either way in the two, and the generations then part ways, both right).
Its weights are drawn wider than a fresh model's (whose greedy choice is one
token over and over), so that the tokens vary and a cache that went wrong would
show. Two shapes: the default ``--task lm`` model (4 layers, 128 wide,
context 128) and a wider one with a longer context (6 layers, 384 wide, context
512), each generating one full context: with the cache a token costs one
position's work until the context is full, so the gain grows with the context.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout: import this llm

from benchmarks import common  # noqa: E402
from llm.models.gpt import GPT, GPTConfig  # noqa: E402

SHAPES = {
    "4 x 128, context 128": GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128),
    "6 x 384, context 512": GPTConfig(vocab_size=256, block_size=512, n_layer=6, n_head=6, n_embd=384),
}


@torch.no_grad()
def whole_context(model: GPT, prompt: torch.Tensor, n: int) -> list[int]:
    """Greedy tokens, each from the model run over the last block_size tokens (the head on the last one)."""
    idx = prompt[None]
    for _ in range(n):
        next_id = model(idx[:, -model.config.block_size:], last_only=True)[:, -1].argmax(dim=-1, keepdim=True)
        idx = torch.cat([idx, next_id], dim=1)
    return idx[0, prompt.numel():].tolist()


@torch.no_grad()
def not_greedy(model: GPT, prompt: torch.Tensor, tokens: list[int]) -> int | None:
    """The first of ``tokens`` that is not, within float rounding, the most likely one after the prompt and those
    before it, read in one forward over them all; None if each is. The cache and the whole context compute the
    same logits in another order: where two tokens tie to 1e-5, either may come first, and the two generations part
    ways there, both right; a cache that went wrong puts tokens whole logits behind."""
    idx = torch.cat([prompt, torch.tensor(tokens)])[None]
    logits = model(idx[:, :-1])[0]
    chosen = logits.gather(1, idx[0, 1:, None])[:, 0]
    behind = logits.max(dim=-1).values - chosen
    wrong = (behind > 1e-4 * logits.abs().max(dim=-1).values.clamp(min=1.0)).nonzero()
    return int(wrong[0]) if len(wrong) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, data_help=None)
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else 5
    rows = []
    for name, config in SHAPES.items():
        torch.manual_seed(0)
        model = GPT(config).eval()
        for weight in model.parameters():  # greedy tokens that vary: see the module's docstring
            torch.nn.init.normal_(weight, std=0.5)
        prompt = torch.tensor([1])
        n = config.block_size - 1 if not args.quick else 32  # the prompt and n tokens fill the context
        contenders = {
            "kv cache": lambda: common.timed(lambda: list(model.generate_stream(prompt, n, temperature=0))),
            "whole context": lambda: common.timed(lambda: whole_context(model, prompt, n)),
        }
        results = common.interleaved(contenders, rounds)
        tokens = {name: [out for _, out in runs] for name, runs in results.items()}
        for contender, runs in tokens.items():
            wrong = not_greedy(model, prompt, runs[0])
            if wrong is not None:
                sys.exit(f"error: {name}: {contender}: token {wrong} is not the most likely one after those before it")
        if len(set(tokens["whole context"][0])) < n // 4:
            sys.exit(f"error: {name}: the model generated {len(set(tokens['whole context'][0]))} distinct tokens in "
                     f"{n}: too few for the comparison to show a cache that went wrong")
        seconds = {name: [s for s, _ in runs] for name, runs in results.items()}
        ratio, low, high = common.paired_ratio([n / s for s in seconds["kv cache"]],
                                               [n / s for s in seconds["whole context"]])
        rows.append((name, n, f"{n / common.median(seconds['kv cache']):,.0f}",
                     f"{n / common.median(seconds['whole context']):,.0f}", f"{ratio:.2f} ({low:.2f}-{high:.2f})"))
    table = common.markdown_table(("model", "tokens", "tokens/s, kv cache", "tokens/s, whole context",
                                   "ratio (min-max)"), rows)
    facts = [("what", f"greedy generation from a one-token prompt, batch 1, fp32, {torch.get_num_threads()} "
                      f"torch threads; {f'median of {rounds} interleaved rounds' if rounds > 1 else 'one round'} after a "
                      f"warm-up; each token checked against one forward over them all")]
    title = f"Generation: KV cache against the whole context per token{' (quick)' if args.quick else ''}"
    common.append_section(args.out, common.section(title, facts, [table]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
