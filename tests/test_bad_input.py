"""Bad input and bad runs, through the real command lines.

Every kind of bad input gets one line on stderr, ``error: ...``, naming the problem and what to do,
exit code 2 and no traceback, and leaves the files of an earlier run byte for byte as they were. A rank
that fails or hangs under torchrun ends the whole run instead of leaving the others waiting.

Every command of the module runs at once, a few at a time, in ``outcomes``: the tests then only look at
what each one did. Each case runs in a folder of its own holding a copy of an earlier run (``run/``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from llm.models.gpt import GPT, GPTConfig
from llm.training.tasks.regression_task import RegressionTask
from tests.helpers import REPO, cli_env, free_port, node_agent, reseal, run, torchrun

TEXT = "".join(f"{w} sat on the mat. " for w in ("the cat", "a dog", "my hat", "one bat") * 60)
QUIET = ["--logging-progress-bar", "false", "--logging-loggers", ""]
LM = ["--task", "lm", "--training-max-steps", "4", "--training-batch-size", "8", "--model-n-layer", "1",
      "--model-n-embd", "32", "--model-n-head", "2", "--model-block-size", "32", "--data-path", "corpus.txt",
      "--checkpoint-every-n-steps", "2"]
CONTINUE = ["--logging-log-dir", "run", "--checkpoint-resume", "auto"]
"""Continue the earlier run: whatever is wrong, its files must be left as they were."""
LAUGHS = "training:\n  epochs: [&a [lol,lol,lol,lol,lol,lol,lol,lol,lol], " + ", ".join(
    f"&{name} [{', '.join(['*' + previous] * 9)}]" for previous, name in zip("abcdefgh", "bcdefghi")) + "]\n"
"""Nine levels of aliases, nine each: 9**9 (387 million) items from a few hundred bytes of YAML."""
BIG_IDS = json.dumps({"version": "1.0", "model": {
    "type": "WordLevel", "unk_token": "[UNK]",
    "vocab": {**{c: i for i, c in enumerate(sorted(set(TEXT)))}, "[UNK]": 30, "zzz": 4_000_000_000}}})
"""A tokenizer.json whose ids skip to four billion: an embedding of that many rows (written as text: the
tokenizers library's own writer would allocate for every id up to it)."""
BRANCH = ["--logging-log-dir", "fresh", "--checkpoint-resume"]
"""Start a new run from a checkpoint (followed by its path): refused, it must leave no folder behind."""
REGRESSION = ["--model-n-layer", "1", "--model-n-embd", "16", "--data-input-dim", "4", "--training-device", "cpu"]
TRAIN_PY = REPO / "llm/training/train.py"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the message for machines without CUDA")


# ---- a task that fails on one rank, for torchrun ------------------------------------------------


class RaisingTask(RegressionTask):
    """Regression that raises RuntimeError (FAULT=raise) or sleeps ten minutes (FAULT=hang) at optimizer
    step FAULT_AT_STEP (default 3) on rank FAULT_RANK (default 1)."""

    def __init__(self, config):
        super().__init__(config)
        self.calls = 0

    def train_step(self, batch, model, criterion):
        self.calls += 1
        step = (self.calls - 1) // self.config.training.grad_accum_steps + 1
        if step == int(os.environ.get("FAULT_AT_STEP", 3)) and \
                int(os.environ.get("RANK", 0)) == int(os.environ.get("FAULT_RANK", 1)):
            if os.environ.get("FAULT") == "hang":
                time.sleep(600)
            raise RuntimeError(f"injected failure at step {step}")
        return super().train_step(batch, model, criterion)


class PutTask(RegressionTask):
    """Regression whose train_step, or validation_step too (PUT_IN=validation), calls put_: an op with no
    deterministic form on the CPU."""

    def train_step(self, batch, model, criterion):
        torch.zeros(2).put_(torch.tensor([0]), torch.tensor([1.0]))
        return super().train_step(batch, model, criterion)

    def validation_step(self, batch, model, criterion):
        if os.environ.get("PUT_IN") == "validation":
            torch.zeros(2).put_(torch.tensor([0]), torch.tensor([1.0]))
        return super().validation_step(batch, model, criterion)


# ---- the cases ---------------------------------------------------------------------------------


@dataclass
class Case:
    """One bad input: the command (``tool`` and its arguments, run in a folder that holds ``run/``,
    ``corpus.txt``, ``afile.txt``, ``emptydir/`` and the broken checkpoints), and the words its one
    line of stderr must hold."""

    id: str
    tool: str
    args: list[str]
    words: list[str]
    files: dict[str, str] = field(default_factory=dict)
    """Files to write first, name -> text."""
    prepare: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    warnings_ok: bool = False
    """Lines starting 'warning: ' may come before the error (checkpoints skipped on the way)."""
    absent: list[str] = field(default_factory=list)
    """Paths that must not exist afterwards (nothing trained, nothing written)."""
    locked: tuple[str, int] | None = None
    """A path (a glob) and the permissions it has while the command runs; the command runs where file
    permissions hold (root, who passes them by, drops the capabilities that let it)."""


def as_user() -> list[str] | None:
    """A command prefix under which file permissions hold: none but for root, who drops the capabilities that pass
    them by; None where that does not make a file of mode 0 unreadable (no setpriv, or capabilities it keeps)."""
    if os.geteuid() != 0:
        return []
    prefix = [shutil.which("setpriv") or "setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    with tempfile.NamedTemporaryFile() as probe:
        os.chmod(probe.name, 0)
        try:
            held = subprocess.run([*prefix, "true"]).returncode == 0 and \
                subprocess.run([*prefix, "cat", probe.name], capture_output=True).returncode != 0
        except OSError:  # no setpriv
            held = False
    return prefix if held else None


AS_USER = as_user()
NO_SETPRIV = pytest.mark.skipif(AS_USER is None, reason="root whose file permissions cannot be made to hold")


def own_cache(cwd: Path) -> None:
    """A copy of the token cache as the earlier run left it (beside the checkpoints the case folder links to),
    before other cases added entries: one entry."""
    shutil.copytree((cwd / "truncated").resolve().parent / "cache-as-trained", cwd / "cache")


def metrics_file_a_folder(cwd: Path) -> None:
    (cwd / "run" / "metrics.jsonl").unlink()
    (cwd / "run" / "metrics.jsonl").mkdir()


def killed_before_its_first_save_with_config_yaml_garbled(cwd: Path) -> None:
    killed_before_its_first_save(cwd)
    (cwd / "run" / "config.yaml").write_text(":: [\n")


def killed_before_its_first_save(cwd: Path) -> None:
    shutil.rmtree(cwd / "run" / "checkpoints")
    (cwd / "run" / "summary.json").unlink()


def checkpoints_deleted(cwd: Path) -> None:
    shutil.rmtree(cwd / "run" / "checkpoints")


def a_config_file_of_the_users_alone(cwd: Path) -> None:
    """The run folder holds only the config file its runs are started with, as some keep it."""
    shutil.rmtree(cwd / "run")
    (cwd / "run").mkdir()
    (cwd / "run" / "config.yaml").write_text(
        "# my experiment\ntask: lm\nmodel: {n_layer: 1, n_embd: 32, n_head: 2, block_size: 32}\n"
        "data: {path: corpus.txt}\ntraining: {batch_size: 8, max_steps: 40}\noptimizer: {lr: 0.001}\n")


def saved_elsewhere(cwd: Path) -> None:
    """The earlier run as if started with --checkpoint-dir ckpt."""
    (cwd / "run" / "checkpoints").rename(cwd / "ckpt")
    config = cwd / "run" / "config.yaml"
    config.write_text(re.sub(r"(?m)^  dir: ''$", "  dir: ckpt", config.read_text(), count=1))  # checkpoint.dir


def truncate_every_checkpoint(cwd: Path) -> None:
    for state in (cwd / "run" / "checkpoints").glob("step_*/state.pt"):
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])


