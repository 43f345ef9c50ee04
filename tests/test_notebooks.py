"""Notebooks execute headless; the MLflow UI shows a search's trials side by side in a real browser."""

import contextlib
import json
import re
import shutil
import urllib.parse
from pathlib import Path

import jupytext
import papermill
import pytest

from tests.test_runs import rest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SCREENSHOTS = Path(__file__).resolve().parents[1] / "test-artifacts"
SEARCH = "notebook-test-search"


def code_cells(notebook) -> list[str]:
    return [c.source.strip() for c in notebook.cells if c.cell_type == "code"]


@pytest.mark.parametrize("name", ["define_search", "analyze_search"])
def test_notebook_pairs_are_in_sync(name):
    paired = jupytext.read(NOTEBOOKS / f"{name}.ipynb")
    script = jupytext.read(NOTEBOOKS / f"{name}.py")
    assert code_cells(paired) == code_cells(script), f"run: jupytext --sync notebooks/{name}.py"


@pytest.fixture(scope="module")
def notebook_search(tmp_path_factory, tracking_server, embedded_dir, ray_local):
    """The search notebook, executed with small parameters; its finished search is reused below."""
    folder = tmp_path_factory.mktemp("notebooks")
    papermill.execute_notebook(
        str(NOTEBOOKS / "define_search.ipynb"), str(folder / "define_search.out.ipynb"), kernel_name="python3",
        parameters={"name": SEARCH, "num_samples": 2, "max_concurrent": 2, "finetune_steps": 2, "recovery_steps": 1,
                    "languages": ["en", "de"], "tracking_uri": tracking_server, "storage": str(folder / "runs")},
        cwd=str(folder), progress_bar=False)
    yield folder
    shutil.rmtree(folder / "runs", ignore_errors=True)   # checkpoints; the MLflow runs stay on the server


def outputs(notebook: Path) -> str:
    """Everything the executed notebook printed."""
    executed = json.loads(notebook.read_text())
    return "".join("".join(o.get("text", "")) for c in executed["cells"] for o in c.get("outputs", []))


OBJECTIVES = ("xnli/avg/accuracy", "xnli/worst/accuracy", "latency/pruned/b1_ms")


@pytest.mark.timeout(900)
def test_define_search_notebook_runs_a_search(notebook_search, tracking_server):
    """The parent run the notebook printed is the finished search in MLflow, with both trials under it."""
    printed = outputs(notebook_search / "define_search.out.ipynb")
    match = re.search(r"MLflow parent run: (\S+)/#/experiments  run (\w+)", printed)
    assert match, "the notebook prints its parent run"
    assert match[1] == tracking_server
    parent = rest(tracking_server, f"/api/2.0/mlflow/runs/get?run_id={match[2]}")["run"]
    tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert parent["info"]["status"] == "FINISHED"
    assert (tags["raysparse.kind"], tags["raysparse.search"]) == ("search", SEARCH)
    assert (metrics["trials"], metrics["failed_trials"]) == (2, 0) and 1 <= metrics["pareto_size"] <= 2
    children = _children(tracking_server)
    assert len(children) == 2
    for child in children:
        child_tags = {t["key"]: t["value"] for t in child["data"]["tags"]}
        assert child_tags["mlflow.parentRunId"] == match[2] and child["info"]["status"] == "FINISHED"
        assert set(OBJECTIVES) <= {m["key"] for m in child["data"]["metrics"]}


@pytest.mark.timeout(300)
def test_analyze_notebook_reads_the_search_back(notebook_search, tracking_server, tmp_path):
    """The run set the analysis notebook wrote holds what MLflow holds for each trial."""
    papermill.execute_notebook(
        str(NOTEBOOKS / "analyze_search.ipynb"), str(tmp_path / "analyze.out.ipynb"), kernel_name="python3",
        parameters={"name": SEARCH, "tracking_uri": tracking_server, "out_dir": str(tmp_path / "report")},
        cwd=str(tmp_path), progress_bar=False)
    assert "2 finished trials" in outputs(tmp_path / "analyze.out.ipynb")
    runset = json.loads((tmp_path / "report" / "runs.json").read_text())
    children = {c["info"]["run_id"]: c for c in _children(tracking_server)}
    assert runset["name"] == SEARCH and [list(o) for o in runset["objectives"]][0][0] == OBJECTIVES[0]
    assert sorted(row["run_id"] for row in runset["rows"]) == sorted(children)
    for row in runset["rows"]:
        metrics = {m["key"]: m["value"] for m in children[row["run_id"]]["data"]["metrics"]}
        for key in (*OBJECTIVES, "encoder_sparsity"):
            assert row[key] == pytest.approx(metrics[key], rel=1e-12), key
    parents = {{t["key"]: t["value"] for t in c["data"]["tags"]}["mlflow.parentRunId"] for c in children.values()}
    assert parents == {runset["parent_run_id"]}
    written = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"trials.txt", "pareto.txt", "per_language.txt", "quality_vs_sparsity.png", "per_language.png"} <= written


