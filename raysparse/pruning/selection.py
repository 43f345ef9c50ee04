"""Turn unit scores into a Mask at a target encoder sparsity.

Heads and neurons are ranked separately (docs/METHOD.md: a joint score-per-parameter ranking
removes almost every head) and each type loses the target share of its units, or heads
``head_ratio`` times that share and neurons the rest of the target; the neuron count absorbs
the rounding of the head count, so the achieved encoder sparsity is the target to within half
a neuron's parameters.

:func:`select_to_latency` selects to a latency budget instead: heads and neurons ranked together
by importance per millisecond a latency table says they cost, the least valuable removed until
the table's prediction fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

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
    # heads lose head_ratio x the target share of their units, neurons make up the rest: 0.6 at 50%
    # encoder sparsity removes 30% of the heads and 60% of the neurons of a BERT-shaped encoder
    head_ratio: float = 1.0

    def __post_init__(self):
        expect(self.scope in ("global", "per-layer"), f"pruning.scope: expected 'global' or 'per-layer', got {self.scope!r}")
        expect(self.normalize in ("none", "l2"), f"pruning.normalize: expected 'none' or 'l2', got {self.normalize!r}")
        expect(isinstance(self.round_to, int) and self.round_to >= 1, f"pruning.round_to: expected an integer >= 1, got {self.round_to!r}")
        number = isinstance(self.head_ratio, (int, float)) and not isinstance(self.head_ratio, bool)
        expect(number and self.head_ratio >= 0, f"pruning.head_ratio: expected a number >= 0, got {self.head_ratio!r}")


def check_sparsity(sparsity: float, field: str = "pruning.sparsity") -> float:
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0.0 <= float(sparsity) < 1.0:
        raise RaysparseError(f"{field}: expected a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _normalize_rows(scores: torch.Tensor) -> torch.Tensor:
    """Per-layer L2 normalisation (Michel et al.): layers become comparable."""
    finite = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
    norms = finite.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return scores / norms


def removal_counts(sparsity: float, num_heads: int, num_neurons: int, per_head: int, per_neuron: int,
                   head_ratio: float = 1.0) -> tuple[int, int]:
    """Units of each type to remove so removed parameters are closest to the target: heads
    ``head_ratio`` times the target share of theirs, neurons the rest."""
    head_params, neuron_params = num_heads * per_head, num_neurons * per_neuron
    target = sparsity * (head_params + neuron_params)
    lowest = max(0.0, (target - neuron_params) / (sparsity * head_params)) if sparsity > 0 else 0.0
    if head_ratio * sparsity > 1 or head_ratio < lowest - 1e-9:
        highest = "" if sparsity == 0 else f" to {1 / sparsity:.2f}"
        raise RaysparseError(f"pruning.head_ratio: {head_ratio:g} at sparsity {sparsity:g} needs "
                             f"{min(head_ratio * sparsity, 9.99):.0%} of the heads and "
                             f"{max(0.0, target - head_ratio * sparsity * head_params) / neuron_params:.0%} of the "
                             f"neurons removed (expected a ratio from {lowest:.2f}{highest} at this sparsity)")
    heads = round(head_ratio * sparsity * num_heads)
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
    n_heads, n_neurons = removal_counts(sparsity, heads.numel(), neurons.numel(),
                                        params_per_head(hidden_size, head_dim), params_per_neuron(hidden_size),
                                        selection.head_ratio)
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


class LatencyModel(Protocol):
    """What selection needs of a latency table (``raysparse.efficiency.latency_table.LatencyTable``)."""

    def predict(self, mask: Mask) -> float:
        """Predicted latency in ms of the model ``mask`` keeps."""

    def unit_ms(self) -> tuple[float, float]:
        """Milliseconds one head and one FFN neuron cost on average."""


def _value_order(scores: UnitScores, table: LatencyModel, selection: Selection,
                 base: Mask | None) -> tuple[torch.Tensor, int, int]:
    """Heads then neurons, flattened, ordered from the least valuable per predicted ms to the most;
    with how many lead the order because ``base`` removed them, and how many end it protected."""
    heads, neurons = scores.heads.float(), scores.neurons.float()
    if base is not None:
        heads = heads.masked_fill(~base.effective_heads(), float("-inf"))
        neurons = neurons.masked_fill(~base.effective_neurons(), float("-inf"))
    if selection.normalize == "l2":
        # per layer as select_mask does; then / sqrt(units per layer): a layer whose units matter equally
        # gives each head 1/heads and each neuron 1/neurons of it, so the two types compare per ms
        heads = _normalize_rows(heads) / heads.shape[1] ** 0.5
        neurons = _normalize_rows(neurons) / neurons.shape[1] ** 0.5
    if selection.min_heads_per_layer:
        keep_at_least = min(selection.min_heads_per_layer, heads.shape[1])
        top = torch.argsort(heads, dim=1, descending=True, stable=True)[:, :keep_at_least]
        protected = torch.zeros_like(heads, dtype=torch.bool).scatter(1, top, True) & torch.isfinite(heads)
        heads = heads.masked_fill(protected, float("inf"))
    head_ms, neuron_ms = (max(float(ms), 1e-9) for ms in table.unit_ms())   # a unit that saves nothing goes last
    values = torch.cat([(heads / head_ms).flatten(), (neurons / neuron_ms).flatten()])
    values = values.masked_fill(values.isnan(), float("inf"))   # a unit without a score is not removed
    return torch.argsort(values, stable=True), int(torch.isneginf(values).sum()), int(torch.isposinf(values).sum())


def select_to_latency(scores: UnitScores, table: LatencyModel, target_ms: float, selection: Selection = Selection(),
                      base: Mask | None = None) -> Mask:
    """Keep the most valuable heads and neurons whose predicted latency fits ``target_ms``.

    A unit's value is its importance (normalised per layer as :func:`select_mask` does, then per
    unit type, see ``_value_order``) per millisecond it costs on average (``table.unit_ms()``);
    units are removed from the least valuable on, the fewest whose removal makes
    ``table.predict(mask) <= target_ms`` (the prediction only falls as units go, so a binary
    search finds it). ``base``'s removed units stay removed; ``min_heads_per_layer`` heads per
    layer are never removed. Global scope and exact counts only. Returns a Mask in original
    coordinates; a target the table cannot reach is one line naming ``pruning.latency_target``.
    """
    expect(isinstance(target_ms, (int, float)) and target_ms > 0 and target_ms != float("inf"),
           f"pruning.latency_target: expected a positive number of ms, got {target_ms!r}")
    expect(selection.scope == "global", "pruning.scope: a latency target ranks all heads and neurons together "
                                        "(expected 'global')")
    expect(selection.round_to == 1, f"pruning.round_to: a latency target keeps exact counts (expected 1, got "
                                    f"{selection.round_to})")
    expect(selection.head_ratio == 1, f"pruning.head_ratio: a latency target ranks heads and neurons together "
                                      f"(expected 1, got {selection.head_ratio:g})")
    layers, width = scores.heads.shape
    order, already, protected = _value_order(scores, table, selection, base)
    kept_layers = base.kept_layers.clone() if base is not None else torch.ones(layers, dtype=torch.bool)

    def mask_without(count: int) -> Mask:
        removed = torch.zeros(len(order), dtype=torch.bool)
        removed[order[:count]] = True
        return Mask(~removed[: layers * width].reshape(layers, width), ~removed[layers * width:].reshape(layers, -1),
                    kept_layers, None if base is None else base.kept_vocab)

    low, high = already, len(order) - protected
    least = table.predict(mask_without(high))
    if least > target_ms:
        raise RaysparseError(f"pruning.latency_target: {target_ms:.3f} ms is below what the latency table predicts "
                             f"with every removable head and neuron gone ({least:.3f} ms; expected a larger budget)")
    while low < high:   # the fewest removals that fit
        middle = (low + high) // 2
        if table.predict(mask_without(middle)) <= target_ms:
            high = middle
        else:
            low = middle + 1
    return mask_without(low)
