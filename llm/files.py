"""Files on disk: writing them so that a reader, or a run killed mid-write, never sees half of one, and
telling the checkpoint folders that nothing else may write into. Imports no torch."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from llm.errors import UsageError

CHECKPOINT_MANIFEST = "manifest.json"
"""A checkpoint folder's list of its files with their sizes and hashes, written last."""
CHECKPOINT_STATE = "state.pt"
"""A checkpoint folder's weights, optimizer and progress (all of it, or what the ranks share when sharded)."""


RUN_LOCK = ".llm.lock"
"""A run folder's lock file: held by the process that trains in the folder, while it does. Named for this
program: a folder's own ``.lock`` (another tool's) is left alone."""


class FolderLock:
    """An exclusive hold on a folder until ``release()``: a second process that asks for it is refused, in one
    line naming the first.

    It is a POSIX lock (fcntl.lockf) on ``<folder>/.llm.lock``: the kernel lets go of it when the process ends,
    however it ends (SIGKILL too), and processes forked from it (data loader workers) do not inherit it. On a
    file system that takes no locks, nothing is held.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / RUN_LOCK
        self._file = None
        while True:
            try:
                file = open(self.path, "a+")
            except OSError:  # not writable: what writes into the folder next says so
                return
            try:
                fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):
                file.seek(0)
                holder = file.read().strip() or "another process"
                file.close()
                raise UsageError(f"{folder} is in use by {holder}, which trains in it: let it end, or stop it, "
                                 f"before starting another run there") from None
            except OSError:  # a file system without locks (some network ones)
                file.close()
                return
            if _same_file(file, self.path):
                break
            # the holder let go between our open and our lock, and unlinked the file: a lock on it holds nothing
            file.close()
        self._file = file
        file.seek(0)
        file.truncate()
        file.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        file.flush()

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self._file.close()
            self._file = None


def run_files(folder: Path) -> list[str]:
    """The names of what ``folder`` holds, but its lock file: what a run left there (none if it is no folder)."""
    return [p.name for p in Path(folder).iterdir() if p.name != RUN_LOCK] if Path(folder).is_dir() else []


def held(folder: Path) -> bool:
    """Whether a live process holds ``folder`` (a FolderLock). Ask only about a folder this process does not
    hold: closing the descriptor asked through would let go of this process's own lock (a POSIX rule)."""
    try:
        file = open(Path(folder) / RUN_LOCK, "r+")
    except OSError:  # none, or not ours to lock: not held through it
        return False
    with file:
        try:
            fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            return True
        except OSError:  # a file system without locks: nothing is held
            return False
    return False


def _same_file(file: IO[str], path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(file.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def replacing(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write, ``.<name>.tmp``; renamed over ``path`` when the block ends
    without error.

    A failed write leaves ``path`` as it was and no temporary file behind; one
    left by a killed process is replaced by the next write (never reused: it
    would keep its mode). ``durable``: the file and the rename are on disk
    (fsync) before the block returns, for what must survive a power cut, not
    only a killed process.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        yield tmp
        if durable:
            fsync(tmp)
        os.replace(tmp, path)
        if durable:
            fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)  # left only by a failed write


def write_atomically(path: str | os.PathLike, content: str | bytes, durable: bool = False) -> None:
    """Write ``content`` (text as UTF-8) to ``path`` through a temporary file; see ``replacing``."""
    with replacing(path, durable) as tmp:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding="utf-8")


def fsync(path: str | os.PathLike) -> None:
    """Put a file, or a folder's entries (a rename in it), on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_folder(path: str | os.PathLike, own: bool = False) -> Path | None:
    """The checkpoint, or folder of ``step_*`` checkpoints, that ``path`` is or would be written into: a file
    there can break a checkpoint, and retention deletes old checkpoints with everything in them. ``own``:
    ``path`` is a run's own checkpoint folder, whose ``step_*`` checkpoints it may hold."""
    def is_checkpoint(folder: Path) -> bool:
        return all((folder / name).is_file() for name in (CHECKPOINT_MANIFEST, CHECKPOINT_STATE))

    def holds_checkpoints(folder: Path) -> bool:
        return any(map(is_checkpoint, folder.glob("step_*")))

    path = Path(path).resolve()
    if is_checkpoint(path) or (not own and holds_checkpoints(path)):
        return path
    return next((folder for folder in path.parents if is_checkpoint(folder) or holds_checkpoints(folder)), None)


def refuse_checkpoint_folder(out: Path, instead: str) -> None:
    """UsageError when a tool's ``--out`` would write into a checkpoint folder; ``instead``: what to do."""
    checkpoints = checkpoint_folder(out)
    if checkpoints is not None:
        raise UsageError(f"--out {out} would write into a checkpoint folder ({checkpoints}), where a file can "
                         f"break a checkpoint and retention deletes it with the checkpoint: {instead}")
