"""Checkpoints that a crash can never leave half-written but trusted.

A checkpoint is a directory ``<dir>/step_00000100/`` holding ``state.pt`` (shared
state, rank 0), ``rank_00000.pt``... (one per rank), any extra files rank 0 writes,
and ``manifest.json`` (sizes and sha256 of every file). It is built in a hidden
staging directory and renamed into place only after the manifest is on disk, so a
``step_*`` directory without a valid manifest is never trusted. ``<dir>/latest``
names the checkpoint of the last completed save, ``<dir>/best`` the one with the
best monitored score; tools take either file for the checkpoint it names.

All ranks must see the same directory (a shared filesystem on multi-node jobs).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import yaml

from llm.errors import UsageError, causes, one_line
from llm.files import CHECKPOINT_MANIFEST, CHECKPOINT_STATE, fsync, write_atomically
from llm.training.core import distributed as D

MANIFEST = CHECKPOINT_MANIFEST
SHARED = CHECKPOINT_STATE
SHARDED = "sharded"
"""Folder of torch.distributed.checkpoint shards, in checkpoints of FSDP runs."""
LATEST = "latest"
BEST = "best"
"""Beside ``latest``: the name of the checkpoint with the best monitored score, while one is kept for it."""
POINTERS = (LATEST, BEST)
DROPPED = "dropped"
"""The subfolder of a run's checkpoint folder that keeps the checkpoints of a continuation the run went back on."""
_T = TypeVar("_T")
_STEP_DIR = re.compile(r"step_(\d{8,})")
_SCRATCH_PREFIXES = (".staging-", ".trash-")
_PRUNED = ".pruned-"
"""Prefix of an old checkpoint while retention deletes it: gone from readers at once, not file by file."""
_CHUNK = 1 << 20
_UNKNOWN = 1 << 20  # failure code for errors that carry no errno


