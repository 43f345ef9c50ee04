"""The one training loop: fine-tuning, recovery, gradual pruning, learned importances, DS.

Every stage that updates weights calls :func:`train`. What differs between them plugs in
from outside, so the loop never asks which algorithm or schedule is running:

* the *objective* of a step: a list of closures, each returning a loss for one backward
  pass (one for ordinary training; several for Dynamic Sparsification's sandwich rule,
  where gradients of every sampled sub-network accumulate before one update);
* :class:`Callback` s: learned importances (L0 gates, movement) add a regulariser and
  read gradients, distillation reshapes each pass's loss from its batch and outputs,
  pruning schedules tighten masks between steps, checkpoints, progress lines and MLflow
  logging watch the step counter (Lightning, Composer and Sheared-LLaMA keep pruning and
  distillation out of the trainer the same way).

Every update clips gradients and refuses a non-finite loss, whichever stage runs it.
Steps are counted from ``start``, so a resumed stage continues at the step it stopped.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from raysparse.errors import RaysparseError



@dataclass
class Forward:
    """What one pass computed, for callbacks that reshape its loss (distillation reads the batch
    and the student's outputs): a pass closure returns this or a bare loss tensor."""

    loss: torch.Tensor
    batch: Any = None
    outputs: dict | None = None
    key: str | None = None     # which mask the pass trained (per-language recovery), if any


Objective = Callable[[int], Sequence[Callable[[], "torch.Tensor | Forward"]]]


class Callback:
    """Hooks the loop calls; each does nothing unless overridden."""

    def param_groups(self) -> list[dict]:
        """Extra optimizer parameter groups (e.g. L0 log-alphas); read before the optimizer is built."""
        return []

    def on_start(self, step: int) -> None:
        """Before the first step (``step`` > 0 when a stage resumes)."""

    def on_step_start(self, step: int) -> None:
        """Before the forward passes of ``step`` (counting from 0)."""

    def after_loss(self, step: int, forward: Forward) -> torch.Tensor:
        """The loss of one pass as this callback reshapes it (distillation mixes in the teacher)."""
        return forward.loss

    def extra_loss(self, step: int) -> torch.Tensor | None:
        """A term added to the first backward pass of ``step`` (a regulariser)."""
        return None

    def after_backward(self, step: int) -> None:
        """After every backward pass of ``step``, before clipping and the update."""

    def on_step_end(self, step: int, loss: float) -> None:
        """After the update; ``step`` counts updates done (from 1)."""

    def on_end(self) -> None:
        """After the last step, also when training stops with an error."""


def linear_schedule(steps: int, warmup: int) -> Callable[[int], float]:
    """LR factor: 0 -> 1 over ``warmup`` steps, then linearly down to 0 at ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


def make_optimizer(model: nn.Module, learning_rate: float, weight_decay: float, steps: int, warmup: int,
                   extra_groups: Sequence[dict] = ()) -> tuple[Optimizer, LambdaLR]:
    """AdamW over the trainable parameters (no decay on biases and norms, i.e. tensors of one
    dimension) plus ``extra_groups``, and a linear warmup/decay schedule over ``steps``."""
    if not learning_rate > 0:
        raise RaysparseError(f"training.learning_rate: {learning_rate!r} (expected a positive number)")
    if weight_decay < 0:
        raise RaysparseError(f"training.weight_decay: {weight_decay!r} (expected a number >= 0)")
    if not isinstance(steps, int) or steps < 1:
        raise RaysparseError(f"training.steps: {steps!r} (expected a positive integer)")
    if not isinstance(warmup, int) or not 0 <= warmup <= steps:
        raise RaysparseError(f"training.warmup: {warmup!r} (expected an integer of steps in [0, {steps}])")
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() > 1 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              *extra_groups]
    # fused: one kernel over all tensors (a third of the per-tensor loop's time on CPU, less again on GPU)
    optimizer = AdamW([g for g in groups if g["params"]], lr=learning_rate, fused=_fusable(groups))
    return optimizer, LambdaLR(optimizer, linear_schedule(steps, warmup))


def _fusable(groups: Sequence[dict]) -> bool:
    """Fused AdamW takes floating-point tensors on one device of a kind it has kernels for."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) \
        and len({p.device for p in params}) == 1


def single(loss_of_step: Callable[[int], torch.Tensor]) -> Objective:
    """The objective of ordinary training: one loss, one backward pass per step."""
    return lambda step: [lambda: loss_of_step(step)]


def train(model: nn.Module, objective: Objective, optimizer: Optimizer, scheduler: LambdaLR | None, steps: int,
          start: int = 0, callbacks: Sequence[Callback] = (), max_grad_norm: float | None = 1.0,
          no_sync: Callable[[], contextlib.AbstractContextManager] | None = None) -> list[float]:
    """Run updates ``start`` .. ``steps - 1``; returns the mean loss of each.

    ``no_sync`` (DDP's) wraps every backward pass of a step but the last, so gradients
    of several passes are reduced across workers once.
    """
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    losses: list[float] = []
    model.train()
    for callback in callbacks:
        callback.on_start(start)
    try:
        for step in range(start, steps):
            for callback in callbacks:
                callback.on_step_start(step)
            optimizer.zero_grad(set_to_none=True)
            passes = objective(step)
            values = []
            for index, compute in enumerate(passes):
                last = index == len(passes) - 1
                with contextlib.nullcontext() if last or no_sync is None else no_sync():
                    result = compute()
                    forward = result if isinstance(result, Forward) else Forward(result)
                    for callback in callbacks:
                        forward.loss = callback.after_loss(step, forward)
                    loss = forward.loss
                    if not torch.isfinite(loss):
                        raise RaysparseError(f"training: the loss became {float(loss.detach())} at step {step + 1} "
                                             "(expected a finite number; lower the learning rate?)")
                    values.append(float(loss.detach()))
                    total = loss / len(passes)
                    if index == 0:
                        for callback in callbacks:
                            extra = callback.extra_loss(step)
                            if extra is not None:
                                total = total + extra
                    total.backward()
                for callback in callbacks:
                    callback.after_backward(step)
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm, foreach=True)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(sum(values) / len(values))
            for callback in callbacks:
                callback.on_step_end(step + 1, losses[-1])
    finally:
        for callback in callbacks:
            callback.on_end()
    return losses


