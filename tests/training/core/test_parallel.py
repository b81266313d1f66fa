"""Layout features through the engine: activation checkpointing, compile, precision, accumulation; FSDP state."""

import gc
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

from llm.errors import UsageError
from llm.models.gpt import GPT, GPTConfig
from llm.training.core import sharded
from llm.training.core.callbacks import Callback
from llm.training.core.checkpoint import CheckpointError, CheckpointManager, model_weights
from llm.training.core.config import Config, OptimizerConfig
from llm.training.core.engine import TrainingEngine
from llm.training.core.optim import build_optimizer
from llm.training.core.parallel import _DDP, load_model_and_optimizer, model_and_optimizer_state, prepare, wrap
from llm.training.tasks.lm_task import IGNORE_INDEX, LMTask
from llm.training.tasks.regression_task import RegressionTask
from tests.helpers import free_port, lm_config, spawn, tiny_config, weights


def train_lm(config, callbacks=None):
    engine = TrainingEngine(config, LMTask(config), 0, 1, callbacks=callbacks)
    return engine, engine.train()


def assert_close(a, b, **tol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tol)


class AttentionCalls(Callback):
    """Counts the forwards of each block's attention in training mode: a checkpointed block runs its forward
    again in the backward, to recompute what it did not keep."""

    calls = 0

    def on_train_start(self, engine):
        def count(module, args, output):
            self.calls += module.training
        for block in engine.raw_model.blocks:
            block.attn.register_forward_hook(count)


def test_activation_checkpointing_recomputes_each_block_and_trains_the_same(tmp_path):
    plain, checkpointed = AttentionCalls(), AttentionCalls()
    engine, _ = train_lm(lm_config(tmp_path / "a", model={"dropout": 0.1}), [plain])
    again, _ = train_lm(lm_config(tmp_path / "b", model={"dropout": 0.1},
                                  training={"activation_checkpointing": True}), [checkpointed])
    assert (plain.calls, checkpointed.calls) == (6 * 2, 2 * 6 * 2)  # 6 steps, 2 blocks
    assert_close(weights(engine.raw_model), weights(again.raw_model), rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_needs_blocks(tmp_path):
    config = tiny_config(tmp_path, training={"activation_checkpointing": True})
    with pytest.raises(UsageError, match="needs a model with a .blocks list"):
        TrainingEngine(config, RegressionTask(config), 0, 1).train()


def compiles(module: torch.nn.Module, *inputs: torch.Tensor) -> bool:
    """Whether a call of ``module`` goes through the compiler: with its caches emptied, a compiled one traces
    the call again."""
    torch._dynamo.reset()
    counters.clear()
    module(*inputs)
    return counters["frames"]["ok"] > 0


def test_a_model_without_blocks_compiles_whole_even_when_its_forward_is_torchs_own(tmp_path):
    config = tiny_config(tmp_path / "a", training={"compile": True, "max_steps": 4})
    compiled = TrainingEngine(config, RegressionTask(config), 0, 1)
    compiled.train()
    plain = tiny_config(tmp_path / "b", training={"max_steps": 4})
    eager = TrainingEngine(plain, RegressionTask(plain), 0, 1)
    eager.train()
    assert isinstance(compiled.raw_model, torch.nn.Sequential)  # whose forward module.compile() leaves eager
    assert list(compiled.raw_model.state_dict()) == list(eager.raw_model.state_dict())  # the names stay
    x, y = torch.randn(3, config.data.input_dim), torch.randn(3, 1)
    assert compiles(compiled.raw_model, x) and compiles(compiled.criterion, x[:, :1], y)
    assert not compiles(eager.raw_model, x) and not compiles(eager.criterion, x[:, :1], y)
    assert_close(weights(compiled.raw_model), weights(eager.raw_model), rtol=1e-5, atol=1e-6)


def test_blocks_of_torchs_own_layers_are_compiled_too(tmp_path):
    class Encoder(torch.nn.Module):  # .blocks of nn.TransformerEncoderLayer, whose forward is torch's code
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
                                              for _ in range(2))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    model = Encoder()
    names = list(model.state_dict())
    prepare(model, tiny_config(tmp_path, training={"compile": True}), 1)
    assert list(model.state_dict()) == names
    assert all(compiles(block, torch.randn(2, 3, 8)) for block in model.blocks)


