"""How the model is laid out for training, and how its state is saved and restored.

Per-block features (activation checkpointing, regional compile, FSDP2 sharding
over all ranks or, for hsdp, within each node) apply to models that expose
their repeated layers as ``model.blocks``, as the GPT does; other models are
compiled and sharded whole.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from llm.errors import UsageError
from llm.training.core import distributed as D
from llm.training.core.checkpoint import SHARDED, CheckpointError, copied_to_cpu, error_cause, load_weights_strictly
from llm.training.core.config import Config



def blocks(model: nn.Module) -> list[nn.Module]:
    return list(getattr(model, "blocks", []))


def prepare(model: nn.Module, config: Config, world_size: int) -> nn.Module:
    """Activation checkpointing, compile and FSDP2 sharding, in place; call before building the optimizer."""
    t = config.training
    if t.activation_checkpointing:
        if not blocks(model):
            raise UsageError("training.activation_checkpointing needs a model with a .blocks list of layers (as the GPT has)")
        for block in blocks(model):
            # checkpoint() is hidden from the compiler: what it calls must be compiled already. An instance
            # attribute: the state dict keys stay those of the plain model
            if t.compile:
                compile_in_place(block, t.compile_mode)
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    elif t.compile:
        # regional: block by block (they share code, so it compiles once) compiles much faster than the
        # whole model; a model without blocks is compiled whole
        for part in blocks(model) or [model]:
            compile_in_place(part, t.compile_mode)
    if is_sharded(config, world_size):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # the model's device, not the machine's: torch's default mesh is a GPU's wherever there is one
        device = next(model.parameters(), torch.empty(0)).device
        if config.distributed.strategy == "hsdp":
            mesh = D.node_mesh(world_size, device.type)
        else:  # all ranks, one dimension
            mesh = init_device_mesh(device.type, (world_size,))
        for block in blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


COMPILE_MODES = {"default": None, "max-autotune": "max-autotune-no-cudagraphs"}
"""torch.compile's mode for each training.compile_mode. CUDA graphs (torch's "max-autotune" and
"reduce-overhead") stay off: they replay a step's kernels on fixed buffers, which the per-block
compile, activation checkpointing and FSDP's collectives have not been checked under."""


def compile_in_place(module: nn.Module, mode: str = "default") -> None:
    """torch.compile ``module``'s forward in ``mode`` (a training.compile_mode), keeping the module, its type
    and its parameter names.

    Not ``module.compile()``: the compiler skips a call that starts in torch's own code, so that
    leaves a module whose forward is torch's (nn.Sequential, nn.TransformerEncoderLayer, the
    losses) running eagerly.
    """
    module.forward = torch.compile(module.forward, mode=COMPILE_MODES[mode])


def wrap(model: nn.Module, config: Config, world_size: int, device: torch.device) -> nn.Module:
    """The module the training step calls: DDP over the model when several processes train without FSDP."""
    if world_size > 1 and not is_sharded(config, world_size):
        return _settled(_DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                             find_unused_parameters=config.distributed.find_unused_parameters))
    if world_size > 1 and (buffers := D.persistent_buffers(model)):
        # FSDP leaves each rank's buffers its own; as under DDP, each training forward starts from rank 0's, so
        # that the ranks train one model, the one that validation scores and a checkpoint saves (the engine
        # gives them rank 0's buffers too) and that a resume continues bit for bit
        def from_rank_0(module: nn.Module, args: Any) -> None:
            if module.training and torch.is_grad_enabled():
                D.broadcast_buffers(buffers)

        model.register_forward_pre_hook(from_rank_0)
    return model


def _settled(ddp: DDP) -> DDP:
    """``ddp`` with its gradient buckets laid out before the first step, the same way in a run and its resume.

    DDP all-reduces gradients in buckets: laid out at first in the reverse of the parameters' order, then, from
    its second step on, in the order in which the first backward made them ready. On three or more ranks the
    rounding of an element's sum depends on where it lies in its bucket (a ring all-reduce adds the ranks'
    values in an order set by the element's chunk), so a resumed run, whose first step ran on the first
    layout again, left the bit-for-bit path (two ranks add a + b either way). A backward of zero through every
    parameter, made as DDP's own forward prepares one, settles the layout on the reverse of the parameters'
    order, about the order a backward makes them ready in, so communication still overlaps it. It costs one
    all-reduce of zeros. Not for a model with sparse gradients, which DDP expects sparse.
    """
    params = [p for p in ddp.module.parameters() if p.requires_grad]
    if not params or any(getattr(m, "sparse", False) for m in ddp.module.modules()):
        return ddp
    zero = sum((p.reshape(-1)[:1] * 0).sum() for p in params)
    ddp.reducer.prepare_for_backward([zero])
    zero.backward()
    for p in params:
        p.grad = None
    return ddp


class WrapperHasNoAttribute(UsageError, AttributeError):
    """An attribute of the model asked of the DDP wrapper: a UsageError, said in one line, and an AttributeError,
    so that ``hasattr(model, name)`` and ``getattr(model, name, default)`` still answer."""


