"""Runs on Ray Train end to end: real local Ray (2 workers), real MLflow server, real data."""

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
from raysparse.runner import run
from raysparse.structure import apply_mask
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


@pytest.mark.timeout(600)
def test_a_worker_failure_ends_the_run_in_the_workers_own_words(ray_local, tracking_server, tmp_path, tiny_model_dir):
    """A failure only a worker can see (the loss diverges): the driver's last line is the worker's
    error, not Ray Train's "Training failed due to worker errors", and the MLflow run ends FAILED."""
    spec = {"name": "worker-nan", "model": {"source": str(tiny_model_dir)},
            "data": {"task": "xnli", "languages": ["en", "de"], "max_train_examples": 16, "max_eval_examples": 8,
                     "max_length": 32},
            "finetune": {"steps": 4, "batch_size": 4, "learning_rate": 1e30, "cache": False},
            "pruning": {"scoring_examples": 8}, "recovery": {"steps": 0}, "efficiency": {"latency": False},
            "resources": {"num_workers": 1, "max_failures": 0},
            "tracking": {"uri": tracking_server, "experiment": "test-runs", "log_models": "none"},
            "storage": str(tmp_path / "runs")}
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
