"""Ray Jobs against the session's cluster (real `ray start` nodes on loopback): `ray job submit`
of a search, `raysparse submit` of a run, results in the session's MLflow server."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raysparse.errors import RaysparseError
from tests.tiny_search import metrics_of, runs_of, tags_of, tiny_base, tiny_search_spec, trial_runs


def client_env(cluster) -> dict:
    """What a user's shell needs for `ray job`: the token (the cluster uses token auth), no RAY_ADDRESS."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.timeout(420)
def test_ray_job_submit_runs_a_search_whose_trials_reach_mlflow(local_cluster, ray_local, tracking_server,
                                                                 tiny_model_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    spec = tiny_search_spec("job-search", tiny_model_dir, tracking_server, tmp_path / "storage")
    (work / "search.yaml").write_text(yaml.safe_dump(spec))
    ray = str(Path(sys.executable).with_name("ray"))
    done = subprocess.run([ray, "job", "submit", "--address", local_cluster.dashboard_url, "--working-dir", str(work),
                           "--", "raysparse", "search", "search.yaml"],
                          capture_output=True, text=True, timeout=400, env=client_env(local_cluster))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "succeeded" in output and "Pareto front" in output, output[-4000:]

    parents, trials = trial_runs(tracking_server, "job-search")
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED"
    assert len(trials) == 2 and len({tags_of(t)["raysparse.trial_id"] for t in trials}) == 2
    for trial in trials:
        assert trial["info"]["status"] == "FINISHED"
        assert "xnli/avg/accuracy" in metrics_of(trial) and "encoder_sparsity" in metrics_of(trial)


@pytest.mark.timeout(300)
def test_raysparse_submit_runs_a_run_and_follows_its_logs(local_cluster, ray_local, tracking_server, tiny_model_dir,
                                                          tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    spec = {"name": "job-run", **tiny_base(tiny_model_dir), "storage": str(tmp_path / "storage")}
    spec["tracking"] = {"experiment": "job-run", "log_models": "none"}   # the URI comes from --tracking-uri
    (work / "run.yaml").write_text(yaml.safe_dump(spec))
    done = subprocess.run([sys.executable, "-m", "raysparse.cli", "submit", str(work / "run.yaml"), "--address",
                           local_cluster.dashboard_url, "--working-dir", str(work), "--tracking-uri", tracking_server],
                          capture_output=True, text=True, timeout=280, env=client_env(local_cluster))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "python -m raysparse.cli run run.yaml" in output       # the entrypoint, echoed
    assert "encoder sparsity" in output                           # the job's own output, followed live
    assert ": SUCCEEDED" in output
    runs = runs_of(tracking_server, "job-run")
    assert len(runs) == 1 and runs[0]["info"]["status"] == "FINISHED"
    assert f"run {runs[0]['info']['run_id']}" in output                # the run the job opened
    assert tags_of(runs[0])["raysparse.kind"] == "run" and "xnli/avg/accuracy" in metrics_of(runs[0])


def test_submit_refuses_what_the_job_could_not_do(tmp_path, monkeypatch):
    from raysparse.jobs import submit

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    spec = {"name": "r", **tiny_base("embedded")}
    (work / "run.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "outside.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(RaysparseError, match="^spec: .*outside working_dir"):
        submit(tmp_path / "outside.yaml", address="http://127.0.0.1:1", working_dir=work)
    with pytest.raises(RaysparseError, match="^tracking.uri: a job needs an MLflow server"):
        submit(work / "run.yaml", address="http://127.0.0.1:1", working_dir=work)
    bad = {**spec, "pruning": {"sparsity": 1.5}}
    (work / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(RaysparseError, match=r"^pruning.sparsity: expected a number in \[0, 1\), got 1.5"):
        submit(work / "bad.yaml", address="http://127.0.0.1:1", working_dir=work, tracking_uri="http://127.0.0.1:2")
    with pytest.raises(RaysparseError, match="^address: could not submit"):
        submit(work / "run.yaml", address="http://127.0.0.1:1", working_dir=work, tracking_uri="http://127.0.0.1:2")


def test_job_runtime_env_carries_tracking_and_storage(tmp_path):
    from raysparse.jobs import entrypoint_for, runtime_env_for, spec_kind

    env = runtime_env_for(tmp_path, "http://mlflow:5000", "s3://bucket/runs", {"A": "1"},
                          base={"pip": ["x==1"], "env_vars": {"HF_HUB_OFFLINE": "1"}})
    assert env == {"pip": ["x==1"], "working_dir": str(tmp_path),
                   "env_vars": {"HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": "http://mlflow:5000",
                                "RAYSPARSE_STORAGE": "s3://bucket/runs", "A": "1"}}
    assert entrypoint_for("search", "experiments/searches/tiny.yaml", resume=True) == \
        "python -m raysparse.cli search experiments/searches/tiny.yaml --resume"
    assert entrypoint_for("run", "my spec.yaml", budget="tiny", overrides=["recovery.steps=4"]) == \
        "python -m raysparse.cli run 'my spec.yaml' --budget tiny --set recovery.steps=4"
    repo = Path(__file__).resolve().parents[1]
    assert spec_kind(repo / "experiments/searches/tiny.yaml") == "search"
    assert spec_kind(repo / "experiments/specs/tiny-xnli.yaml") == "run"


def test_storage_uris_stay_uris(tmp_path, monkeypatch):
    from raysparse.runner import storage_join, storage_path

    monkeypatch.delenv("RAYSPARSE_STORAGE", raising=False)
    assert storage_path("s3://bucket/raysparse/") == "s3://bucket/raysparse"
    assert storage_join(storage_path("gs://b/r"), "search-1234") == "gs://b/r/search-1234"
    assert storage_path(str(tmp_path / "x")) == str((tmp_path / "x").resolve())
    monkeypatch.setenv("RAYSPARSE_STORAGE", "s3://from-env/runs")
    assert storage_path(None) == "s3://from-env/runs"
