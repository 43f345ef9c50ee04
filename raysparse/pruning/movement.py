"""Movement pruning (Sanh et al. 2020), aggregated per head and per FFN neuron.

A weight's movement score is S = -sum_t W_t * dL/dW_t over fine-tuning steps: weights
moving away from zero score high. A unit's score is the sum over the weights it owns
(a head: its Q, K, V rows with biases and its columns of the attention output
projection; a neuron: its W1 row with bias and its W2 column).

Trained: :meth:`after_backward` adds the current step's -(W * grad) after every
``loss.backward()`` (gradients are read before the optimizer step, so the loop must zero
them every step; with gradient accumulation, call it once per optimizer step). Scores
accumulate in the original model's coordinates, so shrinking during training is fine.
One-shot: never trained, :meth:`score` accumulates the same first-order quantity over
the given batches and loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field
from torch import nn

from raysparse.errors import RaysparseError
from raysparse.pruning.algorithms import unit_sums
from raysparse.pruning.registry import Importance, Options, exclude_removed, register
from raysparse.pruning.scores import UnitScores
from raysparse.structure import Encoder, structure_of


def _owned_parameters(enc: Encoder, layer: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(parameters heads own, parameters neurons own) of one layer."""
    attention = enc.attention(layer)
    heads = [p for proj in (attention.query, attention.key, attention.value) for p in (proj.weight, proj.bias)
             if p is not None]
    heads.append(enc.attention_output(layer).weight)
    w1 = enc.ffn_input(layer)
    neurons = [p for p in (w1.weight, w1.bias) if p is not None] + [enc.ffn_output(layer).weight]
    return heads, neurons


def unit_movement(model: nn.Module, grad_of: Callable[[nn.Parameter], torch.Tensor | None]
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """-(W * grad) summed per head and per neuron, per current layer (missing gradients count 0)."""
    def movement(p: nn.Parameter) -> torch.Tensor | None:
        g = grad_of(p)
        return None if g is None else -(p * g)

    return unit_sums(model, movement, biases=True)


@register
class MovementImportance(Importance):
    """Accumulated movement -W * dL/dW per unit; one-shot over batches when never trained.

    Options: ``max_batches`` limits one-shot scoring.
    """

    name = "movement"

    class Options(Options):
        max_batches: int | None = Field(None, ge=1)   # one-shot scoring batches to read (None: all given)
    needs_data = True
    learns_during_training = True

    def __init__(self, max_batches: int | None = None):
        self.max_batches = max_batches
        self.heads: torch.Tensor | None = None      # [layers x heads], original coordinates
        self.neurons: torch.Tensor | None = None    # [layers x ffn]
        self.steps = 0

    def _reset(self, model: nn.Module) -> None:
        num_layers, num_heads, ffn = structure_of(model).shape
        self.heads = torch.zeros(num_layers, num_heads)
        self.neurons = torch.zeros(num_layers, ffn)
        self.steps = 0

    def _add(self, model: nn.Module, head_rows: list[torch.Tensor], neuron_rows: list[torch.Tensor]) -> None:
        structure = structure_of(model)
        for pos, layer in enumerate(structure.layers):
            self.heads[layer, structure.heads[pos]] += head_rows[pos].cpu()
            self.neurons[layer, structure.neurons[pos]] += neuron_rows[pos].cpu()

    def _scores(self, model: nn.Module) -> UnitScores:
        """Accumulated sums; units the live model no longer holds score -inf."""
        present = structure_of(model).to_mask()
        return UnitScores(self.heads.masked_fill(~present.effective_heads(), float("-inf")),
                          self.neurons.masked_fill(~present.effective_neurons(), float("-inf")))

    # --- callbacks -----------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        if self.heads is None:   # keep sums restored from a checkpoint
            self._reset(model)

    def after_backward(self, model: nn.Module, step: int) -> None:
        if self.heads is None:
            self._reset(model)
        self._add(model, *unit_movement(model, lambda p: p.grad))
        self.steps += 1

    def metrics(self) -> dict[str, float]:
        return {"movement_steps": float(self.steps)}

    # --- scores ---------------------------------------------------------------------------------------
    def score(self, model, batches=None, loss_fn=None, mask=None) -> UnitScores:
        if self.steps > 0:
            return exclude_removed(self._scores(model), mask)
        if batches is None or loss_fn is None:
            raise RaysparseError("pruning.algorithm: movement was not trained; one-shot movement needs scoring "
                                 "data and a loss")
        return exclude_removed(self._one_shot(model, batches, loss_fn), mask)

    def _one_shot(self, model: nn.Module, batches, loss_fn) -> UnitScores:
        enc = Encoder(model)
        owned = [p for layer in enc.layers for group in _owned_parameters(enc, layer) for p in group]
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        for p in owned:
            p.requires_grad_(True)
        was_training = model.training
        model.eval()
        num_layers, num_heads, ffn = structure_of(model).shape
        heads, neurons = torch.zeros(num_layers, num_heads), torch.zeros(num_layers, ffn)
        saved = (self.heads, self.neurons)
        self.heads, self.neurons = heads, neurons
        seen = 0
        try:
            for batch in batches:
                if self.max_batches is not None and seen >= self.max_batches:
                    break
                grads = torch.autograd.grad(loss_fn(model, batch), owned, allow_unused=True)
                by_param = {id(p): g for p, g in zip(owned, grads)}
                self._add(model, *unit_movement(model, lambda p: by_param.get(id(p))))
                seen += 1
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
            model.train(was_training)
            self.heads, self.neurons = saved
        if seen == 0:
            raise RaysparseError("pruning.data: movement importance received no batches")
        present = structure_of(model).to_mask()
        return UnitScores(heads.masked_fill(~present.effective_heads(), float("-inf")),
                          neurons.masked_fill(~present.effective_neurons(), float("-inf")))

    # --- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.heads is None:
            return {}
        return {"heads": self.heads.clone(), "neurons": self.neurons.clone(), "steps": torch.tensor(self.steps)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            self.heads, self.neurons, self.steps = state["heads"].clone(), state["neurons"].clone(), int(state["steps"])
