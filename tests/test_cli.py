import gc
import importlib
import signal
import subprocess
import sys
import time
import warnings

import pytest

from llm import evaluate, export, generate, import_hf, plot
from llm.cli import ArgParser, one_line_warnings
from llm.errors import UsageError, print_error
from llm.training import train
from tests.helpers import REPO, cli_env

TOOLS = {
    "generate": (generate.main, ["--checkpoint", "x", "--prompt", "y"]),
    "evaluate": (evaluate.main, ["--checkpoint", "x", "--data-path", "y"]),
    "export": (export.main, ["--checkpoint", "x", "--out", "y"]),
    "plot": (plot.main, ["run"]),
    "train": (train.main, []),
}


@pytest.fixture(autouse=True)
def python_warning_format(monkeypatch):
    """Each tool installs its one-line warning format for the rest of the process. Start every test from
    another format, and put the original back after it, so that a test can tell whether a tool installed it."""
    monkeypatch.setattr(warnings, "formatwarning", lambda message, *args, **kwargs: f"python's format: {message}\n")


def test_a_parse_error_raises_usage_error_instead_of_exiting():
    with pytest.raises(UsageError, match=r"^unrecognized arguments: --nope$"):
        ArgParser(prog="tool").parse_args(["--nope"])


@pytest.mark.parametrize("value", ["-1e-3", "-2E+2", "-.5", "-3", "-inf"])
def test_a_negative_number_in_any_form_is_a_value_not_a_flag(value):
    parser = ArgParser(prog="tool")
    parser.add_argument("--width", type=float)
    assert parser.parse_args(["--width", value]).width == float(value)  # argparse before 3.13: -1e-3 is a flag


