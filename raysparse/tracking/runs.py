"""MLflow runs: one per experiment (trial), found again by key so reruns never duplicate.

Only the driver creates runs; workers get the run id and only rank 0 logs, through an
explicit ``MlflowClient`` (no global mlflow state shared between Ray actors).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from raysparse.errors import RaysparseError, first_line

RUN_KEY_TAG = "raysparse.run_key"
MAX_PARAM_LENGTH = 6000


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become flat dotted keys (the form MLflow's compare view shows well)."""
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def spec_key(spec: Mapping[str, Any]) -> str:
    """A stable key for a spec: reruns of the same spec find the same run."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def client(uri: str):
    # Offline first: no usage telemetry. Its background thread also sets and unsets an environment
    # variable while requests reads os.environ, which now and then fails a call to the tracking
    # server (KeyError '_MLFLOW_TELEMETRY_SESSION_ID'): a trial would fail for nothing.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_RUNS = "custom_model_development"   # MLflow 3's UI opens it on the runs table


def experiment_id(mlflow_client, name: str) -> str:
    existing = mlflow_client.get_experiment_by_name(name)
    if existing is not None:
        if existing.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(existing.experiment_id)
        if EXPERIMENT_KIND not in existing.tags:   # made before raysparse said its kind, or by hand
            mlflow_client.set_experiment_tag(existing.experiment_id, EXPERIMENT_KIND, EXPERIMENT_KIND_RUNS)
        return existing.experiment_id
    try:
        # MLflow 3's UI opens an experiment of this kind on its runs table (not the GenAI overview)
        return mlflow_client.create_experiment(name, tags={EXPERIMENT_KIND: EXPERIMENT_KIND_RUNS})
    except Exception:  # created concurrently by another process
        existing = mlflow_client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


SAVED_VIEW_TAG = "mlflow.sharedViewState."   # + key: a saved view of the runs page (MLflow 3's UI)
RUN_NAME_COLUMN = "attributes.`Run Name`"


def metric_column(key: str) -> str:
    """The runs table's id of a metric column (also its sort key)."""
    return f"metrics.`{key}`"


def param_column(key: str) -> str:
    return f"params.`{key}`"


def runs_table_url(uri: str, exp_id: str, view: str | None = None, columns: list[str] = (),
                   order_by: str | None = None, ascending: bool = False, search_filter: str = "") -> str:
    """The experiment's runs table in the MLflow UI, its side bar on model training (not GenAI); with
    ``view`` (a name), opened on a saved view that shows ``columns`` (:func:`metric_column`,
    :func:`param_column`) first, in this order, wide enough for their names, sorted and filtered.

    The runs page takes no columns from its URL (it keeps the chosen ones in the browser's storage,
    and a first visit shows none of the metrics). It does open a saved view named by
    ``?viewStateShareKey=<key>``, read from the experiment tag ``mlflow.sharedViewState.<key>``, the
    form its own "Save view" writes; the view also lists under that name in the page's view menu.
    The key is a hash of the view, so the same view is written once however often it is asked for.
    """
    base = f"{uri}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    if view is None:
        return base
    columns = list(columns)
    widths = {RUN_NAME_COLUMN: 340, **{c: min(200, max(100, 7 * len(c) - 40)) for c in columns}}   # "metrics.`...`"
    state = {"searchFilter": search_filter, "orderByKey": order_by or "attributes.start_time",
             "orderByAsc": bool(ascending), "selectedColumns": columns, "columnOrder": list(widths),
             "columnWidths": widths}
    key = "raysparse" + hashlib.sha256(json.dumps([view, state], sort_keys=True).encode()).hexdigest()[:24]
    try:
        mlflow_client = client(uri)
        if f"{SAVED_VIEW_TAG}{key}" not in mlflow_client.get_experiment(exp_id).tags:
            now = int(time.time() * 1000)
            envelope = {"name": view, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
            mlflow_client.set_experiment_tag(exp_id, f"{SAVED_VIEW_TAG}{key}", json.dumps(envelope))
    except Exception as exc:   # a link is no reason to fail what asked for it: the plain runs table
        print(f"warning: MLflow at {uri} kept no saved view ({first_line(exc)}); the link shows the plain "
              "runs table", file=sys.stderr)
        return base
    return f"{base}&viewStateShareKey={key}"


def find_run(mlflow_client, exp_id: str, run_key: str):
    runs = mlflow_client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                                     max_results=2)
    return runs[0] if runs else None


