import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from llm.data.synthetic_data_module import SyntheticDataModule
from llm.errors import UsageError
from llm.training.core.callbacks import Callback, CallbackError, MetricsLogger
from llm.training.core.checkpoint import load_shared_state
from llm.training.core.engine import TrainingEngine
from llm.training.core.loading import (LOADER_STREAM, SETUP_STREAM, TRAIN_STREAM, VAL_STREAM, ResumableSampler,
                                       SeededBatches, mixed_seed, rank_seed, rng_state, set_rng_state)
from llm.training.core.optim import lr_factor
from llm.training.tasks.regression_task import RegressionTask
from llm.training.train import default_callbacks
from tests.helpers import (AugmentedData, CrashAt, Jittered, REPO, Recorder, StartedAt, free_port, spawn, tiny_config,
                           train, weights)


def test_mixed_seeds_differ_for_every_rank_and_salt_the_engine_gives():
    # the training loader's salt is -1 - epoch: hash() of the numbers gave epochs 0 and 1 one seed (hash(-1) is -2)
    seeds = [mixed_seed(3, rank, 4, salt) for rank in range(4) for salt in range(-50, 50)]
    assert len(set(seeds)) == len(seeds) and all(0 <= seed < 2**63 for seed in seeds)
    assert mixed_seed(3, 0, 4, -1) == mixed_seed(3, 0, 4, -1) != mixed_seed(3, 0, 4, -2)
    # every other seed is the one earlier versions drew: a run resumed across the change draws as it did
    assert [mixed_seed(3, 0, salt) for salt in range(-50, 50) if salt != -2] == \
        [hash((3, 0, salt)) % 2**63 for salt in range(-50, 50) if salt != -2]


def test_a_stream_loaded_by_workers_is_left_as_it_is():
    class Stream(torch.utils.data.IterableDataset):  # its workers fetch no batch of indices: nothing to seed
        def __iter__(self):
            return iter(range(4))

    loader = torch.utils.data.DataLoader(Stream(), batch_size=2, num_workers=1)
    assert SeededBatches.install(loader, seed=0) is None and type(loader.batch_sampler) is torch.utils.data.BatchSampler
    assert loader.worker_init_fn is None


def test_resumable_sampler_skips_indices_already_trained_on():
    loader = torch.utils.data.DataLoader(list(range(10)), batch_size=3)
    sampler = ResumableSampler.install(loader, loader.batch_sampler.sampler)
    sampler.skip = 4
    assert [batch.tolist() for batch in loader] == [[4, 5, 6], [7, 8, 9]] and len(loader) == 2
    sampler.skip = 0
    assert len(list(loader)) == 4
    other = torch.utils.data.DataLoader(list(range(10)), batch_size=3)
    assert ResumableSampler.install(other, torch.utils.data.SequentialSampler(range(10))) is None


def test_a_gpu_process_keeps_the_random_state_of_its_own_gpu_and_finds_it_in_older_checkpoints(monkeypatch):
    # each GPU's state a tensor of its index; a process saves and restores only the one it trains on
    states = {i: torch.tensor([i], dtype=torch.uint8) for i in range(4)}
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: states[device.index])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state), device.index)))
    gpu = torch.device("cuda", 2)
    saved = rng_state(gpu)
    assert torch.equal(saved["cuda"], states[2]) and "cuda" not in rng_state(torch.device("cpu"))
    set_rng_state(saved, gpu)
    set_rng_state({**saved, "cuda": [states[i] for i in range(4)]}, gpu)  # an earlier version's: every GPU's
    set_rng_state(saved, torch.device("cpu"))  # a GPU run resumed on the CPU: nothing to restore there
    assert restored == [(2, 2), (2, 2)]
    with pytest.warns(UserWarning, match="random state of 2 GPUs, none for cuda:2"):  # saved where fewer were seen
        set_rng_state({**saved, "cuda": [states[0], states[1]]}, gpu)
    assert len(restored) == 2


