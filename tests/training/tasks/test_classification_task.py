import pytest
import torch

from llm.training.core.config import Config
from llm.training.core.engine import TrainingEngine
from llm.training.core.optim import MuonWithAdamW
from llm.training.tasks.classification_task import ClassificationTask


def config(tmp_path, **optimizer):
    return Config.from_dict({
        "task": "classification", "data": {"num_samples": 512, "input_dim": 8, "num_classes": 3},
        "model": {"n_layer": 2, "n_embd": 32}, "training": {"epochs": 4, "batch_size": 32},
        "optimizer": {"lr": 0.01, "min_lr": 0.001, **optimizer},
        "logging": {"log_dir": str(tmp_path / "run"), "progress_bar": False},
    })


def test_the_classifier_learns_with_the_layers_and_optimizer_the_config_names(tmp_path):
    engine = TrainingEngine(config(tmp_path), ClassificationTask(config(tmp_path)))
    metrics = engine.train()
    linears = [m for m in engine.raw_model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 32), (32, 32), (32, 3)]
    assert metrics["val_acc"] > 0.8
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.001)  # its cosine ends at min_lr


@pytest.mark.parametrize("name, kind", [("sgd", torch.optim.SGD), ("muon", MuonWithAdamW)])
def test_another_optimizer_is_the_one_named(tmp_path, name, kind):
    task = ClassificationTask(config(tmp_path, name=name, beta1=0.5))
    optimizer = task.build_optimizer(task.build_model())
    assert isinstance(optimizer, kind)
