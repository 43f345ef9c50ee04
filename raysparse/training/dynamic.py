"""The per-worker function of a Dynamic Sparsification run (``pruning.schedule: dynamic``).

The stages of a normal run, with the same names, checkpoints and resume:

- ``finetune``: exactly as a normal run (:class:`raysparse.training.worker.Run`).
- ``prune``: score heads and neurons (the spec's algorithm), then *rewire*: permute them
  inside every layer by descending importance, so that the sub-network at sparsity s is
  the prefix of every layer (:mod:`raysparse.structure.rewire`).
- ``recover``: every step trains the largest and the smallest level of ``dynamic.grid``
  plus ``dynamic.samples_per_step`` random other levels (sandwich rule) on one batch,
  each at its own size (prefix views of the shared weights, or gates where a level is no
  prefix); with ``dynamic.sampling: per-layer`` the random ones are sub-networks with a
  width of their own in every layer, some layers maybe dropped (:func:`sample_subnetworks`);
  the full sub-network's outputs (detached) teach the smaller ones when ``dynamic.distill``;
  gradients of all sub-networks accumulate before one optimizer step.
- ``evaluate``: every level, every language, under its prefix mask.
- ``finalize``: every level sliced physically; parameters, bytes, FLOPs and latency per
  level; the curve as Tune/Train results (keys ``level/<s>/...``) and as MLflow metrics
  (``curve/...`` with step ``round(100 * s)``), a plot of quality against sparsity per
  language; the one rewired checkpoint that serves every size (``model/dynamic``).

The level nearest ``pruning.sparsity`` is also reported under the plain keys of a normal
run (``<task>/avg/<metric>``, ``encoder_sparsity``, ...), so a search can rank DS trials
beside one-shot ones.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import tempfile
from pathlib import Path

import torch
import yaml
from torch import nn

from raysparse.errors import RaysparseError
from raysparse.metric_keys import AGGREGATES, avg_key, languages_in, metric_key, worst_key
from raysparse.structure import Encoder, Mask, UnitGates, attach_gates, measure, prefix_mask, rewire, shrink_to
from raysparse.structure.rewire import dynamic_info, mark, prefix_counts, save_dynamic
from raysparse.structure.shrink import structure_of
from raysparse.structure.slicing import prefix_lengths, prefix_slices
from raysparse.structure.subnetwork import Subnetwork, subnetwork_slices, widths_near
from raysparse.training.finalize import stage_costs
from raysparse.training.loop import Every, Progress, WithoutDropout
from raysparse.training.state import STAGES
from raysparse.training.worker import SHARED, Run, evaluation_options


def level_key(level: float) -> str:
    """How a level is named in result keys: ``level/0.3/...``."""
    return f"{level:g}"


def level_step(level: float) -> int:
    """The MLflow step of a level: its sparsity in percent."""
    return round(100 * level)


def sample_levels(grid: list[float], samples: int, seed: int, step: int) -> list[float]:
    """Levels trained at ``step``: the largest model, the smallest, ``samples`` random others (seeded by step)."""
    middle = list(grid[1:-1])
    rng = random.Random(seed * 1_000_003 + step)
    chosen = sorted(rng.sample(middle, min(samples, len(middle))))
    return [grid[0], *chosen, *([grid[-1]] if len(grid) > 1 else [])]


def sample_subnetworks(shape: tuple[int, int, int], smallest: tuple[int, int], samples: int, seed: int, step: int,
                       drop_layers_max: int = 0, spread: float | None = None) -> list[Subnetwork]:
    """``samples`` random sub-networks with a width per layer, a pure function of (seed, step), so a resumed
    run draws what an uninterrupted one draws. Heads kept range over ``smallest[0]``..all and neurons over
    ``smallest[1]``..all (each at least 1: a prefix of the importance order). With ``spread``, each
    sub-network draws one width uniformly over that range and every layer a width near it (a normal
    deviation of ``spread`` of the range, clipped): sub-networks at every cost, each non-uniform.
    Without it (None), every layer draws on its own over the whole range, so the widths average out
    and nearly every sub-network costs about the middle of the range. With ``drop_layers_max``,
    0..that many layers (never all) are dropped, chosen at random."""
    num_layers, num_heads, ffn = shape
    low_heads, low_neurons = max(1, min(smallest[0], num_heads)), max(1, min(smallest[1], ffn))
    most_dropped = min(drop_layers_max, num_layers - 1)
    rng = random.Random(f"raysparse/per-layer/{seed}/{step}")
    out = []
    for _ in range(samples):
        if spread is None:
            heads = [rng.randint(low_heads, num_heads) for _ in range(num_layers)]
            neurons = [rng.randint(low_neurons, ffn) for _ in range(num_layers)]
        else:
            width = rng.random()
            heads = widths_near(width, low_heads, num_heads, [rng.gauss(0.0, spread) for _ in range(num_layers)])
            neurons = widths_near(width, low_neurons, ffn, [rng.gauss(0.0, spread) for _ in range(num_layers)])
        dropped = set(rng.sample(range(num_layers), rng.randint(0, most_dropped))) if most_dropped > 0 else set()
        out.append(Subnetwork(heads, neurons, [i for i in range(num_layers) if i not in dropped]))
    return out


def smallest_counts(model: nn.Module, grid: list[float], match_sparsity: bool,
                    floor: float | None = None) -> tuple[int, int]:
    """Heads and neurons per layer at ``floor`` (default: the grid's smallest level): the least per-layer
    sampling keeps."""
    enc = Encoder(model)
    _, num_heads, ffn = structure_of(model).shape
    return prefix_counts(grid[-1] if floor is None else floor, num_heads, ffn, enc.hidden_size, enc.head_dim,
                         match_sparsity)


def nearest_level(grid: list[float], sparsity: float) -> float:
    return min(grid, key=lambda level: (abs(level - sparsity), level))


def _prefix_counts(gates: UnitGates) -> tuple[list[int], list[int]] | None:
    """(heads, neurons) kept per layer when the gates keep a prefix of every layer and no layer is
    dropped; None for the full model (nothing to slice) or a level gates must express."""
    if gates.heads is None or (gates.layers is not None and not bool(gates.layers.bool().all())):
        return None
    heads, neurons = prefix_lengths(gates.heads), prefix_lengths(gates.neurons)
    return (heads, neurons) if heads is not None and neurons is not None else None


def copy_sharing_embeddings(model: nn.Module) -> nn.Module:
    """A deep copy whose embedding tables are the original's (levels are sliced from copies; 82% of e5-small
    is its embedding table, so ten full copies would not fit in a small machine's memory)."""
    shared = {id(p): p for p in Encoder(model).embeddings.parameters()}
    return copy.deepcopy(model, memo=shared)


def full_mask(mask: Mask) -> bool:
    return bool(mask.kept_heads.all() and mask.kept_neurons.all() and mask.kept_layers.all())


def split_curve(metrics: dict, grid: list[float]) -> dict[float, dict[str, float]]:
    """``level/<s>/<key>`` results -> {level: {key: value}}."""
    curve: dict[float, dict[str, float]] = {level: {} for level in grid}
    names = {level_key(level): level for level in grid}
    for key, value in metrics.items():
        if key.startswith("level/"):
            name, _, rest = key[len("level/"):].partition("/")
            if name in names:
                curve[names[name]][rest] = value
    return curve


def curve_table(metrics: dict, grid: list[float], task: str, metric: str, languages: list[str] | None = None) -> str:
    """Quality per language at every level, beside encoder sparsity, parameters and latency."""
    curve = split_curve(metrics, grid)
    if languages is None:
        languages = languages_in([k for values in curve.values() for k in values], task, metric)
    latency = sorted({k for values in curve.values() for k in values if k.startswith("latency/") and k.endswith("_ms")})
    header = ["level", "enc.sparsity", "params", *languages, *AGGREGATES, *[k.split("/")[-1] for k in latency]]
    rows = []
    for level in grid:
        values = curve[level]

        def cell(key, fmt="{:.3f}"):
            return fmt.format(values[key]) if key in values else "-"

        params = f"{values['params/total'] / 1e6:.2f}M" if "params/total" in values else "-"
        rows.append([level_key(level), cell("encoder_sparsity"), params,
                     *[cell(metric_key(task, lang, metric)) for lang in [*languages, *AGGREGATES]],
            *[cell(k, "{:.1f}") for k in latency]])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return f"{task} {metric} at every level of one Dynamic Sparsification run\n" + "\n".join(lines)


def curve_plot(metrics: dict, grid: list[float], task: str, metric: str, title: str | None = None):
    """Quality against encoder sparsity, one line per language (avg bold, worst dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = split_curve(metrics, grid)
    x = [curve[level].get("encoder_sparsity", level) for level in grid]
    languages = languages_in([k for values in curve.values() for k in values], task, metric)
    figure, axis = plt.subplots(figsize=(6, 4))
    for lang in languages:
        axis.plot(x, [curve[level].get(metric_key(task, lang, metric), float("nan")) for level in grid], "o-", lw=1,
                  ms=3, alpha=0.7, label=lang)
    axis.plot(x, [curve[level].get(avg_key(task, metric), float("nan")) for level in grid], "o-", lw=2.5,
              color="black", label="avg")
    axis.plot(x, [curve[level].get(worst_key(task, metric), float("nan")) for level in grid], "--", lw=1.5,
              color="#c44e52", label="worst")
    axis.set_xlabel("encoder sparsity")
    axis.set_ylabel(metric)
    axis.set_title(title or f"{task}: one Dynamic Sparsification run, every size")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return figure


class DynamicRun(Run):
    """A run whose pruning stage rewires and whose recovery trains every size at once."""

    def __init__(self, config: dict, session=None):
        super().__init__(config, session)
        dyn, layers = self.spec.dynamic, structure_of(self.model).shape[0]
        if dyn.drop_layers_max >= layers:   # before any training: the spec cannot work on this model
            raise RaysparseError(f"dynamic.drop_layers_max: {dyn.drop_layers_max} would leave no layer of this "
                                 f"{layers}-layer model (expected at most {layers - 1})")

    # --- resume: a checkpoint after the prune stage holds rewired weights -----------------------
    def _before_weights_load(self) -> None:
        if STAGES.index(self.state.stage) > STAGES.index("prune") and SHARED in self.state.scores:
            self._rewire(self.state.scores[SHARED])

    def _rewire(self, scores) -> None:
        dyn = self.spec.dynamic
        rewire(self.model, scores)
        per_layer = {"sampling": dyn.sampling, "drop_layers_max": dyn.drop_layers_max,
                     "per_layer_max_sparsity": dyn.per_layer_max_sparsity or dyn.grid[-1],
                     "per_layer_spread": dyn.per_layer_spread} \
            if dyn.sampling != "uniform" else {}
        mark(self.model, {**dynamic_info(self.model), "grid": list(dyn.grid), "match_sparsity": dyn.match_sparsity,
                          **per_layer})

    def _level_gates(self, level: float) -> UnitGates:
        """Gate rows of the prefix at ``level`` on this worker's device (none for the full model)."""
        mask = prefix_mask(self.model, level, self.spec.dynamic.match_sparsity)
        if full_mask(mask):
            return UnitGates()
        device = next(self.model.parameters()).device
        gates = self.gates_for(mask)
        return UnitGates([r.to(device) for r in gates.heads], [r.to(device) for r in gates.neurons],
                         gates.layers.to(device))

    # --- stages -----------------------------------------------------------------------------------
    def prune(self) -> None:
        """Score once (shared), then rewire every layer by descending importance."""
        self.teacher = None      # DS distils from the full sub-network of each step, not a stored copy
        if self.algorithm.learns_during_training:
            scores = self.algorithm.score(self.model, None, None, None)
        else:
            scores = self.score(self.data.pool(self.languages["scoring"]), None)
        self.state.scores[SHARED] = scores
        self._rewire(scores)
        self.ddp = self._wrap(self.model)          # rewiring made new parameters: wrap them again
        if self.is_chief:
            print(f"[prune] rewired {len(Encoder(self.model).layers)} layers by {self.spec.pruning.algorithm} "
                  f"importance; levels {', '.join(level_key(s) for s in self.spec.dynamic.grid)}", flush=True)
        self.state.advance("recover")
        self.report()

    def recover(self) -> None:
        if self.spec.dynamic.steps > 0:
            self._train_every_size()
        self.state.advance("evaluate")
        self.report()

    def _loss_and_outputs(self, batch) -> tuple[torch.Tensor, dict]:
        """One forward (DDP allows one per backward): the task loss and the outputs distillation needs."""
        from raysparse.training.distill import forward_outputs

        outputs = forward_outputs(self.ddp, batch)
        return self.data.loss_of(outputs), outputs

    def _train_every_size(self) -> None:
        """The loop with one backward pass per sampled sub-network (sandwich rule), gradients accumulated."""
        from raysparse.training.distill import distillation_loss

        spec, dyn = self.spec, self.spec.dynamic
        rows = self.data.pool(self.languages["scoring"])
        level_gates = {level: self._level_gates(level) for level in dyn.grid}
        # a level whose kept units are a prefix of every layer trains at its own size (weights shared)
        level_slices = {level: _prefix_counts(gates) for level, gates in level_gates.items()}
        per_layer = dyn.sampling == "per-layer"
        shape = structure_of(self.model).shape
        smallest = smallest_counts(self.model, dyn.grid, dyn.match_sparsity, dyn.per_layer_max_sparsity) \
            if per_layer else None
        gates = UnitGates()
        last: dict[str, float] = {}   # loss of each sub-network trained at the latest step, largest first

        def passes(step: int) -> list:
            batch = self.data.batch(rows, step, spec.finetune.batch_size, salt=3000)
            teacher: dict = {}
            last.clear()

            def forward(name: str, chosen: UnitGates, sliced):
                def compute() -> torch.Tensor:
                    gates.heads, gates.neurons, gates.layers = chosen.heads, chosen.neurons, chosen.layers
                    with sliced():
                        loss, outputs = self._loss_and_outputs(batch)
                    if not teacher:     # the largest sub-network (level 0: the full model) teaches
                        teacher.update({k: v.detach() for k, v in outputs.items()
                                        if k != "loss" and isinstance(v, torch.Tensor)})
                    elif dyn.distill:
                        loss = distillation_loss(outputs, teacher, dyn.temperature, dyn.alpha, task_loss=loss)
                    last[name] = loss.item()
                    return loss
                return compute

            def at_level(level: float):
                counts = level_slices[level]
                return forward(level_key(level), UnitGates() if counts else level_gates[level],
                               (lambda: prefix_slices(self.model, *counts)) if counts else contextlib.nullcontext)

            def at_subnetwork(index: int, sub: Subnetwork):
                return forward(f"per-layer-{index}", UnitGates(), lambda: subnetwork_slices(self.model, sub))

            if not per_layer:
                return [at_level(level) for level in sample_levels(dyn.grid, dyn.samples_per_step, spec.seed, step)]
            ends = [dyn.grid[0], *([dyn.grid[-1]] if len(dyn.grid) > 1 else [])]
            sampled = sample_subnetworks(shape, smallest, dyn.samples_per_step, spec.seed, step, dyn.drop_layers_max,
                                         dyn.per_layer_spread)
            return [at_level(ends[0]), *(at_subnetwork(i, sub) for i, sub in enumerate(sampled)),
                    *(at_level(level) for level in ends[1:])]

        def log_ends(step: int, loss: float) -> None:
            if self.is_chief:
                names = list(last)
                self.log.metrics({"dynamic/loss/largest": last[names[0]], "dynamic/loss/smallest": last[names[-1]]},
                                 step=step)

        optimizer, scheduler = self.optimizer(dyn.learning_rate, dyn.steps, 0.0)
        progress = Progress("dynamic", dyn.steps, self.is_chief, extra=lambda step: f"(levels {', '.join(last)})")
        with attach_gates(self.model, gates):
            self.fit("dynamic", passes, optimizer, scheduler, dyn.steps,
                     [Every(10, log_ends, dyn.steps), *([] if dyn.dropout else [WithoutDropout(self.model)])],
                     progress=progress)

    def evaluate(self) -> None:
        """Rank 0: every level, every language, under the level's prefix mask."""
        if self.is_chief:
            from raysparse.training.evaluate import evaluate

            spec, dyn = self.spec, self.spec.dynamic
            languages = self.languages["evaluation"]
            headline = nearest_level(dyn.grid, spec.pruning.sparsity)
            self.model.eval()
            for level in dyn.grid:
                mask = prefix_mask(self.model, level, dyn.match_sparsity)
                result = evaluate(self.model, self.tokenizer, self.task.name, languages,
                                  masks={lang: mask for lang in languages}, verbose=False,
                                  **evaluation_options(spec))
                self.state.metrics.update({f"level/{level_key(level)}/{k}": v for k, v in result.metrics.items()})
                self.log.metrics({f"curve/{k}": v for k, v in result.metrics.items()}, step=level_step(level))
                if level == headline:
                    self.state.metrics.update(result.metrics)
                    self.log.metrics(result.metrics)
                    self.state.sources.update({f"eval.{k}": v for k, v in result.sources.items()})
                print(f"[evaluate] level {level_key(level)}: {self.task.primary_metric} avg {result.average:.3f}, "
                      f"worst {result.worst:.3f}", flush=True)
            self.state.metrics["dynamic/headline_level"] = headline
            self.state.sources.update({f"train.{k}": v for k, v in self.data.sources.items()})
        self.state.advance("finalize")
        self.report()

    def finalize(self) -> None:
        if self.is_chief:
            self.state.metrics.update(finalize_curve(self))
        self.state.advance("done")
        self.report(checkpoint=True)


def checkpoint_extra(spec, task: str, languages: list[str]) -> dict:
    """What a DS checkpoint records of its run (sidecar ``extra``): the task and run, and how it evaluated
    (languages, the split's seed and train fraction, rows), so a sub-network search scores on the same
    held-out rows by default."""
    return {"task": task, "run": spec.name,
            "evaluation": {"languages": list(languages), "seed": spec.seed, "train_fraction": spec.data.train_fraction,
                           "max_examples": spec.data.max_eval_examples,
                           "skip_examples": spec.data.skip_eval_examples, "max_length": spec.data.max_length,
                           "stride": spec.data.doc_stride}}


def finalize_curve(run: DynamicRun) -> dict:
    """Rank 0: slice every level physically, measure it, time it; log the curve, its plot and the DS checkpoint."""
    from raysparse.efficiency import measure_latency, median_speedups

    spec, dyn, log = run.spec, run.spec.dynamic, run.log
    length = spec.efficiency.sequence_length
    run.model.eval()
    shrunk = {level: shrink_to(copy_sharing_embeddings(run.model), level, dyn.match_sparsity).eval()
              for level in dyn.grid}
    sizes = {level: measure(model.encoder, length) for level, model in shrunk.items()}
    per_level: dict[float, dict[str, float]] = {}
    for level, size in sizes.items():
        per_level[level] = {"encoder_sparsity": size.encoder_sparsity, "params/total": size.total_params,
                            "params/encoder": size.encoder_params, "params/embedding": size.embedding_params,
                            "bytes": size.bytes, "flops": size.flops_per_sequence}
    if spec.efficiency.latency:
        results = measure_latency({level_key(level): model.encoder for level, model in shrunk.items()},
                                  batch_sizes=tuple(spec.efficiency.batch_sizes), sequence_length=length,
                                  warmup=spec.efficiency.warmup, repeats=spec.efficiency.repeats,
                                  threads=spec.efficiency.threads)
        names = {level_key(level): level for level in dyn.grid}
        for result in results:
            per_level[names[result.name]][f"latency/b{result.batch_size}_ms"] = result.median_ms
        for (name, batch), speedup in median_speedups(results, level_key(dyn.grid[0])).items():
            per_level[names[name]][f"speedup/b{batch}"] = speedup
    metrics: dict[str, float] = {}
    for level, values in per_level.items():
        metrics.update({f"level/{level_key(level)}/{k}": v for k, v in values.items()})
        log.metrics({f"curve/{k}": v for k, v in values.items()}, step=level_step(level))

    headline, dense = nearest_level(dyn.grid, spec.pruning.sparsity), dyn.grid[0]
    top = per_level[headline]
    plain = {k: top[k] for k in ("encoder_sparsity", "params/total", "params/encoder", "params/embedding", "bytes",
                                 "flops")}
    plain.update({"dense/params/total": per_level[dense]["params/total"], "dense/bytes": per_level[dense]["bytes"],
                  "dense/flops": per_level[dense]["flops"]})
    for batch in spec.efficiency.batch_sizes if spec.efficiency.latency else []:
        plain[f"latency/dense/b{batch}_ms"] = per_level[dense][f"latency/b{batch}_ms"]
        plain[f"latency/pruned/b{batch}_ms"] = top[f"latency/b{batch}_ms"]
        plain[f"speedup/b{batch}"] = top[f"speedup/b{batch}"]
    metrics.update(plain)
    log.metrics({**plain, **stage_costs(run)})

    everything = {**run.state.metrics, **metrics}
    task, metric = run.task.name, run.task.primary_metric
    table = curve_table(everything, dyn.grid, task, metric, run.languages["evaluation"])
    print(table, flush=True)
    with tempfile.TemporaryDirectory(prefix="raysparse-dynamic-") as folder:
        folder = Path(folder)
        (folder / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(), sort_keys=False))
        (folder / "sources.json").write_text(json.dumps(run.state.sources, indent=1))
        (folder / "sizes.json").write_text(json.dumps({level_key(s): size.as_dict() for s, size in sizes.items()},
                                                      indent=1))
        curve = split_curve(everything, dyn.grid)
        (folder / "curve.json").write_text(json.dumps({"grid": dyn.grid, "headline_level": headline,
                                                       "levels": {level_key(s): curve[s] for s in dyn.grid}}, indent=1))
        (folder / "curve.txt").write_text(table + "\n")
        for level in dyn.grid:
            prefix_mask(run.model, level, dyn.match_sparsity).save(folder / f"mask-{level_key(level)}.json")
        for key, scores in run.state.scores.items():
            scores.save(folder / f"scores-{key}.safetensors")
        log.artifact(folder, "results")
        log.figure(curve_plot(everything, dyn.grid, task, metric), "results/curve.png")
        if spec.tracking.log_models != "none" and log.active:
            info = checkpoint_extra(spec, task, run.languages["evaluation"])
            log.artifact(save_dynamic(run.model, folder / "model" / "dynamic", run.tokenizer, grid=dyn.grid,
                                      extra=info), "model/dynamic")
            for level in dyn.grid if spec.tracking.log_models == "all" else []:
                out = save_dynamic(shrunk[level], folder / "model" / f"level-{level_key(level)}", run.tokenizer,
                                   extra=info)
                log.artifact(out, f"model/level-{level_key(level)}")
    return metrics


__all__ = ["DynamicRun", "curve_plot", "curve_table", "level_key", "level_step", "nearest_level", "sample_levels",
           "checkpoint_extra", "sample_subnetworks", "smallest_counts", "split_curve"]
