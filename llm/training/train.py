"""Entry point: parse the config, build task, data and callbacks, run the engine.

The same file serves ``python -m llm.training.train`` and
``torchrun --nproc_per_node=N llm/training/train.py``.

Exit codes: 0 done; 2 bad input (one line on stderr); 3 stopped on a
non-finite loss (training.nan_policy=stop); 128+signal when SIGTERM or SIGINT
stopped the run after saving a checkpoint (143, 130).
"""

from __future__ import annotations

import sys
import warnings

from llm.errors import EXIT_USAGE, UsageError
from llm.training.core import distributed as D
from llm.training.core.callbacks import (
    Callback,
    EarlyStopping,
    LRSchedulerCallback,
    MetricsLogger,
    ProgressBar,
    TensorBoardLogger,
)
from llm.training.core.config import Config
from llm.training.core.engine import NonFiniteError, TrainingEngine, TrainingInterrupted
from llm.training.core.registry import resolve_data_module, resolve_task

EXIT_NON_FINITE = 3


def default_callbacks(config: Config) -> list[Callback]:
    return [
        MetricsLogger(),
        EarlyStopping(monitor=config.checkpoint.monitor, patience=config.training.patience, mode=config.checkpoint.mode),
        TensorBoardLogger(log_dir=config.logging.log_dir),
        LRSchedulerCallback(),
        ProgressBar(enabled=config.logging.progress_bar),
    ]


def train_worker(rank: int, world_size: int, config: Config) -> dict[str, float]:
    """Train on this process; the process group must already exist when world_size > 1."""
    task = resolve_task(config.task)(config)
    data_module = resolve_data_module(config.data.module or task.default_data_module)(config)
    engine = TrainingEngine(
        config,
        task,
        rank,
        world_size,
        data_module=data_module,
        callbacks=default_callbacks(config),
    )
    return engine.train()


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    try:
        config = Config.from_args_and_env(argv)
        rank, world_size, local_rank = D.env_ranks()
        D.init_process_group(config, rank, world_size, local_rank)
        try:
            train_worker(rank, world_size, config)
        finally:
            D.destroy_process_group()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NON_FINITE
    except TrainingInterrupted as e:
        print(f"{e}; continue with --checkpoint-resume auto", file=sys.stderr)
        return 128 + e.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
