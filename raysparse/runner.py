"""The driver of one run: validate everything, then hand the work to Ray Train.

All checks a user can fail (spec fields, task, languages, data files, model source,
tracking server) happen here, before Ray starts. The run's MLflow run and its Ray
storage folder are both keyed by the spec, so running the same spec again after a
killed driver continues from the last checkpoint into the same MLflow run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysparse.config import RunSpec, load_spec, parse
from raysparse.errors import RaysparseError, first_line
from raysparse.metric_keys import AGGREGATES, metric_key
from raysparse.tracking.runs import flatten, open_run, spec_key

FORWARDED_ENV = ("RAYSPARSE_DATA", "RAYSPARSE_CACHE", "HF_HUB_OFFLINE", "RAYSPARSE_ALLOW_HUB", "HF_HOME",
                 "TOKENIZERS_PARALLELISM", "MLFLOW_DISABLE_TELEMETRY")


@dataclass
class RunResult:
    name: str
    metrics: dict[str, float]
    run_id: str | None
    tracking_uri: str | None
    storage: str
    languages: dict[str, list[str]] = field(default_factory=dict)

    def table(self, task: str, metric: str) -> str:
        langs = [*self.languages.get("evaluation", []), *AGGREGATES]
        lines = [f"{'language':10} {metric:>10}"]
        for lang in langs:
            value = self.metrics.get(metric_key(task, lang, metric))
            if value is not None:
                lines.append(f"{lang:10} {value:10.4f}")
        return "\n".join(lines)


def as_spec(spec: RunSpec | dict | str | Path) -> RunSpec:
    if isinstance(spec, RunSpec):
        return parse(RunSpec, spec.model_dump())
    if isinstance(spec, dict):
        return parse(RunSpec, spec)
    return load_spec(spec)


def resolve_languages(spec: RunSpec) -> dict[str, list[str]]:
    """Evaluation, fine-tuning and scoring languages, checked against the data directory."""
    from raysparse.data.load import languages as present_languages
    from raysparse.data.tasks import get_task
    from raysparse.paths import data_dir

    data_dir(spec.data.dir)
    task = get_task(spec.data.task)
    present = present_languages(task, spec.data.dir)
    if not present:
        raise RaysparseError(f"data.task: no files for {task.name} in {data_dir(spec.data.dir)}")
    evaluation = spec.data.languages or present
    unknown = [lang for lang in evaluation if lang not in present]
    if unknown:
        raise RaysparseError(f"data.languages: {', '.join(unknown)} not available for {task.name} "
                             f"(available: {', '.join(present)})")
    plan = task.strategy.training_languages(task, present, evaluation, spec.data.regime, spec.data.dir)
    trainable, finetune = plan.trainable, plan.finetune
    scoring = spec.pruning.scoring_languages or plan.candidates
    missing = [lang for lang in [*scoring, *finetune] if lang not in trainable]
    if missing:
        source = task.strategy.training_source
        raise RaysparseError(f"pruning.scoring_languages: no {source} for {', '.join(sorted(set(missing)))} "
                             f"(available: {', '.join(sorted(trainable))})")
    if not scoring or not finetune:
        raise RaysparseError(f"data.languages: none of {', '.join(evaluation)} has data to fine-tune or score "
                             f"{task.name} on")
    return {"evaluation": list(evaluation), "finetune": list(finetune), "scoring": list(scoring)}


def preflight(spec: RunSpec) -> dict[str, list[str]]:
    """Every check that needs no cluster: data, languages, model source and architecture."""
    from raysparse.models.sources import check_architecture, resolve_model

    languages = resolve_languages(spec)
    location = resolve_model(spec.model.source)
    if not Path(location, "raysparse.json").is_file():
        check_architecture(location, spec.model.trust_remote_code)
    check_lengths(spec, location)
    storage = spec.storage or os.environ.get("RAYSPARSE_STORAGE")
    if storage and "://" not in storage and Path(storage).expanduser().exists() and not Path(storage).expanduser().is_dir():
        raise RaysparseError(f"storage: {storage} is a file (expected a folder for checkpoints and the stage cache)")
    return languages


def check_lengths(spec: RunSpec, location: str) -> None:
    """Sequence lengths the model's positions cannot hold fail here, not after the whole run."""
    import json

    try:
        config = json.loads(Path(location, "config.json").read_text())
    except (OSError, ValueError):
        return   # check_architecture / the loader say what is wrong with the folder
    positions = int(config.get("max_position_embeddings", 0) or 0)
    if config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
        positions -= 2   # positions start after the padding index
    for field, value in (("data.max_length", spec.data.max_length),
                         ("efficiency.sequence_length", spec.efficiency.sequence_length)):
        if positions > 0 and value > positions:
            raise RaysparseError(f"{field}: {value} is longer than the model's {positions} positions "
                                 f"(expected at most {positions})")