TOOLS = {
    "train": [sys.executable, "-m", "llm.training.train", *QUIET],
    "generate": [sys.executable, "-m", "llm.generate", "--prompt", "the cat", "--max-new-tokens", "5"],
    "evaluate": [sys.executable, "-m", "llm.evaluate", "--data-path", "corpus.txt"],
    "export": [sys.executable, "-m", "llm.export"],
    "plot": [sys.executable, "-m", "llm.plot"],
}
BROKEN_CHECKPOINTS = [
    ("missing", "nope", ["nope", "does not exist"]),
    ("a-file", "corpus.txt", ["corpus.txt", "not a checkpoint"]),
    ("an-empty-folder", "emptydir", ["emptydir", "holds no step_* checkpoints"]),
    ("truncated", "truncated", ["truncated", "state.pt has", "the manifest says"]),
]


def checkpoint_flag(tool: str, path: str) -> list[str]:
    return ["--checkpoint", path, "--out", "model.safetensors"] if tool == "export" else ["--checkpoint", path]




CASES = [
    # config: YAML, flags, environment
    Case("yaml-does-not-parse", "train", ["--config", "bad.yaml", *CONTINUE], ["bad.yaml", "not valid YAML", "line 3, column 14"],
         files={"bad.yaml": "training:\n  epochs: 1\n   batch_size: 2\n"}),
    Case("config-path-empty", "train", ["--config=", *CONTINUE], ["config file path is empty"]),
    Case("yaml-top-level-not-a-mapping", "train", ["--config", "list.yaml", *CONTINUE],
         ["list.yaml", "top level must be a mapping"], files={"list.yaml": "- 1\n- 2\n"}),
    Case("yaml-unknown-section", "train", ["--config", "c.yaml", *CONTINUE], ["trainin", "did you mean training?"],
         files={"c.yaml": "trainin:\n  epochs: 1\n"}),
    Case("yaml-unknown-key", "train", ["--config", "c.yaml", *CONTINUE], ["training.epoch", "did you mean epochs?"],
         files={"c.yaml": "training:\n  epoch: 1\n"}),
    Case("yaml-wrong-type", "train", ["--config", "c.yaml", *CONTINUE], ["training.epochs", "'ten'", "an integer"],
         files={"c.yaml": "training:\n  epochs: ten\n"}),
    Case("yaml-aliases-that-expand-to-a-billion-items", "train", ["--config", "laughs.yaml", *CONTINUE],
         ["training.epochs: got [['lol',", "expected an integer"], files={"laughs.yaml": LAUGHS}),
    Case("negative-batch-size", "train", [*LM, *CONTINUE, "--training-batch-size", "-8"],
         ["training.batch_size", "-8", ">= 1"]),
    Case("zero-epochs", "train", [*LM, *CONTINUE, "--epochs", "0"], ["training.epochs", "0", ">= 1"]),
    Case("negative-lr", "train", [*LM, *CONTINUE, "--optimizer-lr", "-0.001"], ["optimizer.lr", "-0.001", "> 0"]),
    Case("zero-block-size", "train", [*LM, *CONTINUE, "--model-block-size", "0"], ["model.block_size", "0", ">= 1"]),
    Case("n-embd-not-divisible-by-n-head", "train", [*LM, *CONTINUE, "--model-n-embd", "30", "--model-n-head", "4"],
         ["model.n_embd", "30", "multiple of model.n_head"]),
    Case("key-value-heads-that-do-not-divide-the-heads", "train", [*LM, *CONTINUE, "--model-n-kv-head", "3"],
         ["model.n_kv_head", "3", "a divisor of model.n_head (2), or 0"]),
    Case("zero-rotary-base", "train", [*LM, *CONTINUE, "--model-rope-base", "0"], ["model.rope_base", "0", "> 0"]),
    Case("no-blocks-for-the-lm-task-named-by-its-path", "train",
         [*LM, *CONTINUE, "--task", "llm.training.tasks.lm_task:LMTask", "--model-n-layer", "0"],
         ["model.n_layer: got 0, expected an integer >= 1: a GPT has blocks"]),
    Case("odd-head-size-with-rotary-positions", "train", [*LM, *CONTINUE, "--model-n-embd", "6", "--model-n-head", "2"],
         ["model.n_embd", "even head size", "--model-pos-emb learned"]),
    pytest.param(
        Case("environment-variable-wrong-type", "train", [*LM, *CONTINUE], ["LLM_TRAINING_BATCH_SIZE", "training.batch_size", "'many'", "an integer"],
             env={"LLM_TRAINING_BATCH_SIZE": "many"})),
    # data
    Case("data-path-missing", "train", [*LM, *CONTINUE, "--data-path", "nope.txt"],
         ["data.path", "nope.txt", "does not exist"]),
    Case("data-path-empty-file", "train", [*LM, *CONTINUE, "--data-path", "empty.txt"],
         ["data.path", "empty.txt", "is empty"], files={"empty.txt": ""}),
    Case("data-path-empty-folder", "train", [*LM, *CONTINUE, "--data-path", "emptydir"],
         ["data.path", "emptydir", "holds no files"]),
    Case("corpus-shorter-than-one-window", "train", [*LM, *CONTINUE, "--data-path", "short.txt"],
         ["11 tokens", "model.block_size+1 = 33", "lower model.block_size"], files={"short.txt": "hello world"}),
    Case("tokenizer-file-that-is-not-one", "train", [*LM, *CONTINUE, "--data-tokenizer", "tok.json"],
         ["tok.json", "is not a tokenizer file"], files={"tok.json": '{"x": 1}'}),
    Case("tokenizer-file-with-a-token-id-past-any-vocabulary", "train", [*LM, *CONTINUE, "--data-tokenizer", "big.json"],
         ["big.json", "largest token id is 4,000,000,000", "at most 1,048,576"], files={"big.json": BIG_IDS}),
    Case("char-tokenizer-file-with-a-lone-surrogate", "train", [*LM, *CONTINUE, "--data-tokenizer", "s.json"],
         ["s.json", "'chars' holds '\\ud800'", "UTF-8 cannot write"],
         files={"s.json": '{"type": "char", "chars": ["a", "\\ud800"]}'}),
    Case("tokenizer-that-does-not-cover-the-corpus", "train", [*LM, *CONTINUE, "--data-tokenizer", "ab.json"],
         ["data.path", "corpus.txt", "character 't'", "data.tokenizer ab.json"],
         files={"ab.json": '{"type": "char", "chars": ["a", "b"]}'}),
    Case("cache-dir-under-a-file", "train", [*LM, *CONTINUE, "--data-cache-dir", "afile.txt/cache"],
         ["data.cache_dir", "afile.txt", "--data-cache-dir"]),
    # tasks and data modules by name
    Case("unknown-task", "train", [*LM, *CONTINUE, "--task", "lmm"], ["task: got 'lmm'", "did you mean lm?"]),
    Case("unknown-data-module", "train", [*LM, *CONTINUE, "--data-module", "txt"],
         ["data.module: got 'txt'", "did you mean text?"]),
    Case("task-module-that-does-not-exist", "train", [*LM, *CONTINUE, "--task", "no_such_module:Task"],
         ["cannot import task module 'no_such_module'"]),
    Case("task-module-that-raises-on-import", "train", [*LM, *CONTINUE, "--task", "broken_task:Task"],
         ["cannot import task module 'broken_task'", "RuntimeError: no GPU here", "broken_task.py:2"],
         files={"broken_task.py": "import os\nraise RuntimeError('no GPU here')\n"}),
    Case("task-module-with-a-syntax-error", "train", [*LM, *CONTINUE, "--task", "typo_task:Task"],
         ["cannot import task module 'typo_task'", "SyntaxError", "line 1"], files={"typo_task.py": "def f(:\n"}),
    Case("task-class-that-is-not-a-training-task", "train", [*LM, *CONTINUE, "--task", "collections:OrderedDict"],
         ["collections:OrderedDict", "not a TrainingTask subclass"]),
    Case("task-class-that-is-abstract", "train",
         [*LM, *CONTINUE, "--task", "llm.training.tasks.base_task:TrainingTask"],
         ["TrainingTask", "does not implement", "build_model"]),
    *[Case(f"op-with-no-deterministic-form-in-{where}", "train",
           ["--task", "tests.test_bad_input:PutTask", *REGRESSION, "--logging-log-dir", "fresh",
            "--training-deterministic", "true"],
           ["training.deterministic: put_ has no deterministic implementation", "--training-deterministic false"],
           env={"PUT_IN": where}, absent=["fresh"]) for where in ("training", "validation")],
    Case("task-and-data-module-that-do-not-fit", "train",
         [*LM, "--logging-log-dir", "fresh", "--task", "regression", "--data-module", "text"],
         ["RegressionTask.validation_step failed on the first batch of TextDataModule", "regression_task.py:",
          "--data-module"], absent=["fresh"]),
    Case("task-and-data-module-whose-shapes-would-broadcast", "train",
         ["--task", "regression", *REGRESSION, "--data-module", "classification", "--logging-log-dir", "fresh"],
         ["RegressionTask.validation_step failed on the first batch of ClassificationDataModule",
          "UserWarning: Using a target size (torch.Size([32])) that is different to the input size "
          "(torch.Size([32, 1]))", "--data-module"], absent=["fresh"]),
    # checkpoints to resume from
    *[Case(f"resume-checkpoint-{name}", "train", [*LM, *BRANCH, path], words, absent=["fresh"])
      for name, path, words in BROKEN_CHECKPOINTS],
    Case("resume-checkpoint-set-by-an-environment-variable", "train", [*LM, "--logging-log-dir", "fresh"],
         ["checkpoint.resume: checkpoint path nope does not exist", "environment variable LLM_CHECKPOINT_RESUME"],
         env={"LLM_CHECKPOINT_RESUME": "nope"}, absent=["fresh"]),
    Case("resume-checkpoint-truncated-and-resealed", "train",
         [*LM, *BRANCH, "resealed"], ["resealed", "state.pt is truncated or corrupt"], absent=["fresh"]),
    Case("resume-with-a-different-model", "train", [*LM, *CONTINUE, "--model-n-embd", "64"],
         ["cannot resume", "model.n_embd (32 -> 64) changed", "--checkpoint-allow-config-change true"]),
    Case("resume-from-the-weights-of-another-model", "train",
         [*LM, *BRANCH, "other"], ["cannot load other", "different model", "size mismatch"], absent=["fresh"]),
    Case("resume-a-checkpoint-of-another-run-into-a-run", "train", [*LM, "--logging-log-dir", "run",
                                                                     "--checkpoint-resume", "other"],
         ["run already holds a run and other", "is not one of its checkpoints", "new --logging-log-dir"]),
    Case("monitor-that-is-not-a-validation-metric", "train",
         [*LM, "--logging-log-dir", "fresh", "--checkpoint-monitor", "val_los"],
         ["checkpoint.monitor", "'val_los'", "val_loss, val_ppl", "did you mean val_loss?"], absent=["fresh"]),
    Case("resume-auto-into-another-runs-folder-with-no-checkpoint", "train", ["--task", "regression", *REGRESSION,
                                                                                 *CONTINUE],
         ["run holds a run with other settings (", "task", "no checkpoint of it to continue", "--logging-log-dir"],
         prepare=killed_before_its_first_save),
    Case("resume-auto-into-a-folder-that-holds-a-config-file-of-the-users", "train",
         ["--config", "run/config.yaml", "--training-max-steps", "5", *CONTINUE],
         ["run/config.yaml is no run's record of its settings (it lacks checkpoint, logging, distributed",
          "keep your config files outside run folders"], prepare=a_config_file_of_the_users_alone),
    Case("resume-auto-of-a-finished-run-whose-checkpoints-are-gone", "train", [*LM, *CONTINUE],
         ["run holds a finished run (summary.json) and no checkpoint of it", "new --logging-log-dir"],
         prepare=checkpoints_deleted),
    Case("resume-auto-of-a-run-whose-checkpoints-are-in-another-folder", "train", [*LM, *CONTINUE],
         ["the run in run saves its checkpoints in ckpt", "--checkpoint-dir ckpt"], prepare=saved_elsewhere),
    Case("resume-auto-of-a-run-with-another-checkpoint-dir-than-its-own", "train",
         [*LM, *CONTINUE, "--checkpoint-dir", "ckpt"],
         ["the run in run saves its checkpoints in run/checkpoints", "--checkpoint-dir run/checkpoints"]),
    Case("resume-auto-into-a-run-whose-config-yaml-does-not-parse", "train", [*LM, *CONTINUE, "--model-n-embd", "64"],
         ["run holds a run whose config.yaml cannot be read", "no checkpoint of it to continue", "--logging-log-dir"],
         prepare=killed_before_its_first_save_with_config_yaml_garbled),
    Case("resume-auto-when-metrics-jsonl-is-a-folder", "train", [*LM, *CONTINUE, "--training-max-steps", "6"],
         ["cannot append to run/metrics.jsonl", "it is a folder"], prepare=metrics_file_a_folder),
    pytest.param(Case("resume-auto-when-metrics-jsonl-is-read-only", "train",
                      [*LM, *CONTINUE, "--training-max-steps", "6"],
                      ["cannot append to run/metrics.jsonl", "not a file this user can read and write"], locked=("run/metrics.jsonl", 0o444)),
                 marks=NO_SETPRIV),
    pytest.param(Case("resume-auto-when-the-newest-checkpoint-cannot-be-read", "train",
                      [*LM, *CONTINUE, "--training-max-steps", "6"],
                      ["cannot read the checkpoint run/checkpoints/step_00000004", "Permission denied", "state.pt",
                       "make it readable"], locked=("run/checkpoints/step_00000004/state.pt", 0)),
                 marks=NO_SETPRIV),
    pytest.param(Case("token-cache-entry-that-cannot-be-read", "train", [*LM, "--logging-log-dir", "fresh"],
                      ["data.cache_dir", "cannot read the cache entry cache/", "Permission denied", "--data-cache-dir"],
                      prepare=own_cache, env={"LLM_DATA_CACHE_DIR": "cache"}, locked=("cache/*/tokens.bin", 0),
                      absent=["fresh"]), marks=NO_SETPRIV),
    pytest.param(Case("token-cache-tokenizer-that-cannot-be-read", "train", [*LM, "--logging-log-dir", "fresh"],
                      ["data.cache_dir", "cannot read the cache entry cache/", "tokenizer.json", "--data-cache-dir"],
                      prepare=own_cache, env={"LLM_DATA_CACHE_DIR": "cache"}, locked=("cache/*/tokenizer.json", 0),
                      absent=["fresh"]), marks=NO_SETPRIV),
    Case("resume-auto-when-every-checkpoint-is-corrupt", "train", [*LM, *CONTINUE],
         ["no valid checkpoint in run/checkpoints (2 found, none valid)", "--checkpoint-resume PATH"],
         prepare=truncate_every_checkpoint, warnings_ok=True),
    # folders that cannot be written
    pytest.param(
        Case("log-dir-under-a-file", "train", [*LM, "--logging-log-dir", "afile.txt/run"],
             ["afile.txt/run", "--logging-log-dir"])),
    pytest.param(
        Case("checkpoint-dir-under-a-file", "train", [*LM, "--logging-log-dir", "fresh", "--checkpoint-dir",
                                                      "afile.txt/ckpt"],
             ["afile.txt/ckpt", "--checkpoint-dir"], absent=["fresh/metrics.jsonl"])),
    pytest.param(
        Case("checkpoint-dir-of-an-earlier-run", "train",
             [*LM, "--logging-log-dir", "fresh", "--checkpoint-dir", "run/checkpoints"],
             ["run/checkpoints", "already holds checkpoints", "--checkpoint-resume auto"])),
    pytest.param(
        Case("checkpoint-dir-of-an-earlier-run-resumed-from-another-folder", "train",
             [*LM, "--logging-log-dir", "fresh", "--checkpoint-dir", "run/checkpoints", "--checkpoint-resume", "auto"],
             ["run/checkpoints", "holds the checkpoints of the run in run, not of fresh", "--logging-log-dir run"],
             absent=["fresh"])),
    pytest.param(
        Case("checkpoint-dir-inside-an-earlier-runs-checkpoint", "train",
             [*LM, "--logging-log-dir", "fresh", "--checkpoint-dir", "run/checkpoints/step_00000004/mine"],
             ["checkpoint.dir", "run/checkpoints/step_00000004", "retention", "outside it"], absent=["fresh"])),
    pytest.param(
        Case("log-dir-inside-an-earlier-runs-checkpoint-folder", "train", [*LM, "--logging-log-dir", "run/checkpoints/mine"],
             ["logging.log_dir", "run/checkpoints", "retention", "outside it"], absent=["run/checkpoints/mine"])),
    pytest.param(
        Case("cache-dir-inside-an-earlier-runs-checkpoint", "train",
             [*LM, "--logging-log-dir", "fresh", "--data-cache-dir", "run/checkpoints/step_00000004/cache"],
             ["data.cache_dir", "run/checkpoints/step_00000004", "retention", "outside it"], absent=["fresh"])),
    pytest.param(
        Case("log-dir-with-a-trailing-slash", "train", [*LM, "--logging-log-dir", "fresh/", "--data-path", "nope.txt"],
             ["data.path", "nope.txt"], absent=["fresh", "fresh-2"])),  # the folder it claimed, let go of whole
    # trackers
    pytest.param(Case("mlflow-tracking-uri-that-is-not-one", "train",
                      [*LM, "--logging-log-dir", "fresh", "--logging-loggers", "mlflow"],
                      ["MLflow tracking URI bogus://x", "unsupported URI", "MLFLOW_TRACKING_URI"],
                      env={"MLFLOW_TRACKING_URI": "bogus://x"}),
                 marks=pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="needs mlflow")),
    pytest.param(Case("mlflow-server-not-there", "train",  # said at once, not after minutes of retries
                      [*LM, "--logging-log-dir", "fresh", "--logging-loggers", "mlflow"],
                      ["MLflow tracking URI http://127.0.0.1:", "cannot reach it (Connection refused)"],
                      env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}),  # nothing listens there
                 marks=pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="needs mlflow")),
    # more memory than the machine has, asked for at once
    pytest.param(Case("model-larger-than-memory", "train",
                      [*LM, "--logging-log-dir", "fresh", "--model-n-embd", "2000000000", "--model-n-head", "1"],
                      ["build_model() ran out of memory", "GiB", "model.n_embd"], absent=["fresh"])),
    pytest.param(Case("model-larger-than-a-64-bit-count-of-bytes", "train",
                      ["--task", "regression", *REGRESSION, "--logging-log-dir", "fresh", "--model-n-embd",
                       "1000000000000000000"], ["build_model() ran out of memory", "more bytes than a 64-bit count"],
                      absent=["fresh"])),
    pytest.param(Case("training-set-empty", "train",
                      ["--task", "regression", *REGRESSION, "--logging-log-dir", "fresh", "--data-num-samples", "1"],
                      ["the training set of SyntheticDataModule is empty", "data.num_samples", "data.val_fraction"],
                      absent=["fresh"])),
    pytest.param(Case("data-larger-than-memory", "train",
                      ["--task", "regression", *REGRESSION, "--logging-log-dir", "fresh", "--data-num-samples",
                       "100000000000"], ["SyntheticDataModule.setup() ran out of memory", "GiB", "data.num_samples"],
                      absent=["fresh"])),
    # devices and precision
    pytest.param(Case("fp16-on-the-cpu", "train", [*LM, *CONTINUE, "--training-precision", "fp16"],
                      ["fp16 needs a CUDA device", "bf16 or fp32"]), marks=NO_CUDA),
    # generate, evaluate, export: checkpoints that are missing, not checkpoints, truncated, of another model
    *[Case(f"{tool}-checkpoint-{name}", tool, checkpoint_flag(tool, path), words)
      for tool in ("generate", "evaluate", "export") for name, path, words in BROKEN_CHECKPOINTS
      if name != "an-empty-folder"],
    *[pytest.param(Case(f"{tool}-checkpoint-folder-that-cannot-be-read", tool, checkpoint_flag(tool, "run"),
                        ["cannot read the checkpoint run/checkpoints/step_00000004", "Permission denied"],
                        locked=("run/checkpoints/step_00000004", 0)), marks=NO_SETPRIV)
      for tool in ("generate", "evaluate", "export")],
    *[Case(f"{tool}-checkpoint-of-another-model", tool, checkpoint_flag(tool, "other"),
           ["other", "belong to a different model", "size mismatch"]) for tool in ("generate", "evaluate", "export")],
    # export and plot: outputs that would write over an earlier run's files
    Case("export-out-over-a-file-of-the-run", "export", ["--checkpoint", "run", "--out", "run/model_config.safetensors"],
         ["run/model_config.json", "left as it is", "choose another --out"]),
    Case("export-out-ending-in-json", "export", ["--checkpoint", "run", "--out", "model.json"],
         ["model.json", "another suffix"], absent=["model.json"]),
    Case("export-out-under-a-file", "export", ["--checkpoint", "run", "--out", "afile.txt/model.safetensors"],
         ["afile.txt", "is a file, not a folder"]),
    Case("export-without-out", "export", ["--checkpoint", "run"], ["required", "--out"]),
    Case("plot-out-over-a-file-of-the-run", "plot", ["run", "--out", "run/metrics.jsonl"],
         ["run/metrics.jsonl", "cannot write .jsonl files"]),
]


