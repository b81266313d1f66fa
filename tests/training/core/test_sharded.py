"""Sharded (torch.distributed.checkpoint) state is read without running code that a file carries."""

import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from llm.training.core import sharded


class RunsCode:
    """Unpickling this runs a shell command that leaves a file behind."""

    def __init__(self, witness):
        self.witness = witness

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.witness}",)


def save(state, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(directory))


def test_a_saved_state_reads_back_whole(tmp_path):
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "optimizer": {"step": 7, "lr": [0.1, 0.2]}}
    save(state, tmp_path / "ckpt")
    back = sharded.load_whole(tmp_path / "ckpt")
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert back["optimizer"] == {"step": 7, "lr": [0.1, 0.2]}
    only = sharded.load_whole(tmp_path / "ckpt", keys={"model"})  # what an export reads: not the optimizer's state
    assert list(only) == ["model"] and torch.equal(only["model"]["w"], state["model"]["w"])
    into = {"model": {"w": torch.zeros(2, 3)}, "optimizer": {"step": 0, "lr": [0.0, 0.0]}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one process reading shards: no guess about intent to warn of
        sharded.load_into(into, tmp_path / "ckpt")
    assert torch.equal(into["model"]["w"], state["model"]["w"]) and into["optimizer"]["step"] == 7


def test_metadata_that_would_run_code_is_refused_and_never_runs(tmp_path):
    save({"w": torch.ones(2)}, tmp_path / "ckpt")
    witness = tmp_path / "ran"
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(RunsCode(witness)))
    for load in (sharded.load_whole, lambda d: sharded.load_into({"w": torch.zeros(2)}, d)):
        with pytest.raises(sharded.UnsafeCheckpointError, match="posix.system, which is not checkpoint metadata"):
            load(tmp_path / "ckpt")
    assert not witness.exists()


def test_an_entry_that_would_run_code_is_refused_and_never_runs(tmp_path):
    witness = tmp_path / "ran"
    save({"w": torch.ones(2), "extra": RunsCode(witness)}, tmp_path / "ckpt")
    assert not witness.exists()  # saving pickles the object; only loading would run it
    with pytest.raises(sharded.UnsafeCheckpointError, match="not plain data"):
        sharded.load_whole(tmp_path / "ckpt")
    assert not witness.exists()
