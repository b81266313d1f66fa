"""MLflow and wandb loggers, against a stand-in engine and the real libraries writing under tmp_path."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from llm.errors import UsageError
from llm.training.core.callbacks import Callback
from llm.training.core.loggers import LOGGERS, MLflowLogger, WandbLogger, flatten, missing_package
from tests.helpers import StubEngine, tiny_config

RECORDS = [
    {"split": "train", "step": 2, "epoch": 0, "loss": 1.5, "lr": 0.1, "grad_norm": 3.0, "samples_per_s": 900.0},
    {"split": "train", "step": 4, "epoch": 0, "loss": 1.25, "lr": 0.05, "note": "not a number"},
    {"split": "val", "step": 4, "epoch": 0, "val_loss": 1.375},
    {"split": "epoch", "step": 4, "epoch": 1, "train_loss": 1.375, "val_loss": 1.375},
]


@pytest.fixture(autouse=True)
def tracker_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No tracker settings from the caller's shell, and none left behind (the MLflow logger sets one)."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID",
                 "WANDB_RESUME", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.setenv(name, "")  # records the original value, so teardown restores it, absent included
        monkeypatch.delenv(name)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # keep wandb out of ~
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))


def engine_for(tmp_path: Path, is_main: bool = True, **sections) -> StubEngine:
    config = tiny_config(tmp_path, **sections)
    return StubEngine(config, is_main=is_main, run_dir=tmp_path / "run")


def train(logger: Callback, engine: StubEngine, records: list[dict], metrics: dict[str, float] | None = None) -> None:
    logger.on_train_start(engine)
    for record in records:
        logger.on_log(engine, record)
    logger.on_train_end(engine, {"train_loss": 1.0} if metrics is None else metrics)


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_flatten_joins_nested_keys_with_dots():
    assert flatten({"training": {"batch_size": 16, "amp": {"dtype": "bf16"}}, "task": "lm"}) == {
        "training.batch_size": 16, "training.amp.dtype": "bf16", "task": "lm"}


# ---- MLflow --------------------------------------------------------------------------


def test_mlflow_logs_params_and_every_numeric_metric_by_step(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = (tmp_path / "store").as_uri()
    logger = MLflowLogger(tracking_uri=uri, experiment="exp", run_name="first")
    train(logger, engine_for(tmp_path), RECORDS)

    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(logger.run_id)
    assert run.info.run_name == "first" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "exp"
    assert history(client, logger.run_id, "train/loss") == [(2, 1.5), (4, 1.25)]
    assert history(client, logger.run_id, "train/lr") == [(2, 0.1), (4, 0.05)]
    assert history(client, logger.run_id, "val/val_loss") == [(4, 1.375)]
    assert history(client, logger.run_id, "epoch/train_loss") == [(4, 1.375)]
    assert set(run.data.metrics) == {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s",
                                     "val/val_loss", "epoch/train_loss", "epoch/val_loss"}
    params = run.data.params
    assert params["training.batch_size"] == "16" and params["model.n_embd"] == "16" and params["task"] == "regression"
    assert params["logging.log_dir"] == str(tmp_path / "run")


def test_a_tracker_that_fails_mid_run_is_warned_of_once_and_the_run_goes_on_without_it(tmp_path, monkeypatch):
    """A tracking server down for longer than MLflow's retries raised out of the callback: the run failed with a
    traceback, and lost the training since its last checkpoint."""
    mlflow = pytest.importorskip("mlflow")
    logger = MLflowLogger(tracking_uri=(tmp_path / "store").as_uri(), experiment="exp")
    engine = engine_for(tmp_path)
    logger.on_train_start(engine)
    calls = []

    def down(*args, **kwargs):
        calls.append(args)
        raise mlflow.exceptions.MlflowException("503 Service Unavailable")

    monkeypatch.setattr(logger._client, "log_batch", down)
    monkeypatch.setattr(logger._client, "set_terminated", down)
    with pytest.warns(UserWarning, match=r"^MLflow: logging step 2 to run \w+ failed \(MlflowException: 503 Service "
                                         r"Unavailable\): the run goes on without MLflow; metrics.jsonl keeps every "
                                         r"record$") as warned:
        for record in RECORDS:
            logger.on_log(engine, record)
        logger.on_train_end(engine, {"train_loss": 1.0})
    assert len(calls) == 1 and len(warned) == 1  # given up at once: no further calls, nor warnings


def test_mlflow_defaults_to_a_file_store_in_the_run_dir_named_after_it(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    logger = MLflowLogger()
    train(logger, engine_for(tmp_path), RECORDS[:1])

    store = tmp_path / "run" / "mlruns"
    assert store.is_dir()
    run = mlflow.tracking.MlflowClient(store.as_uri()).get_run(logger.run_id)
    assert run.info.run_name == "run" and run.data.metrics["train/loss"] == 1.5


def test_mlflow_tracking_uri_from_the_environment(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    elsewhere = (tmp_path / "elsewhere").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    logger = MLflowLogger()
    train(logger, engine_for(tmp_path), RECORDS[:1])

    assert not (tmp_path / "run" / "mlruns").exists()
    assert mlflow.tracking.MlflowClient(elsewhere).get_run(logger.run_id).data.metrics["train/loss"] == 1.5


def test_mlflow_marks_the_run_failed_when_training_raised(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = (tmp_path / "store").as_uri()
    logger = MLflowLogger(tracking_uri=uri)
    train(logger, engine_for(tmp_path), RECORDS[:1], metrics={})  # the engine hands {} after an error
    assert mlflow.tracking.MlflowClient(uri).get_run(logger.run_id).info.status == "FAILED"


def test_mlflow_resumed_training_continues_the_same_run(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = (tmp_path / "store").as_uri()
    first = MLflowLogger(tracking_uri=uri)
    train(first, engine_for(tmp_path), RECORDS[:1])

    resumed = MLflowLogger(tracking_uri=uri)
    resumed.load_state_dict(first.state_dict())
    # a resume may change a harmless setting; MLflow forbids changing a param, so the first value stays
    engine = engine_for(tmp_path, training={"epochs": 5})
    engine.continues_run = True
    train(resumed, engine, [{"split": "train", "step": 6, "epoch": 1, "loss": 0.75}])

    assert resumed.run_id == first.run_id
    client = mlflow.tracking.MlflowClient(uri)
    assert history(client, first.run_id, "train/loss") == [(2, 1.5), (6, 0.75)]
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.params["training.epochs"] == "2"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_mlflow_a_branch_from_another_runs_checkpoint_is_a_run_of_its_own(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = (tmp_path / "store").as_uri()
    parent = MLflowLogger(tracking_uri=uri)
    train(parent, engine_for(tmp_path), RECORDS[:1])

    branch = MLflowLogger(tracking_uri=uri)
    branch.load_state_dict(parent.state_dict())  # the parent's id, restored with its checkpoint
    train(branch, engine_for(tmp_path), [{"split": "train", "step": 6, "epoch": 1, "loss": 0.75}])  # continues_run False

    assert branch.run_id != parent.run_id
    client = mlflow.tracking.MlflowClient(uri)
    assert history(client, parent.run_id, "train/loss") == [(2, 1.5)]
    assert history(client, branch.run_id, "train/loss") == [(6, 0.75)]


def test_mlflow_marks_a_run_stopped_by_a_signal_killed_not_finished(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = (tmp_path / "store").as_uri()
    logger = MLflowLogger(tracking_uri=uri)
    engine = engine_for(tmp_path)
    engine.interrupted_by = signal.SIGTERM  # the engine saved the run and hands its metrics, to be resumed
    train(logger, engine, RECORDS[:1])
    assert mlflow.tracking.MlflowClient(uri).get_run(logger.run_id).info.status == "KILLED"


def test_tracker_names_from_their_own_environment_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    monkeypatch.setenv("WANDB_PROJECT", "proj-from-env")
    assert MLflowLogger().experiment == "from-env" and WandbLogger().project == "proj-from-env"
    assert MLflowLogger(experiment="given").experiment == "given" and WandbLogger(project="given").project == "given"
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    monkeypatch.delenv("WANDB_PROJECT")
    assert MLflowLogger().experiment == "llm" and WandbLogger().project == "llm"


def test_mlflow_starts_a_new_run_when_the_saved_one_is_not_in_the_store(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = (tmp_path / "store").as_uri()
    logger = MLflowLogger(tracking_uri=uri)
    logger.load_state_dict({"run_id": "0123456789abcdef0123456789abcdef"})
    train(logger, engine_for(tmp_path), RECORDS[:1])
    assert logger.run_id != "0123456789abcdef0123456789abcdef"
    assert mlflow.tracking.MlflowClient(uri).get_run(logger.run_id).data.metrics["train/loss"] == 1.5


def test_mlflow_in_a_deleted_experiment_is_one_line_naming_it(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as the logger sets it for a file store
    uri = (tmp_path / "store").as_uri()
    client = mlflow.tracking.MlflowClient(uri)
    client.delete_experiment(client.create_experiment("llm"))
    with pytest.raises(UsageError, match=r"^MLflow experiment 'llm' in file:.*store is deleted: restore it"):
        MLflowLogger(tracking_uri=uri).on_train_start(engine_for(tmp_path))


def test_mlflow_does_nothing_off_rank_0(tmp_path):
    logger = MLflowLogger()
    train(logger, engine_for(tmp_path, is_main=False), RECORDS)  # needs no mlflow: nothing is imported
    assert logger.run_id is None and not (tmp_path / "run" / "mlruns").exists()


# ---- missing packages ------------------------------------------------------------------


def test_missing_package_gives_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an absent package looks like to the import system
    assert missing_package("mlflow") == "logger 'mlflow' needs the mlflow package: pip install mlflow"

    class Absent(Callback):
        package = "llm_test_no_such_package"

    monkeypatch.setitem(LOGGERS, "absent", Absent)
    assert missing_package("absent") == (
        "logger 'absent' needs the llm_test_no_such_package package: pip install llm_test_no_such_package")


def test_missing_package_is_none_when_importable(monkeypatch):
    class Present(Callback):
        package = "json"

    monkeypatch.setitem(LOGGERS, "present", Present)
    assert missing_package("present") is None


def test_missing_package_rejects_an_unknown_logger():
    with pytest.raises(UsageError, match=r"unknown logger 'mlfow': expected one of mlflow, wandb \(did you mean mlflow\?\)"):
        missing_package("mlfow")


def test_a_broken_install_is_one_line_with_the_import_error(tmp_path, monkeypatch):
    # an installed package whose import fails, as mlflow does against a protobuf it does not support
    fake = tmp_path / "site" / "mlflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise TypeError("Descriptors cannot be created directly.\\nmore")\n')
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    assert missing_package("mlflow") == ("logger 'mlflow': importing mlflow failed: TypeError: Descriptors "
                                         "cannot be created directly. more")
    (fake / "__init__.py").write_text("import llm_test_no_such_dependency\n")
    monkeypatch.delitem(sys.modules, "mlflow", raising=False)  # a failed import leaves none
    assert missing_package("mlflow") == ("logger 'mlflow': importing mlflow failed: ModuleNotFoundError: "
                                         "No module named 'llm_test_no_such_dependency'")


def test_a_logger_without_its_package_fails_at_start_with_the_install_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(UsageError, match=r"^logger 'mlflow' needs the mlflow package: pip install mlflow$"):
        MLflowLogger().on_train_start(engine_for(tmp_path))


# ---- wandb --------------------------------------------------------------------------


def test_wandb_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match=r"WandbLogger mode: got 'ofline', expected one of offline, online, disabled"):
        WandbLogger(mode="ofline")


def test_wandb_takes_its_mode_from_wandb_mode_unless_given_one(tmp_path, monkeypatch):
    assert WandbLogger().mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # online, too, for a user with an account: not run here
    assert WandbLogger().mode == "disabled" and WandbLogger(mode="offline").mode == "offline"
    pytest.importorskip("wandb")
    engine = engine_for(tmp_path)
    logger = WandbLogger()
    logger.on_train_start(engine)
    logger.on_log(engine, RECORDS[0])
    logger.on_train_end(engine, {"val_loss": 1.0})
    assert not (tmp_path / "run" / "wandb").exists()  # disabled: nothing written, no offline run to sync
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # wandb's older name of offline
    assert WandbLogger().mode == "dryrun"
    monkeypatch.setenv("WANDB_MODE", "ofline")
    with pytest.raises(UsageError, match=r"^WANDB_MODE: got 'ofline', expected one of offline, online, disabled "
                                         r"\(or unset: offline\) \(did you mean offline\?\)$"):
        WandbLogger()
    monkeypatch.setenv("WANDB_MODE", "")  # which wandb itself refuses, after the run's set-up
    with pytest.raises(UsageError, match=r"^WANDB_MODE: got '', expected one of offline"):
        WandbLogger()


def test_wandb_offline_run_in_the_run_dir_with_config_and_metrics_sent_as_logged(tmp_path):
    pytest.importorskip("wandb")
    engine = engine_for(tmp_path)
    logger = WandbLogger(project="proj")
    logger.on_train_start(engine)
    run = logger._run
    assert run.settings.mode == "offline" and run.project == "proj" and run.name == "run"
    assert run.config["training"]["batch_size"] == 16
    for record in RECORDS:
        logger.on_log(engine, record)
    # committed as logged, the last step's records included: a row keyed by wandb's own step waits in this
    # process for a later step's, and a kill (the OOM killer) lost it
    summary = dict(run.summary)
    assert summary["train/loss"] == 1.25 and summary["val/val_loss"] == 1.375 and summary["step"] == 4
    assert summary["epoch/train_loss"] == 1.375
    logger.on_train_end(engine, {"train_loss": 0.75})

    assert logger._run is None and logger.state_dict() == {"run_id": run.id}
    files = list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run.id}/run-{run.id}.wandb"))
    assert len(files) == 1
    # finish() can return before wandb's own service process has written the records out
    deadline = time.monotonic() + 30
    while b"epoch/train_loss" not in files[0].read_bytes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b"epoch/train_loss" in files[0].read_bytes()


def test_wandb_that_cannot_start_is_one_line_naming_where(tmp_path):
    pytest.importorskip("wandb")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "wandb").write_text("a file where wandb makes its folder")
    with pytest.raises(UsageError, match=rf"^W&B \(offline, in {tmp_path / 'run'}\): cannot start a run: "):
        WandbLogger().on_train_start(engine_for(tmp_path))


def test_wandb_continues_its_own_run_on_resume_and_starts_another_on_a_branch(tmp_path):
    pytest.importorskip("wandb")
    first = WandbLogger()
    train(first, engine_for(tmp_path), RECORDS[:1])

    resumed = WandbLogger()
    resumed.load_state_dict(first.state_dict())
    engine = engine_for(tmp_path)
    engine.continues_run = True  # its own folder's checkpoint
    train(resumed, engine, [{"split": "train", "step": 6, "epoch": 1, "loss": 0.75}])
    assert resumed.run_id == first.run_id

    branch = WandbLogger()
    branch.load_state_dict(first.state_dict())
    train(branch, engine_for(tmp_path), [{"split": "train", "step": 6, "epoch": 1, "loss": 0.5}])  # another run's
    assert branch.run_id != first.run_id


def test_wandb_run_stopped_by_a_signal_is_preempted_with_the_process_exit_code(tmp_path):
    pytest.importorskip("wandb")
    logger, engine = WandbLogger(), engine_for(tmp_path)
    logger.on_train_start(engine)
    run, calls = logger._run, []
    real_finish = run.finish
    run.mark_preempting = lambda: calls.append("preempting")
    run.finish = lambda exit_code=None: (calls.append(exit_code), real_finish(exit_code=exit_code))
    engine.interrupted_by = signal.SIGTERM
    logger.on_train_end(engine, {"train_loss": 1.0})
    assert calls == ["preempting", 143]


# ---- through the command line ------------------------------------------------------------

CLI = ["--task", "regression", "--data-num-samples", "160", "--data-input-dim", "4", "--model-n-layer", "1",
       "--model-n-embd", "8", "--training-batch-size", "16", "--logging-log-every-steps", "2",
       "--logging-progress-bar", "false"]


def test_the_cli_continues_the_tracker_run_on_resume_and_starts_one_for_a_branch(tmp_path, monkeypatch, capsys):
    mlflow = pytest.importorskip("mlflow")
    from llm.training.train import main

    uri = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    assert main([*CLI, "--training-max-steps", "4", "--logging-loggers", "mlflow", "--logging-log-dir", str(run_a)]) == 0
    # resumed with one more logger listed first: the tracker's saved run is still its own
    assert main([*CLI, "--training-max-steps", "6", "--logging-loggers", "tensorboard,mlflow",
                 "--logging-log-dir", str(run_a), "--checkpoint-resume", "auto"]) == 0
    # a branch from a's step 4 into a folder of its own
    assert main([*CLI, "--training-max-steps", "6", "--logging-loggers", "mlflow", "--logging-log-dir", str(run_b),
                 "--checkpoint-resume", str(run_a / "checkpoints" / "step_00000004")]) == 0

    client = mlflow.tracking.MlflowClient(uri)
    found = client.search_runs([client.get_experiment_by_name("llm").experiment_id])
    assert sorted(r.info.run_name for r in found) == ["a", "b"]  # one run each: none split, none shared
    runs = {r.info.run_name: r for r in found}
    assert [step for step, _ in history(client, runs["a"].info.run_id, "train/loss")] == [2, 4, 6]
    assert [step for step, _ in history(client, runs["b"].info.run_id, "train/loss")] == [6]
    assert runs["b"].data.params["logging.log_dir"] == str(run_b)


def test_the_cli_with_a_broken_tracker_install_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from llm.training.train import main

    fake = tmp_path / "site" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise TypeError("Descriptors cannot be created directly")\n')
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in [m for m in sys.modules if m == "wandb" or m.startswith("wandb.")]:
        monkeypatch.delitem(sys.modules, name)
    run = tmp_path / "run"
    assert main([*CLI, "--logging-loggers", "tensorboard,wandb", "--logging-log-dir", str(run)]) == 2
    assert capsys.readouterr().err == ("error: logger 'wandb': importing wandb failed: TypeError: Descriptors cannot "
                                       "be created directly\n")
    assert not run.exists()