def case_of(param) -> Case:
    return param.values[0] if hasattr(param, "values") else param


# ---- running everything once ---------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under folder, by relative path, as a hash of its bytes; every folder, empty ones too."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_dir()}


@dataclass
class Outcome:
    out: object  # subprocess.CompletedProcess, or the TimeoutExpired that ended it
    seconds: float
    cwd: Path
    before: dict[str, str] = field(default_factory=dict)

    @property
    def hung(self) -> bool:
        return not hasattr(self.out, "returncode")


@pytest.fixture(scope="module")
def earlier(tmp_path_factory) -> Path:
    """A small language-model run with two checkpoints, and broken checkpoints made from it."""
    root = tmp_path_factory.mktemp("earlier")
    (root / "corpus.txt").write_text(TEXT)
    out = run([*TOOLS["train"], *LM, "--logging-log-dir", "run"], cwd=root,
              env={"LLM_DATA_CACHE_DIR": str(root / "cache")})
    assert out.returncode == 0, out.stderr
    shutil.copytree(root / "cache", root / "cache-as-trained")
    step = root / "run" / "checkpoints" / "step_00000004"
    for name in ("truncated", "resealed", "other"):
        shutil.copytree(step, root / name)
    for name in ("truncated", "resealed"):
        state = root / name / "state.pt"
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    reseal(root / "resealed")
    # the weights of a narrower model, sealed in as if saved so: only its shapes give it away
    config = json.loads((step / "model_config.json").read_text())
    shared = torch.load(step / "state.pt", weights_only=True)
    shared["model"] = GPT(GPTConfig.from_dict({**config, "n_embd": 16})).state_dict()
    torch.save(shared, root / "other" / "state.pt")
    reseal(root / "other")
    return root


