import dataclasses
from pathlib import Path

import pytest
import yaml

from llm.errors import ConfigError, UsageError
from llm.training.core.config import Config
from llm.training.core.callbacks import TensorBoardLogger
from llm.training.train import default_callbacks, main


def test_yaml_roundtrip_gives_an_equal_config(tmp_path):
    config = Config.from_args_and_env(["--optimizer-lr", "3e-4", "--model-pos-emb", "learned"], environ={})
    config.save_to_yaml(tmp_path / "config.yaml")
    assert Config.from_yaml(tmp_path / "config.yaml") == config
    in_code = Config()  # not validated: its paths not filled in yet, as loading fills them
    in_code.training.epochs = 3
    in_code.save_to_yaml(tmp_path / "in_code.yaml")
    assert Config.from_yaml(tmp_path / "in_code.yaml") == in_code == Config.from_dict(in_code.to_dict())
    assert Config.from_yaml(tmp_path / "in_code.yaml") != Config()


def test_a_saved_config_given_another_log_dir_or_task_puts_the_run_and_its_checkpoints_there(tmp_path):
    config = Config.from_args_and_env(["--task", "regression"], environ={})
    config.save_to_yaml(tmp_path / "config.yaml")
    moved = Config.from_args_and_env(["--config", str(tmp_path / "config.yaml"), "--logging-log-dir", "runs/new"],
                                     environ={})
    assert moved.checkpoint.dir == "runs/new/checkpoints"
    other = Config.from_args_and_env(["--config", str(tmp_path / "config.yaml"), "--task", "lm"], environ={})
    assert (other.logging.log_dir, other.checkpoint.dir) == ("runs/lm", "runs/lm/checkpoints")
    # a path given on purpose is written and kept as it is
    kept = Config.from_args_and_env(["--checkpoint-dir", "/ckpt/a", "--logging-log-dir", "runs/b"], environ={})
    kept.save_to_yaml(tmp_path / "kept.yaml")
    again = Config.from_args_and_env(["--config", str(tmp_path / "kept.yaml"), "--task", "lm"], environ={})
    assert (again.logging.log_dir, again.checkpoint.dir) == ("runs/b", "/ckpt/a")


def test_a_config_changed_in_code_after_validation_fills_its_paths_in_anew():
    config = Config.from_args_and_env([], environ={})
    config.logging.log_dir = "runs/lr0.1"
    assert config.validate().checkpoint.dir == "runs/lr0.1/checkpoints"
    config.task = "classification"
    config.logging.log_dir = "runs/{task}"
    assert config.validate().checkpoint.dir == "runs/classification/checkpoints"


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("optimizer.name", "adamx", ["optimizer.name", "'adamx'", "adamw"]),
        ("optimizer.scheduler", "cosin", ["optimizer.scheduler", "did you mean cosine?"]),
        ("training.precision", "fp8", ["training.precision", "one of fp32, bf16, fp16"]),
        ("training.device", "gpu", ["training.device", "one of auto, cpu, cuda"]),
        ("logging.progress_bar", "false", ["logging.progress_bar", "true or false"]),
        ("training.epochs", 2.5, ["training.epochs", "2.5", "an integer"]),
        ("training.batch_size", "64", ["training.batch_size", "'64'", "an integer"]),
        ("training.batch_size", True, ["training.batch_size", "True", "an integer"]),
        ("optimizer.lr", float("nan"), ["optimizer.lr", "a number"]),
        ("checkpoint.mode", "maximum", ["checkpoint.mode", "one of min, max"]),
        ("task", None, ["task", "a string"]),
    ],
)
def test_a_config_set_in_code_is_checked_like_the_command_line(field, value, words):
    config = Config()
    section, _, name = field.rpartition(".")
    setattr(getattr(config, section) if section else config, name, value)
    with pytest.raises(ConfigError) as e:
        config.validate()
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_config_set_in_code_takes_an_integer_for_a_number_and_a_path_for_text(tmp_path):
    config = Config()
    config.optimizer.lr, config.logging.log_dir = 1, tmp_path / "run"
    config.validate()
    assert config.optimizer.lr == 1 and config.logging.log_dir == str(tmp_path / "run")
    assert config.checkpoint.dir == str(tmp_path / "run" / "checkpoints")


