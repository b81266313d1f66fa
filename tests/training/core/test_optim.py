import dataclasses
import io
import math

import pytest
import torch

from llm.errors import UsageError
from llm.models.gpt import GPT, GPTConfig
from llm.training.core.checkpoint import load_shared_state
from llm.training.core.config import OptimizerConfig
from llm.training.core.optim import (MuonWithAdamW, WeightAverage, build_optimizer, build_scheduler, lr_factor,
                                     ready_for_skips, warmup_outlasting)
from llm.training.tasks.regression_task import mlp
from tests.helpers import tiny_config, train


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


def test_a_warmup_that_outlasts_the_run_is_named_with_the_rate_it_ends_at():
    assert warmup_outlasting(OptimizerConfig(lr=0.1, warmup_steps=100), 3) == (
        "optimizer.warmup_steps 100 outlasts the run's 3 optimizer steps: the learning rate never reaches "
        "optimizer.lr 0.1 (it ends at 0.00297)")
    assert warmup_outlasting(OptimizerConfig(lr=0.1, warmup_steps=2), 3) == ""  # reached at the last step


def test_wsd_holds_the_rate_then_decays_linearly_over_the_last_share_of_the_steps():
    cfg = OptimizerConfig(lr=1.0, min_lr=0.1, warmup_steps=4, scheduler="wsd", decay_fraction=0.25)
    # 20 steps: 4 of warmup, 16 after it, the last 4 of them each below lr, min_lr reached as the last one ends
    assert [lr_factor(s, cfg, 20) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert [lr_factor(s, cfg, 20) for s in range(4, 16)] == [1.0] * 12
    assert [lr_factor(s, cfg, 20) for s in range(16, 21)] == pytest.approx([0.82, 0.64, 0.46, 0.28, 0.1])
    assert lr_factor(25, cfg, 20) == pytest.approx(0.1)
    # given more steps while still stable, the rates taken so far are those of a run given them from the start
    assert [lr_factor(s, cfg, 40) for s in range(16)] == [lr_factor(s, cfg, 20) for s in range(16)]
    # a share of a few steps: at least the last one decays; 0.1 of 30 is 3 steps, not 4 (3.0000000000000004)
    short = OptimizerConfig(lr=1.0, scheduler="wsd", decay_fraction=0.2)
    assert [lr_factor(s, short, 3) for s in range(3)] == pytest.approx([1.0, 1.0, 0.5])
    tenth = OptimizerConfig(lr=1.0, scheduler="wsd", decay_fraction=0.1)
    assert [lr_factor(s, tenth, 30) for s in range(26, 30)] == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_wsd_with_the_1_sqrt_shape_falls_faster_at_first_and_ends_at_min_lr_as_the_linear_one_does():
    cfg = OptimizerConfig(lr=1.0, min_lr=0.1, warmup_steps=4, scheduler="wsd", decay_fraction=0.25, decay_shape="1-sqrt")
    linear = dataclasses.replace(cfg, decay_shape="linear")
    assert [lr_factor(s, cfg, 20) for s in range(16)] == [lr_factor(s, linear, 20) for s in range(16)]
    # progress 1/5 ... 5/5 of the decay: 0.1 + 0.9 (1 - sqrt(p))
    assert [lr_factor(s, cfg, 20) for s in range(16, 21)] == pytest.approx(
        [0.1 + 0.9 * (1 - math.sqrt(p / 5)) for p in range(1, 6)])
    drops = lambda c: [lr_factor(s - 1, c, 20) - lr_factor(s, c, 20) for s in (16, 20)]  # noqa: E731
    assert drops(cfg)[0] > drops(linear)[0] and drops(cfg)[1] < drops(linear)[1]  # the first step's, the last's
    assert lr_factor(20, cfg, 20) == pytest.approx(0.1) and lr_factor(25, cfg, 20) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    model = mlp(4, 8, 1, 1)
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.1))
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decay == {id(p) for p in model.parameters() if p.ndim == 2}


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_a_model_with_complex_parameters_gets_the_unfused_optimizer_and_steps(name):
    """torch's fused kernels take real numbers only: a complex parameter (a spectral filter) is stepped by the
    per-parameter kernels, as torch.optim would step it given no choice."""
    model = torch.nn.Module()
    model.filter = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.complex64))
    model.bias = torch.nn.Parameter(torch.zeros(4))
    opt = build_optimizer(model, OptimizerConfig(name=name, lr=0.1))
    assert not any(group.get("fused") for group in opt.param_groups)
    before = model.filter.detach().clone()
    (model.filter.abs().sum() + model.bias.sum()).backward()
    opt.step()
    assert not torch.equal(model.filter, before) and torch.isfinite(torch.view_as_real(model.filter)).all()
    assert build_optimizer(mlp(4, 8, 1, 1), OptimizerConfig(name=name)).param_groups[0]["fused"]


