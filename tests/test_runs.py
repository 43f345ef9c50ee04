"""Runs on Ray Train end to end: real local Ray (2 workers), real MLflow server, real data."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

import raysparse
from raysparse.data.load import load_split
from raysparse.errors import RaysparseError
from raysparse.runner import as_spec, preflight, run
from raysparse.structure import apply_mask
from raysparse.tracking.runs import RUN_KEY_TAG, spec_key
from raysparse.training.evaluate import evaluate
from raysparse.training.pipeline import build_pipeline
from raysparse.training.session import LocalSession
from raysparse.training.state import STAGES

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


def tiny_model_spec(name, model_dir, tracking_uri=None, storage=None, **sections):
    """A run of the tiny random encoder on a few XNLI rows (English and German), one worker, no latency
    timing and no logged model; ``sections`` update the spec's sections (``finetune={"steps": 40}``)."""
    spec = {"name": name, "model": {"source": str(model_dir)},
            "data": {"task": "xnli", "languages": ["en", "de"], "max_train_examples": 16, "max_eval_examples": 8,
                     "max_length": 32},
            "finetune": {"steps": 4, "batch_size": 4, "cache": False},
            "pruning": {"scoring_examples": 8}, "recovery": {"steps": 2}, "efficiency": {"latency": False},
            "resources": {"num_workers": 1},
            "tracking": {"uri": tracking_uri, "experiment": "test-runs", "log_models": "none"},
            "storage": str(storage) if storage else None}
    for section, values in sections.items():
        spec[section] = {**spec[section], **values}
    return spec


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


def assert_one_entry_per_step(uri, mlflow_run):
    """Every metric of the run has at most one entry per step in its history (a resumed run repeats the
    steps after its checkpoint; they must not be logged twice). Returns the run's metrics."""
    run_id, metrics = mlflow_run["info"]["run_id"], {m["key"]: m["value"] for m in mlflow_run["data"]["metrics"]}
    for key in metrics:
        query = urllib.parse.urlencode({"run_id": run_id, "metric_key": key})
        steps = [m.get("step", 0) for m in rest(uri, f"/api/2.0/mlflow/metrics/get-history?{query}")["metrics"]]
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {sorted(steps)}"
    return metrics


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
    again = evaluate(model, tokenizer, "xnli", [lang], max_examples=30, seed=0, train_fraction=0.5, max_length=48,
                     verbose=False)   # as the run evaluates: at its data.max_length
    assert again.metrics[f"xnli/{lang}/accuracy"] == pytest.approx(metrics[f"xnli/{lang}/accuracy"], abs=1e-9)
    # Accuracy of a near-chance model says little: the logged model must compute the logits the run's
    # own final model (its last Ray Train checkpoint) computes under that mask, as evaluation applied it.
    final = restore_final(spec, result, tmp_path / "restore")
    rows = load_split("xnli", lang, "dev").select(range(24))
    batch = tokenizer(list(rows["sentence1"]), list(rows["sentence2"]), truncation=True, max_length=48, padding=True,
                      return_tensors="pt")
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad(), apply_mask(final.model, final.state.masks[model_key]):
        expected = final.model.eval()(**batch)["logits"]
    with torch.no_grad():
        logits = model.eval()(**batch)["logits"]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert logits.argmax(-1).tolist() == expected.argmax(-1).tolist()


def restore_final(spec, result, folder):
    """The run's pipeline rebuilt in this process from its newest Ray Train checkpoint (the model it ended with)."""
    from raysparse.training.pipeline import build_pipeline
    from raysparse.training.session import LocalSession

    checkpoints = sorted((p for p in Path(result.storage).glob(f"{spec['name']}-*/checkpoint_*") if p.is_dir()),
                         key=lambda p: p.name)   # checkpoint_<date>_<time>: the newest last
    assert checkpoints, f"no Ray Train checkpoint under {result.storage}"
    shutil.copytree(checkpoints[-1], folder / "checkpoint")
    final = build_pipeline(raysparse.runner.as_spec(spec), result.languages, LocalSession(folder))
    assert final.state.metrics.get("encoder_sparsity") == pytest.approx(result.metrics["encoder_sparsity"])
    return final