def test_numpy_numbers_and_paths_set_in_code_become_what_yaml_writes(tmp_path):
    np = pytest.importorskip("numpy")
    config = Config()
    config.optimizer.lr, config.training.batch_size = np.logspace(-4, -2, 3)[1], np.int64(8)  # from a sweep
    config.validate()
    assert type(config.optimizer.lr) is float and type(config.training.batch_size) is int
    config.save_to_yaml(tmp_path / "c.yaml")  # YAML cannot write NumPy's types
    assert Config.from_yaml(tmp_path / "c.yaml").optimizer.lr == pytest.approx(1e-3)
    given = Config.from_dict({"logging": {"log_dir": tmp_path / "run"}, "training": {"epochs": np.int32(3)}})
    assert given.logging.log_dir == str(tmp_path / "run") and type(given.training.epochs) is int


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"training": {"batch_size": 0}}, ["training.batch_size", "0", ">= 1"]),
        ({"training": {"epochs": -1}}, ["training.epochs", "-1"]),
        ({"optimizer": {"lr": -0.1}}, ["optimizer.lr", "-0.1", "> 0"]),
        ({"training": {"patience": -1}}, ["training.patience", "-1", ">= 0"]),
        ({"training": {"batch_size": "many"}}, ["training.batch_size", "'many'", "an integer"]),
        ({"training": {"batch_size": 2.5}}, ["training.batch_size", "2.5", "an integer"]),
        ({"training": {"compile": "maybe"}}, ["training.compile", "true or false"]),
        ({"training": {"precision": "fp8"}}, ["training.precision", "fp32, bf16, fp16"]),
        ({"training": {"compile_mode": "max-autotune"}}, ["training.compile_mode", "unless training.compile is true"]),
        ({"training": {"compile": True, "compile_mode": "max-autotune", "deterministic": True}},
         ["training.compile_mode", "with training.deterministic", "picks each matmul's kernel by timing"]),
        ({"training": {"compile": True, "compile_mode": "reduce-overhead"}}, ["training.compile_mode",
                                                                             "default, max-autotune"]),
        ({"training": {"batch_sise": 4}}, ["training.batch_sise", "did you mean batch_size"]),
        ({"trainer": {}}, ["trainer", "did you mean training"]),
        ({"lr": 0.1}, ["lr", "did you mean optimizer.lr?"]),  # a field put at the top level: where it goes
        ({"epochs": 20}, ["epochs", "did you mean training.epochs?"]),  # --epochs is a flag, not a YAML key
        ({"task": "lm", "model": {"n_embd": 100, "n_head": 3}}, ["model.n_embd", "100", "multiple of model.n_head"]),
        ({"task": "lm", "model": {"head_size": 7}}, ["model.head_size", "7", "an even number, for model.pos_emb rope"]),
        ({"task": "lm", "model": {"n_embd": 12, "n_head": 4}},  # an odd head size implied, refused before any data
         ["model.n_embd", "12", "a multiple of 2 x model.n_head (4)", "(here 3)", "--model-pos-emb learned"]),
        ({"task": "lm", "model": {"head_size": -2}}, ["model.head_size", "-2", ">= 0"]),
        ({"task": "lm", "model": {"n_layer": 0}}, ["model.n_layer", "0", ">= 1"]),
        ({"model": {"n_layer": -1}}, ["model.n_layer", "-1", ">= 0"]),
        ({"optimizer": {"name": "AdamWW"}}, ["optimizer.name", "'AdamWW'", "did you mean adamw?"]),
        ({"model": {"block_size": 0}}, ["model.block_size", "0"]),
        ({"training": "fast"}, ["training", "a mapping"]),
        ({"optimizer": {"lr": 10**400}}, ["optimizer.lr", "(401 characters)", "a number"]),  # no float holds it
        ({"training": {"seed": 2**64}}, ["training.seed", str(2**64), "expected an integer below 2**63"]),
        ({"training": {"eval_batches": 2**63}}, ["training.eval_batches", str(2**63), "an integer below 2**63"]),
        ({"training": {"seed": -2**64}}, ["training.seed", str(-2**64), "expected an integer >= -2**63"]),
        ({"model": {"n_layer": 10**8}}, ["model.n_layer", "100000000", "at most 1024"]),
        ({"model": {"vocab_size": -1}}, ["model.vocab_size", "-1", ">= 0"]),
        ({"model": {"vocab_size": 2**21}}, ["model.vocab_size", str(2**21), "at most 1,048,576"]),
        ({"data": {"num_workers": 100000}}, ["data.num_workers", "100000", "at most 256"]),
        ({"logging": {"log_dir": "runs/a\0b"}}, ["logging.log_dir", "'runs/a\\x00b'", "without a NUL"]),
        ({"logging": {"log_dir": "runs/\udcff"}}, ["logging.log_dir", "'runs/\\udcff'", "UTF-8"]),  # argv's byte 0xff
        ({"logging": {"log_dir": "."}}, ["logging.log_dir", "'.'", "folder name"]),
        ({"logging": {"log_dir": "runs/.."}}, ["logging.log_dir", "'runs/..'", "folder name"]),
        # YAML reads 0750 as 488 and 2024_01 as 202401: the text was lost before the config saw it
        ({"checkpoint": {"dir": 488}}, ["checkpoint.dir", "488", "a string: in a YAML file, write it in quotes"]),
        ({"logging": {"log_dir": 1.1}}, ["logging.log_dir", "1.1", "in quotes"]),
        ({"checkpoint": {"monitor": True}}, ["checkpoint.monitor", "True", "in quotes ('yes', 'off')"]),  # yes
        ({"training": {"tf32": 2}}, ["training.tf32", "2", "true or false"]),
        ({"distributed": {"timeout_s": 10**11}}, ["distributed.timeout_s", str(10**11), "at most 100000000"]),
    ],
)
def test_bad_values_name_the_field_value_and_what_is_allowed(overrides, words):
    with pytest.raises(ConfigError) as err:
        Config.from_dict(overrides)
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_yaml_1_and_0_are_true_and_false_as_on_the_command_line(tmp_path):
    settings = tmp_path / "bools.yaml"
    settings.write_text("training:\n  tf32: 1\n  compile: 0\n")
    config = Config.from_yaml(settings)
    assert config.training.tf32 is True and config.training.compile is False
    flags = Config.from_args_and_env(["--training-tf32", "1", "--training-compile", "0"], environ={})
    assert flags.training == config.training