def _children(uri):
    experiments = rest(uri, "/api/2.0/mlflow/experiments/search", {"max_results": 100})["experiments"]
    runs = rest(uri, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [e["experiment_id"] for e in experiments],
        "filter": f"tags.`raysparse.search` = '{SEARCH}' and tags.`raysparse.kind` = 'trial'", "max_results": 50})
    return runs["runs"]


@contextlib.contextmanager
def browser_page(width: int, height: int, url: str, runs: list[dict]):
    """A page of Debian's headless chromium (Playwright drives it; it never downloads a browser) that has
    opened ``url`` and shows the name of every run in ``runs``."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            # The UI keeps polling the server, so "networkidle" may never come: wait for the content instead.
            page.goto(url, wait_until="domcontentloaded", timeout=120_000)
            for run in runs:
                page.get_by_text(run["info"]["run_name"]).first.wait_for(timeout=90_000)
            SCREENSHOTS.mkdir(exist_ok=True)
            yield page
        finally:
            browser.close()


@pytest.mark.timeout(300)
def test_mlflow_ui_compare_view_shows_per_language_metrics(notebook_search, tracking_server):

    children = _children(tracking_server)
    assert len(children) == 2
    run_ids = [r["info"]["run_id"] for r in children]
    experiment = children[0]["info"]["experiment_id"]
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment])})
    url = f"{tracking_server}/#/compare-runs?{query}"
    shot = SCREENSHOTS / "mlflow_compare_runs.png"
    with browser_page(1600, 1400, url, children) as page:
        # The metric table is a virtualised grid 300 px high: fold the long parameter table away,
        # then scroll the grids until the per-language rows are rendered.
        page.get_by_text("Parameters", exact=True).first.click()
        page.get_by_text("Show diff only").nth(1).wait_for(timeout=30_000)
        for _ in range(100):
            if page.get_by_text("xnli/de/accuracy").count():
                break
            page.evaluate("() => document.querySelectorAll('.ReactVirtualized__Grid').forEach(g => { g.scrollTop += 150; })")
            page.wait_for_timeout(200)
        page.get_by_text("xnli/de/accuracy").first.scroll_into_view_if_needed(timeout=30_000)
        page.screenshot(path=str(shot), full_page=True)
        content = page.content()
    assert all(f"xnli/{key}/accuracy" in content for key in ("de", "en", "avg"))
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


@pytest.mark.timeout(900)
def test_printed_link_opens_the_trials_table_with_the_objectives(notebook_search, tracking_server):
    """The link a search prints lands on the runs table of its trials (not MLflow's GenAI overview), each
    objective a column with the trials' values, in a first visit's browser where nothing was picked."""

    printed = outputs(notebook_search / "define_search.out.ipynb")
    match = re.search(r"Trials in the MLflow UI \(objectives as columns\): (\S+)", printed)
    assert match, "the notebook prints the link to its trials"
    url = match[1]
    assert url.startswith(f"{tracking_server}/#/experiments/") and "/runs?" in url
    children = _children(tracking_server)
    assert len(children) == 2
    values = {key: [float({m["key"]: m["value"] for m in c["data"]["metrics"]}[key]) for c in children]
              for key in OBJECTIVES}
    shot = SCREENSHOTS / "mlflow_trials_runs_table.png"
    with browser_page(1920, 1080, url, children) as page:
        table = page.locator(".ag-root").first.bounding_box()
        shown, cells = {}, {}
        for key in OBJECTIVES:
            header = page.locator(f'.ag-header-cell[col-id="metrics.`{key}`"]')
            header.wait_for(timeout=30_000)
            box = header.bounding_box()
            # in the table's visible part, not scrolled off to its right
            shown[key] = (header.inner_text().strip(), box["x"] + box["width"] <= table["x"] + table["width"])
            cells[key] = page.locator(f'.ag-center-cols-container .ag-cell[col-id="metrics.`{key}`"]').all_inner_texts()
        rows = page.locator(".ag-center-cols-container .ag-row").count()
        landed = page.url
        page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert "/runs" in landed and "workflowType=machine_learning" in landed, landed
    assert rows == 2, "the table holds the search's two trials (the parent run filtered out)"
    for key in OBJECTIVES:
        assert shown[key] == (key, True), (key, shown[key])
        assert len(cells[key]) == 2 and all(cells[key]), (key, cells[key])
        for text in cells[key]:
            assert any(float(text) == pytest.approx(v, rel=1e-3) for v in values[key]), (key, text, values[key])
    first = [float(t) for t in cells[OBJECTIVES[0]]]
    assert first == sorted(first, reverse=True), "sorted by the first objective, best first"
    assert shot.stat().st_size > 10_000
