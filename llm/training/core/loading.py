"""Reading the loaders exactly: the training batches of each epoch or stream in groups of grad_accum_steps,
going on mid-epoch where a checkpoint stood; validation batches every rank agrees on; the seed each batch and
each loader iterator draws from, and this process's random streams, which a checkpoint keeps."""

from __future__ import annotations

import contextlib
import copy
import itertools
import random
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler

from llm.errors import UsageError
from llm.training.core import distributed as D
from llm.training.core.checks import checkpointable
from llm.training.core.signals import leave_stop_signals

SETUP_STREAM, TRAIN_STREAM, VAL_STREAM, LOADER_STREAM, RANK_STREAM = 1, 2, 3, 4, 5
"""What the seeds made from training.seed are for: the data module's set-up, the training and validation batches
loader workers load, the generator of each loader iterator, and each rank's own draws beside them (dropout and
the like): each a stream of its own."""


class TrainingBatches:
    """The training loader's batches in groups of grad_accum_steps micro-batches, an epoch at a time (``groups``).

    A sized loader's epoch resumed mid-way starts after the batches it trained on: its sampler skips their
    indices (ResumableSampler), or, a loader that cannot skip, reads them again. A stream's epoch ends where
    any rank's stream does. Batches its workers load draw from seeds of their own (SeededBatches), and each
    iterator from a generator of its own (``iterate``): a resumed run reads what the run that never stopped
    read. ``name``: the data module's class, which a refusal names; ``warned``: the context its warnings are
    given in (said once, by rank 0, where every rank meets them alike).
    """

    def __init__(self, loader: Any, sampler: Any, seed: int, grad_accum_steps: int, max_steps: int, rank: int,
                 world_size: int, name: str, warned: Callable[[], contextlib.AbstractContextManager]):
        self.loader, self.sampler, self.seed, self.group_size = loader, sampler, seed, grad_accum_steps
        self.rank, self.world_size, self.name, self.warned = rank, world_size, name, warned
        self.wait_s = 0.0  # time spent waiting for the loader: read by ThroughputMonitor
        # a stream's: where its loader stood after the last group yielded, which a checkpoint keeps
        self.loader_state: dict[str, Any] | None = None
        self._restored = False  # a stream's loader put back where a checkpoint's stood, to go on from
        self._read_ahead_rng: dict[str, Any] | None = None  # the host's random streams its first read draws from
        self.resumable = ResumableSampler.install(loader, sampler)
        # the batch seeds (SeededBatches.install), which the engine gives both loaders before their workers start
        batch_sampler = getattr(loader, "batch_sampler", None)
        self.seeded = batch_sampler if isinstance(batch_sampler, SeededBatches) else None
        self.stream = is_stream(loader)
        self.length = None if self.stream else len(loader)  # batches an epoch; a stream's is known when it ends
        dataset = getattr(loader, "dataset", None)
        if self.stream and getattr(loader, "persistent_workers", False) and \
                callable(getattr(dataset, "set_epoch", None)):
            with warned():
                warnings.warn(f"the stream's loader keeps its workers (persistent_workers=True): the copies of "
                              f"{type(dataset).__name__} they made at the first pass do not see set_epoch, and a "
                              f"resumed run's, made at its first pass, do; build the loader without it")
        if self.stream and not max_steps:
            raise UsageError(f"{name}.train_dataloader() is a stream (an IterableDataset, or no length): set "
                             f"training.max_steps, the steps the schedule spans; each pass over it is an epoch")
        if not self.stream and not hasattr(sampler, "set_epoch"):
            raise UsageError(f"{name}.train_dataloader() returned the sampler {type(sampler).__name__}, expected one "
                             f"with set_epoch, such as the DistributedSampler of self.build_dataloader(...): it "
                             f"shards each epoch across ranks, reshuffles it and resumes it mid-epoch")
        if self.length is not None and self.length < grad_accum_steps:
            raise UsageError(f"one epoch has {self.length} batches per rank, fewer than "
                             f"training.grad_accum_steps={grad_accum_steps}: lower it or the batch size")

    def set_epoch(self, epoch: int) -> None:
        """A new shuffle each epoch, the same on every rank; a stream's sampler or data set takes the epoch if it
        can (set_stream_epoch)."""
        if self.stream:
            set_stream_epoch(self.loader, self.sampler, epoch)
        else:
            self.sampler.set_epoch(epoch)

    def groups(self, epoch: int, batch_in_epoch: int) -> Iterator[tuple[list[Any], bool]]:
        """Groups of grad_accum_steps micro-batches of ``epoch``, starting after the ``batch_in_epoch`` it trained
        on, each with whether it is the epoch's last full group."""
        k = self.group_size
        if self.seeded is not None:
            self.seeded.epoch = epoch
        if self.stream:
            yield from self._stream_groups(epoch, batch_in_epoch)
            return
        if self.resumable is not None:  # set before the iterator starts: workers draw indices at once
            # the loader's own batches, which batch_in_epoch counts (a data module's loader may batch otherwise)
            self.resumable.skip = batch_in_epoch * self.loader.batch_sampler.batch_size
        left = len(self.loader)  # the skipped batches are not counted
        batches = iterate(self.loader, self.seed, self.rank, -1 - epoch)
        if self.resumable is None and batch_in_epoch:  # a loader we cannot fast-forward: replay it
            with self.warned():
                warnings.warn("the training loader's batch sampler is not torch's own BatchSampler over its sampler: "
                              "replaying batches to resume mid-epoch")
            batches = itertools.islice(batches, batch_in_epoch, None)
            left -= batch_in_epoch
        group: list[Any] = []
        try:
            while True:
                waited = time.perf_counter()
                batch = next(batches, _END)
                self.wait_s += time.perf_counter() - waited
                if batch is _END:
                    break
                group.append(batch)
                if len(group) == k:
                    left -= k
                    yield group, left < k
                    group = []
            # a last group shorter than k is dropped, like a last partial batch
        finally:  # also when the epoch's last step or a stop closes this generator at its yield
            if self.resumable is not None:
                self.resumable.skip = 0  # the loader its whole length again, for callbacks and the next epoch

    def _stream_groups(self, epoch: int, batch_in_epoch: int) -> Iterator[tuple[list[Any], bool]]:
        """Groups of k micro-batches of a stream, each with whether it is the epoch's last: a rank's stream has
        run out after it.

        Each group is yielded once the next one is read and the ranks agree (a host all-reduce) whether every
        one of them has it: a rank that stepped alone would wait in the gradients' all-reduce forever, and the
        epoch's end is known at its last step, as a sized loader's is. A resumed epoch goes on where its loader
        stood (one of its own that keeps its place, ``state_dict``/``load_state_dict``, such as torchdata's
        StatefulDataLoader: its state before the group read ahead is what a checkpoint keeps), else after the
        batches it had trained on, read again and dropped.
        """
        k = self.group_size
        batches = iterate(self.loader, self.seed, self.rank, -1 - epoch)
        if batch_in_epoch and not self._restored:
            with self.warned():
                warnings.warn(f"replaying the {batch_in_epoch} batches of the stream that epoch {epoch} trained on "
                              f"to resume after them (a loader with state_dict and load_state_dict, such as "
                              f"torchdata's StatefulDataLoader, resumes where it stood)")
            batches = itertools.islice(batches, batch_in_epoch, None)
        self._restored = False
        keeps_place = keeps_its_place(self.loader)

        def read() -> tuple[list[Any], bool]:
            waited = time.perf_counter()
            group = list(itertools.islice(batches, k))
            self.wait_s += time.perf_counter() - waited
            short = len(group) < k  # a last group shorter than k is dropped, like a last partial batch
            return group, D.any_rank([short])[0] if self.world_size > 1 else short

        if self._read_ahead_rng is None:
            group, ended = read()
        else:  # read again as the saved run read it, before its last step drew; then on from where that step left
            after, host = rng_state(torch.device("cpu")), torch.device("cpu")
            set_rng_state(self._read_ahead_rng, host)
            group, ended = read()
            set_rng_state(after, host)
            self._read_ahead_rng = None
        if ended and not batch_in_epoch:  # every rank: the agreement says the same
            raise UsageError(f"{self.name}.train_dataloader() gave no "
                             f"{'batch' if k == 1 else f'{k} batches (training.grad_accum_steps)'} in epoch "
                             f"{epoch}{' on some rank' if self.world_size > 1 else ''}: a stream must "
                             f"yield batches on every rank, each time it is iterated")
        while not ended:
            self.loader_state = self._loader_state() if keeps_place else None
            following, ended = read()
            yield group, ended
            group = following

    def _loader_state(self) -> dict[str, Any]:
        """Where the stream's loader stands, as a checkpoint keeps it: with its worker count, which its state
        holds one part for each of; and, without workers, the host's random streams as they stand before the
        read ahead, which a stream reading in this process draws from (_stream_groups)."""
        state = copy.deepcopy(checkpointable(self.loader.state_dict(), f"{type(self.loader).__name__}.state_dict()"))
        workers = getattr(self.loader, "num_workers", 0)
        rng = {} if workers else {"rng": rng_state(torch.device("cpu"))}
        return {"state": state, "num_workers": workers, **rng}

    def restore(self, saved: dict[str, Any]) -> None:
        """Put the stream's loader back where it stood when ``saved`` was its ``loader_state``, if it keeps its
        place; with another worker count, whose state has other parts, or a loader that cannot take it, the
        epoch's batches are read again instead."""
        if not keeps_its_place(self.loader):
            return
        workers = getattr(self.loader, "num_workers", 0)
        if saved["num_workers"] != workers:
            with self.warned():
                warnings.warn(f"the stream's loader was saved with {saved['num_workers']} worker(s), not {workers}: "
                              f"its state is not put back")
            return
        self.loader.load_state_dict(saved["state"])
        self._restored = True
        self._read_ahead_rng = saved.get("rng")  # absent from checkpoints of earlier versions


