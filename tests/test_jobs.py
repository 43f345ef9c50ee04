"""Ray Jobs against the session's cluster (real `ray start` nodes on loopback): `ray job submit`
of a search, `raysparse submit` of a run, results in the session's MLflow server."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raysparse.cli import main
from raysparse.errors import RaysparseError
from raysparse.search.report import load_runs
from tests.tiny_search import metrics_of, runs_of, tags_of, tiny_base, tiny_search_spec, trial_runs


def client_env(cluster) -> dict:
    """What a user's shell needs for `ray job`: the token (the cluster uses token auth), no RAY_ADDRESS."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.timeout(420)
def test_ray_job_submit_runs_a_search_whose_trials_reach_mlflow(local_cluster, ray_local, tracking_server,
                                                                 tiny_model_dir, tmp_path, capsys):
    """A search submitted with `ray job submit` logs every trial to MLflow; `raysparse report NAME` then finds
    it there by its name and reports exactly those trials."""
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

    capsys.readouterr()
    out = tmp_path / "report"
    assert main(["report", "job-search", "--tracking-uri", tracking_server, "--out", str(out)]) == 0
    assert "search job-search: 2 finished trials" in capsys.readouterr().out
    reported = {row["run_id"]: row for row in load_runs(out).rows}
    assert reported.keys() == {t["info"]["run_id"] for t in trials}
    for trial in trials:
        assert reported[trial["info"]["run_id"]]["xnli/avg/accuracy"] == metrics_of(trial)["xnli/avg/accuracy"]
    assert main(["report", "no-such-search", "--tracking-uri", tracking_server]) == 2
    assert capsys.readouterr().err.startswith("error: report: no search named 'no-such-search' in MLflow")


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


def jobs_client(cluster, monkeypatch):
    """Ray's jobs client for ``cluster`` (this process holds its token), at its explicit address: RAY_ADDRESS
    would win over it."""
    from ray.job_submission import JobSubmissionClient

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return JobSubmissionClient(cluster.dashboard_url)


@pytest.mark.timeout(300)
def test_submit_hands_the_job_its_environment_and_exits_non_zero_when_it_fails(
        local_cluster, ray_local, tracking_server, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Two jobs whose driver stops in its preflight (no training): `--no-wait` returns while its job is still
    pending, without its output, and that job's own error names the `--storage` it was given; a followed job
    reads its data folder from `--runtime-env`, prints its own error, and its failure makes `raysparse submit`
    exit non-zero. Ray holds each job's environment as `--runtime-env`, `--env`, `--storage` and
    `--tracking-uri` say."""
    from raysparse.jobs import wait

    work = tmp_path / "work"
    work.mkdir()
    (work / "run.yaml").write_text(yaml.safe_dump({"name": "job-env", **tiny_base(tiny_model_dir)}))
    submit = ["submit", str(work / "run.yaml"), "--address", local_cluster.dashboard_url, "--working-dir", str(work),
              "--tracking-uri", tracking_server]
    client = jobs_client(local_cluster, monkeypatch)
    suffix = tmp_path.name[-12:]

    storage_file = tmp_path / "storage-is-a-file"
    storage_file.write_text("")
    unfollowed = f"no-wait-{suffix}"
    assert main([*submit, "--storage", str(storage_file), "--no-wait", "--job-id", unfollowed]) == 0
    out = capsys.readouterr().out
    assert f"job {unfollowed}: PENDING" in out or f"job {unfollowed}: RUNNING" in out, out
    assert "storage:" not in out                                   # its logs are not followed

    no_data = tmp_path / "no-data"
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump({"env_vars": {"RAYSPARSE_DATA": str(no_data)}}))
    followed = f"follow-{suffix}"
    code = main([*submit, "--runtime-env", str(tmp_path / "runtime_env.yaml"), "--env", "RAYSPARSE_TEST_MARK=set",
                 "--storage", str(tmp_path / "storage"), "--job-id", followed])
    captured = capsys.readouterr()
    assert code == 2, captured.out[-4000:]
    assert f"data.dir: {no_data} is not a directory" in captured.out, captured.out[-4000:]   # the job's own line
    assert f"job {followed}: FAILED" in captured.out
    assert captured.err.startswith(f"error: job {followed} failed")
    assert client.get_job_info(followed).runtime_env["env_vars"] == {
        "RAYSPARSE_DATA": str(no_data), "MLFLOW_TRACKING_URI": tracking_server,
        "RAYSPARSE_STORAGE": str(tmp_path / "storage"), "RAYSPARSE_TEST_MARK": "set"}

    assert wait(client, unfollowed, "", timeout=120).status == "FAILED"
    assert f"error: storage: {storage_file} is a file" in client.get_job_logs(unfollowed)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ui_starts_the_mlflow_server_once_and_it_serves_the_ui(tmp_path, monkeypatch, capsys):
    """`raysparse ui` starts the local MLflow server where none runs (on 127.0.0.1, at `--port`), prints its
    address and leaves it serving the UI; asked again, it gives the same server instead of a second one."""
    import urllib.request

    from raysparse.cluster import free_port
    from raysparse.tracking.server import stop_server

    root = tmp_path / "mlflow"
    monkeypatch.setenv("RAYSPARSE_MLFLOW_ROOT", str(root))
    uri = f"http://127.0.0.1:{free_port('127.0.0.1')}"
    try:
        assert main(["ui", "--port", uri.rsplit(":", 1)[1]]) == 0
        assert capsys.readouterr().out.startswith(f"MLflow UI: {uri} ")
        with urllib.request.urlopen(f"{uri}/", timeout=60) as page:
            assert page.status == 200 and "<title>MLflow</title>" in page.read().decode()
        assert main(["ui"]) == 0
        assert capsys.readouterr().out.startswith(f"MLflow UI: {uri} ")
    finally:
        assert stop_server(root)
