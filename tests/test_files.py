import errno
import fcntl
import os
import stat
import socket
import subprocess
import sys

import pytest

from llm.errors import UsageError
from llm.files import FolderLock, checkpoint_folder, replacing, write_atomically
from tests.helpers import cli_env, hold


def test_write_atomically_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old\n")
    write_atomically(path, "new\n")
    write_atomically(tmp_path / "weights.bin", b"\x00\x01", durable=True)
    assert path.read_text() == "new\n" and (tmp_path / "weights.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "weights.bin"]


def test_a_write_that_fails_halfway_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("kept\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with replacing(path) as tmp:
            tmp.write_text("half of a new")
            raise RuntimeError("disk full")
    assert path.read_text() == "kept\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_a_temporary_file_left_by_a_killed_write_is_replaced_not_reused(tmp_path):
    leftover = tmp_path / ".model.safetensors.tmp"
    leftover.write_bytes(b"half")
    leftover.chmod(0o600)
    umask = os.umask(0o022)
    try:
        write_atomically(tmp_path / "model.safetensors", b"whole")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_checkpoint_folders_are_told_by_the_files_a_checkpoint_holds(tmp_path):
    import torch

    from llm.training.core.checkpoint import CheckpointManager

    checkpoints = tmp_path / "run" / "checkpoints"
    step = CheckpointManager(checkpoints).save(10, {"model": {"w": torch.zeros(2)}}, {})
    assert checkpoint_folder(step / "sharded" / "x.png") == step
    assert checkpoint_folder(checkpoints / "latest") == checkpoint_folder(checkpoints) == checkpoints
    assert checkpoint_folder(tmp_path / "run" / "loss.png") is None
    # a run's own folder of checkpoints may hold them; not a folder inside it, nor one of them
    assert checkpoint_folder(checkpoints, own=True) is None
    assert checkpoint_folder(checkpoints / "mine", own=True) == checkpoints
    assert checkpoint_folder(step, own=True) == step
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "manifest.json").write_text("{}")  # another program's manifest alone is no checkpoint
    assert checkpoint_folder(tmp_path / "web" / "loss.png") is None


def test_a_folder_another_live_process_holds_is_refused_until_that_process_dies(tmp_path):
    holder = hold(tmp_path)
    try:
        with pytest.raises(UsageError, match=rf"{tmp_path} is in use by process {holder.pid} on .+, which trains in it"):
            FolderLock(tmp_path)
    finally:
        holder.kill()  # SIGKILL: the kernel lets go of its lock
        holder.wait()
    lock = FolderLock(tmp_path)
    assert (tmp_path / ".llm.lock").read_text().startswith(f"process {os.getpid()} on ")
    lock.release()
    assert not (tmp_path / ".llm.lock").exists()


def test_a_lock_taken_as_its_holder_lets_go_is_taken_on_the_file_there_now(tmp_path, monkeypatch):
    lockf = fcntl.lockf
    let_go = []

    def holder_lets_go_first(file, how):  # between our open and our lock, the holder unlinks the file and ends
        if not let_go:
            let_go.append(True)
            (tmp_path / ".llm.lock").unlink()
        return lockf(file, how)

    monkeypatch.setattr(fcntl, "lockf", holder_lets_go_first)
    lock = FolderLock(tmp_path)
    monkeypatch.setattr(fcntl, "lockf", lockf)
    # (not read here: closing any file of the lock's lets go of it, a POSIX rule)
    other = subprocess.run([sys.executable, "-c", "import sys; from llm.files import FolderLock; FolderLock(sys.argv[1])",
                            str(tmp_path)], capture_output=True, text=True, env=cli_env())
    assert let_go and other.returncode != 0
    assert f"is in use by process {os.getpid()} on " in other.stderr  # the file there is ours, and held
    lock.release()


def test_a_folder_held_from_another_machine_is_refused_saying_how_to_free_it_if_that_machine_is_gone(tmp_path,
                                                                                                   monkeypatch):
    holder = hold(tmp_path)  # a file system shared between machines: the holder's name is not this one's
    monkeypatch.setattr(socket, "gethostname", lambda: "another-machine")
    try:
        with pytest.raises(UsageError) as refused:
            FolderLock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    host = (tmp_path / ".llm.lock").read_text().strip().rpartition(" on ")[2]
    assert str(refused.value).endswith(
        f"before starting another run there (if {host} is gone, its file system lets go of the lock once it "
        f"notices; deleting {tmp_path / '.llm.lock'} frees the folder at once)")


def test_a_lock_is_let_go_of_where_it_was_taken_after_a_change_of_directory_or_symlink(tmp_path, monkeypatch):
    for name in ("a", "b", "one", "two"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "a")
    lock = FolderLock("run")  # a relative log_dir
    monkeypatch.chdir(tmp_path / "b")
    lock.release()
    assert not (tmp_path / "a/run").exists()  # made for the lock, and empty
    (tmp_path / "cur").symlink_to(tmp_path / "one")
    lock = FolderLock(tmp_path / "cur/run")
    (tmp_path / "one/run/summary.json").write_text("{}")
    (tmp_path / "cur").unlink()
    (tmp_path / "cur").symlink_to(tmp_path / "two")  # the link is pointed elsewhere while the run trains
    lock.release()
    assert sorted(p.name for p in (tmp_path / "one/run").iterdir()) == ["summary.json"]


def test_on_a_file_system_without_locks_nothing_is_held_and_nothing_is_left(tmp_path, monkeypatch):
    def no_locks(file, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    first, second = FolderLock(tmp_path / "runs/x"), FolderLock(tmp_path / "runs/x")
    assert (tmp_path / "runs/x").is_dir() and not (tmp_path / "runs/x/.llm.lock").exists()
    first.release()
    assert (tmp_path / "runs/x").is_dir()
    second.release()
    assert not (tmp_path / "runs").exists()  # nothing written there: a run refused in set-up leaves no trace


def test_a_lock_file_that_is_a_symlink_is_refused_and_what_it_points_to_is_left_alone(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run/.llm.lock").symlink_to("../victim.txt")
    with pytest.raises(UsageError, match=rf"{tmp_path / 'run/.llm.lock'} is a symbolic link"):
        FolderLock(tmp_path / "run")
    assert victim.read_text() == "precious\n" and (tmp_path / "run/.llm.lock").is_symlink()


def cannot_write(path, monkeypatch):
    """Opening ``path`` to write fails as it does for another user's file of mode 0644 (root, who runs the
    tests, is never refused), by ``os.open`` or ``open``; opening it to read works."""
    real_os_open, real_open = os.open, open

    def refused(file) -> PermissionError:
        return PermissionError(errno.EACCES, "Permission denied", os.fspath(file))

    def os_open(file, flags, *args, **kwargs):
        if os.fspath(file) == os.fspath(path) and flags & (os.O_WRONLY | os.O_RDWR):
            raise refused(file)
        return real_os_open(file, flags, *args, **kwargs)

    def builtin_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) == os.fspath(path) and set(mode) & set("wa+"):
            raise refused(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr("builtins.open", builtin_open)


def test_a_lock_file_this_user_cannot_write_is_refused_naming_the_live_process_that_holds_it(tmp_path, monkeypatch):
    holder = hold(tmp_path)
    try:
        cannot_write(tmp_path / ".llm.lock", monkeypatch)
        with pytest.raises(UsageError, match=rf"{tmp_path} is in use by process {holder.pid} on .+, which trains in it"):
            FolderLock(tmp_path)
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_file_this_user_cannot_write_and_no_one_holds_is_refused_saying_how_to_free_the_folder(tmp_path,
                                                                                                     monkeypatch):
    (tmp_path / ".llm.lock").write_text("process 1 on elsewhere\n")  # another user's run, killed in set-up
    cannot_write(tmp_path / ".llm.lock", monkeypatch)
    with pytest.raises(UsageError, match=rf"{tmp_path / '.llm.lock'} cannot be written by this user, so no run can "
                                         rf"hold {tmp_path}: if no run uses {tmp_path}, deleting .+ frees it"):
        FolderLock(tmp_path)
    assert (tmp_path / ".llm.lock").read_text() == "process 1 on elsewhere\n"
