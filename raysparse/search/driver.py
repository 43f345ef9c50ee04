"""Run a search: Ray Tune + OptunaSearch over trials, one MLflow parent run, a Pareto front.

Single objective: OptunaSearch (TPE) with optional ASHA early stopping on quality after
the same number of recovery steps. Several objectives: Optuna's multi-objective samplers
and no scheduler. Every trial is marked with who suggested it (:mod:`raysparse.search.samplers`). The
Tune experiment lives under ``storage/<name>``; ``resume=True`` restores it after the
driver died (finished trials are not rerun; unfinished ones continue their checkpoints).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from raysparse.config import load_spec, parse
from raysparse.errors import RaysparseError, last_line
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
    space: list[str] = field(default_factory=list)

    def ui_url(self) -> str:
        """The MLflow UI's runs table of this search's trials, its objectives and space in columns."""
        return trials_url(self.tracking_uri, self.parent_run_id, self.name, self.objectives, self.space)

    def table(self) -> str:
        return format_table(self.rows, self.columns)

    def pareto_table(self) -> str:
        return format_table(self.front, self.columns)

    def language_table(self, task: str) -> str:
        """Quality per language of every finished trial of ``task`` (its first metric)."""
        keys = sorted({k.key for k in task_keys([k for r in self.rows for k in r], task)})
        if not keys:
            return "(no per-language metrics)"
        metric = parse_metric_key(keys[0]).metric
        languages = languages_in(keys, task, metric)
        columns = ["trial", "algorithm", "setting", *languages, *AGGREGATES]
        rows = [{"trial": r["trial"], "algorithm": r.get("algorithm"), "setting": r.get("setting"),
                 **{c: r.get(metric_key(task, c, metric)) for c in [*languages, *AGGREGATES]}}
                for r in self.rows if r["status"] == "done" and r.get("data.task", task) == task]
        return f"per language ({task} {metric}):\n" + format_table(rows, columns)

    def language_tables(self, default_task: str) -> str:
        """:meth:`language_table` of every task the trials ran (a grid study may hold several)."""
        tasks = list(dict.fromkeys(r.get("data.task") or default_task for r in self.rows)) or [default_task]
        return "\n\n".join(self.language_table(task) for task in tasks)


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


def trial_resources(base) -> dict[str, float]:
    """What Tune reserves for a trial's own process: the whole trial when it runs in one process,
    else only its driver (the TorchTrainer reserves its workers)."""
    if one_process(base):
        return {"cpu": base.resources.cpus_per_worker, "gpu": 1 if base.resources.use_gpu else 0}
    return {"cpu": TRIAL_DRIVER_CPU}


def trial_needs(base) -> tuple[float, float]:
    """(CPUs, GPUs) one trial holds: its own process and, unless it runs in one process, its workers."""
    from raysparse.runner import run_needs

    own = trial_resources(base)
    if one_process(base):
        return own["cpu"], own["gpu"]
    cpus, gpus = run_needs(base.resources)
    return own["cpu"] + cpus, gpus


def concurrency(spec: SearchSpec, needs: tuple[float, float], capacity: dict[str, float], where: str,
                warn: bool = True) -> int:
    """How many trials run at once: ``max_concurrent``, or fewer where the cluster holds fewer (a
    one-line warning on stderr says how many)."""
    cpus, gpus = needs
    fit = int(capacity["CPU"] // cpus) if cpus else spec.max_concurrent
    if gpus:
        fit = min(fit, int(capacity["GPU"] // gpus))
    wanted = min(spec.max_concurrent, spec.num_samples)
    if fit < wanted and warn:
        print(f"warning: max_concurrent: {spec.max_concurrent} trials at a time asked, but a trial needs {cpus:g} "
              f"CPUs and {where} has {capacity['CPU']:g}: {fit} will run at a time", file=sys.stderr, flush=True)
    return min(wanted, fit)


def _row(result, suggested: str = "?") -> dict:
    """A trial's line: its values, metrics, who suggested it, and how it ended (done, error, or
    stopped early by ASHA: its last report is an evaluation during recovery)."""
    metrics = result.metrics or {}
    config = result.config or {}
    status = "error" if result.error else "stopped" if "recovery_step" in metrics else "done"
    row = {"trial": metrics.get("trial_id", "?"),
           "algorithm": config.get("pruning.algorithm", ""), "setting": config.get("pruning.setting", ""),
           "status": status, "suggested_by": suggested}
    row.update({k: v for k, v in config.items() if not k.startswith("__")})
    row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return row


def search(spec: SearchSpec | dict | str | Path, resume: bool = False, address: str | None = None,
           verbose: bool = True) -> SearchResult:
    """Run (or resume) a search; returns every trial's row and the Pareto front."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from raysparse.runner import check_cluster, connect_checked, preflight, storage_join, storage_path
    from raysparse.search.samplers import make_sampler, suggested_by
    from raysparse.search.trial import run_trial
    from raysparse.tracking.server import resolve_tracking_uri

    spec = as_search_spec(spec)
    check_search(spec)
    base = spec.scheduled_base()
    preflight(base)
    preflight_trials(spec, base)
    needs = trial_needs(base)   # a trial must fit the cluster: refused before Ray starts where it is local
    what = f"a trial ({base.resources.num_workers} workers x {base.resources.cpus_per_worker:g} CPUs + its driver)"
    local = check_cluster(address, *needs, "base.resources", what)
    if local is not None:
        concurrency(spec, needs, local, "this machine (a local Ray)")
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
    capacity = connect_checked(address, *needs, "base.resources", what)   # a named cluster: before MLflow
    at_once = concurrency(spec, needs, capacity, "the cluster", warn=local is None)
    tracking_uri = resolve_tracking_uri(spec.tracking.uri)
    parent_run_id, resumed = open_run(tracking_uri, spec.tracking.experiment, key, spec.name,
                                      params={"search": {k: v for k, v in spec.model_dump().items() if k != "base"},
                                              "base": spec.base},
                                      tags={"raysparse.kind": "search", "raysparse.search": spec.name})
    # Runs report progress (stage, loss) before their objectives exist; objectives arrive
    # with the evaluate and finalize stages, so Tune must not demand them in every result.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Tune saves its experiment state (trials, searcher) every 10 s or more by default; trials in reused
    # actors start within a second, so a driver killed in between would, on --resume, start again under
    # a new id a trial that had already opened its MLflow run. Saving at every step of Tune's loop keeps
    # every started trial in the state (a few ms per step at a search's scale).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    if verbose:
        print(f"search {spec.name}: {'resuming' if resume else 'starting'} {spec.num_samples} trials, "
              f"{at_once} at a time; objectives {', '.join(f'{m} ({o})' for m, o in zip(metrics, modes))}; "
              f"MLflow {tracking_uri} parent run {parent_run_id}", flush=True)
    context = {"name": spec.name, "key": key, "tracking_uri": tracking_uri, "experiment": spec.tracking.experiment,
               "parent_run_id": parent_run_id, "storage": storage}
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base.model_dump(), search=context),
                                    trial_resources(base))
    searcher = None
    if resume:
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        multi = len(metrics) > 1
        searcher = objective_aware(OptunaSearch)(space=define_by_run(spec.space), metric=metrics if multi else metrics[0],
                                mode=modes if multi else modes[0], sampler=make_sampler(spec, multi),
                                points_to_evaluate=spec.trials or None, seed=spec.seed)
        scheduler = None
        if spec.scheduler.type == "asha":
            from ray.tune.schedulers import ASHAScheduler

            # trials report quality with "recovery_step" every grace_period steps; ASHA cuts at its rungs
            scheduler = ASHAScheduler(time_attr="recovery_step", metric=metrics[0], mode=modes[0],
                                      max_t=spec.max_recovery_steps(), grace_period=spec.grace_period(),
                                      reduction_factor=spec.scheduler.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=spec.num_samples,
                                        max_concurrent_trials=spec.max_concurrent,
                                        reuse_actors=spec.reuse_trial_processes),
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
        raise RaysparseError(f"search {spec.name} failed: {last_line(exc)} (resume with --resume)") from exc
    rows = [_row(result, suggested_by(searcher, result.metrics.get("trial_id")) if searcher else "?")
            for result in grid]
    _mark_stopped(rows, tracking_uri, parent_run_id)
    for row in rows:   # with data.evaluate_dense, the first objective as a share of the dense model's
        dense = row.get(f"dense/{metrics[0]}")
        if dense and isinstance(row.get(metrics[0]), (int, float)):
            row["share_of_dense"] = row[metrics[0]] / dense
    front = pareto_front([r for r in rows if r["status"] == "done"], metrics, modes)
    columns = _columns(spec, metrics, rows)
    result = SearchResult(spec.name, rows, front, list(zip(metrics, modes)), parent_run_id, tracking_uri, storage,
                          columns, list(spec.space))
    _log_search(result, base.data.task)
    if verbose:
        print(f"\nall trials ({len(rows)}):\n{result.table()}\n\nPareto front ({len(front)}):\n{result.pareto_table()}")
        print(f"\n{result.language_tables(base.data.task)}")
        print(f"\nOpen the trials in the MLflow UI: {result.ui_url()}   (or run: raysparse ui)")
    return result