def iterate(loader: Any, seed: int, rank: int, salt: int) -> Iterator[Any]:
    """An iterator over a loader that leaves the global RNG alone.

    Starting a DataLoader iterator draws a worker seed from the global torch RNG
    unless the loader has its own generator; that draw would shift dropout's
    random stream by where a resumed run happened to start. A generator seeded
    from (seed, rank, salt) keeps it off the global stream and reproducible.
    """
    if isinstance(loader, torch.utils.data.DataLoader):
        loader.generator = torch.Generator().manual_seed(mixed_seed(seed, rank, LOADER_STREAM, salt))
    return iter(loader)


def validation_batches(loader: Any, seed: int, rank: int, step: int, limit: int | None,
                       sharded: bool) -> Iterator[tuple[Any, bool]]:
    """This rank's validation batches at ``step`` (``limit`` of them, if set), each with whether it counts.

    The validation sampler repeats no item, so ranks can have a batch more or less. Under FSDP (``sharded``)
    each forward gathers the weights with collectives that every rank must join: there the ranks agree before
    each batch (a host all-reduce) whether any still has one, and a rank that has run out repeats its last
    batch, which counts for nothing.
    """
    batches = itertools.islice(iterate(loader, seed, rank, 1 + step), limit)
    if not sharded:
        yield from ((batch, True) for batch in batches)
        return
    last = _END
    while True:
        batch = next(batches, _END)
        more, stranded = D.any_rank([batch is not _END, batch is _END and last is _END])
        if not more:
            return
        if stranded:  # a loader of its own that gives some rank no batch at all
            raise UsageError("a rank has no validation batch where others have some: under FSDP every rank "
                             "must make as many forwards; give every rank validation data")
        yield (last, False) if batch is _END else (batch, True)
        last = last if batch is _END else batch


