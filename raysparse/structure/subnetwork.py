"""Sub-networks with a width per layer: the first heads and neurons of each layer of a rewired model.

After rewiring (:mod:`raysparse.structure.rewire`) the units of every layer stand in importance
order, so a sub-network that keeps a different width in every layer is given by counts alone:
``Subnetwork(heads=[...], neurons=[...], layers=[...])``, one count per layer of the original
model and the layers kept (original indices; default all). A kept layer keeps at least one head and
one neuron (the weight views of :func:`~raysparse.structure.slicing.prefix_slices` need one); a layer
with nothing left is dropped instead, and a dropped layer's counts are 0. The same configuration is

- a :class:`~raysparse.structure.mask.Mask` in original coordinates: :func:`subnetwork_mask`
  (gates, evaluation under a mask);
- a forward (and backward) pass at its own size through the full model's weights:
  :func:`subnetwork_slices` (Dynamic Sparsification's per-layer sampling, the sub-network search);
- a physically shrunk model: :func:`shrink_subnetwork` (``raysparse shrink MODEL_DIR --config``);
- a JSON point ``{"heads": [...], "neurons": [...], "layers": [...]}``: :meth:`Subnetwork.to_dict`,
  :func:`read_subnetwork` (a point file, or a sub-network search's ``subnetworks.json`` and a trial).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from raysparse.errors import RaysparseError
from raysparse.structure.accounting import count_params, encoder_flops, params_per_head, params_per_neuron
from raysparse.structure.adapters import Encoder
from raysparse.structure.mask import Mask, read_json
from raysparse.structure.shrink import select_units, structure_of
from raysparse.structure.slicing import layer_subset, prefix_slices

SEARCH_FILE = "subnetworks.json"   # what a sub-network search writes: every candidate, by trial number


def _integers(values, where: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise RaysparseError(f"{where}: expected a list of integers, got {values!r}")
    out = []
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RaysparseError(f"{where}[{index}]: expected a non-negative integer, got {value!r}")
        out.append(int(value))
    return tuple(out)


def widths_near(width: float, low: int, high: int, deviations) -> list[int]:
    """Counts per layer between ``low`` and ``high``: ``width`` (0: ``low``, 1: ``high``) plus each layer's
    deviation, clipped. A sub-network drawn this way is non-uniform and still costs about ``width``
    (independent per-layer draws would all cost about the middle of the range)."""
    return [int(round(low + min(1.0, max(0.0, width + d)) * (high - low))) for d in deviations]


@dataclass(frozen=True)
class Subnetwork:
    """Heads and FFN neurons kept in every layer (prefixes of the importance order), and the layers kept.

    ``heads[i]`` and ``neurons[i]`` belong to layer ``i`` of the original model; ``layers`` lists the
    kept layers (None: all). Dropped layers' counts are stored as 0.
    """

    heads: tuple[int, ...]
    neurons: tuple[int, ...]
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        heads, neurons = _integers(self.heads, "subnetwork.heads"), _integers(self.neurons, "subnetwork.neurons")
        if len(heads) != len(neurons):
            raise RaysparseError(f"subnetwork.neurons: {len(neurons)} counts but subnetwork.heads has {len(heads)} "
                                 "(expected one of each per layer)")
        layers = None
        if self.layers is not None:
            layers = _integers(self.layers, "subnetwork.layers")
            if not layers or len(set(layers)) != len(layers) or list(layers) != sorted(layers) \
                    or layers[-1] >= len(heads):
                raise RaysparseError(f"subnetwork.layers: expected increasing distinct layer indices in "
                                     f"0..{len(heads) - 1}, at least one, got {list(layers)}")
            if len(layers) == len(heads):
                layers = None
        kept = set(range(len(heads)) if layers is None else layers)
        object.__setattr__(self, "heads", tuple(h if i in kept else 0 for i, h in enumerate(heads)))
        object.__setattr__(self, "neurons", tuple(n if i in kept else 0 for i, n in enumerate(neurons)))
        object.__setattr__(self, "layers", layers)

    @classmethod
    def uniform(cls, num_layers: int, heads: int, neurons: int) -> "Subnetwork":
        """The same counts in every layer (a Dynamic Sparsification level)."""
        return cls((heads,) * num_layers, (neurons,) * num_layers)

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    @property
    def kept_layers(self) -> tuple[int, ...]:
        return tuple(range(self.num_layers)) if self.layers is None else self.layers

    def counts(self) -> tuple[list[int], list[int]]:
        """(heads, neurons) of every kept layer, in order: what a latency table predicts from."""
        return [self.heads[i] for i in self.kept_layers], [self.neurons[i] for i in self.kept_layers]

    def check(self, shape: tuple[int, int, int], where: str = "subnetwork") -> "Subnetwork":
        """Raise one line (naming the field) unless this fits a model of ``shape`` (layers, heads, ffn)."""
        num_layers, num_heads, ffn = shape
        if self.num_layers != num_layers:
            raise RaysparseError(f"{where}.heads: {self.num_layers} counts for a {num_layers}-layer model "
                                 "(expected one per layer)")
        for name, counts, most in (("heads", self.heads, num_heads), ("neurons", self.neurons, ffn)):
            for layer in self.kept_layers:
                if not 1 <= counts[layer] <= most:
                    raise RaysparseError(f"{where}.{name}[{layer}]: {counts[layer]}, but layer {layer} holds {most} "
                                         f"{name} (expected 1..{most}; drop the layer to keep none)")
        return self

    def key(self) -> str:
        """A short text that names the configuration (equal configurations, equal keys)."""
        kept = "" if self.layers is None else "|L" + ",".join(map(str, self.layers))
        return "H" + ",".join(map(str, self.heads)) + "|N" + ",".join(map(str, self.neurons)) + kept

    def to_dict(self) -> dict:
        return {"heads": list(self.heads), "neurons": list(self.neurons), "layers": list(self.kept_layers)}

    @classmethod
    def from_dict(cls, data) -> "Subnetwork":
        if not isinstance(data, dict) or "heads" not in data or "neurons" not in data:
            raise RaysparseError(f"subnetwork: expected an object with heads and neurons per layer (and optionally "
                                 f"layers), got {type(data).__name__}")
        unknown = sorted(set(data) - {"heads", "neurons", "layers"})
        if unknown:
            raise RaysparseError(f"subnetwork.{unknown[0]}: unknown key (expected heads, neurons, layers)")
        return cls(data["heads"], data["neurons"], data.get("layers"))


@contextlib.contextmanager
def naming(where: str) -> Iterator[None]:
    """Errors raised inside say where the configuration came from: ``... (in FILE)``."""
    try:
        yield
    except RaysparseError as exc:
        raise RaysparseError(f"{exc} (in {where})") from None


def read_subnetwork(path: str | Path, trial: int | None = None) -> Subnetwork:
    """A sub-network from a point file (``{"heads": ..., "neurons": ..., "layers": ...}``) or, with
    ``trial``, from the ``subnetworks.json`` a sub-network search wrote."""
    path = Path(path)
    data = read_json(path, "shrink.config", "a sub-network JSON file")
    candidates = data.get("candidates") if isinstance(data, dict) else None
    if trial is None:
        if candidates is not None:
            raise RaysparseError(f"shrink.trial: {path} holds {len(candidates)} candidates of a search; "
                                 "name one with --trial N (its trial number)")
        with naming(str(path)):
            return Subnetwork.from_dict(data)
    if candidates is None:
        raise RaysparseError(f"shrink.trial: {path} is not a search's {SEARCH_FILE} (no candidates in it); "
                             "give a point file without --trial")
    found = [row for row in candidates if isinstance(row, dict) and row.get("trial") == trial]
    if not found:
        numbers = sorted(row["trial"] for row in candidates if isinstance(row, dict) and isinstance(row.get("trial"), int))
        span = f"{numbers[0]}..{numbers[-1]}" if numbers else "none"
        raise RaysparseError(f"shrink.trial: no trial {trial} in {path} (its trials: {span})")
    with naming(f"{path}, trial {trial}"):
        return Subnetwork.from_dict(found[0].get("subnetwork"))


def check_fits(model: nn.Module, sub: Subnetwork, where: str = "subnetwork") -> None:
    """``sub`` fits the original shape of ``model``, and ``model`` still holds every unit it keeps."""
    structure = structure_of(model)
    sub.check(structure.shape, where)
    present = dict(zip(structure.layers, zip(structure.heads, structure.neurons)))
    for layer in sub.kept_layers:
        if layer not in present:
            raise RaysparseError(f"{where}.layers: layer {layer} was removed from this model (a shrunk model cannot "
                                 "grow; use the full Dynamic Sparsification checkpoint)")
        heads, neurons = present[layer]
        if sub.heads[layer] > len(heads) or sub.neurons[layer] > len(neurons):
            raise RaysparseError(f"{where}.heads[{layer}]: keeps {sub.heads[layer]} heads and {sub.neurons[layer]} "
                                 f"neurons but this model's layer {layer} holds only {len(heads)} and {len(neurons)} "
                                 "(a shrunk model cannot grow; use the full checkpoint)")


def subnetwork_mask(model: nn.Module, sub: Subnetwork) -> Mask:
    """``sub`` as a Mask in original coordinates: the first units of each kept layer of ``model``."""
    check_fits(model, sub)
    structure = structure_of(model)
    num_layers, num_heads, ffn = structure.shape
    mask = Mask(torch.zeros(num_layers, num_heads, dtype=torch.bool), torch.zeros(num_layers, ffn, dtype=torch.bool),
                torch.zeros(num_layers, dtype=torch.bool))
    kept = set(sub.kept_layers)
    for layer, heads, neurons in zip(structure.layers, structure.heads, structure.neurons):
        if layer in kept:
            mask.kept_layers[layer] = True
            mask.kept_heads[layer, heads[:sub.heads[layer]]] = True
            mask.kept_neurons[layer, neurons[:sub.neurons[layer]]] = True
    return mask


@contextlib.contextmanager
def subnetwork_slices(model: nn.Module, sub: Subnetwork) -> Iterator[None]:
    """Forward passes inside the block run ``sub`` at its own size: views of the first rows and columns of
    each kept layer's projections, dropped layers skipped; the weights are the model's own (gradients
    land in them) and the model is unchanged afterwards."""
    check_fits(model, sub)
    structure = structure_of(model)
    kept = set(sub.kept_layers)
    heads = [sub.heads[layer] if layer in kept else len(structure.heads[p]) for p, layer in enumerate(structure.layers)]
    neurons = [sub.neurons[layer] if layer in kept else len(structure.neurons[p])
               for p, layer in enumerate(structure.layers)]
    positions = [p for p, layer in enumerate(structure.layers) if layer in kept]
    with prefix_slices(model, heads, neurons), layer_subset(model, positions):
        yield


def shrink_subnetwork(model: nn.Module, sub: Subnetwork) -> nn.Module:
    """Slice ``sub`` out of a rewired model physically (in place): its kept layers, the first heads and
    neurons of each. The result is a plain shrunk model (``save_pruned``, ``raysparse.load_model``)."""
    from raysparse.structure.rewire import dynamic_info, is_rewired, mark

    if not is_rewired(model):
        raise RaysparseError("shrink: the model is not rewired, so its first units are not its most important ones "
                             "(use a Dynamic Sparsification checkpoint, load it with load_dynamic)")
    check_fits(model, sub)
    structure = structure_of(model)
    kept = set(sub.kept_layers)
    positions = [p for p, layer in enumerate(structure.layers) if layer in kept]
    select_units(model, positions, [list(range(sub.heads[structure.layers[p]])) for p in positions],
                 [list(range(sub.neurons[structure.layers[p]])) for p in positions])
    info = {k: v for k, v in (dynamic_info(model) or {}).items() if k != "sparsity"}
    mark(model, {**info, "subnetwork": sub.to_dict()})
    return model


@dataclass(frozen=True)
class Costs:
    """Exact parameter, byte and FLOP counts of a model's sub-networks without building them: every
    layer's parameters that belong to no head or neuron (norms, output biases) and the rest of the model
    are measured once on the full model."""

    shape: tuple[int, int, int]
    hidden_size: int
    head_dim: int
    outside_layers: int        # parameters outside the encoder layers (embeddings, pooler, task head)
    per_layer_fixed: int       # parameters of a layer that belong to no head and no neuron
    bytes_per_param: float

    @classmethod
    def of(cls, model: nn.Module) -> "Costs":
        enc = Encoder(model)
        structure = structure_of(model)
        per_head, per_neuron = params_per_head(enc.hidden_size, enc.head_dim), params_per_neuron(enc.hidden_size)
        layers = enc.layers
        fixed = {count_params(layer) - len(h) * per_head - len(n) * per_neuron
                 for layer, h, n in zip(layers, structure.heads, structure.neurons)}
        if len(fixed) != 1:
            raise RaysparseError("subnetwork costs: the model's layers differ in what they hold besides heads and "
                                 "neurons (expected one architecture for every layer)")
        total = count_params(model)
        parameter = next(iter(layers[0].parameters()))
        return cls(structure.shape, enc.hidden_size, enc.head_dim, total - sum(count_params(layer) for layer in layers),
                   fixed.pop(), float(parameter.element_size()))

    def params(self, sub: Subnetwork) -> int:
        heads, neurons = sub.counts()
        return (self.outside_layers + len(heads) * self.per_layer_fixed
                + sum(heads) * params_per_head(self.hidden_size, self.head_dim)
                + sum(neurons) * params_per_neuron(self.hidden_size))

    def bytes(self, sub: Subnetwork) -> int:
        return int(self.params(sub) * self.bytes_per_param)

    def flops(self, sub: Subnetwork, sequence_length: int = 128) -> int:
        heads, neurons = sub.counts()
        return encoder_flops(heads, neurons, self.hidden_size, self.head_dim, sequence_length)

    def encoder_sparsity(self, sub: Subnetwork) -> float:
        """Share of the prunable parameters removed (dropped layers remove all of theirs)."""
        num_layers, num_heads, ffn = self.shape
        per_head, per_neuron = params_per_head(self.hidden_size, self.head_dim), params_per_neuron(self.hidden_size)
        heads, neurons = sub.counts()
        return 1.0 - (sum(heads) * per_head + sum(neurons) * per_neuron) / (num_layers * (num_heads * per_head
                                                                                          + ffn * per_neuron))


__all__ = ["Costs", "SEARCH_FILE", "Subnetwork", "check_fits", "read_subnetwork", "shrink_subnetwork", "widths_near",
           "subnetwork_mask", "subnetwork_slices"]
