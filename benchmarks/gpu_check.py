"""The GPU throughput benchmark, then the checks only a CUDA machine can run, in one command.

    python benchmarks/gpu_check.py --data-path FILE [--out BENCHMARKS.md]
    python benchmarks/gpu_check.py --data-path FILE --device cpu     # a dry run of the same commands

Each check runs the command line a user would type, in a fresh process, and
reads back what the run wrote (summary.json, metrics.jsonl, the export):

- lm in bf16 with torch.compile: the loss falls, and the throughput callback
  logs tokens/s and MFU (MFU needs the device in the peak-FLOPS table);
- lm in fp16: the gradient scaler's path;
- a NaN loss at step 3: skipped on the device and counted (nan_policy skip),
  or the run exits 3 naming that step (stop);
- exact resume: a run of 40 steps resumed from its own step-20 checkpoint in
  a new folder, against the same 40 steps run straight through twice, so that
  a GPU kernel's own run-to-run noise (atomics in some backward kernels) is
  told apart from a resume error;
- deterministic: the same runs with ``--training-deterministic true``, where
  both the straight runs and the resume must agree bit for bit (or the run
  names the op that has no deterministic kernel); and again with the
  checkpoints saved in the background (``--checkpoint-async-save``), whose
  copy of the state out of GPU memory the resume must find bit for bit;
- torchrun on nccl with DDP, then with FSDP and an export of its sharded
  checkpoint: two processes on two GPUs. With one GPU only one process can run
  (nccl puts each on a GPU of its own), and one process forms no process group,
  wraps nothing in DDP and shards nothing: the check then says so, and DDP and
  FSDP across GPUs are left unchecked.

Before them ``lm_throughput.py --gpu-preset`` (GPT-2 124M shape, bf16,
compile, MFU) runs, as the first check, with a time limit of its own, on the
corpus repeated if it is too short for the preset's batches, and appends its
own section. The checks' section follows it, written anew as each check ends,
so that a run cut short keeps what it checked. With ``--device cpu`` the fp16,
nccl and benchmark steps are left out and the rest runs on the CPU, torchrun
with two processes on gloo: a way to check the script before spending GPU
time on it.
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
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout: import this llm

from benchmarks import common  # noqa: E402

SMALL_LM = ["--task", "lm", "--data-tokenizer", "char", "--model-n-layer", "4", "--model-n-head", "4",
            "--model-n-embd", "128", "--model-block-size", "128", "--training-batch-size", "16",
            "--training-eval-batches", "4", "--logging-progress-bar", "false", "--logging-log-every-steps", "10"]
"""The default lm model: seconds per run on a GPU, so the checks cost little device time."""


COMMAND_TIMEOUT_S = 240
"""Longest a check's command may run: each takes well under a minute on a GPU."""
THROUGHPUT_TIMEOUT_S = 480
"""Longest the throughput benchmark may run: it compiles the 124M model for each of its contenders."""
PRESET_CHARS = 2_500_000
"""Characters the throughput benchmark's corpus needs at least: 50 batches of 32 x 1024 tokens to train on, with
a tenth held out (its char tokenizer makes a token of each)."""