def test_each_rank_of_each_seed_draws_a_stream_of_its_own_and_rank_0_the_seed_itself():
    seeds = [rank_seed(seed, rank) for seed in range(100) for rank in range(8)]
    assert len(set(seeds)) == len(seeds)  # seed + rank gave rank 1 of seed 0 the stream of rank 0 of seed 1
    assert [rank_seed(seed, 0) for seed in range(100)] == list(range(100))  # one process draws as it did
    data = {mixed_seed(seed, SETUP_STREAM) for seed in range(100)} | {
        mixed_seed(seed, rank, stream) for seed in range(100) for rank in range(8)
        for stream in (TRAIN_STREAM, VAL_STREAM, LOADER_STREAM)}
    assert not data & set(seeds)  # rank 1's dropout replayed the data module's set-up draws with (seed, 1)


# ---- streams: training data of no known length -----------------------------------------


class Stream(torch.utils.data.IterableDataset):
    """Samples one after another, with no length and no index."""

    def __iter__(self):
        return iter([(torch.zeros(4), torch.zeros(1))] * 8)


class Samples(torch.utils.data.IterableDataset):
    """Regression samples one after another, ``length`` a pass (None: no end). Sample i of an epoch comes from a
    generator seeded by (rank, epoch, i): the same stream in a run and in its resume. It keeps its place for
    torchdata's StatefulDataLoader (state_dict, load_state_dict) and counts what it yields."""

    def __init__(self, rank: int = 0, length: int | None = None):
        self.rank, self.length, self.epoch, self.start, self.position, self.read = rank, length, 0, 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0

    def __iter__(self):
        for i in itertools.count(self.start) if self.length is None else range(self.start, self.length):
            x = torch.randn(4, generator=torch.Generator().manual_seed(hash((self.rank, self.epoch, i)) % 2**31))
            self.position, self.read = i + 1, self.read + 1
            yield x, x.sum(dim=0, keepdim=True)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.start = state["position"]


class StreamData(SyntheticDataModule):
    """The synthetic validation set; training batches from a stream, ``lengths[rank]`` samples a pass."""

    lengths: dict[int, int | None] = {}
    loader = torch.utils.data.DataLoader

    def train_dataloader(self, rank, world_size):
        self.samples = Samples(rank, self.lengths.get(rank))
        return self.loader(self.samples, batch_size=self.config.training.batch_size), None


def stream_engine(tmp_path, lengths=None, loader=None, rank=0, world_size=1, callbacks=(), **sections):
    config = tiny_config(tmp_path, **{"optimizer": {"scheduler": "constant"}, **sections})
    data = type("Data", (StreamData,), {"lengths": lengths or {}, **({"loader": loader} if loader else {})})(config)
    return TrainingEngine(config, RegressionTask(config), rank, world_size, data_module=data,
                          callbacks=[*default_callbacks(config), *callbacks])


def test_a_stream_without_max_steps_is_refused_in_one_line(tmp_path):
    with pytest.raises(UsageError, match=r"^Data\.train_dataloader\(\) is a stream \(an IterableDataset, or no length\): "
                                         r"set training\.max_steps, the steps the schedule spans; each pass over it "
                                         r"is an epoch$"):
        stream_engine(tmp_path).train()
    assert not (tmp_path / "run").exists()