def _snapshot(storage: Path) -> dict:
    """Ray Train's record of the checkpoints it has registered (not merely started writing)."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            return json.loads(snapshot.read_text())
        except (json.JSONDecodeError, OSError):
            return {}
    return {}


def _registered_checkpoints(storage: Path) -> int:
    return len(_snapshot(storage).get("checkpoint_results", []))


def _latest_checkpoint(storage: Path) -> tuple[int, int]:
    """(stage index, step in the stage) of the newest registered checkpoint: where a restart continues."""
    metrics = _snapshot(storage)["latest_checkpoint_result"]["metrics"]
    return int(metrics["stage_index"]), int(metrics["stage_step"])


def _resumed_at(output: str) -> tuple[int, int]:
    """(stage index, step) of the worker's ``[resume]`` line in the driver's output."""
    found = re.findall(r"\[resume\] continuing at stage (\w+), step (\d+)", output)
    assert len(found) == 1, f"expected one resume, found {found}"
    return STAGES.index(found[0][0]), int(found[0][1])


def _worker_pids():
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(address=os.environ["RAY_ADDRESS"],
                                       filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]


def _one_worker_after_a_checkpoint(storage: Path) -> int:
    """The pid of the run's one Ray Train worker, once a checkpoint of the run is registered."""
    deadline = time.time() + 300
    pids = []
    while time.time() < deadline and not (pids and _registered_checkpoints(storage)):
        pids = pids or _worker_pids()
        time.sleep(0.1)
    assert len(pids) == 1 and _registered_checkpoints(storage), f"no checkpoint (workers: {pids})"
    return pids[0]


@pytest.mark.timeout(900)
def test_shared_run_survives_a_killed_worker(ray_local, tracking_server, tmp_path, tiny_model_dir, capsys):
    """Shared one-shot run end to end on the tiny encoder (two workers: e5 runs on Ray Train in the per-language
    test above); one Ray Train worker is killed during fine-tuning. The worker group restarts from a checkpoint
    at least as late as the newest one registered before the kill (a checkpoint step, not the start of the
    stage), and the steps it repeats are not logged twice."""
    spec = tiny_spec("fault-kill-worker", tracking_server, tmp_path / "runs")
    spec["model"] = {"source": str(tiny_model_dir)}
    spec["finetune"]["steps"] = 200   # seconds on the tiny encoder: the kill lands mid-stage
    spec["resources"]["checkpoint_every"] = 20
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
    before = _latest_checkpoint(storage)
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=800)
    assert "result" in outcome, "the run did not complete after a worker was killed"
    metrics = outcome["result"].metrics
    assert metrics.get("resumes", 0) >= 1, "the run restarted from scratch instead of its checkpoint"
    stage, step = _resumed_at(capsys.readouterr().out)   # the worker's line, forwarded to this driver
    assert before <= (stage, step) < (STAGES.index("done"), 0), (before, (stage, step))
    assert step % spec["resources"]["checkpoint_every"] == 0, step
    key = spec_key(raysparse.runner.as_spec(spec).model_dump())
    runs = runs_with_key(tracking_server, key)
    assert len(runs) == 1 and runs[0]["info"]["status"] == "FINISHED"
    logged = assert_one_entry_per_step(tracking_server, runs[0])
    assert {"xnli/avg/accuracy", "encoder_sparsity", "bytes", "resumes"} <= set(logged)
    check_run(spec, outcome["result"], tracking_server, tmp_path)


STAGE_COSTS = [f"cost/{stage}/{kind}" for stage in ("finetune", "prune", "recover", "evaluate")
               for kind in ("wall_s", "cpu_s")]