class Checks:
    def __init__(self, args: argparse.Namespace, work: Path, nproc: int, report: common.GrowingSection):
        self.args, self.work, self.nproc, self.rows, self.report = args, work, nproc, [], report
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(common.REPO),
                                                                               os.environ.get("PYTHONPATH")]))}

    def train(self, name: str, *flags: str, launcher: list[str] | None = None) -> Path:
        """Run training with the given flags into work/name; the run folder. Raises on a non-zero exit."""
        run = self.work / name
        command = [*(launcher or [sys.executable, "-m", "llm.training.train"]), *SMALL_LM,
                   "--data-path", str(Path(self.args.data_path).resolve()), "--data-cache-dir",
                   str(self.work / "cache"), "--training-device", self.args.device,
                   "--logging-log-dir", str(run), *flags]
        self.command(command)
        return run

    def command(self, command: list[str], expect: int = 0, timeout: float = COMMAND_TIMEOUT_S, **env: str) -> str:
        """Run ``command`` (with ``env`` added to the environment); its last line of output. Raises unless
        it exits with ``expect``."""
        print("$", shlex.join([*(f"{k}={v}" for k, v in env.items()), *command]), flush=True)
        # a hung run is a failed check, not the end of the device time
        done = subprocess.run(command, env={**self.env, **env}, cwd=self.work, capture_output=True, text=True,
                              timeout=timeout)
        sys.stdout.write(done.stdout[-2000:])
        sys.stderr.write(done.stderr[-4000:])
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        if done.returncode != expect:
            raise RuntimeError(f"exit {done.returncode}: {last}")
        return last

    def check(self, name: str, run: Callable[[], str]) -> None:
        start = time.perf_counter()
        try:
            result, ok = run(), True
        except Exception as e:  # a check that fails is reported, and the others still run
            result, ok = f"{type(e).__name__}: {e}", False
        seconds = time.perf_counter() - start
        self.rows.append((name, "pass" if ok else "FAIL", f"{seconds:.0f}", result))
        print(f"{'PASS' if ok else 'FAIL'} {name} ({seconds:.0f} s): {result}", flush=True)
        # in the file at once: a run cut short on a lent device keeps the checks it made
        self.report.write([common.markdown_table(("check", "result", "s", "what it measured"), self.rows)])

    # ---- the checks --------------------------------------------------------------------------

    def throughput(self) -> str:
        """lm_throughput.py --gpu-preset, which appends a section of its own, on a corpus long enough for it."""
        corpus = Path(self.args.data_path).resolve()
        text = corpus.read_text(encoding="utf-8")
        copies = math.ceil(PRESET_CHARS / max(len(text), 1))
        if copies > 1:  # the same text again: what is timed is the model and the loop, not what it reads
            corpus = self.work / f"{corpus.stem}.x{copies}{corpus.suffix}"
            corpus.write_text("\n".join([text] * copies), encoding="utf-8")
        self.command([sys.executable, str(common.REPO / "benchmarks/lm_throughput.py"), "--data-path", str(corpus),
                      "--gpu-preset", "--out", str(self.args.out)], timeout=THROUGHPUT_TIMEOUT_S)
        return f"its section precedes this one; on {corpus.name}" + (f" ({copies} copies)" if copies > 1 else "")

    def bf16_compiled(self) -> str:
        run = self.train("bf16-compiled", "--training-precision", "bf16", "--training-compile", "true",
                         "--training-max-steps", "200", "--training-eval-every-steps", "100",
                         "--logging-profile-steps", "3", "--logging-profile-from-step", "150")
        table = (run / "profile" / "steps_150-152.rank0.txt").read_text()
        if self.args.device == "cuda" and "CUDA" not in table:  # the profiler's CUDA activity: kernels' own time
            raise RuntimeError(f"the profile's table has no CUDA time:\n{table[:1000]}")
        records = common.run_records(run)
        train = [r for r in records if r["split"] == "train"]
        first, last = train[0]["loss"], train[-1]["loss"]
        if not last < first:
            raise RuntimeError(f"the training loss did not fall: {first:.3f} -> {last:.3f}")
        rates = [r for r in train if "tokens_per_s" in r]
        mfu = [r["mfu"] for r in rates if "mfu" in r]
        summary = common.run_summary(run)
        text = (f"loss {first:.3f} -> {last:.3f}; {rates[-1]['tokens_per_s']:,.0f} tokens/s, step "
                f"{rates[-1]['step_time_ms']:.1f} ms, data wait {rates[-1]['data_wait_pct']:.2f}%, peak memory "
                f"{rates[-1]['peak_mem_mb']:,.0f} MB; first step (compile) {summary['first_step_s']:.1f} s")
        if self.args.device == "cuda" and not mfu:
            raise RuntimeError(text + "; no mfu logged: is the device in throughput.PEAK_FLOPS?")
        return text + (f"; MFU {mfu[-1]:.1%} (a model this small is not expected to fill the GPU)" if mfu else "")

    def fp16(self) -> str:
        run = self.train("fp16", "--training-precision", "fp16", "--training-max-steps", "100",
                         "--training-eval-every-steps", "50")
        summary = common.run_summary(run)
        if not math.isfinite(summary["train_loss"]):
            raise RuntimeError(f"train_loss {summary['train_loss']}")
        scales = [r["loss_scale"] for r in common.run_records(run) if r["split"] == "train" and "loss_scale" in r]
        if not scales:
            raise RuntimeError("no loss_scale in the training records")
        return (f"train_loss {summary['train_loss']:.3f}, val_loss {summary['val_loss']:.3f}, "
                f"steps the scaler skipped {summary['overflow_steps']}, loss scale {scales[0]:g} -> {scales[-1]:g}, "
                f"steps skipped by nan_policy {summary['skipped_steps']}")

    def exact_resume(self, *more: str, exact: bool = False) -> str:
        """A resume against two straight runs: within the device's own noise, or with ``exact``, bit for bit."""
        flags = ["--training-precision", "bf16", "--training-eval-every-steps", "20", "--model-dropout", "0.1",
                 "--training-max-steps", "40", "--checkpoint-every-n-steps", "20", *more]
        name = "-".join(["", *more]).replace("--", "").replace(" ", "")
        straight = [self.train(f"straight{name}-{i}", *flags) for i in (1, 2)]
        # the first run's checkpoint at step 20, continued in a run folder of its own
        resumed = self.train(f"resumed{name}", *flags, "--checkpoint-resume",
                             str(straight[0] / "checkpoints" / "step_00000020"))

        def losses(run: Path) -> list[float]:
            records = common.run_records(run)
            return [r["loss"] for r in records if r["split"] == "train" and r["step"] > 20]

        noise = max(abs(a - b) for a, b in zip(losses(straight[0]), losses(straight[1]), strict=True))
        error = max(abs(a - b) for a, b in zip(losses(straight[0]), losses(resumed), strict=True))
        text = (f"steps 21-40, largest train-loss gap: resumed vs straight {error:.2e}, straight vs straight "
                f"(the device's own noise) {noise:.2e}")
        if error > noise or (exact and max(error, noise) > 0):
            raise RuntimeError(text)
        return text + ("; bit for bit" if error == 0 else "")

    def non_finite(self) -> str:
        """A NaN loss at step 3: with nan_policy skip, the fused optimizer skips the step on the device and
        the engine counts it a step later; with stop, the run exits 3 naming step 3."""
        command = [sys.executable, "-m", "llm.training.train", "--task", "tests.helpers:NaNRegressionTask",
                   "--training-device", self.args.device, "--training-max-steps", "6",
                   "--logging-progress-bar", "false"]
        self.command([*command, "--training-nan-policy", "skip", "--logging-log-dir", str(self.work / "nan-skip")],
                     NAN_AT_STEP="3")
        summary = common.run_summary(self.work / "nan-skip")
        if summary["skipped_steps"] != 1 or summary["steps"] != 6 or not math.isfinite(summary["val_loss"]):
            raise RuntimeError(f"nan_policy skip: {summary}")
        last = self.command([*command, "--training-nan-policy", "stop", "--logging-log-dir",
                             str(self.work / "nan-stop")], expect=3, NAN_AT_STEP="3")
        if "at step 3" not in last:
            raise RuntimeError(f"nan_policy stop: {last}")
        return (f"skip: 1 step skipped of 6, val_loss {summary['val_loss']:.3f} (finite weights); "
                f"stop: exit 3, '{last[:80]}...'")

    def torchrun(self, strategy: str) -> str:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(self.nproc),
                    str(common.REPO / "llm/training/train.py")]
        backend = "nccl" if self.args.device == "cuda" else "gloo"
        run = self.train(f"torchrun-{strategy}", "--distributed-strategy", strategy, "--distributed-backend", backend,
                         "--training-max-steps", "30", "--training-eval-every-steps", "15", launcher=launcher)
        summary = common.run_summary(run)
        ckpt = max((run / "checkpoints").glob("step_*"))
        ranks = len(list(ckpt.glob("rank_*.pt")))  # one file per process that saved
        if ranks != self.nproc:
            raise RuntimeError(f"{ckpt.name} holds {ranks} rank files, expected {self.nproc}")
        sharded = (ckpt / "sharded").is_dir()
        if sharded != (strategy == "fsdp" and self.nproc > 1):
            raise RuntimeError(f"{ckpt.name} {'has' if sharded else 'lacks'} a sharded/ folder")
        text = f"{backend}, {strategy}: {summary['steps']} steps, val_loss {summary['val_loss']:.3f}"
        if strategy == "fsdp":
            out = self.work / "fsdp.safetensors"
            self.command([sys.executable, "-m", "llm.export", "--checkpoint", str(run), "--out", str(out)])
            text += (f"; exported {out.stat().st_size / 1e6:.1f} MB of weights from the "
                     f"{'sharded checkpoint' if sharded else 'checkpoint, not sharded'}")
        if self.nproc == 1:  # parallel.wrap and is_sharded need world_size > 1, and so does a process group
            text += (f"; one process checks the torchrun launch only (no {backend} process group, no DDP wrap, "
                     f"no sharding): DDP and FSDP across GPUs need 2 GPUs")
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, quick=False)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default), or cpu for a dry run of the same commands")
    args = parser.parse_args(argv)
    common.check_data_path(parser, args.data_path)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device (torch.cuda.is_available() is False); --device cpu runs a dry run")
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    # two processes are enough to wrap in DDP and shard; nccl needs a GPU for each, gloo shares the CPU
    nproc = min(torch.cuda.device_count(), 2) if args.device == "cuda" else 2
    processes = f"{nproc} process{'es' if nproc > 1 else ''}"
    facts = [("device", f"{device}, torch {torch.__version__}, CUDA {torch.version.cuda}"),
             ("model", "the default lm GPT (4 layers, 128 wide, context 128, batch 16), char tokenizer")]
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        checks = Checks(args, Path(tmp), nproc, common.GrowingSection(args.out, f"GPU checks on {device}", facts))
        if args.device == "cuda":  # the benchmark first: it is what the device time is for
            checks.check("lm_throughput.py --gpu-preset (GPT-2 124M, bf16, compile, MFU)", checks.throughput)
        checks.check("lm, bf16, compiled", checks.bf16_compiled)
        if args.device == "cuda":
            checks.check("lm, fp16 (gradient scaler)", checks.fp16)
        checks.check("exact resume, bf16, dropout", checks.exact_resume)
        checks.check("deterministic: straight and resumed, bit for bit",
                     lambda: checks.exact_resume("--training-deterministic", "true", exact=True))
        checks.check("deterministic, saved in the background: bit for bit",
                     lambda: checks.exact_resume("--training-deterministic", "true", "--checkpoint-async-save", "true",
                                                 exact=True))
        checks.check("a NaN loss: skipped, or stopped at", checks.non_finite)
        checks.check(f"torchrun, {processes}, ddp", lambda: checks.torchrun("ddp"))
        checks.check(f"torchrun, {processes}, fsdp, export", lambda: checks.torchrun("fsdp"))
    checks.report.write([common.markdown_table(("check", "result", "s", "what it measured"), checks.rows)], done=True)
    return 1 if any(row[1] == "FAIL" for row in checks.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