class _DDP(DDP):
    """DDP whose errors for parameters the loss does not depend on, and for a method of the model called on the
    wrapper, say so in one line, not in terms of a wrapper the engine builds."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # a public attribute of the model (its own loss or encoder method), not one torch probes for
            model = self.__dict__["_modules"].get("module")
            if name.startswith("_") or model is None or not hasattr(model, name):
                raise
            raise WrapperHasNoAttribute(
                f"train_step used model.{name}, which {type(model).__name__} has and the DistributedDataParallel "
                f"wrapper that train_step gets under several processes has not: call model(...), whose forward "
                f"syncs the gradients, and reach {name} from the model's forward"
            ) from None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().forward(*args, **kwargs)
        except RuntimeError as e:
            found = re.search(r"Parameter indices which did not receive grad for rank \d+: ([\d ]+)", str(e))
            if found is None:
                raise
            names = [name for name, p in self.module.named_parameters() if p.requires_grad]
            unused = [names[int(i)] for i in found[1].split() if int(i) < len(names)]
            raise UsageError(
                f"the loss of the last step did not depend on {len(unused)} parameter(s) of the model "
                f"({', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''}), whose gradients DDP waits for: "
                f"pass --distributed-find-unused-parameters true, or freeze them with requires_grad_(False)"
            ) from None


NO_CONTEXT = contextlib.nullcontext()
"""A context that does nothing; one instance, entered again and again (a new one each micro-step costs time)."""


def gradient_sync(model: nn.Module, raw_model: nn.Module) -> Callable[[bool], contextlib.AbstractContextManager]:
    """``sync(enabled)`` for this layout: skip the gradient all-reduce (DDP) or reduce-scatter
    (FSDP2) on all but the last micro-step; a no-op on one process."""
    if isinstance(model, DDP):
        return lambda enabled: NO_CONTEXT if enabled else model.no_sync()
    if hasattr(raw_model, "set_requires_gradient_sync"):  # an FSDP2 module

        def fsdp_sync(enabled: bool) -> contextlib.AbstractContextManager:
            raw_model.set_requires_gradient_sync(enabled)
            return NO_CONTEXT

        return fsdp_sync
    return lambda enabled: NO_CONTEXT


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (as FSDP2's gradient norm is) gathered into a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def reshard(model: nn.Module) -> None:
    """Let go of the whole parameters FSDP2 gathered for a forward that no backward follows: its root module
    keeps them for the backward it expects, and the next training forward would take them as they were."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(config: Config, world_size: int) -> bool:
    return config.distributed.strategy in ("fsdp", "hsdp") and world_size > 1


def model_and_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool, average: dict[str, torch.Tensor] | None = None,
    copy: bool = False, group: dist.ProcessGroup | None = None,
) -> tuple[dict[str, Any], Callable[[Path], None] | None]:
    """Entries for the checkpoint's shared state, and for FSDP a writer of the shards (run on every rank); the
    weight ``average`` (WeightAverage.state) goes with the weights, under ``ema``. With ``copy``, the tensors are
    copies in host memory (for a save in the background, while training changes the live ones); the shards are
    written over ``group`` if given (the default group otherwise)."""
    if not sharded:
        whole = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        whole = whole if average is None else {**whole, "ema": average}
        return copied_to_cpu(whole) if copy else whole, None
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from llm.training.core import sharded  # torch.distributed.checkpoint takes a second to import: only for FSDP

    fresh = not optimizer.state
    model_state, optim_state = get_state_dict(model, optimizer)
    if fresh:  # no step taken yet: torch made the state with a step of rate 0 (AdamW's count at 1), undone here
        optimizer.state.clear()
        optim_state["state"] = {}
    state = {"model": model_state, "optimizer": optim_state, **({} if average is None else {"ema": average})}
    state = copied_to_cpu(state) if copy else state
    marker = {} if average is None else {"ema": SHARDED}  # the shared state says where the average is
    return marker, lambda staging: sharded.save(state, staging / SHARDED, group)


def load_model_and_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, shared: dict, path: Path, fsdp: bool,
    average: Any = None,
) -> bool:
    """Restore weights, and the optimizer unless it is None, from a checkpoint, whichever way it was written;
    and the weight ``average`` (a WeightAverage), if given and saved. Whether one was."""
    saved_average = shared.get("ema") is not None
    if "model" in shared:
        if fsdp:
            raise CheckpointError(f"cannot resume {path} sharded (distributed.strategy fsdp, hsdp): it holds whole "
                                  f"tensors, saved without sharding; resume it with --distributed-strategy ddp")
        load_weights_strictly(model, shared["model"], f"cannot load {path}: its weights")
        if optimizer is not None:
            optimizer.load_state_dict(shared["optimizer"])
        if average is not None and saved_average:
            average.load(shared["ema"])
        return saved_average
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                         set_state_dict)

    from llm.training.core import sharded  # torch.distributed.checkpoint takes a second to import: only for FSDP

    # torch.distributed.checkpoint reshards on load, so the loading layout may differ from the saving one
    model_state, optim_state = get_state_dict(model, optimizer) if optimizer is not None else (model.state_dict(), None)
    state = {"model": model_state} if optimizer is None else {"model": model_state, "optimizer": optim_state}
    if average is not None and saved_average:
        state["ema"] = average.state()  # its tensors, filled in place
    try:  # torch made state for every parameter; the checkpoint's is for those stepped
        sharded.load_into(state, path / SHARDED, optional=None if optimizer is None else "optimizer.state")
    except Exception as e:  # noqa: BLE001 - shapes that differ, or metadata that is not checkpoint metadata
        raise CheckpointError(f"cannot load the sharded state in {path}: {error_cause(e)}") from None
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        # not strict: parameters no step has reached yet have no moments in the checkpoint, as in the optimizer
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(strict=False))
    return saved_average
