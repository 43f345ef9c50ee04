"""Reports from MLflow: a finished search (or study) as tables and plots, and its run set as a file.

Everything is read back from the tracking server, once: the finished trials of the search's
latest parent run become flat rows (spec values, every metric, wall time) plus, for
Dynamic Sparsification trials, the whole curve (``curve/...`` metric histories). A trial that logged its
per-example statistics (``results/examples.json``, :mod:`raysparse.data.bootstrap`) carries them
as its row's ``examples`` record, from which the study tables draw 95% intervals and paired
comparisons; a trial without them has none, and its numbers show without intervals. That run
set is written next to the report (``runs.json``, the statistics one line per language), and
:func:`load_runs` reads it back, so the same tables and plots regenerate anywhere, with no server
and no network:

    raysparse report study-settings --out docs/results/settings      # from MLflow
    raysparse report --runs docs/results/settings/runs.json --out X  # from the stored run set
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from raysparse.data.bootstrap import compact
from raysparse.errors import RaysparseError
from raysparse.metric_keys import (
    AGGREGATES,
    AVG,
    avg_key,
    languages_in,
    metric_key,
    parse_metric_key,
    task_keys,
    worst_key,
    worst_of,
)
from raysparse.search.pareto import (
    format_table,
    pareto_front,
    pareto_plot,
    quality_vs_sparsity_plot,
)
from raysparse.search.study import CURVE, EXAMPLES, primary_metric

RUNSET_FORMAT = "raysparse-runset/1"
RUNSET_FILE = "runs.json"


@dataclass
class SearchReport:
    name: str
    parent_run_id: str | None
    objectives: list[tuple[str, str]]
    rows: list[dict] = field(default_factory=list)
    curves: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)   # DS trial -> level -> metrics

    @property
    def task(self) -> str:
        tasks = self.tasks()
        return tasks[0] if tasks else ""

    def tasks(self) -> list[str]:
        named = [r["task"] for r in self.rows if r.get("task")]
        if not named:   # rows without the task param: the task of the first per-language metric
            named = [parsed.task for r in self.rows for k in r
                     if (parsed := parse_metric_key(k)) is not None and parsed.language == AVG]
        return list(dict.fromkeys(named))

    def quality_metric(self) -> str:
        quality = [m for m, _ in self.objectives
                   if (parsed := parse_metric_key(m)) is not None and parsed.language == AVG]
        if quality:
            return quality[0]
        keys = sorted({k.key for k in task_keys([k for r in self.rows for k in r], self.task) if k.language == AVG})
        return keys[0] if keys else ""

    def languages(self, task: str | None = None) -> list[str]:
        task = task or self.task
        return languages_in([k for r in self.rows for k in r], task)

    def front(self) -> list[dict]:
        if not self.objectives:
            return []
        metrics, modes = [m for m, _ in self.objectives], [o for _, o in self.objectives]
        return pareto_front(self.rows, metrics, modes)

    def columns(self) -> list[str]:
        quality = self.quality_metric()
        wanted = ["trial", "run_name", "task", "algorithm", "setting", "schedule", "encoder_sparsity", quality,
                  worst_of(quality), *[m for m, _ in self.objectives], "params/total", "bytes",
                  "latency/pruned/b1_ms", "latency/pruned/b8_ms", "speedup/b8"]
        present = {k for r in self.rows for k in r}
        return [c for c in dict.fromkeys(wanted) if c and c in present]

    def per_language_table(self) -> str:
        tables = []
        for task in self.tasks() or [self.task]:
            metric = _task_metric(task, self.quality_metric())
            columns = ["run_name", *self.languages(task), *AGGREGATES]
            rows = [{"run_name": r.get("run_name", r.get("trial")),
                     **{c: r.get(metric_key(task, c, metric)) for c in columns[1:]}}
                    for r in self.rows if r.get("task", task) == task]
            tables.append((f"{task} ({metric}):\n" if len(self.tasks()) > 1 else "") + format_table(rows, columns))
        return "\n\n".join(tables)

    def points(self) -> list[dict]:
        """One point per trial and level (a DS trial stands for every level of its grid)."""
        from raysparse.search.study import points

        return points(self.rows, self.curves)


def _task_metric(task: str, quality: str) -> str:
    parsed = parse_metric_key(quality)
    if parsed is not None and parsed.task == task:
        return parsed.metric
    try:
        return primary_metric(task)
    except RaysparseError:
        return parsed.metric if parsed is not None else quality


# --- reading MLflow ------------------------------------------------------------------------------------------


def _client(tracking_uri: str | None):
    import mlflow

    from raysparse.tracking.server import resolve_tracking_uri

    return mlflow.MlflowClient(resolve_tracking_uri(tracking_uri))


def load_search(name: str, tracking_uri: str | None = None) -> SearchReport:
    """The search ``name`` read back from MLflow: its latest parent run and that run's finished trials."""
    client = _client(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`raysparse.search` = '{name}'", max_results=5000)
    parents = sorted((r for r in runs if r.data.tags.get("raysparse.kind") == "search"),
                     key=lambda r: r.info.start_time or 0, reverse=True)
    trials = [r for r in runs if r.data.tags.get("raysparse.kind") == "trial"]
    if not parents and not trials:
        raise RaysparseError(f"report: no search named '{name}' in MLflow at {client.tracking_uri}")
    objectives: list[tuple[str, str]] = []
    parent_id = None
    if parents:
        parent = parents[0]
        parent_id = parent.info.run_id
        raw = parent.data.params.get("search.objectives")
        if raw:
            objectives = [(o["metric"], o["mode"]) for o in json.loads(raw)]
        if not objectives:
            objectives = _default_objectives(parent.data.params)
        if any(r.data.tags.get("raysparse.search_run_id") for r in trials):   # a rerun under a changed spec
            trials = [r for r in trials if r.data.tags.get("raysparse.search_run_id") == parent_id]
    finished = sorted((r for r in trials if r.info.status == "FINISHED"),
                      key=lambda r: (r.info.start_time or 0, r.info.run_id))
    rows = [_clean(_row(run)) for run in finished]
    for row, run in zip(rows, finished):
        record = _examples(client, run)
        if record is not None:
            row[EXAMPLES] = _compact_record(record)
        if run.data.params.get("data.evaluate_dense") == "True":   # a run about its dense model: how it learnt
            curve = _learning_curve(client, run, row.get("task"))
            if curve:
                row[CURVE] = curve
    curves = {row["trial"]: _curve(client, run) for row, run in zip(rows, finished) if row.get("schedule") == "dynamic"}
    return SearchReport(name, parent_id, objectives, rows, _clean({k: v for k, v in curves.items() if v}))


def _default_objectives(params: dict) -> list[tuple[str, str]]:
    from raysparse.data.tasks import get_task

    task = get_task(params.get("base.data.task", "xnli"))
    return [(avg_key(task.name, task.primary_metric), "max")]


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "None") else None
    except ValueError:
        return None


