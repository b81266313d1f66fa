"""Every code block in the docs runs, and every file shown in them is the real file."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, SCRIPTS, free_port

BLOCK = re.compile(r"(?:<!-- file: (?P<file>\S+) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)
DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]


def blocks(path: Path, lang: str) -> list[tuple[str | None, str]]:
    return [(m["file"], m["code"]) for m in BLOCK.finditer(path.read_text()) if m["lang"] == lang]


@pytest.mark.parametrize("doc", [d for d in DOCS if any(name for name, _ in blocks(d, "python"))], ids=lambda p: p.name)
def test_files_shown_in_docs_are_the_real_files(doc):
    for name, code in blocks(doc, "python"):
        if name:
            assert code == (REPO / name).read_text(), f"{doc.name} shows a stale copy of {name}"


@pytest.mark.parametrize("doc", [d for d in DOCS if blocks(d, "python")], ids=lambda p: p.name)
def test_python_blocks_run(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for name, code in blocks(doc, "python"):
        exec(compile(code, f"{doc.name}:{name or 'block'}", "exec"), namespace)
    if doc.name == "usage.md":  # its last block, the guide's training script: 3 epochs, each logged where it says
        assert namespace["metrics"]["epochs"] == 3
        run = tmp_path / "runs/guide-example"
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records if r["split"] == "epoch"] == [1, 2, 3]
        val = [r["val_loss"] for r in records if r["split"] == "val"]
        assert val[-1] == pytest.approx(namespace["metrics"]["val_loss"]) and val[-1] < val[0]
        assert "lr" in records[0] and len(list(run.glob("events.out.tfevents.*"))) == 1


def shell_script(doc: Path) -> str:
    """The doc's bash lines as one script; install steps dropped, long trainings and evaluations cut short."""
    lines = []
    for _, code in blocks(doc, "bash"):
        for line in code.splitlines():
            line = re.sub(r"^pip install .*? && ", "", line)
            if line.strip() and not line.startswith("#") and "pip install" not in line and "pytest" not in line:
                line = re.sub(r"--training-max-steps \d{3,}", "--training-max-steps 10", line)
                line = re.sub(r"--epochs \d\d+", "--epochs 2", line)
                line = re.sub(r"--training-eval-batches \d+", "--training-eval-batches 2", line)
                lines.append(re.sub(r"--training-eval-every-steps \d+", "--training-eval-every-steps 5", line))
    return "\n".join(lines)


@pytest.mark.parametrize("doc", [d for d in DOCS if shell_script(d)], ids=lambda p: p.name)
def test_shell_commands_run_in_order(doc, tmp_path):
    """Run as a user would, from a folder holding the package (for paths like llm/training/train.py)."""
    (tmp_path / "llm").symlink_to(REPO / "llm")
    (tmp_path / "my_corpus.txt").write_text((REPO / "README.md").read_text() * 20)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    env["PATH"] = SCRIPTS + os.pathsep + env.get("PATH", "")
    env.update(LLM_LOGGING_PROGRESS_BAR="false", LLM_DATA_CACHE_DIR=str(tmp_path / "cache"),
               LLM_TRAINING_EPOCHS="2",  # for the commands that train the default 10 epochs; flags still win
               PET_MASTER_PORT=str(free_port()), PYTHONPATH=str(REPO))
    script = "set -euo pipefail\n" + shell_script(doc)
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert list(tmp_path.glob("runs/*/summary.json"))
    if doc.name == "checkpoints.md":  # what the page says the commands do
        checkpoints = tmp_path / "runs/ckpt-demo/checkpoints"
        assert re.search(r"^step_00000030$", out.stdout, re.M), out.stdout[-2000:]  # `latest` after the first run
        assert "training.max_steps (30 -> 0" in out.stdout, out.stdout[-2000:]
        assert json.loads((tmp_path / "runs/ckpt-demo/summary.json").read_text())["steps"] == 114
        assert sorted(p.name for p in checkpoints.glob("step_*")) == [
            "step_00000100", "step_00000110", "step_00000114"]
        assert (checkpoints / "best").read_text().strip() == "step_00000114"
        assert (tmp_path / "regression.safetensors").is_file() and (tmp_path / "regression.json").is_file()
    if doc.name == "README.md":  # the main job: the validation loss falls, and a sample is printed at the end
        parts = re.split(r"^(def .*)$", out.stdout, maxsplit=1, flags=re.M)  # the sample starts with the prompt
        assert len(parts) == 3 and len(parts[1]) > len("def "), out.stdout[-2000:]
        val = [float(v) for v in re.findall(r"^step \d+  val_loss (\S+)", parts[0], re.M)]
        assert len(val) >= 2 and all(b < a for a, b in zip(val, val[1:])), parts[0][-2000:]


