"""Run a search: Ray Tune + OptunaSearch over trials, one MLflow parent run, a Pareto front.

Single objective: OptunaSearch (TPE) with optional ASHA early stopping on the stage
index. Several objectives: Optuna's multi-objective samplers and no scheduler. The
Tune experiment lives under ``storage/<name>``; ``resume=True`` restores it after the
driver died (finished trials are not rerun; unfinished ones continue their checkpoints).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from raysparse.config import load_spec, parse
from raysparse.errors import RaysparseError
from raysparse.metric_keys import AGGREGATES, AVG, languages_in, metric_key, parse_metric_key, task_keys, worst_of
from raysparse.search.pareto import format_table, pareto_front, pareto_plot, quality_vs_sparsity_plot
from raysparse.search.space import define_by_run
from raysparse.search.spec import SearchSpec, check_search, preflight_trials
from raysparse.search.trial import one_process
from raysparse.tracking.runs import RunLogger, open_run, spec_key

TRIAL_DRIVER_CPU = 0.25   # the trial function only waits on its TorchTrainer


@dataclass
class SearchResult:
    name: str
    rows: list[dict]
    front: list[dict]
    objectives: list[tuple[str, str]]
    parent_run_id: str
    tracking_uri: str
    storage: str
    columns: list[str] = field(default_factory=list)

    def table(self) -> str:
        return format_table(self.rows, self.columns)

    def pareto_table(self) -> str:
        return format_table(self.front, self.columns)

    def language_table(self, task: str) -> str:
        """Quality per language of every finished trial (the task's first metric)."""
        keys = sorted({k.key for k in task_keys([k for r in self.rows for k in r], task)})
        if not keys:
            return "(no per-language metrics)"
        metric = parse_metric_key(keys[0]).metric
        languages = languages_in(keys, task, metric)
        columns = ["trial", "algorithm", "setting", *languages, *AGGREGATES]
        rows = [{"trial": r["trial"], "algorithm": r.get("algorithm"), "setting": r.get("setting"),
                 **{c: r.get(metric_key(task, c, metric)) for c in [*languages, *AGGREGATES]}}
                for r in self.rows if r["status"] == "done"]
        return format_table(rows, columns)


def objective_aware(optuna_search: type) -> type:
    """OptunaSearch that lets a single objective be absent from progress reports.

    Trials report stages (loss, costs) before their objectives exist; with one objective
    OptunaSearch reads it from every intermediate result (for pruning), so those reports
    would end the search with a KeyError.
    """

    class ObjectiveAwareOptunaSearch(optuna_search):
        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if isinstance(self.metric, str) and self.metric not in result:
                return
            super().on_trial_result(trial_id, result)

    return ObjectiveAwareOptunaSearch


def as_search_spec(spec: SearchSpec | dict | str | Path) -> SearchSpec:
    if isinstance(spec, SearchSpec):
        return parse(SearchSpec, spec.model_dump())
    if isinstance(spec, dict):
        return parse(SearchSpec, spec)
    return load_spec(spec, SearchSpec)


def _sampler(spec: SearchSpec, multi: bool):
    import optuna

    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed, multivariate=True, group=True,
                                      n_startup_trials=max(2, min(10, spec.num_samples // 3)))


def trial_resources(base) -> dict[str, float]:
    """What Tune reserves for a trial's own process: the whole trial when it runs in one process,
    else only its driver (the TorchTrainer reserves its workers)."""
    if one_process(base):
        return {"cpu": base.resources.cpus_per_worker, "gpu": 1 if base.resources.use_gpu else 0}
    return {"cpu": TRIAL_DRIVER_CPU}


def check_resources(spec: SearchSpec) -> None:
    """A trial must fit the cluster; say so before any trial starts."""
    import ray

    base = spec.base_spec()
    needed = trial_resources(base)["cpu"] + (0 if one_process(base) else
                                             base.resources.num_workers * base.resources.cpus_per_worker)
    available = ray.cluster_resources().get("CPU", 0)
    if needed > available:
        raise RaysparseError(f"base.resources: a trial needs {needed:g} CPUs ({base.resources.num_workers} workers x "
                             f"{base.resources.cpus_per_worker:g} + its driver) but the cluster has {available:g}")
    if base.resources.use_gpu and ray.cluster_resources().get("GPU", 0) < base.resources.num_workers:
        raise RaysparseError(f"base.resources.use_gpu: {base.resources.num_workers} GPUs needed, cluster has "
                             f"{ray.cluster_resources().get('GPU', 0):g}")


def _row(result) -> dict:
    metrics = result.metrics or {}
    config = result.config or {}
    row = {"trial": metrics.get("trial_id", "?"),
           "algorithm": config.get("pruning.algorithm", ""), "setting": config.get("pruning.setting", ""),
           "status": "error" if result.error else "done"}
    row.update({k: v for k, v in config.items() if not k.startswith("__")})
    row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return row


def search(spec: SearchSpec | dict | str | Path, resume: bool = False, address: str | None = None,
           verbose: bool = True) -> SearchResult:
    """Run (or resume) a search; returns every trial's row and the Pareto front."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from raysparse.runner import ensure_ray, preflight, storage_join, storage_path
    from raysparse.search.trial import run_trial
    from raysparse.tracking.server import resolve_tracking_uri

    spec = as_search_spec(spec)
    base = check_search(spec)
    preflight(base)
    preflight_trials(spec, base)
    objectives = spec.resolved_objectives()
    metrics, modes = [o.metric for o in objectives], [o.mode for o in objectives]
    key = spec_key(spec.model_dump(exclude={"num_samples", "max_concurrent"}))
    storage = storage_path(spec.storage or base.storage)
    experiment_name = f"{spec.name}-{key[:8]}"   # a changed spec is a new search; the same spec continues
    experiment_path = storage_join(storage, experiment_name)   # a folder, or a URI (s3://...) on clusters
    restorable = tune.Tuner.can_restore(experiment_path)
    if resume and not restorable:
        raise RaysparseError(f"search: nothing to resume at {experiment_path} (run the search without --resume first)")
    # The same search again continues (or, when finished, just reports) instead of starting over.
    resume = resume or restorable
    tracking_uri = resolve_tracking_uri(spec.tracking.uri)
    parent_run_id, resumed = open_run(tracking_uri, spec.tracking.experiment, key, spec.name,
                                      params={"search": {k: v for k, v in spec.model_dump().items() if k != "base"},
                                              "base": spec.base},
                                      tags={"raysparse.kind": "search", "raysparse.search": spec.name})
    # Runs report progress (stage, loss) before their objectives exist; objectives arrive
    # with the evaluate and finalize stages, so Tune must not demand them in every result.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    ensure_ray(address)
    check_resources(spec)
    if verbose:
        print(f"search {spec.name}: {'resuming' if resume else 'starting'} {spec.num_samples} trials, "
              f"{spec.max_concurrent} at a time; objectives {', '.join(f'{m} ({o})' for m, o in zip(metrics, modes))}; "
              f"MLflow {tracking_uri} parent run {parent_run_id}", flush=True)
    context = {"name": spec.name, "key": key, "tracking_uri": tracking_uri, "experiment": spec.tracking.experiment,
               "parent_run_id": parent_run_id, "storage": storage}
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base.model_dump(), search=context),
                                    trial_resources(base))
    if resume:
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        multi = len(metrics) > 1
        searcher = objective_aware(OptunaSearch)(space=define_by_run(spec.space), metric=metrics if multi else metrics[0],
                                mode=modes if multi else modes[0], sampler=_sampler(spec, multi),
                                points_to_evaluate=spec.trials or None, seed=spec.seed)
        scheduler = None
        if spec.scheduler.type == "asha":
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(time_attr="stage_index", metric=metrics[0], mode=modes[0], max_t=5,
                                      grace_period=spec.scheduler.grace_period,
                                      reduction_factor=spec.scheduler.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=spec.num_samples,
                                        max_concurrent_trials=spec.max_concurrent),
            run_config=tune.RunConfig(
                name=experiment_name, storage_path=storage, verbose=1,
                # one-process trials retry in Tune as TorchTrainer trials retry in Train
                failure_config=tune.FailureConfig(max_failures=max(1, base.resources.max_failures)
                                                  if one_process(base) else 1),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
        )
    try:
        grid = tuner.fit()
    except Exception as exc:
        RunLogger(tracking_uri, parent_run_id).finish("FAILED")
        raise RaysparseError(f"search {spec.name} failed: {_last_line(exc)} (resume with --resume)") from exc
    rows = [_row(result) for result in grid]
    front = pareto_front([r for r in rows if r["status"] == "done"], metrics, modes)
    columns = _columns(spec, metrics, rows)
    result = SearchResult(spec.name, rows, front, list(zip(metrics, modes)), parent_run_id, tracking_uri, storage,
                          columns)
    _log_search(result, base.data.task)
    if verbose:
        print(f"\nall trials ({len(rows)}):\n{result.table()}\n\nPareto front ({len(front)}):\n{result.pareto_table()}")
        print(f"\nper language ({metrics[0].split('/')[-1] if '/' in metrics[0] else metrics[0]}):\n"
              f"{result.language_table(base.data.task)}")
        print(f"\nOpen the results in the MLflow UI: {tracking_uri}/#/experiments/"
              f"{_experiment_id(tracking_uri, spec.tracking.experiment)}   (or run: raysparse ui)")
    return result


def _columns(spec: SearchSpec, metrics: list[str], rows: list[dict]) -> list[str]:
    wanted = ["trial", "algorithm", "setting", *[p for p in spec.space if p not in ("pruning.algorithm",
                                                                                   "pruning.setting")],
              "encoder_sparsity", *metrics, "status"]
    present = {k for r in rows for k in r}
    return [c for c in dict.fromkeys(wanted) if c in present]


def _log_search(result: SearchResult, task: str) -> None:
    """Pareto table and plots on the parent run, so the MLflow UI shows the search's outcome."""
    log = RunLogger(result.tracking_uri, result.parent_run_id)
    metrics = [m for m, _ in result.objectives]
    log.text(result.table(), "search/trials.txt")
    log.text(result.pareto_table(), "search/pareto.txt")
    log.json({"objectives": result.objectives, "front": result.front, "trials": result.rows}, "search/pareto.json")
    log.metrics({"trials": len(result.rows), "pareto_size": len(result.front),
                 "failed_trials": sum(r["status"] != "done" for r in result.rows)})
    done = [r for r in result.rows if r["status"] == "done"]
    if len(metrics) >= 2 and done:
        log.figure(pareto_plot(done, result.front, metrics[1], metrics[0]), "search/pareto.png")
    quality = next((m for m in metrics if (parsed := parse_metric_key(m)) is not None and parsed.task == task
                    and parsed.language == AVG), metrics[0])
    worst = worst_of(quality)
    if done:
        log.figure(quality_vs_sparsity_plot(done, quality, worst), "search/quality_vs_sparsity.png")
    log.finish("FINISHED")


__all__ = ["SearchResult", "as_search_spec", "search"]


def _experiment_id(uri: str, name: str) -> str:
    from raysparse.tracking.runs import client, experiment_id

    return experiment_id(client(uri), name)


def _last_line(exc: BaseException) -> str:
    """Tune wraps errors in tracebacks; their last line says what happened."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
