"""The entry point as users run it: python -m, torchrun, exit codes."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm.training.core import distributed as D
from llm.training.core.config import Config
from llm.training.train import _free_run_dir, claim_run_dir, main
from tests.helpers import REPO, SCRIPTS, cli_env, free_port, hold, run, torchrun, train_cli, two_nodes

WORKER = Path(__file__).with_name("dist_worker.py")
SMALL = ["--model-n-layer", "1", "--model-n-embd", "16", "--data-num-samples", "512", "--data-input-dim", "4",
         "--logging-progress-bar", "false"]


def test_guide_command_trains_regression(tmp_path):
    out = train_cli("--task", "regression", "--epochs", "2", "--training-batch-size", "32", *SMALL, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "runs/regression/summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 2 * ((512 - 51) // 32)
    assert "epoch 2/2" in out.stdout
    # the closing table: results, speed, and where things are
    for row in ("best val_loss", "final val_loss", "steps / epochs", "samples/s", "elapsed", "checkpoints", "logs"):
        assert re.search(rf"^{re.escape(row)} +\S", out.stdout, re.M), row  # a row of its own
    assert re.search(r"^stopped +trained training\.epochs=2$", out.stdout, re.M)  # why it ended, said
    # the checkpoint with the best val_loss, as a path the tools take
    best = re.search(r"^best by val_loss +(\S+)$", out.stdout, re.M).group(1)
    assert (tmp_path / best).is_dir() and (tmp_path / "runs/regression/checkpoints/best").read_text() == \
        Path(best).name + "\n"
    assert summary["stop_reason"] == "trained training.epochs=2"


def test_a_full_disk_under_the_logs_is_one_line_and_the_run_continues_once_there_is_room(tmp_path):
    # a real full disk: a small tmpfs, mounted in a user and mount namespace of the test's own
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -rm to mount a small tmpfs")
    train = shlex.join([sys.executable, "-m", "llm.training.train", "--task", "regression", "--epochs", "3",
                        "--training-batch-size", "32", "--logging-log-every-steps", "1", "--checkpoint-every-n-steps",
                        "4", "--logging-log-dir", "disk/run", "--checkpoint-dir", "checkpoints", *SMALL])
    script = f"""
        mkdir disk && mount -t tmpfs -o size=64k tmpfs disk && mkdir disk/run
        head -c $((44 * 1024)) /dev/zero > disk/filler
        {train} > full.out 2> full.err; echo $? > full.rc
        rm disk/filler
        {train} --checkpoint-resume auto > resumed.out 2> resumed.err; echo $? > resumed.rc
        cp -r disk/run run_copy
    """
    out = subprocess.run(["unshare", "-rm", "bash", "-c", script], cwd=tmp_path, env=cli_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    full_err = (tmp_path / "full.err").read_text()
    assert (tmp_path / "full.rc").read_text().strip() == "2", full_err
    assert re.fullmatch(r"error: cannot write (\S+|to the run directory disk/run): No space left on device; make room, then run again with "
                        r"--checkpoint-resume auto\n", full_err), full_err
    assert (tmp_path / "resumed.rc").read_text().strip() == "0", (tmp_path / "resumed.err").read_text()[-3000:]
    assert "resumed from checkpoints/step_" in (tmp_path / "resumed.out").read_text()
    summary = json.loads((tmp_path / "run_copy/summary.json").read_text())
    assert summary["steps"] == 3 * ((512 - 51) // 32)
    steps = [r["step"] for r in map(json.loads, (tmp_path / "run_copy/metrics.jsonl").read_text().splitlines())
             if r["split"] == "train"]
    assert steps == list(range(1, summary["steps"] + 1))  # each step logged once, none lost to the full disk


def test_a_reader_of_stdout_that_goes_away_does_not_end_the_run(tmp_path):
    # `python -m llm.training.train | head -1`: the pipe closes after the first line, the run trains on to its end
    command = [sys.executable, "-m", "llm.training.train", "--epochs", "3", "--training-eval-every-steps", "1", *SMALL]
    process = subprocess.Popen(command, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline().startswith(b"step 1 ")
    process.stdout.close()
    assert process.wait(timeout=240) == 0, process.stderr.read().decode()[-3000:]
    assert process.stderr.read() == b""
    summary = json.loads((tmp_path / "runs/regression/summary.json").read_text())
    assert summary["epochs"] == 3 and (tmp_path / "runs/regression/checkpoints/latest").exists()
    # `--print-config | head -0`: nobody reads the config, which is no error either
    printed = subprocess.run(f"{shlex.quote(sys.executable)} -m llm.training.train --print-config | head -0",
                             shell=True, cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
    assert printed.returncode == 0 and printed.stderr == "", printed.stderr


def test_bad_flag_exits_2_with_one_line_and_no_traceback(tmp_path):
    out = train_cli("--training-batch-size", "0", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr == "error: training.batch_size: got 0, expected an integer >= 1\n"


class _Writes:
    """A stderr that keeps each write apart, as two ranks sharing a pipe would see them."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return len(text)

    def flush(self):
        pass


