"""What a run must restore to continue exactly where it stopped: random streams and data position."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


class ResumableSampler:
    """Stands between a DataLoader's BatchSampler and its sampler to skip indices already trained on.

    Skipping indices costs nothing, unlike replaying batches through the loader.
    """

    def __init__(self, sampler: Any):
        self.sampler, self.skip = sampler, 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return len(self.sampler) - self.skip

    @classmethod
    def install(cls, loader: Any, sampler: Any) -> ResumableSampler | None:
        batch_sampler = getattr(loader, "batch_sampler", None)
        if batch_sampler is None or getattr(batch_sampler, "sampler", None) is not sampler:
            return None
        wrapper = cls(sampler)
        batch_sampler.sampler = wrapper
        return wrapper


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
