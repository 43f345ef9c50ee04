"""Parameters, bytes and FLOPs of an encoder, and encoder sparsity as docs/METHOD.md defines it.

Prunable parameters are those a head or an FFN neuron owns: a head owns its Q, K and V
rows with biases and its columns of the attention output projection; a neuron owns one
row of W1 with its bias and one column of W2. Encoder sparsity = removed prunable
parameters / all prunable parameters of the original model (embeddings excluded).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from raysparse.structure.adapters import Encoder
from raysparse.structure.mask import Mask
from raysparse.structure.shrink import structure_of


def params_per_head(hidden_size: int, head_dim: int) -> int:
    return 3 * (hidden_size * head_dim + head_dim) + head_dim * hidden_size


def params_per_neuron(hidden_size: int) -> int:
    return 2 * hidden_size + 1


@dataclass(frozen=True)
class Size:
    """What a model costs; every result carries one so 'fast but not small' is visible."""

    total_params: int
    embedding_params: int
    encoder_params: int
    other_params: int
    prunable_params: int
    bytes: int
    flops_per_sequence: int
    sequence_length: int
    encoder_sparsity: float
    layers: int
    heads: int
    neurons: int

    def as_dict(self) -> dict:
        return asdict(self)


def count_params(module: nn.Module) -> int:
    """Distinct parameters (tied tensors counted once)."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def parameter_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def encoder_flops(heads_per_layer: list[int], neurons_per_layer: list[int], hidden_size: int, head_dim: int,
                  sequence_length: int) -> int:
    """Forward FLOPs of the encoder layers for one sequence (a multiply-add counts 2)."""
    t, h = sequence_length, hidden_size
    flops = 0
    for heads, neurons in zip(heads_per_layer, neurons_per_layer):
        width = heads * head_dim
        flops += 2 * t * h * width * 3        # Q, K, V
        flops += 2 * 2 * t * t * width        # scores and weighted sum
        flops += 2 * t * width * h            # attention output projection
        flops += 2 * 2 * t * h * neurons      # W1 and W2
    return flops


def encoder_sparsity_of(mask: Mask, hidden_size: int, head_dim: int) -> float:
    """Share of prunable parameters removed by ``mask`` (dropped layers remove all their units)."""
    per_head, per_neuron = params_per_head(hidden_size, head_dim), params_per_neuron(hidden_size)
    total = mask.kept_heads.numel() * per_head + mask.kept_neurons.numel() * per_neuron
    kept = int(mask.effective_heads().sum()) * per_head + int(mask.effective_neurons().sum()) * per_neuron
    return 1.0 - kept / total


def measure(model: nn.Module, sequence_length: int = 128) -> Size:
    """Size of a live (possibly shrunk) model."""
    enc = Encoder(model)
    heads, neurons = enc.heads_per_layer(), enc.neurons_per_layer()
    hidden, head_dim = enc.hidden_size, enc.head_dim
    total = count_params(model)
    embedding = count_params(enc.embeddings)
    encoder = count_params(enc.base.encoder)
    mask = structure_of(model).to_mask()
    return Size(
        total_params=total,
        embedding_params=embedding,
        encoder_params=encoder,
        other_params=total - embedding - encoder,
        prunable_params=sum(heads) * params_per_head(hidden, head_dim) + sum(neurons) * params_per_neuron(hidden),
        bytes=parameter_bytes(model),
        flops_per_sequence=encoder_flops(heads, neurons, hidden, head_dim, sequence_length),
        sequence_length=sequence_length,
        encoder_sparsity=encoder_sparsity_of(mask, hidden, head_dim),
        layers=len(heads),
        heads=sum(heads),
        neurons=sum(neurons),
    )
