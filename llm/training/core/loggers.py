"""Experiment trackers as callbacks: MLflow and Weights & Biases.

Each imports its library in ``on_train_start``, so the framework runs without
them; :func:`missing_package` says what to install before a run starts. Both
act on rank 0 only, log the config once, then every numeric value of every log
record as ``<split>/<name>`` at the record's step (``train/loss``,
``val/val_loss``), the same tags the TensorBoard logger writes. The tracker's
run id is saved with the checkpoint, so a resumed training continues its run; a
branch from another run's checkpoint (``engine.continues_run`` false) starts a
run of its own. A run stopped by a signal, to be resumed, is not marked finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from llm.errors import UsageError, causes, closest, one_line
from llm.training.core.callbacks import Callback, flatten, scalars

if TYPE_CHECKING:
    from llm.training.core.engine import TrainingEngine

log = logging.getLogger("llm")


@contextlib.contextmanager
def _unless_set(**variables: str) -> Iterator[None]:
    """Set environment variables for the ``with`` block, keeping each that is set already."""
    added = [name for name in variables if name not in os.environ]
    os.environ.update({name: variables[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _import(logger: str) -> Any:
    problem = missing_package(logger)
    if problem:
        raise UsageError(problem)
    return importlib.import_module(LOGGERS[logger].package)


class MLflowLogger(Callback):
    """Logs params and metrics to MLflow; by default to a file store in ``<run_dir>/mlruns``, no server.

    The tracking URI is ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else that
    file store (browse it with ``mlflow ui --backend-store-uri <run_dir>/mlruns``).
    """

    package = "mlflow"

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None, run_name: str | None = None):
        # MLflow's own variable names the experiment when the code does not
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "llm"
        self.tracking_uri, self.run_name = tracking_uri, run_name
        self.run_id: str | None = None
        self._client = None

    def on_train_start(self, engine: TrainingEngine) -> None:
        if not engine.is_main:
            return
        _import("mlflow")
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (Path(engine.run_dir).resolve() / "mlruns").as_uri()
        if urlparse(uri).scheme in ("", "file"):
            # MLflow 3 refuses its file store unless this is set; it is the only store
            # that needs no database and no server. An explicit setting is kept.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            with _unless_set(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="20"):
                # a server that is not there is said now, not after minutes of retries; later calls retry
                client = MlflowClient(uri)
                found = client.get_experiment_by_name(self.experiment)  # the first call that reaches the store
        except Exception as e:  # noqa: BLE001 - MLflow raises its own and its HTTP library's errors
            socket = [c for c in causes(e) if isinstance(c, OSError)][-1:]  # the server not reached, and why
            why = f"cannot reach it ({socket[0].strerror or one_line(socket[0])})" if socket else one_line(e)
            raise UsageError(f"MLflow tracking URI {uri}: {why}; check MLFLOW_TRACKING_URI, or unset it "
                             f"for the run's own file store") from None
        run = None
        if self.run_id is not None and engine.continues_run:  # restored from this run's checkpoint: continue it
            try:
                run = client.get_run(self.run_id)
                client.update_run(self.run_id, status="RUNNING")
            except MlflowException:
                log.warning(f"MLflow run {self.run_id} is not in {uri}: starting a new run")
                run = None
        if run is None:
            if found is not None and found.lifecycle_stage == "deleted":  # MLflow keeps its name, refuses runs in it
                raise UsageError(f"MLflow experiment {self.experiment!r} in {uri} is deleted: restore it (mlflow "
                                 f"experiments restore) or delete it for good (mlflow gc) to start runs in it")
            try:
                experiment_id = found.experiment_id if found else client.create_experiment(self.experiment)
                run = client.create_run(experiment_id, run_name=self.run_name or Path(engine.run_dir).name)
            except MlflowException as e:
                raise UsageError(f"MLflow tracking URI {uri}: cannot start a run in experiment "
                                 f"{self.experiment!r}: {one_line(e)}") from None
        self.run_id, self._client = run.info.run_id, client
        # MLflow forbids changing a param, so a resumed run keeps the values it started with
        flat = flatten(dataclasses.asdict(engine.config))  # the paths as filled in
        params = [Param(k, str(v)) for k, v in flat.items() if k not in run.data.params]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params
            client.log_batch(self.run_id, params=params[i:i + 100])

    def on_log(self, engine: TrainingEngine, record: dict[str, Any]) -> None:
        if self._client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, record["step"]) for key, value in scalars(record)]
        if metrics:
            try:
                self._client.log_batch(self.run_id, metrics=metrics)
            except Exception as e:  # noqa: BLE001 - a tracking server down longer than MLflow's own retries
                self._client = None
                _gone_on_without("MLflow", f"logging step {record['step']} to run {self.run_id}", e)

    def on_train_end(self, engine: TrainingEngine, metrics: dict[str, float]) -> None:
        if self._client is None:
            return
        # the engine hands empty metrics when training raised; a run stopped by a signal is saved, to be resumed
        status = "FAILED" if not metrics else "KILLED" if engine.interrupted_by is not None else "FINISHED"
        client, self._client = self._client, None
        try:
            client.set_terminated(self.run_id, status=status)
        except Exception as e:  # noqa: BLE001 - as in on_log: the run's own records are whole
            _gone_on_without("MLflow", f"marking run {self.run_id} {status}", e)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id")


class WandbLogger(Callback):
    """Logs the config and metrics to Weights & Biases; offline by default (``wandb sync`` uploads later), or
    as ``mode``, else wandb's own variable WANDB_MODE, says.

    Files go to ``<dir>/wandb``, ``dir`` defaulting to the run directory.
    """

    package = "wandb"
    MODES = ("offline", "online", "disabled")
    ALIASES = ("dryrun", "run", "shared")
    """Other modes wandb takes from WANDB_MODE: older names of offline and online, and shared."""

    def __init__(self, project: str | None = None, mode: str | None = None, dir: str | None = None,
                 run_name: str | None = None):
        if mode is not None and mode not in self.MODES:
            raise ValueError(f"WandbLogger mode: got {mode!r}, expected one of {', '.join(self.MODES)}")
        if mode is None and os.environ.get("WANDB_MODE") not in (None, *self.MODES, *self.ALIASES):
            # wandb reads it itself, and refuses an empty one as any other it does not know
            raise UsageError(f"WANDB_MODE: got {os.environ['WANDB_MODE']!r}, expected one of {', '.join(self.MODES)} "
                             f"(or unset: offline){closest(os.environ['WANDB_MODE'], self.MODES)}")
        mode = mode or os.environ.get("WANDB_MODE") or "offline"
        self.project = project or os.environ.get("WANDB_PROJECT") or "llm"  # wandb's own variable, when set
        self.mode, self.dir, self.run_name = mode, dir, run_name
        self.run_id: str | None = None
        self._run = None

    def on_train_start(self, engine: TrainingEngine) -> None:
        if not engine.is_main:
            return
        wandb = _import("wandb")
        run_dir = Path(engine.run_dir)
        if not engine.continues_run:  # a branch from another run's checkpoint is a run of its own
            self.run_id = None
        where = str(self.dir or run_dir)  # wandb creates it
        try:
            self._run = wandb.init(
                project=self.project,
                mode=self.mode,
                dir=where,
                name=self.run_name or run_dir.name,
                config=dataclasses.asdict(engine.config),
                id=self.run_id,  # None starts a new run; a restored id continues it
                resume="allow" if self.run_id else None,
            )
        except Exception as e:  # noqa: BLE001 - wandb raises its own errors and the OS's: one line, as MLflow's
            raise UsageError(f"W&B ({self.mode}, in {where}): cannot start a run: {type(e).__name__}: "
                             f"{one_line(e)}") from None
        self.run_id = self._run.id
        # Each record is a row of its own, sent as it is logged, on the run's own step as x axis: a row keyed by
        # wandb's step stays in this process until a later step's comes, so a kill lost the last one logged
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")

    def on_log(self, engine: TrainingEngine, record: dict[str, Any]) -> None:
        if self._run is None:
            return
        values = dict(scalars(record))
        if values:
            try:
                self._run.log({**values, "step": record["step"]})
            except Exception as e:  # noqa: BLE001 - as MLflowLogger's: the run goes on without the tracker
                run, self._run = self._run, None
                with contextlib.suppress(Exception):
                    run.finish(exit_code=1)
                _gone_on_without("W&B", f"logging step {record['step']} to run {self.run_id}", e)

    def on_train_end(self, engine: TrainingEngine, metrics: dict[str, float]) -> None:
        if self._run is None:
            return
        if not metrics:  # training raised
            self._run.finish(exit_code=1)
        elif engine.interrupted_by is not None:  # stopped by a signal and saved, to be resumed: as the process exits
            self._run.mark_preempting()
            self._run.finish(exit_code=128 + engine.interrupted_by)
        else:
            self._run.finish(exit_code=0)
        self._run = None

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id")


def _gone_on_without(tracker: str, what: str, error: Exception) -> None:
    """Warn that a tracker failed mid-run and the run goes on without it: an outage of a tracking server is no
    reason to lose the training since the last checkpoint."""
    warnings.warn(f"{tracker}: {what} failed ({type(error).__name__}: {one_line(error)}): the run goes on without "
                  f"{tracker}; metrics.jsonl keeps every record")


LOGGERS: dict[str, type[MLflowLogger] | type[WandbLogger]] = {"mlflow": MLflowLogger, "wandb": WandbLogger}
"""Experiment trackers by the name a config uses."""


def missing_package(name: str) -> str | None:
    """One line when logger ``name``'s library cannot be imported (an install hint when it is not installed,
    the import's own error when it is broken), else None. It imports the library, as the logger will."""
    if name not in LOGGERS:
        raise UsageError(f"unknown logger {name!r}: expected one of {', '.join(LOGGERS)}{closest(name, LOGGERS)}")
    package = LOGGERS[name].package
    try:
        importlib.import_module(package)
    except ModuleNotFoundError as e:
        if e.name == package or package.startswith(f"{e.name}."):
            return f"logger {name!r} needs the {package} package: pip install {package}"
        return f"logger {name!r}: importing {package} failed: {type(e).__name__}: {one_line(e)}"
    except Exception as e:  # noqa: BLE001 - a broken install raises anything (a protobuf TypeError, most often)
        return f"logger {name!r}: importing {package} failed: {type(e).__name__}: {one_line(e)}"
    return None