class ResumableSampler:
    """Stands between a DataLoader's BatchSampler and its sampler to skip indices already trained on.

    Skipping indices costs nothing, unlike replaying batches through the loader.
    TrainingBatches sets ``skip`` before each epoch's iterator starts.
    """

    def __init__(self, sampler: Any):
        self.sampler, self.skip = sampler, 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return len(self.sampler) - self.skip

    @classmethod
    def install(cls, loader: Any, sampler: Any) -> ResumableSampler | None:
        """Put a ResumableSampler under ``loader``'s BatchSampler, if it is torch's own over ``sampler``; the one
        an earlier engine of this process put there, if there is one. None for any other loader: a batch sampler
        of its own may read ahead (buckets by length), so skipping whole batches' indices would not resume it."""
        batch_sampler = getattr(loader, "batch_sampler", None)
        if type(batch_sampler) not in (BatchSampler, SeededBatches):
            return None
        inner = batch_sampler.sampler
        if isinstance(inner, ResumableSampler) and inner.sampler is sampler:
            inner.skip = 0
            return inner
        if inner is not sampler:
            return None
        wrapper = cls(sampler)
        batch_sampler.sampler = wrapper
        return wrapper


def is_stream(loader: Any) -> bool:
    """Whether a training loader is a stream, whose batches are counted as they come: one over an
    IterableDataset (a length it may have is a guess), or one of no length."""
    if isinstance(getattr(loader, "dataset", None), torch.utils.data.IterableDataset):
        return True
    try:
        len(loader)
    except TypeError:
        return True
    return False


