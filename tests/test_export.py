import json
import sys

import torch
from safetensors.torch import load_file

from llm.export import main
from llm.models.gpt import GPT, GPTConfig
from llm.training.core.engine import TrainingEngine
from llm.training.tasks.regression_task import RegressionTask
from tests.helpers import run, tiny_config


def test_export_regression_weights_load_back_strictly(tmp_path):
    config = tiny_config(tmp_path)
    engine = TrainingEngine(config, RegressionTask(config), 0, 1)
    engine.train()
    out = tmp_path / "export/model.safetensors"
    assert main([str(tmp_path / "run"), "--out", str(out)]) == 0
    description = json.loads(out.with_suffix(".json").read_text())
    assert description["task"] == "regression" and description["step"] == engine.step
    model = RegressionTask(config).build_model()
    model.load_state_dict(load_file(out), strict=True)
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x), engine.raw_model(x), rtol=0, atol=0)


def test_export_lm_with_tied_embeddings(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 60)
    flags = ["--task", "lm", "--data-path", str(corpus), "--data-cache-dir", str(tmp_path / "cache"),
             "--training-max-steps", "3", "--training-batch-size", "4", "--model-n-layer", "1", "--model-n-embd", "32",
             "--model-n-head", "2", "--model-block-size", "16", "--logging-progress-bar", "false",
             "--logging-log-dir", str(tmp_path / "run")]
    assert run([sys.executable, "-m", "llm.training.train", *flags], cwd=tmp_path).returncode == 0
    out = tmp_path / "lm.safetensors"
    result = run([sys.executable, "-m", "llm.export", str(tmp_path / "run/checkpoints"), "--out", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    description = json.loads(out.with_suffix(".json").read_text())
    model = GPT(GPTConfig.from_dict(description["model_config"]))
    model.load_state_dict(load_file(out), strict=True)
    assert description["model_config"]["tie_embeddings"] is True


def test_export_of_a_missing_checkpoint_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert capsys.readouterr().err == f"error: checkpoint path {tmp_path / 'nope'} does not exist\n"
