import math

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


def test_integer_labels_of_any_width_train_as_long_ones_do(tmp_path):
    from llm.data.classification_data_module import ClassificationDataModule

    class Int32Labels(ClassificationDataModule):  # as numpy and many data sets give them
        def setup(self, stage=None):
            super().setup(stage)
            for split in (self.train_set, self.val_set):
                split.tensors = (split.tensors[0], split.tensors[1].int())

    runs = {}
    for name, data in (("long", ClassificationDataModule), ("int32", Int32Labels)):
        cfg = config(tmp_path / name)
        cfg.training.epochs = 1
        metrics = TrainingEngine(cfg, ClassificationTask(cfg), data_module=data(cfg)).train()
        runs[name] = {k: v for k, v in metrics.items() if k.startswith(("val_", "train_"))}
    assert runs["int32"] == runs["long"] and runs["long"]["val_acc"] > 0


def test_macro_f1_is_over_the_whole_set_and_the_classes_seen_in_it(tmp_path):
    task = ClassificationTask(config(tmp_path))  # 3 classes
    g = torch.Generator().manual_seed(0)
    label, predicted = torch.randint(0, 2, (200,), generator=g), torch.randint(0, 2, (200,), generator=g)
    predicted[:5] = 0  # class 2 is neither a label nor a prediction: it has no F1 to count
    by_hand = []
    for c in (0, 1):
        tp = int(((predicted == c) & (label == c)).sum())
        fp, fn = int(((predicted == c) & (label != c)).sum()), int(((predicted != c) & (label == c)).sum())
        by_hand.append(2 * tp / (2 * tp + fp + fn))
    scored = task.score_collected({"label": label, "predicted": predicted})
    assert scored["f1"] == pytest.approx(sum(by_hand) / 2)
    one_hot = torch.nn.functional.one_hot(label, 3).float()
    assert task.score_collected({"label": one_hot, "predicted": predicted}) == scored
    batches = [task.score_collected({"label": label[i:i + 40], "predicted": predicted[i:i + 40]})["f1"]
               for i in range(0, 200, 40)]
    assert sum(batches) / 5 != pytest.approx(scored["f1"], abs=1e-3)  # a mean of batches' F1 is another number


def test_validation_logs_macro_f1_and_the_evaluation_of_a_checkpoint_gives_the_same(tmp_path):
    from llm.evaluate import score_split

    cfg = config(tmp_path)
    cfg.training.epochs, cfg.data.noise = 1, 2.0  # a hard problem: F1 short of 1
    cfg.checkpoint.monitor, cfg.checkpoint.mode = "val_f1", "max"
    metrics = TrainingEngine(cfg, ClassificationTask(cfg)).train()
    assert 0.3 < metrics["val_f1"] < 1.0
    scored, samples, _ = score_split(tmp_path / "run/checkpoints/best")
    assert scored["val_f1"] == metrics["val_f1"] and samples == 51


def test_labels_the_loss_ignores_have_no_class_in_the_f1(tmp_path):
    task = ClassificationTask(config(tmp_path))
    label, predicted = torch.tensor([0, 1, 2, -100, -100]), torch.tensor([0, 1, 2, 1, 0])
    assert task.score_collected({"label": label, "predicted": predicted})["f1"] == 1.0


def test_labels_the_loss_ignores_count_in_neither_the_loss_nor_the_accuracy(tmp_path):
    task = ClassificationTask(config(tmp_path))
    model, criterion = task.build_model(), task.build_criterion()
    x, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 0, -100, -100])
    loss, metrics = task.train_step((x, y), model, criterion)
    logits = model(x)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits[:4], y[:4]).item(), rel=1e-6)
    hits = (logits[:4].argmax(-1) == y[:4]).sum().item()
    assert metrics["acc"].item() == pytest.approx(hits / 4) and task.loss_weight((x, y)).item() == 4
    # a batch whose labels are all ignored: loss 0 and no weight in the means, not 0/0 = NaN
    loss, metrics = task.train_step((x, torch.full((6,), -100)), model, criterion)
    assert loss.item() == 0.0 and metrics["acc"].item() == 0.0 and task.loss_weight((x, torch.full((6,), -100))) == 0
    # soft targets: every row counts, accuracy against the likeliest class
    soft = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3).float()
    loss, metrics = task.train_step((x, soft), model, criterion)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, soft).item(), rel=1e-6)
    assert metrics["acc"].item() == pytest.approx((logits.argmax(-1) == soft.argmax(-1)).float().mean().item())


def test_a_training_batch_of_ignored_labels_leaves_the_run_and_its_means_finite(tmp_path):
    from llm.data.classification_data_module import ClassificationDataModule

    class SomeUnlabelled(ClassificationDataModule):  # the first two training batches carry no label
        def setup(self, stage=None):
            super().setup(stage)
            self.train_set.tensors[1][:64] = -100

        def train_dataloader(self, rank, world_size):  # in order, unshuffled
            return self.build_dataloader(self.train_set, rank, world_size, train=False)

    cfg = config(tmp_path)
    cfg.training.epochs = 1
    engine = TrainingEngine(cfg, ClassificationTask(cfg), data_module=SomeUnlabelled(cfg))
    metrics = engine.train()
    assert metrics["skipped_steps"] == 0 and all(map(math.isfinite, (metrics["train_loss"], metrics["val_loss"])))
