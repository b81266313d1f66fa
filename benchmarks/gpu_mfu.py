"""What moves MFU on the GPT-2 124M shape: a hand-written step, one change at a time, on a CUDA GPU.

    python benchmarks/gpu_mfu.py [--out BENCHMARKS.md] [--only NAME ...]
    python benchmarks/gpu_mfu.py --profile NAME      # where one variant's step spends its time

Each variant trains ``llm.models.gpt.GPT`` (12 layers, 12 heads, 768 wide,
context 1024, bf16 autocast, blocks compiled one by one as the engine does,
fused AdamW, clipping) on random token ids, in a process of its own with a
time limit, so that one variant's compile or memory cannot spoil the next.
The data is random because this measures the device, not the loader;
lm_throughput.py measures the engine against the same loop on real text.

The variants start from the 124M shape with the engine's default block
(RMSNorm, SwiGLU, rotary positions), a vocabulary of a corpus's characters and
a batch of 16, and change one thing at a time: GPT-2's vocabulary (50257 tokens
padded to 50304, which makes the 124M parameters), the batch, the output head
and loss compiled together, the attention kernel (torch 2.11 on an H200 already
picks cuDNN's, a profile showed; FlashAttention-2 is the other), GPT-2's own
block (LayerNorm, GELU, learned positions), inductor's autotuned matmuls and
its tuning of the block sizes of its own kernels (coordinate descent).
lm_throughput.py --gpu-preset takes what these show to help.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout: import this llm

from benchmarks import common  # noqa: E402
from llm.models.gpt import GPT, GPTConfig  # noqa: E402
from llm.training.core.throughput import peak_flops_of  # noqa: E402

SHAPE = {"block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768}
CHARS, GPT2_VOCAB = 65, 50304
GPT2_BLOCK = {"norm": "layernorm", "mlp": "gelu", "pos_emb": "learned"}
BASE = {"vocab": CHARS, "batch": 16, "loss": "eager", "attention": "default", "mode": "default", "block": {},
        "inductor": {}}
VARIANTS = {
    "preset (65-char vocabulary, batch 16)": {},
    "batch 32": {"batch": 32},
    "GPT-2 vocabulary (50304)": {"vocab": GPT2_VOCAB},
    "GPT-2 vocabulary, batch 32": {"vocab": GPT2_VOCAB, "batch": 32},
    "GPT-2 vocabulary, batch 32, head + loss compiled": {"vocab": GPT2_VOCAB, "batch": 32, "loss": "compiled"},
    "GPT-2 vocabulary, batch 64, head + loss compiled": {"vocab": GPT2_VOCAB, "batch": 64, "loss": "compiled"},
    "GPT-2 vocabulary, batch 32, head + loss compiled, cuDNN attention":
        {"vocab": GPT2_VOCAB, "batch": 32, "loss": "compiled", "attention": "cudnn"},
    "GPT-2 vocabulary, batch 32, head + loss compiled, GPT-2 block":
        {"vocab": GPT2_VOCAB, "batch": 32, "loss": "compiled", "block": GPT2_BLOCK},
    "GPT-2 vocabulary, batch 32, head + loss compiled, GPT-2 block, flash attention":
        {"vocab": GPT2_VOCAB, "batch": 32, "loss": "compiled", "block": GPT2_BLOCK, "attention": "flash"},
    "GPT-2 vocabulary, batch 64, head + loss compiled, GPT-2 block":
        {"vocab": GPT2_VOCAB, "batch": 64, "loss": "compiled", "block": GPT2_BLOCK},
    "GPT-2 vocabulary, batch 32, head + loss compiled, learned positions":
        {"vocab": GPT2_VOCAB, "batch": 32, "loss": "compiled", "block": {"pos_emb": "learned"}},
    "GPT-2 vocabulary, batch 32, head + loss compiled, GELU MLP":
        {"vocab": GPT2_VOCAB, "batch": 32, "loss": "compiled", "block": {"mlp": "gelu"}},
    "GPT-2 vocabulary, batch 32, head + loss compiled, max-autotune":
        {"vocab": GPT2_VOCAB, "batch": 32, "loss": "compiled", "mode": "max-autotune-no-cudagraphs"},
    "GPT-2 vocabulary, batch 64, head + loss compiled, GPT-2 block, coordinate-descent tuning":
        {"vocab": GPT2_VOCAB, "batch": 64, "loss": "compiled", "block": GPT2_BLOCK,
         "inductor": {"coordinate_descent_tuning": True}},
}
SLOW = ("GPT-2 vocabulary, batch 32, head + loss compiled, max-autotune",
        "GPT-2 vocabulary, batch 64, head + loss compiled, GPT-2 block, coordinate-descent tuning")
"""Variants whose tuning takes minutes to compile (max-autotune did not finish in 110 s on an H200): run by name
with --only, they are left out of the default list, which must fit one command's time on a lent device."""
ATTENTION_BACKENDS = {"cudnn": torch.nn.attention.SDPBackend.CUDNN_ATTENTION,
                      "flash": torch.nn.attention.SDPBackend.FLASH_ATTENTION}
"""The attention kernels a variant can ask for; without one, torch's own choice."""
WARMUP, STEPS = 8, 30
DEVICE = "cuda"


