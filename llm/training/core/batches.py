"""Batches as the loaders yield them: tensors in lists, tuples, named tuples, mappings and dataclasses."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch


def batch_len(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor that has one, at any depth (1 if none)."""
    found = _first_dim(batch)
    return 1 if found is None else found


def _first_dim(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim else None
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else \
        _fields(batch).values()
    for item in items:  # past names, ids and scalars: a list of strings is no count of samples
        found = _first_dim(item)
        if found is not None:
            return found
    return None


def on_device(batch: Any, device: torch.device) -> Any:
    """``batch`` on ``device``: on the CPU as it is (loaders yield CPU tensors), else ``moved_to`` it."""
    return batch if device.type == "cpu" else moved_to(batch, device)


def moved_to(batch: Any, device: torch.device) -> Any:
    """``batch`` with its tensors on ``device``, in lists, tuples, named tuples, mappings and dataclasses at any
    depth."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple takes its fields one by one
        return type(batch)(*(moved_to(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(moved_to(b, device) for b in batch)
    if isinstance(batch, Mapping):  # a dict, or a UserDict such as transformers' BatchEncoding
        moved = {k: moved_to(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)
        except TypeError:  # a mapping that is not built from a dict (defaultdict): a plain one
            return moved
    if fields := _fields(batch):  # a dataclass: a copy with its fields moved, __init__ and __post_init__ not run
        moved = copy.copy(batch)  # again (one that transforms its inputs would do it twice)
        for name, value in fields.items():
            object.__setattr__(moved, name, moved_to(value, device))  # a frozen dataclass's too
        return moved
    return batch


def _fields(batch: Any) -> dict[str, Any]:
    """The fields of a dataclass batch that are set, by name, in order; empty for anything else."""
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch) if hasattr(batch, f.name)}
    return {}
