"""Rewiring for Dynamic Sparsification: units in importance order, every size a prefix.

``rewire`` permutes the heads and FFN neurons inside every layer in descending
importance (Q/K/V rows and attention-output columns of a head move together, as do the
W1 row and W2 column of a neuron). A permutation is :func:`select_units` with every
position kept in a new order, so the model computes exactly what it computed before and
its ``Structure`` records the original index of every unit in its new place.

On a rewired model the sub-network at sparsity ``s`` keeps, in every layer, the first
``ceil((1 - s) * N)`` heads and the first ``ceil((1 - s) * F)`` neurons (N heads and F
neurons per layer in the original model): :func:`prefix_mask` gives it as a ``Mask`` in
original coordinates (gates during training, evaluation), :func:`shrink_to` slices it
physically. One checkpoint (:func:`save_dynamic`) therefore serves every size.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from raysparse.errors import RaysparseError
from raysparse.structure.accounting import encoder_sparsity_of, params_per_head, params_per_neuron
from raysparse.structure.adapters import Encoder
from raysparse.structure.mask import Mask
from raysparse.structure.shrink import select_units, structure_of

MARK = "raysparse_dynamic"   # attribute on the base encoder: what rewiring recorded (a dict)
EXTRA_KEY = "dynamic"        # key of that record in a checkpoint's sidecar ``extra``


def _order(values: torch.Tensor) -> list[int]:
    """Positions by descending value; ties (and -inf) keep their current order."""
    return torch.argsort(-values.float(), stable=True).tolist()


def rewire(model: nn.Module, scores) -> nn.Module:
    """Permute heads and neurons of every layer by descending importance. In place.

    ``scores`` has ``heads`` [layers x heads] and ``neurons`` [layers x ffn] in the
    original model's coordinates (a ``raysparse.pruning.UnitScores``); higher = more
    important. Works on shrunk models too (only the units they hold are ordered).
    """
    structure = structure_of(model)
    num_layers, num_heads, ffn = structure.shape
    heads, neurons = torch.as_tensor(scores.heads), torch.as_tensor(scores.neurons)
    if tuple(heads.shape) != (num_layers, num_heads) or tuple(neurons.shape) != (num_layers, ffn):
        raise RaysparseError(f"rewire: scores of shape heads {tuple(heads.shape)}, neurons {tuple(neurons.shape)} "
                             f"do not fit the model; expected {(num_layers, num_heads)} and {(num_layers, ffn)}")
    head_positions = [_order(heads[layer, kept]) for layer, kept in zip(structure.layers, structure.heads)]
    neuron_positions = [_order(neurons[layer, kept]) for layer, kept in zip(structure.layers, structure.neurons)]
    select_units(model, list(range(len(structure.layers))), head_positions, neuron_positions)
    mark(model, {**(dynamic_info(model) or {}), "rewired": True})
    return model


def mark(model: nn.Module, info: dict) -> None:
    """Record Dynamic Sparsification facts (rewired, grid, ...) on a live model."""
    setattr(Encoder(model).base, MARK, dict(info))


def dynamic_info(model: nn.Module) -> dict | None:
    """What :func:`rewire` (or :func:`load_dynamic`) recorded on the model; None if nothing."""
    return getattr(Encoder(model).base, MARK, None)


def is_rewired(model: nn.Module) -> bool:
    return bool((dynamic_info(model) or {}).get("rewired"))


def prefix_counts(sparsity: float, num_heads: int, ffn_size: int, hidden_size: int, head_dim: int,
                  match_sparsity: bool = False) -> tuple[int, int]:
    """Heads and neurons kept per layer at ``sparsity``: ceil((1 - s) * N) of each.

    With ``match_sparsity`` the neuron count absorbs the rounding of the head count, so
    the encoder sparsity is ``sparsity`` to within half a neuron (heads are coarse: 12
    per layer in e5-small); without it each type keeps its own ceil and the encoder
    sparsity comes out slightly below ``sparsity`` (check it with :func:`prefix_sparsity`).
    """
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0.0 <= sparsity < 1.0:
        raise RaysparseError(f"dynamic.sparsity: expected a number in [0, 1), got {sparsity!r}")
    heads = min(num_heads, math.ceil((1.0 - sparsity) * num_heads - 1e-9))
    neurons = min(ffn_size, math.ceil((1.0 - sparsity) * ffn_size - 1e-9))
    if match_sparsity:
        per_head, per_neuron = params_per_head(hidden_size, head_dim), params_per_neuron(hidden_size)
        target = (1.0 - sparsity) * (num_heads * per_head + ffn_size * per_neuron)
        neurons = min(ffn_size, max(0, round((target - heads * per_head) / per_neuron)))
    return heads, neurons


def prefix_mask(model: nn.Module, sparsity: float, match_sparsity: bool | None = None) -> Mask:
    """The Mask (original coordinates) of the sub-network at ``sparsity``: the first units of every layer.

    The same per-layer counts in every layer (:func:`prefix_counts` of the original
    shape). On a rewired model the first units are the most important ones.
    ``match_sparsity`` None: as recorded on the model (default False).
    """
    if match_sparsity is None:
        match_sparsity = bool((dynamic_info(model) or {}).get("match_sparsity", False))
    enc = Encoder(model)
    structure = structure_of(model)
    num_layers, num_heads, ffn = structure.shape
    keep_heads, keep_neurons = prefix_counts(sparsity, num_heads, ffn, enc.hidden_size, enc.head_dim, match_sparsity)
    mask = Mask(torch.zeros(num_layers, num_heads, dtype=torch.bool), torch.zeros(num_layers, ffn, dtype=torch.bool),
                torch.zeros(num_layers, dtype=torch.bool))
    for layer, heads, neurons in zip(structure.layers, structure.heads, structure.neurons):
        if keep_heads > len(heads) or keep_neurons > len(neurons):
            raise RaysparseError(f"dynamic.sparsity: {sparsity:g} keeps {keep_heads} heads and {keep_neurons} neurons "
                                 f"per layer but layer {layer} holds only {len(heads)} and {len(neurons)} "
                                 "(a shrunk model cannot grow; shrink from the full checkpoint)")
        mask.kept_layers[layer] = True
        mask.kept_heads[layer, heads[:keep_heads]] = True
        mask.kept_neurons[layer, neurons[:keep_neurons]] = True
    return mask


def prefix_sparsity(model: nn.Module, sparsity: float, match_sparsity: bool | None = None) -> float:
    """The encoder sparsity the prefix at ``sparsity`` actually reaches."""
    enc = Encoder(model)
    return encoder_sparsity_of(prefix_mask(model, sparsity, match_sparsity), enc.hidden_size, enc.head_dim)


def shrink_to(model: nn.Module | str | Path, sparsity: float, match_sparsity: bool | None = None) -> nn.Module:
    """Slice the prefix at ``sparsity`` physically (in place); a folder is loaded first.

    The model must be rewired (:func:`rewire`, or a checkpoint from :func:`save_dynamic`,
    which a Dynamic Sparsification run writes). The result is a plain shrunk model:
    ``save_pruned`` / ``raysparse.load_model`` handle it like any other, and it stays
    marked, so a smaller prefix can be sliced from it again.
    """
    if isinstance(model, (str, Path)):
        model = load_dynamic(model)
    if not is_rewired(model):
        raise RaysparseError("shrink: the model is not rewired, so its first units are not its most important ones "
                             "(use a Dynamic Sparsification checkpoint, load it with load_dynamic, or call rewire first)")
    structure = structure_of(model)
    mask = prefix_mask(model, sparsity, match_sparsity)
    kept_heads = [int(mask.kept_heads[layer].sum()) for layer in structure.layers]
    kept_neurons = [int(mask.kept_neurons[layer].sum()) for layer in structure.layers]
    select_units(model, list(range(len(structure.layers))), [list(range(n)) for n in kept_heads],
                 [list(range(n)) for n in kept_neurons])
    info = dict(dynamic_info(model) or {})
    info["sparsity"] = float(sparsity)
    if match_sparsity is not None:
        info["match_sparsity"] = bool(match_sparsity)
    mark(model, info)
    return model


def save_dynamic(model: nn.Module, directory: str | Path, tokenizer=None, grid: list[float] | None = None,
                 extra: dict | None = None) -> Path:
    """Save a rewired model with its record (rewired, grid, ...) in the sidecar's ``extra``."""
    from raysparse.structure.checkpoint import save_pruned

    if not is_rewired(model):
        raise RaysparseError("save_dynamic: the model is not rewired (call rewire(model, scores) first)")
    info = dict(dynamic_info(model) or {})
    if grid is not None:
        info["grid"] = [float(s) for s in grid]
    mark(model, info)
    return save_pruned(model, directory, tokenizer, extra={**(extra or {}), EXTRA_KEY: info})


