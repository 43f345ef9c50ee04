"""Depth versus width at equal removed parameters (docs/METHOD.md, finding 3).

Dropping k of L layers removes k/L of the prunable parameters; removing heads and FFN
neurons from every layer (``select_mask``, per unit type) to the same encoder sparsity
removes the same number. Both are shrunk physically, timed side by side with the
dense model and scored on Tatoeba top-1. The paper's claim to check: depth buys more
speed than width at the same parameter count. Neither model is recovered here, so
quality shows what each cut destroys before any recovery training.

:func:`depth_vs_width_latency` decides the speed half of the claim: at several equal
encoder sparsities it times the dense, depth and width models interleaved in rounds and
gives the ratio width latency / depth latency with a bootstrap interval over rounds, and
a verdict only where the interval excludes 1.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from raysparse.efficiency.latency import (LatencyResult, environment, fixed_threads, measure_latency,
                                          median_speedups, ratio_interval, time_rounds)
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


def depth_and_width(model: nn.Module, removed_layers: int, *, layers: str | list[int] = "top", scores=None,
                    scope: str = "per-layer") -> tuple[list[int], dict[str, Mask], dict[str, nn.Module]]:
    """The two cuts at one encoder sparsity: ``depth`` drops ``removed_layers`` layers (k/L of the
    prunable parameters), ``width`` removes the same share as heads and neurons (``scores``, default
    magnitude, selected ``scope``). Returns the dropped layers, both masks and shrunk copies of ``model``."""
    from raysparse.pruning import Selection, get_algorithm, select_mask

    enc = Encoder(model)
    num_layers = enc.config.num_hidden_layers
    dropped = layers_to_drop(num_layers, removed_layers if isinstance(layers, str) else len(list(layers)), layers)
    masks = {"depth": depth_mask(model, dropped)}
    scores = scores if scores is not None else get_algorithm("magnitude").score(model)
    masks["width"] = select_mask(scores, len(dropped) / num_layers, enc.hidden_size, enc.head_dim,
                                 Selection(scope=scope))
    return dropped, masks, {name: shrink(copy.deepcopy(model), mask) for name, mask in masks.items()}


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
    dropped, masks, shrunk = depth_and_width(model, removed_layers, layers=layers, scores=scores, scope=scope)
    models = {"dense": model, **shrunk}
    sizes = {name: measure(m, sequence_length) for name, m in models.items()}
    latency = measure_latency(models, batch_sizes, sequence_length, warmup, repeats, threads, device)
    for m in models.values():
        m.to("cpu")
    if pairs is None:
        from raysparse.data.parallel import tatoeba_pairs

        pairs = tatoeba_pairs(max_pairs=200)
    quality = {name: _quality(m, tokenizer, pairs) for name, m in models.items()} if pairs else {}
    return DepthWidthResult(dropped, masks, sizes, latency, quality)


VERDICTS = ("depth faster", "width faster", "undecided")


@dataclass(frozen=True)
class DepthWidthRow:
    """One encoder sparsity at one batch size: median latencies and the width / depth ratio.

    ``sparsity`` is the depth cut's encoder sparsity (``removed_layers`` / layers),
    ``width_sparsity`` the width cut's (equal within one neuron's share), both as ``measure``
    finds them. ``ratio`` = median width ms / median depth ms, ``ratio_low``-``ratio_high`` its
    bootstrap interval over rounds: above 1, depth is faster.
    """

    sparsity: float
    removed_layers: int
    width_sparsity: float
    batch_size: int
    dense_ms: float
    depth_ms: float
    width_ms: float
    ratio: float
    ratio_low: float
    ratio_high: float

    @property
    def depth_speedup(self) -> float:
        return self.dense_ms / self.depth_ms

    @property
    def width_speedup(self) -> float:
        return self.dense_ms / self.width_ms

    @property
    def verdict(self) -> str:
        """``depth faster`` / ``width faster`` where the interval excludes 1, else ``undecided``."""
        if self.ratio_low > 1:
            return VERDICTS[0]
        return VERDICTS[1] if self.ratio_high < 1 else VERDICTS[2]

    def as_dict(self) -> dict:
        return {**asdict(self), "depth_speedup": self.depth_speedup, "width_speedup": self.width_speedup,
                "verdict": self.verdict}


@dataclass
class DepthWidthLatency:
    """Depth against width at several equal encoder sparsities, timed in interleaved rounds.

    ``times[(removed_layers, batch_size)]`` holds each model's ms per round (round i of one model
    beside round i of the others); ``quality[removed_layers]`` Tatoeba metrics per model when scored.
    """

    rows: list[DepthWidthRow]
    times: dict[tuple[int, int], dict[str, list[float]]]
    dropped_layers: dict[int, list[int]]
    num_layers: int
    rounds: int
    warmup: int
    level: float
    sequence_length: int
    environment: dict
    quality: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)

    def table(self) -> str:
        env = self.environment
        percent = f"{self.level:.0%}"
        header = ["sparsity", "dropped", "width sp.", "batch", "dense ms", "depth ms", "width ms", "depth x",
                  "width x", "width/depth", f"{percent} interval", "verdict"]
        key = avg_key("tatoeba", "accuracy")
        scored = bool(self.quality)
        if scored:
            header += ["tatoeba dense/depth/width"]
        rows = []
        for r in self.rows:
            row = [f"{r.sparsity:.3f}", f"{r.removed_layers}/{self.num_layers}", f"{r.width_sparsity:.3f}",
                   str(r.batch_size), f"{r.dense_ms:.2f}", f"{r.depth_ms:.2f}", f"{r.width_ms:.2f}",
                   f"{r.depth_speedup:.2f}", f"{r.width_speedup:.2f}", f"{r.ratio:.3f}",
                   f"{r.ratio_low:.3f}-{r.ratio_high:.3f}", r.verdict]
            if scored:
                q = self.quality.get(r.removed_layers, {})
                row.append("/".join(f"{q[n][key]:.3f}" if key in q.get(n, {}) else "-"
                                    for n in ("dense", "depth", "width")))
            rows.append(row)
        widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
        verdict = header.index("verdict")
        lines = ["  ".join(c.ljust(w) if i == verdict else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 .rstrip() for row in [header, *rows]]
        title = (f"{env.get('device')} ({env.get('gpu') or env.get('processor')}), threads {env.get('threads')}, "
                 f"torch {env.get('torch')}, seq {self.sequence_length}, {self.rounds} rounds after {self.warmup} "
                 f"warm-up, {percent} bootstrap interval of width/depth over rounds")
        return "\n".join([title, *lines])


def depth_vs_width_latency(model: nn.Module, sparsities=(0.25, 0.5, 0.75), *, layers: str = "top", scores=None,
                           scope: str = "per-layer", batch_sizes=(1, 8), sequence_length: int = 128,
                           rounds: int = 30, warmup: int = 3, threads: int | None = None, device: str = "cpu",
                           level: float = 0.95, resamples: int = 2000, seed: int = 0, tokenizer=None,
                           pairs: dict | None = None) -> DepthWidthLatency:
    """Time dense, depth and width at each of ``sparsities`` (encoder sparsity; rounded to whole layers).

    Per sparsity, :func:`depth_and_width` builds both cuts; then, per batch size, the three
    models run ``warmup`` rounds and ``rounds`` timed rounds, each round every model once in an
    order rotated per round, threads fixed (``threads``). The ratio of median width to median
    depth latency gets a paired percentile bootstrap interval (``resamples`` draws of rounds,
    ``seed``). ``model`` must be unshrunk; it is copied, not changed (it is put back on its device
    and in its mode). With ``pairs`` (Tatoeba ``{lang: (sentences, English)}``) and ``tokenizer``
    each model is also scored on Tatoeba top-1, without recovery training.
    """
    from raysparse.pruning import get_algorithm

    num_layers = Encoder(model).config.num_hidden_layers
    removed = list(dict.fromkeys(round(float(s) * num_layers) for s in sparsities))
    expect(bool(removed) and all(1 <= k < num_layers for k in removed),
           f"depth.sparsities: expected sparsities that drop 1..{num_layers - 1} of {num_layers} layers, "
           f"got {list(sparsities)}")
    expect(rounds >= 2, f"depth.rounds: expected at least 2 rounds for an interval, got {rounds}")
    expect(not pairs or tokenizer is not None, "depth.pairs: Tatoeba quality needs the tokenizer")
    scores = scores if scores is not None else get_algorithm("magnitude").score(model)
    was_training, home = model.training, next(model.parameters()).device
    rows, times, dropped_layers, quality = [], {}, {}, {}
    with fixed_threads(threads):
        env = environment(device)
        try:
            quality_dense = _quality(model.to("cpu"), tokenizer, pairs) if pairs else {}
            model.eval().to(device)
            for count in removed:
                dropped, masks, shrunk = depth_and_width(model, count, layers=layers, scores=scores, scope=scope)
                dropped_layers[count] = dropped
                models = {"dense": model, **{name: m.eval().to(device) for name, m in shrunk.items()}}
                achieved = {name: measure(m, sequence_length).encoder_sparsity for name, m in shrunk.items()}
                for batch_size in batch_sizes:
                    timed = time_rounds(models, batch_size, sequence_length, rounds, warmup, device)
                    times[(count, batch_size)] = timed
                    ratio = ratio_interval(timed["width"], timed["depth"], level, resamples, seed)
                    medians = {name: statistics.median(values) for name, values in timed.items()}
                    rows.append(DepthWidthRow(achieved["depth"], count, achieved["width"], batch_size,
                                              medians["dense"], medians["depth"], medians["width"], *ratio))
                if pairs:   # on the CPU: the Tatoeba encoder leaves its inputs there
                    quality[count] = {"dense": quality_dense, **{name: _quality(m.to("cpu"), tokenizer, pairs)
                                                                 for name, m in shrunk.items()}}
                del models, shrunk
        finally:
            model.to(home).train(was_training)
    return DepthWidthLatency(rows, times, dropped_layers, num_layers, rounds, warmup, level, sequence_length, env,
                             quality)


def _quality(model: nn.Module, tokenizer, pairs: dict) -> dict[str, float]:
    """Tatoeba top-1 (avg, worst, per language) of ``model``, on the device it is on."""
    from raysparse.standalone import tatoeba_quality

    with torch.inference_mode():
        return tatoeba_quality(model, tokenizer, pairs)


__all__ = ["VERDICTS", "DepthWidthLatency", "DepthWidthResult", "DepthWidthRow", "depth_and_width", "depth_mask",
           "depth_vs_width", "depth_vs_width_latency", "layers_to_drop"]
