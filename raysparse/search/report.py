"""Reports from MLflow: a finished search (or any set of runs) as tables and plots.

Everything is read back from the tracking server, so a report regenerates anywhere the
server (or a copy of its SQLite file and artifacts) is reachable, with no network.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from raysparse.errors import RaysparseError
from raysparse.search.pareto import format_table, pareto_front, pareto_plot, quality_vs_sparsity_plot


@dataclass
class SearchReport:
    name: str
    parent_run_id: str | None
    objectives: list[tuple[str, str]]
    rows: list[dict] = field(default_factory=list)

    @property
    def task(self) -> str:
        keys = [k for r in self.rows for k in r if k.count("/") == 2 and "/avg/" in k]
        return keys[0].split("/")[0] if keys else ""

    def quality_metric(self) -> str:
        quality = [m for m, _ in self.objectives if "/avg/" in m]
        if quality:
            return quality[0]
        keys = sorted({k for r in self.rows for k in r if "/avg/" in k})
        return keys[0] if keys else ""

    def languages(self) -> list[str]:
        task = self.task
        return sorted({k.split("/")[1] for r in self.rows for k in r if k.startswith(f"{task}/")
                       and k.count("/") == 2 and k.split("/")[1] not in ("avg", "worst")})

    def front(self) -> list[dict]:
        if not self.objectives:
            return []
        metrics, modes = [m for m, _ in self.objectives], [o for _, o in self.objectives]
        return pareto_front(self.rows, metrics, modes)

    def columns(self) -> list[str]:
        quality = self.quality_metric()
        wanted = ["trial", "run_name", "algorithm", "setting", "schedule", "encoder_sparsity", quality,
                  quality.replace("/avg/", "/worst/"), *[m for m, _ in self.objectives], "params/total", "bytes",
                  "latency/pruned/b1_ms", "latency/pruned/b8_ms", "speedup/b8"]
        present = {k for r in self.rows for k in r}
        return [c for c in dict.fromkeys(wanted) if c in present]

    def per_language_table(self) -> str:
        task, metric = self.task, self.quality_metric().split("/")[-1]
        columns = ["run_name", *self.languages(), "avg", "worst"]
        rows = [{"run_name": r.get("run_name", r.get("trial")),
                 **{c: r.get(f"{task}/{c}/{metric}") for c in columns[1:]}} for r in self.rows]
        return format_table(rows, columns)


def _client(tracking_uri: str | None):
    import mlflow

    from raysparse.tracking.server import resolve_tracking_uri

    return mlflow.MlflowClient(resolve_tracking_uri(tracking_uri))


def load_search(name: str, tracking_uri: str | None = None) -> SearchReport:
    """The search ``name`` (its parent run and every trial run) read back from MLflow."""
    client = _client(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`raysparse.search` = '{name}'", max_results=5000)
    parents = [r for r in runs if r.data.tags.get("raysparse.kind") == "search"]
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
    rows = [_row(run) for run in trials if run.info.status == "FINISHED"]
    return SearchReport(name, parent_id, objectives, rows)


def _default_objectives(params: dict) -> list[tuple[str, str]]:
    from raysparse.data.tasks import get_task

    task = get_task(params.get("base.data.task", "xnli"))
    return [(f"{task.name}/avg/{task.primary_metric}", "max")]


def _row(run) -> dict:
    params = run.data.params
    return {"trial": run.data.tags.get("raysparse.trial_id", run.info.run_id[:8]), "run_name": run.info.run_name,
            "run_id": run.info.run_id, "algorithm": params.get("pruning.algorithm"),
            "setting": params.get("pruning.setting"), "schedule": params.get("pruning.schedule"),
            "target_sparsity": float(params.get("pruning.sparsity", "nan")), **run.data.metrics}


def write_report(report: SearchReport, out_dir: str | Path) -> dict[str, Path]:
    """Tables (text, CSV) and plots of a search into ``out_dir``; returns what was written."""
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
    keys = sorted({k for r in report.rows for k in r})
    with open(written["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(report.rows)
    quality = report.quality_metric()
    if report.rows and quality:
        figure = quality_vs_sparsity_plot(report.rows, quality, quality.replace("/avg/", "/worst/"))
        written["quality_vs_sparsity"] = out / "quality_vs_sparsity.png"
        figure.savefig(written["quality_vs_sparsity"], dpi=120)
        figure = per_language_plot(report)
        written["per_language_plot"] = out / "per_language.png"
        figure.savefig(written["per_language_plot"], dpi=120)
    metrics = [m for m, _ in report.objectives]
    if len(metrics) >= 2 and report.rows:
        figure = pareto_plot(report.rows, report.front(), metrics[1], metrics[0])
        written["pareto_plot"] = out / "pareto.png"
        figure.savefig(written["pareto_plot"], dpi=120)
    if any("latency/pruned/b1_ms" in r for r in report.rows):
        figure = efficiency_plot(report.rows)
        written["efficiency"] = out / "efficiency.png"
        figure.savefig(written["efficiency"], dpi=120)
    return written


def per_language_plot(report: SearchReport):
    """Quality per language (x) for every trial (one line each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task, metric = report.task, report.quality_metric().split("/")[-1]
    languages = report.languages()
    figure, axis = plt.subplots(figsize=(max(5, 0.5 * len(languages) + 2), 4))
    for r in sorted(report.rows, key=lambda r: r.get("encoder_sparsity", 0)):
        values = [r.get(f"{task}/{lang}/{metric}") for lang in languages]
        if all(v is not None for v in values):
            axis.plot(languages, values, "o-", alpha=0.8,
                      label=f"{r.get('algorithm')}/{r.get('setting')} s={r.get('encoder_sparsity', 0):.2f}")
    axis.set_ylabel(f"{task} {metric}")
    axis.legend(fontsize=6)
    figure.tight_layout()
    return figure


def efficiency_plot(rows: list[dict]):
    """Latency and bytes against encoder sparsity: fast is not necessarily small."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    points = sorted((r for r in rows if "encoder_sparsity" in r), key=lambda r: r["encoder_sparsity"])
    for key, axis, label in (("latency/pruned/b1_ms", left, "latency, batch 1 (ms)"),
                             ("bytes", right, "bytes")):
        axis.plot([r["encoder_sparsity"] for r in points if key in r], [r[key] for r in points if key in r], "o")
        axis.set_xlabel("encoder sparsity")
        axis.set_ylabel(label)
    figure.tight_layout()
    return figure


__all__ = ["SearchReport", "load_search", "write_report"]
