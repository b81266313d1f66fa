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


@pytest.mark.parametrize("label", [4, -1])
def test_a_label_outside_the_classes_is_one_line(tmp_path, label):
    from llm.data.classification_data_module import ClassificationDataModule
    from llm.errors import UsageError

    class BadLabels(ClassificationDataModule):  # as a data set with more classes than data.num_classes
        def setup(self, stage=None):
            super().setup(stage)
            self.train_set.tensors[1][-3] = label

    config = Config.from_dict({"task": "classification", "data": {"num_classes": 4},
                               "training": {"epochs": 1, "device": "cpu"}, "logging": {"log_dir": str(tmp_path)}})
    engine = TrainingEngine(config, ClassificationTask(config), data_module=BadLabels(config))
    with pytest.raises(UsageError, match=rf"^a batch holds a label outside 0..3 \(data.num_classes=4\): "
                                         rf"Target {label} is out of bounds"):
        engine.train()