def test_each_pass_over_a_finite_stream_is_an_epoch_and_max_steps_spans_the_schedule(tmp_path):
    # 10 batches of 16 a pass, 2 a step: 5 steps an epoch; 3 epochs end the run before max_steps
    recorder = Recorder()
    engine = stream_engine(tmp_path, {0: 160}, callbacks=[recorder], optimizer={"scheduler": "cosine"},
                           training={"epochs": 3, "max_steps": 100, "grad_accum_steps": 2})
    with pytest.warns(UserWarning, match=r"^a pass over the stream took 5 steps: training\.epochs=3 passes end the "
                                         r"run at about step 15, before training\.max_steps=100, which the "
                                         r"learning-rate schedule spans; raise training\.epochs") as warned:
        engine.train()
    assert len([w for w in warned if "a pass over the stream" in str(w.message)]) == 1  # once, after the first
    assert engine.step == 15 and engine.epoch == 3 and engine.total_steps == 100
    assert recorder.names().count("on_epoch_end") == 3
    assert engine.data_module.samples.epoch == 2  # told each epoch, to reshuffle by
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "epoch"] == [5, 10, 15]
    # the schedule spans max_steps: at step 15 of 100 the cosine has barely moved from its peak
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * lr_factor(15, engine.config.optimizer, 100))
    assert lr_factor(15, engine.config.optimizer, 100) > 0.9


def test_a_streams_epoch_closes_at_its_last_step_as_a_sized_loaders_does(tmp_path):
    """Its end is read ahead: the epoch's validation comes before the save due at that step, and an epoch that
    ends at max_steps is closed."""
    engine = stream_engine(tmp_path, {0: 160}, training={"epochs": 2, "max_steps": 20, "grad_accum_steps": 2},
                           checkpoint={"every_n_steps": 5, "keep_last": 5})
    engine.train()
    assert (engine.step, engine.epoch) == (10, 2)
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "epoch"] == [5, 10]
    saved = load_shared_state(tmp_path / "run/checkpoints/step_00000005")
    assert saved["val_metrics"]["step"] == 5 and saved["progress"]["epoch"] == 1  # validated, then saved


class NumpyPlace(Samples):
    def state_dict(self) -> dict:
        return {"position": np.int64(self.position)}  # a NumPy number, as a data set's own counters often are


def test_a_loaders_state_is_kept_as_plain_numbers_and_not_put_back_for_another_worker_count(tmp_path, recwarn):
    stateful = pytest.importorskip("torchdata.stateful_dataloader").StatefulDataLoader

    class Loader(stateful):
        def __init__(self, samples, batch_size):
            samples.__class__ = NumpyPlace
            super().__init__(samples, batch_size=batch_size, num_workers=int(os.environ.get("WORKERS", "0")))

    stream_engine(tmp_path, loader=Loader, training={"max_steps": 3}).train()
    resumed = stream_engine(tmp_path, loader=Loader, training={"max_steps": 6}, checkpoint={"resume": "auto"})
    resumed.train()  # its np.int64 saved as a plain int, which a checkpoint loads
    assert resumed.step == 6 and resumed.data_module.samples.read == (3 + 1) * 16  # and one read ahead
    os.environ["WORKERS"] = "1"
    try:
        resumed = stream_engine(tmp_path, loader=Loader, training={"max_steps": 8}, checkpoint={"resume": "auto"})
        resumed.train()
    finally:
        del os.environ["WORKERS"]
    assert resumed.step == 8
    said = [str(w.message) for w in recwarn]
    assert "the stream's loader was saved with 0 worker(s), not 1: its state is not put back" in said
    assert any(m.startswith("replaying the 6 batches of the stream") for m in said)


