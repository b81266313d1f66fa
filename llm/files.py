"""Files on disk: writing them so that a reader, or a run killed mid-write, never sees half of one, and
telling the checkpoint folders that nothing else may write into. Imports no torch."""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

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
    line naming the first. The folder is made if need be; the last release removes the folders made for it, if
    nothing was written there (a run refused in set-up leaves no trace).

    It is a POSIX lock (fcntl.lockf) on ``<folder>/.llm.lock``: the kernel lets go of it when the process ends,
    however it ends (SIGKILL too), and processes forked from it (data loader workers) do not inherit it. On a
    file system that takes no locks, or a folder that cannot be made, nothing is held. A lock file that cannot be
    taken as it is, a symlink (never followed) or another user's file that this one cannot write, is refused in
    one line, as a live holder is.

    A process that takes a folder it holds already shares that hold, which ends at the last release: the command
    line holds a fresh run's folder from the moment it picks it, then the engine that trains there takes it.
    """

    def __init__(self, folder: str | os.PathLike):
        self._hold = _HOLDS.get(Path(folder).resolve()) or _Hold.take(Path(folder))
        if self._hold is not None:
            self._hold.handles += 1

    def release(self) -> None:
        if self._hold is not None:
            self._hold.let_go()
            self._hold = None


class _Hold:
    """This process's lock on one folder, shared by the FolderLocks that took it. Its paths are resolved when it
    is taken: a symlink pointed elsewhere, or a change of working directory, meanwhile changes nothing."""

    def __init__(self, folder: Path, file: IO[str] | None, made: list[Path]):
        self.folder, self.file, self.made, self.handles = folder, file, made, 0  # no file: locks not taken there
        _HOLDS[folder] = self

    @classmethod
    def take(cls, folder: Path) -> _Hold | None:
        made = [p for p in (folder, *folder.parents) if not p.exists()]
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:  # what writes into it says in one line why it cannot be made
            return None
        folder, made = folder.resolve(), [p.resolve() for p in made]
        path = folder / RUN_LOCK
        while True:
            existed = path.exists()
            try:
                # never through a symlink: the file it points to would be emptied, and on release the link removed
                file = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666), "r+")
            except OSError as e:
                _remove_empty(made)
                if e.errno == errno.ELOOP:
                    raise UsageError(f"{path} is a symbolic link, which a run's lock file never is: remove it "
                                     f"(what it points to is left alone) before starting a run in {folder}") from None
                if e.errno in (errno.EACCES, errno.EPERM) and path.exists():
                    raise _unwritable(folder, path) from None
                return None  # the folder is not writable: what writes into it next says so
            try:
                fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):
                _remove_empty(made)
                raise _in_use(folder, path, file) from None
            except OSError:  # a file system without locks (some network ones): no lock file, nothing held
                if not existed:
                    path.unlink(missing_ok=True)
                file.close()
                return cls(folder, None, made)  # but the folders made for it go as they would
            if _same_file(file, path):
                break
            # the holder let go between our open and our lock, and unlinked the file: a lock on it holds nothing
            file.close()
        file.seek(0)
        file.truncate()
        file.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        return cls(folder, file, made)

    def let_go(self) -> None:
        self.handles -= 1
        if self.handles:
            return
        del _HOLDS[self.folder]
        if self.file is not None:
            with contextlib.suppress(OSError):
                (self.folder / RUN_LOCK).unlink()
            self.file.close()  # (after the unlink: a process that opens the file meanwhile takes it anew)
        _remove_empty(self.made)


_HOLDS: dict[Path, _Hold] = {}
"""The folders this process holds, by their resolved paths."""


@atexit.register
def _close_held_at_exit() -> None:
    """A hold never released (an engine set up, not trained) ends with the process, as the kernel would end it,
    without a warning about a file left open."""
    for hold in _HOLDS.values():
        if hold.file is not None:
            hold.file.close()


def _in_use(folder: Path, path: Path, file: IO[str]) -> UsageError:
    """The refusal of ``folder``, whose lock file ``path`` (open as ``file``, closed here) another live process
    holds."""
    file.seek(0)
    holder = file.read().strip() or "another process"
    file.close()
    host = holder.rpartition(" on ")[2] if " on " in holder else ""
    gone = (f" (if {host} is gone, its file system lets go of the lock once it notices; deleting {path} "
            f"frees the folder at once)" if host and host != socket.gethostname() else "")
    return UsageError(f"{folder} is in use by {holder}, which trains in it: let it end, or stop it, "
                      f"before starting another run there{gone}")


def _unwritable(folder: Path, path: Path) -> UsageError:
    """The refusal of ``folder``, whose lock file ``path`` is there but not this user's to write (another user's,
    in a folder shared by a group): held by a live process or not, a hold cannot be taken on it.

    A shared lock (read-only, which the file allows) tells whether a process holds it, to name that process."""
    try:
        file = os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "r")
    except OSError:  # not readable either: whether it is held cannot be told
        file = None
    if file is not None:
        try:
            fcntl.lockf(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            return _in_use(folder, path, file)
        except OSError:  # a file system without locks: nothing to tell
            pass
        file.close()  # (which lets go of the shared lock)
    return UsageError(f"{path} cannot be written by this user, so no run can hold {folder}: if no run uses "
                      f"{folder}, deleting {path} frees it")


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders``, the deepest first, up to the first that is not empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty: what is there is kept
            return


def is_run_output(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is what a run writes: a run folder (its lock file; its config.yaml beside its log, its
    summary, its checkpoints or a TensorBoard event file), a folder of checkpoints, or a checkpoint. Each of
    these names alone is common in data sets (a summary.json, a metrics.jsonl): it takes the pair, or a
    checkpoint's own files."""
    folder = Path(folder)
    if (folder / RUN_LOCK).is_file() or _is_checkpoint(folder) or _holds_checkpoints(folder):
        return True
    return (folder / "config.yaml").is_file() and (
        (folder / "metrics.jsonl").is_file() or (folder / "summary.json").is_file()
        or _holds_checkpoints(folder / "checkpoints") or any(folder.glob("events.out.tfevents.*")))