@pytest.mark.timeout(600)
def test_a_killed_driver_continues_into_the_same_mlflow_run(ray_local, tracking_server, tmp_path, tiny_model_dir,
                                                             capsys):
    """`raysparse run` killed (SIGKILL) after a checkpoint, then the same spec run again (here, in this
    process: what the command calls): it continues the same MLflow run from the newest checkpoint (its
    stage and step) and ends it FINISHED, with one entry per step in every metric's history and the cost
    of every stage; checkpoints leave out the frozen word-embedding table, which the restart reloads
    from the model source."""
    storage = tmp_path / "runs"
    spec = tiny_model_spec("driver-killed", tiny_model_dir, tracking_server, storage, finetune={"steps": 40},
                           resources={"checkpoint_every": 8})
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec))   # JSON is YAML
    command = [sys.executable, "-m", "raysparse.cli", "run", str(path)]   # RAY_ADDRESS: the session's cluster
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        worker = _one_worker_after_a_checkpoint(storage)
        os.kill(worker, signal.SIGSTOP)   # it cannot finish the run while its driver dies
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    deadline = time.time() + 60
    while time.time() < deadline and _worker_pids():   # Ray ends the dead driver's workers
        time.sleep(0.5)
    assert not _worker_pids(), "the killed driver's worker is still alive"
    with contextlib.suppress(ProcessLookupError):
        os.kill(worker, signal.SIGKILL)   # its process, should Ray not have ended it yet
    stopped_at = _latest_checkpoint(storage)
    assert stopped_at < (STAGES.index("done"), 0), "the run ended before its driver was killed"
    run_id = re.search(r"MLflow \S+ run (\w+);", (tmp_path / "first.log").read_text())[1]
    assert rest(tracking_server, f"/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]["info"]["status"] == "RUNNING"

    capsys.readouterr()
    assert run(spec).run_id == run_id
    again = capsys.readouterr().out   # the driver's lines and its worker's, forwarded
    assert f"run driver-killed: resuming; MLflow {tracking_server} run {run_id};" in again, again
    assert _resumed_at(again) == stopped_at
    [mlflow_run] = runs_with_key(tracking_server, spec_key(as_spec(spec).model_dump()))
    assert (mlflow_run["info"]["run_id"], mlflow_run["info"]["status"]) == (run_id, "FINISHED")
    metrics = assert_one_entry_per_step(tracking_server, mlflow_run)
    assert metrics["resumes"] == 1 and "xnli/avg/accuracy" in metrics
    assert all(metrics[key] > 0 for key in STAGE_COSTS), {key: metrics.get(key) for key in STAGE_COSTS}

    from safetensors import safe_open

    checkpoints = sorted(storage.glob("driver-killed-*/checkpoint_*/model.safetensors"))
    assert checkpoints
    for checkpoint in checkpoints:
        with safe_open(str(checkpoint), "pt") as weights:
            names = list(weights.keys())
        assert any("position_embeddings" in name for name in names), names
        assert not any("word_embeddings" in name for name in names), names


@pytest.mark.timeout(600)
def test_a_worker_killed_past_max_failures_fails_the_run_and_keeps_its_checkpoints(ray_local, tracking_server,
                                                                                  tmp_path, tiny_model_dir):
    """With ``resources.max_failures: 0`` one killed worker is one failure too many: the driver ends with
    a one-line error that says how to resume, the MLflow run ends FAILED, and the registered checkpoints
    stay in the storage folder for that rerun."""
    storage = tmp_path / "runs"
    spec = tiny_model_spec("worker-killed", tiny_model_dir, tracking_server, storage, finetune={"steps": 40},
                           resources={"checkpoint_every": 8, "max_failures": 0})
    outcome = {}

    def execute():
        try:
            outcome["result"] = run(spec, verbose=False)
        except RaysparseError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=execute, daemon=True)
    thread.start()
    os.kill(_one_worker_after_a_checkpoint(storage), signal.SIGKILL)
    thread.join(timeout=300)
    assert "error" in outcome, f"the run did not fail: {outcome}"
    assert "\n" not in outcome["error"] and outcome["error"].startswith("run worker-killed failed: worker 0: "), \
        outcome["error"]
    assert outcome["error"].endswith("(rerun the same spec to resume)"), outcome["error"]
    [mlflow_run] = runs_with_key(tracking_server, spec_key(as_spec(spec).model_dump()))
    assert mlflow_run["info"]["status"] == "FAILED"
    snapshot = _snapshot(storage)
    kept = [result["checkpoint_dir_name"] for result in snapshot["checkpoint_results"]]
    assert kept, snapshot
    [folder] = storage.glob("worker-killed-*")
    for name in kept:
        assert (folder / name / "state.json").is_file() and (folder / name / "model.safetensors").is_file(), name


@pytest.mark.timeout(300)
@pytest.mark.parametrize("regime,trained", [("zero-shot", ["en"]), ("translate-train", ["de", "en"]),
                                            ("in-language", ["de"])])
def test_each_regime_fine_tunes_on_the_rows_it_names(regime, trained, tiny_model_dir):
    """``data.regime`` decides what fine-tuning reads for German: English (zero-shot), English and German
    (translate-train) or German alone (in-language), each from the train part of its file (never the
    rows evaluation scores)."""
    spec = as_spec(tiny_model_spec(f"regime-{regime}", tiny_model_dir, data={"regime": regime, "languages": ["de"]},
                                   pruning={"scoring_languages": ["en"]}))   # scoring reads none of German's rows
    languages = preflight(spec)
    assert languages["finetune"] == trained
    pipeline = build_pipeline(spec, languages, LocalSession())
    pipeline.finetune()
    assert sorted(pipeline.data.sources) == trained   # the rows it read, and no others
    for language in trained:
        assert pipeline.data.sources[language].startswith(f"xnli/dev-{language}.tsv, train part: "), \
            pipeline.data.sources[language]


