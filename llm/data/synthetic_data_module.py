"""SyntheticDataModule: a noisy linear regression data set made from the run's seed."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from llm.data.data_module import BaseDataModule


class SyntheticDataModule(BaseDataModule):
    """``y = x @ w + b + noise``, with ``x ~ N(0, 1)``; the same seed gives the same data everywhere."""

    def prepare_data(self) -> None:
        pass  # generated in memory: nothing to download or cache

    def setup(self, stage: str | None = None) -> None:
        d, seed = self.config.data, self.config.training.seed
        g = torch.Generator().manual_seed(seed)
        # the function first: the same for any number of samples (a learning curve over data.num_samples)
        w = torch.randn(d.input_dim, 1, generator=g)
        b = torch.randn(1, generator=g)
        x = torch.randn(d.num_samples, d.input_dim, generator=g)
        y = x @ w + b + d.noise * torch.randn(d.num_samples, 1, generator=g)
        n_val = max(1, int(d.num_samples * d.val_fraction))
        self.train_set = TensorDataset(x[n_val:], y[n_val:])
        self.val_set = TensorDataset(x[:n_val], y[:n_val])
        # as many test samples as validation ones, drawn after the rest: the training and validation data are
        # what they were before there was a test split
        x_test = torch.randn(n_val, d.input_dim, generator=g)
        self.test_set = TensorDataset(x_test, x_test @ w + b + d.noise * torch.randn(n_val, 1, generator=g))

    def train_dataloader(self, rank: int, world_size: int) -> tuple[DataLoader, DistributedSampler]:
        return self.build_dataloader(self.train_set, rank, world_size, train=True)

    def val_dataloader(self, rank: int, world_size: int) -> tuple[DataLoader, DistributedSampler]:
        return self.build_dataloader(self.val_set, rank, world_size, train=False)

    def test_dataloader(self, rank: int, world_size: int) -> tuple[DataLoader, DistributedSampler]:
        return self.build_dataloader(self.test_set, rank, world_size, train=False)