def _row(run) -> dict:
    """A trial as one flat record: what it was (spec values), what it measured, how long it took."""
    params, info = run.data.params, run.info
    seed = _number(params.get("seed"))
    wall = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None
    return {"trial": run.data.tags.get("raysparse.trial_id", info.run_id[:8]), "run_name": info.run_name,
            "run_id": info.run_id, "task": params.get("data.task"), "algorithm": params.get("pruning.algorithm"),
            "setting": params.get("pruning.setting"), "schedule": params.get("pruning.schedule"),
            "target_sparsity": _number(params.get("pruning.sparsity")),
            "seed": None if seed is None else int(seed),
            "trim_vocabulary": params.get("efficiency.trim_vocabulary") == "True",
            "languages": params.get("data.languages"), "model": params.get("model.source"),
            "finetune_steps": _number(params.get("finetune.steps")),
            "recovery_steps": _number(params.get("recovery.steps")),
            "start_time": info.start_time, "wall_s": wall, **run.data.metrics}


def _examples(client, run) -> dict | None:
    """The trial's per-example statistics (its ``results/examples.json``), or None when it logged none."""
    import tempfile

    from raysparse.tracking.runs import EXAMPLES_ARTIFACT

    folder = EXAMPLES_ARTIFACT.rpartition("/")[0]
    if not any(f.path == EXAMPLES_ARTIFACT for f in client.list_artifacts(run.info.run_id, folder)):
        return None
    with tempfile.TemporaryDirectory() as scratch:
        return json.loads(Path(client.download_artifacts(run.info.run_id, EXAMPLES_ARTIFACT, scratch)).read_text())