def case_folder(earlier: Path, cwd: Path, case: Case) -> None:
    cwd.mkdir(parents=True)
    shutil.copytree(earlier / "run", cwd / "run")
    (cwd / "corpus.txt").write_text(TEXT)
    (cwd / "afile.txt").write_text("a file, where a folder is expected\n")
    (cwd / "emptydir").mkdir()
    for name in ("truncated", "resealed", "other"):
        (cwd / name).symlink_to(earlier / name, target_is_directory=True)
    for name, text in case.files.items():
        (cwd / name).write_text(text)
    if case.prepare:
        case.prepare(cwd)


def run_case(earlier: Path, cwd: Path, case: Case) -> Outcome:
    case_folder(earlier, cwd, case)
    before = snapshot(cwd / "run")
    env = {"LLM_DATA_CACHE_DIR": str(earlier / "cache"), **case.env}
    start = time.monotonic()
    locked = next(cwd.glob(case.locked[0])) if case.locked else None
    if locked:
        mode = locked.stat().st_mode
        locked.chmod(case.locked[1])
    try:
        out = run([*(AS_USER or [] if locked else []), *TOOLS[case.tool], *case.args], cwd=cwd, env=env, timeout=120)
    except Exception as e:  # noqa: BLE001 - a hang (TimeoutExpired) is an outcome to report, not a crash
        out = e
    finally:
        if locked:
            locked.chmod(mode)  # for the look at what the command left
    return Outcome(out, time.monotonic() - start, cwd, before)


