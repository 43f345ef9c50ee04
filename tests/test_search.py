"""A real search end to end: local Ray, real MLflow server, a killed driver and --resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.test_runs import rest
from tests.test_search_space import brute_force_front

# Every registered algorithm, both settings: the search doubles as the end-to-end check that each
# method runs through a real run and reaches the exact target sparsity.
TRIALS = [("gradient", "shared"), ("magnitude", "per-language"), ("random", "shared"), ("l0", "shared"),
          ("movement", "per-language"), ("layerdrop", "shared")]
OBJECTIVES = [("xnli/avg/accuracy", "max"), ("latency/pruned/b1_ms", "min"), ("bytes", "min")]


def search_spec(tracking_uri, storage):
    return {
        "name": "test-search", "num_samples": len(TRIALS), "max_concurrent": 2, "sampler": "random",
        "objectives": [{"metric": m, "mode": o} for m, o in OBJECTIVES],
        "space": {"pruning.algorithm": {"choice": sorted({a for a, _ in TRIALS})},
                  "pruning.setting": {"choice": ["shared", "per-language"]}},
        "trials": [{"pruning.algorithm": a, "pruning.setting": s} for a, s in TRIALS],
        "base": {"data": {"task": "xnli", "languages": ["en", "de"], "max_train_examples": 24, "max_eval_examples": 16,
                          "max_length": 32},
                 "finetune": {"steps": 2, "batch_size": 8}, "pruning": {"sparsity": 0.5, "scoring_examples": 8},
                 "recovery": {"steps": 1},
                 "efficiency": {"batch_sizes": [1], "repeats": 2, "warmup": 1, "sequence_length": 16},
                 "resources": {"num_workers": 1, "checkpoint_every": 50}, "tracking": {"log_models": "none"}},
        "tracking": {"uri": tracking_uri, "experiment": "test-search"},
        "storage": str(storage),
    }


def search_runs(uri, name):
    experiments = rest(uri, "/api/2.0/mlflow/experiments/search", {"max_results": 100})["experiments"]
    ids = [e["experiment_id"] for e in experiments]
    found = rest(uri, "/api/2.0/mlflow/runs/search",
                 {"experiment_ids": ids, "filter": f"tags.`raysparse.search` = '{name}'", "max_results": 100})
    runs = found.get("runs", [])
    tags = lambda r: {t["key"]: t["value"] for t in r["data"].get("tags", [])}  # noqa: E731
    parents = [r for r in runs if tags(r).get("raysparse.kind") == "search"]
    children = [r for r in runs if tags(r).get("raysparse.kind") == "trial"]
    return parents, children, tags


def tune_terminated(experiment_dir) -> set[str]:
    """Trial ids Tune's saved experiment state records as finished."""
    done = set()
    for state in sorted(experiment_dir.glob("experiment_state-*.json"))[-1:]:
        try:
            for entry in json.loads(state.read_text())["trial_data"]:
                trial = json.loads(entry[0])
                if trial.get("status") == "TERMINATED":
                    done.add(trial["trial_id"])
        except (json.JSONDecodeError, OSError, KeyError):
            pass
    return done


def cli(*args, **kwargs):
    return [sys.executable, "-m", "raysparse.cli", *args]


@pytest.mark.timeout(1500)
def test_search_survives_a_killed_driver_and_tracks_every_trial_once(tmp_path, tracking_server, embedded_dir,
                                                                     ray_local):
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(search_spec(tracking_server, tmp_path / "storage")))
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(cli("search", str(path)), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 900
    finished_before = {}
    while time.time() < deadline and driver.poll() is None:
        terminated = set().union(*[tune_terminated(d) for d in (tmp_path / "storage").glob("test-search-*")])
        _, children, tags = search_runs(tracking_server, "test-search")
        finished_before = {tags(r)["raysparse.trial_id"]: r["info"]["end_time"] for r in children
                           if r["info"]["status"] == "FINISHED" and tags(r)["raysparse.trial_id"] in terminated}
        if finished_before:
            break
        time.sleep(2)
    assert finished_before, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=60)

    resumed = subprocess.run(cli("search", str(path), "--resume"), capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Pareto front" in resumed.stdout

    parents, children, tags = search_runs(tracking_server, "test-search")
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED"
    trial_ids = [tags(r)["raysparse.trial_id"] for r in children]
    assert len(trial_ids) == len(TRIALS) and len(set(trial_ids)) == len(TRIALS), "every trial exactly once in MLflow"
    by_id = {tags(r)["raysparse.trial_id"]: r for r in children}
    for trial_id, end_time in finished_before.items():
        assert by_id[trial_id]["info"]["end_time"] == end_time, "a finished trial was run again"
    combos = set()
    rows = []
    for run in children:
        assert run["info"]["status"] == "FINISHED"
        assert tags(run)["mlflow.parentRunId"] == parents[0]["info"]["run_id"]
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        combos.add((params["pruning.algorithm"], params["pruning.setting"]))
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        for key in ["xnli/en/accuracy", "xnli/de/accuracy", "xnli/avg/accuracy", "xnli/worst/accuracy",
                    "encoder_sparsity", "bytes", "latency/pruned/b1_ms"]:
            assert key in metrics, key
        assert metrics["encoder_sparsity"] == pytest.approx(0.5, abs=1e-4), params["pruning.algorithm"]
        rows.append({"trial": tags(run)["raysparse.trial_id"], **metrics})
        assert run["info"]["run_name"].startswith(f"{params['pruning.algorithm']}-{params['pruning.setting']}-")
    assert combos == set(TRIALS)

    import mlflow

    local = mlflow.MlflowClient(tracking_server).download_artifacts(parents[0]["info"]["run_id"], "search",
                                                                     str(tmp_path / "artifacts"))
    logged = json.load(open(os.path.join(local, "pareto.json")))
    metrics, modes = [m for m, _ in OBJECTIVES], [o for _, o in OBJECTIVES]
    expected = {r["trial"] for r in brute_force_front(rows, metrics, modes)}
    statuses = {r["trial"]: r["status"] for r in logged["trials"]}   # how the driver saw each trial end
    assert {r["trial"] for r in logged["front"]} == expected, f"{statuses}\n{resumed.stdout[-4000:]}"
    assert {"pareto.png", "quality_vs_sparsity.png", "trials.txt", "pareto.txt"} <= set(os.listdir(local))