@pytest.mark.timeout(300)
def test_scoring_languages_choose_the_rows_that_score_importance(tiny_model_dir):
    """``pruning.scoring_languages`` decides whose rows score the units: English, German and the default
    (the evaluation languages, both) give three different score tensors for the same model, and the
    German-scored run read German's training rows."""
    def scored(scoring):
        spec = as_spec(tiny_model_spec("scoring", tiny_model_dir, finetune={"steps": 0},
                                       pruning={"scoring_languages": scoring}))
        languages = preflight(spec)
        assert languages["scoring"] == (scoring or ["en", "de"])
        pipeline = build_pipeline(spec, languages, LocalSession())
        pipeline.finetune()   # no steps: the same model for every choice
        pipeline.prune()
        return pipeline

    english, german, both = scored(["en"]), scored(["de"]), scored(None)
    assert german.data.sources["de"].startswith("xnli/dev-de.tsv, train part: ")
    assert "de" not in english.data.sources
    heads = [run.state.scores["shared"].heads for run in (english, german, both)]
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])
    assert not torch.equal(heads[1], heads[2])


@pytest.mark.timeout(600)
def test_a_worker_failure_ends_the_run_in_the_workers_own_words(ray_local, tracking_server, tmp_path, tiny_model_dir):
    """A failure only a worker can see (the loss diverges): the driver's last line is the worker's
    error, not Ray Train's "Training failed due to worker errors", and the MLflow run ends FAILED."""
    spec = tiny_model_spec("worker-nan", tiny_model_dir, tracking_server, tmp_path / "runs",
                           finetune={"learning_rate": 1e30}, recovery={"steps": 0}, resources={"max_failures": 0})
    path = tmp_path / "nan.yaml"
    path.write_text(json.dumps(spec))   # JSON is YAML
    proc = subprocess.run([sys.executable, "-m", "raysparse.cli", "run", str(path)], capture_output=True, text=True,
                          timeout=540)   # RAY_ADDRESS: the session's cluster
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: run worker-nan failed: worker 0: training: the loss became "), last
    assert "expected a finite number" in last and "Training failed" not in last, last
    run_id = re.search(r"MLflow \S+ run (\w+);", proc.stdout)[1]   # the run the driver opened
    assert rest(tracking_server, f"/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]["info"]["status"] == "FAILED"


def test_worker_and_controller_errors_are_named_by_their_own_last_line():
    """What ``fit_tracked`` reports for Ray Train's errors (the run above shows it end to end)."""
    from ray.train import ControllerError, WorkerGroupError

    from raysparse.runner import worker_error

    trace = ("Traceback (most recent call last):\n  File ...\n"
             "raysparse.errors.RaysparseError: training: the loss became nan")
    failed = WorkerGroupError("[Rank 1]\n" + trace, {1: Exception(trace), 0: Exception(trace)})
    assert worker_error(failed) == ("worker 0: training: the loss became nan (and 1 more worker(s))", True)
    oom = WorkerGroupError("...", {0: Exception("Traceback ...\nRuntimeError: CUDA out of memory")})
    assert worker_error(oom) == ("worker 0: RuntimeError: CUDA out of memory", False)
    assert worker_error(ControllerError(ValueError("placement group timed out"))) == (
        "controller: placement group timed out", False)
    assert worker_error(ValueError("elsewhere")) == (None, False)


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
    ("# nothing but a comment\n", "is empty (expected a mapping of spec fields; write {} to run every default)"),
]


