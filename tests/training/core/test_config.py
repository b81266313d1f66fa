import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm.errors import ConfigError, UsageError
from llm.training.core.config import Config, build_parser, field_docs, sections
from llm.training.core.callbacks import TensorBoardLogger
from llm.training.train import default_callbacks, main


def test_precedence_defaults_yaml_env_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  batch_size: 8\n  epochs: 4\noptimizer:\n  lr: 0.5\n  weight_decay: 0.2\n")
    env = {"LLM_TRAINING_BATCH_SIZE": "16", "LLM_OPTIMIZER_LR": "0.25"}
    config = Config.from_args_and_env(["--config", str(path), "--optimizer-lr", "0.125"], environ=env)
    assert config.training.epochs == 4  # yaml over default
    assert config.training.batch_size == 16  # env over yaml
    assert config.optimizer.lr == 0.125  # flag over env
    assert config.optimizer.weight_decay == 0.2  # yaml, untouched by env and flags
    assert config.training.seed == 0  # default


def test_unknown_env_variable_warns_and_is_ignored():
    with pytest.warns(UserWarning, match="LLM_TRAINING_BATCHSIZE.*did you mean LLM_TRAINING_BATCH_SIZE"):
        config = Config.from_args_and_env([], environ={"LLM_TRAINING_BATCHSIZE": "3"})
    assert config.training.batch_size == Config().training.batch_size


def test_every_field_is_a_flag_with_its_help_and_default():
    """Each flag's own help, as --help prints it: its field's docstring, then its default."""
    parser = build_parser()
    help_of = {option: action.help for action in parser._actions for option in action.option_strings}
    for section, cls in sections().items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            flag = f"--{section}-{f.name}".replace("_", "-")
            assert flag in help_of, flag
            assert docs[f.name], f"{section}.{f.name} has no docstring"
            shown = " ".join((help_of[flag] % {"default": None}).split())  # argparse's own %-expansion
            default = getattr(getattr(Config(), section), f.name)
            assert shown == f"{' '.join(docs[f.name].split())} (default: {default!r})", flag
    assert "--training-compile-mode" in parser.format_help()  # and it reaches --help


def test_guide_flags_and_aliases():
    config = Config.from_args_and_env(
        ["--task", "classification", "--epochs", "3", "--training-batch-size", "64", "--logging-progress-bar", "false",
         "--training-compile"], environ={})
    assert (config.task, config.training.epochs, config.training.batch_size) == ("classification", 3, 64)
    assert config.logging.progress_bar is False and config.training.compile is True
    assert config.logging.log_dir == "runs/classification"
    assert config.checkpoint.dir == "runs/classification/checkpoints"


@pytest.mark.parametrize("value", ["-1e-3", "-2.5E+1", "-.5e1", "-1"])
def test_a_negative_number_after_a_flag_is_its_value_and_refused_by_name(value):
    # not "expected one argument": argparse before Python 3.13 took -1e-3 for a flag
    with pytest.raises(ConfigError, match=r"optimizer\.lr: got -[\d.]+, expected a number > 0"):
        Config.from_args_and_env(["--optimizer-lr", value], environ={}).validate()


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


