"""Run a sub-network at its own size while its weights stay shared with the full network.

After rewiring (:mod:`raysparse.structure.rewire`) every Dynamic Sparsification level is a
prefix of every layer: the first ``h`` heads and the first ``n`` FFN neurons. Inside
:func:`prefix_slices` the projections of each layer compute with views of their first rows
or columns (``W[:k]``, ``W[:, :k]``) instead of gating the full width, so a forward and
backward pass cost what the sub-network costs, and gradients land in the shared weights
exactly where gates of 1/0 would have put them (a prefix that gates cannot express, or a
layer left with no heads or neurons, is the caller's to gate instead). :func:`layer_subset` skips
whole layers the same way: the encoder runs only the layers named, the others stay in the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raysparse.structure.adapters import Encoder


def prefix_lengths(rows: Sequence[torch.Tensor]) -> list[int] | None:
    """``k`` per row when each gate row is k ones followed by zeros; None when any is not a prefix."""
    lengths = []
    for row in rows:
        kept = int(row.bool().sum())
        if not bool(row[:kept].bool().all()) or kept == 0:
            return None
        lengths.append(kept)
    return lengths


def _slice(linear: nn.Linear, rows: int | None = None, columns: int | None = None) -> None:
    weight, bias = linear.weight, linear.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        w = weight if rows is None else weight[:rows]
        w = w if columns is None else w[:, :columns]
        b = None if bias is None else (bias if rows is None else bias[:rows])
        return F.linear(x, w, b)

    linear.forward = forward


@contextlib.contextmanager
def prefix_slices(model: nn.Module, heads: Sequence[int], neurons: Sequence[int]) -> Iterator[None]:
    """Forward passes inside the block use the first ``heads[i]`` heads and ``neurons[i]`` neurons of
    layer ``i`` (every count at least 1); the model is unchanged afterwards."""
    enc = Encoder(model)
    sliced: list[nn.Linear] = []
    try:
        for layer, h, n in zip(enc.layers, heads, neurons):
            attention = enc.attention(layer)
            width = h * enc.head_dim
            if width < attention.query.out_features:
                for projection in (attention.query, attention.key, attention.value):
                    _slice(projection, rows=width)
                    sliced.append(projection)
                _slice(enc.attention_output(layer), columns=width)
                sliced.append(enc.attention_output(layer))
            if n < enc.ffn_input(layer).out_features:
                _slice(enc.ffn_input(layer), rows=n)
                _slice(enc.ffn_output(layer), columns=n)
                sliced += [enc.ffn_input(layer), enc.ffn_output(layer)]
        yield
    finally:
        for linear in sliced:
            del linear.forward


@contextlib.contextmanager
def layer_subset(model: nn.Module, positions: Sequence[int]) -> Iterator[None]:
    """Forward passes inside the block run only the encoder layers at ``positions`` (current layer
    indices, in order); the others are skipped and get no gradient. The model is unchanged afterwards."""
    encoder = Encoder(model).base.encoder
    layers = encoder.layer
    if list(positions) == list(range(len(layers))):
        yield
        return
    encoder.layer = nn.ModuleList([layers[p] for p in positions])
    try:
        yield
    finally:
        encoder.layer = layers


__all__ = ["layer_subset", "prefix_lengths", "prefix_slices"]
