"""Physical removal (and reordering) of heads, FFN neurons, layers and vocabulary rows.

A shrunk model is a plain transformers model whose linear layers were sliced. Its
``Structure`` records, in the original model's coordinates, which units it still holds
and in which order, so masks made for the original model keep applying to it and it
can be rebuilt from a full-size config when loaded.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from raysparse.errors import RaysparseError
from raysparse.structure.adapters import Encoder
from raysparse.structure.mask import Mask


@dataclass
class Structure:
    """Units a live model holds: original indices, in current order, per current layer."""

    shape: tuple[int, int, int]  # (layers, heads, ffn) of the original model
    layers: list[int]
    heads: list[list[int]]
    neurons: list[list[int]]
    vocab: list[int] | None = None  # original row of each embedding row; None = untouched

    @classmethod
    def full(cls, num_layers: int, num_heads: int, ffn_size: int) -> "Structure":
        return cls(
            (num_layers, num_heads, ffn_size),
            list(range(num_layers)),
            [list(range(num_heads)) for _ in range(num_layers)],
            [list(range(ffn_size)) for _ in range(num_layers)],
        )

    def to_mask(self) -> Mask:
        num_layers, num_heads, ffn = self.shape
        mask = Mask(torch.zeros(num_layers, num_heads, dtype=torch.bool),
                    torch.zeros(num_layers, ffn, dtype=torch.bool),
                    torch.zeros(num_layers, dtype=torch.bool),
                    None if self.vocab is None else torch.tensor(self.vocab))
        for layer, heads, neurons in zip(self.layers, self.heads, self.neurons):
            mask.kept_layers[layer] = True
            mask.kept_heads[layer, heads] = True
            mask.kept_neurons[layer, neurons] = True
        return mask

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "layers": self.layers, "heads": self.heads,
                "neurons": self.neurons, "vocab": self.vocab}

    @classmethod
    def from_dict(cls, data: dict) -> "Structure":
        try:
            structure = cls(tuple(int(x) for x in data["shape"]), [int(x) for x in data["layers"]],
                            [[int(x) for x in row] for row in data["heads"]],
                            [[int(x) for x in row] for row in data["neurons"]],
                            None if data.get("vocab") is None else [int(x) for x in data["vocab"]])
        except (KeyError, TypeError, ValueError) as exc:
            raise RaysparseError(f"structure: malformed description ({type(exc).__name__}: {exc}); expected keys "
                                 "shape, layers, heads, neurons") from None
        num_layers, num_heads, ffn = structure.shape
        if not (len(structure.heads) == len(structure.neurons) == len(structure.layers)
                and all(0 <= x < num_layers for x in structure.layers)
                and all(0 <= h < num_heads for row in structure.heads for h in row)
                and all(0 <= n < ffn for row in structure.neurons for n in row)):
            raise RaysparseError(f"structure: indices out of range for shape {structure.shape}")
        return structure

    @property
    def is_full(self) -> bool:
        return self == Structure.full(*self.shape) and self.vocab is None


def structure_of(model: nn.Module) -> Structure:
    """The model's current structure (full, unless it was shrunk or permuted)."""
    enc = Encoder(model)
    recorded = getattr(enc.base, "raysparse_structure", None)
    if recorded is not None:
        return recorded
    c = enc.config
    return Structure.full(c.num_hidden_layers, c.num_attention_heads, c.intermediate_size)


def source_config(model: nn.Module):
    """The config of the original (unshrunk) model."""
    enc = Encoder(model)
    return getattr(enc.base, "raysparse_source_config", None) or enc.config


def mask_rows_for(model: nn.Module, mask: Mask) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Express ``mask`` (original coordinates) as gate rows for the model's current layers."""
    structure = structure_of(model)
    mask.check_fits(*structure.shape)
    heads = [mask.kept_heads[l, idx].float() for l, idx in zip(structure.layers, structure.heads)]
    neurons = [mask.kept_neurons[l, idx].float() for l, idx in zip(structure.layers, structure.neurons)]
    layers = mask.kept_layers[structure.layers].float()
    return heads, neurons, layers