def test_an_error_line_goes_out_in_one_write(monkeypatch):
    # two ranks print the same error at once: written as text, then newline, the lines interleave
    stderr = _Writes()
    monkeypatch.setattr(sys, "stderr", stderr)
    assert main(["--training-batch-size", "0"]) == 2
    assert stderr.writes == ["error: training.batch_size: got 0, expected an integer >= 1\n"]


@pytest.mark.parametrize("task", ["regression", "tests.helpers:PartlyIgnoredRegressionTask"])
def test_two_ranks_match_each_other_and_one_process_on_the_combined_batch(tmp_path, task):
    # the second task's batches count different numbers of samples: ranks must weigh theirs by it
    common = [*SMALL, "--task", task, "--epochs", "2", "--optimizer-name", "sgd", "--optimizer-lr", "0.05",
              "--logging-log-every-steps", "1"]
    dist = torchrun(2, WORKER, *common, "--training-batch-size", "16", "--logging-log-dir", "ddp", cwd=tmp_path)
    assert dist.returncode == 0, dist.stderr[-3000:]
    single = run([sys.executable, str(WORKER), *common, "--training-batch-size", "32", "--logging-log-dir", "one"],
                 cwd=tmp_path)  # one process, no launcher
    assert single.returncode == 0, single.stderr[-3000:]
    rank0, rank1, one = (torch.load(tmp_path / p, weights_only=True)
                         for p in ("ddp/weights_rank0.pt", "ddp/weights_rank1.pt", "one/weights_rank0.pt"))
    for name in one:
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    d, s = (json.loads((tmp_path / p / "summary.json").read_text()) for p in ("ddp", "one"))
    assert d["steps"] == s["steps"] and d["samples_seen"] == s["samples_seen"]
    # validation gives each of the 51 samples to one rank (26 + 25), none twice: the same mean, up to rounding
    assert d["val_loss"] == pytest.approx(s["val_loss"], rel=1e-4)