def run_torchrun(cwd: Path, *flags: str, env: dict[str, str] | None = None, patient: bool = False) -> Outcome:
    """torchrun with 2 processes on train.py; ``patient``: torchrun looks at its workers every 5 s instead of
    every 0.1 s, so a rank that fails a moment after another still prints its line before torchrun stops it."""
    cwd.mkdir(parents=True)
    start = time.monotonic()
    try:
        if patient:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--monitor-interval=5",
                        "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
            out = run([*launcher, str(TRAIN_PY), *QUIET, *flags], cwd=cwd, env=env, timeout=120)
        else:
            out = torchrun(2, TRAIN_PY, *QUIET, *flags, cwd=cwd, env=env, timeout=120)
    except Exception as e:  # noqa: BLE001
        out = e
    return Outcome(out, time.monotonic() - start, cwd)


def run_two_nodes(cwd: Path, *flags: str, env: dict[str, str]) -> Outcome:
    """Two torchrun agents with --nnodes=2, one process each, on 127.0.0.1; their output together, as one run's."""
    cwd.mkdir(parents=True)
    agent = node_agent(TRAIN_PY, *QUIET, *flags)
    start = time.monotonic()
    nodes = [subprocess.Popen(agent, cwd=cwd, env=cli_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=120)[0] for node in nodes]
        out = subprocess.CompletedProcess(agent, max(abs(node.returncode) for node in nodes), "", "".join(outputs))
    except subprocess.TimeoutExpired as e:
        out = e
    finally:
        for node in nodes:
            node.kill()
            node.wait()
    return Outcome(out, time.monotonic() - start, cwd)


