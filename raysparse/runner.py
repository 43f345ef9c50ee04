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
from raysparse.errors import RaysparseError, first_line, last_line
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
    from raysparse.data.kinds import kind_of
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
    kind = kind_of(task)
    plan = kind.training_languages(task, present, evaluation, spec.data.regime, spec.data.dir)
    trainable, finetune = plan.trainable, plan.finetune
    scoring = spec.pruning.scoring_languages or plan.candidates
    missing = [lang for lang in scoring if lang not in trainable]
    if spec.data.train_task:   # fine-tuning reads the other task's English rows
        train = get_task(spec.data.train_task)
        train_present = present_languages(train, spec.data.dir)
        train_plan = kind.training_languages(train, train_present, train_present, spec.data.regime, spec.data.dir)
        finetune = train_plan.finetune
        if any(lang not in train_plan.trainable for lang in finetune):
            raise RaysparseError(f"data.train_task: {train.name} has no {kind.training_source} in "
                                 f"{', '.join(finetune)} (available: {', '.join(sorted(train_plan.trainable)) or 'none'})")
    else:
        missing += [lang for lang in finetune if lang not in trainable]
    if missing:
        source = kind.training_source
        raise RaysparseError(f"pruning.scoring_languages: no {source} for {', '.join(sorted(set(missing)))} "
                             f"(available: {', '.join(sorted(trainable))})")
    if not scoring or not finetune:
        raise RaysparseError(f"data.languages: none of {', '.join(evaluation)} has data to fine-tune or score "
                             f"{task.name} on")
    return {"evaluation": list(evaluation), "finetune": list(finetune), "scoring": list(scoring)}


def preflight(spec: RunSpec) -> dict[str, list[str]]:
    """Every check that needs no cluster: data files row by row, languages, model folder (sidecar,
    config, architecture, weights headers) and sequence lengths."""
    from raysparse.models.sources import check_model, resolve_model

    languages = resolve_languages(spec)
    check_data(spec, languages)
    location = resolve_model(spec.model.source)
    check_model(location, spec.model.trust_remote_code)
    check_lengths(spec, location)
    check_head_ratio(spec, location)
    storage = spec.storage or os.environ.get("RAYSPARSE_STORAGE")
    if storage and "://" not in storage and Path(storage).expanduser().exists() and not Path(storage).expanduser().is_dir():
        raise RaysparseError(f"storage: {storage} is a file (expected a folder for checkpoints and the stage cache)")
    return languages


def check_data(spec: RunSpec, languages: dict[str, list[str]]) -> None:
    """Read every data file the run's workers will read, with the readers they use: a malformed row,
    a Tatoeba pair whose two files differ in length or an unreadable file fails here, in one line that
    names the file and line, instead of in a worker after the cluster started."""
    from raysparse.data.layout import find_data_files
    from raysparse.data.load import read_rows
    from raysparse.data.tasks import PIVOT_LANGUAGE, get_task

    task = get_task(spec.data.task)
    training = {*languages["scoring"], *(languages["finetune"] if spec.finetune.steps else [])}
    wanted = {(task.name, language) for language in languages["evaluation"]}
    if spec.data.train_task and spec.finetune.steps:
        wanted |= {(spec.data.train_task, language) for language in languages["finetune"]}
        training = set(languages["scoring"])
    if task.kind == "retrieval":   # trains and scores on XNLI premises paired with English
        wanted |= {("xnli", language) for language in {*training, PIVOT_LANGUAGE}}
    else:
        wanted |= {(task.name, language) for language in training}
        if task.parallel:   # parallel files are split by the pivot's rows
            wanted.add((task.name, PIVOT_LANGUAGE))
    for name in sorted({name for name, _ in wanted}):
        for found in find_data_files(name, spec.data.dir):
            if (name, found.language) in wanted:
                read_rows(found)


