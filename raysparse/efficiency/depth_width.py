"""Depth versus width at equal removed parameters (docs/METHOD.md, finding 3).

Dropping k of L layers removes k/L of the prunable parameters; removing heads and FFN
neurons from every layer (``select_mask``, per unit type) to the same encoder sparsity
removes the same number. Both are shrunk physically, timed side by side with the
dense model and scored on Tatoeba top-1. The paper's claim to check: depth buys more
speed than width at the same parameter count. Neither model is recovered here, so
quality shows what each cut destroys before any recovery training.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from raysparse.efficiency.latency import LatencyResult, measure_latency, median_speedups
from raysparse.errors import expect
from raysparse.metric_keys import avg_key, worst_key
from raysparse.structure import Encoder, Mask, Size, measure, shrink

LAYER_CHOICES = ("top", "bottom", "alternate")


def layers_to_drop(num_layers: int, count: int, which: str | list[int] = "top") -> list[int]:
    """Layers to drop: the last ``count`` ("top"), the first ("bottom"), every other from the top ("alternate")."""
    if not isinstance(which, str):
        chosen = sorted(set(int(i) for i in which))
        expect(all(0 <= i < num_layers for i in chosen) and len(chosen) < num_layers,
               f"depth.layers: expected distinct layer indices in 0..{num_layers - 1}, not all of them; got {which}")
        return chosen
    expect(which in LAYER_CHOICES, f"depth.layers: expected one of {LAYER_CHOICES} or a list of indices, got {which!r}")
    expect(isinstance(count, int) and 1 <= count < num_layers,
           f"depth.removed_layers: expected an integer in 1..{num_layers - 1}, got {count!r}")
    if which == "top":
        return list(range(num_layers - count, num_layers))
    if which == "bottom":
        return list(range(count))
    alternate = list(range(num_layers - 1, -1, -2)) + list(range(num_layers - 2, -1, -2))
    return sorted(alternate[:count])


def depth_mask(model: nn.Module, dropped: list[int]) -> Mask:
    mask = Mask.for_model(model)
    mask.kept_layers[dropped] = False
    return mask


@dataclass
class DepthWidthResult:
    """The dense, depth-pruned and width-pruned models' sizes, latencies and Tatoeba quality."""

    dropped_layers: list[int]
    masks: dict[str, Mask]
    sizes: dict[str, Size]
    latency: list[LatencyResult]
    quality: dict[str, dict[str, float]] = field(default_factory=dict)

    def speedups(self) -> dict[tuple[str, int], float]:
        return median_speedups(self.latency, "dense")

    def table(self) -> str:
        names = list(self.sizes)
        speedups = self.speedups()
        removed = {n: (self.sizes["dense"].prunable_params - self.sizes[n].prunable_params) / 1e6 for n in names}
        rows = [("", *names),
                ("encoder sparsity", *(f"{self.sizes[n].encoder_sparsity:.3f}" for n in names)),
                ("removed prunable params", *(f"{removed[n]:.2f}M" for n in names)),
                ("total params", *(f"{self.sizes[n].total_params / 1e6:.2f}M" for n in names)),
                ("layers / heads / neurons", *(f"{self.sizes[n].layers}/{self.sizes[n].heads}/{self.sizes[n].neurons}"
                                               for n in names)),
                (f"GFLOPs/seq@{self.sizes['dense'].sequence_length}",
                 *(f"{self.sizes[n].flops_per_sequence / 1e9:.2f}" for n in names))]
        for batch in dict.fromkeys(r.batch_size for r in self.latency):
            by_name = {r.name: r for r in self.latency if r.batch_size == batch}
            rows.append((f"median ms @ batch {batch}", *(f"{by_name[n].median_ms:.1f}" for n in names)))
            rows.append(("  p10-p90", *(f"{by_name[n].p10_ms:.1f}-{by_name[n].p90_ms:.1f}" for n in names)))
            rows.append(("  speedup", *(f"{speedups[(n, batch)]:.2f}" for n in names)))
        for key in (avg_key("tatoeba", "accuracy"), worst_key("tatoeba", "accuracy")):
            if all(key in self.quality.get(n, {}) for n in names):
                rows.append((key, *(f"{self.quality[n][key]:.3f}" for n in names)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                         for r in rows)


def depth_vs_width(model: nn.Module, tokenizer, removed_layers: int = 6, *, layers: str | list[int] = "top",
                   scores=None, scope: str = "per-layer", pairs: dict | None = None, batch_sizes=(1, 8),
                   sequence_length: int = 128, warmup: int = 2, repeats: int = 10, threads: int | None = None,
                   device: str = "cpu") -> DepthWidthResult:
    """Compare dropping ``removed_layers`` layers against removing the same parameters as heads and neurons.

    ``model`` must be unshrunk; it is copied, not changed. ``scores`` (``UnitScores``)
    rank heads and neurons for the width cut (default: magnitude, per layer, since
    magnitudes differ ~10x between layers). ``pairs`` are Tatoeba pairs
    ``{lang: (sentences, English)}`` for quality; ``{}`` skips quality.
    """
    from raysparse.pruning import Selection, get_algorithm, select_mask
    from raysparse.standalone import tatoeba_quality

    enc = Encoder(model)
    num_layers = enc.config.num_hidden_layers
    dropped = layers_to_drop(num_layers, removed_layers if isinstance(layers, str) else len(list(layers)), layers)
    masks = {"depth": depth_mask(model, dropped)}
    sparsity = len(dropped) / num_layers
    scores = scores if scores is not None else get_algorithm("magnitude").score(model)
    masks["width"] = select_mask(scores, sparsity, enc.hidden_size, enc.head_dim, Selection(scope=scope))
    models = {"dense": model, **{name: shrink(copy.deepcopy(model), mask) for name, mask in masks.items()}}
    sizes = {name: measure(m, sequence_length) for name, m in models.items()}
    latency = measure_latency(models, batch_sizes, sequence_length, warmup, repeats, threads, device)
    for m in models.values():
        m.to("cpu")
    if pairs is None:
        from raysparse.data.parallel import tatoeba_pairs

        pairs = tatoeba_pairs(max_pairs=200)
    quality = {}
    if pairs:
        with torch.inference_mode():
            quality = {name: tatoeba_quality(m, tokenizer, pairs) for name, m in models.items()}
    return DepthWidthResult(dropped, masks, sizes, latency, quality)


__all__ = ["DepthWidthResult", "depth_mask", "depth_vs_width", "layers_to_drop"]
