"""Runs killed or stopped at awkward moments, resumed with the same command, end bit-for-bit where
an uninterrupted run ends."""

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import SCRIPTS, cli_env, run, stacks_then_kill, torchrun, two_nodes

WORKER = Path(__file__).with_name("dist_worker.py")
FLAGS = ["--model-n-layer", "2", "--model-n-embd", "16", "--model-dropout", "0.1", "--data-num-samples", "512",
         "--data-input-dim", "4", "--logging-progress-bar", "false", "--training-batch-size", "16", "--epochs", "2",
         "--checkpoint-every-n-steps", "4", "--training-eval-every-steps", "6", "--checkpoint-resume", "auto",
         "--logging-log-every-steps", "4", "--checkpoint-keep-best", "0"]
"""Saves every 4 steps, and none for a validation's score (--checkpoint-keep-best 0): the faults below are placed
against that schedule."""
STEPS = 2 * ((512 - 51) // 16)  # 28 per epoch on one process
TIMING = ("samples_per_s", "step_time_ms", "data_wait_pct", "peak_mem_mb")


def weights(run_dir: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / f"weights_rank{rank}.pt", weights_only=True)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def logged(run_dir: Path) -> tuple[dict, dict]:
    """metrics.jsonl's records by (split, step), each logged once (a resumed run drops those an earlier process
    logged after its checkpoint), timings aside; and TensorBoard's scalars by tag, as (step, value) pairs."""
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert (record["split"], record["step"]) not in records, f"logged twice: {record}"
        records[record["split"], record["step"]] = {k: v for k, v in record.items() if k not in TIMING}
    events = EventAccumulator(str(run_dir))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
               if tag.split("/")[1] not in TIMING}
    return records, scalars


def assert_logged_the_same(reference: Path, run_dir: Path) -> None:
    """The same records and TensorBoard scalars as the uninterrupted run."""
    (want, want_tb), (got, got_tb) = logged(reference), logged(run_dir)
    assert got == want
    assert got_tb == want_tb


def assert_resumed_at(out: subprocess.CompletedProcess, step: int | None) -> None:
    """The run continued from the checkpoint of ``step`` (None: it started over). A deterministic run started over
    would end on the reference's weights too."""
    if step is None:
        assert "resumed from" not in out.stdout, out.stdout[-2000:]
    else:
        assert f"step_{step:08d} at step {step} " in out.stdout, out.stdout[-2000:]