def test_compiled_blocks_and_loss_train_like_eager_and_report_the_first_step_apart(tmp_path):
    # SGD: Adam's normalised update turns last-bit kernel differences of tiny gradients into lr-sized ones
    sgd = {"name": "sgd", "beta1": 0.0, "weight_decay": 0.0, "lr": 0.1}
    eager, _ = train_lm(lm_config(tmp_path / "a", optimizer=sgd))
    compiled, metrics = train_lm(lm_config(tmp_path / "b", training={"compile": True}, optimizer=sgd))

    # the loss too, fused: it makes no float32 copy of the logits (criterion.compile() would leave this one,
    # torch's own CrossEntropyLoss, eager)
    logits, targets = torch.randn(5, 7), torch.randint(0, 7, (5,))
    assert compiles(compiled.criterion, logits, targets) and not compiles(eager.criterion, logits, targets)
    assert_close(weights(eager.raw_model), weights(compiled.raw_model), rtol=1e-5, atol=1e-6)
    assert metrics["first_step_s"] > 0 and "tokens_per_s" in metrics
    # with activation checkpointing too: still compiled (checkpoint() hides what it calls from the compiler)
    torch._dynamo.reset()
    counters.clear()
    both, _ = train_lm(lm_config(tmp_path / "c", training={"compile": True, "activation_checkpointing": True},
                                 optimizer=sgd))
    assert all(compiles(block, torch.randn(2, 4, 32)) for block in both.raw_model.blocks)  # not just the loss
    assert_close(weights(eager.raw_model), weights(both.raw_model), rtol=1e-5, atol=1e-6)


def test_max_autotune_compiles_every_block_and_the_loss_in_that_mode_and_trains_like_eager(tmp_path, monkeypatch):
    modes = []
    compile_ = torch.compile

    def recording(fn, mode=None):
        modes.append(mode)
        return compile_(fn, mode=mode)

    monkeypatch.setattr(torch, "compile", recording)
    sgd = {"name": "sgd", "beta1": 0.0, "weight_decay": 0.0, "lr": 0.1}
    eager, _ = train_lm(lm_config(tmp_path / "a", optimizer=sgd))
    assert modes == []
    tuned, _ = train_lm(lm_config(tmp_path / "b", training={"compile": True, "compile_mode": "max-autotune"},
                                  optimizer=sgd))
    # each block and the loss, without CUDA graphs (torch's own "max-autotune" would add them)
    assert modes == ["max-autotune-no-cudagraphs"] * (len(tuned.raw_model.blocks) + 1)
    assert_close(weights(eager.raw_model), weights(tuned.raw_model), rtol=1e-5, atol=1e-6)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    engine, metrics = train_lm(lm_config(tmp_path, training={"precision": "bf16", "max_steps": 30},
                                         optimizer={"lr": 0.01}))
    first = engine.checkpoints  # the run completed and saved
    assert first.latest_valid() is not None
    assert metrics["val_loss"] < 2.5  # from ln(vocab) ~ 3.4


class AutocastProbe(RegressionTask):
    """Records, at each training step, the dtype autocast gives the forward on the CPU (None when it is off)."""

    seen: list[torch.dtype | None] = []

    def train_step(self, batch, model, criterion):
        self.seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return super().train_step(batch, model, criterion)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", None)])
def test_each_training_step_runs_in_the_precision_asked_for(tmp_path, precision, dtype):
    config = tiny_config(tmp_path, training={"precision": precision, "max_steps": 3})
    AutocastProbe.seen = []
    TrainingEngine(config, AutocastProbe(config), 0, 1).train()
    assert AutocastProbe.seen == [dtype] * 3


def test_fp16_on_cpu_is_refused(tmp_path):
    config = tiny_config(tmp_path, training={"precision": "fp16"})
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        TrainingEngine(config, RegressionTask(config), 0, 1).train()


class PartlyMaskedLM(LMTask):
    """Targets past a point that varies from window to window are ignored, as padding would be."""

    counts: list[int] = []

    @staticmethod
    def mask(batch):
        x, y = batch
        keep = torch.arange(y.shape[1]) <= x[:, :1] % y.shape[1]
        return x, y.masked_fill(~keep, IGNORE_INDEX)

    def train_step(self, batch, model, criterion):
        return super().train_step(self.mask(batch), model, criterion)

    def loss_weight(self, batch):
        count = super().loss_weight(self.mask(batch))
        if torch.is_grad_enabled():  # the training micro-batches' (validation weighs its batches too)
            self.counts.append(int(count))
        return count