class Drawn(torch.utils.data.Dataset):
    """Noise drawn in __getitem__, as augmentation does."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return torch.rand(4), torch.zeros(1)


class Endless(torch.utils.data.Sampler):
    """Indices of no length: the loader over it is a stream."""

    def __iter__(self):
        return iter(range(64))


def test_a_streams_workers_draw_other_numbers_each_epoch(tmp_path):
    class Data(StreamData):
        def train_dataloader(self, rank, world_size):
            return torch.utils.data.DataLoader(Drawn(), batch_size=16, sampler=Endless(), num_workers=1), None

    config = tiny_config(tmp_path, training={"epochs": 2, "max_steps": 10})
    drawn = []

    class Spy(RegressionTask):
        def train_step(self, batch, model, criterion):
            drawn.append(batch[0].clone())
            return super().train_step(batch, model, criterion)

    TrainingEngine(config, Spy(config), data_module=Data(config)).train()
    assert len(drawn) == 8 and not torch.equal(drawn[0], drawn[4])  # epoch 1's first batch is not epoch 0's


def test_a_stream_whose_loader_keeps_its_workers_is_warned_of(tmp_path):
    class Data(StreamData):
        def train_dataloader(self, rank, world_size):
            return torch.utils.data.DataLoader(Samples(rank, 64), batch_size=16, num_workers=1,
                                               persistent_workers=True), None

    config = tiny_config(tmp_path, training={"max_steps": 2})
    with pytest.warns(UserWarning, match=r"the stream's loader keeps its workers \(persistent_workers=True\): the "
                                         r"copies of Samples they made at the first pass do not see set_epoch"):
        TrainingEngine(config, RegressionTask(config), data_module=Data(config)).train()


@pytest.mark.parametrize("eval_batches", [0, 2])
def test_a_validation_stream_read_to_its_end_is_warned_of_unless_eval_batches_bounds_it(tmp_path, eval_batches):
    """An endless one held the run at its first evaluation for ever, with nothing said."""
    class Data(SyntheticDataModule):
        def val_dataloader(self, rank, world_size):
            return torch.utils.data.DataLoader(Samples(rank, 64), batch_size=16), None

    config = tiny_config(tmp_path, training={"max_steps": 2, "eval_batches": eval_batches})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TrainingEngine(config, RegressionTask(config), data_module=Data(config)).train()
    said = [str(w.message) for w in caught if "is a stream: each evaluation" in str(w.message)]
    assert said == ([] if eval_batches else ["Data.val_dataloader() is a stream: each evaluation reads it to its end; "
                                             "if it has none, set training.eval_batches, the batches an evaluation "
                                             "reads"])


def test_a_stream_that_gives_no_step_is_refused_in_one_line(tmp_path):
    with pytest.raises(UsageError, match=r"Data\.train_dataloader\(\) gave no 2 batches \(training\.grad_accum_steps\) "
                                         r"in epoch 0: a stream must yield batches on every rank"):
        stream_engine(tmp_path, {0: 12}, training={"max_steps": 5, "grad_accum_steps": 2}).train()  # one batch


@pytest.mark.parametrize("stateful", [False, True])
def test_a_stream_resumed_mid_epoch_ends_with_the_weights_of_a_run_never_stopped(tmp_path, stateful, recwarn):
    """Without a loader that keeps its place, the batches the epoch trained on are read again and dropped;
    torchdata's StatefulDataLoader goes on where it stood, reading none of them again."""
    loader = pytest.importorskip("torchdata.stateful_dataloader").StatefulDataLoader if stateful else None
    straight = stream_engine(tmp_path / "straight", loader=loader, training={"max_steps": 12})
    straight.train()
    first = stream_engine(tmp_path / "resumed", loader=loader, training={"max_steps": 7})
    first.train()
    resumed = stream_engine(tmp_path / "resumed", loader=loader, training={"max_steps": 12},
                            checkpoint={"resume": "auto"})
    resumed.train()
    assert resumed.step == straight.step == 12 and resumed.epoch == 0
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed.model).values(), weights(straight.model).values()))
    replayed = [str(w.message) for w in recwarn if "replaying" in str(w.message)]
    # the 5 batches it trained on, one read ahead (whether the stream ends there), and the 7 replayed
    assert resumed.data_module.samples.read == (6 if stateful else 13) * 16
    assert replayed == ([] if stateful else ["replaying the 7 batches of the stream that epoch 0 trained on to "
                                             "resume after them (a loader with state_dict and load_state_dict, such "
                                             "as torchdata's StatefulDataLoader, resumes where it stood)"])