def _learning_curve(client, run, task: str | None) -> dict[str, dict[str, float]]:
    """The fine-tuning curve of the model ``run`` evaluated (``dev/<task>/<lang>/<primary metric>`` by step):
    logged by ``run`` itself, or by the run that produced the cached model it read
    (tag ``raysparse.cache.finetune.producer``); empty when neither logged one."""
    from mlflow.exceptions import MlflowException

    if not task:
        return {}
    source = run
    if not any(k.startswith("dev/") for k in run.data.metrics):
        producer = run.data.tags.get("raysparse.cache.finetune.producer") or ""
        if producer.startswith("spec:") or not producer:
            return {}
        try:
            source = client.get_run(producer)
        except MlflowException:
            return {}
    metric = primary_metric(task)
    curve: dict[str, dict[str, float]] = {}
    for key in sorted(run_key for run_key in source.data.metrics if run_key.startswith("dev/")):
        parsed = parse_metric_key(key[len("dev/"):])
        if parsed is None or parsed.task != task or parsed.metric != metric:
            continue
        for measurement in client.get_metric_history(source.info.run_id, key):
            curve.setdefault(str(measurement.step), {})[parsed.key] = measurement.value
    return dict(sorted(curve.items(), key=lambda kv: int(kv[0])))


def _compact_record(record: dict) -> dict:
    """An examples record with its statistics compact (ints as ints, floats to 4 digits), as runs.json keeps them."""
    return {**record, "stats": {lang: compact(values) for lang, values in record.get("stats", {}).items()}}


def _curve(client, run) -> dict[str, dict[str, float]]:
    """A DS trial's curve from its ``curve/...`` metric histories (step = sparsity in percent)."""
    curve: dict[str, dict[str, float]] = {}
    for key in sorted(k for k in run.data.metrics if k.startswith("curve/")):
        for measurement in client.get_metric_history(run.info.run_id, key):
            level = f"{measurement.step / 100:g}"
            curve.setdefault(level, {})[key[len("curve/"):]] = measurement.value
    return dict(sorted(curve.items(), key=lambda kv: float(kv[0])))


# --- the run set as a file -------------------------------------------------------------------------------------


def _clean(value):
    """JSON has no NaN or infinity: they become None (in rows from MLflow too, so both paths agree)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def save_runs(report: SearchReport, path: str | Path) -> Path:
    """Write the run set (every row and curve) to JSON; :func:`load_runs` reads it back.

    A row's per-example statistics are written compactly: ints as ints, floats to 4 digits, each
    language's list on one line (a placeholder string stands in for it while the rest is indented).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lists: list[str] = []

    def placeholder(values: list) -> str:
        lists.append(json.dumps(values, separators=(",", ":"), allow_nan=False))
        return f"@@stats-{len(lists) - 1}@@"

    rows = [row if not isinstance(row.get(EXAMPLES), dict) else
            {**row, EXAMPLES: {**(record := _compact_record(row[EXAMPLES])),
                               "stats": {lang: placeholder(v) for lang, v in record["stats"].items()}}}
            for row in report.rows]
    data = {"format": RUNSET_FORMAT, "name": report.name, "parent_run_id": report.parent_run_id,
            "objectives": [list(o) for o in report.objectives], "rows": rows, "curves": report.curves}
    text = json.dumps(_clean(data), indent=1, sort_keys=True, allow_nan=False)
    text = re.sub(r'"@@stats-(\d+)@@"', lambda match: lists[int(match.group(1))], text)
    path.write_text(text + "\n")
    return path