def _mark_stopped(rows: list[dict], uri: str, parent_run_id: str) -> None:
    """Trials ASHA stopped end with their process, their MLflow runs still RUNNING: end them KILLED,
    tagged with the recovery step they reached."""
    from raysparse.tracking.runs import client

    stopped = {str(r["trial"]): r for r in rows if r["status"] == "stopped"}
    if not stopped:
        return
    mlflow = client(uri)
    parent = mlflow.get_run(parent_run_id)
    children = mlflow.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    for run in children:
        row = stopped.get(run.data.tags.get("raysparse.trial_id", ""))
        if row is not None and run.info.status == "RUNNING":
            mlflow.set_tag(run.info.run_id, "raysparse.stopped_early",
                           f"ASHA at recovery step {int(row['recovery_step'])}")
            mlflow.set_terminated(run.info.run_id, "KILLED")


def _columns(spec: SearchSpec, metrics: list[str], rows: list[dict]) -> list[str]:
    wanted = ["trial", "algorithm", "setting", *[p for p in spec.space if p not in ("pruning.algorithm",
                                                                                   "pruning.setting")],
              "encoder_sparsity", *metrics, "share_of_dense", "status", "suggested_by"]
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
                 "failed_trials": sum(r["status"] == "error" for r in result.rows),
                 "stopped_trials": sum(r["status"] == "stopped" for r in result.rows),
                 "sampler_suggested_trials": sum(r.get("suggested_by") not in ("fixed", "random", "?")
                                                 for r in result.rows)})
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


def trials_url(uri: str, parent_run_id: str, name: str, objectives: list[tuple[str, str]],
               space: list[str] = ()) -> str:
    """The runs table of a search's trials in the MLflow UI (experiments are created as the kind whose
    page is the runs table, not MLflow 3's GenAI overview): a saved view of the experiment that shows
    the objectives, ``encoder_sparsity`` and the space's parameters as columns, sorted by the first
    objective, best first, filtered to the trials under the search's parent run."""
    from raysparse.tracking.runs import client, metric_column, param_column, runs_table_url

    exp_id = client(uri).get_run(parent_run_id).info.experiment_id
    metrics = list(dict.fromkeys([m for m, _ in objectives] + ["encoder_sparsity"]))
    first, mode = objectives[0]
    return runs_table_url(uri, exp_id, view=f"search {name} (run {parent_run_id[:8]}): trials",
                          columns=[*map(metric_column, metrics), *map(param_column, space)],
                          order_by=metric_column(first), ascending=mode == "min",
                          search_filter=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