def refused(tmp_path, command, text, *args, env=None, lines=1):
    """``raysparse COMMAND SPEC ARGS`` on a bad spec, on a local cluster (no RAY_ADDRESS): it exits 2 with
    ``lines`` lines on stderr, the last one ``error: ...``, prints nothing else (Ray logs its start on
    stderr) and starts no tracking server. Returns those lines."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "raysparse.cli", command, str(path), *args], capture_output=True,
                          text=True, timeout=100,
                          env={**base, "RAYSPARSE_MLFLOW_ROOT": str(tmp_path / "mlflow"), **(env or {})})
    assert proc.returncode == 2, proc.stderr
    out = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(out) == lines and out[-1].startswith("error: "), proc.stderr
    assert not proc.stdout.strip(), proc.stdout
    assert not (tmp_path / "mlflow").exists(), "no tracking server may start for a bad spec"
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("text,expected", BAD_SPECS)
def test_bad_specs_fail_before_ray_starts(text, expected, tmp_path):
    assert expected in refused(tmp_path, "run", text)[0]


TATOEBA_DE = "data:\n  task: tatoeba\n  languages: [de]\n"


def data_copy(tmp_path, data_dir, rows=40):
    """The first ``rows`` lines of German Tatoeba and of English and German XNLI dev, copied from the real data."""
    root = tmp_path / "xtreme"
    for task, names in {"tatoeba": ["tatoeba.de-eng.de", "tatoeba.de-eng.eng"],
                        "xnli": ["dev-en.tsv", "dev-de.tsv"]}.items():
        (root / task).mkdir(parents=True)
        for name in names:
            lines = (data_dir / task / name).read_text(encoding="utf-8").splitlines(keepends=True)[:rows]
            (root / task / name).write_text("".join(lines), encoding="utf-8")
    return root


def model_copy(tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def truncated_weights(tmp_path, tiny_model_dir, data_dir):
    folder = model_copy(tmp_path, tiny_model_dir)
    truncate(folder / "model.safetensors")
    return f"{TATOEBA_DE}model:\n  source: {folder}\n", [f"model.source: {folder / 'model.safetensors'} cannot be read",
                                                           "corrupt or truncated"]


def truncated_plain_weights(tmp_path, tiny_model_dir, data_dir):
    """A transformers folder (no raysparse.json) whose safetensors file lost its second half."""
    from transformers import BertConfig, BertModel

    folder = tmp_path / "plain"
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder)
    truncate(folder / "model.safetensors")
    return f"{TATOEBA_DE}model:\n  source: {folder}\n", [f"model.source: {folder / 'model.safetensors'} cannot be read"]


def truncated_config(tmp_path, tiny_model_dir, data_dir):
    folder = model_copy(tmp_path, tiny_model_dir)
    truncate(folder / "config.json")
    return f"{TATOEBA_DE}model:\n  source: {folder}\n", [f"model.source: cannot read the config of {folder}",
                                                           str(folder / "config.json")]


def sidecar(content):
    def build(tmp_path, tiny_model_dir, data_dir):
        folder = model_copy(tmp_path, tiny_model_dir)
        path = folder / "raysparse.json"
        text, expected = content(path.read_text())
        path.write_text(text)
        return f"{TATOEBA_DE}model:\n  source: {folder}\n", [f"checkpoint: {path} {expected}"]
    return build


def without_structure(text):
    data = json.loads(text)
    del data["structure"]
    return json.dumps(data), "has no structure"


def malformed_xnli_row(tmp_path, tiny_model_dir, data_dir):
    root = data_copy(tmp_path, data_dir)
    path = root / "xnli" / "dev-de.tsv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[2] = "Er sagte kein Wort.\tneutral\n"    # the premise is missing
    path.write_text("".join(lines), encoding="utf-8")
    return (f"data:\n  task: xnli\n  languages: [en, de]\n  dir: {root}\n",
            [f"{path} line 3: expected 3 tab-separated fields (sentence1, sentence2, label), found 2"])


def unequal_tatoeba(tmp_path, tiny_model_dir, data_dir):
    root = data_copy(tmp_path, data_dir)
    english = root / "tatoeba" / "tatoeba.de-eng.eng"
    english.write_text("".join(english.read_text(encoding="utf-8").splitlines(keepends=True)[:-1]), encoding="utf-8")
    return (f"{TATOEBA_DE}  dir: {root}\n",
            [f"{root / 'tatoeba' / 'tatoeba.de-eng.de'}: has 40 lines but tatoeba.de-eng.eng has 39"])


def too_many_cpus(tmp_path, tiny_model_dir, data_dir):
    return (f"{TATOEBA_DE}resources:\n  num_workers: 512\n",
            ["resources: a run of 512 workers x 1 CPUs needs 512 CPUs but this machine (a local Ray) has"])


def unreachable(tmp_path, tiny_model_dir, data_dir):
    from raysparse.cluster import free_port

    address = f"127.0.0.1:{free_port('127.0.0.1')}"
    return (TATOEBA_DE, [f"address: no Ray cluster answers at {address} (from --address): Connection refused"],
            ["--address", address])


# Bad files and clusters `raysparse run` refuses in its pre-cluster checks (runner.preflight, check_cluster).
BAD_INPUTS = {
    "truncated-safetensors": truncated_weights,
    "truncated-plain-safetensors": truncated_plain_weights,
    "truncated-config": truncated_config,
    "sidecar-not-an-object": sidecar(lambda text: ("[1, 2]", "holds a JSON list, not an object")),
    "sidecar-without-structure": sidecar(without_structure),
    "sidecar-not-json": sidecar(lambda text: (text[: len(text) // 2], "is not valid JSON")),
    "malformed-data-row": malformed_xnli_row,
    "unequal-tatoeba-files": unequal_tatoeba,
    "more-cpus-than-the-machine": too_many_cpus,
    "unreachable-address": unreachable,
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_files_and_clusters_fail_before_ray_starts(case, tmp_path, tiny_model_dir, data_dir):
    text, expected, *args = BAD_INPUTS[case](tmp_path, tiny_model_dir, data_dir)
    line = refused(tmp_path, "run", text, *(args[0] if args else []))[0]
    assert all(part in line for part in expected), line


SEARCH = ("name: bad-search\nbase:\n  data: {{task: tatoeba, languages: [de]}}\n  model: {{source: {model}}}\n"
          "  resources: {{num_workers: {workers}, cpus_per_worker: {cpus}}}\n"
          "space:\n  pruning.sparsity: {{choice: [0.3, 0.5]}}\nnum_samples: 3\nmax_concurrent: {concurrent}\n"
          "storage: {storage}\n")


def search_spec(tmp_path, model="embedded", workers=1, cpus=1, concurrent=1):
    return SEARCH.format(model=model, workers=workers, cpus=cpus, concurrent=concurrent, storage=tmp_path / "runs")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["trial-too-large", "truncated-safetensors", "unreachable-address"])
def test_bad_searches_fail_before_ray_starts(case, tmp_path, tiny_model_dir, data_dir):
    """`raysparse search` runs the same pre-cluster checks: a trial larger than the machine, a broken
    model, a cluster that does not answer."""
    if case == "trial-too-large":
        line = refused(tmp_path, "search", search_spec(tmp_path, workers=512))[0]
        assert "base.resources: a trial (512 workers x 1 CPUs + its driver) needs 512.25 CPUs but this machine" in line
    elif case == "truncated-safetensors":
        folder = model_copy(tmp_path, tiny_model_dir)
        truncate(folder / "model.safetensors")
        line = refused(tmp_path, "search", search_spec(tmp_path, model=folder))[0]
        assert f"model.source: {folder / 'model.safetensors'} cannot be read" in line
    else:
        _, expected, args = unreachable(tmp_path, tiny_model_dir, data_dir)
        line = refused(tmp_path, "search", search_spec(tmp_path), *args)[0]
        assert expected[0] in line


@pytest.mark.timeout(120)
def test_more_concurrent_trials_than_the_machine_holds_is_one_warning(tmp_path):
    """max_concurrent above what the cluster holds: one line says how many trials will run at once.
    (--resume of a search never run ends it right after, before Ray starts.)"""
    from raysparse.runner import local_capacity

    machine = local_capacity()["CPU"]
    trial = round(machine * 0.6, 2)   # one fits, two do not
    warning, error = refused(tmp_path, "search", search_spec(tmp_path, cpus=trial, concurrent=3), "--resume", lines=2)
    assert warning == (f"warning: max_concurrent: 3 trials at a time asked, but a trial needs {trial:g} CPUs and "
                       f"this machine (a local Ray) has {machine:g}: 1 will run at a time"), warning
    assert error.startswith("error: search: nothing to resume at"), error


@pytest.mark.timeout(60)
def test_an_address_without_a_ray_cluster_fails_within_the_connect_timeout():
    """Refused, silent or answering something else than a Ray GCS: one line within seconds (Ray's own
    connect would retry for half a minute)."""
    import http.server

    from raysparse.cluster import free_port
    from raysparse.errors import RaysparseError
    from raysparse.runner import CONNECT_TIMEOUT_S, check_address

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for address, reason in ((f"127.0.0.1:{free_port('127.0.0.1')}", "Connection refused"),
                                (f"127.0.0.1:{server.server_port}", "something listens there, but no Ray GCS")):
            start = time.monotonic()
            with pytest.raises(RaysparseError, match="address: no Ray cluster answers at") as refused_:
                check_address(address)
            assert reason in str(refused_.value)
            assert time.monotonic() - start < 2 * CONNECT_TIMEOUT_S + 1
    finally:
        server.shutdown()
