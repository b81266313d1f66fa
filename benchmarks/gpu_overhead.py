"""Where the engine's time over a hand-written loop goes on a GPU: the GPT-2 124M preset, ablated.

    python benchmarks/gpu_overhead.py --data-path FILE [--out BENCHMARKS.md]

Runs lm_throughput's two contenders with one difference at a time, interleaved
over rounds, in bf16 with torch.compile on a CUDA GPU:

- hand: the hand-written loop, the model and loss compiled whole, no sync until the end;
- hand, norm synced: reads the gradient norm on the host each step, as the
  engine does to skip or stop on a non-finite step;
- hand, regional: compiles block by block and the loss apart, as the engine does;
- hand, regional, norm synced: both;
- engine: as it ships;
- engine, whole model compiled: the engine with the model compiled in one piece.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from itertools import count
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout: import this llm

from benchmarks import common, lm_throughput as lt  # noqa: E402
from llm.training.core import parallel  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, quick=False)
    parser.add_argument("--rounds", type=int, default=2, metavar="N", help="repetitions of each variant (default 2)")
    parser.add_argument("--batch-size", type=int, default=lt.GPU_PRESET["batch_size"], metavar="B",
                        help=f"sequences per step (default {lt.GPU_PRESET['batch_size']})")
    args = parser.parse_args(argv)
    common.check_data_path(parser, args.data_path)
    if not torch.cuda.is_available():
        sys.exit("error: this benchmark needs a CUDA GPU, and torch.cuda.is_available() is False")
    args.shape = {**lt.GPU_PRESET, "batch_size": args.batch_size}
    args.device, args.warmup, args.steps, args.quick, args.peak_flops = "cuda", 10, 40, False, None
    peak, peak_note = lt.peak_flops(args)
    with tempfile.TemporaryDirectory(prefix="gpu_overhead-") as tmp:
        work, n = Path(tmp), count()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor-cache")

        def config():
            return lt.make_config(args, work, work / f"run-{next(n)}", "bf16", True)

        def whole_engine():
            with mock.patch.object(parallel, "blocks", lambda model: []):  # prepare() then compiles the model
                return lt.run_engine(config(), args.warmup, peak)

        variants = {
            "hand": lambda: lt.run_hand(config(), args.warmup, peak),
            "hand, norm synced": lambda: lt.run_hand(config(), args.warmup, peak, sync_norm=True),
            "hand, regional": lambda: lt.run_hand(config(), args.warmup, peak, regional=True),
            "hand, regional, norm synced": lambda: lt.run_hand(config(), args.warmup, peak, sync_norm=True,
                                                               regional=True),
            "engine": lambda: lt.run_engine(config(), args.warmup, peak),
            "engine, whole model compiled": whole_engine,
        }
        lt.check_corpus(config())
        runs = common.interleaved(variants, args.rounds, warmup=False)
    rates = {name: [m.tokens_per_s for m in ms] for name, ms in runs.items()}
    rows = []
    for name, values in rates.items():
        ratio, low, high = common.paired_ratio(values, rates["hand"])
        rows.append((name, f"{common.median(values):,.0f}", common.spread(values), f"{ratio:.3f} ({low:.3f}-{high:.3f})",
                     "n/a" if peak is None else f"{common.median([m.mfu for m in runs[name]]):.1%}",
                     f"{runs[name][0].first_step_s:.1f}"))
    table = common.markdown_table(("variant", f"{common.median_label(args.rounds)} tokens/s", "min-max", "vs hand, paired by round (min-max)",
                                   "MFU", "first step s (first run)"), rows)
    s = args.shape
    facts = [("model", f"GPT, {s['n_layer']} layers, {s['n_embd']} wide, context {s['block_size']}, "
                       + "".join(f"{k} {s[k]}, " for k in lt.MODEL_KEYS[4:] if k in s)
                       + f"batch {s['batch_size']}, bf16, torch.compile, char tokenizer on "
                       + Path(args.data_path).name),
             ("repetitions", f"{args.rounds} rounds, variants interleaved; {args.warmup} warm-up steps, then "
                             f"{args.steps} timed steps by the wall clock"),
             ("MFU peak", f"{peak / 1e12:,.4g} TFLOP/s ({peak_note})" if peak else peak_note)]
    common.append_section(args.out, common.section("GPU overhead: the engine against the hand loop, one "
                                                   "difference at a time", facts, [table]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
