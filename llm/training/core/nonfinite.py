"""Steps not taken: where a loss or the gradient norm is not finite on some rank, the step's update is left
out on every rank, and training.nan_policy says whether the run counts it as skipped or stops."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from llm.training.core import distributed as D
from llm.training.core.optim import ready_for_skips


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient under training.nan_policy=stop."""


class StepChecks:
    """Whether each step is taken, and what follows one that is not.

    On the CPU the host reads each step's losses and gradient norm at once (``host_reads``): that costs
    nothing there. On a GPU the flag stays on the device: a fused optimizer skips its update there
    (found_inf, ``skips_on_device``), and the host reads the flag a step later (``check``), so the GPU never
    waits for the host. ``say``: how a skipped step is reported.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, nan_policy: str,
                 say: Callable[[str], None]):
        self.optimizer, self.nan_policy, self.say = optimizer, nan_policy, say
        self.host_reads = _read_now(device)
        self.skips_on_device = _skips_on_device(optimizer, device) and ready_for_skips(optimizer)
        self.skipped = 0  # steps dropped by nan_policy=skip
        self.overflows = 0  # steps a loss scaler (fp16) skipped: gradients that overflowed its scale
        # (step, taken, losses, a loss scaler's flags: whether it found an overflow) of steps to check
        self._unchecked: list[tuple[int, _HostCopy, list[Any], Any]] = []

    def taken(self, grad_norm: float | torch.Tensor, losses: list[Any]) -> bool | torch.Tensor:
        """Whether to take the step: the gradient norm and every rank's losses finite. A NaN loss may come with
        finite gradients (a mean over no items: every label ignored), whose step must not count it in the means.
        The norm is the same on every rank (gradients are all-reduced before it); the losses are each rank's, so
        with several ranks one more small all-reduce agrees on them. A bool where the host reads at once, else
        a flag left on the device until the next step reads it (``check``)."""
        if self.host_reads:
            return not D.any_rank([not (math.isfinite(grad_norm) and all(map(math.isfinite, losses)))])[0]
        # each loss as one number (a task may return a one-element tensor of any shape), in one precision
        losses = torch.stack([loss.reshape(()).float().to(grad_norm.device) for loss in losses])
        return D.every_rank(torch.isfinite(grad_norm) & torch.isfinite(losses).all())

    def update(self, taken: bool | torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
        """The optimizer's update, or none where a loss or the gradient norm is not finite (``taken`` is false).
        With a loss scaler too: its own check, which unscale_ made, passes gradients each finite whose norm
        overflows."""
        if self.skips_on_device:
            # a fused optimizer (what build_optimizer makes) skips its update on the device when found_inf
            # is 1, the way GradScaler drives it: no CPU-GPU sync, and the GPU never waits for the host
            self.optimizer.found_inf = (~taken).float()
            self.optimizer.step()
            del self.optimizer.found_inf
        elif bool(taken):  # on the CPU reading the flag costs nothing; any other optimizer pays a sync for it
            self.optimizer.step()
        if scaler is not None:
            scaler.update()  # lowers the scale after gradients that unscale_ found not finite

    def note(self, step: int, taken: bool | torch.Tensor, losses: list[Any], overflowed: Any) -> None:
        """Keep step ``step``'s flags for ``check``, unless the host knows it was taken."""
        if taken is not True:
            self._unchecked.append((step, _HostCopy(taken), losses, overflowed))

    def check(self) -> None:
        """Act on the steps since the last check not taken (a loss or the gradient norm not finite), as
        training.nan_policy says.

        Each step leaves its flags on their way to the host (``note``; on the CPU, where
        the host knows them at once, only a step not taken); the next step reads them
        after queuing its own forward and backward, so the GPU never waits for the
        host. Whatever logs, saves or finishes checks first: a run that stops leaves
        its last checkpoint as it was. Such a step's update was not applied
        (``update``), so reading it a step late changes no weights. Every rank checks
        at the same points and sees the same norms: the collectives match.
        """
        if not self._unchecked:
            return
        for step, taken, losses, overflowed in self._unchecked:
            if bool(taken.wait()):
                continue
            bad_loss = not all(math.isfinite(loss) for loss in losses)  # numbers, or one-element tensors
            if overflowed is not None:
                # with a loss scaler, finite losses whose gradients overflowed are the scaler's to skip; a norm
                # that overflows from finite gradients is not. Read for a step not taken only, as its losses are
                found = overflowed if isinstance(overflowed, bool) else any(bool(flag) for flag in overflowed)
                any_bad_loss, any_overflow = D.any_rank([bad_loss, found])
                if any_overflow and not any_bad_loss:
                    self.overflows += 1
                    continue
            self._not_taken(step, D.gather(bad_loss))
        self._unchecked.clear()

    def _not_taken(self, step: int, bad_loss: list[bool]) -> None:
        """Step ``step`` had a non-finite loss or gradient norm and was not taken: count it or stop, as
        training.nan_policy says. ``bad_loss``: by rank, whether its loss was not finite."""
        ranks = [r for r, bad in enumerate(bad_loss) if bad]
        what = f"non-finite loss at step {step} on rank(s) {ranks}" if ranks else \
            f"non-finite gradient norm at step {step}, every rank's loss finite"
        if self.nan_policy == "skip":
            self.skipped += 1
            self.say(f"warning: {what}: step skipped")
            return
        raise NonFiniteError(f"{what}: stopping (training.nan_policy=stop); the last checkpoint is left as it was")


def overflowed(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> list[torch.Tensor] | bool:
    """Whether the scaler's unscale_ found gradients that are not finite (an fp16 overflow, which lowers the
    scale): its flags, one a device, left there, to read only for a step not taken; True where this torch's
    GradScaler does not say."""
    found = getattr(scaler, "_found_inf_per_device", None)
    return True if found is None else list(found(optimizer).values())


def _read_now(device: torch.device) -> bool:
    """Whether the host reads each step's losses and gradient norm at once: on the CPU, where that costs
    nothing. On a GPU it would make the host wait for the step's work (see StepChecks.check)."""
    return device.type == "cpu"


def _skips_on_device(optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
    """Whether a step not to take is skipped by the optimizer on the device (found_inf) rather than by the
    host. Not on the CPU: there the host reads the flag at no cost, and found_inf costs the fused step a
    few operations more (about 30 us of a 1.1 ms step of a small MLP)."""
    return device.type != "cpu" and getattr(optimizer, "_step_supports_amp_scaling", False)


class _HostCopy:
    """A small tensor on its way to the host: copied without blocking the host, read once the copy is done."""

    def __init__(self, tensor: torch.Tensor | bool):
        cuda = isinstance(tensor, torch.Tensor) and tensor.device.type == "cuda"
        # into pinned memory, behind the work queued so far; a bool is on the host already
        self.value = tensor.to("cpu", non_blocking=cuda) if isinstance(tensor, torch.Tensor) else tensor
        self.done = torch.cuda.Event() if cuda else None
        if self.done is not None:
            self.done.record()

    def wait(self) -> torch.Tensor:
        if self.done is not None:
            self.done.synchronize()
        return self.value
