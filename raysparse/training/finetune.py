"""Plain single-process fine-tuning: AdamW with linear warmup and decay.

Three seams a distributed loop reuses as they are: ``make_optimizer`` (AdamW without
weight decay on biases and LayerNorm weights, plus the schedule), ``train_step`` (one
forward, backward, clip and update) and ``finetune`` (the loop, with progress lines
and an ``on_step`` callback for pruning schedules that act between steps).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from raysparse.errors import RaysparseError
from raysparse.training.batches import task_loss

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


def linear_schedule(steps: int, warmup: int) -> Callable[[int], float]:
    """LR factor: 0 -> 1 over ``warmup`` steps, then linearly down to 0 at ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


def make_optimizer(
    model: nn.Module, learning_rate: float, weight_decay: float, steps: int, warmup: int
) -> tuple[Optimizer, LambdaLR]:
    """AdamW over the trainable parameters (no decay on biases and norms) and a linear
    warmup/decay schedule over ``steps`` with ``warmup`` warmup steps."""
    if not learning_rate > 0:
        raise RaysparseError(f"training.learning_rate: {learning_rate!r} (expected a positive number)")
    if weight_decay < 0:
        raise RaysparseError(f"training.weight_decay: {weight_decay!r} (expected a number >= 0)")
    if not isinstance(steps, int) or steps < 1:
        raise RaysparseError(f"training.steps: {steps!r} (expected a positive integer)")
    if not isinstance(warmup, int) or not 0 <= warmup <= steps:
        raise RaysparseError(f"training.warmup: {warmup!r} (expected an integer of steps in [0, {steps}])")
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if name.endswith(NO_DECAY) else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = AdamW([g for g in groups if g["params"]], lr=learning_rate)
    return optimizer, LambdaLR(optimizer, linear_schedule(steps, warmup))


def train_step(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    optimizer: Optimizer,
    scheduler: LambdaLR | None = None,
    max_grad_norm: float | None = 1.0,
    loss_fn: Callable[[nn.Module, Mapping], torch.Tensor] = task_loss,
) -> float:
    """One update: loss, backward, gradient clipping, optimizer and schedule step; returns the loss."""
    model.train()
    loss = loss_fn(model, batch)
    if not torch.isfinite(loss):
        raise RaysparseError(
            f"training: the loss became {float(loss)} (expected a finite number; lower the learning rate?)"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return float(loss.detach())


def freeze_word_embeddings(model: nn.Module) -> int:
    """Stop training the word-embedding table; returns how many parameters were frozen.

    The table is most of a multilingual encoder (82% of e5-small), so freezing it makes
    every step much cheaper, and zero-shot transfer keeps the languages the English
    data never touches aligned with those it does.
    """
    from raysparse.structure.adapters import Encoder

    weight = Encoder(model).embeddings.word_embeddings.weight
    weight.requires_grad_(False)
    return weight.numel()


def cycle(loader: Iterable) -> Iterator:
    """Batches of ``loader`` epoch after epoch, telling a distributed sampler the epoch."""
    epoch = 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RaysparseError("training: the data loader yields no batches (expected at least one)")
        epoch += 1


def finetune(
    model: nn.Module,
    loader: Iterable,
    steps: int,
    learning_rate: float,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.1,
    seed: int = 0,
    log_every: int = 10,
    on_step: Callable[[int, float], bool | None] | None = None,
    max_grad_norm: float | None = 1.0,
    loss_fn: Callable[[nn.Module, Mapping], torch.Tensor] = task_loss,
) -> list[float]:
    """Train ``model`` for ``steps`` updates over ``loader`` (cycled); returns the loss per step.

    ``seed`` seeds dropout. ``on_step(step, loss)`` runs after every update (steps count
    from 1); returning True stops early. The model is left in eval mode.
    """
    if not 0 <= warmup_ratio < 1:
        raise RaysparseError(f"training.warmup_ratio: {warmup_ratio!r} (expected a number in [0, 1))")
    torch.manual_seed(seed)
    optimizer, scheduler = make_optimizer(model, learning_rate, weight_decay, steps, round(warmup_ratio * steps))
    batches = cycle(loader)
    losses: list[float] = []
    started = time.time()
    try:
        for step in range(1, steps + 1):
            losses.append(train_step(model, next(batches), optimizer, scheduler, max_grad_norm, loss_fn))
            if log_every and (step % log_every == 0 or step == steps):
                elapsed = time.time() - started
                recent = losses[-log_every:]
                print(f"  finetune step {step}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                      f"lr {scheduler.get_last_lr()[0]:.2e}  {elapsed:.0f}s  "
                      f"eta {elapsed / step * (steps - step):.0f}s", flush=True)
            if on_step is not None and on_step(step, losses[-1]):
                break
    finally:
        model.eval()
    return losses


__all__ = [
    "NO_DECAY", "cycle", "finetune", "freeze_word_embeddings", "linear_schedule", "make_optimizer", "train_step",
]
