"""Small stand-ins shared by the tests."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from llm.training.core.callbacks import HOOKS, Callback
from llm.training.core.config import Config
from llm.training.core.engine import TrainingEngine

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = str(Path(sys.executable).parent)
"""Where this Python's console scripts (torchrun, llm-train, ...) are, whatever PATH holds."""

# ---- configs and engines ---------------------------------------------------------------


def tiny_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    """A regression config small enough to train in well under a second, writing under tmp_path."""
    overrides: dict[str, Any] = {
        "training": {"epochs": 2, "batch_size": 16},
        "model": {"n_layer": 1, "n_embd": 16},
        "optimizer": {"lr": 0.02},
        "data": {"num_samples": 256, "input_dim": 4},
        "logging": {"log_dir": str(tmp_path / "run"), "progress_bar": False, "log_every_steps": 2},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            overrides.setdefault(name, {}).update(values)
        else:
            overrides[name] = values
    return Config.from_dict(overrides)


class Recorder(Callback):
    """Records every hook the engine calls, in order, with the metrics it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def _recording(hook: str) -> Any:
    def record(self: Recorder, engine: Any, *args: Any) -> None:
        self.calls.append((hook, args[0] if args else None))
    return record


for _hook in HOOKS:
    setattr(Recorder, _hook, _recording(_hook))


class StubEngine:
    """Just enough of TrainingEngine for testing callbacks without a training run."""

    def __init__(self, config: Config | None = None, is_main: bool = True, run_dir: Path | None = None):
        self.config = config or Config()
        self.is_main = is_main
        self.run_dir = run_dir or Path(self.config.logging.log_dir)
        self.step, self.epoch, self.total_steps = 0, 0, 10
        self.stop_reason = ""
        self.should_stop = False
        self.continues_run = False  # a fresh run; a resume of its own checkpoint sets it
        self.interrupted_by = None  # a signal that stopped the run
        self.logged: dict[str, float] = {}
        self.printed: list[str] = []
        self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        self._log_dir_given = self.config.logging.log_dir

    log_dir_of = TrainingEngine.log_dir_of

    def request_stop(self, reason: str) -> None:
        self.should_stop, self.stop_reason = True, reason

    def log(self, metrics: dict[str, float]) -> None:
        self.logged.update(metrics)

    def print(self, line: str) -> None:
        self.printed.append(line)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- processes ---------------------------------------------------------------------


_PORTS = random.Random()  # its own: a test that seeds the module's generator must not repeat the ports
_HANDED: set[int] = set()  # not bound yet, maybe: never handed out twice


def free_port() -> int:
    """A port on 127.0.0.1 that is free now, for a process the test starts to bind later (a rendezvous).

    Not one the system hands out (bind to port 0): until the process binds it, any connection made meanwhile
    (gloo's, another worker's run) could take that port from the system's range. These come from below Linux's
    usual one (32768-60999), 20000-31999, in a band for each pytest-xdist worker: no two workers draw the same.
    """
    band = 12000 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    low = 20000 + band * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    for _ in range(200):
        port = _PORTS.randrange(low, low + band)
        if port in _HANDED:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use, or waiting out a closed connection
                continue
        _HANDED.add(port)
        return port
    raise RuntimeError(f"no free port in {low}-{low + band - 1}")


def stacks_then_kill(process: subprocess.Popen) -> str:
    """The end of the stderr of a ``process`` that hangs (text, piped), with where each of its threads was:
    SIGABRT makes its faulthandler write that (PYTHONFAULTHANDLER, set in conftest.py), then it is killed."""
    process.send_signal(signal.SIGABRT)
    try:
        err = process.communicate(timeout=20)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        err = process.communicate()[1]
    return err[-4000:]


def spawn(worker: Any, *args: Any, nprocs: int = 2, timeout: float = 60) -> None:
    """Run ``worker(rank, *args)`` in ``nprocs`` fresh processes; kill them and fail the test if they hang."""
    import pytest
    import torch.multiprocessing as mp

    context = mp.start_processes(_collected, args=(worker, *args), nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{worker.__name__} on {nprocs} processes hung for {timeout:.0f} s")


def _collected(rank: int, worker: Any, *args: Any) -> None:
    """``worker(rank, *args)``, then what it left in reference cycles freed while the interpreter is alive: a
    process group (a model's FSDP mesh holds one) freed during the interpreter's exit aborts it in gloo's
    destructor (SIGABRT), as D.destroy_process_group says. A worker that got through then leaves at once,
    without the interpreter's teardown, where gloo still aborted one now and then ("terminate called without
    an active exception", once in about 50 runs): its work is done and written, and that teardown is no part
    of what these tests check (the command line's own exit is, through torchrun)."""
    try:
        worker(rank, *args)
    finally:
        gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(args: list[str], cwd: Path, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command with the repo importable; output captured as text.

    Past ``timeout``, every process the command started is killed too, before TimeoutExpired is raised:
    torchrun's workers, in sessions of their own and perhaps orphaned, would otherwise train on, slowing
    every test after."""
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    try:
        return subprocess.run(args, cwd=cwd, env=cli_env({**(env or {}), RUN_TAG: tag}), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tagged(tag)
        raise


RUN_TAG = "TESTS_RUN_TAG"
"""The variable in whose value run() marks the environment of each command it starts."""


def kill_tagged(tag: str) -> None:
    """SIGKILL every process whose environment holds run()'s ``tag`` (Linux; elsewhere none)."""
    needle = f"{RUN_TAG}={tag}".encode()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:  # gone meanwhile, or not this user's
            pass


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with the repo importable, its scripts on PATH and no LLM_* overrides."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env["PATH"] = SCRIPTS + os.pathsep + full_env.get("PATH", "")
    full_env.update(env or {})
    return full_env


def train_cli(*flags: str, cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "llm.training.train", *flags], cwd=cwd, **kwargs)


def torchrun(nproc: int, script: str | Path, *flags: str, cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    return run([*launcher, str(script), *flags], cwd=cwd, **kwargs)


def node_agent(script: str | Path, *flags: str, torchrun_flags: tuple[str, ...] = (), nproc: int = 1) -> list[str]:
    """The command of one of two torchrun agents with --nnodes=2, ``nproc`` processes each, against a rendezvous
    on 127.0.0.1 (a free port of its own): two "nodes" of this machine, as docs/distributed.md starts them."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--nproc_per_node={nproc}", *torchrun_flags,
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=llm-test",
            str(script), *flags]


def two_nodes(script: str | Path, *flags: str, cwd: Path, done: list[Path], torchrun_flags: tuple[str, ...] = (),
              env: dict[str, str] | None = None, timeout: float = 240, nproc: int = 1) -> None:
    """Two node_agent()s, started together. Returns once every path in ``done`` exists."""
    import pytest

    agent = node_agent(script, *flags, torchrun_flags=torchrun_flags, nproc=nproc)
    logs = [open(cwd / f"agent{i}.log", "w") for i in range(2)]
    nodes = [subprocess.Popen(agent, cwd=cwd, env=cli_env(env), stdout=log, stderr=subprocess.STDOUT) for log in logs]
    output = lambda: "".join(p.read_text()[-2000:] for p in cwd.glob("agent*.log"))  # noqa: E731
    try:
        # the training is what is tested; an agent can then linger in torchrun's exit barrier on a busy machine
        deadline = time.monotonic() + timeout
        while not all(p.exists() for p in done) and time.monotonic() < deadline:
            if any(n.poll() not in (None, 0) for n in nodes):
                pytest.fail(output())
            time.sleep(0.5)
        if not all(p.exists() for p in done):
            pytest.fail(output())
    finally:
        for node in nodes:
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill()
        for log in logs:
            log.close()


# ---- tasks that misbehave on purpose ---------------------------------------------------

from llm.training.tasks.regression_task import RegressionTask  # noqa: E402


class ScaledLossTask(RegressionTask):
    """Regression with settings of its own: the training loss times ``custom.scale``."""

    @dataclasses.dataclass
    class Settings:
        scale: float = 1.0
        """What the training loss is multiplied by."""
        reduce: Literal["mean", "sum"] = "mean"
        """Not read: a choice among strings."""
        steps: int = 0
        """Not read: an integer."""

    def train_step(self, batch, model, criterion):
        loss, metrics = super().train_step(batch, model, criterion)
        return loss * self.config.custom.scale, metrics


class FrozenSettingsTask(ScaledLossTask):
    """ScaledLossTask whose settings, one more among them, cannot change once the config is built."""

    @dataclasses.dataclass(frozen=True)
    class Settings:
        scale: float = 1.0
        """What the training loss is multiplied by."""
        reduce: Literal["mean", "sum"] = "mean"
        """Not read: a choice among strings."""
        steps: int = 0
        """Not read: an integer."""
        extra: bool = False
        """Not read: a boolean."""


class WholeSetTask(RegressionTask):
    """Regression that also scores the whole validation set: how many rows it had, and the sum of its targets."""

    def validation_step(self, batch, model, criterion):
        self.collect(target=batch[1])
        return super().validation_step(batch, model, criterion)

    def score_collected(self, collected):
        return {"rows": collected["target"].shape[0], "target_sum": collected["target"].double().sum()}


class RankMetricTask(RegressionTask):
    """Regression whose training metric has another name on each rank, as a task keyed by its data might."""

    def train_step(self, batch, model, criterion):
        loss, metrics = super().train_step(batch, model, criterion)
        return loss, {f"mae_of_rank_{os.environ.get('RANK', 0)}": loss.detach()}


class NaNRegressionTask(RegressionTask):
    """Regression whose loss turns NaN on one rank at one optimizer step (env NAN_AT_STEP, NAN_ON_RANK): times
    NaN, and its gradients with it, or with NAN_PLUS=1 plus NaN, its gradients left finite (as a mean over
    no items is: every label ignored)."""

    def __init__(self, config: Config):
        super().__init__(config)
        self.nan_at_step = int(os.environ.get("NAN_AT_STEP", 3))
        self.nan_on_rank = int(os.environ.get("NAN_ON_RANK", 0))
        self.calls = 0

    def train_step(self, batch, model, criterion):
        loss, metrics = super().train_step(batch, model, criterion)
        self.calls += 1
        rank = int(os.environ.get("RANK", 0))
        step = (self.calls - 1) // self.config.training.grad_accum_steps + 1
        if step == self.nan_at_step and rank == self.nan_on_rank:
            loss = loss + float("nan") if os.environ.get("NAN_PLUS") == "1" else loss * float("nan")
        return loss, metrics


class PartlyIgnoredRegressionTask(RegressionTask):
    """Regression whose loss leaves out the samples with a negative first feature, as padding would be left
    out, and says how many it kept (``loss_weight``): batches and ranks then differ in how much they count."""

    @staticmethod
    def kept(batch) -> torch.Tensor:
        return batch[0][:, 0] >= 0

    def train_step(self, batch, model, criterion):
        x, y = batch
        keep = self.kept(batch)
        per_sample = (model(x) - y).pow(2).mean(dim=-1)
        return (per_sample * keep).sum() / keep.sum().clamp(min=1), {}

    def validation_step(self, batch, model, criterion):
        return self.train_step(batch, model, criterion)

    def loss_weight(self, batch):
        return self.kept(batch).sum()


class SampleRecordingTask(RegressionTask):
    """Regression that appends the first feature of every training sample it takes, one per line, to
    ``<log_dir>/seen_rank<RANK>.txt``: which samples each rank saw, in order."""

    def train_step(self, batch, model, criterion):
        rank = int(os.environ.get("RANK", 0))
        out = Path(self.config.logging.log_dir)
        out.mkdir(parents=True, exist_ok=True)  # rank 0 makes the run folder; another rank may get here first
        with open(out / f"seen_rank{rank}.txt", "a") as f:
            f.writelines(f"{v!r}\n" for v in batch[0][:, 0].tolist())
        return super().train_step(batch, model, criterion)


# ---- language-model runs ------------------------------------------------------------


from llm.data.synthetic_data_module import SyntheticDataModule  # noqa: E402


class Jittered(torch.utils.data.Dataset):
    """A data set whose items are augmented at random in __getitem__, with torch's, NumPy's and Python's
    generators, in the loader workers."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x + 0.1 * torch.rand(x.shape) + float(np.random.rand()) + random.random(), y


class AugmentedData(SyntheticDataModule):
    """Regression data whose training, validation and test items are augmented at random in __getitem__."""

    def setup(self, stage):
        super().setup(stage)
        self.train_set, self.val_set, self.test_set = map(Jittered, (self.train_set, self.val_set, self.test_set))


class UnskippableData(SyntheticDataModule):
    """Synthetic regression data whose training loader hides its sampler behind a batch sampler of its own,
    as many hand-made loaders do: a resumed run cannot skip indices and must replay batches."""

    def train_dataloader(self, rank, world_size):
        loader, sampler = super().train_dataloader(rank, world_size)
        batches = _OpaqueBatches(loader.batch_sampler)
        return torch.utils.data.DataLoader(loader.dataset, batch_sampler=batches), sampler


class _Buckets(torch.utils.data.BatchSampler):
    """torch's BatchSampler, subclassed to fill a batch per bucket (even and odd indices): it reads ahead of the
    batches it yields, as samplers that bucket by length do."""

    def __iter__(self):
        buckets: dict[int, list[int]] = {0: [], 1: []}
        for i in self.sampler:
            buckets[i % 2].append(i)
            if len(buckets[i % 2]) == self.batch_size:
                yield buckets[i % 2]
                buckets[i % 2] = []


class BucketedData(SyntheticDataModule):
    """Synthetic regression data batched by a sampler that buckets its items: skipping a whole number of
    batches' indices would not resume it where it stopped."""

    def train_dataloader(self, rank, world_size):
        loader, sampler = super().train_dataloader(rank, world_size)
        batches = _Buckets(sampler, loader.batch_size, drop_last=True)
        return torch.utils.data.DataLoader(loader.dataset, batch_sampler=batches), sampler


class PooledData(SyntheticDataModule):
    """The synthetic data, prepared on a thread pool left running (as a compiler's pool is), whose worker threads
    end only as the interpreter exits."""

    pool: ThreadPoolExecutor | None = None

    def prepare_data(self) -> None:
        PooledData.pool = PooledData.pool or ThreadPoolExecutor(2)
        PooledData.pool.submit(super().prepare_data).result()


class SlowSetupData(SyntheticDataModule):
    """Synthetic regression data whose setup creates the file named by SETUP_MARKER, then takes a minute, as the
    tokenization of a large corpus can: a run to interrupt before training starts."""

    def setup(self, stage):
        Path(os.environ["SETUP_MARKER"]).touch()
        time.sleep(60)
        super().setup(stage)


class _OpaqueBatches:
    def __init__(self, batch_sampler):
        self._inner = batch_sampler

    def __iter__(self):
        return iter(self._inner)

    def __len__(self):
        return len(self._inner)


def lm_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    """A tiny char-level GPT on a small corpus written under tmp_path."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        tmp_path.mkdir(parents=True, exist_ok=True)
        corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300)))
    base: dict[str, Any] = {
        "task": "lm",
        "training": {"max_steps": 6, "batch_size": 4, "eval_batches": 2},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16},
        "data": {"path": str(corpus), "cache_dir": str(tmp_path / "cache")},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            base.setdefault(name, {}).update(values)
        else:
            base[name] = values
    return tiny_config(tmp_path, **base)


def reseal(ckpt: Path) -> None:
    """Rewrite the manifest to match the files as they are now, as if the checkpoint had been saved so."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"] = {p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                         for p in sorted(ckpt.iterdir()) if p.name != "manifest.json"}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def train_tiny_lm(root: Path, text: str, block_size: int = 32, steps: int = 30, flags: tuple[str, ...] = ()) -> Path:
    """Train a tiny char-level GPT on ``text`` through the command line's main(), in this process, with ``flags``
    added; returns its run directory."""
    from llm.training import train

    (root / "corpus.txt").write_text(text)
    assert train.main(["--task", "lm", "--training-max-steps", str(steps), "--training-batch-size", "8",
                       "--model-n-layer", "1", "--model-n-embd", "32", "--model-n-head", "2",
                       "--model-block-size", str(block_size), "--data-path", str(root / "corpus.txt"),
                       "--data-cache-dir", str(root / "cache"), "--logging-log-dir", str(root / "run"),
                       "--logging-progress-bar", "false", *flags]) == 0
    return root / "run"


def wordpiece_file(path: Path, text: str) -> Path:
    """A tokenizer.json at ``path``: WordPiece over the words of ``text`` and an unknown token, [UNK], for any
    other word."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", *sorted(set(text.split()))]
    tokenizer = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))
    return path


def hold(folder) -> subprocess.Popen:
    """Another process that takes ``folder`` and keeps it until killed."""
    code = "import sys, time; from llm.files import FolderLock; lock = FolderLock(sys.argv[1]); print('held'); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-u", "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                              env=cli_env())
    assert holder.stdout.readline().strip() == "held"
    return holder


def train(config, task_cls=RegressionTask, callbacks=None):
    engine = TrainingEngine(config, task_cls(config), 0, 1, callbacks=callbacks)
    return engine, engine.train()


class CrashAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, engine):
        if engine.step == self.step:
            raise RuntimeError("simulated crash")


class StartedAt(Callback):
    """The step a run starts from: that of the checkpoint it resumed from, 0 for one that started over (which a
    deterministic run would end on the same weights as a resume)."""

    step = None

    def on_train_start(self, engine):
        self.step = engine.step


def records_of(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


class LearningRates(Callback):
    """The learning rate after each step: the one the next step takes."""

    def __init__(self):
        self.after_step = {}

    def on_step_end(self, engine):
        self.after_step[engine.step] = engine.optimizer.param_groups[0]["lr"]
