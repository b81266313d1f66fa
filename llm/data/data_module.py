"""BaseDataModule: where a task's data comes from, split and batched per rank."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from llm.errors import UsageError
from llm.training.core.config import Config


class BaseDataModule(ABC):
    """Subclass and implement the four abstract methods below; test_dataloader is optional.

    The engine calls ``prepare_data()`` on one process per node while the others
    wait, then ``setup()`` on every process, then asks for the loaders.
    """

    def __init__(self, config: Config):
        self.config = config

    @abstractmethod
    def prepare_data(self) -> None:
        """Download, tokenize or otherwise prepare raw data (once per node)."""

    @abstractmethod
    def setup(self, stage: str | None = None) -> None:
        """Load and split the prepared data (on every process)."""

    @abstractmethod
    def train_dataloader(self, rank: int, world_size: int) -> tuple[DataLoader, DistributedSampler]:
        """The training loader for this rank and the sampler that shards it."""

    @abstractmethod
    def val_dataloader(self, rank: int, world_size: int) -> tuple[DataLoader, DistributedSampler]:
        """The validation loader for this rank and the sampler that shards it."""

    def test_dataloader(self, rank: int, world_size: int) -> tuple[DataLoader, DistributedSampler]:
        """Optional: the test loader, held out of training and validation, which ``python -m llm.evaluate
        --split test`` scores after ``setup("test")``; training never reads it."""
        raise UsageError(f"{type(self).__name__} has no test split: define test_dataloader(rank, world_size) "
                         f"(built in setup(\"test\")), or score the validation split with --split val")

    def build_dataloader(
        self, dataset: Dataset, rank: int, world_size: int, train: bool, collate_fn: Callable | None = None,
        sampler_class: type[DistributedSampler] = DistributedSampler,
    ) -> tuple[DataLoader, DistributedSampler]:
        """A sharded loader: shuffled with the run's seed and full batches only when training.

        ``sampler_class`` is the training loader's sampler: a DistributedSampler
        whose ``set_epoch`` the engine calls at each epoch's start.

        Refuses a data set too small to give every rank one batch, since a rank
        with no batches would leave the others waiting in a collective.
        """
        batch_size = self.config.training.batch_size
        stream = isinstance(dataset, torch.utils.data.IterableDataset)  # a length of its own does not index it
        if stream or not hasattr(dataset, "__len__"):  # the sampler shards, and resuming counts, items by index
            what = "is an IterableDataset" if stream else "has no __len__"
            raise UsageError(f"{type(self).__name__}: build_dataloader needs a data set with a length and items by "
                             f"index; {type(dataset).__name__} {what} (a stream needs a DataLoader of the data "
                             f"module's own)")
        size = len(dataset)  # type: ignore[arg-type]
        if train and size == 0:  # no batch size or process count would help
            raise UsageError(f"the training set of {type(self).__name__} is empty: give it more data (the built-in "
                             f"data modules: a larger data.num_samples or a smaller data.val_fraction)")
        if train and size < batch_size * world_size:
            raise UsageError(
                f"the training set has {size} samples, fewer than one batch per rank "
                f"({batch_size} x {world_size} ranks): lower training.batch_size or use fewer processes"
            )
        if not train and 0 < size < world_size:  # none at all: a run without validation
            raise UsageError(f"the validation set has {size} samples, fewer than the {world_size} ranks")
        sampler = (sampler_class if train else ShardSampler)(
            dataset, num_replicas=world_size, rank=rank, shuffle=train,
            seed=self.config.training.seed, drop_last=train,
        )
        # batches in page-locked memory copy to a GPU faster; a run on the CPU of a GPU machine pins none, which
        # would start CUDA (a context on the GPU) in every process for nothing
        pinned = self.config.training.device != "cpu" and torch.cuda.is_available()
        loader = DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, drop_last=train,
            num_workers=self.config.data.num_workers, pin_memory=pinned,
            persistent_workers=self.config.data.num_workers > 0, collate_fn=collate_fn,
        )
        return loader, sampler


class ShardSampler(DistributedSampler):
    """Rank r's items r, r + world_size, r + 2 * world_size, ...: each item on one rank, none repeated.

    For validation: DistributedSampler pads the last ranks' shares with items
    other ranks have, and a mean over ranks would count those twice.
    """

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))  # type: ignore[arg-type]
