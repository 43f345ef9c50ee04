"""Runs on Ray Train end to end: real local Ray (2 workers), real MLflow server, real data."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import raysparse
from raysparse.runner import run
from raysparse.tracking.runs import RUN_KEY_TAG, spec_key
from raysparse.training.evaluate import evaluate

LANGS = ["en", "de", "ru"]


def tiny_spec(name, tracking_uri, storage, **pruning):
    return {
        "name": name,
        "data": {"task": "xnli", "languages": LANGS, "max_train_examples": 48, "max_eval_examples": 30,
                 "max_length": 48},
        "finetune": {"steps": 4, "batch_size": 8},
        "pruning": {"algorithm": "gradient", "sparsity": 0.5, "scoring_examples": 16, **pruning},
        "recovery": {"steps": 2},
        "efficiency": {"batch_sizes": [1], "repeats": 2, "warmup": 1, "sequence_length": 32},
        "resources": {"num_workers": 2, "checkpoint_every": 2},
        "tracking": {"uri": tracking_uri, "experiment": "test-runs"},
        "storage": str(storage),
    }


def rest(uri, path, payload=None):
    """Ask the MLflow server directly over its REST API."""
    if payload is None:
        request = urllib.request.Request(f"{uri}{path}")
    else:
        request = urllib.request.Request(f"{uri}{path}", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def runs_with_key(uri, key):
    experiments = rest(uri, "/api/2.0/mlflow/experiments/search", {"max_results": 100})["experiments"]
    ids = [e["experiment_id"] for e in experiments]
    found = rest(uri, "/api/2.0/mlflow/runs/search",
                 {"experiment_ids": ids, "filter": f"tags.`{RUN_KEY_TAG}` = '{key}'", "max_results": 10})
    return found.get("runs", [])


def artifact_paths(uri, run_id, path=""):
    query = urllib.parse.urlencode({"run_id": run_id, "path": path})
    listing = rest(uri, f"/api/2.0/mlflow/artifacts/list?{query}").get("files", [])
    out = []
    for item in listing:
        out.append(item["path"])
        if item.get("is_dir"):
            out.extend(artifact_paths(uri, run_id, item["path"]))
    return out


@pytest.mark.timeout(900)
def test_per_language_iterative_run_end_to_end(ray_local, tracking_server, tmp_path, embedded_dir):
    spec = tiny_spec("e2e-per-language-iterative", tracking_server, tmp_path / "runs", setting="per-language",
                     schedule="iterative", iterations=2)
    result = run(spec)
    check_run(spec, result, tracking_server, tmp_path)


def check_run(spec, result, tracking_server, tmp_path):
    """What the MLflow server returns over REST for a finished run, and its reloaded shrunk model."""
    setting, schedule = spec["pruning"].get("setting", "shared"), spec["pruning"].get("schedule", "one-shot")
    key = spec_key(raysparse.runner.as_spec(spec).model_dump())
    runs = runs_with_key(tracking_server, key)
    assert len(runs) == 1, "exactly one MLflow run per experiment"
    mlflow_run = runs[0]
    assert mlflow_run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in mlflow_run["data"]["metrics"]}
    for lang in [*LANGS, "avg", "worst"]:
        assert f"xnli/{lang}/accuracy" in metrics
    assert metrics["encoder_sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert metrics["bytes"] < metrics["dense/bytes"]
    params = {p["key"]: p["value"] for p in mlflow_run["data"]["params"]}
    assert params["pruning.setting"] == setting and params["pruning.schedule"] == schedule

    files = artifact_paths(tracking_server, result.run_id)
    mask_key = "shared" if setting == "shared" else "de"
    expected = ["results/spec.yaml", "results/per_language.txt", "results/per_language.png", "results/sizes.json",
                f"results/mask-{mask_key}.json", f"results/scores-{mask_key}.safetensors"]
    for path in expected:
        assert path in files, f"{path} missing from {files}"
    model_key = "shared" if setting == "shared" else "de"
    assert f"model/{model_key}/raysparse.json" in files

    import mlflow

    local = mlflow.MlflowClient(tracking_server).download_artifacts(result.run_id, f"model/{model_key}",
                                                                     str(tmp_path / "download"))
    model, tokenizer = raysparse.load_model(local), raysparse.load_tokenizer(local)
    lang = "en" if setting == "shared" else "de"
    again = evaluate(model, tokenizer, "xnli", [lang], max_examples=30, seed=0, train_fraction=0.5, verbose=False)
    assert again.metrics[f"xnli/{lang}/accuracy"] == pytest.approx(metrics[f"xnli/{lang}/accuracy"], abs=1e-9)


def _registered_checkpoints(storage: Path) -> int:
    """Checkpoints Ray Train has registered (not merely started writing)."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            return len(json.loads(snapshot.read_text()).get("checkpoint_results", []))
        except (json.JSONDecodeError, OSError):
            return 0
    return 0