class Progress(Callback):
    """Console lines with step counts, loss and ETA, every ``every`` steps (rank 0 only)."""

    def __init__(self, stage: str, total: int, enabled: bool = True, every: int = 10,
                 extra: Callable[[int], str] | None = None):
        self.stage, self.total, self.enabled, self.every, self.extra = stage, total, enabled, every, extra
        self.started, self.first = time.time(), 0

    def on_start(self, step: int) -> None:
        self.started, self.first = time.time(), step

    def on_step_end(self, step: int, loss: float) -> None:
        if not self.enabled or (step % self.every and step != self.total):
            return
        eta = (time.time() - self.started) / max(step - self.first, 1) * (self.total - step)
        extra = f"  {self.extra(step)}" if self.extra else ""
        print(f"[{self.stage}] step {step}/{self.total}  loss {loss:.4f}  eta {eta:.0f}s{extra}", flush=True)


class SeededSteps(Callback):
    """Seeds torch's generator at every step from (``seed``, step): dropout depends on the step
    index alone, so a stage resumed at step s draws what an uninterrupted one draws."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_step_start(self, step: int) -> None:
        torch.manual_seed(self.seed * 1_000_003 + step)


class WithoutDropout(Callback):
    """Sets every dropout module of ``model`` to p = 0 while the stage trains (restored at its end):
    dropout's random masks cost a fifth of a CPU step and do not shrink with the model."""

    def __init__(self, model: nn.Module):
        self.modules = [m for m in model.modules() if isinstance(m, nn.Dropout)]
        self.held: list[float] = []

    def on_start(self, step: int) -> None:
        self.held = [m.p for m in self.modules]
        for module in self.modules:
            module.p = 0.0

    def on_end(self) -> None:
        for module, p in zip(self.modules, self.held):
            module.p = p


class Every(Callback):
    """Calls ``action(step, loss)`` every ``every`` steps (and, with ``last``, after the final one)."""

    def __init__(self, every: int, action: Callable[[int, float], None], total: int | None = None):
        self.every, self.action, self.total = max(1, every), action, total

    def on_step_end(self, step: int, loss: float) -> None:
        if step % self.every == 0 or step == self.total:
            self.action(step, loss)


__all__ = ["Callback", "Every", "Forward", "Objective", "Progress", "SeededSteps", "WithoutDropout", "linear_schedule", "make_optimizer", "single", "train"]