def test_bad_yaml_files(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("training:\n  batch_size: [1,\n")
    with pytest.raises(UsageError, match="not valid YAML at line"):
        Config.from_yaml(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="top level must be a mapping"):
        Config.from_yaml(listing)
    with pytest.raises(UsageError, match="cannot read config file"):
        Config.from_yaml(tmp_path / "missing.yaml")
    deep = tmp_path / "deep.yaml"
    deep.write_text("training: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(UsageError, match=r"deep.yaml: nested too deeply to be a config file$"):
        Config.from_yaml(deep)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("logging:\n  log_dir: runs/caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UsageError, match=r"^\S+latin1.yaml: not UTF-8 text \(byte 28\); save the config file as UTF-8$"):
        Config.from_yaml(latin1)


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
    "text, words",
    [
        ("training:\n  epoch: 3\n", ["training.epoch: got 3", "did you mean epochs?"]),  # unknown key
        ("trainer:\n  epochs: 3\n", ["trainer", "did you mean training?"]),  # unknown section
        ("batch_size: 8\n", ["batch_size", "did you mean training.batch_size?"]),  # a field at the top level
        ("training:\n  epochs: ten\n", ["training.epochs", "'ten'", "an integer"]),  # wrong type
        ("training: fast\n", ["training", "'fast'", "a mapping"]),  # a section that is not a mapping
        ("training:\n  epochs: 0\n", ["training.epochs", "0", ">= 1"]),  # out of range, found by validate
        ("optimizer:\n  lr: 0.1\n  min_lr: 0.5\n", ["optimizer.min_lr", "<= optimizer.lr"]),
        ("optimizer:\n  decay_fraction: 0\n", ["optimizer.decay_fraction: got 0", "in (0, 1]"]),
        ("training:\n\ntask: ''\n", ["task: got ''", "package.module:Class"]),  # an empty section beside the bad value
    ],
)
def test_errors_from_a_config_file_name_the_file(text, words, tmp_path, monkeypatch, capsys):
    (tmp_path / "b.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        Config.from_yaml("b.yaml")
    assert str(err.value).endswith(" (in b.yaml)") and all(w in str(err.value) for w in words), str(err.value)
    assert main(["--config", "b.yaml"]) == 2
    line = capsys.readouterr().err
    assert line.endswith(" (in b.yaml)\n") and line.count("\n") == 1, line
    assert all(w in line for w in words), line
    assert not (tmp_path / "runs").exists()


def test_a_value_from_the_file_overridden_is_not_blamed_on_the_file(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("training:\n  epochs: 0\n")
    with pytest.raises(ConfigError) as err:  # the variable's bad value is the one that counts
        Config.from_args_and_env(["--config", str(path)], environ={"LLM_TRAINING_EPOCHS": "-1"})
    assert str(err.value).endswith("(set by the environment variable LLM_TRAINING_EPOCHS)"), str(err.value)
    with pytest.raises(ConfigError) as err:  # a flag is in sight on the command line: no source named
        Config.from_args_and_env(["--config", str(path), "--epochs", "-1"], environ={})
    assert str(err.value) == "training.epochs: got -1, expected an integer >= 1"
    path.write_text("training:\n  epochs: 0\nmodel:\n")  # model: an empty section
    with pytest.raises(ConfigError) as err:  # a flag sets n_head, and the error names n_embd, a default
        Config.from_args_and_env(["--config", str(path), "--task", "lm", "--epochs", "1", "--model-n-head", "3"], environ={})
    assert "(in" not in str(err.value)


def test_an_error_found_after_the_config_was_read_names_where_its_field_was_set(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    flags = ["--task", "lm", "--logging-progress-bar", "false"]
    (tmp_path / "b.yaml").write_text("data:\n  path: nope.txt\n")
    monkeypatch.setenv("LLM_DATA_PATH", "nope.txt")  # found missing by the data module, not by validate()
    for extra, note in (([], " (set by the environment variable LLM_DATA_PATH)"),
                        (["--data-path", "nope.txt"], ""),  # a flag is in sight on the command line
                        (["--config", "b.yaml"], " (set by the environment variable LLM_DATA_PATH)")):
        assert main([*flags, *extra]) == 2
        assert capsys.readouterr().err == f"error: data.path: nope.txt does not exist (expected a text file, " \
                                          f"a folder or a glob){note}\n"
    monkeypatch.delenv("LLM_DATA_PATH")
    assert main([*flags, "--config", "b.yaml"]) == 2
    assert capsys.readouterr().err.endswith("a folder or a glob) (in b.yaml)\n")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "text, words",
    [
        ("training:\n  epochs: 1\noptimizer:\n  lr: 0.1\ntraining:\n  batch_size: 2\n",
         ["b.yaml: training is given twice (lines 1 and 5)"]),
        ("training:\n  epochs: 1\n  batch_size: 2\n  epochs: 3\n", ["b.yaml: training.epochs is given twice (lines 2 and 4)"]),
        ("task: lm\ntask: regression\n", ["b.yaml: task is given twice"]),
        ('"a\\nb": 1\n"a\\nb": 2\n', ["b.yaml: 'a\\nb' is given twice"]),  # a key of any text, on one line
        ("x: &a [*a, {k: 1, k: 2}]\n", ["b.yaml: x[1].k is given twice"]),  # an alias of itself ends the search
    ],
)
def test_a_key_given_twice_is_refused(text, words, tmp_path, monkeypatch, capsys):
    (tmp_path / "b.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    assert main(["--config", "b.yaml"]) == 2
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and all(w in line for w in words), line
    assert not (tmp_path / "runs").exists()


def test_a_key_over_a_merged_one_is_not_a_repeat(tmp_path):
    path = tmp_path / "b.yaml"
    # <<: merges base's keys into training, and epochs written beside it wins, as YAML means it to
    path.write_text("base: &b {epochs: 1}\ntraining:\n  <<: *b\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"^base: .*known section"):  # the next problem: base is no section
        Config.from_yaml(path)
    path.write_text("training: {1: a, '1': b}\n")  # the integer 1 and the string '1' are two keys
    with pytest.raises(ConfigError, match="training.1:"):
        Config.from_yaml(path)


def test_yaml_cannot_construct_python_objects(tmp_path):
    path = tmp_path / "evil.yaml"
    marker = tmp_path / "ran"
    path.write_text(f"task: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        Config.from_yaml(path)
    assert not marker.exists()


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


def test_help_exits_0_and_lists_flags():
    out = subprocess.run([sys.executable, "-m", "llm.training.train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "--training-batch-size" in out.stdout and "--checkpoint-resume" in out.stdout


# a value of any shape where any field goes: the loader gives a valid Config or a UsageError, nothing else
_values = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=8),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
_names = st.sampled_from(
    ["training", "optimizer", "model", "data", "checkpoint", "logging", "distributed", "task", "trainer", "x"]
)
_fields = st.sampled_from(["batch_size", "epochs", "lr", "n_head", "n_embd", "precision", "dir", "progress_bar", "bogus"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.dictionaries(_names, st.one_of(_values, st.dictionaries(_fields, _values, max_size=3)), max_size=3),
    _values,
))
def test_random_yaml_loads_or_fails_cleanly(tmp_path, data):
    path = tmp_path / "random.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        config = Config.from_yaml(path)
    except UsageError as e:
        assert "\n" not in str(e)
    else:
        assert Config.from_dict(config.to_dict()) == config


_flags = st.lists(st.sampled_from(
    ["--training-batch-size", "--optimizer-lr", "--epochs", "--model-n-head", "--training-precision", "--bogus",
     "--data-val-fraction", "--logging-loggers", "3", "-1", "0", "abc", "1e-3", "bf16", "true", "", "mlflow,x"]),
    max_size=6)
_yaml_text = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=60),  # anything at all, mostly not YAML
    st.dictionaries(_names, st.one_of(_values, st.dictionaries(_fields, _values, max_size=3)), max_size=3)
    .map(yaml.safe_dump),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_yaml_text, argv=_flags)
def test_any_yaml_file_and_flags_give_a_config_or_exit_2_with_one_line(tmp_path, capsys, text, argv):
    from llm.training.train import main

    path = tmp_path / "random.yaml"
    path.write_text(text, encoding="utf-8")
    code = main(["--config", str(path), *argv, "--print-config"])
    out, err = capsys.readouterr()
    if code == 0:
        assert Config.from_dict(yaml.safe_load(out)).to_yaml() == out  # what it printed loads back the same
    else:
        assert code == 2, err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_config_reference_in_docs_is_current():
    from pathlib import Path

    from llm.training.core.config import reference

    path = Path(__file__).resolve().parents[3] / "docs" / "config.md"
    assert path.read_text() == reference(), "regenerate: python -m llm.training.core.config > docs/config.md"
    for section, cls in sections().items():
        for f in dataclasses.fields(cls):
            assert f"--{section}-{f.name}".replace("_", "-") in path.read_text()


def test_a_tracker_named_twice_is_one_tracker():
    config = Config.from_dict({"logging": {"loggers": "tensorboard, tensorboard,wandb"}})
    assert config.logging.logger_names() == ["tensorboard", "wandb"]
    tensorboard = Config.from_dict({"logging": {"loggers": "tensorboard,tensorboard"}})
    assert sum(isinstance(cb, TensorBoardLogger) for cb in default_callbacks(tensorboard)) == 1


def test_config_files_given_in_turn_each_override_the_ones_before_setting_by_setting(tmp_path):
    (tmp_path / "base.yaml").write_text("task: lm\nmodel: {n_layer: 2, n_embd: 64}\ntraining: {batch_size: 8}\n")
    (tmp_path / "wide.yaml").write_text("model: {n_embd: 128}\ntraining: {batch_size: 4}\n")
    config = Config.from_args_and_env(["--config", str(tmp_path / "base.yaml"), "--config", str(tmp_path / "wide.yaml"),
                                       "--training-batch-size", "2"], environ={})
    assert (config.task, config.model.n_layer, config.model.n_embd, config.training.batch_size) == ("lm", 2, 128, 2)
    assert config.set_by("model.n_layer") == f" (in {tmp_path / 'base.yaml'})"
    assert config.set_by("model.n_embd") == f" (in {tmp_path / 'wide.yaml'})"
    assert config.set_by("training.batch_size") == ""  # a flag: in sight already


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


def test_a_tasks_own_settings_come_from_yaml_then_environment_then_flags(tmp_path):
    from tests.helpers import ScaledLossTask

    path = tmp_path / "run.yaml"
    path.write_text(f"custom:\n  scale: 2\n  reduce: sum\ntask: {SCALED}\n")  # the section before the task naming it
    assert Config.from_args_and_env(["--task", SCALED], environ={}).custom == ScaledLossTask.Settings()
    from_file = Config.from_args_and_env([f"--config={path}"], environ={})
    assert (from_file.custom.scale, from_file.custom.reduce) == (2.0, "sum")
    from_env = Config.from_args_and_env([f"--config={path}"], environ={"LLM_CUSTOM_SCALE": "3"})
    assert (from_env.custom.scale, from_env.custom.reduce) == (3.0, "sum")
    from_flag = Config.from_args_and_env([f"--config={path}", "--custom-scale", "4", "--custom-steps=7"],
                                         environ={"LLM_CUSTOM_SCALE": "3"})
    assert (from_flag.custom.scale, from_flag.custom.reduce, from_flag.custom.steps) == (4.0, "sum", 7)
    # recorded whole, and read back as it was
    saved = yaml.safe_load(from_flag.to_yaml())
    assert saved["custom"] == {"scale": 4.0, "reduce": "sum", "steps": 7}
    assert Config.from_dict(saved) == from_flag and type(Config.from_dict(saved).custom) is ScaledLossTask.Settings


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


def test_help_lists_the_tasks_own_settings_with_their_docstrings():
    out = subprocess.run([sys.executable, "-m", "llm.training.train", "--task", SCALED, "--help"],
                         capture_output=True, text=True, cwd=Path(__file__).parents[3])
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # as wrapped to any width
    assert "custom (ScaledLossTask.Settings):" in text
    assert "--custom-scale FLOAT What the training loss is multiplied by. (default: 1.0)" in text
    assert "--custom-reduce {mean,sum}" in text


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