def test_muon_leaves_a_complex_hidden_matrix_to_adamw():
    model = tiny_gpt()
    model.blocks[0].spectral = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.complex64))
    opt = build_optimizer(model, OptimizerConfig(name="muon"))
    assert not any(p is model.blocks[0].spectral for group in opt.muon.param_groups for p in group["params"])
    assert any(p is model.blocks[0].spectral for group in opt.adamw.param_groups for p in group["params"])


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
    only_blocks = torch.nn.Module()
    only_blocks.blocks = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), torch.nn.Linear(8, 1, bias=False))
    with pytest.raises(UsageError, match="every trainable parameter of Module is a hidden matrix .* none for the AdamW"):
        build_optimizer(only_blocks, OptimizerConfig(name="muon"))


def lm_loss(model, x):
    return torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


def train_steps(model, opt, sched, x, steps):
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, x)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_muon_learns_and_follows_the_schedule():
    model = tiny_gpt()
    cfg = OptimizerConfig(name="muon", lr=0.02, warmup_steps=2)
    opt = build_optimizer(model, cfg)
    losses = train_steps(model, opt, build_scheduler(opt, cfg, total_steps=30), torch.randint(0, 20, (8, 8)), 30)
    assert losses[-1] < 0.75 * losses[0] and not math.isnan(losses[-1])
    # the scheduler's lr reaches both inner optimizers
    assert opt.muon.param_groups[0]["lr"] == opt.adamw.param_groups[0]["lr"] == pytest.approx(0.0)


