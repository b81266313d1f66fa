import json
import shutil
import time
import warnings

import pytest

from llm.training.core.config import Config, ConfigError
from llm.training.core.engine import TrainingEngine
from llm.training.core.profiler import Profiler
from llm.training.tasks.regression_task import RegressionTask
from llm.training.train import default_callbacks
from tests.helpers import tiny_config


def train(config):
    engine = TrainingEngine(config, RegressionTask(config), 0, 1, callbacks=default_callbacks(config))
    engine.train()
    return engine


def profiled(run_dir):
    """{file stem: the steps its trace holds, by the spans named after them}; and each table's text."""
    steps, tables = {}, {}
    for trace in sorted((run_dir / "profile").glob("*.json")):
        events = json.loads(trace.read_text())["traceEvents"]
        names = {e.get("name", "") for e in events}
        steps[trace.name[:-len(".json")]] = sorted(int(n.split("#")[1]) for n in names if n.startswith("ProfilerStep#"))
        tables[trace.name[:-len(".json")]] = (trace.with_name(trace.name[:-len(".json")] + ".txt")).read_text()
    return steps, tables


def test_the_window_holds_the_steps_asked_for_and_its_table_names_the_operators(tmp_path, capsys):
    config = tiny_config(tmp_path, training={"max_steps": 8}, logging={"profile_steps": 3, "profile_from_step": 4})
    train(config)
    steps, tables = profiled(tmp_path / "run")
    assert steps == {"steps_4-6.rank0": [4, 5, 6]}
    table = tables["steps_4-6.rank0"]
    assert "aten::addmm" in table and "Optimizer.step" in table and "Self CPU" in table
    assert f"profile of steps 4-6 written to {tmp_path / 'run' / 'profile'}" in capsys.readouterr().out


def test_writing_the_trace_is_time_aside_from_training_as_a_save_is(tmp_path, monkeypatch):
    """Else the throughput record over the window counts the writing as steps' time (9x slower, seen)."""
    from torch.profiler import profile

    export = profile.export_chrome_trace

    def slow_export(self, path):  # a trace of a large model takes seconds to write
        export(self, path)
        time.sleep(1.0)

    monkeypatch.setattr(profile, "export_chrome_trace", slow_export)
    plain = train(tiny_config(tmp_path / "plain", training={"max_steps": 6}))
    engine = train(tiny_config(tmp_path, training={"max_steps": 6},
                               logging={"profile_steps": 2, "profile_from_step": 3}))
    assert engine.aside_s - plain.aside_s > 0.6  # less the plain run's validating and saving, and noise


def test_a_run_that_ends_in_the_window_writes_its_steps_and_a_resume_records_those_left(tmp_path):
    logging = {"profile_steps": 4, "profile_from_step": 3}
    train(tiny_config(tmp_path, training={"max_steps": 4}, logging=logging))
    assert profiled(tmp_path / "run")[0] == {"steps_3-4.rank0": [3, 4, 5]}  # 5: the run's end, its save
    train(tiny_config(tmp_path, training={"max_steps": 9}, logging=logging, checkpoint={"resume": "auto"}))
    assert profiled(tmp_path / "run")[0] == {"steps_3-4.rank0": [3, 4, 5], "steps_5-6.rank0": [5, 6]}
    train(tiny_config(tmp_path, training={"max_steps": 12}, logging=logging, checkpoint={"resume": "auto"}))
    assert len(profiled(tmp_path / "run")[0]) == 2  # resumed past the window: nothing more


def test_a_run_that_ends_before_the_window_writes_nothing(tmp_path):
    for max_steps in (3, 4):  # 4: the warm-up step, whose on_step_end turns recording on
        with pytest.warns(UserWarning, match=f"^logging.profile_from_step 5 comes after the run's last step "
                                             f"{max_steps}: no step is profiled$"):
            train(tiny_config(tmp_path, training={"max_steps": max_steps},
                              logging={"profile_steps": 2, "profile_from_step": 5}))
        assert not (tmp_path / "run" / "profile").exists()
        shutil.rmtree(tmp_path / "run")
    config = tiny_config(tmp_path, training={"max_steps": 4}, logging={"profile_steps": 20, "profile_from_step": 2},
                         checkpoint={"resume": "auto"})
    train(config)
    with warnings.catch_warnings():  # a finished run started again: no step left, and nothing to warn of
        warnings.simplefilter("error")
        train(config)


def test_the_window_starts_at_the_first_step_too(tmp_path):
    train(tiny_config(tmp_path, training={"max_steps": 3}, logging={"profile_steps": 2, "profile_from_step": 1}))
    assert profiled(tmp_path / "run")[0] == {"steps_1-2.rank0": [1, 2]}


def test_no_profiler_unless_asked_for(tmp_path):
    assert not any(isinstance(cb, Profiler) for cb in default_callbacks(tiny_config(tmp_path)))
    train(tiny_config(tmp_path, training={"max_steps": 3}))
    assert not (tmp_path / "run" / "profile").exists()


@pytest.mark.parametrize("key, value", [("profile_steps", -1), ("profile_from_step", 0)])
def test_a_window_out_of_range_is_refused(key, value):
    with pytest.raises(ConfigError, match=f"logging.{key}"):
        Config.from_dict({"logging": {key: value}})
