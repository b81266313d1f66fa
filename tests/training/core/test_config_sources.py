"""Where a config's values come from: YAML files, LLM_* variables and flags, their precedence and their errors;
--help and docs/config.md."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm.errors import ConfigError, UsageError
from llm.training.core.config import Config, sections
from llm.training.core.config_sources import build_parser, field_docs, reference
from llm.training.train import main
from tests.helpers import ScaledLossTask

SCALED = "tests.helpers:ScaledLossTask"


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
    with pytest.warns(UserWarning, match="LLM_TRAINING_BATCHSIZE.*did you mean LLM_TRAINING_BATCH_SIZE") as said:
        config = Config.from_args_and_env([], environ={"LLM_TRAINING_BATCHSIZE": "3"})
    assert said[0].filename == __file__  # said at the caller's line, for a script's warning filters
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


@pytest.mark.parametrize("written, read, why", [("010", 8, "a leading 0 makes it octal"), ("-0_10", -8, "octal"),
                                               ("0b101", 5, "binary"), ("1:30", 90, "a colon makes it base 60")])
def test_a_number_yaml_reads_in_another_base_than_the_command_line_is_refused(written, read, why, tmp_path, capsys):
    # YAML 1.1 reads 010 as 8 and 1:30 as 90, where --training-seed 010 is 10
    (tmp_path / "b.yaml").write_text(f"training:\n  seed: {written}\n")
    assert main(["--config", str(tmp_path / "b.yaml")]) == 2
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and f"b.yaml: training.seed is written {written}, which YAML reads as {read} (" in line
    assert why in line and not (tmp_path / "runs").exists()
    for kept in ("seed: '010'", "seed: 0", "seed: 1_0", "seed: 0x10", "seed: 07", "seed: 00"):
        # text, or read as the command line reads it
        (tmp_path / "b.yaml").write_text(f"training:\n  {kept}\ndata:\n  separator: '010'\n")
        config = Config.from_args_and_env(["--config", str(tmp_path / "b.yaml")], environ={})
        assert config.data.separator == "010"
    (tmp_path / "b.yaml").write_text("optimizer:\n  lr: !!float 010\n")  # told how to read it: as written
    assert Config.from_args_and_env(["--config", str(tmp_path / "b.yaml")], environ={}).optimizer.lr == 10.0
    assert Config.from_args_and_env(["--training-seed", "010"], environ={}).training.seed == 10


def test_a_flag_given_two_dashes_as_its_value_takes_them(tmp_path, monkeypatch, capsys):
    # argparse drops a value of "--" (the end of the options) from --data-separator=--, leaving nothing
    config = Config.from_args_and_env(["--data-separator=--", "--task", "lm"], environ={})
    assert config.data.separator == "--" and config.task == "lm"
    monkeypatch.chdir(tmp_path)
    assert main(["--config=--"]) == 2  # a file named --, which is not there: one line, not a traceback
    assert capsys.readouterr().err == "error: cannot read config file --: No such file or directory\n"


def test_a_number_at_the_top_level_is_refused_as_no_mapping_of_sections(tmp_path):
    for text, shape in (("010\n", "int"), ("- 010\n", "list")):
        (tmp_path / "b.yaml").write_text(text)
        with pytest.raises(UsageError, match=f"b.yaml: the top level must be a mapping of sections, got {shape}$"):
            Config.from_args_and_env(["--config", str(tmp_path / "b.yaml")], environ={})


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
    path = Path(__file__).resolve().parents[3] / "docs" / "config.md"
    assert path.read_text() == reference(), "regenerate: python -m llm.training.core.config > docs/config.md"
    for section, cls in sections().items():
        for f in dataclasses.fields(cls):
            assert f"--{section}-{f.name}".replace("_", "-") in path.read_text()


def test_config_files_given_in_turn_each_override_the_ones_before_setting_by_setting(tmp_path):
    (tmp_path / "base.yaml").write_text("task: lm\nmodel: {n_layer: 2, n_embd: 64}\ntraining: {batch_size: 8}\n")
    (tmp_path / "wide.yaml").write_text("model: {n_embd: 128}\ntraining: {batch_size: 4}\n")
    config = Config.from_args_and_env(["--config", str(tmp_path / "base.yaml"), "--config", str(tmp_path / "wide.yaml"),
                                       "--training-batch-size", "2"], environ={})
    assert (config.task, config.model.n_layer, config.model.n_embd, config.training.batch_size) == ("lm", 2, 128, 2)
    assert config.set_by("model.n_layer") == f" (in {tmp_path / 'base.yaml'})"
    assert config.set_by("model.n_embd") == f" (in {tmp_path / 'wide.yaml'})"
    assert config.set_by("training.batch_size") == ""  # a flag: in sight already


def test_a_tasks_own_settings_come_from_yaml_then_environment_then_flags(tmp_path):
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


def test_help_lists_the_tasks_own_settings_with_their_docstrings():
    out = subprocess.run([sys.executable, "-m", "llm.training.train", "--task", SCALED, "--help"],
                         capture_output=True, text=True, cwd=Path(__file__).parents[3])
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # as wrapped to any width
    assert "custom (ScaledLossTask.Settings):" in text
    assert "--custom-scale FLOAT What the training loss is multiplied by. (default: 1.0)" in text
    assert "--custom-reduce {mean,sum}" in text