def saved_and_loaded(state: dict) -> dict:
    """``state`` through torch.save and a weights_only load, as a checkpoint's state.pt goes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_muon_state_round_trips_and_the_restored_optimizer_steps_identically():
    cfg = OptimizerConfig(name="muon", lr=0.02, warmup_steps=2)
    x = torch.randint(0, 20, (8, 8))
    model = tiny_gpt()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    train_steps(model, opt, sched, x, 3)
    state = saved_and_loaded(opt.state_dict())
    assert state["state"].keys() == set(range(len(list(model.parameters()))))  # torch's form, every parameter

    restored_model = tiny_gpt()
    restored_model.load_state_dict(model.state_dict())
    restored = build_optimizer(restored_model, cfg)
    restored_sched = build_scheduler(restored, cfg, total_steps=10)
    restored.load_state_dict(state)
    restored_sched.load_state_dict(sched.state_dict())
    # momenta and the schedule's rate must reach the inner optimizers, or these steps differ
    train_steps(model, opt, sched, x, 3)
    train_steps(restored_model, restored, restored_sched, x, 3)
    for (name, a), b in zip(model.named_parameters(), restored_model.parameters()):
        assert torch.equal(a, b), name


def test_muon_with_adamw_step_evaluates_a_closure_with_gradients_on_and_returns_its_loss():
    model = tiny_gpt()
    opt = build_optimizer(model, OptimizerConfig(name="muon", lr=0.02))
    x = torch.randint(0, 20, (8, 8))
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        assert torch.is_grad_enabled()  # step() itself runs under no_grad
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # every parameter moved


def test_the_weight_average_follows_the_steps_taken_with_its_ramp_and_swaps_in_and_back():
    model = GPT(GPTConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=8, block_size=4))  # tied head and embedding
    average = WeightAverage(model, decay=0.9)
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    assert sorted(average.state()) == sorted(names) and len(average.average) == len(list(model.parameters()))
    state = average.state()
    assert state["lm_head.weight"] is state["tok_emb.weight"]  # one average for a tied weight, under both names
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    average.update(step=1, taken=True)  # the ramp: min(0.9, 2 / 11) keeps 2/11 of the average
    for a, p0 in zip(average.average, start):
        torch.testing.assert_close(a, p0 + 1.0 - 2 / 11)
    kept = [a.clone() for a in average.average]
    average.update(step=2, taken=False)
    average.update(step=2, taken=torch.tensor(False))  # a flag on the device: moved by nothing
    assert all(torch.equal(a, k) for a, k in zip(average.average, kept))
    with torch.profiler.profile() as profiled:
        average.update(step=100, taken=torch.tensor(True))
    # a flag left on the device is not read on the host: a GPU step would wait for it
    assert not [e.key for e in profiled.key_averages() if e.key in ("aten::item", "aten::_local_scalar_dense")]
    for a, k, p0 in zip(average.average, kept, start):
        torch.testing.assert_close(a, k + 0.1 * (p0 + 1.0 - k))
    live = [p.detach().clone() for p in model.parameters()]
    with average.swapped_in():
        assert all(torch.equal(p, a) for p, a in zip(model.parameters(), average.average))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), live))
    average.restart()
    assert all(torch.equal(a, p) for a, p in zip(average.average, model.parameters()))
    with pytest.raises(UsageError, match="the saved weight average lacks"):
        average.load({"tok_emb.weight": torch.zeros(11, 8)})


def test_sgd_made_ready_for_skips_on_the_device_holds_zero_momentum_buffers_also_after_a_load_without_them():
    """Fused SGD made its buffers (empty_like) at its first step, also one that found_inf skips, and read that
    memory as momentum at the next: every parameter has one of zeros, also after a checkpoint's state that
    lacks some or all of them is loaded."""
    model = mlp(4, 8, 1, 1, 0.0)
    sgd = build_optimizer(model, OptimizerConfig(name="sgd"))
    params = list(model.parameters())
    assert ready_for_skips(sgd)
    assert all(torch.equal(sgd.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in params)
    older = sgd.state_dict()
    older["state"] = {0: {"momentum_buffer": torch.ones_like(params[0])}, 1: {"momentum_buffer": None}}
    sgd.load_state_dict(older)
    assert torch.equal(sgd.state[params[0]]["momentum_buffer"], torch.ones_like(params[0]))
    assert all(torch.equal(sgd.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in params[1:])
    stepped = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    sgd.step()  # fused on the CPU too: it takes the loaded and the filled-in buffers alike
    assert all(not torch.equal(p, q) for p, q in zip(params, stepped))
    plain = build_optimizer(model, OptimizerConfig(name="sgd", beta1=0.0))
    assert ready_for_skips(plain) and not plain.state  # no momentum: none to make
    # a user's own SGD with dampening: zeros would not give torch's first step, so the host skips its steps
    assert not ready_for_skips(torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.1))
    assert ready_for_skips(build_optimizer(model, OptimizerConfig(name="adamw")))


def test_the_weight_average_is_validated_saved_resumed_bit_for_bit_and_what_the_tools_read(tmp_path, capsys):
    from llm.evaluate import score_split
    from llm.training.core.checkpoint import model_weights

    def averaged(name, **settings):
        return tiny_config(tmp_path / name, training={"ema_decay": 0.9, **settings},
                           checkpoint={"every_n_steps": 7, "keep_last": 5})

    straight, metrics = train(averaged("a"))
    ckpt = tmp_path / "a/run/checkpoints/step_00000028"
    shared = load_shared_state(ckpt)
    weights = model_weights(ckpt)
    assert set(weights) == set(shared["model"]) and any(not torch.equal(weights[k], shared["model"][k]) for k in weights)
    assert score_split(ckpt)[0]["val_loss"] == metrics["val_loss"]  # the average was validated, and is read back
    raw = tiny_config(tmp_path / "raw", training={"epochs": 2})
    assert train(raw)[1]["val_loss"] != metrics["val_loss"]  # the same training, validated on its own weights
    resumed_config = averaged("b")
    resumed_config.checkpoint.resume = str(tmp_path / "a/run/checkpoints/step_00000007")
    resumed, again = train(resumed_config)
    assert again["val_loss"] == metrics["val_loss"]
    assert all(torch.equal(a, b) for a, b in zip(straight.ema.average, resumed.ema.average))
    # from a checkpoint that holds none, the average starts from the weights resumed
    plain = tiny_config(tmp_path / "c", checkpoint={"every_n_steps": 7, "keep_last": 5})
    train(plain)
    capsys.readouterr()
    later = averaged("d")
    later.checkpoint.resume = str(tmp_path / "c/run/checkpoints/step_00000007")
    engine, _ = train(later)
    assert "the weight average (training.ema_decay 0.9) starts at step 7, from the weights resumed" in \
        capsys.readouterr().out
    assert engine.ema is not None
