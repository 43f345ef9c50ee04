"""The simple importance criteria: gradient (first-order Taylor), magnitude, activation (output norm), random."""

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
from raysparse.structure.tokens import token_mask


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


class ScoredOnBatches(Importance):
    """A criterion that reads scoring batches, optionally only the first ``max_batches``."""

    class Options(Options):
        max_batches: int | None = Field(None, ge=1)   # scoring batches to read (None: all given)
    needs_data = True

    def __init__(self, max_batches: int | None = None):
        self.max_batches = max_batches


@register
class GradientImportance(ScoredOnBatches):
    """Michel et al. (2019): mean |dL/dgate| over batches, a gate on every head and neuron."""

    name = "gradient"

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
class ActivationImportance(ScoredOnBatches):
    """What each unit adds to the residual stream on data: the root mean square, over the scoring
    batches' real tokens, of the vector a head writes (its context through its columns of the
    attention output) or an FFN neuron writes (its activation times its W2 column).

    One forward pass per batch, no gradients. Unlike magnitude it sees which units the data drives;
    unlike gradient it is not tied to the task's loss, so a multilingual encoder scored on a few
    languages' text does not learn to favour those languages' loss (in the spirit of Wanda and FLAP,
    whose structured variants weigh a unit's weights by its input activations).
    """

    name = "activation"

    def score(self, model, batches=None, loss_fn=None, mask=None) -> UnitScores:
        if batches is None or loss_fn is None:
            raise RaysparseError("pruning.algorithm: activation importance needs scoring data")
        enc = Encoder(model)
        outs, w2s = [enc.attention_output(layer) for layer in enc.layers], [enc.ffn_output(layer) for layer in enc.layers]
        with torch.no_grad():   # |W_h z|^2 = z^T (W_h^T W_h) z per head; |a w2_n|^2 = a^2 |w2_n|^2 per neuron
            per_head = [o.weight.float().reshape(o.out_features, -1, enc.head_dim) for o in outs]
            grams = [torch.einsum("dhi,dhj->hij", w, w) for w in per_head]
            column_norms = [w.weight.float().pow(2).sum(0) for w in w2s]
        head_sums = [torch.zeros(g.shape[0], device=g.device) for g in grams]
        neuron_sums = [torch.zeros_like(c) for c in column_norms]
        inputs: list[list[torch.Tensor]] = [[] for _ in range(2 * len(outs))]

        def recorder(slot: int):
            return lambda module, args: inputs[slot].append(args[0].detach())

        handles = [m.register_forward_pre_hook(recorder(i)) for i, m in enumerate([*outs, *w2s])]
        was_training, tokens, seen = model.training, 0, 0
        model.eval()
        try:
            with torch.no_grad():
                for batch in batches:
                    if self.max_batches is not None and seen >= self.max_batches:
                        break
                    loss_fn(model, batch)
                    real = token_mask(batch)
                    for slot, recorded in enumerate(inputs):
                        x = torch.cat([r.reshape(-1, r.shape[-1]) for r in recorded]).float()
                        if real is not None and real.numel() == len(x):
                            x = x[real.reshape(-1).to(x.device)]
                        if slot == 0:
                            tokens += len(x)
                        if slot < len(outs):
                            z = x.reshape(len(x), -1, enc.head_dim)
                            head_sums[slot] += (torch.einsum("nhi,hij->nhj", z, grams[slot]) * z).sum((0, 2))
                        else:
                            layer = slot - len(outs)
                            neuron_sums[layer] += x.pow(2).sum(0) * column_norms[layer]
                        recorded.clear()
                    seen += 1
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        if seen == 0:
            raise RaysparseError("pruning.data: activation importance received no batches")
        head_rows = [(h / tokens).sqrt() for h in head_sums]
        neuron_rows = [(n / tokens).sqrt() for n in neuron_sums]
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