def test_fsdp_on_two_ranks_holds_half_of_each_tensor_and_trains_as_one_process_on_the_combined_batch(tmp_path):
    # SGD: a gradient summed over the ranks rather than averaged would double each step, which Adam would hide
    common = [*SMALL, "--epochs", "2", "--optimizer-name", "sgd", "--optimizer-lr", "0.05"]
    fsdp = torchrun(2, WORKER, *common, "--distributed-strategy", "fsdp", "--training-batch-size", "16",
                    "--logging-log-dir", "fsdp", cwd=tmp_path)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    single = run([sys.executable, str(WORKER), *common, "--training-batch-size", "32", "--logging-log-dir", "one"],
                 cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    first, second, one = (torch.load(tmp_path / p, weights_only=True)
                          for p in ("fsdp/weights_rank0.pt", "fsdp/weights_rank1.pt", "one/weights_rank0.pt"))
    for name, whole in one.items():
        assert first[name].shape[0] == -(-whole.shape[0] // 2), name  # a half (rounded up), not a copy
        torch.testing.assert_close(torch.cat([first[name], second[name]]), whole, rtol=1e-4, atol=1e-5, msg=name)
    f, s = (json.loads((tmp_path / p / "summary.json").read_text()) for p in ("fsdp", "one"))
    assert f["steps"] == s["steps"] == 2 * (461 // 32) and f["samples_seen"] == s["samples_seen"]
    assert f["val_loss"] == pytest.approx(s["val_loss"], rel=1e-4)


def test_two_ranks_split_each_epoch_reshuffle_every_epoch_and_only_rank_0_writes(tmp_path):
    out = torchrun(2, REPO / "llm/training/train.py", "--task", "tests.helpers:SampleRecordingTask", *SMALL,
                   "--epochs", "2", "--logging-log-every-steps", "2", cwd=tmp_path, timeout=120,
                   env={"PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "runs/samplerecordingtask"
    seen = [(run_dir / f"seen_rank{r}.txt").read_text().split() for r in (0, 1)]
    per_epoch = len(seen[0]) // 2
    assert len(seen[0]) == len(seen[1]) == 2 * per_epoch == 2 * 7 * 32  # 461 samples: 230 a rank, 7 batches
    first, second = ([s[:per_epoch] for s in seen], [s[per_epoch:] for s in seen])
    for epoch in (first, second):
        assert len(set(epoch[0]) & set(epoch[1])) <= 1  # each rank its own part (the sampler pads one sample)
    for rank in (0, 1):
        assert first[rank] != second[rank]  # set_epoch: a new shuffle each epoch
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["split"], r["step"]) for r in records]
    assert len(keys) == len(set(keys)) and ("train", 14) in keys  # written once, by rank 0 alone
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1


def test_torchrun_by_file_path_and_early_stopping_ends_both_ranks(tmp_path):
    # mode max on a falling loss: no validation ever improves on the first one
    out = torchrun(2, REPO / "llm/training/train.py", "--task", "regression", *SMALL,
                   "--training-eval-every-steps", "2", "--training-patience", "2", "--checkpoint-mode", "max",
                   cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "runs/regression/summary.json").read_text())
    assert summary["steps"] == 6 and summary["stop_reason"].startswith("early stopping: val_loss")


def test_early_stopping_false_trains_the_steps_asked_for_and_a_resume_with_it_lifts_a_held_stop(tmp_path, capsys):
    # mode max on a falling loss: no validation improves on the first one, so patience 1 stops at the second
    flags = ["--task", "regression", *SMALL, "--training-eval-every-steps", "2", "--training-patience", "1",
             "--checkpoint-mode", "max", "--training-max-steps", "10"]
    for name, switch in (("on", "true"), ("off", "false")):
        assert main([*flags, "--logging-log-dir", str(tmp_path / name), "--training-early-stopping", switch]) == 0
    summaries = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in ("on", "off")}
    assert summaries["on"]["steps"] == 4 and summaries["on"]["stop_reason"].startswith("early stopping: val_loss")
    assert summaries["off"]["steps"] == 10 and summaries["off"]["stop_reason"] == "reached max_steps=10"
    assert main([*flags, "--logging-log-dir", str(tmp_path / "on"), "--training-early-stopping", "false",
                 "--checkpoint-resume", "auto"]) == 0
    assert json.loads((tmp_path / "on" / "summary.json").read_text())["steps"] == 10


def test_a_run_with_a_relative_checkpoint_dir_resumed_from_another_folder_is_refused_not_started_over(
        tmp_path, monkeypatch, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    flags = ["--task", "regression", *SMALL, "--training-max-steps", "4"]
    monkeypatch.chdir(tmp_path / "a")
    assert main([*flags, "--logging-log-dir", "run", "--checkpoint-dir", "ckr"]) == 0
    records = (tmp_path / "a" / "run" / "metrics.jsonl").read_text()
    monkeypatch.chdir(tmp_path / "b")  # ckr, from here, is b/ckr: nothing there, yet the run has its checkpoints
    capsys.readouterr()
    assert main([*flags, "--logging-log-dir", "../a/run", "--checkpoint-resume", "auto"]) == 2
    assert capsys.readouterr().err.startswith("error: the run in ../a/run saves its checkpoints in ../a/ckr: "
                                              "continue it with --checkpoint-dir ../a/ckr,")
    assert (tmp_path / "a" / "run" / "metrics.jsonl").read_text() == records  # not set aside to start over
    assert main([*flags, "--logging-log-dir", "../a/run", "--checkpoint-dir", "../a/ckr", "--checkpoint-resume", "auto",
                 "--training-max-steps", "6"]) == 0
    assert json.loads((tmp_path / "a" / "run" / "summary.json").read_text())["steps"] == 6


CALLBACKS = """
from llm.training.core.callbacks import Callback


class Steps(Callback):
    def __init__(self):
        self.n = 0

    def on_step_end(self, engine):
        self.n += 1
        if engine.step % engine.config.logging.log_every_steps == 0:
            engine.log({"my_steps": float(self.n)})

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


class NeedsArgument(Callback):
    def __init__(self, window):
        self.window = window


class NoCallback:
    pass
"""


def test_callbacks_of_the_users_join_a_command_line_run_and_keep_their_state_across_a_resume(tmp_path, monkeypatch,
                                                                                             capsys):
    (tmp_path / "my_callbacks.py").write_text(CALLBACKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    flags = ["--task", "regression", *SMALL, "--logging-log-every-steps", "2", "--logging-log-dir", str(tmp_path / "run"),
             "--logging-callbacks", "my_callbacks:Steps"]
    assert main([*flags, "--training-max-steps", "4"]) == 0
    assert main([*flags, "--training-max-steps", "8", "--checkpoint-resume", "auto"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["my_steps"]) for r in records if "my_steps" in r] == [(2, 2), (4, 4), (6, 6), (8, 8)]
    capsys.readouterr()
    for name, words in (("my_callbacks:NeedsArgument", "logging.callbacks: my_callbacks:NeedsArgument could not be "
                                                       "built with no arguments: TypeError: "),
                        ("my_callbacks:NoCallback", "logging.callbacks: my_callbacks:NoCallback is not a Callback "
                                                    "subclass"),
                        ("my_callbacks", "logging.callbacks: got 'my_callbacks', expected package.module:Class")):
        assert main(["--task", "regression", *SMALL, "--logging-log-dir", str(tmp_path / name),
                     "--logging-callbacks", name]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {words}") and err.count("\n") == 1, err
        assert not (tmp_path / name).exists()


def test_engines_built_in_code_and_started_by_torchrun_join_the_process_group_and_train_in_it(tmp_path):
    # the guide's train_worker: TrainingEngine(config, task, rank, world_size, ...) from a script of the user's own
    (tmp_path / "mine.py").write_text(
        "import os\n"
        "import threading\n"
        "import torch.distributed as dist\n"
        "from llm.training.core.config import Config\n"
        "from llm.training.core.engine import TrainingEngine\n"
        "from llm.training.tasks.regression_task import RegressionTask\n"
        "config = Config.from_dict({'training': {'max_steps': 4, 'batch_size': 16}, 'data': {'num_samples': 256},\n"
        "                           'logging': {'log_dir': 'run', 'progress_bar': False}})\n"
        "rank, world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])\n"
        "for run in ('run', 'run-again'):  # a second engine in the same process trains in the same group\n"
        "    config.logging.log_dir = run\n"
        "    given = (rank, world_size) if run == 'run' else ()  # not given: torchrun's, from the environment\n"
        "    metrics = TrainingEngine(config, RegressionTask(config), *given).train()\n"
        "    with open(f'{run}-rank{rank}.txt', 'w') as f:  # two ranks' prints can mix on a shared pipe\n"
        "        f.write(f'{metrics[\"steps\"]} steps, val_loss {metrics[\"val_loss\"]!r}, '\n"
        "                f'in a group: {dist.is_initialized()}')\n"
        "    # the engine's watch on the agent holds the engine: gone when train() returns, not at exit, where\n"
        "    # freeing the engine's gloo work aborts the process\n"
        "    assert 'llm-watch-agent' not in [t.name for t in threading.enumerate()]\n")
    out = torchrun(2, tmp_path / "mine.py", cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    for folder in ("run", "run-again"):
        ranks = [(tmp_path / f"{folder}-rank{rank}.txt").read_text() for rank in (0, 1)]
        assert ranks[0] == ranks[1] and ranks[0].startswith("4 steps") and ranks[0].endswith("in a group: True")
        assert json.loads((tmp_path / folder / "summary.json").read_text())["samples_seen"] == 4 * 2 * 16


def test_an_engine_for_two_processes_started_without_a_launcher_says_what_is_missing(tmp_path, monkeypatch):
    from llm.errors import UsageError
    from llm.training.core.engine import TrainingEngine
    from llm.training.tasks.regression_task import RegressionTask
    from tests.helpers import tiny_config

    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    config = tiny_config(tmp_path)
    with pytest.raises(UsageError, match=r"^the engine was given world_size=2 but MASTER_ADDR and MASTER_PORT are "
                                         r"not: start the processes with torchrun, which sets them all, or give "
                                         r"world_size=1$"):
        TrainingEngine(config, RegressionTask(config), 0, 2).train()
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("WORLD_SIZE", "1")  # a variable that did not ask for the 2
    with pytest.raises(UsageError, match=r"^the engine was given world_size=2"):
        TrainingEngine(config, RegressionTask(config), 0, 2).train()


def test_torch_distributed_launch_as_the_guide_names_it(tmp_path):
    # the older launcher passes --local-rank=N to the script as well as setting LOCAL_RANK
    launcher = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    out = subprocess.run([*launcher, str(REPO / "llm/training/train.py"), "--task", "regression", *SMALL,
                          "--training-max-steps", "3"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "runs/regression/summary.json").read_text())
    assert summary["steps"] == 3 and summary["samples_seen"] == 3 * 2 * 32


def test_user_task_and_data_module_by_module_path_in_packages_named_like_the_frameworks_own(tmp_path):
    """Run by path, as torchrun runs it: train.py's folder holds tasks/ and core/, which must not hide the user's."""
    for package, code in (("tasks", "from llm.training.tasks.classification_task import ClassificationTask as Mine"),
                          ("core", "from llm.data.classification_data_module import ClassificationDataModule as Data")):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "mine.py").write_text(code + "\n")
    out = run([sys.executable, str(REPO / "llm/training/train.py"), "--task", "tasks.mine:Mine", "--data-module",
               "core.mine:Data", "--epochs", "3", "--optimizer-lr", "0.01", *SMALL], cwd=tmp_path,
              env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "runs/mine/summary.json").read_text())
    assert summary["val_acc"] > 0.9


def test_a_run_at_its_time_limit_exits_75_saying_how_to_go_on_and_goes_on_from_there(tmp_path):
    out = train_cli(*SMALL, "--training-max-minutes", "0.0001", "--epochs", "2", cwd=tmp_path)
    assert out.returncode == 75, out.stderr[-2000:]
    assert out.stderr.endswith("reached training.max_minutes=0.0001 at step 1; continue with --checkpoint-resume "
                               "auto\n")
    assert "stopped           reached training.max_minutes=0.0001" in out.stdout
    out = train_cli(*SMALL, "--epochs", "2", "--checkpoint-resume", "auto", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from runs/regression/checkpoints/step_00000001 at step 1" in out.stdout


def test_workers_at_their_time_limit_exit_0_under_torchrun_which_would_restart_them_on_any_other_code(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=2",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    out = run([*launcher, str(REPO / "llm/training/train.py"), *SMALL, "--training-max-minutes", "0.0001"],
              cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("reached training.max_minutes=0.0001 at step 1; continue with --checkpoint-resume auto") \
        == 1 and "resumed from" not in out.stdout  # said once, by rank 0; not restarted


def test_nan_on_one_rank_stops_both_and_names_it(tmp_path):
    out = torchrun(2, REPO / "llm/training/train.py", "--task", "tests.helpers:NaNRegressionTask", *SMALL,
                   "--checkpoint-every-n-steps", "2", cwd=tmp_path, timeout=120,
                   env={"NAN_AT_STEP": "5", "NAN_ON_RANK": "1", "PYTHONPATH": f"{REPO}"})
    assert out.returncode != 0
    assert out.stderr.count("non-finite loss at step 5 on rank(s) [1]") == 2  # both ranks say so
    assert re.search(r"exitcode\s*:\s*3\b", out.stderr), out.stderr[-2000:]  # torchrun reports each worker's 3
    latest = tmp_path / "runs/nanregressiontask/checkpoints/latest"
    assert latest.read_text().strip() == "step_00000004"


def test_metrics_named_otherwise_on_each_rank_are_one_line_not_summed_together(tmp_path):
    # as many names on each rank: an all-reduce would have added one rank's metric to the other's
    out = torchrun(2, REPO / "llm/training/train.py", "--task", "tests.helpers:RankMetricTask", *SMALL,
                   cwd=tmp_path, timeout=120, env={"PYTHONPATH": f"{REPO}"})
    assert out.returncode != 0
    line = ("error: the ranks reported different metrics (rank 0 ['grad_norm', 'loss', 'mae_of_rank_0'], rank 1 "
            "['grad_norm', 'loss', 'mae_of_rank_1']): train_step and validation_step must return the same metric "
            "names on every rank")
    assert out.stderr.count(line) == 2, out.stderr[-3000:]  # both ranks say so
    assert re.search(r"exitcode\s*:\s*2\b", out.stderr), out.stderr[-2000:]  # a usage error in each worker


def test_a_non_finite_loss_exits_3_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NAN_AT_STEP", "3")
    assert main(["--task", "tests.helpers:NaNRegressionTask", *SMALL, "--training-max-steps", "5"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: non-finite loss at step 3 on rank(s) [0]: stopping "
                       "(training.nan_policy=stop); the last checkpoint is left as it was")


def test_a_run_that_fails_before_it_logs_leaves_its_folder_to_the_same_command_once_mended(tmp_path, monkeypatch,
                                                                                           capsys):
    monkeypatch.chdir(tmp_path)
    flags = ["--task", "tests.helpers:NaNRegressionTask", *SMALL, "--training-max-steps", "5",
             "--logging-log-every-steps", "2"]
    monkeypatch.setenv("NAN_AT_STEP", "1")  # the task breaks at its first step
    assert main(flags) == 3
    assert not (tmp_path / "runs").exists()  # its config.yaml and event file went with the folder made for it
    monkeypatch.setenv("NAN_AT_STEP", "3")  # after a record: the folder is a run's, kept for what it logged
    assert main(flags) == 3
    assert json.loads((tmp_path / "runs/nanregressiontask/metrics.jsonl").read_text().splitlines()[0])["step"] == 2
    monkeypatch.setenv("NAN_AT_STEP", "0")
    capsys.readouterr()
    assert main(flags) == 0
    assert "this one writes to runs/nanregressiontask-2" in capsys.readouterr().out


def test_a_second_fresh_run_takes_the_next_free_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # a checkpoint folder given inside the run's folder moves with it
        assert main(["--epochs", "1", "--checkpoint-dir", "runs/regression/ckpt", *SMALL]) == 0
    assert "runs/regression holds an earlier run: this one writes to runs/regression-2" in capsys.readouterr().out
    assert (tmp_path / "runs/regression/summary.json").exists() and (tmp_path / "runs/regression-2/summary.json").exists()
    for name in ("regression", "regression-2"):
        assert [p.name for p in (tmp_path / "runs" / name / "ckpt").glob("step_*")] == ["step_00000014"]
    assert main(["--epochs", "1", "--training-precision", "fp16", *SMALL]) == 2  # fp16 needs CUDA
    refused = capsys.readouterr()
    assert refused.out == "" and refused.err.count("\n") == 1, refused.err
    assert not (tmp_path / "runs/regression-3").exists()  # nor announced a folder it never writes


def test_a_run_that_writes_below_its_own_data_folder_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --data-path . with the default log_dir: runs/lm is below the data
    (tmp_path / "corpus.txt").write_text("the cat sat on the mat. " * 200)
    lm = ["--task", "lm", "--data-path", ".", "--data-cache-dir", str(tmp_path / ".cache"), "--model-n-layer", "1",
          "--model-n-embd", "16", "--model-n-head", "2", "--model-block-size", "16", "--training-batch-size", "4",
          "--logging-progress-bar", "false", "--checkpoint-resume", "auto"]
    assert main([*lm, "--training-max-steps", "2"]) == 0
    assert main([*lm, "--training-max-steps", "4"]) == 0  # read its own checkpoints as text, and refused them
    assert json.loads((tmp_path / "runs/lm/summary.json").read_text())["steps"] == 4
    assert not (tmp_path / "runs/lm-2").exists()


def free_run_dir(base: Path) -> Path:
    """The folder _free_run_dir picks, let go of at once."""
    folder, lock = _free_run_dir(base)
    if lock is not None:
        lock.release()
    return folder


def test_a_folder_holding_only_a_lock_is_free_unless_a_live_process_holds_it(tmp_path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm/.llm.lock").write_text("process 1 on elsewhere\n")  # left by a run killed in set-up
    assert free_run_dir(tmp_path / "lm") == tmp_path / "lm"
    holder = hold(tmp_path / "lm")  # a run still setting up there
    try:
        assert free_run_dir(tmp_path / "lm") == tmp_path / "lm-2"
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / "lm/.lock").write_text("another tool's\n")  # not this program's lock: a file like any other
    assert free_run_dir(tmp_path / "lm") == tmp_path / "lm-2"


def test_a_folder_whose_lock_file_is_a_symlink_is_passed_over_and_what_it_points_to_is_left_alone(tmp_path):
    (tmp_path / "victim.txt").write_text("precious\n")
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm/.llm.lock").symlink_to("../victim.txt")
    assert free_run_dir(tmp_path / "lm") == tmp_path / "lm-2"
    assert (tmp_path / "victim.txt").read_text() == "precious\n"


def test_the_folder_picked_is_held_until_released_and_left_out_if_nothing_was_written(tmp_path):
    folder, lock = _free_run_dir(tmp_path / "runs/lm")
    assert folder == tmp_path / "runs/lm" and (folder / ".llm.lock").is_file()
    other = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                            "from llm.training.train import _free_run_dir; print(_free_run_dir(Path(sys.argv[1]))[0])",
                            str(tmp_path / "runs/lm")], capture_output=True, text=True, env=cli_env())
    assert other.stdout.strip() == str(tmp_path / "runs/lm-2"), other.stderr  # another process, picking meanwhile
    lock.release()
    assert not (tmp_path / "runs/lm").exists()  # the claim made it, and nothing was written there


def test_runs_started_together_in_one_log_dir_each_take_a_folder_of_their_own(tmp_path):
    """A sweep launched at once: each run holds the folder it picks from that moment, not only once its engine
    sets up, so none picks a folder another has picked and is refused there."""
    args = ["--task", "regression", "--training-epochs", "1", "--data-num-samples", "256", "--logging-log-dir",
            "runs/sweep", "--logging-progress-bar", "false"]
    runs = [subprocess.Popen([sys.executable, "-m", "llm.training.train", *args], cwd=tmp_path, env=cli_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], [err for _, err in outs]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["sweep", "sweep-2", "sweep-3"]
    assert all((tmp_path / "runs" / name / "summary.json").is_file() for name in ("sweep", "sweep-2", "sweep-3"))
    assert not list((tmp_path / "runs").glob("*/.llm.lock"))


def test_a_restart_takes_its_own_launchs_folder_not_one_of_another_launch_with_the_same_id(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")  # a --rdzv-id that a script gives every launch
    for name, agent in (("lm", 111), ("lm-2", 222), ("lm-3", 333)):
        (tmp_path / name).mkdir()
        monkeypatch.setattr(os, "getppid", lambda agent=agent: agent)
        (tmp_path / name / D.LAUNCH_FILE).write_text(D.launch_id() + "\n")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setattr(os, "getppid", lambda: 222)
    assert free_run_dir(tmp_path / "lm") == tmp_path / "lm-2"
    monkeypatch.setattr(os, "getppid", lambda: 444)  # restarted before it wrote anything: a folder of its own
    assert free_run_dir(tmp_path / "lm") == tmp_path / "lm-4"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # a first start never takes a folder that holds a run
    monkeypatch.setattr(os, "getppid", lambda: 222)
    assert free_run_dir(tmp_path / "lm") == tmp_path / "lm-4"
    # the folders before its own went free (their runs were refused in set-up, or deleted): a restart still takes
    # its own, not the first free one, where it would train from the start beside its checkpoints
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    for name in ("lm", "lm-2"):
        (tmp_path / name / D.LAUNCH_FILE).unlink()
    (tmp_path / "lm-2").rmdir()
    monkeypatch.setattr(os, "getppid", lambda: 333)
    assert free_run_dir(tmp_path / "lm") == tmp_path / "lm-3"


def test_a_claim_cut_short_lets_go_of_the_folder_it_made(tmp_path, monkeypatch):
    def interrupted(value):
        raise KeyboardInterrupt

    monkeypatch.setattr(D, "broadcast_from_rank0", interrupted)  # while rank 0 tells the others where it trains
    config = Config.from_dict({"task": "regression", "logging": {"log_dir": str(tmp_path / "runs/lm")}})
    with pytest.raises(KeyboardInterrupt):
        claim_run_dir(config)
    assert not (tmp_path / "runs").exists()


def test_print_config_prints_the_resolved_yaml_and_trains_nothing(tmp_path, capsys):
    out = train_cli("--print-config", "--optimizer-lr", "0.25", cwd=tmp_path)
    assert out.returncode == 0 and not (tmp_path / "runs").exists()
    saved = tmp_path / "c.yaml"
    saved.write_text(out.stdout)
    from llm.training.core.config import Config
    assert Config.from_yaml(saved) == Config.from_args_and_env(["--optimizer-lr", "0.25"], environ={})
    from llm.training import train

    # a task or data module the run could not import: a config printed for it would fail only when used
    assert train.main(["--task", "my_tasks:Missing", "--print-config"]) == 2
    assert capsys.readouterr() == ("", "error: cannot import task module 'my_tasks': No module named 'my_tasks'\n")
    assert train.main(["--data-module", "my_data:Missing", "--print-config"]) == 2
    assert capsys.readouterr() == ("", "error: cannot import data module 'my_data': No module named 'my_data'\n")


def test_two_torchrun_agents_with_nnodes_2_train_together(tmp_path):
    """The multi-node recipe of docs/distributed.md, with both "nodes" on this machine."""
    done = [tmp_path / f"run/weights_rank{r}.pt" for r in (0, 1)] + [tmp_path / "run/summary.json"]
    two_nodes(WORKER, *SMALL, "--epochs", "2", "--logging-log-dir", str(tmp_path / "run"), cwd=tmp_path, done=done)
    rank0, rank1 = (torch.load(tmp_path / f"run/weights_rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["samples_seen"] == 2 * ((512 - 51) // 2 // 32) * 32 * 2  # two ranks, two epochs


def test_hsdp_on_two_nodes_of_two_processes_shards_within_a_node_copies_across_nodes_and_trains_as_one(tmp_path):
    """Two torchrun agents of two processes each: a mesh of 2 nodes x 2 ranks. Each rank of a node holds half of
    every tensor, the other node's rank of the same place the same half, and together they are the weights of one
    process on the combined batch."""
    from llm.evaluate import score_split

    common = [*SMALL, "--epochs", "2", "--optimizer-name", "sgd", "--optimizer-lr", "0.05"]
    done = [tmp_path / f"hsdp/weights_rank{r}.pt" for r in range(4)] + [tmp_path / "hsdp/summary.json"]
    two_nodes(WORKER, *common, "--distributed-strategy", "hsdp", "--training-batch-size", "8",
              "--logging-log-dir", str(tmp_path / "hsdp"), cwd=tmp_path, done=done, nproc=2)
    single = run([sys.executable, str(WORKER), *common, "--training-batch-size", "32", "--logging-log-dir", "one"],
                 cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    ranks = [torch.load(path, weights_only=True) for path in done[:4]]
    one = torch.load(tmp_path / "one/weights_rank0.pt", weights_only=True)
    for name, whole in one.items():
        first, second = ranks[0][name], ranks[1][name]
        assert first.shape[0] == -(-whole.shape[0] // 2), name  # a half (rounded up), not a copy
        assert torch.equal(first, ranks[2][name]) and torch.equal(second, ranks[3][name]), name
        torch.testing.assert_close(torch.cat([first, second]), whole, rtol=1e-4, atol=1e-5, msg=name)
    summary = json.loads((tmp_path / "hsdp/summary.json").read_text())
    assert summary["steps"] == json.loads((tmp_path / "one/summary.json").read_text())["steps"] == 2 * (461 // 32)
    last = tmp_path / f"hsdp/checkpoints/step_{summary['steps']:08d}"
    assert (last / "sharded").is_dir()  # read whole, on one process, by the tools
    assert score_split(last)[0]["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)


def test_two_ranks_skip_a_nan_step_everywhere_and_stop_with_the_reason_of_the_rank_that_asked(tmp_path):
    # rank 1's loss alone is NaN, its gradients finite (NAN_PLUS): the ranks agree on the losses too
    out = torchrun(2, WORKER, "--task", "tests.helpers:NaNRegressionTask", *SMALL, "--training-nan-policy", "skip",
                   "--epochs", "1", "--logging-log-dir", "run", cwd=tmp_path, timeout=120,
                   env={"NAN_AT_STEP": "3", "NAN_ON_RANK": "1", "NAN_PLUS": "1", "STOP_AT_STEP": "5",
                        "STOP_RANK": "1", "PYTHONPATH": f"{REPO}"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "non-finite loss at step 3 on rank(s) [1]: step skipped" in out.stdout
    summary = json.loads((tmp_path / "run/summary.json").read_text())  # written by rank 0
    assert summary["skipped_steps"] == 1 and summary["steps"] == 5 and summary["stop_reason"] == "asked by rank 1"
    state = torch.load(tmp_path / "run/checkpoints/step_00000005/state.pt", weights_only=False)
    assert state["progress"]["stop"] == "asked by rank 1"  # a resume stays stopped, for the same reason
    rank0, rank1 = (torch.load(tmp_path / f"run/weights_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) and torch.isfinite(rank0[k]).all() for k in rank0)


def test_a_stop_asked_for_on_one_rank_as_an_epoch_starts_takes_no_step_of_it_on_any_rank(tmp_path):
    out = torchrun(2, WORKER, *SMALL, "--epochs", "3", "--logging-log-dir", "run", cwd=tmp_path, timeout=120,
                   env={"STOP_AT_EPOCH_START": "1", "STOP_RANK": "1", "PYTHONPATH": f"{REPO}"})
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    [first_epoch] = [r for r in records if r["split"] == "epoch"]
    assert summary["steps"] == first_epoch["step"] and summary["epochs"] == 1
    assert summary["stop_reason"] == "asked by rank 1 as epoch 1 starts"


def test_the_training_command_leaves_what_its_imports_built_out_of_the_garbage_collectors_way(tmp_path):
    """gc.freeze() in run(): each full collection, in the run and at the exit, walks a fraction of the objects."""
    counted = ("import atexit, gc, sys\n"
               "from llm.training.train import run\n"
               "atexit.register(lambda: print('frozen', gc.get_freeze_count()))\n"
               "sys.argv[1:] = ['--task', 'regression', '--print-config']\n"
               "run()\n")
    out = run([sys.executable, "-c", counted], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split("frozen ")[-1]) > 100_000  # torch's objects, most of them


def test_console_scripts_answer_help():
    scripts = ("llm-train", "llm-generate", "llm-evaluate", "llm-export", "llm-plot")
    started = {s: subprocess.Popen([str(Path(SCRIPTS) / s), "--help"], stdout=subprocess.PIPE, text=True) for s in scripts}
    try:
        for script, process in started.items():  # started together: each spends its time importing torch
            stdout, _ = process.communicate(timeout=120)
            assert process.returncode == 0 and "usage:" in stdout, script
    finally:
        for process in started.values():
            process.kill()
            process.wait()


def test_trackers_chosen_on_the_command_line_both_record_the_run(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for reading the store back here
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = train_cli("--task", "regression", "--epochs", "2", *SMALL, "--logging-log-every-steps", "5",
                    "--logging-loggers", "tensorboard,mlflow", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""})
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "runs/regression"
    client = mlflow.tracking.MlflowClient((run_dir / "mlruns").as_uri())
    [experiment] = [e for e in client.search_experiments() if e.name == "llm"]
    [run] = client.search_runs([experiment.experiment_id])
    steps = 2 * ((512 - 51) // 32)
    assert run.info.status == "FINISHED" and run.data.params["training.epochs"] == "2"
    logged = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert logged == list(range(5, steps + 1, 5)) + ([steps] if steps % 5 else [])
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == logged
    assert [e.step for e in events.Scalars("val/val_loss")] == [m.step for m in client.get_metric_history(
        run.info.run_id, "val/val_loss")]


def test_progress_bar_on_a_terminal_shows_steps_and_loss(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    controller, terminal = pty.openpty()  # stderr a terminal, as in an interactive shell
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 160 columns: room for the bar
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    env["PYTHONPATH"] = str(REPO)
    flags = [f for f in SMALL if f not in ("--logging-progress-bar", "false")]
    proc = subprocess.Popen([sys.executable, "-m", "llm.training.train", "--task", "regression", *flags,
                             "--epochs", "2", "--logging-log-every-steps", "2"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=terminal, text=True)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the process closed its end
            break
        if not chunk:
            break
        shown += chunk
    stdout, _ = proc.communicate(timeout=120)
    os.close(controller)
    assert proc.returncode == 0, shown.decode(errors="replace")[-2000:]
    bar = shown.decode(errors="replace")
    steps = 2 * ((512 - 51) // 32)
    assert f"{steps}/{steps}" in bar and "step/s" in bar and "loss=" in bar and "samples_per_s=" in bar
    assert "epoch 2/2" in stdout  # lines printed above the bar still reach stdout


def test_whole_set_metrics_count_every_validation_sample_once_over_ranks_and_strategies(tmp_path):
    """51 validation samples in batches of 25: rank 0 has 26 (two batches), rank 1 has 25 (one batch), which under
    FSDP repeats its batch to join rank 0's second forward, counting for nothing."""
    flags = ["--task", "tests.helpers:WholeSetTask", *SMALL, "--epochs", "1", "--training-batch-size", "25"]
    env = {"PYTHONPATH": str(REPO)}
    out = train_cli(*flags, "--logging-log-dir", "runs/one", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    for strategy in ("ddp", "fsdp"):
        out = torchrun(2, REPO / "llm/training/train.py", *flags, "--distributed-strategy", strategy,
                       "--logging-log-dir", f"runs/{strategy}", cwd=tmp_path, timeout=120, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
    one, ddp, fsdp = (json.loads((tmp_path / f"runs/{run}/summary.json").read_text()) for run in ("one", "ddp", "fsdp"))
    assert one["val_rows"] == ddp["val_rows"] == fsdp["val_rows"] == 51
    assert ddp["val_target_sum"] == pytest.approx(one["val_target_sum"], rel=1e-6)
    assert fsdp["val_target_sum"] == pytest.approx(one["val_target_sum"], rel=1e-6)


def test_the_weight_average_of_an_fsdp_run_is_sharded_resumed_bit_for_bit_and_read_whole(tmp_path):
    """Validated every 3 steps, saved every 7: the average swapped in for a validation must leave the training
    as it would have been without one (FSDP keeps its root module's gathered weights after a forward)."""
    from llm.evaluate import score_split

    flags = ["--task", "regression", *SMALL, "--epochs", "2", "--distributed-strategy", "fsdp",
             "--training-eval-every-steps", "3", "--checkpoint-every-n-steps", "7", "--checkpoint-keep-last", "5",
             "--logging-log-every-steps", "1"]
    ema = ["--training-ema-decay", "0.9"]
    runs = {"straight": ema, "resumed": [*ema, "--checkpoint-resume", "runs/straight/checkpoints/step_00000007"],
            "plain": []}
    for name, more in runs.items():
        out = torchrun(2, REPO / "llm/training/train.py", *flags, *more, "--logging-log-dir", f"runs/{name}",
                       cwd=tmp_path, timeout=120, env={"PYTHONPATH": str(REPO)})
        assert out.returncode == 0, out.stderr[-3000:]
        if name == "resumed":  # from the checkpoint, not started over (which would end the same)
            assert "step_00000007 at step 7 " in out.stdout, out.stdout[-2000:]
    straight, resumed = (json.loads((tmp_path / f"runs/{name}/summary.json").read_text()) for name in runs if name != "plain")
    assert straight["val_loss"] == resumed["val_loss"]
    losses = [[(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, (tmp_path / f"runs/{name}/metrics.jsonl").open())
               if r["split"] == "train"] for name in ("straight", "plain")]
    assert len(losses[0]) == 14 and losses[0] == losses[1]
    ckpt = tmp_path / "runs/straight/checkpoints/step_00000014"
    assert (ckpt / "sharded").is_dir()
    assert score_split(ckpt)[0]["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-6)  # the average, whole