def storage_path(root: str | None) -> str:
    """Where checkpoints and Tune experiments live: ``root``, else RAYSPARSE_STORAGE, else ./runs.

    A URI (``s3://bucket/prefix``, ``gs://...``) stays as it is: on a cluster every node must
    reach the storage, and object storage is how Ray Train shares checkpoints between them.
    """
    root = root or os.environ.get("RAYSPARSE_STORAGE") or "runs"
    if "://" in root:
        return root.rstrip("/")
    return str(Path(root).expanduser().resolve())


def storage_join(storage: str, name: str) -> str:
    """``storage/name`` for a folder or a URI (pathlib would fold ``s3://`` into ``s3:/``)."""
    return f"{storage.rstrip('/')}/{name}"


def job_env_vars() -> dict[str, str]:
    """Env vars the enclosing Ray job already sets (``ray job submit --runtime-env``), if any."""
    import json

    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    except json.JSONDecodeError:
        return {}
    return dict(((config.get("runtime_env") or {}).get("env_vars")) or {})


def _outside_job(env: dict[str, str]) -> dict[str, str]:
    """Inside a Ray job, Ray refuses a driver runtime_env that repeats one of the job's env vars."""
    job = job_env_vars()
    return {k: v for k, v in env.items() if k not in job}


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), else start a local Ray on loopback (dashboard on 127.0.0.1)."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"   # plain prints: progress lines once, library output untouched
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")   # offline first (see raysparse.tracking.runs.client)
    address = address or os.environ.get("RAY_ADDRESS")
    # Every worker names its cluster: Ray's own helpers there (Ray Train's placement-group cleaner,
    # the state API) otherwise look for "the" Ray on the machine, and fail or pick another one
    # when several run side by side.
    if address and "://" not in address and address != "auto":
        env["RAY_ADDRESS"] = address
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if address:
        from raysparse.cluster import enable_client_auth

        enable_client_auth()   # clusters with token auth (Ray's default) want the token from every driver
        ray.init(address=address, runtime_env={"env_vars": _outside_job(env)}, **kwargs)
    else:
        from raysparse.cluster import free_port, loopback_node_ip

        dashboard_port = free_port("127.0.0.1")
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
                 _node_ip_address=loopback_node_ip(), runtime_env={"env_vars": env}, **kwargs)


def trainer_for(spec: RunSpec, languages: dict, tracking_uri: str | None, run_id: str | None, storage: str,
                run_name: str, callbacks: list | None = None):
    """The TorchTrainer that executes ``spec`` (used by runs and by search trials)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raysparse.training.pipeline import train_loop_per_worker

    resources = spec.resources
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(), "languages": languages, "tracking_uri": tracking_uri,
                           "run_id": run_id, "storage": storage, "threads": max(1, round(resources.cpus_per_worker))},
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker={"CPU": resources.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=resources.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks),
    )


def run_params(spec: RunSpec, languages: dict) -> dict:
    """What MLflow records of a run's configuration (flattened to dotted keys by open_run)."""
    return {**spec.model_dump(), "languages": languages}