def set_stream_epoch(loader: Any, sampler: Any, epoch: int) -> None:
    """Tell a stream the epoch that starts, through its sampler's or its data set's ``set_epoch`` (a Hugging Face
    ``datasets.IterableDataset`` reshuffles its shards by it), if it has one."""
    for owner in (sampler, getattr(loader, "dataset", None)):
        if callable(getattr(owner, "set_epoch", None)):
            owner.set_epoch(epoch)


def keeps_its_place(loader: Any) -> bool:
    """Whether a loader saves and restores where it stands (``state_dict``, ``load_state_dict``), as torchdata's
    StatefulDataLoader does: a stream then resumes without reading again the batches it had trained on."""
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


class SeededBatch(list):
    """A batch's indices, and the seed its random numbers are drawn from in the loader worker that loads it."""

    seed: int


class SeededBatches(BatchSampler):
    """torch's BatchSampler whose batches carry a seed: (``seed``, ``epoch``, the batch's place in the epoch),
    the same in a run that never stopped and in one resumed mid-epoch (over a ResumableSampler, the place
    counts the batches it skips). TrainingBatches sets ``epoch`` before each epoch's iterator starts."""

    seed: int
    epoch: int

    @classmethod
    def install(cls, loader: Any, seed: int) -> SeededBatches | None:
        """Give each batch of ``loader`` a seed, which the worker that loads it draws from (WorkerStart), if it has
        workers and torch's own BatchSampler (or this kind, from an earlier engine of this process); None, leaving
        it as it is, otherwise, with a warning for a data set that takes no new attribute (frozen, read-only)."""
        batch_sampler = getattr(loader, "batch_sampler", None)
        if type(batch_sampler) not in (BatchSampler, cls) or not getattr(loader, "num_workers", 0):
            return None
        if isinstance(loader.dataset, torch.utils.data.IterableDataset):  # a stream: its workers fetch no batch
            return None
        if type(batch_sampler) is BatchSampler:
            if not _takes_attributes(loader.dataset):
                warnings.warn(f"{type(loader.dataset).__name__} takes no new attribute (frozen or read-only): what it "
                              f"draws at random in loader workers comes from each worker's own stream, so a resume "
                              f"goes on from the same samples but not bit for bit")
                return None
            # the loader refuses a new batch sampler once built: this one becomes the seeding kind in place
            batch_sampler.__class__ = cls
        batch_sampler.seed, batch_sampler.epoch = seed, 0
        return batch_sampler

    def __iter__(self) -> Iterator[list[int]]:
        first = self.sampler.skip // self.batch_size if isinstance(self.sampler, ResumableSampler) else 0
        for place, indices in enumerate(super().__iter__(), first):
            batch = SeededBatch(indices)
            batch.seed = mixed_seed(self.seed, self.epoch, place)
            yield batch


