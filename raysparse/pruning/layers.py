"""Layer dropping (depth pruning), for the depth-vs-width comparison of the efficiency study.

Layer scores come from position (``by="position"``: the top layers go first, or the
bottom ones with ``drop_first="bottom"``) or from importance (``by="gradient"``: mean
|dL/dgate| of a gate that blends each layer's output with its input, the layer-level
analogue of Michel et al.'s head gates). A dropped layer removes all of its heads and
neurons, so whole layers can reach only a few sparsities: :meth:`final_mask` drops the
number of layers whose removed prunable parameters come nearest to the target and
reports that number and the sparsity it reaches (``metrics()``). To compare depth and
width at *equal* removed parameters, select the width mask at the depth mask's achieved
sparsity (``encoder_sparsity_of(depth_mask, ...)``).

``score`` also fills head and neuron scores with their layer's score, so a width
selection from them (normalize="none") empties the least important layers first.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from raysparse.errors import RaysparseError, expect
from raysparse.pruning.algorithms import mean_gate_gradients
from raysparse.pruning.registry import Importance, Options, exclude_removed, register
from raysparse.pruning.scores import UnitScores
from raysparse.pruning.selection import check_sparsity
from raysparse.structure import Encoder, Mask, UnitGates, encoder_sparsity_of, structure_of
from raysparse.structure.shrink import mask_rows_for

BY = ("position", "gradient")
DROP_FIRST = ("top", "bottom")


def select_layers(scores: UnitScores | torch.Tensor, drop: int, base: Mask | None = None,
                  shape: tuple[int, int, int] | None = None) -> Mask:
    """A mask that drops the ``drop`` lowest-scoring layers (ties: the higher layer first).

    ``scores`` is a UnitScores (its ``layers`` and shape are used) or a [layers] tensor with
    ``shape`` = (layers, heads, ffn). Layers ``base`` already dropped (or scoring -inf)
    count towards ``drop``; ``base``'s head and neuron choices are kept.
    """
    if isinstance(scores, UnitScores):
        expect(scores.layers is not None, "pruning.layers: these scores have no layer scores")
        layer_scores = scores.layers.float()
        shape = (scores.heads.shape[0], scores.heads.shape[1], scores.neurons.shape[1])
    else:
        expect(shape is not None, "pruning.layers: give the model shape (layers, heads, ffn) with a bare score tensor")
        layer_scores = scores.float()
    num_layers = shape[0]
    expect(isinstance(drop, int) and 0 <= drop <= num_layers,
           f"pruning.layers: expected a number of layers to drop in [0, {num_layers}], got {drop!r}")
    if base is not None:
        layer_scores = layer_scores.masked_fill(~base.kept_layers, float("-inf"))
    # ascending score; among equal scores the higher layer is dropped first
    order = sorted(range(num_layers), key=lambda i: (float(layer_scores[i]), -i))
    mask = base.intersect(Mask.full(*shape)) if base is not None else Mask.full(*shape)
    mask.kept_layers[order[:drop]] = False
    return mask


def nearest_depth_mask(scores: UnitScores, sparsity: float, hidden_size: int, head_dim: int,
                       base: Mask | None = None) -> tuple[Mask, int, float]:
    """(mask, layers dropped, achieved sparsity): the layer count whose sparsity is nearest the target.

    Ties go to fewer dropped layers; at least one layer is always kept.
    """
    sparsity = check_sparsity(sparsity)
    num_layers = scores.heads.shape[0]
    best = None
    for drop in range(num_layers):
        mask = select_layers(scores, drop, base)
        achieved = encoder_sparsity_of(mask, hidden_size, head_dim)
        if best is None or abs(achieved - sparsity) < abs(best[2] - sparsity) - 1e-12:
            best = (mask, drop, achieved)
    return best


@register
class LayerDropImportance(Importance):
    """Whole-layer scores, by position or by |dL/dgate| of layer gates; drops layers in ``final_mask``.

    Options: ``by`` ("position" | "gradient"), ``drop_first`` ("top" | "bottom", for position),
    ``max_batches`` (gradient scoring).
    """

    name = "layerdrop"

    class Options(Options):
        by: Literal["position", "gradient"] = "position"   # what decides which layers go
        drop_first: Literal["top", "bottom"] = "top"        # by position: the end that goes first
        max_batches: int | None = Field(None, ge=1)         # by gradient: scoring batches to read

    def __init__(self, by: str = "position", drop_first: str = "top", max_batches: int | None = None):
        expect(by in BY, f"pruning.options.by: expected one of {', '.join(BY)}, got {by!r}")
        expect(drop_first in DROP_FIRST, f"pruning.options.drop_first: expected 'top' or 'bottom', got {drop_first!r}")
        self.by, self.drop_first, self.max_batches = by, drop_first, max_batches
        self.needs_data = by == "gradient"
        self.last_scores: UnitScores | None = None
        self.layers_dropped: int | None = None
        self.achieved_sparsity: float | None = None

    # --- layer scores ----------------------------------------------------------------------------
    def _position_scores(self, model: nn.Module) -> torch.Tensor:
        num_layers = structure_of(model).shape[0]
        index = torch.arange(num_layers, dtype=torch.float)
        return (num_layers - index) if self.drop_first == "top" else (index + 1)

    def _gradient_scores(self, model: nn.Module, batches, loss_fn, mask: Mask | None) -> torch.Tensor:
        if batches is None or loss_fn is None:
            raise RaysparseError("pruning.algorithm: layerdrop by gradient needs scoring data and a loss")
        enc = Encoder(model)
        device = next(model.parameters()).device
        if mask is not None:
            heads, neurons, layers = mask_rows_for(model, mask)
            gates = UnitGates([h.to(device) for h in heads], [n.to(device) for n in neurons],
                              layers.to(device).requires_grad_())
        else:
            gates = UnitGates(layers=torch.ones(len(enc.layers), device=device, requires_grad=True))
        (mean,) = mean_gate_gradients(model, gates, [gates.layers], batches, loss_fn, self.max_batches,
                                      "layerdrop by gradient")
        structure = structure_of(model)
        out = torch.full((structure.shape[0],), float("-inf"))
        out[structure.layers] = mean.detach().float().cpu()
        return out

    def score(self, model, batches=None, loss_fn=None, mask=None) -> UnitScores:
        structure = structure_of(model)
        num_layers, num_heads, ffn = structure.shape
        if self.by == "position":
            layers = self._position_scores(model)
        else:
            layers = self._gradient_scores(model, batches, loss_fn, mask)
        present = structure.to_mask()
        layers = layers.masked_fill(~present.kept_layers, float("-inf"))
        heads = layers[:, None].expand(num_layers, num_heads).masked_fill(~present.effective_heads(), float("-inf"))
        neurons = layers[:, None].expand(num_layers, ffn).masked_fill(~present.effective_neurons(), float("-inf"))
        scores = exclude_removed(UnitScores(heads, neurons, layers), mask)
        self.last_scores = scores
        return scores

    # --- the method's own mask -----------------------------------------------------------------------
    def final_mask(self, model: nn.Module, sparsity: float) -> Mask:
        """Drop the number of layers whose removed parameters are nearest ``sparsity`` (see ``metrics``).

        Uses the scores of the last :meth:`score` call; by position they need no data.
        """
        if self.last_scores is None:
            if self.by != "position":
                raise RaysparseError("pruning.algorithm: layerdrop by gradient needs score(model, batches, loss) "
                                     "before final_mask")
            self.score(model)
        enc = Encoder(model)
        structure = structure_of(model)
        base = None if structure.is_full else structure.to_mask()
        mask, self.layers_dropped, self.achieved_sparsity = nearest_depth_mask(
            self.last_scores, sparsity, enc.hidden_size, enc.head_dim, base)
        return mask

    def metrics(self) -> dict[str, float]:
        if self.layers_dropped is None:
            return {}
        return {"layers_dropped": float(self.layers_dropped), "achieved_sparsity": float(self.achieved_sparsity)}
