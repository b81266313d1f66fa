"""Muon on FSDP2's shards: the optimizer step, gathering each matrix once against torch's Muon on the DTensors.

    python benchmarks/muon_fsdp.py [--out BENCHMARKS.md] [--quick] [--n-layer 4] [--n-embd 256]

Two ranks (gloo, one thread each) shard a GPT (``--n-layer`` blocks,
``--n-embd`` wide) with FSDP2, as ``--distributed-strategy fsdp`` does, and
build ``--optimizer-name muon``. Each round gives every parameter the same
gradient and times one optimizer step, from a barrier to the last rank's
return, for each contender in turn:

- ``MuonWithAdamW.step``, the engine's: the matrices are dealt out among the
  ranks by cost; each matrix's owner gathers its momentum-updated gradient,
  orthogonalises it whole and scatters the rows back;
- the same step with every rank gathering every matrix and orthogonalising it
  (as the engine's step did before 2026-12-07), which repeats the work on
  each rank;
- torch's ``Muon.step`` on the sharded DTensors (then the same AdamW step),
  where each matrix product and norm of the orthogonalisation is a collective.

The collectives of one step are counted with torch's CommDebugMode.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from llm.models.gpt import GPT, GPTConfig  # noqa: E402
from llm.training.core.config import Config, OptimizerConfig  # noqa: E402
from llm.training.core.optim import build_optimizer  # noqa: E402
from llm.training.core.parallel import prepare  # noqa: E402

DEALT = "MuonWithAdamW.step: each matrix orthogonalised by one rank"
GATHERED = "every rank gathers and orthogonalises every matrix"
TORCH = "torch's Muon.step on the shards, then AdamW"


def worker(rank: int, folder: str, port: int, args: argparse.Namespace) -> None:
    from torch.distributed.tensor.debug import CommDebugMode

    if rank:
        sys.stdout = open(os.devnull, "w")  # rank 0 prints the rounds
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=600))
    try:
        config = Config()
        config.distributed.strategy = "fsdp"
        torch.manual_seed(0)
        shape = GPTConfig(vocab_size=256, block_size=64, n_layer=args.n_layer, n_head=max(1, args.n_embd // 64),
                          n_embd=args.n_embd)
        model = prepare(GPT(shape), config, 2)
        optimizer = build_optimizer(model, OptimizerConfig(name="muon", lr=0.02))
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-2  # each rank its own shard's: the step is what is timed

        def torch_step() -> None:
            optimizer.muon.step()
            optimizer.adamw.step()

        def gathered_step() -> None:
            optimizer._sharded_muon_step(deal=False)
            optimizer.adamw.step()

        def timed(step) -> float:
            dist.barrier()
            began = time.perf_counter()
            step()
            took = torch.tensor([time.perf_counter() - began], dtype=torch.float64)
            dist.all_reduce(took, op=dist.ReduceOp.MAX)
            return took.item()

        counts = {}
        steps = {DEALT: optimizer.step, GATHERED: gathered_step, TORCH: torch_step}
        for name, step in steps.items():
            with CommDebugMode() as comms:
                step()
            counts[name] = comms.get_comm_counts()
        seconds = common.interleaved({name: (lambda step=step: timed(step)) for name, step in steps.items()},
                                     args.rounds)
        if rank == 0:
            matrices = sum(len(g["params"]) for g in optimizer.muon.param_groups)
            params = sum(p.numel() for p in model.parameters())
            torch.save({"seconds": seconds, "matrices": matrices, "params": params,
                        "counts": {k: {str(op): n for op, n in c.items()} for k, c in counts.items()}},
                       Path(folder) / "muon.pt")
    finally:
        dist.destroy_process_group()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser, data_help=None)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10, 2 with --quick)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 10)
    return args


def main(argv: list[str] | None = None) -> int:
    import torch.multiprocessing as mp

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="muon_fsdp-") as folder:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(folder, port, args), nprocs=2)
        result = torch.load(Path(folder) / "muon.pt", weights_only=True)
    seconds = result["seconds"]
    ratios = {name: common.paired_ratio(seconds[name], seconds[DEALT]) for name in (GATHERED, TORCH)}
    label = common.median_label(args.rounds)
    rows = [(name, f"{1000 * common.median(values):.1f}", common.spread([1000 * v for v in values]),
             ", ".join(f"{op.split('.')[-1]} {n}" for op, n in result["counts"][name].items()) or "none")
            for name, values in seconds.items()]
    table = common.markdown_table(("optimizer step", f"{label} ms", "min-max ms", "collectives per step"), rows)
    text = common.section(
        "Muon on FSDP2 shards: each matrix orthogonalised by one rank" + (" (quick)" if args.quick else ""),
        [("model", f"GPT, {args.n_layer} layers, {args.n_embd} wide, {result['params'] / 1e6:.1f}M parameters, "
                   f"{result['matrices']} hidden matrices for Muon"),
         ("ranks", "2 processes, gloo, one torch thread each")],
        [table, " ".join(f"The engine's step is {ratio:.2f}x as fast as {what} ({label} of the per-round ratios, "
                         f"{low:.2f}-{high:.2f}, over {args.rounds} rounds)."
                         for what, (ratio, low, high) in (("every rank orthogonalising every matrix", ratios[GATHERED]),
                                                          ("torch's Muon on the shards", ratios[TORCH])))],
        threads=1)  # the ranks measured set one thread each, not this process's count
    common.append_section(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
