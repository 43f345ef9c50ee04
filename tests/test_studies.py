"""The paper's studies (experiments/studies/): every spec validates at every budget and asks the
paper's question, each runs end to end at its tiny budget through the CLI on real Ray and a real
MLflow server, and the committed results (docs/results/) regenerate from their stored run sets
without network access. Trials with per-example statistics get 95% intervals and verdicts."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jupytext
import numpy as np
import papermill
import pytest

from raysparse.config import load_spec
from raysparse.data.bootstrap import examples_record, interval_metrics, point_estimates
from raysparse.metric_keys import metric_key
from raysparse.search import study
from raysparse.search.report import SearchReport, load_runs, load_search, save_runs, write_report
from raysparse.search.spec import SearchSpec, check_search, preflight_trials

REPO = Path(__file__).resolve().parents[1]
STUDIES = ("baselines", "settings", "algorithms", "efficiency", "dynamic")
BUDGETS = (None, "tiny", "xlmr-base", "xlmr-large")
COMMITTED = REPO / "docs" / "results"
TEXT_FILES = ("report.md", "trials.txt", "per_language.txt", "pareto.txt", "trials.csv", "runs.json")
WAVES = (("settings", "dynamic"), ("algorithms", "efficiency", "baselines"))   # few drivers at a time: memory
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
    kinds = {"udpos": "tagging", "panx": "tagging", "xnli": "classification", "pawsx": "classification",
             "tatoeba": "retrieval"}
    assert set(values(settings, "data.task")) == set(kinds)
    assert set(values(settings, "pruning.setting")) == {"shared", "per-language"}
    cells = {(t["data.task"], t["pruning.setting"], t["pruning.sparsity"]) for t in settings.trials}
    sparsities = set(values(settings, "pruning.sparsity"))
    assert len(sparsities) >= 3 and len(cells) == len(kinds) * 2 * len(sparsities)

    algorithms = study_spec("algorithms")
    assert set(values(algorithms, "pruning.algorithm")) >= {"gradient", "magnitude", "random", "l0", "movement"}
    assert set(values(algorithms, "data.task")) == set(kinds)
    at = {}
    for trial in algorithms.trials:
        at.setdefault((trial["data.task"], trial["pruning.algorithm"]), set()).add(trial["pruning.sparsity"])
    assert len({frozenset(s) for s in at.values()}) == 1, "every algorithm at the same sparsities on every task"
    assert len(next(iter(at.values()))) >= 3
    randoms = [t for t in algorithms.trials if t["pruning.algorithm"] == "random"]
    assert len({t["pruning.options.seed"] for t in randoms}) >= 3, "three random masks"
    assert {t.get("seed", 0) for t in algorithms.trials} == {0}, "one run seed: one cached fine-tuned model per task"
    learners = [t for t in algorithms.trials if t["pruning.algorithm"] in ("l0", "movement")]
    assert all(t["pruning.learning_steps"] for t in learners), "L0 and movement start from the cached fine-tune"

    # every fine-tuned trial of both studies fine-tunes exactly as its task's baseline: one cached model each
    baselines = {t["data.task"]: t for t in study_spec("baselines").trials}
    for trial in [*settings.trials, *algorithms.trials]:
        if trial["data.task"] in baselines:
            for path in ("finetune.steps", "finetune.learning_rate"):
                assert trial[path] == baselines[trial["data.task"]][path], (trial["data.task"], path)
    base, reference = settings.base_spec(), study_spec("baselines").base_spec()
    for path in ("regime", "max_train_examples", "max_length", "train_fraction"):
        assert getattr(base.data, path) == getattr(reference.data, path), path
    assert base.finetune.batch_size == reference.finetune.batch_size

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
    if name == "baselines":
        (row,) = report.rows
        assert sorted(row[study.CURVE], key=int) == ["1", "2"], "the curve at every step, from the producing run"
        assert row["trivial/xnli/avg/accuracy"] < 0.5 and study.EXAMPLES in row
        assert "## Dense baselines and the trivial predictor" in text and "## Learning curves" in text
    if name == "settings":
        assert set(study.tasks_of(items)) == {"xnli", "panx", "tatoeba"}
        assert "per language (panx f1):" in log and "per language (tatoeba accuracy):" in log, "every task's table"
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
        report = load_runs(COMMITTED / name / "runs.json")
        if name == "baselines":   # dense models: one table of all tasks beside the trivial predictor
            assert study.baseline_table(report.rows) in page, "baselines: RESULTS.md is out of date"
        else:
            items = report.points()
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


# --- 95% intervals and verdicts from per-example statistics ---------------------------------------------------

LANGS = ("de", "fr")


def correct(p: float, n: int = 300, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(np.int64)


def flipped(values: np.ndarray, count: int, to: int, seed: int = 1) -> np.ndarray:
    """``values`` with ``count`` of the examples that are not ``to`` set to ``to``."""
    out = values.copy()
    where = np.flatnonzero(out != to)
    out[np.random.default_rng(seed).choice(where, size=count, replace=False)] = to
    return out


def trial(name: str, stats: dict, *, setting="shared", algorithm="gradient", level=0.5, seed=0, sources=None) -> dict:
    """A Tatoeba trial row as load_search makes it: spec values, quality metrics and its examples record."""
    estimates = point_estimates("mean", stats)
    return {"trial": name, "run_name": name, "task": "tatoeba", "algorithm": algorithm, "setting": setting,
            "schedule": "one-shot", "target_sparsity": level, "seed": seed, "trim_vocabulary": False,
            **{metric_key("tatoeba", lang, "accuracy"): value for lang, value in estimates.items()},
            "examples": examples_record("tatoeba", stats, sources or {lang: f"tatoeba.{lang}-eng (whole)" for lang in stats})}


def verdict_lines(rows: list[dict]) -> list[str]:
    return [line for line in study.findings(study.points(rows, {}), rows) if "verdict" in line]


def test_settings_verdicts_by_paired_intervals():
    shared = {lang: correct(0.8, seed=i) for i, lang in enumerate(LANGS)}
    worse = {lang: flipped(values, 40, 0) for lang, values in shared.items()}
    better = {lang: flipped(values, 40, 1) for lang, values in shared.items()}
    cases = {"confirmed": worse, "contradicted": better, "undecided": shared}
    for expected, per_language in cases.items():
        rows = [trial("a", shared), trial("b", per_language, setting="per-language")]
        (line,) = verdict_lines(rows)
        assert line.startswith(f"settings, tatoeba: verdict {expected} ") and "(paired)" in line, line
    (line,) = verdict_lines([trial("a", shared, level=0.3), trial("b", worse, setting="per-language", level=0.3),
                             trial("c", shared, level=0.5), trial("d", shared, setting="per-language", level=0.5)])
    assert "verdict confirmed" in line and "at 0.3: [-" in line and "] confirmed; at 0.5: [+0.0, +0.0] undecided" in line
    other = {lang: f"tatoeba.{lang}-eng (another part)" for lang in LANGS}
    (line,) = verdict_lines([trial("a", shared), trial("b", worse, setting="per-language", sources=other)])
    assert "(unpaired)" in line


def test_algorithm_verdicts_take_gradient_as_the_simplest():
    gradient = {lang: correct(0.8, seed=i) for i, lang in enumerate(LANGS)}
    worse = lambda seed: {lang: flipped(values, 50, 0, seed) for lang, values in gradient.items()}
    rows = [trial("g", gradient), trial("m", worse(1), algorithm="magnitude"),
            trial("r1", worse(2), algorithm="random", seed=1), trial("r2", worse(3), algorithm="random", seed=2)]
    (line,) = verdict_lines(rows)
    assert line.startswith("algorithms, tatoeba: verdict confirmed (the simplest method, gradient, performs best)")
    assert "at 0.5: magnitude [+" in line and "random [+" in line
    better = {lang: flipped(values, 50, 1) for lang, values in gradient.items()}
    (line,) = verdict_lines([*rows, trial("l", better, algorithm="l0")])
    assert "verdict contradicted" in line and "l0 [-" in line
    (line,) = verdict_lines([trial("g", gradient), trial("x", gradient, algorithm="magnitude")])
    assert "verdict undecided" in line
    assert verdict_lines([trial("m", worse(1), algorithm="magnitude"), trial("l", better, algorithm="l0")]) == []
    assert study.overall(["confirmed", "undecided"]) == "confirmed"
    assert study.overall(["contradicted", "undecided"]) == "contradicted"
    assert study.overall(["confirmed", "contradicted"]) == study.overall(["undecided"]) == "undecided"


def test_rows_without_statistics_render_as_before_and_logged_intervals_decide():
    shared = {lang: correct(0.8, seed=i) for i, lang in enumerate(LANGS)}
    rows = [trial("a", shared), trial("b", {lang: flipped(v, 60, 0) for lang, v in shared.items()},
                                        setting="per-language")]
    bare = [{k: v for k, v in row.items() if k != "examples"} for row in rows]
    assert verdict_lines(bare) == [] and "[" not in study.quality_table(study.points(bare, {}), "tatoeba")
    logged = [{**row, **interval_metrics("tatoeba", "accuracy", "mean", shared if i == 0 else
                                         {lang: flipped(v, 60, 0) for lang, v in shared.items()})}
              for i, row in enumerate(bare)]
    (line,) = verdict_lines(logged)
    assert "verdict confirmed" in line and "(logged intervals)" in line


def test_quality_tables_show_intervals_and_pool_seeds():
    rows = [trial("r1", {lang: correct(0.7, seed=1) for lang in LANGS}, algorithm="random", seed=1),
            trial("r2", {lang: correct(0.6, seed=2) for lang in LANGS}, algorithm="random", seed=2),
            trial("g", {lang: correct(0.8, seed=3) for lang in LANGS})]
    items = study.points(rows, {})
    table = study.quality_table(items, "tatoeba")
    print(table)
    number = r"\d\.\d{3}"
    body = [line.split(" | ") for line in table.splitlines()[2:]]
    assert re.fullmatch(rf"{number} ± {number} \(n=2\) \[{number}, {number}\]", body[0][1])   # random avg
    assert re.fullmatch(rf"{number} \[{number}, {number}\]", body[0][3])                      # gradient avg
    one_seed = study.interval([items[0]], "tatoeba", "avg")
    pooled = study.interval(items[:2], "tatoeba", "avg")
    assert pooled[1] - pooled[0] > one_seed[1] - one_seed[0], "the seeds' spread widens the pooled interval"
    assert all(re.search(rf"\[{number}, {number}\]", cell)   # every language and aggregate
               for cell in study.language_table(items, "tatoeba").splitlines()[2].split(" | ")[2:])


def test_run_set_keeps_the_statistics_compactly(tmp_path):
    f1s = {"de": np.array([0.123456789, 1.0, 0.0, 2 / 3]), "fr": np.array([0.5, 0.25, 1 / 7, 0.0])}
    rows = [trial("a", {lang: correct(0.8, seed=i) for i, lang in enumerate(LANGS)}),
            trial("b", {lang: correct(0.7, seed=i) for i, lang in enumerate(LANGS)}, setting="per-language"),
            {**trial("q", {lang: correct(0.5) for lang in LANGS}, level=0.7), "examples": examples_record("mlqa", f1s, {})}]
    report = SearchReport("intervals", None, [("tatoeba/avg/accuracy", "max")], rows)
    path = save_runs(report, tmp_path / "runs.json")
    text = path.read_text()
    assert '"de": [1,1,1,' in text and '"de": [0.1235,1.0,0.0,0.6667]' in text   # one line per language
    loaded = load_runs(path)
    assert loaded.rows[0]["examples"] == rows[0]["examples"]
    assert all(type(v) is int for v in loaded.rows[0]["examples"]["stats"]["de"])
    assert loaded.rows[2]["examples"]["stats"]["fr"] == [0.5, 0.25, 0.1429, 0.0]
    assert save_runs(loaded, tmp_path / "again.json").read_text() == text
    written = write_report(loaded, tmp_path / "report")
    assert "examples" not in (tmp_path / "report" / "trials.csv").read_text().splitlines()[0].split(",")
    assert "settings, tatoeba: verdict" in written["report"].read_text()


def test_load_search_reads_each_trials_examples(tracking_server):
    """Trials logged as a worker logs them (a compact results/examples.json through RunLogger), read back."""
    from raysparse.tracking.runs import EXAMPLES_ARTIFACT, RunLogger, client, experiment_id

    mlflow = client(tracking_server)
    experiment = experiment_id(mlflow, "test-examples")
    parent = mlflow.create_run(experiment, tags={"raysparse.search": "examples-search", "raysparse.kind": "search"})
    stats = {lang: correct(0.8, n=50, seed=i) for i, lang in enumerate(LANGS)}
    for name, logged in (("with", True), ("without", False)):
        run = mlflow.create_run(experiment, run_name=name, tags={
            "raysparse.search": "examples-search", "raysparse.kind": "trial", "mlflow.parentRunId": parent.info.run_id,
            "raysparse.search_run_id": parent.info.run_id})
        mlflow.log_param(run.info.run_id, "data.task", "tatoeba")
        log = RunLogger(tracking_server, run.info.run_id)
        log.metrics({"tatoeba/avg/accuracy": 0.8, **interval_metrics("tatoeba", "accuracy", "mean", stats)})
        if logged:
            log.json(examples_record("tatoeba", stats, {}), EXAMPLES_ARTIFACT, compact=True)
        mlflow.set_terminated(run.info.run_id)
    mlflow.set_terminated(parent.info.run_id)
    report = load_search("examples-search", tracking_server)
    by_name = {row["run_name"]: row for row in report.rows}
    assert by_name["with"]["examples"] == examples_record("tatoeba", stats, {})
    assert "examples" not in by_name["without"] and "ci95_low/tatoeba/avg/accuracy" in by_name["without"]
