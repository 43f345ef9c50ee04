"""Dynamic Sparsification from the driver: one run, the whole quality-vs-sparsity curve.

- :func:`run_dynamic`: a spec with ``pruning.schedule: dynamic`` on Ray Train (what
  ``raysparse run`` does for such a spec), returned as a curve.
- :func:`dynamic_trainable`: the same as a Ray Tune function trainable (Train V2
  pattern: it fits a ``TorchTrainer`` whose reports reach Tune through
  ``TuneReportCallback``); the trial's result holds every level (``level/<s>/...``).
- :func:`compare_with_separate_runs`: the same grid pruned as separate runs (fine-tune,
  prune, recover at each level), side by side with DS; ``raysparse run SPEC --compare``.
- :func:`shrink_checkpoint`: one size (a uniform level, or a sub-network with a width per layer
  that a sub-network search found) sliced out of a DS checkpoint; ``raysparse shrink``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysparse.config import RunSpec, parse, with_schedule
from raysparse.errors import RaysparseError
from raysparse.metric_keys import AVG, avg_key, metric_key
from raysparse.runner import RunResult, as_spec
from raysparse.training.dynamic import curve_plot, curve_table, level_key, split_curve


def dynamic_spec(spec: RunSpec | dict | str | Path) -> RunSpec:
    """``spec`` validated, with ``pruning.schedule: dynamic``."""
    data = as_spec(spec).model_dump()
    data["pruning"] = with_schedule(data["pruning"], "dynamic")
    return parse(RunSpec, data)


@dataclass
class DynamicResult:
    """The curve of one DS run: ``curve[level]`` holds that level's keys (``<task>/<lang>/<metric>``,
    ``encoder_sparsity``, ``params/total``, ``bytes``, ``latency/b1_ms``, ...)."""

    spec: RunSpec
    run: RunResult
    curve: dict[float, dict[str, float]]
    seconds: float = 0.0

    @property
    def grid(self) -> list[float]:
        return list(self.spec.dynamic.grid)

    @property
    def task(self) -> str:
        return self.spec.data.task

    @property
    def metric(self) -> str:
        from raysparse.data.tasks import get_task

        return get_task(self.task).primary_metric

    def quality(self, level: float, language: str = AVG) -> float:
        return self.curve[level][metric_key(self.task, language, self.metric)]

    def table(self) -> str:
        return curve_table(self.run.metrics, self.grid, self.task, self.metric, self.run.languages.get("evaluation"))

    def plot(self, path: str | Path) -> Path:
        figure = curve_plot(self.run.metrics, self.grid, self.task, self.metric)
        figure.savefig(path, dpi=120)
        return Path(path)


def run_dynamic(spec: RunSpec | dict | str | Path, address: str | None = None, verbose: bool = True) -> DynamicResult:
    """Fine-tune, score, rewire, train every size at once, evaluate every level; tracked in MLflow.

    Resumes like any run (same spec -> same MLflow run and checkpoints).
    """
    from raysparse.runner import run

    spec = dynamic_spec(spec)
    started = time.time()
    result = run(spec, address=address, verbose=verbose)
    return DynamicResult(spec, result, split_curve(result.metrics, spec.dynamic.grid), time.time() - started)


def _apply_overrides(spec: dict, overrides: dict[str, Any]) -> dict:
    for path, value in overrides.items():
        section = spec
        *parents, last = path.split(".")
        for part in parents:
            section = section.setdefault(part, {})
        section[last] = value
    return spec


def dynamic_trainable(config: dict) -> None:
    """A Ray Tune function trainable: one run (a DS run for a dynamic spec) on Ray Train.

    ``config``: ``spec`` (a RunSpec dict), optional ``tracking_uri`` and ``parent_run_id``
    (MLflow), and any dotted spec paths to override (``{"dynamic.steps": 50}``), so a
    Tune ``param_space`` can vary them. Every Train report reaches Tune; the last holds
    the whole curve (``level/<s>/<task>/<lang>/<metric>``, ``level/<s>/params/total``, ...).
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    from raysparse.runner import fit_tracked, preflight, run_params, run_tags, storage_path, trainer_for
    from raysparse.tracking.runs import open_run, spec_key
    from raysparse.tracking.server import resolve_tracking_uri

    data = json.loads(json.dumps(config.get("spec") or {}))
    overrides = {k: v for k, v in config.items() if k not in ("spec", "tracking_uri", "parent_run_id")}
    spec = parse(RunSpec, _apply_overrides(data, overrides))
    languages = preflight(spec)
    key = spec_key(spec.model_dump())
    uri = resolve_tracking_uri(config.get("tracking_uri") or spec.tracking.uri)
    run_id, _ = open_run(uri, spec.tracking.experiment, key, spec.name, params=run_params(spec, languages),
                         tags=run_tags(spec, "trial"), parent_run_id=config.get("parent_run_id"))
    trainer = trainer_for(spec, languages, uri, run_id, storage_path(spec.storage), f"{spec.name}-{key}",
                          callbacks=[TuneReportCallback()])
    fit_tracked(trainer, uri, run_id, f"run {spec.name}", error=RuntimeError)


