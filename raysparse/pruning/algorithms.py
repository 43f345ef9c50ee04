"""The simple importance criteria: gradient (first-order Taylor), magnitude, random."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field
from torch import nn

from raysparse.errors import RaysparseError
from raysparse.pruning.registry import Importance, Options, exclude_removed, register
from raysparse.pruning.scores import UnitScores
from raysparse.structure import Encoder, UnitGates, attach_gates, structure_of
from raysparse.structure.shrink import mask_rows_for


def _to_original(model: nn.Module, head_rows: list[torch.Tensor], neuron_rows: list[torch.Tensor]) -> UnitScores:
    """Scatter per-current-layer rows into full-size [layers x units] tensors (absent = -inf)."""
    structure = structure_of(model)
    num_layers, num_heads, ffn = structure.shape
    heads = torch.full((num_layers, num_heads), float("-inf"))
    neurons = torch.full((num_layers, ffn), float("-inf"))
    for pos, layer in enumerate(structure.layers):
        heads[layer, structure.heads[pos]] = head_rows[pos].detach().float().cpu()
        neurons[layer, structure.neurons[pos]] = neuron_rows[pos].detach().float().cpu()
    return UnitScores(heads, neurons)


def unit_sums(model: nn.Module, value: Callable[[nn.Parameter], torch.Tensor | None], biases: bool = True
              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per current layer, ``value(p)`` summed over the weights each head and each FFN neuron owns.

    A head owns its Q/K/V rows (and biases) and its columns of the attention output; a neuron
    its W1 row (and bias) and its W2 column. ``value`` returning None counts as 0.
    """
    def owned(p, units: int, columns: bool = False):
        v = None if p is None or not units else value(p)
        if v is None:
            return 0
        v = v.float()
        return v.reshape(v.shape[0], units, -1).sum((0, 2)) if columns else v.reshape(units, -1).sum(1)

    enc = Encoder(model)
    head_rows, neuron_rows = [], []
    with torch.no_grad():
        for layer in enc.layers:
            attention, out = enc.attention(layer), enc.attention_output(layer)
            w1, w2 = enc.ffn_input(layer), enc.ffn_output(layer)
            heads, neurons = out.in_features // enc.head_dim, w2.in_features
            h = torch.zeros(heads, device=out.weight.device) + owned(out.weight, heads, columns=True)
            for proj in (attention.query, attention.key, attention.value):
                h = h + owned(proj.weight, heads) + (owned(proj.bias, heads) if biases else 0)
            n = (torch.zeros(neurons, device=w2.weight.device) + owned(w2.weight, neurons, columns=True)
                 + owned(w1.weight, neurons) + (owned(w1.bias, neurons) if biases else 0))
            head_rows.append(h)
            neuron_rows.append(n)
    return head_rows, neuron_rows


def mean_gate_gradients(model: nn.Module, gates: UnitGates, targets: list[torch.Tensor], batches, loss_fn,
                        max_batches: int | None, what: str) -> list[torch.Tensor]:
    """Mean |dL/dgate| of each tensor in ``targets`` over ``batches`` (first-order Taylor scores).

    Weights are frozen and dropout is off while scoring; both are restored afterwards.
    """
    sums = [torch.zeros_like(t) for t in targets]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with attach_gates(model, gates):
            for batch in batches:
                if max_batches is not None and seen >= max_batches:
                    break
                grads = torch.autograd.grad(loss_fn(model, batch), targets, allow_unused=True)
                for total, grad in zip(sums, grads):
                    if grad is not None:
                        total += grad.abs()
                seen += 1
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    if seen == 0:
        raise RaysparseError(f"pruning.data: {what} received no batches")
    return [total / seen for total in sums]


@register
class GradientImportance(Importance):
    """Michel et al. (2019): mean |dL/dgate| over batches, a gate on every head and neuron."""

    name = "gradient"

    class Options(Options):
        max_batches: int | None = Field(None, ge=1)   # scoring batches to read (None: all given)
    needs_data = True

    def __init__(self, max_batches: int | None = None):
        self.max_batches = max_batches

    def score(self, model, batches=None, loss_fn=None, mask=None) -> UnitScores:
        if batches is None or loss_fn is None:
            raise RaysparseError("pruning.algorithm: gradient importance needs scoring data and a loss")
        enc = Encoder(model)
        if mask is not None:
            head_rows, neuron_rows, layer_rows = mask_rows_for(model, mask)
        else:
            head_rows = [torch.ones(n) for n in enc.heads_per_layer()]
            neuron_rows = [torch.ones(n) for n in enc.neurons_per_layer()]
            layer_rows = None
        device = next(model.parameters()).device
        gates = UnitGates([r.to(device).requires_grad_() for r in head_rows],
                          [r.to(device).requires_grad_() for r in neuron_rows],
                          None if layer_rows is None else layer_rows.to(device))
        means = mean_gate_gradients(model, gates, [*gates.heads, *gates.neurons], batches, loss_fn,
                                    self.max_batches, "gradient importance")
        head_sum, neuron_sum = means[: len(gates.heads)], means[len(gates.heads):]
        scores = _to_original(model, head_sum, neuron_sum)
        return exclude_removed(scores, mask)


@register
class MagnitudeImportance(Importance):
    """L2 norm of the weights a unit owns (Q/K/V rows and output columns; W1 row and W2 column)."""

    name = "magnitude"

    def score(self, model, batches=None, loss_fn=None, mask=None) -> UnitScores:
        head_rows, neuron_rows = unit_sums(model, lambda p: p.float().pow(2), biases=False)
        head_rows, neuron_rows = [r.sqrt() for r in head_rows], [r.sqrt() for r in neuron_rows]
        return exclude_removed(_to_original(model, head_rows, neuron_rows), mask)


@register
class RandomImportance(Importance):
    """Uniform random scores: the floor any method must beat (compare several seeds)."""

    name = "random"

    class Options(Options):
        seed: int = 0                               # default: the run's seed

    def __init__(self, seed: int = 0):
        self.seed = seed

    def score(self, model, batches=None, loss_fn=None, mask=None) -> UnitScores:
        num_layers, num_heads, ffn = structure_of(model).shape
        generator = torch.Generator().manual_seed(self.seed)
        scores = UnitScores(torch.rand(num_layers, num_heads, generator=generator),
                            torch.rand(num_layers, ffn, generator=generator),
                            torch.rand(num_layers, generator=generator))
        structure_mask = structure_of(model).to_mask()
        return exclude_removed(scores, structure_mask if mask is None else mask.intersect(structure_mask))
