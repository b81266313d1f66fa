"""Checkpoint I/O: CheckpointManager against plain torch.save/torch.load, and the cost of resuming mid-epoch.

    python benchmarks/checkpoint_io.py [--out BENCHMARKS.md] [--quick] [--dir FOLDER]

Save and load: the state the engine saves for a GPT (8 layers, 256 wide) and
its AdamW moments, about 75 MB, written and read back in turn by

- ``torch.save`` to a file, and ``torch.save`` followed by ``fsync`` (what
  makes a save survive a power cut);
- ``CheckpointManager.save``: fsync'd files, a sha256 manifest, an atomic
  rename, the ``latest`` pointer and pruning to ``keep_last``;
- ``torch.load(weights_only=True)``, ``load_shared_state`` (the same call
  behind the manager's checks), and ``resolve_checkpoint`` + ``load_shared_state``,
  which is what a resume does: it checks every file's sha256 first.

Loads read files the save just wrote, so from the page cache: they measure
deserialisation and hashing, not the disk.

Two ranks (gloo, one thread each): each holds half of that state's tensors as
its shards and writes them with torch.distributed.checkpoint, as FSDP's ranks
do, inside ``CheckpointManager.save``. The ranks share the reading and hashing
of the checkpoint's files for its manifest; the other contender leaves it all
to rank 0 (rank 1 lists no files, so rank 0 hashes those too, as every save did
before 2026-12-06). The same for the check of the newest checkpoint's hashes
that a resume makes: shared out by rank 0's search, or rank 0 alone (as every
resume did before 2026-12-06). Timed from a barrier to the last rank's return.

Resume at step k of an epoch (one epoch of 12,500 steps of synthetic data):
the time until the first batch arrives, (a) through the engine's
``ResumableSampler``, which skips k x batch indices in the sampler, (b) by
replaying k batches through the loader, as a loader without a sampler must,
and (c) through the engine itself: ``setup()`` loading a checkpoint saved at
step k, then the first batch of its epoch.

What a save costs the loop: the engine trains a regression MLP (4 x 1024, about
38 MB of state with AdamW's moments) for 200 steps, with no saves, a save every
20 steps made in the loop, or made in the background (--checkpoint-async-save);
the time from the end of the first step to the end of the last, and the time
the loop stood in save_checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import time

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout: import this llm

from benchmarks import common  # noqa: E402
from llm.data.synthetic_data_module import SyntheticDataModule  # noqa: E402
from llm.models.gpt import GPT, GPTConfig  # noqa: E402
from llm.training.core.checkpoint import (  # noqa: E402
    SHARED,
    CheckpointManager,
    hash_for_rank_0,
    hashes_shared_out,
    load_shared_state,
    resolve_checkpoint,
    verify,
)
from llm.training.core import sharded  # noqa: E402
from llm.training.core.callbacks import Callback  # noqa: E402
from llm.training.core.config import Config  # noqa: E402
from llm.training.core.engine import TrainingEngine  # noqa: E402
from llm.training.core.loading import ResumableSampler  # noqa: E402
from llm.training.tasks.regression_task import RegressionTask  # noqa: E402

GPT_SHAPE = {"vocab_size": 65, "block_size": 256, "n_layer": 8, "n_head": 8, "n_embd": 256}
RESUME_STEPS = (0, 100, 1000, 10000)
BATCH, SAMPLES = 32, 445_000  # 90% for training: 12,515 steps of 32 in one epoch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, data_help=None)
    parser.add_argument("--dir", type=Path, default=None, metavar="FOLDER",
                        help="where to write the checkpoints (default: a temporary folder)")
    args = parser.parse_args(argv)
    args.rounds = 2 if args.quick else 5
    args.resume_steps = RESUME_STEPS[:3] if args.quick else RESUME_STEPS
    return args


# ---- save and load ------------------------------------------------------------------------------


def gpt_state() -> tuple[dict[str, Any], int]:
    """The engine's shared state for a GPT after one AdamW step (so the moments exist), and its parameter count."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**GPT_SHAPE))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": None, "scaler": {},
        "best_metric": None, "callbacks": {}, "config": Config().to_dict(),
        "progress": {"step": 1, "epoch": 0, "batch_in_epoch": 1, "samples_seen": 32, "skipped_steps": 0,
                     "world_size": 1},
    }
    return state, model.num_params()