def load_runs(path: str | Path) -> SearchReport:
    """A run set written by :func:`save_runs` (or ``raysparse report``), as a report; no MLflow needed."""
    path = Path(path)
    if path.is_dir():
        path = path / RUNSET_FILE
    if not path.is_file():
        raise RaysparseError(f"report.runs: {path} does not exist (expected a runs.json written by raysparse report)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RaysparseError(f"report.runs: {path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict) or data.get("format") != RUNSET_FORMAT:
        raise RaysparseError(f"report.runs: {path} is not a run set (expected format {RUNSET_FORMAT!r})")
    return SearchReport(data["name"], data.get("parent_run_id"), [tuple(o) for o in data.get("objectives", [])],
                        data["rows"], data.get("curves") or {})


# --- writing the report ---------------------------------------------------------------------------------------


def study_markdown(report: SearchReport) -> str:
    """Every table of the report as one markdown document (what docs/results/<study>/report.md holds)."""
    from raysparse.search import study

    items = report.points()
    tasks = study.tasks_of(items)
    lines = [f"# Report: {report.name}", "",
             (f"{len(report.rows)} finished trials; tasks: {', '.join(tasks) or '-'}; "
              f"{len(items)} points (a Dynamic Sparsification trial counts once per level)."),
             "Regenerate offline: `raysparse report --runs runs.json --out <folder>`.", ""]
    if any(study.is_baseline(row) for row in report.rows):
        lines += ["## Dense baselines and the trivial predictor", "", study.baseline_table(report.rows), ""]
        if any(row.get(study.CURVE) for row in report.rows):
            lines += ["## Learning curves (development rows)", "", study.learning_curve_table(report.rows), ""]
    found = study.findings(items, report.rows)
    if found:
        lines += ["## Findings", "", *[f"- {line}" for line in found], ""]
    lines += ["## Quality against sparsity (average and worst language)", ""]
    for task in tasks:
        lines += [f"### {task} ({study.primary_metric(task)})", "", study.quality_table(items, task), ""]
    lines += ["## Per language", ""]
    for task in tasks:
        lines += [f"### {task} ({study.primary_metric(task)})", "", study.language_table(items, task), ""]
    if any("bytes" in p for p in items):
        lines += ["## Size and speed (physically shrunk models)", "", study.efficiency_table(items), ""]
    if any(p.get("schedule") == "dynamic" for p in items) and any(p.get("schedule") != "dynamic" for p in items):
        lines += ["## Dynamic Sparsification vs separate runs", "", study.dynamic_table(items, report.rows), ""]
    lines += ["## Trials", "", _trials_markdown(report), ""]
    return "\n".join(lines)


def _trials_markdown(report: SearchReport) -> str:
    from raysparse.search.study import markdown_table, primary_metric, stage_cost

    header = ["trial", "run", "encoder sparsity", "avg", "worst", "run wall s", "worker CPU s"]
    body = []
    for r in report.rows:
        metric = primary_metric(r["task"]) if r.get("task") else ""
        avg, worst = r.get(avg_key(str(r.get("task")), metric)), r.get(worst_key(str(r.get("task")), metric))
        body.append([str(r.get("trial")), str(r.get("run_name")),
                     "–" if r.get("encoder_sparsity") is None else f"{r['encoder_sparsity']:.3f}",
                     "–" if avg is None else f"{avg:.3f}", "–" if worst is None else f"{worst:.3f}",
                     "–" if r.get("wall_s") is None else f"{r['wall_s']:.0f}", f"{stage_cost(r):.0f}"])
    return markdown_table(header, body)


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(figure)
    return path


def write_report(report: SearchReport, out_dir: str | Path) -> dict[str, Path]:
    """Tables (markdown, text, CSV), plots and the run set of a search into ``out_dir``; returns what was written."""
    from raysparse.search import study_plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = report.columns()
    written = {}
    written["trials"] = out / "trials.txt"
    written["trials"].write_text(format_table(report.rows, columns) + "\n")
    written["pareto"] = out / "pareto.txt"
    written["pareto"].write_text(format_table(report.front(), columns) + "\n")
    written["languages"] = out / "per_language.txt"
    written["languages"].write_text(report.per_language_table() + "\n")
    written["csv"] = out / "trials.csv"
    keys = sorted({k for r in report.rows for k in r} - {EXAMPLES, CURVE})   # statistics and curves stay in runs.json
    with open(written["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(report.rows)
    written["runs"] = save_runs(report, out / RUNSET_FILE)
    if not report.rows:
        return written
    written["report"] = out / "report.md"
    written["report"].write_text(study_markdown(report))
    items = report.points()
    written["quality_vs_sparsity"] = _save(study_plots.quality_vs_sparsity(items), out / "quality_vs_sparsity.png")
    written["per_language_plot"] = _save(study_plots.per_language(items), out / "per_language.png")
    metrics = [m for m, _ in report.objectives]
    if len(metrics) >= 2:
        figure = pareto_plot(report.rows, report.front(), metrics[1], metrics[0])
        written["pareto_plot"] = _save(figure, out / "pareto.png")
    if any("bytes" in p for p in items):
        written["efficiency"] = _save(study_plots.efficiency(items), out / "efficiency.png")
    if any(p.get("schedule") == "dynamic" for p in items) and any(p.get("schedule") != "dynamic" for p in items):
        written["dynamic"] = _save(study_plots.dynamic_vs_separate(items), out / "dynamic.png")
    return written


def per_language_plot(report: SearchReport):
    """Quality per language (x) for every trial and level, one panel per task."""
    from raysparse.search.study_plots import per_language

    return per_language(report.points())


def efficiency_plot(rows: list[dict]):
    """Latency and bytes against encoder sparsity: fast is not necessarily small."""
    from raysparse.search.study import points
    from raysparse.search.study_plots import efficiency

    return efficiency(points(rows, {}))


__all__ = ["SearchReport", "efficiency_plot", "load_runs", "load_search", "per_language_plot",
           "quality_vs_sparsity_plot", "save_runs", "study_markdown", "write_report"]