class EmptySelfAttention(nn.Module):
    """Self-attention of a layer whose heads were all removed: it contributes nothing.

    Q/K/V stay as zero-row linears so parameter names and accounting stay uniform.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self.query = nn.Linear(hidden_size, 0)
            self.key = nn.Linear(hidden_size, 0)
            self.value = nn.Linear(hidden_size, 0)
        self.num_attention_heads = 0
        self.all_head_size = 0

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


def _select_rows(linear: nn.Linear, index: torch.Tensor) -> None:
    """Keep output features ``index`` (in that order)."""
    linear.weight = nn.Parameter(linear.weight.detach().index_select(0, index).clone(),
                                 requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach().index_select(0, index).clone(),
                                   requires_grad=linear.bias.requires_grad)
    linear.out_features = len(index)


def _select_columns(linear: nn.Linear, index: torch.Tensor) -> None:
    """Keep input features ``index`` (in that order)."""
    linear.weight = nn.Parameter(linear.weight.detach().index_select(1, index).clone(),
                                 requires_grad=linear.weight.requires_grad)
    linear.in_features = len(index)


def _head_rows(positions: list[int], head_dim: int) -> torch.Tensor:
    if not positions:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(p * head_dim, (p + 1) * head_dim) for p in positions])


def select_units(model: nn.Module, layer_positions: list[int], head_positions: list[list[int]],
                 neuron_positions: list[list[int]], vocab_positions: list[int] | None = None) -> nn.Module:
    """Keep (and order) units by their positions in the model's *current* layout.

    ``head_positions[k]`` and ``neuron_positions[k]`` belong to current layer
    ``layer_positions[k]``. This is the one place that slices weights.
    """
    enc = Encoder(model)
    before = structure_of(model)
    if not hasattr(enc.base, "raysparse_source_config"):
        enc.base.raysparse_source_config = copy.deepcopy(enc.config)
    head_dim = enc.head_dim
    layers = enc.layers
    kept_layers = []
    for pos, heads, neurons in zip(layer_positions, head_positions, neuron_positions):
        layer = layers[pos]
        attention = enc.attention(layer)
        if heads != list(range(len(before.heads[pos]))):
            rows = _head_rows(heads, head_dim)
            if len(heads) == 0:
                parent_path, _, name = enc.layout.attention.rpartition(".")
                layer.get_submodule(parent_path).register_module(name, EmptySelfAttention(enc.hidden_size))
            else:
                for proj in (attention.query, attention.key, attention.value):
                    _select_rows(proj, rows)
                attention.num_attention_heads = len(heads)
                attention.all_head_size = len(heads) * head_dim
            _select_columns(enc.attention_output(layer), rows)
        if neurons != list(range(len(before.neurons[pos]))):
            index = torch.tensor(neurons, dtype=torch.long)
            _select_rows(enc.ffn_input(layer), index)
            _select_columns(enc.ffn_output(layer), index)
        kept_layers.append(layer)
    enc.base.encoder.layer = nn.ModuleList(kept_layers)
    enc.config.num_hidden_layers = len(kept_layers)

    vocab = before.vocab
    if vocab_positions is not None:
        _select_vocab(model, enc, torch.tensor(vocab_positions, dtype=torch.long))
        current_vocab = vocab if vocab is not None else list(range(source_config(model).vocab_size))
        vocab = [current_vocab[p] for p in vocab_positions]

    enc.base.raysparse_structure = Structure(
        before.shape,
        [before.layers[p] for p in layer_positions],
        [[before.heads[p][h] for h in heads] for p, heads in zip(layer_positions, head_positions)],
        [[before.neurons[p][n] for n in neurons] for p, neurons in zip(layer_positions, neuron_positions)],
        vocab,
    )
    return model


def _select_vocab(model: nn.Module, enc: Encoder, index: torch.Tensor) -> None:
    """Keep embedding rows ``index``; an output head tied to the embeddings follows."""
    old = enc.base.get_input_embeddings()
    new = nn.Embedding(len(index), old.embedding_dim, padding_idx=None)
    new.weight = nn.Parameter(old.weight.detach().index_select(0, index).clone())
    enc.base.set_input_embeddings(new)
    enc.config.vocab_size = len(index)
    pad = enc.config.pad_token_id
    if pad is not None:
        hits = (index == pad).nonzero().flatten()
        enc.config.pad_token_id = int(hits[0]) if len(hits) else None
        new.padding_idx = enc.config.pad_token_id


def shrink(model: nn.Module, mask: Mask) -> nn.Module:
    """Physically remove the units ``mask`` drops (mask in original coordinates). In place."""
    structure = structure_of(model)
    mask.check_fits(*structure.shape)
    layer_positions = [p for p, l in enumerate(structure.layers) if mask.kept_layers[l]]
    head_positions = [[j for j, h in enumerate(structure.heads[p]) if mask.kept_heads[structure.layers[p], h]]
                      for p in layer_positions]
    neuron_positions = [[j for j, n in enumerate(structure.neurons[p]) if mask.kept_neurons[structure.layers[p], n]]
                        for p in layer_positions]
    vocab_positions = None
    if mask.kept_vocab is not None:
        current = structure.vocab if structure.vocab is not None else range(source_config(model).vocab_size)
        keep = set(mask.kept_vocab.tolist())
        vocab_positions = [j for j, v in enumerate(current) if v in keep]
        if len(vocab_positions) == len(current):
            vocab_positions = None
    return select_units(model, layer_positions, head_positions, neuron_positions, vocab_positions)
