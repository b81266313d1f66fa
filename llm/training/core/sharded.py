"""Writing FSDP checkpoints (``torch.distributed.checkpoint``), and reading them without running code from them.

The stock reader unpickles the ``.metadata`` file with plain :mod:`pickle` and
loads non-tensor entries with ``torch.load(weights_only=False)``: a crafted
checkpoint could run code on resume or export. Here the metadata is unpickled
with an allow-list of the classes ``torch.distributed.checkpoint`` itself
writes, and non-tensor entries load with ``weights_only=True``, as every other
file of a checkpoint does.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from llm.errors import one_line


class ShardedReadError(Exception):
    """A sharded checkpoint that cannot be read; the message is one line."""


class ShardedWriteError(Exception):
    """Shards that could not be written; the message is one line."""


class UnsafeCheckpointError(ShardedReadError):
    """A sharded checkpoint holding something other than tensors, plain data and checkpoint metadata."""


_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # returns one of torch's layout constants by name
    ("torch.distributed.checkpoint.filesystem", _StorageInfo.__name__),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in _ALLOWED
        if module == dcp_metadata.__name__:  # the metadata's own dataclasses and enums, nothing callable else
            allowed = isinstance(getattr(dcp_metadata, name, None), type)
        elif module == "torch":  # dtypes
            allowed = allowed or isinstance(getattr(torch, name, None), torch.dtype)
        if not allowed:
            raise UnsafeCheckpointError(f"the sharded checkpoint metadata names {module}.{name}, which is not "
                                        f"checkpoint metadata: refused, nothing was run")
        return super().find_class(module, name)


def read_metadata(path: Path) -> dcp_metadata.Metadata:
    """The metadata file unpickled against the allow-list, or UnsafeCheckpointError."""
    with open(path, "rb") as stream:
        metadata = _MetadataUnpickler(stream).load()
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise UnsafeCheckpointError(f"the sharded checkpoint metadata holds a {type(metadata).__name__}, "
                                    f"not checkpoint metadata")
    return metadata


class SafeReader(FileSystemReader):
    """A FileSystemReader whose metadata is unpickled against an allow-list."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        metadata = read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _load_bytes_safely(planner: DefaultLoadPlanner, read_item: ReadItem, value: io.BytesIO) -> None:
    # the stock planner reads these with weights_only=False
    loaded = torch.load(value, weights_only=True)
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], loaded)
    else:
        planner.state_dict[read_item.dest_index.fqn] = loaded


class _SafePlanner(DefaultLoadPlanner):
    load_bytes = _load_bytes_safely


class _SafeEmptyPlanner(_EmptyStateDictLoadPlanner):
    load_bytes = _load_bytes_safely


def save(state: dict[str, Any], directory: Path, group: dist.ProcessGroup | None = None) -> None:
    """Write this rank's shards of ``state`` into ``directory``; collective: every rank of ``group`` (default: the
    default group) calls it.

    Raises only this rank's own failure, in one line: an OSError as itself, so that its errno
    reaches the other ranks. A rank whose own part was written returns even when another
    rank's failed: the caller agrees across ranks afterwards, as CheckpointManager.save does.
    """
    try:
        dcp.save(state, checkpoint_id=str(directory), process_group=group)
    except CheckpointException as e:  # a BaseException, holding every rank's failure: `except Exception` misses it
        mine = e.failures.get(dist.get_rank() if dist.is_initialized() else 0)
        if mine is None:
            return
        error = mine[0]
        if isinstance(error, OSError):
            raise error from None
        raise ShardedWriteError(_describe(error)) from None


def load_into(state: dict[str, Any], directory: Path, optional: str | None = None) -> None:
    """Fill ``state`` (laid out as it was saved, sharded as this process group is) from ``directory``.

    ``optional`` is the dotted path of a dict in ``state`` (``"optimizer.state"``)
    whose entries the checkpoint may lack: those are dropped from it, not refused
    (an optimizer's moments of parameters no step had reached when it was saved).
    """
    saved = read_metadata(Path(directory) / ".metadata").state_dict_metadata  # refused here, before torch logs
    if optional is not None:
        entries = state
        for key in optional.split("."):
            entries = entries[key]
        for name in [name for name, values in entries.items()  # torch's keys: the flattened path of each tensor
                     if not any(f"{optional}.{name}.{key}" in saved for key in values)]:
            del entries[name]
    with _one_line_errors(), warnings.catch_warnings():
        # one process reading shards of several (a resume on fewer processes) is what it is for, not a guess
        warnings.filterwarnings("ignore", message="torch.distributed is .*assuming the intent is to load")
        dcp.load(state, storage_reader=SafeReader(str(directory)), planner=_SafePlanner())


def load_whole(directory: Path, keys: set[str] | None = None) -> dict[str, Any]:
    """Everything in ``directory``, or the entries under ``keys`` (``{"model"}``: not the optimizer's moments,
    twice the weights' size with AdamW), gathered into ordinary tensors in this process (no process group
    needed)."""
    read_metadata(Path(directory) / ".metadata")
    state: dict[str, Any] = {}
    with _one_line_errors():
        # the loader under dcp.load, as torch's dcp_to_torch_save calls it: dcp.load fills only keys it is given
        _load_state_dict(state, storage_reader=SafeReader(str(directory)), planner=_SafeEmptyPlanner(keys=keys),
                         no_dist=True)
    return state


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """torch.distributed.checkpoint's CheckpointException (a BaseException, with every rank's traceback)
    as one line about the first failure."""
    try:
        yield
    except CheckpointException as e:
        first = next(iter(e.failures.values()))[0]
        if isinstance(first, pickle.UnpicklingError):
            raise UnsafeCheckpointError("an entry of the sharded checkpoint is not plain data (it would need code "
                                        "to be run to load): refused, nothing was run") from None
        raise ShardedReadError(_describe(first)) from None


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {one_line(error)}"