def save_plain(state: dict, path: Path, fsync: bool) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def save_load_rounds(folder: Path, state: dict, rounds: int) -> tuple[dict[str, list[float]], int]:
    """Seconds per save and per load, contenders interleaved; and the size of the shared-state file."""
    manager = CheckpointManager(folder / "managed", keep_last=2)
    plain, step = folder / "plain.pt", itertools.count(1)
    saved: dict[str, Path] = {}

    def plain_save(fsync: bool) -> float:
        plain.unlink(missing_ok=True)  # a new file each time, as the manager writes
        return common.timed(lambda: save_plain(state, plain, fsync))[0]

    def managed_save() -> float:
        seconds, saved["ckpt"] = common.timed(lambda: manager.save(next(step), state, {"rng": torch.get_rng_state()}))
        return seconds

    contenders = {
        "save: torch.save": lambda: plain_save(False),
        "save: torch.save + fsync": lambda: plain_save(True),
        "save: CheckpointManager.save": managed_save,
        "load: torch.load": lambda: common.timed(lambda: torch.load(plain, weights_only=True))[0],
        "load: load_shared_state": lambda: common.timed(lambda: load_shared_state(saved["ckpt"]))[0],
        "load: resolve_checkpoint + load_shared_state":
            lambda: common.timed(lambda: load_shared_state(resolve_checkpoint(manager.directory)))[0],
    }
    seconds = common.interleaved(contenders, rounds)
    return seconds, (saved["ckpt"] / SHARED).stat().st_size


# ---- two ranks: the checkpoint's files hashed by both, or by rank 0 alone ------------------------------

BOTH, ALONE = "save, 2 ranks: files hashed by both ranks", "save, 2 ranks: files hashed by rank 0 alone"
CHECK_BOTH, CHECK_ALONE = "resume's check, 2 ranks: files hashed by both ranks", \
    "resume's check, 2 ranks: files hashed by rank 0 alone"


def two_rank_worker(rank: int, folder: str, port: int, rounds: int) -> None:
    if rank:
        sys.stdout = open(os.devnull, "w")  # rank 0 prints the rounds
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        state, _ = gpt_state()
        moments = [(f"optimizer.{i}.{k}", v) for i, s in state["optimizer"]["state"].items() for k, v in s.items()
                   if k != "step"]
        tensors = sorted([*((f"model.{k}", v) for k, v in state["model"].items()), *moments])
        shard = dict(tensors[rank::2])  # every other tensor: half of the state, keys of this rank's own
        shared = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
        manager = CheckpointManager(Path(folder) / "two-ranks", rank=rank, world_size=2, keep_last=2)
        steps, share = itertools.count(1), CheckpointManager._hash_share

        def save(alone: bool) -> float:
            CheckpointManager._hash_share = (lambda self, staging: {}) if alone and rank == 1 else share
            dist.barrier()
            began = time.perf_counter()
            manager.save(next(steps), shared, {"rng": torch.get_rng_state()},
                         write_sharded=lambda staging: sharded.save(shard, staging / "sharded"))
            took = torch.tensor([time.perf_counter() - began], dtype=torch.float64)
            dist.all_reduce(took, op=dist.ReduceOp.MAX)
            return took.item()

        def check(alone: bool) -> float:
            newest = manager.directory / (manager.directory / "latest").read_text().strip()
            dist.barrier()
            began = time.perf_counter()
            if rank == 0:
                with contextlib.nullcontext() if alone else hashes_shared_out(manager.directory):
                    assert verify(newest) is None
            elif not alone:
                hash_for_rank_0(manager.directory)
            took = torch.tensor([time.perf_counter() - began], dtype=torch.float64)
            dist.all_reduce(took, op=dist.ReduceOp.MAX)
            return took.item()

        seconds = common.interleaved({BOTH: lambda: save(False), ALONE: lambda: save(True),
                                      CHECK_BOTH: lambda: check(False), CHECK_ALONE: lambda: check(True)}, rounds)
        if rank == 0:
            size = sum(p.stat().st_size for p in manager.latest_valid().rglob("*") if p.is_file())
            torch.save({"seconds": seconds, "bytes": size}, Path(folder) / "two-ranks.pt")
    finally:
        dist.destroy_process_group()