def test_custom_task_commands_run_on_the_sine_py_the_page_builds(tmp_path):
    """docs/custom-task.md: its first two Python blocks as my_project/sine.py, then its commands, as it says."""
    doc = REPO / "docs/custom-task.md"
    code = [c for _, c in blocks(doc, "python")]
    project = tmp_path / "my_project"
    project.mkdir()
    (project / "sine.py").write_text(code[0] + "\n" + code[1])
    text = next(c for _, c in blocks(doc, "text") if "cd my_project" in c)
    commands = text.split("cd my_project\n", 1)[1].replace("\\\n", " ").splitlines()
    assert [c.split()[0] for c in commands] == ["python", "torchrun"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    env["PATH"] = SCRIPTS + os.pathsep + env.get("PATH", "")
    env.update(LLM_LOGGING_PROGRESS_BAR="false", PYTHONPATH=str(REPO), PET_MASTER_PORT=str(free_port()))
    for command in commands:
        out = subprocess.run(["bash", "-c", command.replace("torchrun ", "torchrun --master_addr=127.0.0.1 ")],
                             cwd=project, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    first, second = (project / "runs/sinetask/summary.json"), (project / "runs/sinetask-2/summary.json")
    assert first.is_file() and second.is_file()
    settings = [yaml.safe_load((project / f"runs/{run}/config.yaml").read_text())["custom"]
                for run in ("sinetask", "sinetask-2")]
    assert settings == [{"depth": 2, "activation": "tanh"}, {"depth": 3, "activation": "tanh"}]


def test_a_run_trained_by_the_script_that_defines_its_classes_continues_from_the_command_line(tmp_path):
    """docs/custom-task.md's classes and its training from Python in one file, sine.py, run as a script: its
    classes are __main__'s, which no other process can import; the run records them as sine's."""
    code = [c for _, c in blocks(REPO / "docs/custom-task.md", "python")]
    script = code[0] + "\n" + code[1] + "\nif __name__ == '__main__':\n" + textwrap.indent(code[2], "    ")
    (tmp_path / "sine.py").write_text(script)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LLM_")}, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "sine.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "runs/sine/config.yaml").read_text())
    assert (saved["task"], saved["data"]["module"]) == ("sine:SineTask", "")  # not __main__:SineTask
    flags = ["--task", "sine:SineTask", "--epochs", "6", "--data-num-samples", "1024", "--data-noise", "0.05",
             "--model-n-embd", "32", "--optimizer-lr", "0.01", "--logging-log-dir", "runs/sine",
             "--checkpoint-resume", "auto", "--logging-progress-bar", "false"]
    out = subprocess.run([sys.executable, "-m", "llm.training.train", *flags], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from runs/sine/checkpoints/step_00000140 at step 140" in out.stdout
    assert json.loads((tmp_path / "runs/sine/summary.json").read_text())["epochs"] == 6


def test_the_streaming_data_module_of_the_custom_task_page_trains_and_resumes_mid_stream(tmp_path):
    """docs/custom-task.md, "Streaming data": its command, then a resume of its endless stream after step 200."""
    doc = REPO / "docs/custom-task.md"
    code = [c for _, c in blocks(doc, "python")]
    stream = next(c for c in code if "class SineStream" in c)
    (tmp_path / "sine.py").write_text(code[0] + "\n" + code[1] + "\n" + stream)
    command = next(c for _, c in blocks(doc, "text") if "sine:SineStream" in c).replace("\\\n", " ").split()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LLM_")}, "PYTHONPATH": str(REPO),
           "LLM_LOGGING_PROGRESS_BAR": "false", "LLM_DATA_NUM_WORKERS": "2"}
    for flags in ([], ["--training-max-steps", "260", "--checkpoint-resume", "auto"]):
        out = subprocess.run([sys.executable, *command[1:], *flags], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from runs/sine-stream/checkpoints/step_00000200 at step 200 (epoch 0, batch 200)" in out.stdout
    assert "replaying the 200 batches of the stream that epoch 0 trained on" in out.stderr
    records = [json.loads(line) for line in (tmp_path / "runs/sine-stream/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "val"] == [50, 100, 150, 200, 250, 260]
    assert records[-1]["val_loss"] < 0.1  # it learned the sine from the stream


def test_the_hook_loop_in_the_usage_guide_is_the_one_in_callbacks_py():

    from llm.training.core import callbacks

    shown = next(c for _, c in blocks(REPO / "docs/usage.md", "text") if "on_train_start(engine)" in c)
    docstring = callbacks.__doc__.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    assert shown == textwrap.dedent(docstring) + "\n"


def test_the_usage_guides_callback_logs_into_the_validation_record_stops_the_run_and_keeps_its_count(tmp_path):
    from llm.training.core.callbacks import MetricsLogger
    from tests.helpers import records_of, tiny_config, train

    [code] = [code for _, code in blocks(REPO / "docs" / "usage.md", "python") if "class StopBelow" in code]
    namespace: dict = {"__name__": "__docs__"}
    exec(compile(code, "usage.md:StopBelow", "exec"), namespace)
    settings = {"training": {"max_steps": 40, "eval_every_steps": 5}, "checkpoint": {"every_n_steps": 5}}
    stopper = namespace["StopBelow"](target=1e9)  # every validation is below it: the first one stops the run
    engine, metrics = train(tiny_config(tmp_path, **settings), callbacks=[stopper, MetricsLogger()])
    assert engine.step == 5 and metrics["stop_reason"].startswith("val_loss ") and stopper.validations == 1
    assert [r["validations"] for r in records_of(tmp_path / "run", "val")] == [1]
    again = namespace["StopBelow"](target=1e9)
    train(tiny_config(tmp_path, **{**settings, "checkpoint": {"every_n_steps": 5, "resume": "auto"}}), callbacks=[again])
    assert again.validations == 1  # its count, from the checkpoint; the stop held, nothing validated again
