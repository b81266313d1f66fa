import math

import pytest
import torch

from llm.errors import UsageError
from llm.models.gpt import GPT, GPTConfig
from llm.training.core.config import OptimizerConfig
from llm.training.core.optim import MuonWithAdamW, build_optimizer, build_scheduler, lr_factor
from llm.training.tasks.regression_task import mlp


def test_warmup_then_cosine_to_min_lr():
    cfg = OptimizerConfig(lr=1.0, min_lr=0.1, warmup_steps=4, scheduler="cosine")
    assert [lr_factor(s, cfg, 20) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr_factor(4, cfg, 20) == pytest.approx(1.0)
    assert lr_factor(12, cfg, 20) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(20, cfg, 20) == pytest.approx(0.1)
    assert lr_factor(25, cfg, 20) == pytest.approx(0.1)  # past the end it stays at the floor
    linear = OptimizerConfig(lr=1.0, min_lr=0.0, scheduler="linear")
    assert lr_factor(5, linear, 10) == pytest.approx(0.5)
    assert lr_factor(7, OptimizerConfig(scheduler="constant"), 10) == 1.0


def test_weight_decay_only_on_matrices():
    model = mlp(4, 8, 1, 1)
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.1))
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decay == {id(p) for p in model.parameters() if p.ndim == 2}


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=16))


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = tiny_gpt()
    opt = build_optimizer(model, OptimizerConfig(name="muon"))
    assert isinstance(opt, MuonWithAdamW)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    assert muon == {id(p) for p in model.blocks.parameters() if p.ndim == 2}
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    assert adamw.isdisjoint(muon) and adamw | muon == {id(p) for p in model.parameters()}
    assert id(model.tok_emb.weight) in adamw


def test_muon_on_a_model_without_hidden_matrices_is_refused_in_one_line():
    with pytest.raises(UsageError, match="Sequential has no hidden matrices for Muon"):
        build_optimizer(mlp(4, 8, 1, 1), OptimizerConfig(name="muon"))  # one hidden layer: two matrices


def test_muon_learns_follows_the_schedule_and_restores_state():
    model = tiny_gpt()
    cfg = OptimizerConfig(name="muon", lr=0.02, warmup_steps=2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=30)
    x = torch.randint(0, 20, (8, 8))
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]
    # the scheduler's lr reaches both inner optimizers
    assert opt.muon.param_groups[0]["lr"] == opt.adamw.param_groups[0]["lr"] == pytest.approx(0.0)
    restored = build_optimizer(tiny_gpt(), cfg)
    restored.load_state_dict(opt.state_dict())
    assert restored.state_dict()["muon"]["state"].keys() == opt.state_dict()["muon"]["state"].keys()
    assert not math.isnan(losses[-1])