def _model_config(location: str) -> dict | None:
    """The model folder's config.json, or None where it cannot be read (check_model reports that)."""
    import json

    try:
        config = json.loads(Path(location, "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def check_lengths(spec: RunSpec, location: str) -> None:
    """Sequence lengths the model's positions cannot hold fail here, not after the whole run."""
    config = _model_config(location)
    if config is None:
        return   # check_architecture / the loader say what is wrong with the folder
    positions = int(config.get("max_position_embeddings", 0) or 0)
    if config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
        positions -= 2   # positions start after the padding index
    for field, value in (("data.max_length", spec.data.max_length),
                         ("efficiency.sequence_length", spec.efficiency.sequence_length)):
        if positions > 0 and value > positions:
            raise RaysparseError(f"{field}: {value} is longer than the model's {positions} positions "
                                 f"(expected at most {positions})")


def check_head_ratio(spec: RunSpec, location: str) -> None:
    """A share of heads that leaves more neurons to remove than the model has fails here (one line)."""
    from raysparse.pruning.selection import removal_counts
    from raysparse.structure import params_per_head, params_per_neuron

    if spec.pruning.head_ratio == 1:
        return
    config = _model_config(location) or {}
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        layers, ffn = int(config["num_hidden_layers"]), int(config["intermediate_size"])
    except (KeyError, TypeError, ValueError):
        return   # check_model says what is wrong with the folder; selection checks the shape it finds
    removal_counts(spec.pruning.sparsity, layers * heads, layers * ffn, params_per_head(hidden, hidden // heads),
                   params_per_neuron(hidden), spec.pruning.head_ratio)


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


CONNECT_TIMEOUT_S = 3.0
DEFAULT_PORTS = {"": 6379, "ray": 10001, "http": 8265, "https": 443}   # GCS, Ray Client, dashboard


def check_address(address: str | None = None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A cluster named by ``address`` (or RAY_ADDRESS) must answer on its port within ``timeout``
    seconds, before anything is created for the run (Ray itself retries for half a minute, then
    fails with pages of logs)."""
    given = address or os.environ.get("RAY_ADDRESS")
    if not given or given in ("auto", "local"):
        return
    origin = "--address" if address else "RAY_ADDRESS"
    scheme, sep, rest = given.partition("://")
    if not sep:
        scheme, rest = "", given
    netloc = rest.split("/")[0]
    host, colon, port = netloc.rpartition(":")
    if not colon or "]" in port:
        host, port = netloc, ""
    host = host.strip("[]")
    try:
        number = int(port) if port else DEFAULT_PORTS.get(scheme.lower(), DEFAULT_PORTS[""])
    except ValueError:
        raise RaysparseError(f"address: {given!r} (from {origin}) has no valid port (expected host:port, "
                             "e.g. 127.0.0.1:6379)") from None
    import socket

    try:
        socket.create_connection((host, number), timeout=timeout).close()
        reason = None if scheme or os.environ.get("RAY_USE_TLS") else _gcs_unhealthy(host, number, timeout)
    except OSError as exc:
        reason = (f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError)
                  else exc.strerror or str(exc) or type(exc).__name__)
    if reason:
        raise RaysparseError(f"address: no Ray cluster answers at {given} (from {origin}): {reason} (expected the "
                             "address of a running cluster's head, as `ray start --head` or `raysparse cluster` "
                             "prints it)")


def _gcs_unhealthy(host: str, port: int, timeout: float) -> str | None:
    """None when a Ray GCS at host:port answers gRPC's standard health check as SERVING, else what it did."""
    import grpc

    channel = grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda raw: raw,
                                response_deserializer=lambda raw: raw)
    try:
        reply = check(b"", timeout=timeout)   # an empty HealthCheckRequest: the whole server
    except grpc.RpcError as exc:
        details = (exc.details() or "").strip().splitlines()
        return f"something listens there, but no Ray GCS ({exc.code().name}{': ' + details[0] if details else ''})"
    finally:
        channel.close()
    return None if reply == b"\x08\x01" else "its GCS is not serving"   # HealthCheckResponse{status: SERVING}


def local_capacity() -> dict[str, float]:
    """CPUs and GPUs a local Ray started here gets (Ray's own count, cgroup limits included)."""
    try:
        from ray._private.utils import get_num_cpus

        cpus = float(get_num_cpus())
    except Exception:   # a Ray without the helper: the CPUs this process may use
        cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        gpus = float(get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators())
    except Exception:
        gpus = 0.0
    return {"CPU": cpus, "GPU": gpus}


def cluster_capacity() -> dict[str, float]:
    """CPUs and GPUs of the cluster this driver is connected to."""
    import ray

    resources = ray.cluster_resources()
    return {"CPU": float(resources.get("CPU", 0)), "GPU": float(resources.get("GPU", 0))}


def check_fits(cpus: float, gpus: float, capacity: dict[str, float], field: str, what: str, where: str) -> None:
    """Refuse, in one line, work that needs more CPUs or GPUs than ``where`` has: Ray would wait forever."""
    if cpus > capacity["CPU"]:
        raise RaysparseError(f"{field}: {what} needs {cpus:g} CPUs but {where} has {capacity['CPU']:g} "
                             f"(expected at most {capacity['CPU']:g}: fewer workers or CPUs per worker, or a "
                             "larger cluster with --address)")
    if gpus > capacity["GPU"]:
        raise RaysparseError(f"{field}.use_gpu: {what} needs {gpus:g} GPUs but {where} has {capacity['GPU']:g}")


def run_needs(resources) -> tuple[float, float]:
    """(CPUs, GPUs) the TorchTrainer of a run reserves."""
    return resources.num_workers * resources.cpus_per_worker, float(resources.num_workers if resources.use_gpu else 0)


def check_cluster(address: str | None, cpus: float, gpus: float, field: str, what: str) -> dict[str, float] | None:
    """Before Ray starts: a named cluster answers (a short connect check); without one, the local Ray
    this driver would start (this machine) can hold ``what``. Returns that local capacity, or None
    for a named cluster, whose resources are known once connected (:func:`connect_checked`)."""
    check_address(address)
    if address or os.environ.get("RAY_ADDRESS"):
        return None
    capacity = local_capacity()
    check_fits(cpus, gpus, capacity, field, what, "this machine (a local Ray)")
    return capacity


def connect_checked(address: str | None, cpus: float, gpus: float, field: str, what: str) -> dict[str, float]:
    """Connect to the cluster (or start a local Ray), then check that it can hold ``what``."""
    ensure_ray(address)
    capacity = cluster_capacity()
    check_fits(cpus, gpus, capacity, field, what, f"the cluster at {address or os.environ.get('RAY_ADDRESS')}"
               if address or os.environ.get("RAY_ADDRESS") else "the local Ray")
    return capacity


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
        cause, ours = worker_error(exc)
        # a raysparse error in a worker (bad data, a diverging loss) fails the same way on a rerun: no hint
        raise error(f"{what} failed: {cause or first_line(exc)}{'' if ours else hint}") from exc
    logger.finish("FINISHED")
    return result


USER_ERROR_PREFIX = f"{RaysparseError.__module__}.{RaysparseError.__name__}: "


def worker_error(exc: BaseException) -> tuple[str | None, bool]:
    """What failed inside Ray Train, in one line: the last line of the first failed worker's traceback
    (``ray.train.WorkerGroupError.worker_failures``) or of the controller's error (``ControllerError``),
    and whether it was a :class:`RaysparseError`; (None, False) for any other exception."""
    failures = getattr(exc, "worker_failures", None)
    controller = getattr(exc, "controller_failure", None)
    if failures:
        rank = min(failures)
        where, line = f"worker {rank}", last_line(failures[rank])
        more = f" (and {len(failures) - 1} more worker(s))" if len(failures) > 1 else ""
    elif controller is not None:
        where, line, more = "controller", last_line(controller), ""
    else:
        return None, False
    ours = line.startswith(USER_ERROR_PREFIX)
    return f"{where}: {line[len(USER_ERROR_PREFIX):] if ours else line}{more}", ours


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

    import ray

    spec = as_spec(spec)
    languages = preflight(spec)
    connected = ray.is_initialized()
    cpus, gpus = run_needs(spec.resources)
    what = f"a run of {spec.resources.num_workers} workers x {spec.resources.cpus_per_worker:g} CPUs"
    check_cluster(address, cpus, gpus, "resources", what)   # before Ray starts
    connect_checked(address, cpus, gpus, "resources", what)   # a named cluster: before the MLflow run
    key = spec_key(spec.model_dump())
    tracking_uri = resolve_tracking_uri(spec.tracking.uri)
    run_id, resumed = open_run(tracking_uri, spec.tracking.experiment, key, spec.name,
                               params=run_params(spec, languages), tags=run_tags(spec, "run"))
    storage = storage_path(spec.storage)
    if verbose:
        print(f"run {spec.name}: {'resuming' if resumed else 'starting'}; MLflow {tracking_uri} run {run_id}; "
              f"storage {storage}", flush=True)
    trainer = trainer_for(spec, languages, tracking_uri, run_id, storage, f"{spec.name}-{key}")
    try:
        result = fit_tracked(trainer, tracking_uri, run_id, f"run {spec.name}", hint=" (rerun the same spec to resume)")
    except RaysparseError:
        if not connected:   # disconnecting prints Ray's buffered worker logs now, so the error ends the output
            ray.shutdown()
        raise
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


__all__ = ["RunResult", "as_spec", "check_address", "check_cluster", "check_data", "check_fits", "cluster_capacity",
           "connect_checked", "ensure_ray", "fit_tracked", "flatten", "local_capacity", "preflight",
           "resolve_languages", "run", "run_in_process", "run_needs", "run_params", "run_tags", "trainer_for",
           "worker_error"]
