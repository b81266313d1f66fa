"""Checkpoint save/verify/resolve/load on real files, including two-rank saves on gloo."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import time
import warnings
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from llm.errors import UsageError
from llm.training.core import checkpoint as ckpt_mod
from llm.training.core import sharded
from llm.training.core.checkpoint import (
    CheckpointError,
    CheckpointManager,
    copied_to_cpu,
    load_rank_state,
    load_shared_state,
    model_weights,
    read_checkpoint,
    resolve_checkpoint,
    verify,
)
from tests.helpers import free_port, spawn


def shared_state(step: int = 0) -> dict:
    return {
        "model": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3) + step, "b": torch.zeros(3)},
        "optimizer": {"state": {0: {"exp_avg": torch.ones(2, 3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "progress": {"step": step, "epoch": 1},
        "config": {"name": "tiny", "seed": None},
    }


def save(manager: CheckpointManager, step: int, **kwargs) -> Path:
    return manager.save(step, shared_state(step), {"rng": torch.get_rng_state(), "rank": manager.rank}, **kwargs)


def flip_byte(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_roundtrip_restores_tensors_and_keys(tmp_path):
    manager = CheckpointManager(tmp_path)
    rng = torch.get_rng_state()
    path = manager.save(100, shared_state(100), {"rng": rng, "rank": 0})
    assert path == tmp_path / "step_00000100"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "rank_00000.pt", "state.pt"]

    state = load_shared_state(path)
    assert set(state) == {"model", "optimizer", "progress", "config"}
    assert torch.equal(state["model"]["w"], shared_state(100)["model"]["w"])
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], torch.ones(2, 3))
    assert state["progress"] == {"step": 100, "epoch": 1}
    assert state["config"] == {"name": "tiny", "seed": None}
    per_rank = load_rank_state(path, 0)
    assert torch.equal(per_rank["rng"], rng) and per_rank["rank"] == 0



def test_model_weights_are_read_out_of_the_file_into_memory_with_ties_kept(tmp_path):
    # state.pt is mapped so that the optimizer's moments are never read; the weights are copied out of the
    # mapping at once: a checkpoint pruned or rewritten under a reader (another machine's run, on NFS) must
    # not fault the reader later (a mapped page past a truncated file's end is a SIGBUS)
    embedding = torch.randn(50, 8)
    model = {"tok_emb.weight": embedding, "lm_head.weight": embedding, "w": torch.randn(3, 4),
             "steps": torch.tensor(7)}
    path = CheckpointManager(tmp_path).save(1, {"model": model, "optimizer": {"state": {0: torch.ones(50, 8)}}}, {})
    weights = model_weights(path)
    os.truncate(path / "state.pt", 0)
    assert sorted(weights) == sorted(model)
    assert all(torch.equal(weights[key], value) for key, value in model.items())
    tied = weights["tok_emb.weight"], weights["lm_head.weight"]
    assert tied[0].untyped_storage().data_ptr() == tied[1].untyped_storage().data_ptr()  # one copy of a tied matrix
    assert weights["steps"].dtype == torch.int64


def test_model_weights_of_the_older_file_format_are_read_with_their_module_versions(tmp_path):
    # torch maps only files of its zip format: one saved in the older format is read as it was before
    norm = torch.nn.BatchNorm1d(3)
    path = CheckpointManager(tmp_path).save(1, {"model": norm.state_dict()}, {})
    assert model_weights(path)._metadata[""]["version"] == 2  # BatchNorm's, which its load_state_dict reads
    torch.save({"model": norm.state_dict()}, path / "state.pt", _use_new_zipfile_serialization=False)
    weights = model_weights(path)
    assert all(torch.equal(weights[key], value) for key, value in norm.state_dict().items())
    assert weights._metadata[""]["version"] == 2

def test_model_weights_are_read_whole_where_the_filesystem_cannot_map_the_file(tmp_path, monkeypatch):
    # some FUSE mounts refuse mmap: the weights are then read as they were before mapping, not called corrupt
    path = CheckpointManager(tmp_path).save(1, {"model": {"w": torch.arange(4.0)}}, {})

    def refuse(*args, **kwargs):
        raise RuntimeError("unable to mmap 1024 bytes from file <state.pt>: No such device (19)")
    monkeypatch.setattr(torch.UntypedStorage, "from_file", refuse)
    assert torch.equal(model_weights(path)["w"], torch.arange(4.0))
    os.truncate(path / "state.pt", (path / "state.pt").stat().st_size // 2)  # still called corrupt when it is
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        model_weights(path)


def test_a_copy_for_a_save_in_the_background_owns_its_tensors_keeps_its_containers_and_ties(tmp_path):
    embedding = torch.nn.Embedding(50, 8)
    model = torch.nn.ModuleDict({"embedding": embedding, "head": torch.nn.Linear(8, 50, bias=False)})
    model["head"].weight = embedding.weight  # tied: one tensor under two names
    optimizer = torch.optim.AdamW(model.parameters())
    model["head"](model["embedding"](torch.tensor([1, 2]))).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "pair": (1, torch.ones(2))}
    copied = copied_to_cpu(state)
    with torch.no_grad():  # the live state moves on; the copy stays as it was
        embedding.weight.add_(1)
        state["pair"][1].add_(1)
    assert torch.equal(copied["model"]["embedding.weight"] + 1, embedding.weight)
    assert torch.equal(copied["pair"][1], torch.ones(2)) and copied["pair"][0] == 1
    assert copied["model"]["embedding.weight"] is copied["model"]["head.weight"]  # copied once, tied still
    assert type(copied["model"]) is type(state["model"]) and copied["model"]._metadata == state["model"]._metadata
    assert copied["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    # views that are not the same values though they share memory, and tensors without storage, copied each
    z = torch.tensor([1 + 2j, 3 - 1j])
    others = copied_to_cpu({"z": z, "conj": z.conj(), "sparse": torch.eye(3).to_sparse()})
    assert torch.equal(others["z"], z) and torch.equal(others["conj"], z.conj())
    assert torch.equal(others["sparse"].to_dense(), torch.eye(3))
    # saved as the live state saves: the tied weight once
    torch.save(state, tmp_path / "live.pt")
    torch.save(copied, tmp_path / "copy.pt")
    assert (tmp_path / "copy.pt").stat().st_size == (tmp_path / "live.pt").stat().st_size


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    manager = CheckpointManager(tmp_path)

    def write_extra(staging: Path) -> None:
        (staging / "config.yaml").write_text("lr: 0.1\n")
        (staging / "tok").mkdir()
        (staging / "tok" / "tokenizer.json").write_text("{}")

    path = save(manager, 7, metrics={"val_loss": 1.5, "acc": torch.tensor(0.25)}, write_extra=write_extra)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 7 and manifest["world_size"] == 1
    assert manifest["metrics"] == {"val_loss": 1.5, "acc": 0.25}
    assert set(manifest["files"]) == {"state.pt", "rank_00000.pt", "config.yaml", "tok/tokenizer.json"}
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert datetime.fromisoformat(manifest["created"]).tzinfo is not None


def test_latest_points_at_last_save(tmp_path):
    manager = CheckpointManager(tmp_path)
    assert manager.latest_valid() is None
    save(manager, 1)
    assert (tmp_path / "latest").read_text().strip() == "step_00000001"
    save(manager, 2)
    assert (tmp_path / "latest").read_text().strip() == "step_00000002"
    assert manager.latest_valid() == tmp_path / "step_00000002"
    assert not list(tmp_path.glob(".*"))  # no staging, trash or tmp files left behind


def test_saving_the_same_step_again_replaces_it(tmp_path):
    manager = CheckpointManager(tmp_path)
    save(manager, 5)
    path = manager.save(5, {"model": {"w": torch.full((2,), 9.0)}}, {})
    assert verify(path) is None
    assert torch.equal(load_shared_state(path)["model"]["w"], torch.full((2,), 9.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000005"]


def test_a_replaced_checkpoint_that_cannot_be_deleted_does_not_fail_the_save(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    save(manager, 5)
    rmtree = ckpt_mod.shutil.rmtree

    def trash_undeletable(path, *args, ignore_errors=False, **kwargs):
        if Path(path).name.startswith(".trash-"):
            if ignore_errors:
                return
            raise PermissionError(13, "Permission denied", str(path))
        rmtree(path, *args, ignore_errors=ignore_errors, **kwargs)

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", trash_undeletable)
    path = manager.save(5, {"model": {"w": torch.full((2,), 9.0)}}, {})
    assert verify(path) is None and (tmp_path / "latest").read_text().strip() == "step_00000005"
    assert torch.equal(load_shared_state(path)["model"]["w"], torch.full((2,), 9.0))
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", rmtree)
    assert verify(save(manager, 6)) is None and not list(tmp_path.glob(".trash-*"))  # the next save clears it


def test_verify_detects_truncation_flipped_byte_missing_manifest_and_file(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=10)
    paths = [save(manager, step) for step in range(1, 5)]
    assert all(verify(p) is None for p in paths)

    state = paths[0] / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    assert "state.pt has 100 bytes" in verify(paths[0])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_shared_state(paths[0])

    flip_byte(paths[1] / "state.pt")
    assert verify(paths[1]) == "state.pt does not match its sha256 checksum"

    (paths[2] / "manifest.json").unlink()
    assert "no manifest.json" in verify(paths[2])

    (paths[3] / "rank_00000.pt").unlink()
    assert verify(paths[3]) == "rank_00000.pt is missing"
    assert verify(tmp_path / "nope") == "not a directory"

    manifest = json.loads((paths[3] / "manifest.json").read_text())
    (paths[3] / "manifest.json").write_text(json.dumps({**manifest, "files": {**manifest["files"], "state.pt": 123}}))
    assert verify(paths[3]) == "manifest.json is unreadable or malformed"  # an entry that is not a mapping


def test_resolve_skips_corrupt_newer_checkpoint_with_warning(tmp_path):
    manager = CheckpointManager(tmp_path)
    for step in (1, 2, 3):
        save(manager, step)
    flip_byte(tmp_path / "step_00000003" / "rank_00000.pt")
    with pytest.warns(UserWarning, match=r"step_00000003: rank_00000.pt does not match"):
        assert resolve_checkpoint(tmp_path) == tmp_path / "step_00000002"
    assert resolve_checkpoint(tmp_path / "step_00000001") == tmp_path / "step_00000001"
    with pytest.raises(CheckpointError, match="step_00000003 is not valid: rank_00000.pt"):
        resolve_checkpoint(tmp_path / "step_00000003")


def test_a_checkpoint_pruned_while_a_tool_reads_it_is_said_to_be_deleted_not_missing(tmp_path, monkeypatch):
    import shutil

    manager = CheckpointManager(tmp_path, keep_last=1)
    chosen = resolve_checkpoint(save(manager, 1).parent)
    load = torch.load

    def pruned_meanwhile(path, *args, **kwargs):  # the run's next save deletes it while the tool reads
        shutil.rmtree(chosen)
        return load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", pruned_meanwhile)
    with pytest.raises(CheckpointError, match=r"step_00000001 was deleted while it was read, most likely by the "
                                              r"retention of a run still saving beside it: run again"):
        load_shared_state(chosen)


def test_a_folder_whose_checkpoint_is_pruned_while_it_is_read_is_read_again_at_its_newest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    save(manager, 1)
    taken, saves = [], [2]

    def read(ckpt):  # the first reads race the run: it saves its next checkpoint and its retention deletes this one
        taken.append(ckpt.name)
        if saves[0] > 0:
            saves[0] -= 1
            save(manager, int(ckpt.name.removeprefix("step_")) + 1)
        return load_shared_state(ckpt)["progress"]["step"]

    assert read_checkpoint(tmp_path, read) == 3
    assert taken == ["step_00000001", "step_00000002", "step_00000003"]
    # named itself, a checkpoint is not swapped for a newer one
    saves[0] = 1
    with pytest.raises(CheckpointError, match=rf"step_00000003 was deleted while it was read, .*: give its "
                                              rf"folder {tmp_path} to take the newest$"):
        read_checkpoint(tmp_path / "step_00000003", read)
    # nor does a folder whose newest vanishes every time keep the tool reading for ever
    saves[0] = 2
    with pytest.raises(CheckpointError, match=r"step_00000005 was deleted while it was read, .*: the newest was "
                                              r"taken 2 times and deleted each time; run again$"):
        read_checkpoint(tmp_path, read, attempts=2)


def test_an_error_reading_a_checkpoint_that_is_still_there_is_not_retried(tmp_path):
    save(CheckpointManager(tmp_path), 1)
    calls = []

    def read(ckpt):
        calls.append(ckpt)
        raise CheckpointError("bad weights")

    with pytest.raises(CheckpointError, match="^bad weights$"):
        read_checkpoint(tmp_path, read)
    assert calls == [tmp_path / "step_00000001"]


def test_a_run_folder_whose_checkpoints_are_kept_elsewhere_says_where(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("checkpoint:\n  dir: ck_else\n")  # --checkpoint-dir ck_else
    with pytest.raises(CheckpointError, match=r"holds no step_\* checkpoints; its run kept them in ck_else "):
        resolve_checkpoint(run_dir)
    (run_dir / "config.yaml").write_text("checkpoint:\n  dir: ''\n")  # its own checkpoints/, never written
    with pytest.raises(CheckpointError, match=r"run is not a checkpoint and holds no step_\* checkpoints$"):
        resolve_checkpoint(run_dir)


def test_resolve_follows_latest_pointer_over_a_higher_step(tmp_path):
    # resumed from an early checkpoint: the abandoned run's step 5 is newer by number, not by save
    manager = CheckpointManager(tmp_path)
    save(manager, 5)
    save(manager, 3)
    assert resolve_checkpoint(tmp_path) == tmp_path / "step_00000003"
    assert manager.latest_valid() == tmp_path / "step_00000003"


@pytest.mark.parametrize("pointer", [b"\x89PNG\r\n\x1a\n\x00\x00", b"../../etc", b""])
def test_a_pointer_written_over_gives_the_newest_valid_checkpoint_with_a_warning(tmp_path, pointer):
    manager = CheckpointManager(tmp_path)
    save(manager, 3)
    save(manager, 5)
    (tmp_path / "latest").write_bytes(pointer)
    with pytest.warns(UserWarning, match="latest does not hold a checkpoint's name: taking the newest valid"):
        assert resolve_checkpoint(tmp_path) == tmp_path / "step_00000005"


def test_resolve_rejects_missing_path_plain_dir_file_and_all_invalid(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="is not a checkpoint and holds no step_"):
        resolve_checkpoint(tmp_path / "plain")
    (tmp_path / "file.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_checkpoint(tmp_path / "file.pt")

    run = tmp_path / "run"
    save(CheckpointManager(run), 1)
    (run / "step_00000001" / "manifest.json").unlink()
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=r"\(1 found, none valid\)"):
        resolve_checkpoint(run)
    assert issubclass(CheckpointError, UsageError)


@pytest.mark.parametrize("keep_last, survivors", [(1, [1, 6]), (2, [1, 5, 6]), (3, [1, 4, 5, 6])])
def test_retention_keeps_last_k_plus_best(tmp_path, keep_last, survivors):
    manager = CheckpointManager(tmp_path, keep_last=keep_last, monitor="val_loss", mode="min")
    losses = {1: 0.1, 2: 0.9, 3: 0.8, 4: 0.7, 5: 0.6, 6: 0.5}
    for step, loss in losses.items():
        save(manager, step, metrics={"val_loss": loss})
    assert sorted(int(p.name[5:]) for p in tmp_path.glob("step_*")) == survivors
    assert manager.latest_valid() == tmp_path / "step_00000006"


@pytest.mark.parametrize("keep_best, survivors, best",
                         [(0, [6], None), (1, [1, 6], 1), (2, [1, 3, 6], 1), (3, [1, 3, 4, 6], 1)])
def test_retention_keeps_the_best_k_and_the_best_file_names_the_best(tmp_path, keep_best, survivors, best):
    manager = CheckpointManager(tmp_path, keep_last=1, keep_best=keep_best, monitor="val_loss", mode="min")
    losses = {1: 0.1, 2: 0.9, 3: 0.3, 4: 0.3, 5: 0.6, 6: 0.5}  # 3 and 4 tie: the earlier ranks first
    for step, loss in losses.items():
        save(manager, step, metrics={"val_loss": loss})
        if step == 3 and keep_best == 3:  # 1, then 3: the pointer follows the best so far
            assert (tmp_path / "best").read_text() == "step_00000001\n"
    assert sorted(int(p.name[5:]) for p in tmp_path.glob("step_*")) == survivors
    if best is None:  # none kept for its score: no pointer that a later pruning could leave dangling
        assert not (tmp_path / "best").exists()
    else:
        assert (tmp_path / "best").read_text() == f"step_{best:08d}\n"
        assert resolve_checkpoint(tmp_path / "best") == tmp_path / f"step_{best:08d}"
    assert resolve_checkpoint(tmp_path / "latest") == tmp_path / "step_00000006"


def test_the_best_file_follows_a_better_score_and_goes_with_the_checkpoint_it_names(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1, monitor="val_loss")
    save(manager, 1, metrics={"val_loss": 0.5})
    save(manager, 2, metrics={"val_loss": 0.4})
    assert resolve_checkpoint(tmp_path / "best") == tmp_path / "step_00000002"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002"]
    manager.set_aside_after(1)  # a run gone back to step 1: step 2 is set aside, and no longer the best
    assert not (tmp_path / "best").exists()
    with pytest.raises(CheckpointError, match="best does not exist"):
        resolve_checkpoint(tmp_path / "best")


def test_a_best_that_cannot_be_written_is_a_warning_and_the_save_stands(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1, monitor="val_loss")
    (tmp_path / "best").mkdir()  # a folder where the file goes
    with pytest.warns(UserWarning, match="best not updated .*Is a directory.*the next save tries again"):
        assert save(manager, 1, metrics={"val_loss": 0.5}) == tmp_path / "step_00000001"
    assert manager.latest_valid() == tmp_path / "step_00000001"


@pytest.mark.parametrize("content, words", [("step_00000009\n", "names step_00000009, which is not in"),
                                            ("../../etc\n", "does not hold a checkpoint's name")])
def test_a_best_file_naming_no_checkpoint_here_is_refused_in_one_line(tmp_path, content, words):
    save(CheckpointManager(tmp_path), 1, metrics={"val_loss": 0.5})
    (tmp_path / "best").write_text(content)
    with pytest.raises(CheckpointError, match=re.escape(words)):
        resolve_checkpoint(tmp_path / "best")


def test_retention_with_mode_max_keeps_the_highest_and_the_newest_without_the_metric(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1, monitor="acc", mode="max")
    save(manager, 1, metrics={"acc": 0.3})
    save(manager, 2, metrics={"acc": 0.9})
    save(manager, 3, metrics={"acc": float("nan")})
    save(manager, 4)  # no metric: still the newest, so kept
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000004"]


def test_retention_never_deletes_a_checkpoint_it_cannot_vouch_for(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    save(manager, 1)
    (tmp_path / "step_00000001" / "manifest.json").unlink()
    save(manager, 2)
    save(manager, 3)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000001", "step_00000003"]


def test_stale_staging_dir_is_ignored_then_cleaned(tmp_path):
    manager = CheckpointManager(tmp_path)
    save(manager, 1)
    stale = tmp_path / ".staging-step_00000009"
    stale.mkdir()
    (stale / "state.pt").write_bytes(b"half written")
    assert resolve_checkpoint(tmp_path) == tmp_path / "step_00000001"
    assert manager.latest_valid() == tmp_path / "step_00000001"
    save(manager, 2)
    assert not stale.exists()
    assert resolve_checkpoint(tmp_path) == tmp_path / "step_00000002"


def test_a_checkpoint_moved_aside_by_a_replacing_save_that_crashed_is_put_back(tmp_path):
    manager = CheckpointManager(tmp_path)
    save(manager, 1)
    save(manager, 2)
    # the final save of a run replaces a periodic one of the same step: killed between its two renames
    os.replace(tmp_path / "step_00000002", tmp_path / ".trash-step_00000002")
    (tmp_path / ".staging-step_00000002").mkdir()
    assert resolve_checkpoint(tmp_path) == tmp_path / "step_00000001"  # read-only tools see what is there
    with pytest.raises(CheckpointError, match=r"step_00000002 does not exist: a save that was replacing it stopped, "
                                              r"and left it as \S+/.trash-step_00000002; the run's next save or "
                                              r"resume puts it back$"):
        resolve_checkpoint(tmp_path / "step_00000002")  # named itself
    assert CheckpointManager(tmp_path).latest_valid() == tmp_path / "step_00000002"  # a resume puts it back
    assert verify(tmp_path / "step_00000002") is None and not (tmp_path / ".trash-step_00000002").exists()
    save(manager, 3)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_stray_file_with_a_checkpoints_name_is_replaced_and_later_saves_still_work(tmp_path):
    (tmp_path / "step_00000002").write_text("not a checkpoint")
    manager = CheckpointManager(tmp_path)
    for step in (2, 3, 4):  # the file was moved aside at 2; deleting it as a folder failed every later save
        save(manager, step)
    assert verify(tmp_path / "step_00000002") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002", "step_00000003", "step_00000004"]


def test_failed_extra_write_keeps_previous_checkpoint_and_latest(tmp_path):
    manager = CheckpointManager(tmp_path)
    save(manager, 1)

    def disk_full(staging: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(staging / "tokenizer.json"))

    for step in (2, 1):  # a new step, and replacing the existing one
        with pytest.raises(CheckpointError, match=r"step_0000000\d not saved .*rank 0: .*No space left on device"):
            save(manager, step, write_extra=disk_full)
        assert verify(tmp_path / "step_00000001") is None
        assert (tmp_path / "latest").read_text().strip() == "step_00000001"
        assert not (tmp_path / "step_00000002").exists()
        assert not list(tmp_path.glob(".staging-*"))


def test_a_latest_that_cannot_be_written_after_the_checkpoint_is_in_place_is_removed_with_a_warning(
        tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    save(manager, 10)
    write = ckpt_mod.write_atomically

    def disk_full_for_latest(path, *args, **kwargs):  # the small file after the rename: the save is made
        if Path(path).name == "latest":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(path, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "write_atomically", disk_full_for_latest)
    saved_anyway = (r"checkpoint step_00000020 saved, but \S+latest not updated \(\[Errno 28\] No space left on "
                    r"device\): removed, so that a resume takes the newest valid checkpoint")
    with pytest.warns(UserWarning, match=saved_anyway):
        assert save(manager, 20) == tmp_path / "step_00000020"
    assert verify(tmp_path / "step_00000020") is None and not (tmp_path / "latest").exists()
    # a resume takes it, and sets nothing aside: a latest still naming step 10 would have it take that one
    assert manager.latest_valid() == tmp_path / "step_00000020"
    assert manager.set_aside_after(20) == [] and (tmp_path / "step_00000020").is_dir()


def test_failed_torch_save_raises_with_the_os_error(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    save(manager, 1)

    def read_only(obj, f):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def disk_full_in_the_zip_writer(obj, f):  # what torch.save raises when the disk fills: the OSError inside
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 362752 vs 362644")

    for failing, reason in ((read_only, "Read-only file system"), (disk_full_in_the_zip_writer, "No space left")):
        monkeypatch.setattr(torch, "save", failing)
        with pytest.raises(CheckpointError, match=rf"step_00000002 not saved \(writing failed on rank 0: .*{reason}"
                           ) as info:
            save(manager, 2)
        assert "\n" not in str(info.value) and "enforce fail" not in str(info.value)
        assert ckpt_mod._failure_code(info.value.__cause__) == -(errno.EROFS if failing is read_only else errno.ENOSPC)
    monkeypatch.undo()
    assert resolve_checkpoint(tmp_path) == tmp_path / "step_00000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]


def test_an_old_checkpoint_that_cannot_be_deleted_leaves_a_warning_not_a_failed_save(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=1)
    save(manager, 1)

    rmtree = ckpt_mod.shutil.rmtree

    def step_1_undeletable(path, *args, **kwargs):
        if Path(path).name.endswith("step_00000001"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", step_1_undeletable)
    with pytest.warns(UserWarning, match=r"old checkpoint .*/\.pruned-step_00000001 not deleted \(.*Permission denied"):
        assert save(manager, 2) == tmp_path / "step_00000002"
    assert (tmp_path / "latest").read_text().strip() == "step_00000002" and verify(tmp_path / "step_00000002") is None
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_00000002"]  # out of the readers' sight all the same
    monkeypatch.undo()
    save(manager, 3)  # and deleted by a later save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003"]


def test_retention_takes_an_old_checkpoint_out_of_sight_at_once_then_deletes_it(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=1)
    save(manager, 1)
    listed = []
    rmtree = ckpt_mod.shutil.rmtree

    def deleting(path, *args, **kwargs):  # what a tool listing the folder finds while the files go one by one
        listed.append(sorted(p.name for p in tmp_path.glob("step_*")))
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", deleting)
    save(manager, 2)
    assert listed == [["step_00000002"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002"]


def test_a_checkpoint_deleted_while_resolve_checks_it_is_passed_over_in_silence(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=1)
    save(manager, 1)
    state = tmp_path / "step_00000001" / "state.pt"
    state.write_bytes(state.read_bytes()[:-1])  # damaged: retention leaves it alone, resolve warns of it
    save(manager, 2)
    check = ckpt_mod._check

    def saved_meanwhile(path, hashes, **kwargs):  # while step 2 is hashed, the run saves step 3 and prunes step 2
        if path.name == "step_00000002" and hashes:
            monkeypatch.setattr(ckpt_mod, "_check", check)
            save(manager, 3)
        return check(path, hashes, **kwargs)

    monkeypatch.setattr(ckpt_mod, "_check", saved_meanwhile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_checkpoint(tmp_path) == tmp_path / "step_00000003"
    # nothing said of step 2, which is simply gone; step 1 named once, though the folder was looked at twice
    assert [str(w.message) for w in caught] == [f"skipping checkpoint {tmp_path / 'step_00000001'}: state.pt has "
                                                f"{state.stat().st_size} bytes, the manifest says "
                                                f"{state.stat().st_size + 1}"]


def test_a_checkpoint_pruned_while_its_files_are_hashed_is_passed_over_too(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=1)
    save(manager, 1)
    sha256 = ckpt_mod._sha256

    def pruned_meanwhile(path, *args, **kwargs):  # listed and opened by name after the run's pruning renamed it
        if path.parent.name == "step_00000001":
            monkeypatch.setattr(ckpt_mod, "_sha256", sha256)
            save(manager, 2)
        return sha256(path, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "_sha256", pruned_meanwhile)
    assert resolve_checkpoint(tmp_path) == tmp_path / "step_00000002"

    def unreadable(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(ckpt_mod, "_sha256", unreadable)  # one this user may not read: refused, not passed over
    with pytest.raises(CheckpointError, match=r"^cannot read the checkpoint \S+step_00000002: .*Permission denied"):
        resolve_checkpoint(tmp_path / "step_00000002")


def test_retention_leaves_a_checkpoint_it_may_not_read_and_the_save_goes_on(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=1)
    save(manager, 1)
    read_manifest = ckpt_mod._read_manifest

    def unreadable_first(path):  # as for a manifest of mode 0, which root would read anyway
        if path.name == "step_00000001":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path / "manifest.json"))
        return read_manifest(path)

    monkeypatch.setattr(ckpt_mod, "_read_manifest", unreadable_first)
    assert save(manager, 2) == tmp_path / "step_00000002"  # pruning passes over step 1, as over a damaged one
    assert (tmp_path / "step_00000001").is_dir()
    with pytest.raises(CheckpointError, match=r"^cannot read the checkpoint \S+step_00000001: .*Permission denied"):
        resolve_checkpoint(tmp_path / "step_00000001")  # to load, it is refused


class Payload:
    """Unpickling this runs a shell command; weights_only loading must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = CheckpointManager(tmp_path).save(1, {"model": {}}, {})
    torch.save({"model": Payload(marker)}, path / "state.pt")
    torch.save({"rng": Payload(marker)}, path / "rank_00000.pt")
    with pytest.raises(CheckpointError, match="not plain tensors/containers .*and was not loaded"):
        load_shared_state(path)
    with pytest.raises(CheckpointError, match="not plain tensors/containers"):
        load_rank_state(path, 0)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="rank_00003.pt does not exist"):
        load_rank_state(path, 3)


