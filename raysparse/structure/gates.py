"""Gates on heads, FFN neurons and layers of a live model, applied with forward hooks.

transformers 5 ignores ``head_mask``, so masking happens here: a pre-hook scales each
head's slice of the context before the attention output projection, another scales
each FFN activation before the FFN output projection, and a layer hook blends a
layer's output with its input (gate 0 = the layer is skipped). The same hooks serve
fixed masks (gates of 0/1), gradient scoring (gates of 1 that require grad) and
learned gates (L0): the hook reads whatever tensors the ``UnitGates`` holds at call time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from raysparse.structure.adapters import Encoder
from raysparse.structure.mask import Mask

GateRows = torch.Tensor | Sequence[torch.Tensor] | None


class UnitGates:
    """Current gate values; row i belongs to layer i of the live model."""

    def __init__(self, heads: GateRows = None, neurons: GateRows = None, layers: torch.Tensor | None = None):
        self.heads = heads
        self.neurons = neurons
        self.layers = layers

    @classmethod
    def ones(cls, model: nn.Module, requires_grad: bool = True) -> "UnitGates":
        """Gates of 1 for every head and neuron, for first-order (Taylor) scoring."""
        enc = Encoder(model)
        heads = [torch.ones(n, requires_grad=requires_grad) for n in enc.heads_per_layer()]
        neurons = [torch.ones(n, requires_grad=requires_grad) for n in enc.neurons_per_layer()]
        return cls(heads, neurons)



class GateHandle:
    """Removes the hooks on ``remove()`` or at the end of a ``with`` block."""

    def __init__(self, handles: list, gates: UnitGates):
        self._handles = handles
        self.gates = gates

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "GateHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _head_hook(gates: UnitGates, index: int, head_dim: int):
    def hook(module, args):
        rows = gates.heads
        if rows is None:
            return None
        gate = rows[index]
        (context, *rest) = args
        shape = context.shape
        gated = context.reshape(*shape[:-1], -1, head_dim) * gate.to(context.dtype).unsqueeze(-1)
        return (gated.reshape(shape), *rest)

    return hook


def _neuron_hook(gates: UnitGates, index: int):
    def hook(module, args):
        rows = gates.neurons
        if rows is None:
            return None
        (activation, *rest) = args
        return (activation * rows[index].to(activation.dtype), *rest)

    return hook


def _layer_hook(gates: UnitGates, index: int):
    def hook(module, args, output):
        if gates.layers is None:
            return None
        gate = gates.layers[index]
        hidden_in = args[0]
        hidden_out = output[0] if isinstance(output, tuple) else output
        blended = hidden_in + gate.to(hidden_in.dtype) * (hidden_out - hidden_in)
        return (blended, *output[1:]) if isinstance(output, tuple) else blended

    return hook


def attach_gates(model: nn.Module, gates: UnitGates) -> GateHandle:
    """Hook ``gates`` into ``model``; returns a handle that removes them."""
    enc = Encoder(model)
    handles = []
    for i, layer in enumerate(enc.layers):
        handles.append(enc.attention_output(layer).register_forward_pre_hook(_head_hook(gates, i, enc.head_dim)))
        handles.append(enc.ffn_output(layer).register_forward_pre_hook(_neuron_hook(gates, i)))
        handles.append(layer.register_forward_hook(_layer_hook(gates, i)))
    return GateHandle(handles, gates)


def apply_mask(model: nn.Module, mask: Mask) -> GateHandle:
    """Mask a live model: pruned units contribute nothing to the forward pass.

    ``mask`` is in the coordinates of the original model; on an already shrunk model
    it is mapped onto the units that remain.
    """
    from raysparse.structure.shrink import mask_rows_for

    heads, neurons, layers = mask_rows_for(model, mask)
    return attach_gates(model, UnitGates(heads, neurons, layers))