class NoisySamples(Samples):
    """Samples whose targets take noise from torch's global generator, as a stream's augmentation might."""

    def __iter__(self):
        for x, y in super().__iter__():
            yield x, y + 0.1 * torch.randn(1)


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")  # torchdata's own, at each loader it builds
def test_a_stream_drawing_from_the_global_generator_resumes_where_it_stood_with_the_same_draws(tmp_path):
    """The next step's batches are read ahead of each step: a checkpoint held the generator as it was after that
    read, and the resumed run read those batches again from there, each draw one batch late."""
    loader = pytest.importorskip("torchdata.stateful_dataloader").StatefulDataLoader

    class Noisy(StreamData):
        def train_dataloader(self, rank, world_size):
            self.samples = NoisySamples(rank)
            return loader(self.samples, batch_size=self.config.training.batch_size), None

    def engine(name, max_steps, **sections):
        config = tiny_config(tmp_path / name, optimizer={"scheduler": "constant"}, model={"dropout": 0.1},
                             training={"max_steps": max_steps}, **sections)
        return TrainingEngine(config, RegressionTask(config), data_module=Noisy(config))

    straight = engine("straight", 12)
    straight.train()
    engine("resumed", 7).train()
    resumed = engine("resumed", 12, checkpoint={"resume": "auto"})
    resumed.train()
    assert resumed.step == 12
    for name, value in weights(straight.model).items():
        assert torch.equal(value, weights(resumed.model)[name]), name


def uneven_stream_worker(rank: int, directory: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        engine = stream_engine(Path(directory), {0: 160, 1: 112}, rank=rank, world_size=2,
                               training={"epochs": 2, "max_steps": 100})
        engine.train()
        assert (engine.step, engine.epoch) == (14, 2)  # 7 steps an epoch: the shorter stream's
    finally:
        dist.destroy_process_group()


def test_ranks_whose_streams_end_apart_end_each_epoch_together(tmp_path):
    """Rank 0 has 10 batches a pass, rank 1 has 7: a rank stepping on alone would wait for the other forever."""
    spawn(uneven_stream_worker, str(tmp_path), free_port())
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "epoch"] == [7, 14]


class CountedStream(Stream):
    def __len__(self):
        return 8


@pytest.mark.parametrize("stream", [Stream, CountedStream])  # a length of its own: still no items by index
def test_a_stream_handed_to_build_dataloader_is_refused_in_one_line(tmp_path, stream):
    class StreamData(SyntheticDataModule):
        def train_dataloader(self, rank, world_size):
            return self.build_dataloader(stream(), rank, world_size, train=True)

    config = tiny_config(tmp_path)
    with pytest.raises(UsageError, match=rf"^StreamData: build_dataloader needs a data set with a length and items by "
                                         rf"index; {stream.__name__} is an IterableDataset \(a stream needs a DataLoader of the data "
                                         rf"module's own\)$"):
        TrainingEngine(config, RegressionTask(config), data_module=StreamData(config)).train()


# ---- loaders: their workers, their batching, their seeds ------------------------------------


def test_augmentation_in_loader_workers_resumes_mid_epoch_bit_for_bit_whatever_the_workers(tmp_path):
    # each batch's random numbers come from a seed of its own (run, epoch, place in the epoch; the same at each
    # validation), not from whichever worker loads it: a resume mid-epoch, on another number of workers, ends
    # where a run that never stopped does (14 steps an epoch: the resume crosses into the second)
    def run(folder, workers, resume="", callbacks=()):
        config = tiny_config(tmp_path / folder, training={"max_steps": 20, "eval_every_steps": 4},
                             data={"num_workers": workers}, checkpoint={"resume": resume, "every_n_steps": 5})
        engine = TrainingEngine(config, RegressionTask(config), data_module=AugmentedData(config),
                                callbacks=[MetricsLogger(), *callbacks])
        engine.train()
        return engine

    def validations(folder):
        records = map(json.loads, (tmp_path / folder / "run/metrics.jsonl").read_text().splitlines())
        return {r["step"]: r["val_loss"] for r in records if r["split"] == "val"}

    reference = run("ref", workers=2)
    with pytest.raises(CallbackError, match="simulated crash"):
        run("crashed", workers=2, callbacks=[CrashAt(7)])  # saved at step 5
    lengths = []

    class Lengths(Callback):
        def on_epoch_end(self, engine, metrics):
            lengths.append(len(engine.train_loader))

    started = StartedAt()
    resumed = run("crashed", workers=1, resume="auto", callbacks=[Lengths(), started])
    assert started.step == 5 and resumed.step == reference.step == 20
    for (name, w_ref), w in zip(weights(reference.raw_model).items(), weights(resumed.raw_model).values()):
        assert torch.equal(w_ref, w), name
    assert validations("crashed") == validations("ref") and len(validations("ref")) == 6  # steps 4, 8, ..., 20
    assert lengths == [14]  # the resumed epoch's skipped batches count again once it ends


