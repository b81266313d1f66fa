"""ClassificationDataModule: Gaussian clusters, one per class.

Written against the usage guide alone, as a user would write their own data
module, with the base class's ``build_dataloader`` for its loaders.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from llm.data.data_module import BaseDataModule


class ClassificationDataModule(BaseDataModule):
    def prepare_data(self) -> None:
        pass  # made in memory from the seed

    def setup(self, stage: str | None = None) -> None:
        d = self.config.data
        g = torch.Generator().manual_seed(self.config.training.seed)
        centers = 3.0 * torch.randn(d.num_classes, d.input_dim, generator=g)
        labels = torch.randint(0, d.num_classes, (d.num_samples,), generator=g)
        features = centers[labels] + (1.0 + d.noise) * torch.randn(d.num_samples, d.input_dim, generator=g)
        n_val = max(1, int(d.num_samples * d.val_fraction))
        self.train_set = TensorDataset(features[n_val:], labels[n_val:])
        self.val_set = TensorDataset(features[:n_val], labels[:n_val])
        # drawn after the rest, as many as for validation: training and validation data are as before
        test_labels = torch.randint(0, d.num_classes, (n_val,), generator=g)
        test_features = centers[test_labels] + (1.0 + d.noise) * torch.randn(n_val, d.input_dim, generator=g)
        self.test_set = TensorDataset(test_features, test_labels)

    def train_dataloader(self, rank: int, world_size: int) -> tuple[DataLoader, DistributedSampler]:
        return self.build_dataloader(self.train_set, rank, world_size, train=True)

    def val_dataloader(self, rank: int, world_size: int) -> tuple[DataLoader, DistributedSampler]:
        return self.build_dataloader(self.val_set, rank, world_size, train=False)

    def test_dataloader(self, rank: int, world_size: int) -> tuple[DataLoader, DistributedSampler]:
        return self.build_dataloader(self.test_set, rank, world_size, train=False)
