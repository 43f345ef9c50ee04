"""When to score and select: one-shot, iterative, and the cubic ramp of gradual pruning."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from raysparse.errors import expect
from raysparse.pruning.registry import Importance, LossFn
from raysparse.pruning.scores import UnitScores
from raysparse.pruning.selection import Selection, check_sparsity, select_mask
from raysparse.structure import Encoder, Mask, structure_of


@dataclass
class PruneStep:
    """One scoring-and-selection round of a schedule."""

    sparsity: float
    scores: UnitScores
    mask: Mask


def iterative_targets(sparsity: float, steps: int) -> list[float]:
    """Equal increments of encoder sparsity, ending exactly at the target."""
    check_sparsity(sparsity)
    expect(isinstance(steps, int) and steps >= 1, f"pruning.steps: expected an integer >= 1, got {steps!r}")
    return [sparsity * (i + 1) / steps for i in range(steps)]


def cubic_sparsity(step: int, total_steps: int, target: float, start: float = 0.0, begin_step: int = 0,
                   end_step: int | None = None) -> float:
    """Zhu & Gupta (2017) cubic ramp: fast early, flat near the target (gradual pruning)."""
    end_step = total_steps if end_step is None else end_step
    if step <= begin_step:
        return start
    if step >= end_step:
        return target
    progress = (step - begin_step) / max(1, end_step - begin_step)
    return target + (start - target) * (1.0 - progress) ** 3


def prune_schedule(model: nn.Module, importance: Importance, sparsity: float, *, steps: int = 1,
                   batches_for: Callable[[int], Iterable] | None = None, loss_fn: LossFn | None = None,
                   selection: Selection = Selection(), base: Mask | None = None,
                   between: Callable[[Mask, int], None] | None = None) -> list[PruneStep]:
    """Score and select ``steps`` times (1 = one-shot), masking in between.

    ``batches_for(round)`` gives fresh scoring batches per round; ``between(mask, round)``
    runs after every round but the last (e.g. recovery fine-tuning under the mask, with
    the mask applied by the caller). The model itself is not modified.
    """
    enc = Encoder(model)
    mask = base if base is not None else structure_of(model).to_mask()
    history = []
    for round_index, target in enumerate(iterative_targets(sparsity, steps)):
        batches = batches_for(round_index) if batches_for is not None else None
        scores = importance.score(model, batches, loss_fn, mask)
        mask = select_mask(scores, target, enc.hidden_size, enc.head_dim, selection, base=mask)
        history.append(PruneStep(target, scores, mask))
        if between is not None and round_index < steps - 1:
            between(mask, round_index)
    return history