JOB_OF_TEST = {
    "test_a_rank_that_hangs_outside_any_collective_is_ended_on_every_node": "hang-rank-0-two-nodes",
    "test_more_processes_than_data_stops_every_rank_with_the_same_line": "more-processes-than-data",
    "test_a_rank_that_raises_ends_the_run_on_every_rank": "raise",
    "test_a_rank_that_hangs_is_timed_out_by_the_others_and_torn_down": "hang",
    "test_code_in_a_data_file_is_only_ever_text": "code-in-data",
}


def selected_jobs(session: pytest.Session) -> set[str]:
    """The commands the selected tests of this module look at: with -k, only those run."""
    names = set()
    for item in session.items:
        if Path(item.path) == Path(__file__):
            case = getattr(item, "callspec", None) and item.callspec.params.get("case")
            names.add(case.id if case else JOB_OF_TEST.get(item.originalname))
    return names


@pytest.fixture(scope="module")
def outcomes(request, earlier, tmp_path_factory) -> dict[str, Future]:
    """The commands of the selected tests, started at once (the slow torchrun ones first), three at a time."""
    root = tmp_path_factory.mktemp("cases")
    pool = ThreadPoolExecutor(max_workers=3)
    jobs = {
        "hang": lambda: run_torchrun(root / "hang", "--task", "tests.test_bad_input:RaisingTask", *REGRESSION,
                                     "--distributed-timeout-s", "15", env={"FAULT": "hang"}),
        "hang-rank-0-two-nodes": lambda: run_two_nodes(
            root / "hang-rank-0-two-nodes", "--task", "tests.test_bad_input:RaisingTask", *REGRESSION,
            "--distributed-timeout-s", "10", env={"FAULT": "hang", "FAULT_RANK": "0"}),
        "raise": lambda: run_torchrun(root / "raise", "--task", "tests.test_bad_input:RaisingTask", *REGRESSION,
                                      "--distributed-timeout-s", "30", env={"FAULT": "raise"}, patient=True),
        "more-processes-than-data": lambda: run_torchrun(
            root / "more-processes-than-data", "--task", "regression", *REGRESSION, "--data-num-samples", "20",
            "--training-batch-size", "16", "--distributed-timeout-s", "30", patient=True),
        "code-in-data": lambda: run_code_in_data(earlier, root / "code-in-data"),
    }
    for param in CASES:
        case = case_of(param)
        jobs[case.id] = lambda case=case: run_case(earlier, root / case.id, case)
    wanted = selected_jobs(request.session)
    futures = {name: pool.submit(job) for name, job in jobs.items() if name in wanted}
    yield futures
    pool.shutdown(wait=True)