def test_a_filled_in_checkpoint_dir_stays_filled_in_when_the_run_moves():
    config = Config.from_dict({"logging": {"log_dir": "runs/lm"}})
    assert config.given("checkpoint.dir") == "" and config.checkpoint.dir == "runs/lm/checkpoints"
    config.logging.log_dir = "runs/lm-2"  # as a fresh run moves to the next free folder
    config.validate()
    assert config.given("checkpoint.dir") == "" and config.checkpoint.dir == "runs/lm-2/checkpoints"
    given = Config.from_dict({"checkpoint": {"dir": "ckpt"}})
    assert given.given("checkpoint.dir") == "ckpt"
    assert yaml.safe_load(config.to_yaml())["checkpoint"]["dir"] == ""


def test_a_home_folder_in_the_run_and_checkpoint_folders_is_expanded():
    config = Config.from_dict({"logging": {"log_dir": "~/runs/x"}})
    assert config.logging.log_dir == str(Path.home() / "runs/x")
    assert config.checkpoint.dir == str(Path.home() / "runs/x/checkpoints")
    assert Config.from_dict({"checkpoint": {"dir": "~/ckpt"}}).checkpoint.dir == str(Path.home() / "ckpt")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--training-batch-size", "0"], ["training.batch_size", "0"]),
        (["--training-bach-size", "4"], ["unrecognized", "--training-batch-size"]),
        (["--optimizer-lr", "fast"], ["optimizer.lr", "'fast'", "a number"]),
        (["--task", "nope"], ["task: got 'nope'", "regression, classification, lm or package.module:Class"]),
        (["--task", "no.such.module:Task"], ["cannot import task module 'no.such.module'"]),
        (["--data-vocab-size", str(2**32)], ["data.vocab_size: got 4294967296", "at most 1,048,576"]),
        (["--task", "collections:OrderedDict"], ["not a TrainingTask subclass"]),
        (["--data-module", "synthetc"], ["data.module: got 'synthetc'", "did you mean synthetic"]),
    ],
)
def test_main_exits_2_with_one_line(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    for word in words:
        assert word in err
    assert not (tmp_path / "runs").exists()


def test_a_task_or_data_module_name_that_is_neither_built_in_nor_a_class_path_names_its_source(tmp_path):
    path = tmp_path / "lm.yaml"
    path.write_text("task: lmm\ndata:\n  module: text\n")
    with pytest.raises(UsageError, match=rf"task: got 'lmm'.*\(did you mean lm\?\) \(in {path}\)"):
        Config.from_yaml(path)
    with pytest.raises(UsageError, match=r"data\.module: got 'txt'.*LLM_DATA_MODULE"):
        Config.from_args_and_env([], environ={"LLM_DATA_MODULE": "txt"})
    with pytest.raises(UsageError, match=r"task: got 'pkg:'"):
        Config.from_dict({"task": "pkg:"})
    assert Config.from_dict({"task": "pkg.tasks:MyTask", "data": {"module": "pkg.data:Mine"}}).task == "pkg.tasks:MyTask"


def test_a_tracker_named_twice_is_one_tracker():
    config = Config.from_dict({"logging": {"loggers": "tensorboard, tensorboard,wandb"}})
    assert config.logging.logger_names() == ["tensorboard", "wandb"]
    tensorboard = Config.from_dict({"logging": {"loggers": "tensorboard,tensorboard"}})
    assert sum(isinstance(cb, TensorBoardLogger) for cb in default_callbacks(tensorboard)) == 1


def test_model_sizes_that_only_a_gpt_needs_are_not_asked_of_an_mlp():
    assert Config.from_dict({"model": {"n_embd": 10}}).model.n_embd == 10  # no attention heads to divide it among
    assert Config.from_dict({"task": "classification", "model": {"n_layer": 0}}).model.n_layer == 0  # linear


def test_a_choice_in_capitals_is_the_choice_meant():
    config = Config.from_args_and_env(["--optimizer-name", "AdamW"], environ={"LLM_TRAINING_PRECISION": "BF16"})
    assert (config.optimizer.name, config.training.precision) == ("adamw", "bf16")
    config = Config()
    config.optimizer.scheduler = "Cosine"
    assert config.validate().optimizer.scheduler == "cosine"


def test_a_field_misspelled_or_a_section_replaced_in_code_is_an_error_not_ignored():
    config = Config()
    with pytest.raises(AttributeError, match="epoch"):
        config.training.epoch = 1
    config.training = {"epochs": 2}
    with pytest.raises(ConfigError, match=r"^training: got \{'epochs': 2\}, expected a TrainingConfig: set its fields one"):
        config.validate()


def test_a_copy_made_with_to_dict_and_given_another_log_dir_or_task_puts_the_run_where_those_say():
    config = Config.from_dict({})
    data = config.to_dict()
    data["logging"]["log_dir"] = "runs/sweep-1"
    assert Config.from_dict(data).checkpoint.dir == str(Path("runs/sweep-1/checkpoints"))
    data = config.to_dict()
    data["task"] = "lm"
    assert Config.from_dict(data).logging.log_dir == str(Path("runs/lm"))
    assert Config.from_dict(config.to_dict()) == config


# ---- a task's own settings (custom) ------------------------------------------------------------

SCALED = "tests.helpers:ScaledLossTask"


def test_a_built_in_tasks_config_has_no_custom_section_and_takes_none(tmp_path):
    assert "custom" not in Config().to_dict() and "custom" not in yaml.safe_load(Config().to_yaml())
    with pytest.raises(ConfigError, match=r"^custom: .*task 'regression' declares no settings of its own"):
        Config.from_dict({"custom": {"scale": 2}})
    path = tmp_path / "run.yaml"
    path.write_text("custom:\n  scale: 2\n")
    with pytest.raises(ConfigError, match=rf"declares no settings of its own .*\(in {path}\)$"):
        Config.from_yaml(path)
    with pytest.raises(UsageError, match=r"^unrecognized arguments: --custom-scale 2 \(--custom-<field> sets a field "
                                         r"of the task's Settings: --task \.\.\. --help lists them\)$"):
        Config.from_args_and_env(["--custom-scale", "2"], environ={})


def test_a_custom_setting_misspelled_or_of_the_wrong_type_is_named_with_where_it_was_set(tmp_path):
    with pytest.raises(ConfigError, match=r"^custom\.scale: got 'x', expected a number$"):
        Config.from_args_and_env(["--task", SCALED, "--custom-scale", "x"], environ={})
    with pytest.raises(ConfigError, match=r"^custom\.scale: got 'x', .*LLM_CUSTOM_SCALE\)$"):
        Config.from_args_and_env(["--task", SCALED], environ={"LLM_CUSTOM_SCALE": "x"})
    with pytest.raises(ConfigError, match=r"^custom\.reduce: got 'max', expected one of mean, sum$"):
        Config.from_args_and_env(["--task", SCALED, "--custom-reduce", "max"], environ={})
    with pytest.raises(ConfigError, match=r"^custom\.scal: got 2, expected a field of custom \(did you mean scale\?\)"):
        Config.from_dict({"task": SCALED, "custom": {"scal": 2}})
    config = Config.from_dict({"task": SCALED})
    config.custom.steps = 1.5  # set in code
    with pytest.raises(ConfigError, match=r"^custom\.steps: got 1\.5, expected an integer$"):
        config.validate()
    config.custom = {"scale": 2}
    with pytest.raises(ConfigError, match=r"^custom: got \{'scale': 2\}, expected an instance of the task's Settings"):
        config.validate()
    # a task that cannot be imported: nothing to set its settings on
    with pytest.raises(UsageError, match=r"cannot import task module 'nowhere'"):
        Config.from_args_and_env(["--task", "nowhere:Task", "--custom-scale", "2"], environ={})
    assert type(Config.from_args_and_env(["--task", "nowhere:Task"], environ={}).custom).__name__ == "NoSettings"


def test_a_settings_class_no_flag_could_set_is_refused_naming_the_field():
    from llm.training.core.config import settings_of
    from llm.training.tasks.regression_task import RegressionTask

    @dataclasses.dataclass
    class Listed:
        sizes: list = dataclasses.field(default_factory=list)

    @dataclasses.dataclass
    class Undefaulted:
        scale: float

    for declared, message in [(Listed, r"Settings\.sizes: a setting is an int, float, bool, str or a Literal of strings, "
                                       r"not list"),
                              (Undefaulted, r"Settings\.scale: give it a default"),
                              (dict, r"Settings: expected a dataclass of the task's settings")]:
        task = type("Odd", (RegressionTask,), {"Settings": declared})
        with pytest.raises(UsageError, match=message):
            settings_of(task)
        with pytest.raises(UsageError, match=message):
            task(Config())


def test_a_task_built_in_code_fills_in_its_settings_and_refuses_another_tasks():
    from llm.training.core.config import NoSettings, fitted_settings
    from tests.helpers import ScaledLossTask

    config = Config()
    task = ScaledLossTask(config)
    assert task.config.custom == ScaledLossTask.Settings()
    assert type(config.custom) is NoSettings  # the caller's config is left as it was: another task may take it
    config.custom = ScaledLossTask.Settings(scale=5.0)
    assert ScaledLossTask(config).config.custom.scale == 5.0  # its own, as set, stay

    @dataclasses.dataclass
    class Settings:  # the same class of a script run as __main__, beside the module it is imported as
        scale: float = 1.0
        reduce: str = "mean"
        steps: int = 0

    Settings.__qualname__, Settings.__module__ = "ScaledLossTask.Settings", "__main__"
    config.custom = Settings(scale=3.0)
    custom = ScaledLossTask(config).config.custom
    assert type(custom) is ScaledLossTask.Settings and custom.scale == 3.0
    Settings.__module__ = "elsewhere"  # a class of the same name in another module is another task's
    with pytest.raises(UsageError, match=r"holds ScaledLossTask.Settings, the settings of another task"):
        ScaledLossTask(config)
    config.custom = dataclasses.make_dataclass("Other", [("x", int, 0)])()
    with pytest.raises(UsageError, match=r"^custom: the config holds Other, the settings of another task, and task "
                                         r"'tests.helpers:ScaledLossTask' takes ScaledLossTask.Settings$"):
        ScaledLossTask(config)
    with pytest.raises(UsageError, match=r"task 'regression' declares no settings of its own$"):
        fitted_settings(config, NoSettings, "regression")


def test_every_custom_section_holds_the_settings_of_the_task_the_run_trains(tmp_path):
    from tests.helpers import ScaledLossTask

    base = tmp_path / "base.yaml"  # a section written for the task a later file or flag replaces
    base.write_text(f"task: {SCALED}\ncustom:\n  scale: 2\n")
    other = tmp_path / "other.yaml"
    other.write_text("task: tests.helpers:FrozenSettingsTask\ncustom:\n  steps: 3\n")
    config = Config.from_args_and_env([f"--config={base}", f"--config={other}"], environ={})
    assert config.task == "tests.helpers:FrozenSettingsTask" and (config.custom.scale, config.custom.steps) == (2.0, 3)
    config = Config.from_args_and_env([f"--config={base}", "--task", "tests.helpers:FrozenSettingsTask",
                                       "--custom-reduce", "sum"], environ={})
    assert (config.custom.scale, config.custom.reduce) == (2.0, "sum")
    with pytest.raises(ConfigError, match=rf"^custom: .*task 'regression' declares no settings .*\(in {base}\)$"):
        Config.from_args_and_env([f"--config={base}"], environ={"LLM_TASK": "regression"})
    assert type(Config.from_args_and_env([f"--config={base}"], environ={}).custom) is ScaledLossTask.Settings


def test_frozen_settings_are_set_from_flags_and_stay_frozen_for_the_task():
    config = Config.from_args_and_env(["--task", "tests.helpers:FrozenSettingsTask", "--custom-scale", "3"], environ={})
    assert config.custom.scale == 3.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.custom.scale = 4.0
