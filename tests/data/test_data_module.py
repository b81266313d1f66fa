import pytest
import torch

from llm.data.synthetic_data_module import SyntheticDataModule
from tests.helpers import tiny_config


@pytest.mark.parametrize("device, pinned", [("auto", True), ("cuda", True), ("cpu", False)])
def test_batches_are_pinned_only_for_a_run_on_a_gpu(device, pinned, tmp_path, monkeypatch):
    # on a GPU machine (as far as the loader can tell), a run on its CPU starts no CUDA context for pinning
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    data = SyntheticDataModule(tiny_config(tmp_path, training={"device": device}))
    data.setup("fit")
    loader, _ = data.train_dataloader(0, 1)
    assert loader.pin_memory is pinned