# ---- bad input: one line, exit 2, nothing of the earlier run changed ---------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_exits_2_with_one_line_and_leaves_the_earlier_run_alone(case, outcomes):
    outcome = outcomes[case.id].result()
    assert not outcome.hung, f"no answer in 120 s: {outcome.out}"
    out = outcome.out
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = out.stderr.splitlines()
    if case.warnings_ok:
        lines = [line for line in lines if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert out.stderr.endswith("\n")
    for word in case.words:
        assert word in lines[0], lines[0]
    assert out.returncode == 2, out.stderr
    assert snapshot(outcome.cwd / "run") == outcome.before, "the earlier run's files changed"
    for path in case.absent:
        assert not (outcome.cwd / path).exists(), path


def test_more_processes_than_data_stops_every_rank_with_the_same_line(outcomes):
    outcome = outcomes["more-processes-than-data"].result()
    assert not outcome.hung and outcome.seconds < 120
    out = outcome.out
    assert out.returncode != 0
    line = ("error: the training set has 18 samples, fewer than one batch per rank (16 x 2 ranks): "
            "lower training.batch_size or use fewer processes")
    assert out.stderr.count(line + "\n") == 2, out.stderr[-3000:]  # one from each rank
    # torchrun's report: each rank exited 2, or, having printed its line, was still exiting when torchrun's
    # monitor saw the other gone and sent it SIGTERM
    codes = re.findall(r"exitcode\s*: (-?\d+) ", out.stderr)
    assert len(codes) == 2 and "2" in codes and set(codes) <= {"2", "-15"}, out.stderr[-3000:]
    assert not re.search(r"^\[rank\d\]: Traceback", out.stderr, re.M)


# ---- a rank that fails or hangs under torchrun -----------------------------------------------------


def failed_within(outcome: Outcome, seconds: float) -> subprocess.CompletedProcess:
    """The run of ``outcome``, which ended with an error, and within ``seconds``: no rank held it for ever."""
    assert not outcome.hung and outcome.seconds < seconds, outcome.seconds
    assert outcome.out.returncode != 0
    return outcome.out


def lines_from(out: subprocess.CompletedProcess, start: str) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.startswith(start)]


