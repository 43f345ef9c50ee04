"""The paper's studies (experiments/studies/): every spec validates at every budget and asks the
paper's question, each runs end to end at its tiny budget through the CLI on real Ray and a real
MLflow server, and the committed results (docs/results/) regenerate from their stored run sets
without network access."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jupytext
import papermill
import pytest

from raysparse.config import load_spec
from raysparse.search import study
from raysparse.search.report import load_runs, load_search, write_report
from raysparse.search.spec import SearchSpec, check_search, preflight_trials

REPO = Path(__file__).resolve().parents[1]
STUDIES = ("settings", "algorithms", "efficiency", "dynamic")
BUDGETS = (None, "tiny", "xlmr-base", "xlmr-large")
COMMITTED = REPO / "docs" / "results"
TEXT_FILES = ("report.md", "trials.txt", "per_language.txt", "pareto.txt", "trials.csv", "runs.json")
WAVES = (("settings", "dynamic"), ("algorithms", "efficiency"))   # two drivers at a time: memory
# The tiny encoder's vocabulary holds English and German pieces; evaluating Swahili alone lets vocabulary
# trimming drop the German-only rows, so the efficiency study's trimming is visible on it.
EXTRA = {"efficiency": ["base.data.languages=[sw]"]}


def study_spec(name: str, budget: str | None = None) -> SearchSpec:
    return load_spec(REPO / "experiments" / "studies" / f"{name}.yaml", SearchSpec, budget=budget)


def values(spec: SearchSpec, path: str) -> list:
    return [trial[path] for trial in spec.trials]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", STUDIES)
def test_study_specs_validate_at_every_budget(name, budget, data_dir):
    spec = study_spec(name, budget)
    base = check_search(spec)
    assert spec.num_samples == len(spec.trials) > 0
    if budget is None or budget == "tiny":   # the GPU budgets need XLM-R and the full XTREME downloads
        preflight_trials(spec, base)
    else:
        assert base.model.source.startswith("xlm-roberta") and base.resources.use_gpu


def test_the_studies_ask_the_papers_questions():
    settings = study_spec("settings")
    kinds = {"xnli": "classification", "panx": "tagging", "tatoeba": "retrieval"}
    assert set(values(settings, "data.task")) == set(kinds)
    assert set(values(settings, "pruning.setting")) == {"shared", "per-language"}
    cells = {(t["data.task"], t["pruning.setting"], t["pruning.sparsity"]) for t in settings.trials}
    sparsities = set(values(settings, "pruning.sparsity"))
    assert len(sparsities) >= 3 and len(cells) == len(kinds) * 2 * len(sparsities)

    algorithms = study_spec("algorithms")
    assert set(values(algorithms, "pruning.algorithm")) >= {"gradient", "magnitude", "random", "l0", "movement"}
    at = {}
    for trial in algorithms.trials:
        at.setdefault(trial["pruning.algorithm"], set()).add(trial["pruning.sparsity"])
    assert len({frozenset(s) for s in at.values()}) == 1, "every algorithm at the same sparsities"
    assert len({t["seed"] for t in algorithms.trials if t["pruning.algorithm"] == "random"}) >= 2

    efficiency = study_spec("efficiency")
    depth = {t["pruning.sparsity"] for t in efficiency.trials if t["pruning.algorithm"] == "layerdrop"}
    width = {t["pruning.sparsity"] for t in efficiency.trials
             if t["pruning.algorithm"] != "layerdrop" and not t["efficiency.trim_vocabulary"]}
    assert len(depth) >= 2 and depth == width
    assert any(t["efficiency.trim_vocabulary"] for t in efficiency.trials)
    assert efficiency.max_concurrent == 1, "trials must not time each other"

    dynamic = study_spec("dynamic")
    base = dynamic.base_spec()
    assert values(dynamic, "pruning.schedule").count("dynamic") == 1
    separate = {t["pruning.sparsity"] for t in dynamic.trials if t["pruning.schedule"] == "one-shot"}
    assert separate == set(base.dynamic.grid) - {0.0}, "a separate run at every pruned level"
    assert base.recovery.steps == base.dynamic.steps and base.recovery.distillation.enabled == base.dynamic.distill


# --- end to end at the tiny budgets ---------------------------------------------------------------------------


def cli_search(name: str, tracking_uri: str, storage: Path, model: Path) -> list[str]:
    sets = [f"base.model.source={model}", f"tracking.uri={tracking_uri}", "tracking.experiment=test-studies",
            f"storage={storage}", *EXTRA.get(name, [])]
    return [sys.executable, "-m", "raysparse.cli", "search", str(REPO / "experiments" / "studies" / f"{name}.yaml"),
            "--budget", "tiny", *[arg for item in sets for arg in ("--set", item)]]


@pytest.fixture(scope="module")
def tiny_studies(tmp_path_factory, tracking_server, ray_local, tiny_model_dir):
    """Every study at its tiny budget, run by `raysparse search` as a user would, two drivers at a time on the
    test cluster. The encoder is the tiny random one (the real model's runs are docs/RESULTS.md): what this
    checks is the studies' wiring, which a trial on it exercises for what Ray costs."""
    folder = tmp_path_factory.mktemp("studies")
    results, deadline = {}, time.time() + 840
    for wave in WAVES:
        running = {}
        for name in wave:
            log = open(folder / f"{name}.log", "w")
            running[name] = (subprocess.Popen(cli_search(name, tracking_server, folder / "runs", tiny_model_dir),
                                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log)
        for name, (process, log) in running.items():
            try:
                process.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            log.close()
            results[name] = (process.returncode, (folder / f"{name}.log").read_text())
    yield results
    shutil.rmtree(folder / "runs", ignore_errors=True)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", STUDIES)
def test_study_runs_end_to_end_and_reports_from_mlflow_and_offline(name, tiny_studies, tracking_server, tmp_path):
    code, log = tiny_studies[name]
    assert code == 0, log[-4000:]
    spec = study_spec(name, "tiny")
    report = load_search(spec.name, tracking_server)
    assert len(report.rows) == len(spec.trials), "every grid point finished, once"
    from_mlflow = write_report(report, tmp_path / "mlflow")
    write_report(load_runs(from_mlflow["runs"]), tmp_path / "offline")
    for file in TEXT_FILES:
        assert (tmp_path / "offline" / file).read_text() == (tmp_path / "mlflow" / file).read_text(), file
    text = from_mlflow["report"].read_text()
    items = report.points()
    if name == "settings":
        assert set(study.tasks_of(items)) == {"xnli", "panx", "tatoeba"}
        for heading in ("### xnli (accuracy)", "### panx (f1)", "### tatoeba (accuracy)"):
            assert heading in text
    if name == "algorithms":
        assert {r["algorithm"] for r in report.rows} == {"l0", "random"}
        assert "algorithms, tatoeba:" in text
    if name == "efficiency":
        by_variant = {study.variant_of(r): r for r in report.rows}
        assert set(by_variant) == {"depth", "width+vocab"}
        depth, trimmed = by_variant["depth"], by_variant["width+vocab"]
        assert depth["bytes"] < depth["dense/bytes"]
        assert trimmed["params/embedding"] < depth["params/embedding"], "trimming keeps fewer embedding rows"
        assert trimmed["bytes"] < depth["bytes"] and trimmed["vocab_rows"] > 0
        assert "## Size and speed" in text and "efficiency" in from_mlflow
    if name == "dynamic":
        (ds,) = [r for r in report.rows if r["schedule"] == "dynamic"]
        assert set(report.curves[ds["trial"]]) == {"0", "0.5"}
        assert "## Dynamic Sparsification vs separate runs" in text and "dynamic" in from_mlflow


# --- the committed results ---------------------------------------------------------------------------------------


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: a stored run set must be enough."""
    def refuse(*args, **kwargs):
        raise AssertionError("the report tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://192.0.2.1:9")


@pytest.mark.parametrize("name", STUDIES)
def test_committed_results_regenerate_offline(name, tmp_path, no_network):
    committed = COMMITTED / name
    written = write_report(load_runs(committed / "runs.json"), tmp_path)
    for file in TEXT_FILES:
        assert (tmp_path / file).read_text() == (committed / file).read_text(), \
            f"docs/results/{name}/{file} differs: rerun raysparse report --runs docs/results/{name}/runs.json " \
            f"--out docs/results/{name}"
    for path in written.values():
        if path.suffix == ".png":
            assert path.stat().st_size > 10_000 and (committed / path.name).is_file(), path.name


def test_results_page_holds_the_committed_tables():
    page = (REPO / "docs" / "RESULTS.md").read_text()
    for name in STUDIES:
        items = load_runs(COMMITTED / name / "runs.json").points()
        for task in study.tasks_of(items):
            assert study.quality_table(items, task) in page, f"{name}/{task}: RESULTS.md is out of date"
        assert f"raysparse search experiments/studies/{name}.yaml" in page


def test_report_cli_regenerates_from_a_run_set(tmp_path, no_network, capsys):
    from raysparse.cli import main

    assert main(["report", "--runs", str(COMMITTED / "dynamic" / "runs.json"), "--out", str(tmp_path)]) == 0
    assert "## Dynamic Sparsification vs separate runs" in capsys.readouterr().out
    assert (tmp_path / "report.md").read_text() == (COMMITTED / "dynamic" / "report.md").read_text()
    assert main(["report", "--runs", str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.startswith("error: report.runs: ")


# --- the report notebook ------------------------------------------------------------------------------------------


def test_report_notebook_pair_is_in_sync():
    code = lambda nb: [c.source.strip() for c in nb.cells if c.cell_type == "code"]
    assert code(jupytext.read(REPO / "notebooks" / "study_report.ipynb")) == \
        code(jupytext.read(REPO / "notebooks" / "study_report.py")), "run: jupytext --sync notebooks/study_report.py"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_report_notebook_runs_on_a_stored_run_set(tmp_path):
    papermill.execute_notebook(
        str(REPO / "notebooks" / "study_report.ipynb"), str(tmp_path / "out.ipynb"), kernel_name="python3",
        parameters={"runs": str(COMMITTED / "efficiency" / "runs.json"), "out_dir": str(tmp_path / "report")},
        cwd=str(tmp_path), progress_bar=False)
    assert (tmp_path / "report" / "report.md").read_text() == (COMMITTED / "efficiency" / "report.md").read_text()
    assert (tmp_path / "report" / "efficiency.png").is_file()