@pytest.mark.parametrize("tool", TOOLS)
def test_an_unknown_flag_exits_2_with_one_line_on_stderr(tool, capsys):
    main, required = TOOLS[tool]
    assert main([*required, "--bogus"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == "error: unrecognized arguments: --bogus\n"


MISSPELLED = {  # each tool's flag misspelled, the one it meant named
    "generate": (["--checkpoint", "x", "--promt", "y"], "--promt (did you mean --prompt?)"),  # a required one
    "evaluate": (["--checkpoint", "x", "--data-path", "y", "--batchsize", "4"], "--batchsize 4 (did you mean --batch-size?)"),
    "export": (["--checkpoint", "x", "--out", "y", "--fromat", "hf"], "--fromat hf (did you mean --format?)"),
    "plot": (["run", "--outt", "y.png"], "--outt y.png (did you mean --out?)"),
    "train": (["--training-max-step", "3"], "--training-max-step 3 (did you mean --training-max-steps?)"),
}


@pytest.mark.parametrize("argv, error", [
    (["--lr", "0.1"], "unrecognized arguments: --lr 0.1 (did you mean --optimizer-lr?)"),  # a setting's own name
    (["--batch-size", "4"], "unrecognized arguments: --batch-size 4 (did you mean --training-batch-size?)"),
    (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
    (["-epochs", "3"], "unrecognized argument -epochs: flags take two dashes (did you mean --epochs?)"),
    (["-training-max-step", "3"],
     "unrecognized argument -training-max-step: flags take two dashes (did you mean --training-max-steps?)"),
    (["-e", "3"], "unrecognized argument -e: flags take two dashes"),  # too short to tell which (not --help)
    (["3"], "unexpected positional argument(s): every setting is given as --<section>-<field> VALUE"),
])
def test_a_settings_name_without_its_section_is_named_with_it(argv, error, capsys):
    assert train.main(argv) == 2
    assert capsys.readouterr().err == f"error: {error}\n"


@pytest.mark.parametrize("argv, error", [
    (["--", "x"], "the following arguments are required: --out"),  # no flag after --
    (["--format", "--hf"], "argument --format: expected one argument"),
])
def test_a_value_or_separator_that_starts_with_dashes_is_no_misspelled_flag(argv, error):
    parser = ArgParser(prog="tool")
    parser.add_argument("file", nargs="?")
    parser.add_argument("--out", required=True)
    parser.add_argument("--format")
    with pytest.raises(UsageError, match=f"^{error}$"):
        parser.parse_args(argv)
    with pytest.raises(UsageError, match="^the following arguments are required: --out$"):
        parser.parse_args(["--format", "--a b"])  # a value that argparse takes, though it starts with --
    parser.add_argument("--sample", nargs="?")  # takes no value that looks like a flag
    with pytest.raises(UsageError, match=r"^unrecognized arguments: --outt \(did you mean --out\?\)$"):
        parser.parse_args(["--sample", "--outt", "x"])


@pytest.mark.parametrize("tool", TOOLS)
def test_a_misspelled_flag_is_named_with_the_one_meant(tool, capsys):
    argv, named = MISSPELLED[tool]
    assert TOOLS[tool][0](argv) == 2
    assert capsys.readouterr().err == f"error: unrecognized arguments: {named}\n"


@pytest.mark.parametrize("tool, argv", [("export", ["runs/lm", "--out", "m.safetensors"]),
                                        ("generate", ["--prompt", "hi", "runs/lm"])])
def test_a_checkpoint_given_without_its_flag_is_named_with_the_flag_it_needs(tool, argv, capsys):
    assert TOOLS[tool][0](argv) == 2  # as llm-export took it before it had --checkpoint
    assert capsys.readouterr().err == ("error: the following arguments are required: --checkpoint; "
                                       "give it as --checkpoint runs/lm\n")
    assert TOOLS[tool][0](["--prompt", "runs/x"] if tool == "generate" else ["--out", "runs/x"]) == 2
    assert capsys.readouterr().err == "error: the following arguments are required: --checkpoint\n"  # no path
    assert TOOLS[tool][0]([*argv, "upon", "a", "time"]) == 2  # several loose words: which was the path is not known
    assert capsys.readouterr().err == "error: the following arguments are required: --checkpoint\n"


def test_no_tool_takes_an_abbreviated_flag():
    with pytest.raises(UsageError, match=r"^unrecognized arguments: --ou x \(did you mean --out\?\)$"):
        parser = ArgParser(prog="tool")
        parser.add_argument("--out")
        parser.parse_args(["--ou", "x"])


def test_one_line_warnings_drops_file_line_and_category():
    one_line_warnings()
    assert warnings.formatwarning("skipping x", UserWarning, "/a/b.py", 12, "warnings.warn(...)") == "warning: skipping x\n"


@pytest.mark.parametrize("tool", ["generate", "evaluate", "export", "train"])
def test_tools_that_load_checkpoints_print_warnings_in_one_line(tool, capsys):
    main, required = TOOLS[tool]
    main([*required, "--bogus"])
    assert warnings.formatwarning("skipping x", UserWarning, "/a/b.py", 12) == "warning: skipping x\n"


@pytest.mark.parametrize("tool, flag", [("generate", "--checkpoint"), ("evaluate", "--checkpoint"), ("export", "--checkpoint"),
                                        ("plot", None), ("train", "--data-path")])
def test_a_path_with_a_newline_or_an_escape_in_its_name_is_named_on_one_line(tool, flag, capsys, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    main, required = TOOLS[tool]
    odd = "no\nsuch\x1b[2J"
    args = [odd, *required[1:]] if flag is None else [*required, flag, odd]
    assert main([*args, *(["--task", "lm"] if tool == "train" else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "no\\nsuch\\x1b[2J" in err, err


def test_only_what_breaks_a_line_or_steers_the_terminal_is_escaped_in_errors_and_warnings(capsys):
    kept = "tab\there, a no-break space (1\xa0000), a joiner (\u0646\u0627\u0645\u0647\u200c\u0647\u0627), caf\u00e9"
    print_error(f"error: {kept}; a\nb\rc\x1b[2J\u2028d\x85")
    assert capsys.readouterr().err == f"error: {kept}; a\\nb\\rc\\x1b[2J\\u2028d\\x85\n"
    one_line_warnings()
    assert warnings.formatwarning("no\nsuch file", UserWarning, "/a/b.py", 1) == "warning: no\\nsuch file\n"


@pytest.mark.parametrize("tool, work, argv, left", [
    (evaluate, "load_lm", ["--checkpoint", "run", "--data-path", "text.txt"], "no loss computed"),
    (export, "read_checkpoint", ["--checkpoint", "run", "--out", "model.safetensors"], "the export may be incomplete: export again"),
    (plot, "read_curves", ["run", "--out", "loss.png"], "no figure written"),
    (import_hf, "_read_config", ["hf", "--out", "ours"], "nothing was imported: import again"),
])
def test_ctrl_c_in_a_tool_ends_in_one_line_and_exit_130_not_a_traceback(tool, work, argv, left, tmp_path, monkeypatch,
                                                                          capsys):
    def pressed(*args, **kwargs):  # where Python raises it when SIGINT comes: in the tool's work
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tool, work, pressed)
    assert tool.main(argv) == 130
    assert capsys.readouterr().err == f"interrupted (Ctrl-C): {left}\n"


def test_each_console_script_freezes_its_imports_then_exits_with_the_code_main_returns(monkeypatch):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert len(scripts) == 6
    handled = {}  # the signals' handlers each run() installs, kept from this process
    monkeypatch.setattr(signal, "signal", lambda signum, handler: handled.__setitem__(signum, handler))
    for script, entry in scripts.items():
        name, function = entry.split(":")
        assert function == "run", script
        module, frozen = importlib.import_module(name), []
        monkeypatch.setattr(gc, "freeze", lambda: frozen.append(script))
        monkeypatch.setattr(module, "main", lambda **kwargs: 3 if frozen else 0)  # frozen first
        handled.clear()
        with pytest.raises(SystemExit) as exited:
            module.run()
        assert frozen == [script] and exited.value.code == 3
        assert set(handled) == {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}, script


def test_a_signal_once_a_commands_work_is_done_leaves_its_exit_code(tmp_path):
    """Ctrl-C as a tool ends, or a scheduler's SIGTERM as the job does: the exit waits for a thread a library
    left running (here 30 s), and the signal ends the process at once with the code main returned, its output
    given out whole, not with a traceback and 130 (an export written whole, taken by a script for one that
    failed)."""
    program = ("import pathlib, signal, threading, time\n"
               "from llm.cli import run_program\n"
               "def linger():  # says the work is done once run_program has taken the signals, then holds the exit\n"
               "    deadline = time.monotonic() + 10\n"
               "    while signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and time.monotonic() < deadline:\n"
               "        time.sleep(0.01)\n"
               "    print('exported')  # left in the buffer of the pipe: the signal's exit gives it out\n"
               "    pathlib.Path('done').touch()\n"
               "    time.sleep(30)\n"
               "def main():\n"
               "    threading.Thread(target=linger).start()\n"
               "    return 0\n"
               "run_program(main)\n")
    env = {k: v for k, v in cli_env().items() if k != "PYTHONUNBUFFERED"}
    for signum in (signal.SIGINT, signal.SIGTERM):
        (tmp_path / "done").unlink(missing_ok=True)
        process = subprocess.Popen([sys.executable, "-c", program], cwd=tmp_path, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (tmp_path / "done").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signum)
        out, err = process.communicate(timeout=20)
        assert (process.returncode, out, err) == (0, "exported\n", ""), signum