def run_variant(v: dict, profile: bool = False) -> dict:
    """Train ``WARMUP + STEPS`` steps of one variant; its tokens/s and MFU over the timed steps.

    With ``profile``, three more steps then run under torch.profiler, and the
    GPU kernels that took the most time are printed: where the step's time goes.
    """
    device = torch.device(DEVICE)
    torch.manual_seed(0)
    raw = GPT(GPTConfig(vocab_size=v["vocab"], **SHAPE, **v["block"])).to(device)
    for option, value in v["inductor"].items():
        setattr(torch._inductor.config, option, value)
    mode = None if v["mode"] == "default" else v["mode"]
    for block in raw.blocks:
        block.compile(mode=mode)

    def head_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(raw.lm_head(raw.norm_f(x)).flatten(0, 1), y.flatten())

    head = torch.compile(head_loss, mode=mode) if v["loss"] == "compiled" else head_loss

    def loss_of(idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = raw.tok_emb(idx)
        if raw.pos_emb is not None:
            x = x + raw.pos_emb.weight[: idx.size(1)]
        for block in raw.blocks:
            x = block(x)
        return head(x, y)

    params = list(raw.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=1e-3, fused=True)
    batches = [torch.randint(0, min(v["vocab"], 50257), (v["batch"], SHAPE["block_size"] + 1), device=device)
               for _ in range(4)]
    backend = ATTENTION_BACKENDS.get(v["attention"])

    def train_step(ids: torch.Tensor) -> torch.Tensor:
        # sdpa_kernel's context can be entered once only: a new one each step
        attention = contextlib.nullcontext() if backend is None else torch.nn.attention.sdpa_kernel(backend)
        with attention, torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_of(ids[:, :-1], ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    start = time.perf_counter()
    for step in range(WARMUP + STEPS):
        if step == WARMUP:
            torch.cuda.synchronize()
            timed_from = time.perf_counter()
        loss = train_step(batches[step % len(batches)])
        if step == 0:
            torch.cuda.synchronize()
            first_step_s = time.perf_counter() - start
    torch.cuda.synchronize()
    tokens_per_s = STEPS * v["batch"] * SHAPE["block_size"] / (time.perf_counter() - timed_from)
    if profile:
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for ids in batches[:3]:
                train_step(ids)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))
    flops = raw.flops_per_token()
    peak = peak_flops_of(torch.cuda.get_device_name())
    return {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops / peak if peak else None,
            "params": raw.num_params(), "flops_per_token": flops, "first_step_s": first_step_s,
            "loss": loss.item(), "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, data_help=None, quick=False)
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="the variants to run (default: all but the slow ones to compile, " + "; ".join(SLOW) + ")")
    parser.add_argument("--timeout", type=float, default=150, metavar="S", help="seconds per variant (default 150)")
    parser.add_argument("--profile", metavar="NAME",
                        help="run this one variant here, then profile three steps and print where their time goes "
                             "(nothing is appended)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a variant's settings as JSON: run it and print JSON
    args = parser.parse_args(argv)
    unknown = [name for name in [*(args.only or []), *([args.profile] if args.profile else [])] if name not in VARIANTS]
    if unknown:  # before any device time is spent, not at that variant's turn
        parser.error(f"no variant named {unknown[0]!r}; the variants: " + "; ".join(VARIANTS))
    if not torch.cuda.is_available():
        sys.exit("error: this benchmark needs a CUDA GPU, and torch.cuda.is_available() is False")
    if args.profile:
        print(run_variant({**BASE, **VARIANTS[args.profile]}, profile=True))
        return 0
    if args.one:
        print(json.dumps(run_variant(json.loads(args.one))))
        return 0
    facts = [("model", "GPT, 12 layers, 12 heads, 768 wide, context 1024, bf16 autocast, blocks compiled one by one, "
                       "fused AdamW, clipping at 1.0, random token ids"),
             ("repetitions", f"one run per variant in its own process: {WARMUP} warm-up steps, then {STEPS} timed")]
    report = common.GrowingSection(args.out, "GPU MFU: the hand-written step, one change at a time", facts)
    header = ("variant", "parameters", "tokens/s", "MFU", "first step s", "peak GiB", "result")
    rows, names = [], args.only or [name for name in VARIANTS if name not in SLOW]
    for name in names:
        settings = {**BASE, **VARIANTS[name]}
        result, failure = None, None
        try:
            done = subprocess.run([sys.executable, __file__, "--one", json.dumps(settings)], capture_output=True,
                                  text=True, timeout=args.timeout)
            if done.returncode == 0:
                result = json.loads((done.stdout.strip().splitlines() or ["null"])[-1])
        except subprocess.TimeoutExpired:
            failure = f"did not finish in {args.timeout:.0f} s"
        except json.JSONDecodeError:
            failure = f"its last line of output is not its figures: {done.stdout.strip().splitlines()[-1][:200]}"
        if result is None and failure is None:
            failure = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        print(f"{name}: {result or failure}", flush=True)
        if result is None:
            rows.append((name, "-", "-", "-", "-", "-", failure))
        else:
            mfu = "n/a" if result["mfu"] is None else f"{result['mfu']:.1%}"
            rows.append((name, f"{result['params'] / 1e6:.1f}M", f"{result['tokens_per_s']:,.0f}", mfu,
                         f"{result['first_step_s']:.1f}", f"{result['peak_mem_gb']:.1f}",
                         "ok" if math.isfinite(result["loss"]) else f"loss {result['loss']}"))
        report.write([common.markdown_table(header, rows)], done=name == names[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