def read_dynamic_info(directory: str | Path) -> dict | None:
    """The Dynamic Sparsification record of a saved model folder (None: not a DS checkpoint)."""
    from raysparse.structure.checkpoint import read_sidecar

    return read_sidecar(directory).get("extra", {}).get(EXTRA_KEY)


def load_dynamic(directory: str | Path) -> nn.Module:
    """Load a checkpoint written by :func:`save_dynamic` (or a level shrunk from it), marked as rewired."""
    from raysparse.structure.checkpoint import load_pruned, read_sidecar

    directory = Path(directory)
    if not directory.is_dir():
        raise RaysparseError(f"shrink: {directory} does not exist (expected a Dynamic Sparsification checkpoint folder)")
    info = read_sidecar(directory).get("extra", {}).get(EXTRA_KEY)
    if not info or not info.get("rewired"):
        raise RaysparseError(f"shrink: {directory} is not a Dynamic Sparsification checkpoint (its "
                             "raysparse.json records no rewiring; run a spec with pruning.schedule: dynamic)")
    model = load_pruned(directory)
    mark(model, info)
    return model


__all__ = ["dynamic_info", "is_rewired", "load_dynamic", "prefix_counts", "prefix_mask", "prefix_sparsity",
           "read_dynamic_info", "rewire", "save_dynamic", "shrink_to"]
