"""Trains like llm/training/train.py and also saves each rank's final weights (for tests)."""

import os
import sys

import torch

from llm.training.core import distributed as D
from llm.training.core.callbacks import Callback
from llm.training.core.config import Config
from llm.training.core.engine import TrainingEngine
from llm.training.core.registry import resolve_task
from llm.training.train import default_callbacks


class SaveWeights(Callback):
    def on_train_end(self, engine, metrics):
        torch.save(engine.raw_model.state_dict(), engine.run_dir / f"weights_rank{engine.rank}.pt")


if __name__ == "__main__":
    config = Config.from_args_and_env(sys.argv[1:])
    rank, world_size, local_rank = D.env_ranks()
    D.init_process_group(config, rank, world_size, local_rank)
    task = resolve_task(config.task)(config)
    TrainingEngine(config, task, rank, world_size, callbacks=[*default_callbacks(config), SaveWeights()]).train()
    D.destroy_process_group()
    os._exit(0)
