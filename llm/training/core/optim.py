"""The optimizers and learning-rate schedules that built-in tasks share."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from llm.errors import UsageError
from llm.training.core.config import OptimizerConfig


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW, Adam, SGD or Muon; weight decay on matrices only (not on biases, norms or gains)."""
    if cfg.name == "muon":
        return MuonWithAdamW(model, cfg)
    return _optimizer([p for p in model.parameters() if p.requires_grad], cfg.name, cfg)


def _optimizer(params: list[nn.Parameter], name: str, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    # fused kernels, for CUDA and CPU parameters (elsewhere torch picks foreach itself): one kernel per step,
    # and on a GPU their found_inf lets the engine skip a non-finite step on the device, without a sync
    fused = {"fused": True} if params and params[0].device.type in ("cuda", "cpu") else {}
    if any(p.is_complex() for p in params):  # torch's fused kernels take real numbers only
        fused = {}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **fused)
    if name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **fused)
    if params and _is_dtensor(params[0]):  # FSDP2's shards: torch has no sharded fused SGD kernel
        fused = {}
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.beta1, **fused)


def ready_for_skips(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a fused ``optimizer``'s steps may be skipped on the device by found_inf, as the engine skips a
    non-finite step on a GPU; made so where it can be.

    Fused SGD makes its momentum buffers (empty_like) at its first step, also one
    that found_inf skips, and reads that memory as momentum at the next. So they
    are made now, and after loading a state that lacks some or all of them, as
    zeros: with no dampening, the first step's 0·momentum + grad is exactly the
    copy of the gradient torch's own first step makes. With dampening it is not:
    such an SGD's steps are skipped by the host.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return True
    if any(group["momentum"] and group["dampening"] for group in optimizer.param_groups):
        return False
    zero_missing_momentum(optimizer)
    optimizer.register_load_state_dict_post_hook(zero_missing_momentum)
    return True


def zero_missing_momentum(sgd: torch.optim.SGD) -> None:
    """Zeros as the momentum buffers ``sgd`` lacks, where its groups have momentum (see ready_for_skips)."""
    for group in sgd.param_groups:
        for p in group["params"] if group["momentum"] else ():
            if sgd.state[p].get("momentum_buffer") is None:
                sgd.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (FSDP2's shard), without importing torch.distributed.tensor, which takes half a
    second: a DTensor exists only once it has been imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on the hidden matrices, AdamW on the rest, stepped and scheduled as one optimizer.

    Hidden matrices are the 2-D weights inside ``model.blocks`` (or, for a model
    without blocks, every 2-D weight but the first and the last). Embeddings,
    the output head and vectors go to AdamW: Muon is meant for hidden layers
    only. Muon's update is scaled to AdamW's RMS, so one learning rate serves both.
    """

    def __init__(self, model: nn.Module, cfg: OptimizerConfig):
        hidden = _hidden_matrices(model)
        if not hidden:
            raise UsageError(f"optimizer muon: {type(model).__name__} has no hidden matrices for Muon (its first and "
                             f"last layers go to AdamW): add layers, or choose --optimizer-name adamw")
        hidden_ids = {id(p) for p in hidden}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in hidden_ids]
        if not rest:  # torch's AdamW refuses an empty parameter list, in words that name no setting
            raise UsageError(f"optimizer muon: every trainable parameter of {type(model).__name__} is a hidden matrix "
                             f"(in its .blocks), which leaves none for the AdamW that Muon pairs with (embeddings, "
                             f"the output head, biases and norms): choose --optimizer-name adamw")
        self.muon = torch.optim.Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.95,
                                     adjust_lr_fn="match_rms_adamw")
        self.adamw = _optimizer(rest, "adamw", cfg)
        super().__init__(hidden + rest, {"lr": cfg.lr})
        self._share_state_and_groups(self.muon.param_groups + self.adamw.param_groups)

    def _share_state_and_groups(self, groups: list[dict[str, Any]]) -> None:
        """Make ``groups`` (Muon's first) this optimizer's and the inner ones', and this one's state theirs.

        Their parameters are disjoint, so one state dict holds both: torch's own
        state_dict/load_state_dict then cover both in the standard form that
        torch.distributed.checkpoint needs, and a scheduler's "lr" here is theirs.
        """
        self.param_groups = groups
        self.muon.state = self.adamw.state = self.state
        muon_groups = len(self.muon.param_groups)  # a load rebuilds the groups, never changes how many
        self.muon.param_groups, self.adamw.param_groups = groups[:muon_groups], groups[muon_groups:]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:  # torch's optimizer contract: re-evaluate the loss first, with gradients on
            with torch.enable_grad():
                loss = closure()
        if all(_is_dtensor(p) for group in self.muon.param_groups for p in group["params"]):
            self._sharded_muon_step()
        else:
            self.muon.step()
        self.adamw.step()
        return loss

    @torch.no_grad()
    def _sharded_muon_step(self, deal: bool = True) -> None:
        """torch's Muon step on FSDP2's shards, each matrix orthogonalised once, by one rank.

        Muon's momentum and weight updates are elementwise, and are made on each
        rank's shard; its orthogonalisation needs the whole matrix. torch's Muon
        runs it on the sharded DTensor, where each of its matrix products and
        norms is a collective of its own (a dozen or more a matrix). Here the
        matrices are dealt out among the ranks that shard them, by their cost:
        each matrix's owner gathers its momentum-updated gradient, orthogonalises
        it whole with the operations of torch's Muon, and scatters the rows back,
        so that each rank does its share of the work rather than all of it.
        ``deal=False`` (and a layout other than rows sharded over one mesh
        dimension) has every rank gather every matrix and orthogonalise it. The
        momentum buffers stay sharded, under the same name, so checkpoints are as
        before.
        """
        work = []
        for group in self.muon.param_groups:
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
                buf.lerp_(p.grad, 1 - momentum)
                work.append((p, group, p.grad.lerp(buf, momentum) if group["nesterov"] else buf))
        rows = [_row_shard_dim(p) for p, _, _ in work]
        if deal and work and all(d is not None and d == rows[0] and p.device_mesh == work[0][0].device_mesh
                                 for d, (p, _, _) in zip(rows, work)):
            mine = _dealt_orthogonalised([(u, g["ns_coefficients"], g["ns_steps"], g["eps"]) for _, g, u in work],
                                         work[0][0].device_mesh.get_group(rows[0]))
        else:
            mine = [_my_rows(p, orthogonalised(u.full_tensor(), g["ns_coefficients"], g["ns_steps"], g["eps"]))
                    for p, g, u in work]
        for (p, group, _), update in zip(work, mine):
            lr = group["lr"]
            lr = lr.squeeze() if isinstance(lr, torch.Tensor) else lr  # torch's Muon takes a 1-element tensor too
            p.mul_(1 - lr * group["weight_decay"])
            p.to_local().add_(update, alpha=-(lr * _muon_lr_ratio(group["adjust_lr_fn"], p.shape)))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # the load replaced self.state and rebuilt the group dicts: the inner optimizers must follow
        self._share_state_and_groups(self.param_groups)


def _row_shard_dim(p: torch.Tensor) -> int | None:
    """The mesh dimension a DTensor's rows are sharded over, if that is its only sharding (FSDP2's, HSDP's)."""
    from torch.distributed.tensor import Replicate, Shard

    shards = [d for d, placement in enumerate(p.placements) if placement == Shard(0)]
    others = all(isinstance(placement, Replicate) for d, placement in enumerate(p.placements) if d not in shards)
    return shards[0] if len(shards) == 1 and others else None


def _my_rows(p: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``whole``, laid out as the DTensor ``p`` is: Replicate to Shard is a local slice."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = p.device_mesh
    return DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim).redistribute(mesh, p.placements).to_local()


def _dealt_orthogonalised(updates: list[tuple[torch.Tensor, tuple[float, float, float], int, float]],
                          group: dist.ProcessGroup) -> list[torch.Tensor]:
    """Each rank's rows of each orthogonalised update (DTensors with rows sharded over ``group``), with each
    matrix orthogonalised by one rank of the group: dealt out by cost, largest first, each to the rank with the
    least so far. All gathers go out first, then all scatters, so that the transfers overlap each other."""
    ranks, me = dist.get_world_size(group), dist.get_rank(group)
    load, owner = [0.0] * ranks, {}
    cost = [u.shape[0] * u.shape[1] * min(u.shape[0], u.shape[1]) for u, *_ in updates]
    for i in sorted(range(len(updates)), key=lambda i: -cost[i]):  # the same on every rank: shapes are global
        owner[i] = min(range(ranks), key=lambda r: load[r])
        load[owner[i]] += cost[i]
    chunks = [-(-u.shape[0] // ranks) for u, *_ in updates]  # rows per rank, as torch.chunk deals them
    gathered, pending = {}, []
    for i, (u, *_) in enumerate(updates):
        local = u.to_local().bfloat16()  # what the orthogonalisation takes first: half the bytes to gather
        padded = local.new_zeros((chunks[i], *local.shape[1:]))
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(ranks)] if owner[i] == me else None
        gathered[i] = parts
        pending.append(dist.gather(padded, parts, dst=dist.get_global_rank(group, owner[i]), group=group,
                                   async_op=True))
    for work in pending:
        work.wait()
    results, pending = [], []
    for i, (u, coefficients, steps, eps) in enumerate(updates):
        rows = u.to_local().shape[0]
        out = torch.empty((chunks[i], *u.shape[1:]), dtype=torch.bfloat16, device=u.to_local().device)
        parts = None
        if owner[i] == me:
            whole = orthogonalised(torch.cat(gathered.pop(i))[:u.shape[0]], coefficients, steps, eps)
            parts = _padded_chunks(whole, chunks[i], ranks)
        pending.append(dist.scatter(out, parts, src=dist.get_global_rank(group, owner[i]), group=group,
                                    async_op=True))
        results.append((out, rows))
    for work in pending:
        work.wait()
    return [out[:rows] for out, rows in results]


def _padded_chunks(whole: torch.Tensor, chunk: int, ranks: int) -> list[torch.Tensor]:
    """``whole``'s rows in ``ranks`` parts of ``chunk`` rows each, the last ones padded with zeros."""
    padded = whole.new_zeros((chunk * ranks, *whole.shape[1:]))
    padded[:whole.shape[0]] = whole
    return list(padded.split(chunk))


def orthogonalised(m: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                   eps: float) -> torch.Tensor:
    """Muon's Newton-Schulz orthogonalisation of the matrix ``m``, in bfloat16, with the same operations in the
    same order as torch.optim.Muon's: a sharded step (MuonWithAdamW) gives what an unsharded one would."""
    a, b, c = coefficients
    x = m.bfloat16()
    tall = m.size(0) > m.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _muon_lr_ratio(adjust: str | None, shape: torch.Size) -> float:
    """What torch's Muon multiplies the learning rate by for a matrix of ``shape`` (global, not a shard's)."""
    rows, cols = shape[:2]
    if adjust is None or adjust == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust == "match_rms_adamw":  # the update's RMS matched to AdamW's: one learning rate serves both
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def _hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    blocks = getattr(model, "blocks", None)
    if blocks is not None:  # real ones: torch's Muon takes no complex matrix, which AdamW then steps
        return [p for p in blocks.parameters() if p.requires_grad and p.ndim == 2 and not p.is_complex()]
    return [p for p in model.parameters() if p.requires_grad and p.ndim == 2 and not p.is_complex()][1:-1]


def lr_factor(step: int, cfg: OptimizerConfig, total_steps: int) -> float:
    """Multiplier of cfg.lr at optimizer step ``step``: linear warmup, then the decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.scheduler == "constant":
        return 1.0
    after_warmup = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / after_warmup)
    floor = cfg.min_lr / cfg.lr
    if cfg.scheduler == "wsd":  # lr, then down to min_lr over the last decay_fraction of the steps, each below lr
        decay = math.ceil(cfg.decay_fraction * after_warmup - 1e-9)  # 0.1 of 30 steps: 3, not 4
        progress = max(0.0, min(1.0, (step - (total_steps - decay - 1)) / (decay + 1)))
        if cfg.decay_shape == "1-sqrt":
            return floor + (1.0 - floor) * (1.0 - math.sqrt(progress))
    if cfg.scheduler == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * (1.0 - progress)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))


def warmup_outlasting(cfg: OptimizerConfig, total_steps: int) -> str:
    """What to warn of when cfg's warmup outlasts the run's ``total_steps`` ("" when it does not): a warning,
    not a refusal, since the run may be given more steps later."""
    if not 0 < total_steps <= cfg.warmup_steps:
        return ""
    return (f"optimizer.warmup_steps {cfg.warmup_steps} outlasts the run's {total_steps} optimizer steps: the "
            f"learning rate never reaches optimizer.lr {cfg.lr:g} (it ends at "
            f"{cfg.lr * lr_factor(total_steps - 1, cfg, total_steps):.3g})")


class WeightAverage:
    """An exponential moving average of a model's parameters, taken after each optimizer step.

    The average of step t is ``avg += (1 - d) * (param - avg)`` with ``d = min(decay, (1 + t) / (10 + t))``:
    early on, when the weights move fast, it follows them closely. It lives beside the
    parameters, on their device and in their layout (each rank its own shard under FSDP),
    in float32 where they are. ``swapped_in`` puts it in the model's place for a while
    (validation); ``state`` names it as the model's state dict does, tied weights under
    each of their names.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names: dict[str, int] = {}  # every name of a parameter, to its place in the lists below
        places: dict[int, int] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.names[name] = places.setdefault(id(p), len(places))
        unique = {id(p): p for p in model.parameters()}
        self._params = [unique[i] for i in places]
        self.average = [p.detach().clone() for p in self._params]
        self._model = model

    def _live(self) -> list[torch.Tensor]:
        return [_local(p.detach()) for p in self._params]

    def _kept(self) -> list[torch.Tensor]:
        return [_local(a) for a in self.average]

    @torch.no_grad()
    def update(self, step: int, taken: bool | torch.Tensor) -> None:
        """Move the average toward the weights after optimizer step ``step`` (counted from 1), unless it was
        skipped: ``taken`` is false, or a flag on the device (no sync: a skipped step moves it by nothing)."""
        weight = 1.0 - min(self.decay, (1 + step) / (10 + step))
        kept = self._kept()
        if isinstance(taken, torch.Tensor):  # a weight of 0 where the step was skipped, read on the device:
            # one 0-dim tensor per tensor (the list form); given once, as a scalar, lerp would read it on the host
            torch._foreach_lerp_(kept, self._live(), [taken.to(torch.float32) * weight] * len(kept))
        elif taken:
            torch._foreach_lerp_(kept, self._live(), weight)

    @torch.no_grad()
    def restart(self) -> None:
        """Start the average again from the weights as they are."""
        torch._foreach_copy_(self._kept(), self._live())

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The average in the parameters' place while the block runs; the weights back after it."""
        live = self._live()
        with torch.no_grad():
            held = [t.clone() for t in live]
            torch._foreach_copy_(live, self._kept())
        try:
            yield
        finally:
            if any(hasattr(p, "to_local") for p in self._params):  # FSDP2: its root keeps the whole average
                from llm.training.core import parallel  # gathered after a forward with no backward: let it go
                # (imported here: the tools that read an optimizer's module need none of parallel's imports)

                parallel.reshard(self._model)
            with torch.no_grad():
                torch._foreach_copy_(live, held)

    def state(self) -> dict[str, torch.Tensor]:
        """The average by parameter name, every name of a tied one included (a checkpoint's ``ema``)."""
        return {name: self.average[i] for name, i in self.names.items()}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Take a saved average (of whole tensors; under FSDP, loaded into ``state()`` in place instead)."""
        missing = sorted(self.names.keys() - state.keys())
        if missing:
            raise UsageError(f"the saved weight average lacks {', '.join(missing[:3])}: it is of another model")
        for name, i in self.names.items():
            self.average[i].copy_(state[name])


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (an FSDP2 parameter), sharing its storage; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t