def run_tags(spec: RunSpec, kind: str, **extra: str) -> dict[str, str]:
    """Tags the MLflow UI filters on: what kind of run, which task, algorithm, setting, schedule."""
    p = spec.pruning
    return {"raysparse.kind": kind, "raysparse.task": spec.data.task, "raysparse.algorithm": p.algorithm,
            "raysparse.setting": p.setting, "raysparse.schedule": p.schedule, **extra}


def fit_tracked(trainer, tracking_uri: str, run_id: str, what: str, hint: str = "",
                error: type[Exception] = RaysparseError):
    """Fit ``trainer``; the MLflow run ends FINISHED or FAILED with it (checkpoints stay for a retry)."""
    from raysparse.tracking.runs import RunLogger

    logger = RunLogger(tracking_uri, run_id)
    try:
        result = trainer.fit()
    except Exception as exc:
        logger.finish("FAILED")
        raise error(f"{what} failed: {first_line(exc)}{hint}") from exc
    logger.finish("FINISHED")
    return result


def run_in_process(spec: RunSpec | dict | str | Path, checkpoints: str | Path | None = None):
    """Execute ``spec`` in this process, without Ray and without MLflow: the same stages a run's
    workers execute. ``checkpoints``: a folder to checkpoint into (a rerun resumes from it).
    Returns the finished pipeline (its ``model`` is the pruned model, ``state`` its masks and metrics)."""
    from raysparse.training.pipeline import build_pipeline
    from raysparse.training.session import LocalSession

    spec = as_spec(spec)
    languages = preflight(spec)
    pipeline = build_pipeline(spec, languages, LocalSession(checkpoints), storage=storage_path(spec.storage))
    pipeline.execute()
    return pipeline


def run(spec: RunSpec | dict | str | Path, address: str | None = None, verbose: bool = True) -> RunResult:
    """Execute one experiment on Ray Train and track it in MLflow. Resumes if it ran before."""
    from raysparse.data.tasks import get_task
    from raysparse.tracking.server import resolve_tracking_uri

    spec = as_spec(spec)
    languages = preflight(spec)
    key = spec_key(spec.model_dump())
    tracking_uri = resolve_tracking_uri(spec.tracking.uri)
    run_id, resumed = open_run(tracking_uri, spec.tracking.experiment, key, spec.name,
                               params=run_params(spec, languages), tags=run_tags(spec, "run"))
    storage = storage_path(spec.storage)
    if verbose:
        print(f"run {spec.name}: {'resuming' if resumed else 'starting'}; MLflow {tracking_uri} run {run_id}; "
              f"storage {storage}", flush=True)
    ensure_ray(address)
    trainer = trainer_for(spec, languages, tracking_uri, run_id, storage, f"{spec.name}-{key}")
    result = fit_tracked(trainer, tracking_uri, run_id, f"run {spec.name}", hint=" (rerun the same spec to resume)")
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    out = RunResult(spec.name, metrics, run_id, tracking_uri, storage, languages)
    if verbose:
        task = get_task(spec.data.task)
        if spec.pruning.schedule == "dynamic":
            from raysparse.training.dynamic import curve_table, nearest_level

            print(curve_table(metrics, spec.dynamic.grid, task.name, task.primary_metric, languages["evaluation"]))
            print(f"headline level {nearest_level(spec.dynamic.grid, spec.pruning.sparsity):g} (nearest pruning.sparsity):")
        print(out.table(task.name, task.primary_metric))
        print(f"encoder sparsity {metrics.get('encoder_sparsity', float('nan')):.3f}, "
              f"parameters {metrics.get('params/total', 0) / 1e6:.2f}M, bytes {metrics.get('bytes', 0) / 1e6:.1f} MB")
    return out


__all__ = ["RunResult", "as_spec", "ensure_ray", "fit_tracked", "flatten", "preflight",
           "resolve_languages", "run", "run_in_process", "run_params", "run_tags", "trainer_for"]
