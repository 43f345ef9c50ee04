"""Fine-tuning a model over a data loader: a convenience over :func:`raysparse.training.loop.train`.

Runs use the loop directly with step-addressed batches (exact resume); this entry point
serves notebooks and tests that hold a ``DataLoader``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from raysparse.errors import RaysparseError
from raysparse.training.batches import task_loss
from raysparse.training.loop import Every, Progress, make_optimizer, single, train


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


class _Stop(Exception):
    """``on_step`` asked to end training early."""


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

    def record(step: int, loss: float) -> None:
        losses.append(loss)
        if on_step is not None and on_step(step, loss):
            raise _Stop

    try:
        train(model, single(lambda step: loss_fn(model, next(batches))), optimizer, scheduler, steps,
              callbacks=[Every(1, record), Progress("finetune", steps, bool(log_every), log_every or 1)],
              max_grad_norm=max_grad_norm)
    except _Stop:
        pass
    finally:
        model.eval()
    return losses


__all__ = ["cycle", "finetune", "freeze_word_embeddings", "make_optimizer"]