class HalfBatches(SyntheticDataModule):
    """A training loader of the data module's own, batching by half of training.batch_size."""

    def train_dataloader(self, rank, world_size):
        loader, sampler = super().train_dataloader(rank, world_size)
        half = self.config.training.batch_size // 2
        return torch.utils.data.DataLoader(loader.dataset, batch_size=half, sampler=sampler, drop_last=True), sampler


def test_a_loader_batching_otherwise_than_the_config_resumes_mid_epoch_exactly(tmp_path):
    # the resume skips the samples of the loader's own batches, not of training.batch_size ones
    settings = {"training": {"max_steps": 20}, "checkpoint": {"every_n_steps": 5}, "model": {"dropout": 0.1}}
    reference, _ = train(tiny_config(tmp_path / "ref", **settings, data={"module": "tests.training.core.test_loading:HalfBatches"}))
    crashed = tiny_config(tmp_path / "crash", **settings, data={"module": "tests.training.core.test_loading:HalfBatches"})
    with pytest.raises(CallbackError, match="simulated crash"):
        train(crashed, callbacks=[CrashAt(7)])
    started = StartedAt()
    resumed, _ = train(tiny_config(tmp_path / "crash", **{**settings, "checkpoint": {"resume": "auto"}},
                                   data={"module": "tests.training.core.test_loading:HalfBatches"}), callbacks=[started])
    assert started.step == 5 and resumed.step == reference.step == 20
    assert reference.samples_seen == 20 * 8  # the samples its batches held, which throughput figures count
    for (name, w_ref), w in zip(weights(reference.raw_model).items(), weights(resumed.raw_model).values()):
        assert torch.equal(w_ref, w), name


class CachedLoaders(AugmentedData):
    """Loaders built once and handed out again: a later engine of the process gets those of the first."""

    def train_dataloader(self, rank, world_size):
        self.train = getattr(self, "train", None) or super().train_dataloader(rank, world_size)
        return self.train

    def val_dataloader(self, rank, world_size):
        self.val = getattr(self, "val", None) or super().val_dataloader(rank, world_size)
        return self.val


def test_a_second_engine_over_the_loaders_of_the_first_trains_as_the_first(tmp_path):
    # the first engine left its seeding in the loaders (epoch 1 at its end): the second takes it over afresh
    data = CachedLoaders(tiny_config(tmp_path, data={"num_workers": 1}))  # its loaders' workers
    engines = []
    for folder in ("first", "second"):
        config = tiny_config(tmp_path / folder, training={"max_steps": 16}, data={"num_workers": 1})
        engines.append(TrainingEngine(config, RegressionTask(config), data_module=data))
        engines[-1].train()
    for (name, w_first), w in zip(weights(engines[0].raw_model).items(), weights(engines[1].raw_model).values()):
        assert torch.equal(w_first, w), name


