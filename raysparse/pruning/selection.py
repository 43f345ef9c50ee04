"""Turn unit scores into a Mask at a target encoder sparsity.

Heads and neurons are ranked separately (docs/METHOD.md: a joint score-per-parameter ranking
removes almost every head) and each type loses the target share of its units; the
neuron count absorbs the rounding of the head count, so the achieved encoder sparsity
is the target to within half a neuron's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from raysparse.errors import RaysparseError, expect
from raysparse.pruning.scores import UnitScores
from raysparse.structure import Mask, params_per_head, params_per_neuron

Scope = Literal["global", "per-layer"]
Normalize = Literal["none", "l2"]


@dataclass(frozen=True)
class Selection:
    """How scores become a mask."""

    scope: Scope = "global"
    normalize: Normalize = "l2"
    round_to: int = 1          # kept heads/neurons per layer rounded to a multiple (1 = exact)
    min_heads_per_layer: int = 0

    def __post_init__(self):
        expect(self.scope in ("global", "per-layer"), f"pruning.scope: expected 'global' or 'per-layer', got {self.scope!r}")
        expect(self.normalize in ("none", "l2"), f"pruning.normalize: expected 'none' or 'l2', got {self.normalize!r}")
        expect(isinstance(self.round_to, int) and self.round_to >= 1, f"pruning.round_to: expected an integer >= 1, got {self.round_to!r}")


def check_sparsity(sparsity: float, field: str = "pruning.sparsity") -> float:
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0.0 <= float(sparsity) < 1.0:
        raise RaysparseError(f"{field}: expected a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _normalize_rows(scores: torch.Tensor) -> torch.Tensor:
    """Per-layer L2 normalisation (Michel et al.): layers become comparable."""
    finite = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
    norms = finite.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return scores / norms


def _remove_counts(sparsity: float, num_heads: int, num_neurons: int, per_head: int, per_neuron: int) -> tuple[int, int]:
    """Units of each type to remove so removed parameters are closest to the target."""
    target = sparsity * (num_heads * per_head + num_neurons * per_neuron)
    heads = round(sparsity * num_heads)
    neurons = round((target - heads * per_head) / per_neuron)
    return heads, min(max(neurons, 0), num_neurons)


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool tensor marking the ``count`` lowest scores (ties broken by position)."""
    flat = scores.flatten()
    order = torch.argsort(flat, stable=True)
    removed = torch.zeros_like(flat, dtype=torch.bool)
    removed[order[:count]] = True
    return removed.reshape(scores.shape)


def _per_layer_counts(scores: torch.Tensor, count: int) -> list[int]:
    """Spread ``count`` removals evenly over layers; leftover goes where the next unit scores lowest."""
    layers, width = scores.shape
    base, extra = divmod(count, layers)
    counts = [min(base, width)] * layers
    sorted_scores = torch.sort(scores, dim=1).values
    candidates = [(float(sorted_scores[i, counts[i]]) if counts[i] < width else float("inf"), i) for i in range(layers)]
    for _, i in sorted(candidates)[:extra]:
        counts[i] += 1
    return counts


def _round_kept(removed: torch.Tensor, scores: torch.Tensor, multiple: int) -> torch.Tensor:
    """Adjust each layer so its kept count is a multiple of ``multiple`` (nearest, ties up)."""
    if multiple == 1:
        return removed
    out = removed.clone()
    width = scores.shape[1]
    for i in range(scores.shape[0]):
        kept = int((~removed[i]).sum())
        target = min(width, multiple * int(kept / multiple + 0.5))
        order = torch.argsort(scores[i], descending=True, stable=True)
        row = torch.ones(width, dtype=torch.bool)
        row[order[:target]] = False
        out[i] = row
    return out


def select_mask(scores: UnitScores, sparsity: float, hidden_size: int, head_dim: int,
                selection: Selection = Selection(), base: Mask | None = None) -> Mask:
    """Keep the highest-scoring units so that encoder sparsity reaches ``sparsity``.

    ``base`` (iterative schedules) is a mask already applied: its removed units stay removed.
    """
    sparsity = check_sparsity(sparsity)
    heads, neurons = scores.heads.float(), scores.neurons.float()
    if base is not None:
        heads = heads.masked_fill(~base.effective_heads(), float("-inf"))
        neurons = neurons.masked_fill(~base.effective_neurons(), float("-inf"))
    if selection.normalize == "l2":
        heads, neurons = _normalize_rows(heads), _normalize_rows(neurons)
    n_heads, n_neurons = _remove_counts(sparsity, heads.numel(), neurons.numel(),
                                        params_per_head(hidden_size, head_dim), params_per_neuron(hidden_size))
    if base is not None:
        already_h, already_n = int((~base.effective_heads()).sum()), int((~base.effective_neurons()).sum())
        if already_h > n_heads or already_n > n_neurons:
            raise RaysparseError(f"pruning.sparsity: {sparsity} is below what the current mask already removes")
    if selection.scope == "global":
        removed_heads, removed_neurons = _lowest(heads, n_heads), _lowest(neurons, n_neurons)
    else:
        removed_heads = torch.zeros_like(heads, dtype=torch.bool)
        removed_neurons = torch.zeros_like(neurons, dtype=torch.bool)
        for removed, values, count in ((removed_heads, heads, n_heads), (removed_neurons, neurons, n_neurons)):
            for i, c in enumerate(_per_layer_counts(values, count)):
                removed[i] = _lowest(values[i : i + 1], c)[0]
    if selection.min_heads_per_layer:
        for i in range(heads.shape[0]):
            keep_at_least = min(selection.min_heads_per_layer, heads.shape[1])
            order = torch.argsort(heads[i], descending=True, stable=True)
            removed_heads[i, order[:keep_at_least]] = False
    removed_heads = _round_kept(removed_heads, heads, selection.round_to)
    removed_neurons = _round_kept(removed_neurons, neurons, selection.round_to)
    kept_layers = base.kept_layers.clone() if base is not None else torch.ones(heads.shape[0], dtype=torch.bool)
    return Mask(~removed_heads, ~removed_neurons, kept_layers, None if base is None else base.kept_vocab)