# --- comparison: the same grid as separate runs ---------------------------------------------------------


def separate_spec(spec: RunSpec, level: float) -> RunSpec:
    """The normal run at ``level`` that matches a DS spec: same data, fine-tuning and steps;
    one-shot pruning to ``level``; recovery as long as DS training (distilled when DS distils, with
    dropout when DS keeps it)."""
    data = spec.model_dump()
    dyn = spec.dynamic
    data["name"] = f"{spec.name}-separate-{level_key(level)}"
    data["pruning"] = {**with_schedule(data["pruning"], "one-shot"), "sparsity": level}
    data["recovery"].update({"steps": dyn.steps, "learning_rate": dyn.learning_rate, "dropout": dyn.dropout})
    data["recovery"]["distillation"].update({"enabled": dyn.distill, "temperature": dyn.temperature,
                                             "alpha": dyn.alpha})
    return parse(RunSpec, data)


@dataclass
class Comparison:
    """DS (one run) against separate runs at every level of the same grid."""

    task: str
    metric: str
    grid: list[float]
    dynamic: DynamicResult
    separate: dict[float, RunResult]
    separate_seconds: dict[float, float] = field(default_factory=dict)

    def quality(self, level: float, language: str = AVG) -> tuple[float, float]:
        """(DS, separate) quality at ``level``."""
        key = metric_key(self.task, language, self.metric)
        return self.dynamic.curve[level].get(key, float("nan")), self.separate[level].metrics.get(key, float("nan"))

    @property
    def time_ratio(self) -> float:
        """Wall time of the DS run / the sum of the separate runs."""
        return self.dynamic.seconds / max(sum(self.separate_seconds.values()), 1e-9)

    def mean_difference(self, max_level: float = 0.5) -> float:
        """Mean of (separate - DS) avg quality in points over levels <= ``max_level`` (positive: DS is worse)."""
        diffs = [100 * (sep - ds) for level in self.grid if level <= max_level + 1e-9
                 for ds, sep in [self.quality(level)]]
        return sum(diffs) / len(diffs) if diffs else float("nan")

    def rows(self) -> list[dict]:
        out = []
        for level in self.grid:
            ds, sep = self.quality(level)
            out.append({"level": level,
                        "ds_encoder_sparsity": self.dynamic.curve[level].get("encoder_sparsity"),
                        "separate_encoder_sparsity": self.separate[level].metrics.get("encoder_sparsity"),
                        "ds": ds, "separate": sep, "difference_points": 100 * (ds - sep),
                        "separate_seconds": self.separate_seconds.get(level)})
        return out

    def table(self) -> str:
        lines = [f"{self.task} avg {self.metric}: one DS run vs a separate run per level",
                 f"{'level':>5}  {'DS sparsity':>11}  {'sep sparsity':>12}  {'DS':>6}  {'separate':>8}  "
                 f"{'DS-sep (pts)':>12}  {'sep seconds':>11}"]
        def number(value) -> float:
            return float("nan") if value is None else value

        for row in self.rows():
            lines.append(f"{level_key(row['level']):>5}  {number(row['ds_encoder_sparsity']):11.3f}  "
                         f"{number(row['separate_encoder_sparsity']):12.3f}  {row['ds']:6.3f}  "
                         f"{row['separate']:8.3f}  {row['difference_points']:+12.1f}  "
                         f"{number(row['separate_seconds']):11.0f}")
        total = sum(self.separate_seconds.values())
        lines.append(f"wall time: DS {self.dynamic.seconds:.0f}s, separate runs {total:.0f}s in all, "
                     f"ratio {self.time_ratio:.3f}")
        lines.append(f"mean quality gap over levels <= 0.5 (separate - DS): {self.mean_difference():+.2f} points")
        return "\n".join(lines)

    def plot(self, path: str | Path | None = None):
        """Both curves (avg, and each language thin) against encoder sparsity."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 4))
        rows = self.rows()
        axis.plot([r["ds_encoder_sparsity"] for r in rows], [r["ds"] for r in rows], "o-", lw=2.5, color="#4c72b0",
                  label="DS (one run)")
        axis.plot([r["separate_encoder_sparsity"] for r in rows], [r["separate"] for r in rows], "s--", lw=2,
                  color="#c44e52", label="separate runs")
        axis.set_xlabel("encoder sparsity")
        axis.set_ylabel(f"avg {self.metric}")
        axis.set_title(f"{self.task}: Dynamic Sparsification vs separate runs")
        axis.legend()
        figure.tight_layout()
        if path is not None:
            figure.savefig(path, dpi=120)
        return figure

    def to_dict(self) -> dict:
        return {"task": self.task, "metric": self.metric, "grid": self.grid, "rows": self.rows(),
                "dynamic_seconds": self.dynamic.seconds, "time_ratio": self.time_ratio,
                "mean_difference_points": self.mean_difference()}


def compare_with_separate_runs(spec: RunSpec | dict | str | Path, address: str | None = None,
                               levels: list[float] | None = None, verbose: bool = True,
                               dynamic: DynamicResult | None = None) -> Comparison:
    """One DS run and one separate run (fine-tune, prune, recover) per level of its grid.

    Every run is a full run on Ray Train, tracked in MLflow; the comparison (table, plot,
    JSON) is also logged to the DS run under ``compare/``.
    """
    from raysparse.data.tasks import get_task
    from raysparse.runner import run
    from raysparse.tracking.runs import RunLogger

    spec = dynamic_spec(spec)
    grid = list(spec.dynamic.grid)
    levels = grid if levels is None else sorted(levels)
    unknown = [level for level in levels if level not in grid]
    if unknown:
        raise RaysparseError(f"compare.levels: {unknown} not in dynamic.grid {grid}")
    if dynamic is None:
        dynamic = run_dynamic(spec, address=address, verbose=verbose)
    separate, seconds = {}, {}
    for level in levels:
        started = time.time()
        separate[level] = run(separate_spec(spec, level), address=address, verbose=False)
        seconds[level] = time.time() - started
        if verbose:
            value = separate[level].metrics.get(avg_key(spec.data.task, get_task(spec.data.task).primary_metric))
            print(f"[compare] separate run at {level_key(level)}: avg {value:.3f} ({seconds[level]:.0f}s)", flush=True)
    task = get_task(spec.data.task)
    comparison = Comparison(task.name, task.primary_metric, levels, dynamic, separate, seconds)
    log = RunLogger(dynamic.run.tracking_uri, dynamic.run.run_id)
    if log.active:
        log.text(comparison.table(), "compare/table.txt")
        log.json(comparison.to_dict(), "compare/comparison.json")
        log.figure(comparison.plot(), "compare/curve.png")
        log.metrics({"compare/time_ratio": comparison.time_ratio,
                     "compare/mean_difference_points": comparison.mean_difference()})
    if verbose:
        print(comparison.table())
    return comparison


# --- one size out of a DS checkpoint -----------------------------------------------------------------


@dataclass
class ShrinkResult:
    out_dir: Path
    full: Any    # raysparse.structure.Size
    shrunk: Any
    sparsity: float | None     # the uniform level sliced, or None for a sub-network (``subnetwork``)
    subnetwork: Any = None     # raysparse.structure.Subnetwork

    def table(self) -> str:
        from raysparse.standalone import _millions

        rows = [("encoder sparsity", f"{self.full.encoder_sparsity:.3f}", f"{self.shrunk.encoder_sparsity:.3f}"),
                ("parameters", _millions(self.full.total_params), _millions(self.shrunk.total_params)),
                ("  encoder", _millions(self.full.encoder_params), _millions(self.shrunk.encoder_params)),
                ("heads / neurons", f"{self.full.heads} / {self.full.neurons}",
                 f"{self.shrunk.heads} / {self.shrunk.neurons}"),
                ("bytes", f"{self.full.bytes / 1e6:.1f} MB", f"{self.shrunk.bytes / 1e6:.1f} MB"),
                (f"GFLOPs/seq@{self.full.sequence_length}", f"{self.full.flops_per_sequence / 1e9:.2f}",
                 f"{self.shrunk.flops_per_sequence / 1e9:.2f}")]
        width = max(len(r[0]) for r in rows)
        label = "sub-network" if self.sparsity is None else f"level {self.sparsity:g}"
        lines = [f"{'':{width}}  {'checkpoint':>12}  {label:>12}"]
        lines += [f"{name:{width}}  {a:>12}  {b:>12}" for name, a, b in rows]
        lines.append(f"\nsaved to {self.out_dir} (load with raysparse.load_model('{self.out_dir}'))")
        return "\n".join(lines)


def shrink_checkpoint(model_dir: str | Path, sparsity: float | None, out: str | Path,
                      match_sparsity: bool | None = None, *, config: str | Path | None = None,
                      trial: int | None = None) -> ShrinkResult:
    """Slice one sub-network out of a DS checkpoint and save it (tokenizer included): the uniform prefix
    at ``sparsity``, or the sub-network of ``config`` (a point JSON, or with ``trial`` the
    ``subnetworks.json`` of a sub-network search), exactly one of the two."""
    from raysparse.paths import check_output
    from raysparse.structure import load_dynamic, measure, read_subnetwork, shrink_subnetwork, shrink_to
    from raysparse.structure.rewire import save_dynamic
    from raysparse.structure.subnetwork import naming

    check_output(out, str(model_dir))   # slicing into the checkpoint itself would lose every larger size
    if (sparsity is None) == (config is None):
        raise RaysparseError("shrink: expected --sparsity (a uniform level) or --config (a sub-network JSON), "
                             "exactly one of the two")
    if trial is not None and config is None:
        raise RaysparseError("shrink.trial: --trial picks a candidate of --config FILE (a search's subnetworks.json)")
    if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, (int, float))
                                 or not 0.0 <= sparsity < 1.0):
        raise RaysparseError(f"shrink.sparsity: expected a number in [0, 1), got {sparsity!r}")
    subnetwork = read_subnetwork(config, trial) if config is not None else None
    model = load_dynamic(model_dir)
    full = measure(model)
    if subnetwork is None:
        shrink_to(model, sparsity, match_sparsity)
    else:
        with naming(str(config) if trial is None else f"{config}, trial {trial}"):
            shrink_subnetwork(model, subnetwork)
    tokenizer = None
    if any((Path(model_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        from raysparse.models.sources import load_tokenizer

        tokenizer = load_tokenizer(str(model_dir))
    out_dir = save_dynamic(model, out, tokenizer)
    return ShrinkResult(Path(out_dir), full, measure(model), None if sparsity is None else float(sparsity), subnetwork)


__all__ = ["Comparison", "DynamicResult", "ShrinkResult", "compare_with_separate_runs", "dynamic_spec",
           "dynamic_trainable", "run_dynamic", "separate_spec", "shrink_checkpoint"]
