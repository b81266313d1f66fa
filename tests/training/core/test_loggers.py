"""MLflow and wandb loggers, against a stand-in engine and the real libraries writing under tmp_path."""

from __future__ import annotations

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
    train(resumed, engine_for(tmp_path, training={"epochs": 5}), [{"split": "train", "step": 6, "epoch": 1, "loss": 0.75}])

    assert resumed.run_id == first.run_id
    client = mlflow.tracking.MlflowClient(uri)
    assert history(client, first.run_id, "train/loss") == [(2, 1.5), (6, 0.75)]
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.params["training.epochs"] == "2"
    assert len(client.search_runs([run.info.experiment_id])) == 1


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


def test_a_logger_without_its_package_fails_at_start_with_the_install_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(UsageError, match=r"^logger 'mlflow' needs the mlflow package: pip install mlflow$"):
        MLflowLogger().on_train_start(engine_for(tmp_path))


# ---- wandb --------------------------------------------------------------------------


def test_wandb_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match=r"WandbLogger mode: got 'ofline', expected one of offline, online, disabled"):
        WandbLogger(mode="ofline")


def test_wandb_offline_run_in_the_run_dir_with_config_and_metrics(tmp_path):
    pytest.importorskip("wandb")
    engine = engine_for(tmp_path)
    logger = WandbLogger(project="proj")
    logger.on_train_start(engine)
    run = logger._run
    assert run.settings.mode == "offline" and run.project == "proj" and run.name == "run"
    assert run.config["training"]["batch_size"] == 16
    for record in RECORDS:
        logger.on_log(engine, record)
    logger.on_log(engine, {"split": "train", "step": 6, "epoch": 1, "loss": 0.75})  # commits the row of step 4
    summary = dict(run.summary)
    assert summary["train/loss"] == 1.25 and summary["val/val_loss"] == 1.375 and summary["_step"] == 4
    assert summary["epoch/train_loss"] == 1.375
    logger.on_train_end(engine, {"train_loss": 0.75})

    assert logger._run is None and logger.state_dict() == {"run_id": run.id}
    files = list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run.id}/run-{run.id}.wandb"))
    assert len(files) == 1
    # finish() can return before wandb's own service process has written the records out
    deadline = time.monotonic() + 30
    while b"val/val_loss" not in files[0].read_bytes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b"val/val_loss" in files[0].read_bytes()