def test_token_weighted_lm_loss_accumulates_to_the_larger_batch(tmp_path):
    sgd = {"name": "sgd", "beta1": 0.0, "weight_decay": 0.0, "scheduler": "constant", "lr": 0.1}
    runs = []
    PartlyMaskedLM.counts.clear()
    for name, training in (("a", {"batch_size": 8}), ("b", {"batch_size": 4, "grad_accum_steps": 2})):
        config = lm_config(tmp_path / name, training={**training, "grad_clip": 0.0}, optimizer=sgd)
        engine = TrainingEngine(config, PartlyMaskedLM(config), 0, 1)
        engine.train()
        runs.append(engine)
    big, small = runs
    assert big.step == small.step == 6 and len(PartlyMaskedLM.counts) == 6 + 12
    halves = PartlyMaskedLM.counts[-12:]  # the accumulated run's micro-batches, in pairs
    assert any(halves[i] != halves[i + 1] for i in range(0, 12, 2))  # so a plain 1/k would weigh them wrongly
    assert_close(weights(big.raw_model), weights(small.raw_model), rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_whole_tensors_is_refused_by_a_sharded_run_in_one_line(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}  # as DDP and one process save
    with pytest.raises(CheckpointError, match="holds whole tensors.*--distributed-strategy ddp"):
        load_model_and_optimizer(model, optimizer, saved, tmp_path / "step_00000004", fsdp=True)
    load_model_and_optimizer(model, optimizer, saved, tmp_path / "step_00000004", fsdp=False)


def muon_gpt(world_size: int = 1) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=16))
    config = Config()
    config.distributed.strategy = "fsdp"
    model = prepare(model, config, world_size)  # FSDP2-sharded when world_size > 1
    return model, build_optimizer(model, OptimizerConfig(name="muon", lr=0.02))


def lm_steps(model, optimizer, batches) -> None:
    for x in batches:
        torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()


def local_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.to_local().clone() for k, v in model.state_dict().items()}


