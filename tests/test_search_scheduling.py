"""ASHA stops weak trials early on quality after the same number of recovery steps; TPE and NSGA-II
run past their random start-up trials, and the later trials are the sampler's own suggestions; work larger
than the running cluster a driver joins is refused in one line before MLflow hears of it."""

from statistics import mean

import pytest

from raysparse.search import search
from tests.test_runs import rest
from tests.tiny_search import metrics_of, runs_of, tags_of, tiny_base, tiny_search_spec, trial_runs


@pytest.mark.timeout(900)
def test_asha_stops_weak_trials_at_the_first_rung_of_recovery(ray_local, tracking_server, tmp_path, embedded_dir):
    """One strong trial (10% sparsity), then two weak ones (85%): ASHA (one objective, Tatoeba top-1)
    lets the first through every rung and stops the others after 2 of 4 recovery steps. Each trial in a
    process of its own (`reuse_trial_processes: false`)."""
    spec = {"name": "asha", "num_samples": 3, "max_concurrent": 1, "sampler": "random", "reuse_trial_processes": False,
            "objectives": [{"metric": "tatoeba/avg/accuracy", "mode": "max"}],
            "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
            "space": {"pruning.sparsity": {"choice": [0.1, 0.85]}},
            "trials": [{"pruning.sparsity": 0.1}, {"pruning.sparsity": 0.85}, {"pruning.sparsity": 0.85}],
            "base": {"data": {"task": "tatoeba", "languages": ["de", "fr"], "max_eval_examples": 48,
                              "max_length": 32},
                     "finetune": {"steps": 0, "batch_size": 8}, "pruning": {"scoring_examples": 16},
                     "recovery": {"steps": 4, "learning_rate": 1e-5}, "efficiency": {"latency": False},
                     "resources": {"num_workers": 1, "checkpoint_every": 50}, "tracking": {"log_models": "none"}},
            "tracking": {"uri": tracking_server, "experiment": "asha"}, "storage": str(tmp_path / "search")}
    result = search(spec, verbose=False)
    by_sparsity = sorted(result.rows, key=lambda r: r["pruning.sparsity"])
    assert [r["status"] for r in by_sparsity] == ["done", "stopped", "stopped"], result.table()
    assert [r.get("recovery_step") for r in by_sparsity[1:]] == [2.0, 2.0]
    assert by_sparsity[0]["tatoeba/avg/accuracy"] > max(r["tatoeba/avg/accuracy"] for r in by_sparsity[1:])
    assert [r["suggested_by"] for r in result.rows] == ["fixed"] * 3
    assert len({r["pid"] for r in result.rows}) == 3, "a fresh process per trial"

    _, trials = trial_runs(tracking_server, "asha")
    stopped = [tags_of(t).get("raysparse.stopped_early") for t in trials if t["info"]["status"] == "KILLED"]
    assert stopped == ["ASHA at recovery step 2"] * 2
    finished = [t for t in trials if t["info"]["status"] == "FINISHED"]
    assert len(finished) == 1
    # the finished trial's quality over recovery: evaluated at steps 2 (a rung) and at the end
    history = rest(tracking_server, "/api/2.0/mlflow/metrics/get-history?run_id="
                   f"{finished[0]['info']['run_id']}&metric_key=tatoeba/avg/accuracy")["metrics"]
    assert len(history) >= 2 and 2 in {m.get("step", 0) for m in history}


def sampler_search(name, sampler, objectives, model_dir, tracking_uri, storage):
    spec = tiny_search_spec(name, model_dir, tracking_uri, storage, num_samples=8, max_concurrent=1,
                            finetune_steps=0)
    spec.update({"sampler": sampler, "startup_trials": 3, "objectives": objectives, "seed": 3})
    spec["space"] = {"pruning.sparsity": {"uniform": [0.05, 0.9]}}
    spec["base"]["recovery"]["steps"] = 0
    return search(spec, verbose=False)


@pytest.mark.timeout(900)
def test_tpe_models_the_results_after_its_start_up_trials(ray_local, tracking_server, tmp_path, tiny_model_dir):
    """Minimising encoder sparsity: after 3 random trials TPE suggests the rest, and lower ones; one at a
    time, every trial runs in the process the first one started (reused)."""
    result = sampler_search("tpe", "tpe", [{"metric": "encoder_sparsity", "mode": "min"}], tiny_model_dir,
                            tracking_server, tmp_path / "tpe")
    rows = result.rows
    marks = [r["suggested_by"] for r in rows]
    assert marks.count("random") == 3 and marks.count("tpe") == 5, marks
    random_trials = [r["pruning.sparsity"] for r in rows if r["suggested_by"] == "random"]
    tpe_trials = [r["pruning.sparsity"] for r in rows if r["suggested_by"] == "tpe"]
    assert mean(tpe_trials) < mean(random_trials), (random_trials, tpe_trials)
    assert len({r["pid"] for r in rows}) == 1, [r["pid"] for r in rows]


@pytest.mark.timeout(900)
def test_nsga2_breeds_offspring_after_its_first_generation(ray_local, tracking_server, tmp_path, tiny_model_dir):
    result = sampler_search("nsga2", "nsga2", [{"metric": "xnli/avg/accuracy", "mode": "max"},
                                               {"metric": "encoder_sparsity", "mode": "max"}],
                            tiny_model_dir, tracking_server, tmp_path / "nsga2")
    marks = [r["suggested_by"] for r in result.rows]
    assert marks.count("random") == 3 and marks.count("nsga2") == 5, marks
    parents, _ = trial_runs(tracking_server, "nsga2")
    assert metrics_of(parents[0])["sampler_suggested_trials"] == 5


@pytest.mark.timeout(300)
@pytest.mark.parametrize("command", ["run", "search"])
def test_work_larger_than_the_joined_cluster_is_refused_before_mlflow(command, ray_local, tracking_server, tmp_path,
                                                                      tiny_model_dir):
    """Joined to a running cluster (RAY_ADDRESS; the local-machine case is in test_runs.py), a run or a search
    trial asking one CPU more than the cluster holds fails in one line saying what it needs and what the cluster
    has (Ray would wait for the resources forever), and no MLflow run is opened."""
    import os

    from raysparse.errors import RaysparseError
    from raysparse.runner import run

    cluster = ray_local.cluster_resources()["CPU"]
    workers = int(cluster) + 1
    name = f"too-large-{command}"
    if command == "run":
        spec = {"name": name, **tiny_base(tiny_model_dir), "storage": str(tmp_path)}
        spec["resources"]["num_workers"] = workers
        spec["tracking"] = {"uri": tracking_server, "experiment": name}
        expected = f"resources: a run of {workers} workers x 1 CPUs needs {workers} CPUs"
    else:
        spec = tiny_search_spec(name, tiny_model_dir, tracking_server, tmp_path)
        spec["base"]["resources"]["num_workers"] = workers
        expected = f"base.resources: a trial ({workers} workers x 1 CPUs + its driver) needs {workers + 0.25:g} CPUs"
    with pytest.raises(RaysparseError) as refused:
        run(spec, verbose=False) if command == "run" else search(spec, verbose=False)
    message = str(refused.value)
    assert message.startswith(expected) and "\n" not in message, message
    assert f"but the cluster at {os.environ['RAY_ADDRESS']} has {cluster:g} " in message, message
    assert runs_of(tracking_server, name) == []