def two_rank_saves(folder: Path, rounds: int) -> tuple[dict[str, list[float]], int]:
    """Seconds per save on two ranks, both contenders interleaved; and the checkpoint's bytes."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(two_rank_worker, args=(str(folder), port, rounds), nprocs=2)
    result = torch.load(folder / "two-ranks.pt", weights_only=True)
    return result["seconds"], result["bytes"]


# ---- resume mid-epoch ------------------------------------------------------------------------------


def resume_config(log_dir: Path, resume: str = "") -> Config:
    return Config.from_dict({
        "task": "regression",
        "model": {"n_layer": 1, "n_embd": 32},
        "data": {"num_samples": SAMPLES, "input_dim": 16},
        "training": {"batch_size": BATCH, "epochs": 1, "device": "cpu"},
        "checkpoint": {"resume": resume},
        "logging": {"log_dir": str(log_dir), "progress_bar": False},
    })


def first_batch_skipping(data: SyntheticDataModule, k: int) -> float:
    """Seconds to the first batch after step k, skipping indices with the loading.ResumableSampler."""
    loader, sampler = data.train_dataloader(0, 1)
    resumable = ResumableSampler.install(loader, sampler)
    sampler.set_epoch(0)
    resumable.skip = k * BATCH
    return common.timed(lambda: next(iter(loader)))[0]


def first_batch_replaying(data: SyntheticDataModule, k: int) -> float:
    """Seconds to the first batch after step k, reading and dropping the k batches before it."""
    loader, sampler = data.train_dataloader(0, 1)
    sampler.set_epoch(0)
    return common.timed(lambda: next(itertools.islice(iter(loader), k, None)))[0]


def engine_resume(folder: Path, k: int) -> tuple[float, float]:
    """A checkpoint saved at step k of epoch 0; then seconds for a new engine's setup() (which loads it)
    and for the first batch of its epoch."""
    run = folder / f"resume-{k}"
    first = TrainingEngine(resume_config(run), RegressionTask(resume_config(run)), callbacks=[])
    first.setup()
    first.step = first.batch_in_epoch = k
    first.samples_seen = k * BATCH
    checkpoint = first.save_checkpoint()

    config = resume_config(run, resume=str(checkpoint))
    engine = TrainingEngine(config, RegressionTask(config), callbacks=[])
    with contextlib.redirect_stdout(io.StringIO()):  # "resumed from ..."
        setup_s, _ = common.timed(engine.setup)
    assert engine.batch_in_epoch == k, (engine.batch_in_epoch, k)
    engine.train_sampler.set_epoch(engine.epoch)
    batch_s, _ = common.timed(lambda: next(iter(engine.batches.groups(engine.epoch, engine.batch_in_epoch))))
    shutil.rmtree(run)
    return setup_s, batch_s


# ---- what a save costs the loop: made in it, or in the background --------------------------------

LOOP_STEPS, LOOP_EVERY = 200, 20
LOOP_SAVES = (LOOP_STEPS - 1) // LOOP_EVERY  # saved between the first step and the last
LOOP_MODEL = {"n_layer": 4, "n_embd": 1024}
NONE, IN_LOOP, BACKGROUND = "no saves", "saved in the loop", "saved in the background (--checkpoint-async-save)"


class _Stopwatch(Callback):
    """Wall and save-stall seconds from the end of the first step to the end of the last (the final save aside),
    a background save still in flight then included: the time its work took from the loop is counted whole."""

    def on_step_end(self, engine: TrainingEngine) -> None:
        if engine.step == 1:
            self.began = (time.perf_counter(), engine.aside_s)
        elif engine.step == LOOP_STEPS:
            if engine._saves is not None:
                engine._saves.wait()
            self.wall, self.stalled = time.perf_counter() - self.began[0], engine.aside_s - self.began[1]


def loop_run(folder: Path, mode: str) -> tuple[float, float, int]:
    """Seconds of training from step 1 to LOOP_STEPS, seconds of it the loop stood in saves, and the bytes of
    a checkpoint's state.pt."""
    run = folder / f"loop-{mode.split()[0]}"
    shutil.rmtree(run, ignore_errors=True)
    config = Config.from_dict({
        "task": "regression",
        "model": LOOP_MODEL,
        "data": {"num_samples": 20_000, "input_dim": 16},  # 562 steps an epoch: no epoch ends in the timing
        "training": {"batch_size": BATCH, "max_steps": LOOP_STEPS, "device": "cpu"},
        "checkpoint": {"every_n_steps": 0 if mode == NONE else LOOP_EVERY, "every_n_minutes": 0, "keep_best": 0,
                       "async_save": mode == BACKGROUND},
        "logging": {"log_dir": str(run), "progress_bar": False, "loggers": ""},
    })
    watch = _Stopwatch()
    engine = TrainingEngine(config, RegressionTask(config), callbacks=[watch])
    with contextlib.redirect_stdout(io.StringIO()):
        engine.train()
    size = (run / "checkpoints" / f"step_{LOOP_STEPS:08d}" / SHARED).stat().st_size
    shutil.rmtree(run)
    return watch.wall, watch.stalled, size