def fsdp_muon_worker(rank: int, directory: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        batches = torch.randint(0, 20, (4, 4, 8), generator=torch.Generator().manual_seed(rank))
        model, optimizer = muon_gpt(2)
        lm_steps(model, optimizer, batches[:2])
        shared, write_sharded = model_and_optimizer_state(model, optimizer, sharded=True)
        ckpt = CheckpointManager(directory, rank, 2).save(2, shared, {}, write_sharded=write_sharded)
        lm_steps(model, optimizer, batches[2:])
        resumed, resumed_optimizer = muon_gpt(2)
        load_model_and_optimizer(resumed, resumed_optimizer, {}, ckpt, fsdp=True)
        lm_steps(resumed, resumed_optimizer, batches[2:])
        torch.save({"uninterrupted": local_weights(model), "resumed": local_weights(resumed)},
                   Path(directory, f"weights_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp_with_muon_saves_resumes_exactly_and_its_checkpoint_loads_unsharded(tmp_path):
    spawn(fsdp_muon_worker, str(tmp_path), free_port(), timeout=120)
    for rank in (0, 1):  # each rank's shards, bit for bit
        shards = torch.load(tmp_path / f"weights_rank{rank}.pt")
        assert_close(shards["uninterrupted"], shards["resumed"], rtol=0, atol=0)

    # unsharded (one process, or DDP): every parameter takes its saved optimizer state
    ckpt = tmp_path / "step_00000002"
    model, optimizer = muon_gpt()
    load_model_and_optimizer(model, optimizer, {}, ckpt, fsdp=False)
    saved = sharded.load_whole(ckpt / "sharded")["optimizer"]["state"]
    for name, param in model.named_parameters():
        assert saved[name].keys() == optimizer.state[param].keys(), name
        for key, value in saved[name].items():
            assert torch.equal(value, optimizer.state[param][key]), f"{name} {key}"
    assert {"momentum_buffer", "exp_avg"} <= {key for state in saved.values() for key in state}


def sharded_muon_step_worker(rank: int, directory: str, port: int, strategy: str, world_size: int) -> None:
    import os

    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    from llm.training.core.optim import _dealt_orthogonalised, _my_rows, _row_shard_dim, orthogonalised

    os.environ["LOCAL_WORLD_SIZE"] = "2"  # for hsdp: nodes of two processes, as torchrun tells each of them
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=30))
    try:
        config = Config()
        config.distributed.strategy = strategy
        shape = GPTConfig(vocab_size=20, block_size=8, n_layer=2, n_head=3, n_embd=15, head_size=4,
                          mlp_hidden=21)  # 15-row matrices: uneven shards
        models = []
        for ranks in (1, world_size, world_size):  # whole; sharded, dealt out; each rank orthogonalising every one
            torch.manual_seed(0)
            model = prepare(GPT(shape), config, ranks)
            models.append((model, build_optimizer(model, OptimizerConfig(name="muon", lr=0.02, weight_decay=0.1))))
        (whole, whole_opt), (shards, shards_opt), (everywhere, everywhere_opt) = models
        matrices = sum(len(group["params"]) for group in shards_opt.muon.param_groups)
        counts = {"dealt": [], "everywhere": []}
        for step in range(4):  # the same gradients for all, on every rank
            if step == 3:  # settings torch's Muon takes that build_optimizer does not give: handled alike
                for _, optimizer in models:
                    for group in optimizer.muon.param_groups:
                        group.update(lr=torch.tensor(0.01), adjust_lr_fn="original", nesterov=False)
            g = torch.Generator().manual_seed(step)
            for p, *sharded_ps in zip(whole.parameters(), shards.parameters(), everywhere.parameters()):
                p.grad = torch.randn(p.shape, generator=g)
                for s in sharded_ps:
                    mesh = s.device_mesh
                    whole_grad = DTensor.from_local(p.grad.clone(), mesh, [Replicate()] * mesh.ndim)
                    s.grad = whole_grad.redistribute(mesh, s.placements)
            whole_opt.step()
            with CommDebugMode() as comms:
                shards_opt.step()
            counts["dealt"].append(comms.get_comm_counts())
            with CommDebugMode() as comms:
                everywhere_opt._sharded_muon_step(deal=False)
            counts["everywhere"].append(comms.get_comm_counts())
            everywhere_opt.adamw.step()
        # matrices of fewer rows than ranks, dealt out: some ranks' shards are empty
        some = next(shards.parameters())
        muon = shards_opt.muon.param_groups[0]
        settings = (muon["ns_coefficients"], muon["ns_steps"], muon["eps"])
        g = torch.Generator().manual_seed(7)
        small = [distribute_tensor(torch.randn(shape, generator=g), some.device_mesh, some.placements)
                 for shape in ((1, 4), (3, 5), (5, 1))]
        dealt = _dealt_orthogonalised([(m, *settings) for m in small],
                                      some.device_mesh.get_group(_row_shard_dim(some)))
        small_alike = all(torch.equal(rows, _my_rows(m, orthogonalised(m.full_tensor(), *settings)))
                          for m, rows in zip(small, dealt))
        torch.save({"whole": {n: p.detach() for n, p in whole.named_parameters()}, "small_alike": small_alike,
                    "shards": {n: p.full_tensor() for n, p in shards.named_parameters()},
                    "everywhere": {n: p.full_tensor() for n, p in everywhere.named_parameters()},
                    "matrices": matrices,
                    "counts": {k: [{str(op): n for op, n in c.items()} for c in v] for k, v in counts.items()}},
                   Path(directory, f"muon_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("strategy, world_size", [("fsdp", 2), ("hsdp", 4)])
def test_muon_on_fsdp_shards_steps_as_on_whole_matrices_each_orthogonalised_by_one_rank(tmp_path, strategy,
                                                                                      world_size):
    # under hsdp, two nodes of two processes: each node deals the matrices out between its own two
    spawn(sharded_muon_step_worker, str(tmp_path), free_port(), strategy, world_size, nprocs=world_size, timeout=180)
    for rank in range(world_size):
        out = torch.load(tmp_path / f"muon_rank{rank}.pt")
        assert out["matrices"] == 8
        # the orthogonalisation's matrix products and norms are local: a matrix is gathered to the rank it was dealt
        # to and its rows scattered back, or, each rank orthogonalising every matrix, gathered by all
        for count in out["counts"]["dealt"]:
            assert count == {"c10d.gather_": 8, "c10d.scatter_": 8}, count
        for count in out["counts"]["everywhere"]:
            assert count == {"c10d_functional.all_gather_into_tensor": 8}, count
        assert_close(out["whole"], out["shards"], rtol=0, atol=0)
        assert_close(out["whole"], out["everywhere"], rtol=0, atol=0)
        assert out["small_alike"]


def fsdp_optimizers_worker(rank: int, directory: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        # each rank's two steps of 4 sequences; both ranks' together, 8 a step, for one process to train on
        each = [torch.randint(0, 20, (2, 4, 8), generator=torch.Generator().manual_seed(r)) for r in (0, 1)]
        config = GPTConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=16)
        for name in ("adamw", "adam", "sgd"):
            torch.manual_seed(0)
            model = prepare(GPT(config), Config.from_dict({"distributed": {"strategy": "fsdp"}}), 2)
            before = local_weights(model)
            lm_steps(model, build_optimizer(model, OptimizerConfig(name=name, lr=0.1)), each[rank])
            moved = any(not torch.equal(before[k], v) for k, v in local_weights(model).items())
            trained = {k: v.full_tensor() for k, v in model.state_dict().items()}
            if rank == 0:  # the shards' steps are one process's on both ranks' batches
                torch.manual_seed(0)
                whole = GPT(config)
                lm_steps(whole, build_optimizer(whole, OptimizerConfig(name=name, lr=0.1)), torch.cat(each, dim=1))
                for key, value in whole.state_dict().items():
                    torch.testing.assert_close(trained[key], value, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
            Path(directory, f"{name}_rank{rank}").write_text(str(moved))
    finally:
        dist.destroy_process_group()


def test_each_optimizer_steps_fsdp_shards_as_one_process_steps_on_both_ranks_batches(tmp_path):
    spawn(fsdp_optimizers_worker, str(tmp_path), free_port(), timeout=120)
    for name in ("adamw", "adam", "sgd"):  # sgd's fused kernel has no sharded version: it used to fail
        assert [(tmp_path / f"{name}_rank{rank}").read_text() for rank in (0, 1)] == ["True", "True"], name


def hsdp_worker(rank: int, directory: str, port: int) -> None:
    import os

    from torch.distributed.tensor import Replicate, Shard

    os.environ["LOCAL_WORLD_SIZE"] = "2"  # two nodes of two processes, as torchrun tells each of them
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=4,
                            timeout=timedelta(seconds=60))
    try:
        config = GPTConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=16)
        torch.manual_seed(0)
        model = prepare(GPT(config), Config.from_dict({"distributed": {"strategy": "hsdp"}}), 4)
        layouts = {(p.device_mesh.mesh_dim_names, tuple(map(tuple, p.device_mesh.mesh.tolist())), p.placements)
                   for p in model.parameters()}
        assert layouts == {(("replicate", "shard"), ((0, 1), (2, 3)), (Replicate(), Shard(0)))}, layouts
        batches = torch.randint(0, 20, (2, 4, 4, 8), generator=torch.Generator().manual_seed(1))  # steps x ranks
        lm_steps(model, build_optimizer(model, OptimizerConfig(name="sgd", lr=0.5)), batches[:, rank])
        trained = {k: v.full_tensor() for k, v in model.state_dict().items()}
        if rank == 0:  # one process on the four ranks' batches together
            torch.manual_seed(0)
            whole = GPT(config)
            lm_steps(whole, build_optimizer(whole, OptimizerConfig(name="sgd", lr=0.5)), batches.flatten(1, 2))
            for name, value in whole.state_dict().items():
                torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=name)
        Path(directory, f"rank{rank}").write_text("ok")
    finally:
        dist.destroy_process_group()


def test_hsdp_shards_each_block_within_a_node_and_trains_as_one_process_on_all_the_batches(tmp_path):
    spawn(hsdp_worker, str(tmp_path), free_port(), nprocs=4, timeout=180)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1", "rank2", "rank3"]


def test_nothing_is_compiled_before_the_first_step_whose_time_reports_compilation(tmp_path):
    torch._dynamo.reset()
    counters.clear()
    engine = TrainingEngine(lm_config(tmp_path, training={"compile": True}), LMTask(lm_config(tmp_path)), 0, 1)
    engine.setup()  # checks the task on a batch: that step must not compile the loss, out of the first step's time
    assert counters["stats"]["calls_captured"] == 0 and counters["stats"]["unique_graphs"] == 0


class CountedValidation(RegressionTask):
    """Counts its validation steps, to show which ranks made more forwards than they had batches."""

    calls = 0

    def validation_step(self, batch, model, criterion):
        CountedValidation.calls += 1
        return super().validation_step(batch, model, criterion)


def uneven_validation_worker(rank: int, directory: str, port: int, strategy: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        # 17 validation samples in batches of 8: rank 0 has items 0, 2, ..., 16 (2 batches), rank 1 has 8 (1 batch)
        config = tiny_config(Path(directory) / strategy, training={"batch_size": 8, "max_steps": 3},
                             data={"num_samples": 170}, distributed={"strategy": strategy})
        task = CountedValidation(config)
        metrics = TrainingEngine(config, task, rank, 2).train()
        Path(directory, f"{strategy}_rank{rank}").write_text(f"{metrics['val_loss']!r} {CountedValidation.calls}")
    finally:
        dist.destroy_process_group()


def test_fsdp_validates_ranks_with_uneven_batches_and_counts_each_item_once(tmp_path):
    # each FSDP forward gathers the weights: rank 1 repeats its last batch beside rank 0's second, uncounted
    for strategy in ("ddp", "fsdp"):
        spawn(uneven_validation_worker, str(tmp_path), free_port(), strategy, timeout=120)
    results = {(s, r): (tmp_path / f"{s}_rank{r}").read_text().split() for s in ("ddp", "fsdp") for r in (0, 1)}
    val_loss = {key: float(loss) for key, (loss, _) in results.items()}
    assert val_loss[("fsdp", 0)] == val_loss[("fsdp", 1)]
    assert val_loss[("fsdp", 0)] == pytest.approx(val_loss[("ddp", 0)], rel=1e-5)  # the same 17 items
    calls = {key: int(n) for key, (_, n) in results.items()}  # setup's check, then one validation of 2 or 1 batches
    assert (calls[("ddp", 0)], calls[("ddp", 1)], calls[("fsdp", 0)], calls[("fsdp", 1)]) == (3, 2, 3, 3)


class WithBatchNorm(RegressionTask):
    """An MLP with batch norm: running statistics that each rank updates with its own batches."""

    def build_model(self):
        return torch.nn.Sequential(torch.nn.BatchNorm1d(self.config.data.input_dim), super().build_model())


class CallsAModelMethod(RegressionTask):
    """A train_step that reaches the model's own method, not its forward."""

    def build_model(self):
        model = super().build_model()
        model.loss = lambda x, y: torch.nn.functional.mse_loss(model(x), y)
        return model

    def train_step(self, batch, model, criterion):
        return model.loss(*batch), {}


def buffers_and_methods_worker(rank: int, directory: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        config = tiny_config(Path(directory) / "bn", training={"max_steps": 3})
        engine = TrainingEngine(config, WithBatchNorm(config), rank, 2)
        engine.train()
        torch.save(dict(engine.raw_model[0].named_buffers()), Path(directory, f"buffers_rank{rank}.pt"))
        config = tiny_config(Path(directory) / "method", training={"max_steps": 3})
        try:
            TrainingEngine(config, CallsAModelMethod(config), rank, 2).train()
            outcome = "trained"
        except UsageError as e:
            outcome = str(e)
        Path(directory, f"method_rank{rank}").write_text(outcome)
        wrapped = _DDP(CallsAModelMethod(config).build_model())  # duck typing on the wrapper still answers
        assert not hasattr(wrapped, "loss") and getattr(wrapped, "loss", None) is None
        Path(directory, f"hasattr_rank{rank}").write_text("answered")
    finally:
        dist.destroy_process_group()


def test_ddp_validates_every_shard_with_the_buffers_it_saves_and_names_a_model_method_called_on_the_wrapper(
        tmp_path):
    spawn(buffers_and_methods_worker, str(tmp_path), free_port(), timeout=120)
    saved = model_weights(CheckpointManager(tmp_path / "bn" / "run" / "checkpoints").latest_valid())
    for rank in (0, 1):  # the final validation scored each rank's shard with rank 0's running statistics
        buffers = torch.load(tmp_path / f"buffers_rank{rank}.pt", weights_only=True)
        assert buffers["running_mean"].abs().sum() > 0
        for name, value in buffers.items():
            assert torch.equal(value, saved[f"0.{name}"]), (rank, name)
        assert (tmp_path / f"hasattr_rank{rank}").read_text() == "answered"
        assert (tmp_path / f"method_rank{rank}").read_text() == (
            "train_step used model.loss, which Sequential has and the DistributedDataParallel wrapper that "
            "train_step gets under several processes has not: call model(...), whose forward syncs the "
            "gradients, and reach loss from the model's forward")


def fsdp_buffers_worker(rank: int, directory: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        for name, stops in (("straight", [6]), ("resumed", [3, 6])):
            for i, max_steps in enumerate(stops):
                # a constant rate: a run of 3 steps, then 6, takes the steps of one run of 6
                config = tiny_config(Path(directory) / name, training={"max_steps": max_steps, "eval_every_steps": 2},
                                     optimizer={"scheduler": "constant"}, distributed={"strategy": "fsdp"},
                                     checkpoint={"resume": "auto" if i else ""})
                engine = TrainingEngine(config, WithBatchNorm(config), rank, 2)
                engine.train()
            state = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in engine.raw_model.state_dict().items()}
            torch.save(state, Path(directory, f"{name}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp_trains_on_rank_0s_buffers_and_a_resume_continues_them_bit_for_bit(tmp_path):
    """FSDP leaves each rank's running statistics its own, and its checkpoint saved one rank's copy for all: a
    resumed rank 0 went on from rank 1's statistics. As under DDP, each training forward now starts from rank
    0's, which validation scores and the checkpoint saves."""
    spawn(fsdp_buffers_worker, str(tmp_path), free_port(), timeout=120)
    saved = sharded.load_whole(CheckpointManager(tmp_path / "straight" / "run" / "checkpoints").latest_valid()
                               / "sharded")["model"]
    for rank in (0, 1):
        straight, resumed = (torch.load(tmp_path / f"{name}_rank{rank}.pt", weights_only=True)
                             for name in ("straight", "resumed"))
        assert straight.keys() == resumed.keys() and straight["0.running_mean"].abs().sum() > 0
        for key in straight:
            assert torch.equal(straight[key], resumed[key]), (rank, key)
        for key in ("0.running_mean", "0.running_var", "0.num_batches_tracked"):  # every rank ends with rank 0's
            assert torch.equal(straight[key], saved[key]), (rank, key)


class WithAnUnusedLayer(RegressionTask):
    """A model with a layer its forward never calls."""

    def build_model(self):
        return WithAnUnusedLayer.Model(super().build_model())

    class Model(torch.nn.Module):
        def __init__(self, used):
            super().__init__()
            self.used, self.unused = used, torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)


def unused_parameters_worker(rank: int, directory: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        for find in (False, True):
            config = tiny_config(Path(directory) / str(find), training={"max_steps": 3},
                                 distributed={"find_unused_parameters": find})
            try:
                outcome = f"steps {TrainingEngine(config, WithAnUnusedLayer(config), rank, 2).train()['steps']}"
            except UsageError as e:
                outcome = str(e)
            Path(directory, f"{find}_rank{rank}").write_text(outcome)
    finally:
        dist.destroy_process_group()


def test_ddp_names_the_parameters_a_loss_leaves_out_and_trains_with_find_unused_parameters(tmp_path):
    spawn(unused_parameters_worker, str(tmp_path), free_port(), timeout=120)
    for rank in (0, 1):
        assert (tmp_path / f"False_rank{rank}").read_text() == (
            "the loss of the last step did not depend on 2 parameter(s) of the model (unused.weight, unused.bias), "
            "whose gradients DDP waits for: pass --distributed-find-unused-parameters true, or freeze them with "
            "requires_grad_(False)")
        assert (tmp_path / f"True_rank{rank}").read_text() == "steps 3"


def fsdp_device_worker(rank: int, directory: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        torch._C._get_accelerator = lambda: torch.device("cuda")  # as on a machine with GPUs
        model = prepare(torch.nn.Linear(4, 2), Config.from_dict({"distributed": {"strategy": "fsdp"}}), 2)
        Path(directory, f"rank{rank}").write_text(f"{model.weight.device_mesh.device_type} {model.weight.device}")
    finally:
        dist.destroy_process_group()


def test_fsdp_shards_a_model_on_the_cpu_over_the_cpu_on_a_machine_with_gpus(tmp_path):
    """--training-device cpu: torch's default mesh is the GPUs' wherever there are some."""
    spawn(fsdp_device_worker, str(tmp_path), free_port(), timeout=60)
    assert [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)] == ["cpu cpu"] * 2


def sharded_adamw_worker(rank: int, directory: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        fsdp = Config.from_dict({"distributed": {"strategy": "fsdp"}})
        batches = torch.randn(3, 8, 4, generator=torch.Generator().manual_seed(rank))

        def built():
            torch.manual_seed(0)
            model = prepare(WithAnUnusedLayer.Model(torch.nn.Linear(4, 2)), fsdp, 2)
            return model, build_optimizer(model, OptimizerConfig(name="adamw", lr=0.1, weight_decay=0.1))

        def stepped(model, optimizer, steps):
            for x in steps:
                model(x).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return {name: value.full_tensor() for name, value in model.state_dict().items()}

        def saved(model, optimizer, name):
            _, write = model_and_optimizer_state(model, optimizer, sharded=True)
            (Path(directory) / name).mkdir(exist_ok=True)
            write(Path(directory) / name)
            dist.barrier()
            return Path(directory) / name

        def loaded(checkpoint):
            model, optimizer = built()
            load_model_and_optimizer(model, optimizer, {}, checkpoint, fsdp=True)
            return model, optimizer

        straight = stepped(*built(), batches)
        model, optimizer = built()  # saved before its first step: as if it never was
        at_0 = saved(model, optimizer, "step_0")
        outcomes = {"saved at step 0": stepped(model, optimizer, batches),
                    "resumed at step 0": stepped(*loaded(at_0), batches)}
        model, optimizer = built()  # the unused layer has no optimizer state to save
        stepped(model, optimizer, batches[:1])
        at_1 = saved(model, optimizer, "step_1")
        model, optimizer = loaded(at_1)
        outcomes["resumed at step 1"] = stepped(model, optimizer, batches[1:])
        moments = sorted(name for name, p in model.named_parameters() if optimizer.state.get(p))
        for name, outcome in outcomes.items():
            assert straight.keys() == outcome.keys()
            for key in straight:
                assert torch.equal(straight[key], outcome[key]), (name, key)
        Path(directory, f"rank{rank}").write_text(" ".join(moments))
    finally:
        dist.destroy_process_group()


def test_an_fsdp_checkpoint_holds_adamws_state_as_stepped_and_resumes_bit_for_bit(tmp_path):
    """torch's get_state_dict makes an optimizer's state with a step of rate 0 where it has none: it made a save
    before the first step count one more AdamW step, and a resume asked for moments of parameters that no loss
    had reached, which the checkpoint lacks."""
    spawn(sharded_adamw_worker, str(tmp_path), free_port(), timeout=120)
    assert [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)] == ["used.bias used.weight"] * 2


def bucket_layout_worker(rank: int, directory: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3,
                            timeout=timedelta(seconds=30))
    try:
        differ = _summed_otherwise(rank, Path(directory))
        Path(directory, f"rank{rank}").write_text(",".join(differ) or "none")
    finally:
        # the wrappers, freed with the frame above, go before the process group: freed after it, a reducer can
        # deadlock gloo's teardown (a worker thread freeing its last work waits for the GIL the destructor holds)
        gc.collect()
        dist.destroy_process_group()


def _summed_otherwise(rank: int, directory: Path) -> list[str]:
    """The parameters whose gradients a fresh DDP wrapper (a resume's first step) sums otherwise than one
    past the steps after which DDP lays its buckets out again."""
    shape = GPTConfig(vocab_size=59, block_size=16, n_layer=2, n_head=2, n_embd=32)  # tied embeddings
    torch.manual_seed(0)
    start = GPT(shape).state_dict()
    batches = torch.randint(0, 59, (4, 5, 16), generator=torch.Generator().manual_seed(rank))
    config = tiny_config(directory)

    def gradients(wrapped, batch):
        wrapped.zero_grad(set_to_none=True)
        wrapped(batch)[0].float().square().mean().backward()
        return {name: p.grad for name, p in wrapped.module.named_parameters()}

    def wrapped():
        model = GPT(shape)
        model.load_state_dict(start)
        return wrap(model, config, 3, torch.device("cpu"))

    trained = wrapped()
    for batch in batches[:3]:
        gradients(trained, batch)
    then, fresh = gradients(trained, batches[3]), gradients(wrapped(), batches[3])
    return [name for name in then if not torch.equal(then[name], fresh[name])]


def test_ddp_sums_a_resumed_runs_first_gradients_as_the_run_that_never_stopped_on_three_ranks(tmp_path):
    # a resume wraps the model anew; on 3 ranks DDP's sums depend on its bucket layout, which must not change
    spawn(bucket_layout_worker, str(tmp_path), free_port(), nprocs=3, timeout=120)
    assert [(tmp_path / f"rank{rank}").read_text() for rank in range(3)] == ["none"] * 3