def test_a_set_up_that_fails_after_its_loaders_started_workers_leaves_none(tmp_path):
    class FailsValidation(RegressionTask):  # found by the check of the first validation batch, in set-up
        def validation_step(self, batch, model, criterion):
            return model(batch[0]).sum()

    before = set(multiprocessing.active_children())
    config = tiny_config(tmp_path, data={"num_workers": 2})
    engine = TrainingEngine(config, FailsValidation(config))
    with pytest.raises(UsageError, match="validation_step returned Tensor"):
        engine.train()
    assert set(multiprocessing.active_children()) == before


def test_an_engine_kept_after_train_keeps_no_loader_workers(tmp_path):
    """persistent_workers keep a loader's processes between epochs: a sweep that keeps its engines (to compare
    them) kept every run's workers, four each here, until the engines went."""
    before = set(multiprocessing.active_children())
    engines = []
    for folder in ("a", "b"):
        config = tiny_config(tmp_path / folder, training={"max_steps": 16}, data={"num_workers": 2})
        engines.append(TrainingEngine(config, RegressionTask(config)))
        engines[-1].train()  # two epochs, validated twice: the workers were kept between them
        assert set(multiprocessing.active_children()) == before
    assert all(engine.step == 16 for engine in engines)


class ReadOnlyJittered(Jittered):
    def __setattr__(self, name, value):
        if hasattr(self, "base"):
            raise TypeError(f"{type(self).__name__} is read-only")
        super().__setattr__(name, value)


def test_a_data_set_that_takes_no_new_attribute_trains_with_workers_and_is_warned_of_once(tmp_path):
    class ReadOnlyData(SyntheticDataModule):
        def setup(self, stage):
            super().setup(stage)
            self.train_set, self.val_set = ReadOnlyJittered(self.train_set), ReadOnlyJittered(self.val_set)

    config = tiny_config(tmp_path, training={"max_steps": 2}, data={"num_workers": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # as a run shows them: the same warning of the same place once
        metrics = TrainingEngine(config, RegressionTask(config), data_module=ReadOnlyData(config)).train()
    assert metrics["steps"] == 2
    said = [str(w.message) for w in caught if "takes no new attribute" in str(w.message)]
    assert len(said) == 1 and re.match("ReadOnlyJittered takes no new attribute .* not bit for bit", said[0]), said


def seeds_of(folder: Path) -> list[int]:
    """The seeds the batches of a set-up engine's training and validation loader workers are drawn from."""
    config = tiny_config(folder, data={"num_workers": 1})
    engine = TrainingEngine(config, RegressionTask(config))
    engine.setup()
    return [engine.train_loader.batch_sampler.seed, engine.val_loader.batch_sampler.seed]


class ListedValidation(SyntheticDataModule):
    """Validation batches in a list, not a DataLoader: any iterable with a length will do."""

    def val_dataloader(self, rank, world_size):
        loader, sampler = super().val_dataloader(rank, world_size)
        return list(loader), sampler


def test_a_validation_loader_that_is_no_dataloader_validates(tmp_path):
    config = tiny_config(tmp_path / "listed", training={"max_steps": 2})
    metrics = TrainingEngine(config, RegressionTask(config), data_module=ListedValidation(config)).train()
    _, loaded = train(tiny_config(tmp_path / "loaded", training={"max_steps": 2}))  # the same batches, loaded
    assert metrics["val_loss"] == loaded["val_loss"]


def test_the_seeds_of_loader_workers_batches_are_the_same_in_every_process(tmp_path):
    # a resume is another process, with another hash key for str: seeds mixed from a str would differ there
    code = ("import json, sys\nfrom pathlib import Path\nfrom tests.training.core.test_loading import seeds_of\n"
            "print(json.dumps(seeds_of(Path(sys.argv[1]))))")
    key = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"  # not this process's
    there = subprocess.run([sys.executable, "-c", code, str(tmp_path / "there")], capture_output=True, text=True,
                           check=True, cwd=REPO, env={**os.environ, "PYTHONHASHSEED": key}).stdout
    here = seeds_of(tmp_path / "here")
    assert json.loads(there) == here and len(set(here)) == 2