def single(run_dir: Path, cwd: Path, env: dict | None = None):
    return run([sys.executable, str(WORKER), *FLAGS, "--logging-log-dir", str(run_dir)], cwd=cwd, env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    out = single(tmp / "run", tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp / "run"


@pytest.mark.parametrize("fault, resumed_at", [
    ({"KILL_AT_STEP": "3"}, None),  # before the first checkpoint: resume starts over
    ({"KILL_AT_STEP": "19"}, 16),   # mid-epoch, three steps after a checkpoint
    ({"KILL_AT_STEP": "28"}, 24),   # at the epoch boundary, before its validation and save
    ({"KILL_IN_SAVE": "12"}, 8),    # during a checkpoint write: the half-written one must not be trusted
])
def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path, reference, fault, resumed_at):
    killed = single(tmp_path / "run", tmp_path, env=fault)
    assert killed.returncode == -signal.SIGKILL
    resumed = single(tmp_path / "run", tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_resumed_at(resumed, resumed_at)
    assert_same(weights(reference), weights(tmp_path / "run"))
    assert_logged_the_same(reference, tmp_path / "run")
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["steps"] == STEPS


@pytest.mark.parametrize("name", ["TERM", "INT"])
def test_sigterm_or_sigint_saves_a_checkpoint_exits_128_plus_signal_and_resumes_exactly(tmp_path, reference, name):
    stopped = single(tmp_path / "run", tmp_path, env={f"{name}_AT_STEP": "10"})
    assert stopped.returncode == 128 + getattr(signal, f"SIG{name}"), stopped.stderr[-3000:]  # 143, 130
    assert f"stopped by SIG{name} at step 10" in stopped.stderr
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step_00000010"
    resumed = single(tmp_path / "run", tmp_path)
    assert resumed.returncode == 0
    assert_resumed_at(resumed, 10)  # not started over, which would end on the same weights
    assert_same(weights(reference), weights(tmp_path / "run"))
    # the stopped run did not log steps 9 and 10 apart (it used to): the resumed one logs them with 11 and 12, as
    # the uninterrupted run does
    assert_logged_the_same(reference, tmp_path / "run")


@pytest.mark.parametrize("name", ["TERM", "USR1"])
def test_a_signal_that_reaches_the_loader_workers_too_still_saves_and_resumes_exactly(tmp_path, reference, name):
    # SLURM and systemd send SIGTERM to every process of a job, and SLURM's --signal=USR1@N SIGUSR1 ahead of its
    # time limit: the workers leave the stop to the main process, which saves; a worker that died of it failed the
    # run wherever it stood (torch raises on a dead worker), and the main process died of SIGUSR1 unsaved
    workers = ["--data-num-workers", "1"]
    stopped = run([sys.executable, str(WORKER), *FLAGS, *workers, "--logging-log-dir", str(tmp_path / "run")],
                  cwd=tmp_path, env={"ALL_AT_STEP": "10", "ALL_SIGNAL": name})
    assert stopped.returncode == 128 + getattr(signal, f"SIG{name}"), stopped.stderr[-3000:]
    assert f"stopped by SIG{name} at step 10" in stopped.stderr
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step_00000010"
    resumed = run([sys.executable, str(WORKER), *FLAGS, *workers, "--logging-log-dir", str(tmp_path / "run")],
                  cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_resumed_at(resumed, 10)
    assert_same(weights(reference), weights(tmp_path / "run"))  # the data draws nothing at random: 0 workers' too


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_stop_asked_for_on_the_step_of_a_signal_is_kept_by_the_resume(tmp_path, nproc):
    # early stopping (here a callback's request_stop) on the very step a SIGTERM arrives: the resume ends at
    # once. With two processes the stop is rank 1's and the signal rank 0's, which writes the checkpoint.
    def launch(env=None):
        if nproc == 1:
            return single(tmp_path / "run", tmp_path, env=env)
        return torchrun(2, WORKER, *FLAGS, "--logging-log-dir", str(tmp_path / "run"), cwd=tmp_path, env=env)

    stopped = launch({"TERM_AT_STEP": "10", "STOP_AT_STEP": "10", "STOP_RANK": str(nproc - 1)})
    assert stopped.returncode != 0 and "stopped by SIGTERM at step 10" in stopped.stderr, stopped.stderr[-3000:]
    resumed = launch()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["steps"] == 10 and summary["stop_reason"] == f"asked by rank {nproc - 1}"
    assert summary["train_loss"] is not None  # the last training record, kept by the checkpoint
    # steps 9 and 10, off the logging schedule: logged as the run stopped, since no step follows its resume
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["split"] == "train"][-1]
    assert (last["step"], last["loss"]) == (10, summary["train_loss"])


def test_a_signal_on_the_last_step_off_the_logging_schedule_logs_its_window_as_the_run_ends(tmp_path):
    flags = [*FLAGS, "--training-max-steps", "30"]  # logged every 4 steps: the run ends with 29 and 30 open
    runs = {name: tmp_path / name / "run" for name in ("reference", "stopped")}
    reference = run([sys.executable, str(WORKER), *flags, "--logging-log-dir", str(runs["reference"])], cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    stopped = run([sys.executable, str(WORKER), *flags, "--logging-log-dir", str(runs["stopped"])], cwd=tmp_path,
                  env={"TERM_AT_STEP": "30"})
    assert stopped.returncode == 143 and "stopped by SIGTERM at step 30" in stopped.stderr, stopped.stderr[-3000:]
    again = run([sys.executable, str(WORKER), *flags, "--logging-log-dir", str(runs["stopped"])], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_resumed_at(again, 30)  # and took no step: the window was the stopped run's to log
    assert_logged_the_same(runs["reference"], runs["stopped"])


def test_ctrl_c_before_training_starts_ends_in_one_line_and_leaves_no_run_folder(tmp_path):
    marker = tmp_path / "setting-up"
    flags = [*FLAGS, "--data-module", "tests.helpers:SlowSetupData", "--logging-log-dir", str(tmp_path / "run")]
    process = subprocess.Popen([sys.executable, str(WORKER), *flags], cwd=tmp_path, env=cli_env({"SETUP_MARKER": str(marker)}),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # however long torch takes to import on a busy machine: a Ctrl-C sent during the import could be taken by
    # it, and the run would go on into the setup's minute
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if not marker.exists():
        pytest.fail(f"the run never reached its data's setup:\n{stacks_then_kill(process)}")
    process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run did not stop on Ctrl-C:\n{stacks_then_kill(process)}")
    assert process.returncode == 130, err
    assert err == ("interrupted (Ctrl-C): outside the training steps (setting up, or a callback's work at the start "
                   "or the end): stopped at once; the checkpoints saved before are kept\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_once_the_run_has_finished_leaves_its_exit_code_0(tmp_path, signum):
    """The interpreter takes most of a second to exit after the summary: a scheduler's signal then must not make a
    finished run exit as a stopped one."""
    flags = ["--epochs", "1", "--data-num-samples", "256", "--logging-log-dir", str(tmp_path / "run")]
    process = subprocess.Popen([str(Path(SCRIPTS) / "llm-train"), *flags], cwd=tmp_path, env=cli_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("logs "):  # the summary's last line
            process.send_signal(signum)
            break
    else:
        process.kill()
        pytest.fail("the run printed no summary")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0 and err == "", err
    assert json.loads((tmp_path / "run/summary.json").read_text())["stop_reason"] == "trained training.epochs=1"


def test_a_run_exits_though_a_thread_pool_it_used_is_still_running(tmp_path):
    """A pool's threads end only as the interpreter exits (a compiler's, a data module's): nothing waits on them."""
    flags = ["--epochs", "1", "--data-num-samples", "256", "--data-module", "tests.helpers:PooledData",
             "--logging-log-dir", str(tmp_path / "run")]
    finished = run([str(Path(SCRIPTS) / "llm-train"), *flags], cwd=tmp_path, timeout=60)
    assert finished.returncode == 0, finished.stderr


def test_a_run_whose_terminal_hangs_up_saves_exits_129_and_resumes(tmp_path):
    """An SSH connection dropped: the kernel sends SIGHUP, and writing to the terminal fails (EIO)."""
    flags = ["--epochs", "200", "--data-num-samples", "20000", "--logging-log-dir", str(tmp_path / "run")]
    pid, terminal = pty.fork()  # the run's stdout and stderr are the terminal: the progress bar is on
    if pid == 0:
        os.chdir(tmp_path)
        env = {k: v for k, v in cli_env().items() if k != "PYTHONUNBUFFERED"}  # buffered, as output usually is
        os.execve(sys.executable, [sys.executable, "-m", "llm.training.train", *flags], env)
    shown, deadline = b"", time.monotonic() + 120
    while b"epoch 1/200" not in shown and time.monotonic() < deadline:
        if select.select([terminal], [], [], 0.5)[0]:
            shown += os.read(terminal, 65536)
    os.close(terminal)  # the terminal goes away
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 129, shown[-2000:]
    step = int((tmp_path / "run/checkpoints/latest").read_text().strip().removeprefix("step_"))
    resumed = run([sys.executable, "-m", "llm.training.train", *flags, "--checkpoint-resume", "auto",
                   "--training-max-steps", str(step + 5)], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {tmp_path / 'run/checkpoints'}" in resumed.stdout
    assert json.loads((tmp_path / "run/summary.json").read_text())["steps"] == step + 5


def test_a_second_sigterm_ends_the_process_at_once_and_leaves_checkpoints_valid(tmp_path, reference):
    out = single(tmp_path / "run", tmp_path, env={"TWICE_AT_STEP": "10"})
    assert out.returncode == -signal.SIGTERM
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step_00000008"
    resumed = single(tmp_path / "run", tmp_path)
    assert resumed.returncode == 0
    assert_resumed_at(resumed, 8)
    assert_same(weights(reference), weights(tmp_path / "run"))


@pytest.fixture(scope="module")
def reference_2proc_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference2")
    out = torchrun(2, WORKER, *FLAGS, "--logging-log-dir", str(tmp / "run"), cwd=tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def reference_2proc(reference_2proc_dir):
    return weights(reference_2proc_dir, 0), weights(reference_2proc_dir, 1)


def test_a_one_process_checkpoint_resumed_on_two_is_warned_of_once_not_by_every_rank(tmp_path):
    one = run([sys.executable, str(WORKER), *FLAGS, "--training-max-steps", "4", "--logging-log-dir", "run"],
              cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, WORKER, *FLAGS, "--training-max-steps", "6", "--logging-log-dir", "run",
                   "--checkpoint-allow-config-change", "true", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("warning: resuming 1-process state on 2 processes: random streams restart") == 1, \
        two.stderr[-3000:]


def test_resuming_two_processes_checkpoint_on_one_is_refused_unless_allowed(tmp_path, reference_2proc_dir):
    # a different world size changes which samples each step takes: not the run that was saved
    checkpoint = reference_2proc_dir / "checkpoints"  # its newest valid checkpoint
    flags = [*FLAGS[:-2], "--logging-log-dir", str(tmp_path / "run"), "--checkpoint-resume", str(checkpoint)]
    refused = run([sys.executable, str(WORKER), *flags], cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "world_size (2 -> 1) changed" in refused.stderr and "--checkpoint-allow-config-change" in refused.stderr
    assert not (tmp_path / "run").exists()
    allowed = run([sys.executable, str(WORKER), *flags, "--checkpoint-allow-config-change", "true"], cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "world_size (2 -> 1)" in allowed.stdout and "resumed from" in allowed.stdout


@pytest.mark.parametrize("fault, background", [
    ({"KILL_AT_STEP": "7", "KILL_RANK": "1"}, False),  # mid-epoch, three steps after a checkpoint
    ({"KILL_IN_SAVE": "8", "KILL_RANK": "0"}, False),  # rank 0 dies while writing checkpoint 8: resume from 4
    ({"KILL_IN_SAVE": "8", "KILL_RANK": "0"}, True),  # the same on rank 0's saving thread, the loop going on
])
def test_two_processes_sigkill_of_one_rank_then_resume_matches(tmp_path, reference_2proc, reference_2proc_dir,
                                                             fault, background):
    flags = [*FLAGS, "--checkpoint-async-save", str(background)]
    killed = torchrun(2, WORKER, *flags, "--logging-log-dir", str(tmp_path / "run"), cwd=tmp_path, env=fault)
    assert killed.returncode != 0
    assert (tmp_path / "run" / f".fired-{next(iter(fault))}").exists()
    resumed = torchrun(2, WORKER, *flags, "--logging-log-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_resumed_at(resumed, 4)  # the last save before step 7, or the one before the save that was cut short
    for rank in (0, 1):
        assert_same(reference_2proc[rank], weights(tmp_path / "run", rank))
    assert_logged_the_same(reference_2proc_dir, tmp_path / "run")


def test_two_processes_sigterm_on_one_rank_stops_and_saves_on_both(tmp_path, reference_2proc, reference_2proc_dir):
    # step 5 is off the every-4-steps schedule: only the stop itself can have saved it
    stopped = torchrun(2, WORKER, *FLAGS, "--logging-log-dir", str(tmp_path / "run"), cwd=tmp_path,
                       env={"TERM_AT_STEP": "5", "TERM_RANK": "1"})
    assert stopped.returncode != 0
    assert stopped.stderr.count("stopped by SIGTERM at step 5") == 2
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step_00000005"
    resumed = torchrun(2, WORKER, *FLAGS, "--logging-log-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_00000005" in resumed.stdout
    for rank in (0, 1):
        assert_same(reference_2proc[rank], weights(tmp_path / "run", rank))
    assert_logged_the_same(reference_2proc_dir, tmp_path / "run")


@pytest.mark.parametrize("fault", [
    # killed outright: torchrun put each worker in a session of its own and forwards no signal
    {"KILL_AGENT_AT_STEP": "5", "SLOW_FROM_STEP": "5", "SLOW_S": "0.2"},
    # SIGTERM, forwarded to the workers, then SIGKILL while they still finish their step: no second stop
    {"TERM_THEN_KILL_AGENT_AT_STEP": "5", "SLOW_FROM_STEP": "5", "SLOW_S": "2.5"},
    # SIGTERM to every process at once (SLURM, systemd): rank 0 gets it twice, from the agent too
    {"TERM_ALL_AT_STEP": "5", "SLOW_FROM_STEP": "5", "SLOW_S": "1"},
    # killed before the engine was built: the worker's parent is no longer the agent when it looks
    {"KILL_AGENT_BEFORE_ENGINE": "1", "SLOW_FROM_STEP": "0", "SLOW_S": "0.2"},
], ids=["agent killed", "agent terminated then killed", "every process terminated", "agent killed early"])
def test_workers_stop_save_and_resume_exactly_whatever_becomes_of_their_torchrun_agent(tmp_path, reference_2proc,
                                                                                       reference_2proc_dir, fault):
    stopped = torchrun(2, WORKER, *FLAGS, "--logging-log-dir", str(tmp_path / "run"), cwd=tmp_path, env=fault)
    # the workers write into the agent's output, which ends only once they have ended too
    assert stopped.returncode == (-signal.SIGKILL if "AGENT" in "".join(fault) else 1)
    # killed outright, within a second of the kill (the watch looks each second), not at the run's end
    killed = {"KILL_AGENT_AT_STEP", "KILL_AGENT_BEFORE_ENGINE"} & fault.keys()
    said = "a torchrun agent of this job is gone (taken as SIGTERM)" if killed else \
        "stopped by SIGTERM at step"
    assert stopped.stderr.count(said) == 2, stopped.stderr[-3000:]
    step = int((tmp_path / "run/checkpoints/latest").read_text().strip().removeprefix("step_"))
    assert 1 <= step < 28 if killed else step == 5
    assert not (tmp_path / "run/.llm.lock").exists()
    resumed = torchrun(2, WORKER, *FLAGS, "--logging-log-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_resumed_at(resumed, step)
    for rank in (0, 1):
        assert_same(reference_2proc[rank], weights(tmp_path / "run", rank))
    assert_logged_the_same(reference_2proc_dir, tmp_path / "run")


def test_torchrun_max_restarts_resumes_a_dead_worker_in_its_launchs_folder_not_an_earlier_runs(tmp_path,
                                                                                                 reference_2proc):
    # restarted workers can hang in init_process_group when they share the agent's rendezvous store
    # (pytorch issue 135712); docs/distributed.md gives the same setting
    earlier = tmp_path / "runs/regression"
    earlier.mkdir(parents=True)
    (earlier / "notes.txt").write_text("an earlier run\n")
    flags = [f for f in FLAGS if f not in ("--checkpoint-resume", "auto")]  # a fresh run, as users start one
    out = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
               "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", str(WORKER), *flags],
              cwd=tmp_path, env={"KILL_AT_STEP": "9", "KILL_RANK": "0", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "runs/regression-2/.fired-KILL_AT_STEP").exists()
    assert "resumed from runs/regression-2/checkpoints/step_00000008" in out.stdout
    assert sorted(p.name for p in earlier.iterdir()) == ["notes.txt"]
    assert_same(reference_2proc[0], weights(tmp_path / "runs/regression-2", 0))


def test_torchrun_max_restarts_on_two_nodes_resumes_every_rank_in_the_launchs_folder(tmp_path, reference_2proc):
    # torchrun counts a restart only on the node whose worker failed: the other node's restarted worker is told
    # it is a first start. The ranks agree that the launch was restarted, and find its folder from either node.
    earlier = tmp_path / "runs/regression"
    earlier.mkdir(parents=True)
    (earlier / "notes.txt").write_text("an earlier run\n")
    flags = [f for f in FLAGS if f not in ("--checkpoint-resume", "auto")]  # a fresh run, as users start one
    run_dir = tmp_path / "runs/regression-2"
    two_nodes(WORKER, *flags, cwd=tmp_path, torchrun_flags=("--max-restarts=1",),
              env={"KILL_AT_STEP": "9", "KILL_RANK": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
              done=[run_dir / "weights_rank0.pt", run_dir / "weights_rank1.pt", run_dir / "summary.json"])
    assert (run_dir / ".fired-KILL_AT_STEP").exists() and not (tmp_path / "runs/regression-3").exists()
    assert "resumed from runs/regression-2/checkpoints/step_00000008" in (tmp_path / "agent0.log").read_text() + \
        (tmp_path / "agent1.log").read_text()
    for rank in (0, 1):
        assert_same(reference_2proc[rank], weights(run_dir, rank))


def test_a_stopped_run_in_the_next_free_folder_is_told_how_to_continue_there(tmp_path):
    (tmp_path / "my runs/regression").mkdir(parents=True)
    (tmp_path / "my runs/regression/notes.txt").write_text("an earlier run\n")
    flags = [f for f in FLAGS if f not in ("--checkpoint-resume", "auto")]
    stopped = run([sys.executable, str(WORKER), *flags, "--logging-log-dir", "my runs/regression"], cwd=tmp_path,
                  env={"TERM_AT_STEP": "5"})
    assert stopped.returncode == 143
    assert stopped.stderr.strip().endswith(  # quoted for the shell
        "continue with --checkpoint-resume auto --logging-log-dir 'my runs/regression-2'"), stopped.stderr[-1000:]


def fsdp_flags(tmp_path: Path) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{i}: it was the best of times, it was the worst of times.\n" for i in range(400)))
    return ["--task", "lm", "--distributed-strategy", "fsdp", "--data-path", str(corpus),
            "--data-cache-dir", str(tmp_path / "cache"), "--model-n-layer", "2", "--model-n-head", "2",
            "--model-n-embd", "32", "--model-block-size", "16", "--model-dropout", "0.1",
            "--training-batch-size", "4", "--training-max-steps", "12", "--training-eval-every-steps", "6",
            "--training-eval-batches", "2", "--checkpoint-every-n-steps", "4", "--checkpoint-keep-best", "0",
            "--checkpoint-resume", "auto", "--logging-progress-bar", "false"]


@pytest.fixture(scope="module")
def fsdp_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp-reference")
    ref = torchrun(2, WORKER, *fsdp_flags(tmp), "--logging-log-dir", str(tmp / "ref"), cwd=tmp)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert (tmp / "ref/checkpoints/step_00000004/sharded").is_dir()
    return tmp / "ref"


@pytest.mark.parametrize("background", [False, True], ids=["saved-in-the-loop", "saved-in-the-background"])
def test_fsdp_sharded_checkpoints_resume_exactly_after_sigkill(tmp_path, fsdp_reference, background):
    flags = fsdp_flags(tmp_path)
    # in the background, the shards go over a group of their own while the loop's collectives go on: rank 0 dies
    # on its saving thread, part way through checkpoint 8
    flags += ["--checkpoint-async-save", str(background)]
    fault = {"KILL_IN_SAVE": "8", "KILL_RANK": "0"} if background else {"KILL_AT_STEP": "7", "KILL_RANK": "1"}
    killed = torchrun(2, WORKER, *flags, "--logging-log-dir", str(tmp_path / "run"), cwd=tmp_path, env=fault)
    assert killed.returncode != 0
    resumed = torchrun(2, WORKER, *flags, "--logging-log-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_00000004" in resumed.stdout
    for rank in (0, 1):  # each rank's final shard of the weights, as a plain state dict
        assert_same(weights(fsdp_reference, rank), weights(tmp_path / "run", rank))
    assert_logged_the_same(fsdp_reference, tmp_path / "run")
    exported = run([sys.executable, "-m", "llm.export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "m.safetensors")],
                   cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    # the export gathers the shards: each tensor is rank 0's rows, then rank 1's
    whole = load_file(tmp_path / "m.safetensors")
    shards = weights(tmp_path / "run", 0), weights(tmp_path / "run", 1)
    assert whole.keys() <= shards[0].keys() and "blocks.0.attn.qkv.weight" in whole
    for name, tensor in whole.items():
        assert torch.equal(tensor, torch.cat([shards[0][name], shards[1][name]])), name