def _worker_pids():
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(address=os.environ["RAY_ADDRESS"],
                                       filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]


@pytest.mark.timeout(900)
def test_shared_run_survives_a_killed_worker(ray_local, tracking_server, tmp_path, embedded_dir):
    """Shared one-shot run end to end; one Ray Train worker is killed during fine-tuning."""
    spec = tiny_spec("fault-kill-worker", tracking_server, tmp_path / "runs")
    spec["finetune"]["steps"] = 12
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", run(spec, verbose=False)), daemon=True)
    thread.start()
    storage = tmp_path / "runs"
    deadline = time.time() + 600
    while time.time() < deadline and not _registered_checkpoints(storage):
        time.sleep(0.5)
    assert _registered_checkpoints(storage), "no checkpoint was registered"
    pids = _worker_pids()
    assert len(pids) == 2
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=800)
    assert "result" in outcome, "the run did not complete after a worker was killed"
    metrics = outcome["result"].metrics
    assert metrics.get("resumes", 0) >= 1, "the run restarted from scratch instead of its checkpoint"
    key = spec_key(raysparse.runner.as_spec(spec).model_dump())
    runs = runs_with_key(tracking_server, key)
    assert len(runs) == 1 and runs[0]["info"]["status"] == "FINISHED"
    logged = {m["key"] for m in runs[0]["data"]["metrics"]}
    assert {"xnli/avg/accuracy", "encoder_sparsity", "bytes", "resumes"} <= logged
    check_run(spec, outcome["result"], tracking_server, tmp_path)


BAD_SPECS = [
    ("pruning:\n  sparsity: 1.5\n", "pruning.sparsity: expected a number in [0, 1), got 1.5"),
    ("pruning:\n  algorithm: obd\n", "pruning.algorithm: unknown algorithm 'obd'"),
    ("data:\n  task: glue\n", "data.task: unknown task 'glue'"),
    ("data:\n  task: xnli\n  languages: [de, xx]\n", "data.languages: xx not available for xnli"),
    ("finetune:\n  steps: ten\n", "finetune.steps:"),
    ("prunning:\n  sparsity: 0.5\n", "prunning: unknown key"),
    ("model:\n  source: /no/such/model\n", "model.source: /no/such/model does not exist"),
    ("pruning: [1, 2\n", "is not valid YAML"),
    ("name: ../../../x\n", "name: expected a name without path separators"),
    ("name: a/b/c\n", "name: expected a name without path separators"),
    ("data:\n  task: xnli\n  languages: []\n", "data.languages: List should have at least 1 item"),
    ("efficiency:\n  batch_sizes: [0]\n", "efficiency.batch_sizes.0: Input should be greater than or equal to 1"),
    ("data:\n  task: xnli\n  max_length: 4096\n", "data.max_length: 4096 is longer than the model's 512 positions"),
    ("pruning:\n  iterations: 2\n", "pruning.iterations: only the iterative schedule takes it"),
    ("pruning:\n  algorithm: l0\n  options: {beta: -1}\n", "pruning.options.beta: Input should be greater than 0"),
    ("pruning:\n  schedule: sometimes\n", "pruning.schedule: expected one of one-shot, iterative, gradual, dynamic"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("text,expected", BAD_SPECS)
def test_bad_specs_fail_before_ray_starts(text, expected, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "raysparse.cli", "run", str(path)], capture_output=True, text=True,
                          timeout=100, env={**os.environ, "RAYSPARSE_MLFLOW_ROOT": str(tmp_path / "mlflow")})
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr
    assert not (tmp_path / "mlflow").exists(), "no tracking server may start for a bad spec"