def run_files(folder: Path) -> list[str]:
    """The names of what ``folder`` holds, but its lock file: what a run left there (none if it is no folder)."""
    return [p.name for p in Path(folder).iterdir() if p.name != RUN_LOCK] if Path(folder).is_dir() else []


def _same_file(file: IO[str], path: Path) -> bool:
    try:  # lstat: a symlink put there since is not the file held
        return os.path.samestat(os.fstat(file.fileno()), os.lstat(path))
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


def json_text(value: Any, indent: int | None = None) -> str:
    """``value`` as JSON that every reader takes: a number that is not finite (a diverged loss) is written
    null, where ``json.dumps`` writes NaN or Infinity, which are not JSON (JavaScript's JSON.parse and jq
    refuse them)."""
    return json.dumps(_finite(value), indent=indent, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


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
    path = Path(path).resolve()
    if _is_checkpoint(path) or (not own and _holds_checkpoints(path)):
        return path
    return next((folder for folder in path.parents if _is_checkpoint(folder) or _holds_checkpoints(folder)), None)


def _is_checkpoint(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (CHECKPOINT_MANIFEST, CHECKPOINT_STATE))


def _holds_checkpoints(folder: Path) -> bool:
    return any(map(_is_checkpoint, folder.glob("step_*")))


def refuse_checkpoint_folder(out: Path, instead: str) -> None:
    """UsageError when a tool's ``--out`` would write into a checkpoint folder; ``instead``: what to do."""
    checkpoints = checkpoint_folder(out)
    if checkpoints is not None:
        raise UsageError(f"--out {out} would write into a checkpoint folder ({checkpoints}), where a file can "
                         f"break a checkpoint and retention deletes it with the checkpoint: {instead}")