def open_run(uri: str, experiment: str, run_key: str, name: str, params: Mapping[str, Any] | None = None,
             tags: Mapping[str, str] | None = None, parent_run_id: str | None = None) -> tuple[str, bool]:
    """(run id, resumed): the run tagged ``run_key``, created with params and tags if new."""
    try:
        c = client(uri)
        exp_id = experiment_id(c, experiment)
        existing = find_run(c, exp_id, run_key)
        if existing is not None:
            if existing.info.status != "FINISHED":
                c.update_run(existing.info.run_id, status="RUNNING")
            return existing.info.run_id, True
        all_tags = {RUN_KEY_TAG: run_key, **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = c.create_run(exp_id, run_name=name, tags=all_tags)
        log_params(uri, run.info.run_id, params or {})
        return run.info.run_id, False
    except RaysparseError:
        raise
    except Exception as exc:
        raise RaysparseError(f"tracking: MLflow at {uri} refused the run ({first_line(exc)})") from None


def finished_metrics(uri: str, run_id: str) -> dict[str, float] | None:
    """The last value of every metric of a FINISHED run; None while it has not finished."""
    run = client(uri).get_run(run_id)
    return dict(run.data.metrics) if run.info.status == "FINISHED" else None


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    flat = flatten(params)
    items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
             for k, v in flat.items() if v is not None]
    items = [Param(p.key, p.value[:MAX_PARAM_LENGTH]) for p in items]
    c = client(uri)
    for start in range(0, len(items), 100):
        c.log_batch(run_id, params=items[start : start + 100])


EXAMPLES_ARTIFACT = "results/examples.json"   # a run's per-example statistics (raysparse.data.bootstrap's record)


class RunLogger:
    """Logs to one MLflow run; a no-op when ``run_id`` is None (ranks other than 0)."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.uri, self.run_id = uri, run_id
        self._client = client(uri) if uri and run_id else None
        self._earlier: dict[str, set[int] | None] | None = None   # resumed: steps of each key logged before

    @property
    def active(self) -> bool:
        return self._client is not None

    def resumed(self) -> None:
        """From now on, leave out every (metric, step) an earlier attempt of this run already logged: a
        run resumed from a checkpoint repeats the steps after it, and each step keeps one entry."""
        if self.active and self._earlier is None:
            self._earlier = dict.fromkeys(self._client.get_run(self.run_id).data.metrics)

    def _logged_before(self, key: str, step: int) -> bool:
        if self._earlier is None or key not in self._earlier:
            return False
        if self._earlier[key] is None:   # its history, read once
            self._earlier[key] = {m.step for m in self._client.get_metric_history(self.run_id, key)}
        return step in self._earlier[key]

    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in values.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
                 and not self._logged_before(k, step or 0)]
        for start in range(0, len(items), 500):
            self._client.log_batch(self.run_id, metrics=items[start : start + 500])

    def params(self, values: Mapping[str, Any]) -> None:
        if self.active:
            log_params(self.uri, self.run_id, values)

    def tags(self, values: Mapping[str, str]) -> None:
        if self.active:
            for key, value in values.items():
                self._client.set_tag(self.run_id, key, str(value))

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def text(self, text: str, artifact_file: str) -> None:
        if self.active:
            self._client.log_text(self.run_id, text, artifact_file)

    def json(self, data: Any, artifact_file: str, compact: bool = False) -> None:
        """``data`` as a JSON artifact; ``compact``: on one line, without spaces (large records)."""
        if self.active and compact:
            self._client.log_text(self.run_id, json.dumps(data, separators=(",", ":"), allow_nan=False), artifact_file)
        elif self.active:
            self._client.log_dict(self.run_id, data, artifact_file)

    def figure(self, figure, artifact_file: str) -> None:
        if self.active:
            self._client.log_figure(self.run_id, figure, artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run; a run that already finished keeps its status and end time."""
        if self.active and self._client.get_run(self.run_id).info.status != "FINISHED":
            self._client.set_terminated(self.run_id, status=status)
