import contextlib
import io
import json
import os
import re
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from llm.errors import UsageError
from llm.training import train
from llm.training.core import distributed as D
from llm.training.core.checkpoint import CheckpointManager
from llm.training.core.config import Config
from tests.helpers import free_port, spawn


@pytest.mark.parametrize("unset", [["MASTER_ADDR", "MASTER_PORT"], ["MASTER_PORT"]])
def test_world_size_without_a_launcher_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys, unset):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for name in unset:
        monkeypatch.delenv(name, raising=False)
    assert train.main(["--task", "regression", "--training-max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: WORLD_SIZE=2 is set but {' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} not: "
                   f"start the processes with torchrun, which sets them all, or unset WORLD_SIZE\n")
    assert not (tmp_path / "runs").exists()


def test_a_master_port_in_use_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    """Set by hand (an srun script without torchrun), MASTER_PORT may be another program's."""
    monkeypatch.chdir(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for name, value in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
            monkeypatch.setenv(name, value)
        assert train.main(["--task", "regression", "--training-max-steps", "1"]) == 2
    assert capsys.readouterr().err == (
        f"error: rank 0 cannot serve the process group's store at MASTER_ADDR=127.0.0.1 MASTER_PORT={port}: another "
        f"process listens on that port; choose a free MASTER_PORT, or start the processes with torchrun, which "
        f"finds one\n")
    assert not (tmp_path / "runs").exists()


# port 1: a process group that were started would fail, not wait; one process: the same command under torchrun
# would fail, so it is not let through where the backend goes unused
@pytest.mark.parametrize("env", [{"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, {}],
                         ids=["two-processes", "one-process"])
def test_nccl_without_cuda_is_one_line_before_any_process_group(tmp_path, monkeypatch, capsys, env):
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert train.main(["--task", "regression", "--distributed-backend", "nccl", "--training-device", "cpu"]) == 2
    assert capsys.readouterr().err == ("error: distributed.backend nccl needs CUDA devices and a torch built with NCCL: "
                                       "use --distributed-backend gloo (or auto) on the CPU\n")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("env, words", [
    ({"WORLD_SIZE": "two"}, "environment variable WORLD_SIZE: got 'two', expected a whole number"),
    ({"RANK": "1"}, "RANK=1, WORLD_SIZE=1, LOCAL_RANK=0, TORCHELASTIC_RESTART_COUNT=0 do not fit together"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK=-1, TORCHELASTIC_RESTART_COUNT=0 do not fit together"),
    ({"TORCHELASTIC_RESTART_COUNT": "x"}, "TORCHELASTIC_RESTART_COUNT: got 'x', expected a whole number"),
])
def test_launcher_variables_that_do_not_make_sense_are_one_line(tmp_path, monkeypatch, capsys, env, words):
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert train.main(["--task", "regression", "--training-max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("tf32", [True, False])
@pytest.mark.parametrize("earlier", ["highest", "high"])
def test_tf32_is_what_the_config_says_on_cuda_and_left_alone_on_the_cpu(monkeypatch, tf32, earlier):
    import torch

    from llm.training.core import distributed as D
    from llm.training.core.config import Config

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(earlier)  # as a script may have set before the run
    try:
        assert D.pick_device(Config.from_dict({"training": {"tf32": tf32, "device": "cpu"}}), 0).type == "cpu"
        assert torch.get_float32_matmul_precision() == earlier
        # no GPU here: CUDA is said to be there, so that the device is picked as on a GPU machine
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
        assert D.pick_device(Config.from_dict({"training": {"tf32": tf32}}), 0) == torch.device("cuda", 0)
        assert torch.backends.cuda.matmul.allow_tf32 is tf32
        # the legacy flag and the new settings agree: asking for the precision does not raise, as inductor does
        assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_algorithms_are_what_the_config_says_whatever_was_set_before(monkeypatch, deterministic):
    import torch

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(not deterministic)  # as a script, or an earlier run, may have left it
    try:
        D.pick_device(Config.from_dict({"training": {"deterministic": deterministic, "device": "cpu"}}), 0)
        assert torch.are_deterministic_algorithms_enabled() is deterministic
        # cuBLAS is deterministic only with a workspace setting, read when it starts: set before any matmul
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == (":4096:8" if deterministic else None)
        with pytest.raises(RuntimeError) if deterministic else contextlib.nullcontext():
            torch.zeros(2).put_(torch.tensor([0]), torch.tensor([1.0]))  # an op with no deterministic form
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("message, op", [
    ("put_ does not have a deterministic implementation, but you set 'torch.use_deterministic_algorithms(True)'",
     "put_"),
    # torch.compile wraps torch's error in its own text
    ("RuntimeError when making fake tensor call\n  Explanation: Dynamo failed to run FX node with fake tensors: "
     "got RuntimeError(\"max_unpooling2d_forward_out does not have a deterministic implementation, but you set",
     "max_unpooling2d_forward_out"),
    ("median CUDA with indices output does not have a deterministic implementation, but you set",
     "median CUDA with indices output"),  # what torch names is not always one word
    ("some other failure", ""),
])
def test_the_op_with_no_deterministic_form_is_read_from_torchs_error(message, op):
    assert D.op_with_no_deterministic_form(RuntimeError(message)) == op
    assert D.op_with_no_deterministic_form(ValueError(message)) == ""


# -- the group host values go over ------------------------------------------------------------------


def host_values_worker(rank: int, directory: str, ports: tuple[int, int]) -> None:
    """Host values between two ranks over a default group that carries no CPU tensors ("cuda:gloo" stands in
    for nccl's, which needs GPUs), made by the caller; then over a new default group that does."""
    seen = {}
    dist.init_process_group("cuda:gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=20))
    seen["stop"] = D.any_rank([rank == 1, False])
    seen["mean"] = D.weighted_mean_over_ranks({"loss": (float(rank + 1), 1.0), "acc": (rank * 0.5, 1.0)})
    seen["order"] = list(seen["mean"])  # the task's, as one process gives it: JSON keeps it
    seen["names"] = D.gather(f"rank {rank}")
    seen["host group made"] = D._hosts() is not None
    CheckpointManager(Path(directory) / "ckpt", rank, 2)._agree(None, Path(directory), "save")
    dist.destroy_process_group()  # torch's own, as a caller may
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[1]}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=20))
    seen["again"] = D.any_rank([rank == 0])
    seen["default group again"] = D._hosts() is None
    D.destroy_process_group()
    Path(directory, f"seen_{rank}.json").write_text(json.dumps(seen))


def test_host_values_go_over_gloo_whatever_the_default_group_carries(tmp_path):
    spawn(host_values_worker, str(tmp_path), (free_port(), free_port()))
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"seen_{rank}.json").read_text())
        assert seen == {"stop": [True, False], "mean": {"loss": 1.5, "acc": 0.25}, "order": ["loss", "acc"],
                        "names": ["rank 0", "rank 1"],
                        "host group made": True, "again": [True], "default group again": True}


def settings_worker(rank: int, directory: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=20))
    try:
        outcomes = []
        for lr in (0.001, 0.001 * (1 + rank)):  # a node's own loader workers may differ; its learning rate not
            config = Config.from_dict({"optimizer": {"lr": lr}, "data": {"num_workers": rank}})
            try:
                D.check_same_settings(config)
                outcomes.append("same")
            except UsageError as e:
                outcomes.append(str(e))
        Path(directory, f"settings_{rank}.json").write_text(json.dumps(outcomes))
    finally:
        D.destroy_process_group()


def test_ranks_started_with_different_settings_are_refused_in_one_line_on_every_rank(tmp_path):
    spawn(settings_worker, str(tmp_path), free_port())
    for rank in (0, 1):
        assert json.loads((tmp_path / f"settings_{rank}.json").read_text()) == [
            "same",
            "the ranks were started with different settings: optimizer.lr is 0.001 on rank 0 but 0.002 on rank 1; "
            "start every node with the same command and config (only data.cache_dir, data.num_workers, "
            "logging.progress_bar may differ)"]


def cli_settings_worker(rank: int, directory: str, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    os.chdir(directory)
    err = io.StringIO()
    resume = ["--checkpoint-resume", "auto"] if rank else []  # whether a run folder is claimed depends on it
    with contextlib.redirect_stderr(err):
        code = train.main(["--task", "regression", "--training-max-steps", "2", "--logging-progress-bar", "false",
                           "--distributed-timeout-s", "20", *resume])
    Path(directory, f"cli_{rank}.json").write_text(json.dumps([code, err.getvalue(), D._words]))


def test_the_command_line_refuses_ranks_with_different_settings_before_it_claims_a_run_folder(tmp_path):
    spawn(cli_settings_worker, str(tmp_path), free_port(), timeout=90)
    words = set()
    for rank in (0, 1):
        code, err, prefix = json.loads((tmp_path / f"cli_{rank}.json").read_text())
        words.add(prefix)
        assert (code, err.splitlines()[-1]) == (2, (
            "error: the ranks were started with different settings: checkpoint.resume is '' on rank 0 but 'auto' on "
            "rank 1; start every node with the same command and config (only data.cache_dir, data.num_workers, "
            "logging.progress_bar may differ)"))
    assert not (tmp_path / "runs").exists()
    # the keys the ranks leave each other in the store: this start's count and a number rank 0 drew, alike on both
    [prefix] = words
    assert re.fullmatch(r"llm/0\.\d+", prefix) and prefix != "llm/0.0", prefix


def hsdp_nodes_worker(rank: int, directory: str, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LOCAL_WORLD_SIZE=str(1 + rank))  # as if torchrun had started nodes of 1 and 2 processes
    os.chdir(directory)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train.main(["--task", "regression", "--training-max-steps", "2", "--logging-progress-bar", "false",
                           "--distributed-strategy", "hsdp", "--distributed-timeout-s", "20"])
    Path(directory, f"hsdp_{rank}.json").write_text(json.dumps([code, err.getvalue()]))


def test_hsdp_on_nodes_of_different_sizes_is_refused_in_one_line_on_every_rank(tmp_path):
    spawn(hsdp_nodes_worker, str(tmp_path), free_port(), timeout=90)
    for rank in (0, 1):
        code, err = json.loads((tmp_path / f"hsdp_{rank}.json").read_text())
        assert (code, err.splitlines()) == (2, [
            "error: distributed.strategy hsdp needs as many processes on every node, sharing out the 2 ranks "
            "evenly; torchrun started nodes of 1 and 2 (LOCAL_WORLD_SIZE): give every node the same "
            "--nproc-per-node, or use fsdp"]), err
    assert not (tmp_path / "runs").exists()  # the run folder it claimed, let go of


def busy(seconds: float) -> None:
    """Work on the CPU, as tokenizing does."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(1000))


def slow_preparation_worker(rank: int, directory: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    config = Config.from_dict({"distributed": {"timeout_s": 1}, "training": {"device": "cpu"}})
    D.init_process_group(config, rank, 2, rank)
    outcomes = []
    try:
        for fails in (False, True):  # rank 0 works 3 s, three times the collectives' timeout, and may fail
            def prepare():
                busy(3)
                if fails:
                    raise UsageError("the corpus is empty")
            try:
                D.agree_on_errors(prepare, run_here=rank == 0)
                outcomes.append("ok")
            except UsageError as e:
                outcomes.append(str(e))
        # whether a step is taken, agreed on the device (a GPU's path): an AND over the ranks
        outcomes += [bool(D.every_rank(torch.tensor(rank == 0))), bool(D.every_rank(torch.tensor(True)))]
        if rank == 1:  # hangs while it prepares, using no CPU (a stalled file system): rank 0 is told in seconds
            try:
                D.agree_on_errors(lambda: time.sleep(10))
            finally:
                os._exit(0)  # its own gather fails then: rank 0 has gone
        began = time.monotonic()
        try:
            D.agree_on_errors(lambda: None, run_here=False)
        except Exception as e:  # noqa: BLE001 - the gather's own error, whatever the backend calls it
            outcomes.append(f"told after {round(time.monotonic() - began)} s: {type(e).__name__}")
        Path(directory, f"slow_{rank}.json").write_text(json.dumps(outcomes))
    finally:
        D.destroy_process_group()


def test_ranks_wait_for_one_ranks_preparation_longer_than_the_timeout_while_it_works(tmp_path):
    spawn(slow_preparation_worker, str(tmp_path), free_port(), timeout=90)
    outcomes = json.loads((tmp_path / "slow_0.json").read_text())
    assert outcomes[:4] == ["ok", "the corpus is empty", False, True]
    told = re.fullmatch(r"told after (\d+) s: \w+", outcomes[4])
    assert told and int(told[1]) < 8, outcomes[4]  # the hung rank sleeps 10 s
    assert not (tmp_path / "slow_1.json").exists()


def test_the_run_is_over_for_every_rank_once_one_fails_or_loses_contact_but_not_after_a_signals_stop(monkeypatch):
    monkeypatch.setattr(D, "_store", dist.HashStore())
    monkeypatch.setattr(D, "_words", "llm/3.1234")
    assert D.run_ended() == ""
    D.record_failure(1, RuntimeError("stop"), run_ended=False)  # a signal's stop: every rank stops alike
    assert D.run_ended() == ""
    D.record_failure(1, RuntimeError("out of memory"))
    assert D.run_ended() == "rank 1 failed with RuntimeError: out of memory"
    monkeypatch.setattr(D, "_words", "llm/3.5678")  # a start whose count repeats reads nothing an earlier one left
    assert D.run_ended() == "" and D.lost_ranks(0, 2, settle_s=0) == "rank 1 did not answer (hung, or killed)"
    monkeypatch.setattr(D, "_words", "llm/4.1234")
    assert D.run_ended() == ""
    assert D.lost_ranks(0, 2, settle_s=0) == "rank 1 did not answer (hung, or killed)"
    assert D.run_ended() == "rank 0 lost contact with the others"