class CheckpointError(UsageError):
    """A checkpoint that cannot be saved, found, trusted or loaded."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


class CheckpointManager:
    """Saves checkpoints of one run into ``directory`` and prunes old ones."""

    def __init__(self, directory: str | Path, rank: int = 0, world_size: int = 1, keep_last: int = 3,
                 monitor: str = "val_loss", mode: str = "min", keep_best: int = 1,
                 group: dist.ProcessGroup | None = None):
        """``group``: the gloo group of all ranks that saves agree over (distributed.background_group), for saves
        made on a thread of their own while the main thread makes collectives of its own (None: the hosts')."""
        if keep_last < 1:
            raise CheckpointError(f"keep_last: got {keep_last!r}, expected an int >= 1")
        if keep_best < 0:
            raise CheckpointError(f"keep_best: got {keep_best!r}, expected an int >= 0")
        if mode not in ("min", "max"):
            raise CheckpointError(f"mode: got {mode!r}, expected 'min' or 'max'")
        if not 0 <= rank < world_size:
            raise CheckpointError(f"rank: got {rank!r}, expected 0 <= rank < world_size ({world_size})")
        self.directory = Path(directory)
        self.rank, self.world_size = rank, world_size
        self.keep_last, self.keep_best, self.monitor, self.mode = keep_last, keep_best, monitor, mode
        self.group = group

    def save(self, step: int, shared: dict, per_rank: dict, metrics: dict[str, float] | None = None,
             write_extra: Callable[[Path], None] | None = None,
             write_sharded: Callable[[Path], None] | None = None) -> Path:
        """Called on EVERY rank at the same step. Returns the final checkpoint path.

        ``write_extra(staging)`` runs on rank 0; ``write_sharded(staging)`` on every rank, first,
        for collective writers such as torch.distributed.checkpoint.
        """
        if self._distributed() and dist.get_world_size() != self.world_size:
            raise CheckpointError(f"world_size is {self.world_size} but the process group has "
                                  f"{dist.get_world_size()} ranks")
        final = self.directory / step_name(step)
        staging = self.directory / f".staging-{final.name}"

        error = None
        if self.rank == 0:
            error = _attempt(lambda: self._prepare(staging))
        # doubles as the barrier: no rank writes before the staging directory exists
        self._agree(error, staging, "preparing")

        def write() -> None:
            if write_sharded is not None:  # collective: every rank enters it before any rank-0-only work
                write_sharded(staging)
            if self.rank == 0:
                _save_torch(shared, staging / SHARED)
                if write_extra is not None:
                    write_extra(staging)
            _save_torch(per_rank, staging / rank_file(self.rank))
        self._agree(_attempt(write), staging, "writing")

        # every file is in place (the agreement is a barrier): the ranks hash them together, each its share
        share: dict[str, dict] = {}
        self._agree(_attempt(lambda: share.update(self._hash_share(staging))), staging, "hashing")
        parts = D.gather(share, self.group) if self._distributed() else [share]  # one rank's manager: its own
        hashed = {name: entry for part in parts for name, entry in part.items()}
        error = None
        if self.rank == 0:
            error = _attempt(lambda: self._commit(step, staging, final, metrics or {}, hashed))
        # no rank returns before the checkpoint is in place (or every rank raises)
        self._agree(error, staging, "committing")
        self.retain(keep=final)  # after the agreement: the new checkpoint is saved, whatever pruning runs into
        return final

    def latest_valid(self) -> Path | None:
        """The checkpoint of the last completed save, or the newest valid one; None if there are none.

        Raises CheckpointError when there are checkpoints but none is valid: a run that started
        over instead would write over them and over the run they belong to.
        """
        self._restore_replaced()
        found, seen = _newest_valid(self.directory)
        if found is None and seen:
            raise CheckpointError(
                f"no valid checkpoint in {self.directory} ({seen} found, none valid): resume from one you trust "
                f"with --checkpoint-resume PATH, or start a new run with --logging-log-dir DIR"
            )
        return found

    def set_aside_after(self, step: int) -> list[Path]:
        """Move this folder's checkpoints of steps after ``step`` (a run went back to its checkpoint there, or a
        resume passed over damaged ones) into ``dropped/``, once ``latest`` names that one; returns where they
        went. The run saves those steps again: the old ones would mix with its own, be taken by a resume for its
        newest, and push its own out at retention. Kept, not deleted; retention leaves ``dropped/`` alone."""
        self._restore_replaced()  # one of them a save that crashed had moved aside: the next save would put it back
        later = [p for p in _checkpoints(self.directory) if int(p.name[5:]) > step]
        if later:  # first: a run killed part way through goes on from this one, then sets the rest aside
            write_atomically(self.directory / LATEST, step_name(step) + "\n", durable=True)
            if _pointed_at(self.directory / BEST) in {p.name for p in later}:  # the next save names the best again
                (self.directory / BEST).unlink(missing_ok=True)
        moved = []
        for path in later:
            target = self.directory / DROPPED / path.name
            n = 1
            while target.exists():  # gone back to an earlier step before: each continuation's copy is kept
                n += 1
                target = self.directory / DROPPED / f"{path.name}.{n}"
            target.parent.mkdir(exist_ok=True)
            path.rename(target)
            moved.append(target)
        return moved

    # -- save protocol, in the order it runs ------------------------------------------------

    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _prepare(self, staging: Path) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._restore_replaced()
        for entry in self.directory.iterdir():
            if entry.name.startswith(_SCRATCH_PREFIXES):  # left by a save that crashed
                _remove(entry)
        staging.mkdir()

    def _restore_replaced(self) -> None:
        """Put back a checkpoint that a save replacing it had moved aside when it crashed (see ``_commit``)."""
        for trash in self.directory.glob(".trash-step_*") if self.directory.is_dir() else []:
            final = self.directory / trash.name.removeprefix(".trash-")
            if not final.exists() and _check(trash, hashes=True) is None:
                with contextlib.suppress(OSError):  # another rank may have put it back first
                    os.replace(trash, final)

    def _agree(self, error: Exception | None, staging: Path, stage: str) -> None:
        """Raise CheckpointError on every rank if any rank failed; a collective, so also a barrier."""
        # slot r is set only by rank r, so MIN leaves each rank's failure code (a negated errno) in place
        codes = torch.zeros(self.world_size, dtype=torch.int64)
        if error is not None:
            codes[self.rank] = _failure_code(error)
        if self._distributed():
            D.all_reduce_on_hosts(codes, dist.ReduceOp.MIN, self.group)
        failed = [r for r in range(self.world_size) if codes[r] < 0]
        if not failed:
            return
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        reasons = []
        for r in failed:
            if r == self.rank:
                reasons.append(f"rank {r}: {_one_line(_os_error(error) or error)}")
            elif codes[r] == -_UNKNOWN:
                reasons.append(f"rank {r}: failed (see that rank's error)")
            else:
                reasons.append(f"rank {r}: {os.strerror(-int(codes[r]))}")
        name = staging.name.removeprefix(".staging-")
        raise CheckpointError(f"checkpoint {name} not saved ({stage} failed on {'; '.join(reasons)})") from error

    def _hash_share(self, staging: Path) -> dict[str, dict]:
        """Size and sha256 of this rank's share of the files in ``staging``, each file synced to disk too (a
        callback's extra file may not be). Every rank lists the folder and deals the files out, largest first,
        each to the rank with the fewest bytes so far: each rank reads about 1/world_size of the checkpoint
        (FSDP's shards are every rank's), where rank 0 alone would read all of it while the others wait."""
        return {name: {"size": size, "sha256": _sha256(staging / name, sync=True)}
                for name, size in _share(_staged(staging), self.rank, self.world_size)}

    def _commit(self, step: int, staging: Path, final: Path, metrics: dict[str, float],
                hashed: dict[str, dict]) -> None:
        """Write the manifest of the files in ``staging``, whose sizes and hashes the ranks made (``hashed``),
        then move the checkpoint into place. A file no rank hashed, or of another size now (a shared file
        system whose listing or sizes lag on another node), is hashed here."""
        files = {}
        for name, size in _staged(staging):
            entry = hashed.get(name)
            files[name] = entry if entry is not None and entry["size"] == size else \
                {"size": size, "sha256": _sha256(staging / name, sync=True)}
        manifest = {"step": step, "world_size": self.world_size,
                    "metrics": {k: float(v) for k, v in metrics.items()}, "files": files,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_atomically(staging / MANIFEST, json.dumps(manifest, indent=2), durable=True)
        if final.exists():
            # a rename cannot replace a non-empty directory: move the old one aside first (a crash
            # before the second rename leaves it aside, and _restore_replaced puts it back)
            trash = self.directory / f".trash-{final.name}"
            os.replace(final, trash)
            os.replace(staging, final)
            # the new checkpoint is in place: an old copy that cannot be deleted is no failed save (the
            # next save clears it, or says what stops it)
            with contextlib.suppress(OSError):
                _remove(trash)
        else:
            os.replace(staging, final)
        try:  # the checkpoint is in place, whole: what fails from here on does not unmake the save
            fsync(self.directory)
            write_atomically(self.directory / LATEST, final.name + "\n", durable=True)
        except OSError as error:
            # a latest naming an older checkpoint would have a resume take that one and set this one aside:
            # without it, a resume takes the newest valid checkpoint, this one
            try:
                (self.directory / LATEST).unlink(missing_ok=True)
                after = "removed, so that a resume takes the newest valid checkpoint"
            except OSError:
                after = f"nor removed: resume with --checkpoint-resume {final}"
            warnings.warn(f"checkpoint {final.name} saved, but {self.directory / LATEST} not updated "
                          f"({_one_line(error)}): {after}", stacklevel=3)

    def retain(self, keep: Path) -> None:
        """Delete the checkpoints retention does not keep, beside ``keep``; rank 0 alone. Each save does it;
        so does a finished run started again, for one killed between its last save and that pruning."""
        if self.rank == 0:
            self._retain(keep)

    def _retain(self, keep: Path) -> None:
        # sizes, not hashes: rehashing every kept checkpoint at each save would cost as much I/O as
        # the save; checkpoints that fail even this are left alone, never deleted unexamined
        for aside in self.directory.glob(f"{_PRUNED}step_*"):  # what an earlier pruning could not delete
            _delete_pruned(aside)
        complete = [p for p in _checkpoints(self.directory) if _check(p, hashes=False) is None]
        # the best first among equal scores: the earliest, which reached it first
        best = [path for _, path in sorted(self._scored(complete), key=lambda pair: pair[0])][:self.keep_best]
        # named before any pruning: a kill in between leaves the pointer naming a checkpoint that is there
        try:
            if best:
                if _pointed_at(self.directory / BEST) != best[0].name:
                    write_atomically(self.directory / BEST, best[0].name + "\n", durable=True)
            else:  # none kept for its score (no validation yet, keep_best 0): no pointer to a checkpoint pruned later
                (self.directory / BEST).unlink(missing_ok=True)
        except OSError as error:  # the checkpoint is saved: a pointer that cannot be written is a warning
            warnings.warn(f"{self.directory / BEST} not updated ({_one_line(error)}): the next save tries again",
                          stacklevel=4)
        kept = set(complete[-self.keep_last:]) | {keep} | set(best)
        for path in complete:
            if path not in kept:
                _prune(path)

    def _scored(self, paths: list[Path]) -> list[tuple[float, Path]]:
        """(sort key, path) for checkpoints whose manifest has the monitored metric; lowest key is best."""
        sign = 1.0 if self.mode == "min" else -1.0
        scored = []
        for path in paths:
            try:
                value = (_read_manifest(path) or {}).get("metrics", {}).get(self.monitor)
            except PermissionError:  # one this user may not read has no score to keep it by
                continue
            if isinstance(value, (int, float)) and not math.isnan(value):
                scored.append((sign * value, path))
        return scored


class BackgroundSave:
    """Runs one save at a time on a thread of its own, so that training goes on while the checkpoint is
    written, synced and hashed. What it saves must be a copy (``copied_to_cpu``): the step after the save
    changes the live tensors. ``wait()`` joins the save in flight and raises its error, if it failed."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, save: Callable[[], object]) -> None:
        self.wait()

        def run() -> None:
            try:
                save()
            except BaseException as e:  # noqa: BLE001 - raised where wait() is called, on the main thread
                self._error = e
        # a daemon: a process ending in an error it did not wait through is not held up by a save that hangs
        # on a lost rank; the staging folder it leaves is cleared at the next save
        self._thread = threading.Thread(target=run, name="checkpoint-save", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


def copied_to_cpu(state: _T) -> _T:
    """``state`` with every tensor (a DTensor too, as a DTensor) copied into host memory, and the dicts, lists
    and tuples holding them rebuilt; other values are shared, not copied. Tensors that are one view of the same
    memory (tied weights, under each of their names) are copied once, and stay one: saved once, as torch.save
    saves the originals."""
    copies: dict[tuple, torch.Tensor] = {}

    def copied(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            local = value.to_local() if hasattr(value, "to_local") else value  # a DTensor's own part
            if local.layout != torch.strided or not local.untyped_storage().data_ptr():  # sparse; or empty
                return value.detach().to("cpu", copy=True)
            view = (local.untyped_storage().data_ptr(), local.device, local.dtype, local.storage_offset(),
                    tuple(local.shape), local.stride(), local.is_conj(), local.is_neg(), type(value),
                    tuple(value.shape), getattr(value, "placements", None), getattr(value, "device_mesh", None))
            if view not in copies:
                copies[view] = value.detach().to("cpu", copy=True)
            return copies[view]
        if isinstance(value, (dict, list)):
            rebuilt = copy.copy(value)  # of the same type, with its attributes (a module state dict's _metadata)
            for key, item in (value.items() if isinstance(value, dict) else enumerate(value)):
                rebuilt[key] = copied(item)
            return rebuilt
        if isinstance(value, tuple):
            items = [copied(item) for item in value]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        return value
    return copied(state)


def _prune(path: Path) -> None:
    """Delete an old checkpoint, renamed aside first: a tool reading it (a run's checkpoints may be read while
    it trains) then finds it whole or gone, never half deleted. The new checkpoint is committed by then, so
    an old one that cannot be deleted is a warning, not a failed save."""
    aside = path.with_name(_PRUNED + path.name)
    try:
        os.replace(path, aside)
    except OSError as error:
        warnings.warn(f"old checkpoint {path} not deleted ({_one_line(error)}): delete it by hand", stacklevel=4)
        return
    _delete_pruned(aside)


def _delete_pruned(aside: Path) -> None:
    try:
        _remove(aside)  # a symlinked checkpoint too: the link goes, what it names is left alone
    except OSError as error:
        warnings.warn(f"old checkpoint {aside} not deleted ({_one_line(error)}): the next save tries again, "
                      f"or delete it by hand", stacklevel=5)


# -- finding and checking checkpoints ---------------------------------------------------------


def verify(path: str | Path, hashes: bool = True) -> str | None:
    """None if the checkpoint at path is complete and its checksums match (``hashes``; else its files' sizes),
    else the reason (one line). For a checkpoint to load: one this user may not read is refused
    (CheckpointError), not passed over as damaged, since a run resumed from an earlier one would save over it."""
    return _check(Path(path), hashes=hashes, refuse_unreadable=True)


def check_checkpoint_dir(directory: str | Path, fresh: bool) -> None:
    """Refuse, before training, a checkpoint directory that cannot be written, or that holds checkpoints when
    the run is ``fresh`` (saving there would replace and prune another run's checkpoints).

    Creates nothing: a run refused later for another reason leaves no directory behind.
    """
    directory = Path(directory)
    if fresh and _checkpoints(directory):
        raise CheckpointError(
            f"{directory} already holds checkpoints of an earlier run: continue it with --checkpoint-resume auto, "
            f"or give this run another --checkpoint-dir"
        )
    problem = unwritable_reason(directory)
    if problem:
        raise CheckpointError(
            f"cannot write checkpoints to {directory}: {problem}; choose another folder with --checkpoint-dir DIR"
        )


def unwritable_reason(directory: str | Path) -> str | None:
    """Why files could not be created in ``directory`` (made as needed), or None; creates nothing."""
    directory = Path(directory)
    existing = next((p for p in (directory, *directory.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return e.strerror or str(e)
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint at ``path``, the one a folder of checkpoints' ``best`` or ``latest`` file names, or the
    newest valid one in a folder of checkpoints or a run folder."""
    path = Path(path)
    if not path.exists():
        if (path.parent / f".trash-{path.name}").is_dir():  # a save that replaced it stopped between its renames
            raise CheckpointError(f"checkpoint path {path} does not exist: a save that was replacing it stopped, and "
                                  f"left it as {path.parent / ('.trash-' + path.name)}; the run's next save or "
                                  f"resume puts it back")
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if path.is_file() and path.name in POINTERS:
        name = _pointed_at(path)
        if not _STEP_DIR.fullmatch(name):
            raise CheckpointError(f"{path} does not hold a checkpoint's name: give a checkpoint's folder")
        if not (path.parent / name).is_dir():
            raise CheckpointError(f"{path} names {name}, which is not in {path.parent}: give a checkpoint's folder")
        path = path.parent / name
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory")
    if (path / "checkpoints").is_dir() and not (path / MANIFEST).exists():
        path = path / "checkpoints"  # a run directory
    if _STEP_DIR.fullmatch(path.name) or (path / MANIFEST).exists() or (path / SHARED).exists():
        reason = verify(path)
        if reason is not None:
            raise CheckpointError(f"checkpoint {path} is not valid: {reason}")
        return path
    found, seen = _newest_valid(path)
    if found is not None:
        return found
    if seen == 0:
        raise CheckpointError(f"{path} is not a checkpoint and holds no step_* checkpoints{_kept_elsewhere(path)}")
    raise CheckpointError(f"no valid checkpoint in {path} ({seen} found, none valid)")


def read_checkpoint(path: str | Path, read: Callable[[Path], _T], attempts: int = 3) -> _T:
    """``read(resolve_checkpoint(path))``, for tools that may read the checkpoints of a run still saving.

    When ``path`` is a folder of checkpoints or a run folder and the checkpoint taken is deleted while it
    is read (the retention of that run removing it after its next save), the newest one then is read
    instead, up to ``attempts`` times in all. A checkpoint named itself is not swapped for another. A read
    that went well counts only if its checkpoint is still there at its end: a file it found missing (the
    tokenizer of a language model) may have been deleted, not absent; a checkpoint gone stays gone.
    """
    for _ in range(attempts):
        ckpt = resolve_checkpoint(path)
        try:
            read_whole = read(ckpt)
        except Exception:
            if ckpt.is_dir():
                raise
        else:
            if ckpt.is_dir():
                return read_whole
        if ckpt == Path(path):  # named by the user: another checkpoint is not what was asked for
            raise CheckpointError(_deleted(ckpt, f"give its folder {ckpt.parent} to take the newest")) from None
    raise CheckpointError(_deleted(ckpt, f"the newest was taken {attempts} times and deleted each time; run again"))


def _kept_elsewhere(run_dir: Path) -> str:
    """For a run folder whose run kept its checkpoints in a --checkpoint-dir of its own: where, as a hint."""
    try:
        folder = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))["checkpoint"]["dir"]
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError):
        return ""
    if not isinstance(folder, str) or not folder:  # "": the run's own checkpoints/ folder
        return ""
    return f"; its run kept them in {folder} (checkpoint.dir in its config.yaml, from where it was started)"


def load_shared_state(ckpt: Path, map_location="cpu", mmap: bool = False) -> dict:
    """The shared state (model, optimizer, ...) of a checkpoint. ``mmap``: the file mapped, its tensors read only
    when touched, for a reader of the weights alone: copy them out before the file can go (model_weights)."""
    return _load_torch(Path(ckpt) / SHARED, map_location, mmap)


def model_weights(ckpt: Path, shared: dict | None = None) -> dict | None:
    """The model's full state dict from a checkpoint, gathering FSDP shards if it was written sharded; with
    the run's weight average (training.ema_decay) in place of its parameters where it kept one: the weights it
    validated. ``shared``: the checkpoint's shared state when the caller has it already (it is not read again)."""
    ckpt = Path(ckpt)
    if not (ckpt / SHARDED).is_dir():
        if shared is not None:
            return _averaged(shared.get("model"), shared.get("ema"))
        # mapped, not read: of a training checkpoint's state.pt (the weights and the optimizer's moments, 3x the
        # weights under Adam) only the weights are read, copied into memory at once: a checkpoint its run prunes
        # meanwhile (on NFS, from another machine) would fault on a page not read yet
        state = load_shared_state(ckpt, mmap=True)
        return copied_to_cpu(_averaged(state.get("model"), state.get("ema")))
    from llm.training.core import sharded

    try:
        state = sharded.load_whole(ckpt / SHARDED, keys={"model", "ema"})
        return _averaged(state.get("model"), state.get("ema"))
    except Exception as e:  # a damaged or unsafe shard set; verify() catches damage first
        if not ckpt.is_dir():
            raise CheckpointError(_deleted(ckpt)) from None
        raise CheckpointError(f"cannot read the sharded weights in {ckpt}: {error_cause(e)}") from None


def _averaged(weights: dict | None, average: dict | None) -> dict | None:
    return {**weights, **average} if isinstance(weights, dict) and isinstance(average, dict) else weights


def load_weights_strictly(model: torch.nn.Module, state: dict, source: str, than: str = "",
                          assign: bool = False) -> None:
    """``model.load_state_dict(state, strict=True)``, or one line: "<source> belong to a different model<than>: ..."."""
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as e:
        # torch lists every mismatch on its own line: the first one says enough
        details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        first = one_line(details[0] if details else e, 240)
        more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
        raise CheckpointError(f"{source} belong to a different model{than}: {first}{more}") from None


def error_cause(e: BaseException) -> str:
    """An error's message on one line: its innermost cause's, where it was raised from another."""
    while e.__cause__ is not None:
        e = e.__cause__
    return one_line(e)


def load_rank_state(ckpt: Path, rank: int, map_location="cpu") -> dict:
    """The state that ``rank`` saved (RNG states, ...)."""
    return _load_torch(Path(ckpt) / rank_file(rank), map_location)


def _checkpoints(directory: Path) -> list[Path]:
    """step_* directories, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _newest_valid(directory: Path, rescans: int = 2) -> tuple[Path | None, int]:
    """The valid checkpoint `latest` names, else the newest valid one; also how many were looked at.

    A checkpoint deleted meanwhile, by the retention of a run saving newer ones there, is passed over in
    silence, and the folder looked at again (up to ``rescans`` times) if no other one was valid. Each
    checkpoint is checked, and each warning given, once."""
    invalid: dict[Path, str] = {}
    notes: dict[str, None] = {}  # the warnings, in order, each once
    found, candidates = None, []
    for _ in range(rescans + 1):
        candidates = _candidates(directory, notes)
        vanished = False
        for path in candidates:
            reason = invalid.get(path) or verify(path)
            if reason is None:
                found = path
                break
            if path.exists():
                invalid[path] = reason
                notes[f"skipping checkpoint {path}: {reason}"] = None
            else:
                vanished = True
        if found is not None or not vanished:
            break
    for note in notes:
        warnings.warn(note, stacklevel=3)
    return found, len(candidates)


def best_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint a folder of checkpoints' ``best`` file names, where it is there; not verified."""
    name = _pointed_at(Path(directory) / BEST)
    found = Path(directory) / name
    return found if _STEP_DIR.fullmatch(name) and found.is_dir() else None


def _pointed_at(pointer: Path) -> str:
    """What a ``latest`` or ``best`` file holds, stripped; '' where there is none. Any bytes at all: a file
    written over."""
    try:
        return pointer.read_bytes().decode("ascii", errors="replace").strip()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        return ""


def _candidates(directory: Path, notes: dict[str, None]) -> list[Path]:
    """step_* directories, newest first, but the one `latest` names before all; a note if it names none."""
    candidates = _checkpoints(directory)[::-1]
    pointer = directory / LATEST
    if pointer.is_file():
        name = _pointed_at(pointer)
        # only a plain step_* name: the pointer must not lead outside the directory
        if not _STEP_DIR.fullmatch(name):
            notes[f"{pointer} does not hold a checkpoint's name: taking the newest valid checkpoint"] = None
        elif directory / name in candidates:
            candidates.remove(directory / name)
            candidates.insert(0, directory / name)
    return candidates


def _read_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except PermissionError:
        raise  # not damage: _check says so
    except (OSError, ValueError, RecursionError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _check(path: Path, hashes: bool, refuse_unreadable: bool = False) -> str | None:
    """None if the checkpoint at ``path`` is whole, else what is wrong with it. One this user may not read:
    a CheckpointError if ``refuse_unreadable``, else the reason (retention leaves it alone)."""
    try:
        return _problem(path, hashes)
    except PermissionError as error:
        if not refuse_unreadable:
            return f"it cannot be read ({_one_line(error)})"
        raise CheckpointError(f"cannot read the checkpoint {path}: {_one_line(error)}; make it readable, or move it "
                              f"out of {path.parent} to use an earlier one") from None


def _problem(path: Path, hashes: bool) -> str | None:
    if not path.is_dir():
        return "not a directory"
    if not (path / MANIFEST).is_file():
        return f"no {MANIFEST} (the save did not finish)"
    manifest = _read_manifest(path)
    if manifest is None or not isinstance(manifest.get("files"), dict) or not all(
            isinstance(entry, dict) for entry in manifest["files"].values()):
        return f"{MANIFEST} is unreadable or malformed"
    files = manifest["files"]
    world_size = manifest.get("world_size")
    required = [SHARED] + [rank_file(r) for r in range(world_size if isinstance(world_size, int) else 0)]
    for name in required:
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    for name, entry in files.items():
        file = path / name
        try:
            if not file.is_file():
                return f"{name} is missing"
            size = file.stat().st_size
            if size != entry.get("size"):
                return f"{name} has {size} bytes, the manifest says {entry.get('size')}"
        except PermissionError:
            raise
        except OSError as error:  # unreadable, or gone since it was listed (pruned by a run saving beside it)
            return f"{name} cannot be read ({_one_line(error)})"
    if not hashes:
        return None
    hash_out = _HASH_OUT.get()
    hashed = hash_out(path, [(name, entry["size"]) for name, entry in files.items()]) if hash_out else {}
    for name, entry in files.items():
        try:
            digest = hashed.get(name) or _sha256(path / name)  # one no other rank could read: here, to say why
        except PermissionError:
            raise
        except OSError as error:
            return f"{name} cannot be read ({_one_line(error)})"
        if digest != entry.get("sha256"):
            return f"{name} does not match its sha256 checksum"
    return None


_HASH_OUT: contextvars.ContextVar[Callable[[Path, list[tuple[str, int]]], dict[str, str]] | None] = \
    contextvars.ContextVar("hash_out", default=None)
"""Set on rank 0 by hashes_shared_out: what hashes a checkpoint's files (name, size) for _problem."""


@contextlib.contextmanager
def hashes_shared_out(directory: Path) -> Iterator[None]:
    """On rank 0, around its search for the checkpoint a run resumes or starts from, while every other rank is in
    hash_for_rank_0: each checkpoint whose hashes it checks, the ranks hash between them, dealt out by size as
    at a save. Rank 0 alone would read the whole checkpoint, every rank's FSDP shards, while the others wait.
    A file any rank reads otherwise than it was saved is not trusted: rank 0 passes that checkpoint over, also
    when only a node whose view of the folder lags sees it so, since that node would load those bytes.
    ``directory``: the checkpoint folder, which each node may mount at another path."""
    asked = [False]  # the others are hashing: their next collective is the gather

    def hash_out(path: Path, files: list[tuple[str, int]]) -> dict[str, str]:
        D.broadcast_from_rank0((name_for_every_node(path, directory), files))
        asked[0] = True
        parts = D.gather(_hash_my_share(path, files))
        asked[0] = False
        return {name: digest for part in parts for name, digest in part.items()}

    token = _HASH_OUT.set(hash_out)
    try:
        yield
    finally:
        _HASH_OUT.reset(token)
        if not asked[0]:  # else stopped part way (Ctrl-C): a broadcast would meet their gather
            D.broadcast_from_rank0(None)  # the others' hash_for_rank_0 returns


def hash_for_rank_0(directory: Path) -> None:
    """The other ranks' side of hashes_shared_out: hash their share of each checkpoint rank 0 checks, until
    its search ends."""
    while (asked := D.broadcast_from_rank0(None)) is not None:
        name, files = asked
        D.gather(_hash_my_share(directory / name, files))  # an absolute path stays one


def name_for_every_node(checkpoint: Path, directory: Path) -> str:
    """How the other ranks find ``checkpoint``: its name within the checkpoint folder ``directory``, which
    every node may mount elsewhere, or its absolute path."""
    path = checkpoint.resolve()
    return path.name if path.parent == directory.resolve() else str(path)


def _hash_my_share(path: Path, files: list[tuple[str, int]]) -> dict[str, str]:
    """sha256 of this rank's share of ``files`` (name, size) of the checkpoint at ``path``. A file it cannot
    read, or sees at another size (a node whose view of a shared folder lags), is left out: rank 0 hashes it."""
    hashed = {}
    for name, size in _share(files, dist.get_rank(), dist.get_world_size()):
        with contextlib.suppress(OSError):
            if (path / name).stat().st_size == size:
                hashed[name] = _sha256(path / name)
    return hashed


def _share(files: list[tuple[str, int]], rank: int, world_size: int) -> list[tuple[str, int]]:
    """The part of ``files`` (name, size) that ``rank`` reads when the ranks read them between them: dealt
    out largest first, each to the rank with the fewest bytes so far; every rank deals the same list alike."""
    load, mine = [0] * world_size, []
    for name, size in sorted(files, key=lambda file: (-file[1], file[0])):
        taker = load.index(min(load))
        load[taker] += size
        if taker == rank:
            mine.append((name, size))
    return mine


# -- files --------------------------------------------------------------------------------------


def _attempt(action: Callable[[], None]) -> Exception | None:
    """Run action; return its exception instead of raising, so every rank reaches the next agreement."""
    try:
        action()
    except Exception as error:  # noqa: BLE001 - any failure must reach the other ranks
        return error
    return None


def _remove(path: Path) -> None:
    """Delete a folder with what it holds, or a file (a stray one can bear a checkpoint's name)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _os_error(error: BaseException) -> OSError | None:
    """The OSError with an errno behind ``error``, if any: torch.save on a full disk raises a RuntimeError of
    its zip writer ("unexpected pos ...") while handling the OSError that says why."""
    return next((e for e in causes(error) if isinstance(e, OSError) and e.errno), None)


def _failure_code(error: BaseException) -> int:
    """What a rank tells the others of its failure: the negated errno, which they can name, or _UNKNOWN's."""
    found = _os_error(error)
    return -(found.errno if found is not None else _UNKNOWN)


def _staged(staging: Path) -> list[tuple[str, int]]:
    """The files in a staging folder, each as (its path within the folder, its size), in order of their paths."""
    return [(path.relative_to(staging).as_posix(), path.stat().st_size)
            for path in sorted(staging.rglob("*")) if path.is_file()]


def _one_line(error: BaseException | None) -> str:
    return one_line(error) or type(error).__name__


def _save_torch(obj: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _load_torch(path: Path, map_location, mmap: bool = False) -> dict:
    try:
        return _load_torch_file(path, map_location, mmap)
    except CheckpointError:
        if path.parent.is_dir():
            raise
        raise CheckpointError(_deleted(path.parent)) from None


def _deleted(ckpt: Path, advice: str = "run again to take the newest checkpoint") -> str:
    return (f"checkpoint {ckpt} was deleted while it was read, most likely by the retention of a run still "
            f"saving beside it: {advice}")


def _load_torch_file(path: Path, map_location, mmap: bool = False) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        with open(path, "rb") as f:  # torch maps only its zip format; a file of the older one is read
            mmap = mmap and f.read(4) == b"PK\x03\x04"
        obj = _torch_load(path, map_location, mmap)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise CheckpointError(f"{path} is truncated or corrupt ({_one_line(error)})") from None
        found = re.search(r"GLOBAL (\S+?)\.?\s", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{path} holds objects that are not plain tensors/containers{what} "
                              f"and was not loaded") from None
    except Exception as error:  # noqa: BLE001 - torch reports corruption as many exception types
        raise CheckpointError(f"{path} is truncated or corrupt ({_one_line(error)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict")
    return obj


def _torch_load(path: Path, map_location, mmap: bool) -> Any:
    """``torch.load`` of plain tensors and containers; mapped if ``mmap``, but read whole where the filesystem
    refuses to map a file (some FUSE mounts do)."""
    if mmap:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except (OSError, RuntimeError):  # a file that is corrupt fails again below, and is reported from there
            pass
    return torch.load(path, map_location=map_location, weights_only=True)


def _sha256(path: Path, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
        if sync:  # extra files come from callbacks that may not have synced them
            os.fsync(f.fileno())
    return digest.hexdigest()