# ---- the report ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.dir is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="checkpoint_io-")))
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="checkpoint_io-", dir=args.dir)))
        state, params = gpt_state()
        seconds, size = save_load_rounds(folder, state, args.rounds)
        del state
        ranks_seconds, ranks_size = two_rank_saves(folder, args.rounds)

        data = SyntheticDataModule(resume_config(folder / "data"))
        data.setup("fit")
        skipping = common.interleaved({k: (lambda k=k: first_batch_skipping(data, k)) for k in args.resume_steps},
                                      args.rounds)
        replaying = common.interleaved({k: (lambda k=k: first_batch_replaying(data, k)) for k in args.resume_steps},
                                       1, warmup=False)  # seconds each at large k: once is enough
        engine = common.interleaved({k: (lambda k=k: engine_resume(folder, k)) for k in args.resume_steps},
                                    args.rounds)
        steps_per_epoch = len(data.train_dataloader(0, 1)[0])
        loops = common.interleaved({mode: (lambda mode=mode: loop_run(folder, mode))
                                    for mode in (NONE, IN_LOOP, BACKGROUND)}, args.rounds)
        filesystem = os.statvfs(folder)
        free_gb = filesystem.f_bavail * filesystem.f_frsize / 1e9

    mb = size / 1e6
    plain_save, plain_load = common.median(seconds["save: torch.save"]), common.median(seconds["load: torch.load"])
    rows = []
    for name, values in seconds.items():
        median = common.median(values)
        base = plain_save if name.startswith("save") else plain_load
        rows.append((name, f"{1000 * median:.0f}", common.spread([1000 * v for v in values]),
                     f"{mb / median:,.0f}", f"{base / median:.2f}"))
    io_table = common.markdown_table(
        ("operation", "median ms", "min-max ms", "MB/s", "speed vs plain torch.save / torch.load"), rows)

    both, alone = common.median(ranks_seconds[BOTH]), common.median(ranks_seconds[ALONE])
    check_both, check_alone = common.median(ranks_seconds[CHECK_BOTH]), common.median(ranks_seconds[CHECK_ALONE])
    rows = [(name, f"{1000 * common.median(values):.0f}", common.spread([1000 * v for v in values]),
             f"{ranks_size / 1e6 / common.median(values):,.0f}")
            for name, values in ranks_seconds.items()]
    ranks_table = common.markdown_table(("operation", "median ms", "min-max ms", "MB/s"), rows)
    ranks_line = (f"Both ranks hashing against rank 0 alone: {alone / both:.2f}x the speed of a save, "
                  f"{check_alone / check_both:.2f}x that of a resume's check of the checkpoint's hashes "
                  f"({ranks_size / 1e6:.1f} MB of files, half of them each rank's shards).")

    rows = []
    for k in args.resume_steps:
        setup_s = common.median([s for s, _ in engine[k]])
        batch_s = common.median([b for _, b in engine[k]])
        rows.append((f"{k:,}", f"{1000 * common.median(skipping[k]):.2f}", f"{1000 * replaying[k][0]:.1f}",
                     f"{1000 * setup_s:.0f}", f"{1000 * batch_s:.2f}"))
    resume_table = common.markdown_table(
        ("resume at step k", "first batch, sampler skip (ms)", "first batch, replaying k batches (ms)",
         "engine setup() incl. checkpoint load (ms)", "engine first batch (ms)"), rows)

    bare = common.median([wall for wall, _, _ in loops[NONE]])
    rows = []
    for mode, values in loops.items():
        wall = common.median([w for w, _, _ in values])
        per_save = "" if mode == NONE else f"{1000 * (wall - bare) / LOOP_SAVES:.0f}"
        stalled = "" if mode == NONE else f"{1000 * common.median([s for _, s, _ in values]) / LOOP_SAVES:.0f}"
        rows.append((mode, f"{wall:.2f}", common.spread([w for w, _, _ in values]), per_save, stalled,
                     f"{bare / wall:.2f}"))
    loop_table = common.markdown_table(
        ("steps 2-200", "median s", "min-max s", "ms added per save", "ms the loop stood in each save",
         "speed vs no saves"), rows)
    loop_mb = loops[IN_LOOP][0][2] / 1e6
    loop_line = (f"Regression MLP, {LOOP_MODEL['n_layer']} layers x {LOOP_MODEL['n_embd']} wide, batch {BATCH}: "
                 f"{LOOP_STEPS} steps, a save every {LOOP_EVERY} ({LOOP_SAVES} between the first step and the "
                 f"last; state.pt {loop_mb:.1f} MB). The added time per save is the run's time against the run "
                 f"without saves; the time stood is what the loop spent in save_checkpoint, which in the "
                 f"background is the copy into host memory and the wait for a save still in flight.")

    facts = [
        ("state", (f"GPT {GPT_SHAPE['n_layer']} layers x {GPT_SHAPE['n_embd']} wide ({params / 1e6:.1f}M parameters) "
                   f"+ AdamW moments + the engine's progress and config: state.pt is {mb:.1f} MB")),
        ("where", f"a folder under {args.dir or tempfile.gettempdir()} ({free_gb:.0f} GB free); loads hit the page cache"),
        ("repetitions", f"a warm-up round, then {args.rounds} rounds, interleaved; replaying: one run per k"),
        ("resume", (f"regression task, {SAMPLES:,} synthetic samples, batch {BATCH}: {steps_per_epoch:,} steps "
                    f"in the epoch")),
    ]
    text = common.section("Checkpoint I/O: save, load and resume mid-epoch" + (" (quick)" if args.quick else ""),
                          facts, ["Save and load of the same state:", io_table,
                                  "Two ranks (one torch thread each), each writing its half as shards "
                                  "(torch.distributed.checkpoint):",
                                  ranks_table, ranks_line,
                                  "Resuming at step k of an epoch, time to the first batch:", resume_table,
                                  "What a save costs the training loop:", loop_table, loop_line])
    common.append_section(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
