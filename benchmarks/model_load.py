"""Reading a trained model for the tools: load_lm against a hand-written torch.load and load_state_dict.

    python benchmarks/model_load.py [--out BENCHMARKS.md] [--quick] [--dir FOLDER]

A training checkpoint of a GPT of GPT-2 124M's shape (12 layers, 768 wide, a
vocabulary of 50304, tied embeddings), saved by the engine after one AdamW step:
its state.pt holds the weights and AdamW's two moments, three times the weights.
It is read by

- ``load_lm``, what generate, evaluate and export read a model with: state.pt
  mapped and only the weights copied out of it, into a GPT built on the meta
  device (``GPT.from_weights``);
- a hand-written script: ``torch.load(state.pt)``, then ``GPT(config)`` (its
  random weights) and ``load_state_dict`` of the weights, the whole checkpoint
  held meanwhile.

Each read runs in a process of its own, after its imports: the peak resident
memory it added (VmHWM; the pages of a mapped file that were read count) and its
seconds, which include load_lm's check of the checkpoint's sha256 hashes. The
file is read from the page cache.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout: import this llm

from benchmarks import common  # noqa: E402
from llm.training.core.config import Config  # noqa: E402
from llm.training.core.engine import TrainingEngine  # noqa: E402
from llm.training.tasks.lm_task import LMTask  # noqa: E402

MODEL = {"vocab_size": 50304, "n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 64}
LOAD_LM, BY_HAND = "load_lm", "torch.load + GPT(config) + load_state_dict"
READ = {
    LOAD_LM: "from llm.training.tasks.lm_task import load_lm\nmodel = load_lm(ckpt)[0]\n",
    BY_HAND: ("import json\nfrom llm.models.gpt import GPT, GPTConfig\n"
              "state = torch.load(ckpt / 'state.pt', weights_only=True)\n"
              "model = GPT(GPTConfig.from_dict(json.loads((ckpt / 'model_config.json').read_text()))).eval()\n"
              "model.load_state_dict(state['model'])\ndel state\n"),
}
CHILD = """
import json, re, sys, time
from pathlib import Path
import torch
import llm.models.gpt, llm.training.tasks.lm_task
def peak_kb():  # this process's own peak: ru_maxrss carries over a parent's through fork and exec
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1])
ckpt = Path(sys.argv[1])
before = peak_kb()
began = time.perf_counter()
{read}seconds = time.perf_counter() - began
added = peak_kb() - before
print(json.dumps({{"seconds": seconds, "mb": added / 1024, "params": sum(p.numel() for p in model.parameters())}}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, data_help=None)
    parser.add_argument("--dir", type=Path, default=None, metavar="FOLDER",
                        help="where to write the checkpoint (default: a temporary folder)")
    args = parser.parse_args(argv)
    args.rounds = 1 if args.quick else 5
    return args


def training_checkpoint(folder: Path) -> Path:
    """The engine's checkpoint of one step of the GPT on a small byte-level corpus."""
    corpus = folder / "corpus.txt"
    corpus.write_text("".join(chr(97 + (i * 7919) % 26) + (" " if i % 5 == 4 else "") for i in range(200_000)))
    config = Config.from_dict({
        "task": "lm", "model": MODEL, "data": {"path": str(corpus), "tokenizer": "byte"},
        "training": {"batch_size": 2, "max_steps": 1, "eval_batches": 1, "device": "cpu"},
        "logging": {"log_dir": str(folder / "run"), "progress_bar": False, "loggers": ""},
    })
    with contextlib.redirect_stdout(io.StringIO()):
        TrainingEngine(config, LMTask(config), callbacks=[]).train()
    return folder / "run" / "checkpoints" / "step_00000001"


def read_in_a_process(name: str, ckpt: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD.format(read=READ[name]), str(ckpt)], capture_output=True,
                         text=True, check=True, cwd=common.REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="model_load-", dir=args.dir) as folder:
        ckpt = training_checkpoint(Path(folder))
        state_mb = (ckpt / "state.pt").stat().st_size / 1e6
        results = common.interleaved({name: (lambda name=name: read_in_a_process(name, ckpt)) for name in READ},
                                     args.rounds, warmup=False)
    params = results[LOAD_LM][0]["params"]
    assert all(r["params"] == params for runs in results.values() for r in runs)
    hand_mb = common.median([r["mb"] for r in results[BY_HAND]])
    hand_s = common.median([r["seconds"] for r in results[BY_HAND]])
    rows = []
    for name, runs in results.items():
        mb, seconds = common.median([r["mb"] for r in runs]), common.median([r["seconds"] for r in runs])
        rows.append((name, f"{mb:,.0f}", common.spread([r["mb"] for r in runs]), f"{mb / (4 * params / 1e6):.2f}",
                     f"{seconds:.2f}", common.spread([r["seconds"] for r in runs]),
                     f"{hand_mb / mb:.2f}", f"{hand_s / seconds:.2f}"))
    label = common.median_label(args.rounds)
    table = common.markdown_table(
        ("read", f"{label} peak MB added", "min-max MB", "x the float32 weights", f"{label} s", "min-max s",
         "memory: by hand / this", "speed vs by hand"), rows)
    facts = [
        ("checkpoint", (f"GPT {MODEL['n_layer']} layers x {MODEL['n_embd']} wide, vocabulary {MODEL['vocab_size']} "
                        f"({params / 1e6:.1f}M parameters, {4 * params / 1e6:.0f} MB in float32) after one AdamW "
                        f"step: state.pt is {state_mb:,.0f} MB")),
        ("repetitions", f"{args.rounds} round(s), the two reads in turn, each in a new process"),
    ]
    text = common.section("Reading a trained model for the tools" + (" (quick)" if args.quick else ""), facts,
                          ["Peak resident memory each read added, and its time:", table])
    common.append_section(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