class WorkerStart:
    """The worker_init_fn the engine puts on each loader with workers (the loader's own one runs first). In each
    worker:

    - what a data set draws at random in ``__getitem__`` (augmentation) comes from each SeededBatch's seed, set in
      Python's, NumPy's and torch's generators before the batch is loaded. A worker's own streams would run on
      over whichever batches it happens to load, and a resumed run's workers start theirs afresh; a batch's seed
      is the same whichever worker loads it and however many there are. Other batches load as they would.
    - the stop signals a job sends to all its processes are the main process's to act on, by saving a checkpoint
      (SLURM's scancel and systemd send SIGTERM to every process, a terminal's Ctrl-C sends SIGINT to a torchrun
      job's, a hang-up SIGHUP, SLURM's warning of the time limit SIGUSR1): a worker that died of one would fail
      the run wherever it stood, unsaved. SIGINT, SIGHUP and SIGUSR1 are ignored. SIGTERM still ends the worker
      when its parent sends it (the loader ending a worker that does not stop, the interpreter's exit), as
      torch's own handler does: a thread waits for it, with the signal blocked elsewhere, and reads who sent it.
    """

    def __init__(self, then: Callable[[int], None] | None):
        self.then = then

    @classmethod
    def install(cls, loader: Any) -> None:
        """On ``loader``, if it has workers; once (a later engine over the same loader finds it there)."""
        if getattr(loader, "num_workers", 0) and not isinstance(loader.worker_init_fn, cls):
            loader.worker_init_fn = cls(loader.worker_init_fn)

    def __call__(self, worker_id: int) -> None:
        if self.then is not None:
            self.then(worker_id)
        _seed_each_batch(torch.utils.data.get_worker_info().dataset)
        leave_stop_signals()


def _seed_each_batch(dataset: Any) -> None:
    fetch = getattr(dataset, "__getitems__", None) or (lambda indices: [dataset[i] for i in indices])

    def seeded(indices: list[int]) -> list[Any]:
        if isinstance(indices, SeededBatch):  # no worker uses a GPU: its generators need no seeding
            seed_everything(indices.seed, devices=False)
        return fetch(indices)

    # the loader's fetch calls it, with a batch's indices; a data set that refuses it (the engine warned of one
    # that takes no new attribute) keeps the worker's own streams
    with contextlib.suppress(Exception):
        dataset.__getitems__ = seeded


def _takes_attributes(dataset: Any) -> bool:
    """Whether a new attribute can be set on ``dataset`` (WorkerStart sets one in each worker's copy); tried
    and taken back."""
    try:
        dataset._llm_probe = None
        del dataset._llm_probe
    except Exception:  # __slots__, a frozen dataclass, a __setattr__ that refuses
        return False
    return True


def seed_everything(seed: int, devices: bool = True) -> None:
    """Python's, NumPy's and torch's generators; without ``devices``, torch's CPU one alone (torch.manual_seed
    seeds the GPUs' too, lazily, formatting a stack trace each time: 0.2 ms a batch in a loader worker)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if devices:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def mixed_seed(*numbers: int) -> int:
    """One seed from several whole numbers, the same in every process: hash() of ints, and tuples of them, is
    (of a str it is not: Python draws a new hash key per process). CPython's hash(-1) is hash(-2), which gave
    the training loader of epochs 0 and 1 (salts -1 and -2) one seed: -2 is hashed as the tuple (-2,), and
    every other number as itself, so each seed but that one is the one earlier versions drew (a run resumed
    across the change draws its split and batches as it did)."""
    return hash(tuple((n,) if n == -2 else n for n in numbers)) % 2**63


def rank_seed(seed: int, rank: int) -> int:
    """The seed of ``rank``'s own draws (dropout and the like): ``seed`` itself on rank 0, as on one process, and a
    stream of its own on the others, so that rank 1 of seed 0 draws apart from rank 0 of seed 1 (seed + rank did
    not) and from the streams the data draws from."""
    return seed if rank == 0 else mixed_seed(seed, rank, RANK_STREAM)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random streams: Python's, NumPy's, torch's, and on a GPU that of the one it trains on
    (not every visible GPU's: a resume may see fewer, or give this rank another)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    saved = state.get("cuda")
    if saved is None or device.type != "cuda":
        return
    if isinstance(saved, (list, tuple)):  # an earlier version saved every visible GPU's: this rank's is its own
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= len(saved):
            warnings.warn(f"the checkpoint holds the random state of {len(saved)} GPUs, none for cuda:{index}: "
                          f"its random stream (dropout) starts anew")
            return
        saved = saved[index]
    torch.cuda.set_rng_state(saved, device)


_END = object()