def test_constructor_rejects_bad_arguments(tmp_path):
    with pytest.raises(CheckpointError, match="mode: got 'avg'"):
        CheckpointManager(tmp_path, mode="avg")
    with pytest.raises(CheckpointError, match="keep_last: got 0"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(CheckpointError, match="rank: got 2"):
        CheckpointManager(tmp_path, rank=2, world_size=2)


# -- two ranks on gloo --------------------------------------------------------------------------


def two_rank_worker(rank: int, directory: str, port: int, scenario: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=20))
    result: dict = {}

    def shards(staging: Path) -> None:  # as FSDP saves: every rank writes its part with torch.distributed.checkpoint
        sharded.save({f"rank{rank}": torch.full((4,), float(rank))}, staging / "sharded")

    write_sharded = shards if scenario in ("rank1_shards_fail", "ok", "rank1_lists_nothing") else None
    hashed = result["hashed"] = []
    sha256 = ckpt_mod._sha256
    ckpt_mod._sha256 = lambda path, sync=False: hashed.append(path.name) or sha256(path, sync)
    if scenario == "rank1_lists_nothing" and rank == 1:  # as if its listing of a shared folder lagged
        CheckpointManager._hash_share = lambda self, staging: {}
    try:
        manager = CheckpointManager(directory, rank=rank, world_size=2)
        result["first"] = str(manager.save(1, shared_state(1), {"rank": rank, "rng": torch.get_rng_state()},
                                           write_sharded=write_sharded))
        result["hashed"] = list(hashed)  # those of the save above
        if scenario == "ok" and rank == 0:  # a manager of one rank's own, in the group: it waits for no other
            result["alone"] = str(CheckpointManager(Path(directory) / "alone").save(1, shared_state(1), {}))
        dist.barrier()
        if scenario not in ("ok", "rank1_lists_nothing"):
            if rank == 1:
                def disk_full(obj, f):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), getattr(f, "name", None))
                ckpt_mod.torch.save = disk_full  # this process only (torch.distributed.checkpoint writes with it too)
            start = time.monotonic()
            try:
                manager.save(2, shared_state(2), {"rank": rank}, write_sharded=write_sharded)
                result["error"] = None
            except CheckpointError as error:
                result["error"] = str(error)
            result["seconds"] = time.monotonic() - start
    finally:
        Path(directory, f"result_{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def run_two_ranks(directory: Path, scenario: str) -> list[dict]:
    spawn(two_rank_worker, str(directory), free_port(), scenario)
    return [json.loads((directory / f"result_{r}.json").read_text()) for r in range(2)]


def test_two_ranks_save_one_checkpoint_with_both_rank_files_and_hash_its_files_between_them(tmp_path):
    results = run_two_ranks(tmp_path, "ok")
    path = tmp_path / "step_00000001"
    assert [r["first"] for r in results] == [str(path)] * 2
    assert verify(path) is None
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert {"state.pt", "rank_00000.pt", "rank_00001.pt", "sharded/.metadata"} <= set(manifest["files"])
    assert [load_rank_state(path, r)["rank"] for r in range(2)] == [0, 1]
    assert torch.equal(load_shared_state(path)["model"]["w"], shared_state(1)["model"]["w"])
    assert verify(results[0]["alone"]) is None
    # each file read and hashed once, by one rank or the other, and each rank hashed some: rank 0 did not read
    # the whole checkpoint while rank 1 waited
    names = [Path(name).name for name in manifest["files"]]
    ours, theirs = (results[r]["hashed"] for r in range(2))
    assert ours and theirs and sorted(ours + theirs) == sorted(names)


def test_files_a_rank_did_not_hash_are_hashed_by_rank_0(tmp_path):
    results = run_two_ranks(tmp_path, "rank1_lists_nothing")
    path = tmp_path / "step_00000001"
    assert verify(path) is None
    assert results[1]["hashed"] == []
    names = [Path(name).name for name in json.loads((path / "manifest.json").read_text())["files"]]
    assert sorted(results[0]["hashed"]) == sorted(names)


@pytest.mark.parametrize("scenario", ["rank1_fails", "rank1_shards_fail"])
def test_write_failure_on_rank_1_raises_on_both_ranks_in_one_line(tmp_path, scenario):
    results = run_two_ranks(tmp_path, scenario)
    for result in results:
        assert result["error"] is not None
        assert "step_00000002 not saved (writing failed on rank 1:" in result["error"]
        assert "No space left on device" in result["error"] and "rank 0" not in result["error"]
        assert "\n" not in result["error"]
        assert result["seconds"] < 5
    if scenario == "rank1_fails":
        assert "rank_00001.pt" in results[1]["error"]  # the failing rank names its own file
    assert resolve_checkpoint(tmp_path) == tmp_path / "step_00000001"
    assert not (tmp_path / "step_00000002").exists() and not list(tmp_path.glob(".staging-*"))


def test_the_checkpoints_after_the_one_a_run_goes_back_to_are_set_aside_each_time_and_kept(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5)
    for step in (4, 8, 12):
        save(manager, step)
    assert [p.name for p in manager.set_aside_after(4)] == ["step_00000008", "step_00000012"]
    assert (tmp_path / "latest").read_text() == "step_00000004\n" and manager.latest_valid() == tmp_path / "step_00000004"
    save(manager, 8)  # the new continuation, which goes back to step 4 once more
    assert [p.name for p in manager.set_aside_after(4)] == ["step_00000008.2"]
    save(CheckpointManager(tmp_path, keep_last=1), 16)  # retention prunes the folder's own, never those set aside
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000016"]
    assert sorted(p.name for p in (tmp_path / "dropped").iterdir()) == ["step_00000008", "step_00000008.2",
                                                                         "step_00000012"]
    assert verify(tmp_path / "dropped/step_00000008.2") is None  # whole: a branch may start from it
    assert manager.set_aside_after(16) == []


def test_a_later_checkpoint_a_crashed_save_had_moved_aside_is_set_aside_too_not_put_back_into_the_new_course(
        tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5)
    for step in (4, 9):
        save(manager, step)
    os.replace(tmp_path / "step_00000009", tmp_path / ".trash-step_00000009")  # a save replacing it crashed
    assert [p.name for p in manager.set_aside_after(4)] == ["step_00000009"]
    save(manager, 5)  # the new course's first save puts back no checkpoint of the old one
    assert sorted(p.name for p in tmp_path.glob("*step_*")) == ["step_00000004", "step_00000005"]


def test_a_symlinked_checkpoint_pruned_loses_its_link_and_keeps_what_it_names(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    save(CheckpointManager(elsewhere), 2)
    run = tmp_path / "run"
    run.mkdir()
    (run / "step_00000002").symlink_to(elsewhere / "step_00000002")
    manager = CheckpointManager(run, keep_last=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Cannot call rmtree on a symbolic link", and a hidden link left for ever
        save(manager, 4)
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step_00000004"]
    assert verify(elsewhere / "step_00000002") is None


def test_a_set_aside_cut_short_leaves_latest_naming_the_checkpoint_gone_back_to(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=5)
    for step in (4, 8, 12):
        save(manager, step)
    rename = Path.rename

    def killed_after_the_first(self, target):
        if (tmp_path / "dropped").exists() and any((tmp_path / "dropped").iterdir()):
            raise KeyboardInterrupt  # the process ends here
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        manager.set_aside_after(4)
    monkeypatch.setattr(Path, "rename", rename)
    assert manager.latest_valid() == tmp_path / "step_00000004"  # not step 12, still in place: the old course
    assert [p.name for p in manager.set_aside_after(4)] == ["step_00000012"]