def test_a_rank_that_raises_ends_the_run_on_every_rank(outcomes):
    out = failed_within(outcomes["raise"].result(), 90)
    assert "[rank1]: RuntimeError: injected failure at step 3" in out.stderr
    # torchrun's report: rank 1 ended with its own error (exit code 1), and rank 0 ended too
    exits = dict(re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s+exitcode\s*: (-?\d+)", out.stderr))
    assert exits.get("1") == "1" and "0" in exits, out.stderr[-3000:]
    # and rank 0, left waiting, names the rank that failed and its error in one line
    rank0 = lines_from(out, "error: rank 0 lost contact")
    assert len(rank0) == 1, out.stderr[-3000:]
    assert "rank 1 failed with RuntimeError: injected failure at step 3" in rank0[0]


def test_a_rank_that_hangs_is_timed_out_by_the_others_and_torn_down(outcomes):
    out = failed_within(outcomes["hang"].result(), 120)
    # rank 0 says, in one line, why it gave up
    rank0 = lines_from(out, "error: rank 0 lost contact")
    assert len(rank0) == 1 and re.search(r"(?i)timed? ?out", rank0[0]), out.stderr[-3000:]
    assert "rank 1 did not answer (hung, or killed)" in rank0[0]


def test_a_rank_that_hangs_outside_any_collective_is_ended_on_every_node(outcomes):
    # rank 0 sleeps in its step: rank 1 times out, and rank 0, whose torchrun agent on its own node sees a
    # worker still running, learns from the store that the run is over and ends, rather than hold its node
    out = failed_within(outcomes["hang-rank-0-two-nodes"].result(), 100)
    assert "error: rank 1 lost contact with the others: rank 0 did not answer (hung, or killed)" in out.stderr
    sleep = next(n for n, line in enumerate(Path(__file__).read_text().splitlines(), 1) if "time.sleep(600)" in line)
    rank0 = lines_from(out, "error: rank 0 ends:")
    assert len(rank0) == 1 and re.fullmatch(
        rf"error: rank 0 ends: rank 1 lost contact with the others, and this rank has taken no step for \d+ s "
        rf"\(stuck at {re.escape(str(Path(__file__)))}:{sleep} in train_step\)", rank0[0]), out.stderr[-3000:]


# ---- what a data file holds is data ---------------------------------------------------------------


PAYLOADS = ("__import__('pathlib').Path('ran-python').touch()\n"
            "!!python/object/apply:os.system ['touch ran-yaml']\n"
            "$(touch ran-shell) `touch ran-backticks`\n")


def run_code_in_data(earlier: Path, cwd: Path) -> Outcome:
    cwd.mkdir(parents=True)
    (cwd / "corpus.txt").write_text(PAYLOADS * 40)
    start = time.monotonic()
    out = run([*TOOLS["train"], *LM, "--training-max-steps", "1", "--logging-log-dir", "run"], cwd=cwd,
              env={"LLM_DATA_CACHE_DIR": str(cwd / "cache")})
    return Outcome(out, time.monotonic() - start, cwd)


def test_code_in_a_data_file_is_only_ever_text(outcomes):
    outcome = outcomes["code-in-data"].result()
    assert outcome.out.returncode == 0, outcome.out.stderr[-3000:]
    assert not list(outcome.cwd.glob("ran-*"))
    tokenizer = json.loads((outcome.cwd / "run" / "tokenizer.json").read_text())
    assert set(tokenizer["chars"]) == set(PAYLOADS)  # read as characters, all of them


# ---- docs/reliability.md names only tests that exist ---------------------------------------------


def test_reliability_doc_names_tests_that_exist():
    doc = (REPO / "docs/reliability.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([^\]]+)\])?`", doc)
    assert len(named) > 50
    ids = {case_of(param).id for param in CASES}
    for path, name, case in named:
        assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), f"{path}::{name}"
        if case:
            assert path == "tests/test_bad_input.py" and case in ids, f"{path}::{name}[{case}]"
    assert {case for _, _, case in named} >= ids  # and every case is in the table
    sources = "\n".join(path.read_text() for path in (REPO / "tests").rglob("test_*.py"))
    for name in re.findall(r"(?<!::)`(test_\w+)`", doc):  # named without its file
        assert re.search(rf"^def {name}\(", sources, re.M), name
