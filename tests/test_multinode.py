"""A search over the session's multi-node cluster: trials spread over nodes, checkpoints in one
storage path every node reaches, and a worker node killed mid-search: its trial restarts from its
last checkpoint on another node, the search completes, and MLflow holds every trial exactly once.
(A killed driver and `--resume` are tested in test_search.py.)"""

import os
import subprocess
import sys
import time

import pytest
import yaml

from raysparse.cluster import NodeSpec
from tests.test_runs import rest
from tests.tiny_search import metrics_of, tags_of, tiny_search_spec, trial_runs

NAME = "multinode-fault"
TRIALS = 4


def history(uri, run_id, key) -> list:
    path = f"/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key={key}"
    return rest(uri, path).get("metrics", [])


@pytest.mark.timeout(600)
def test_search_spreads_over_nodes_and_survives_a_killed_node(local_cluster, ray_local, tracking_server,
                                                              tiny_model_dir, tmp_path):
    # One more worker node (it may be the one that dies), so three trials (1.25 CPUs each) run over four nodes.
    local_cluster.add_node(NodeSpec(num_cpus=1))
    head = local_cluster.nodes[0]
    storage = tmp_path / "storage"                  # one folder every node reaches (object storage on clusters)
    spec = tiny_search_spec(NAME, tiny_model_dir, tracking_server, storage, num_samples=TRIALS, max_concurrent=3,
                            finetune_steps=120, checkpoint_every=10)
    spec["base"]["finetune"]["cache"] = False   # every trial fine-tunes (a cache hit would finish too soon to kill)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(spec))
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "raysparse.cli", "search", str(path)], stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        seen_nodes, killed = set(), None
        deadline = time.time() + 420
        while killed is None and driver.poll() is None and time.time() < deadline:
            ids = local_cluster.node_ids()
            workers = {ids[n.name]: n for n in local_cluster.nodes if n is not head and n.name in ids}
            for run in trial_runs(tracking_server, NAME)[1]:
                tags = tags_of(run)
                node_id = tags.get("raysparse.node_id")
                seen_nodes.add(node_id)
                # one-process trials checkpoint through Tune (in the trial's folder of the search)
                checkpoints = list(storage.glob(f"*/*{tags['raysparse.trial_id']}*/checkpoint_*"))
                if run["info"]["status"] == "RUNNING" and node_id in workers and checkpoints:
                    local_cluster.remove_node(workers[node_id])          # SIGKILL: the node is gone
                    killed = (tags["raysparse.trial_id"], node_id)
                    break
            time.sleep(0.5)
        assert killed, "no trial ran on a worker node long enough to be killed:\n" + \
            (tmp_path / "driver.log").read_text()[-3000:]
        driver.wait(timeout=max(60, deadline + 120 - time.time()))
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, 9)
    output = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 0, output[-4000:]

    parents, trials = trial_runs(tracking_server, NAME)
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED"
    by_trial = {tags_of(r)["raysparse.trial_id"]: r for r in trials}
    assert len(trials) == TRIALS and len(by_trial) == TRIALS, "every trial exactly once in MLflow"
    for trial_id, run in by_trial.items():
        assert run["info"]["status"] == "FINISHED", trial_id
        assert "xnli/avg/accuracy" in metrics_of(run) and "encoder_sparsity" in metrics_of(run)
        seen_nodes.add(tags_of(run)["raysparse.node_id"])
    assert len(seen_nodes - {None}) >= 2, f"trials ran on {seen_nodes}: expected several nodes"

    trial_id, dead_node = killed
    restarted = by_trial[trial_id]
    assert metrics_of(restarted).get("resumes", 0) >= 1, "the killed trial restarted from its last checkpoint"
    assert tags_of(restarted)["raysparse.node_id"] != dead_node, "and finished on a live node"
    for other_id, run in by_trial.items():
        if other_id != trial_id:
            assert len(history(tracking_server, run["info"]["run_id"], "xnli/avg/accuracy")) == 1, other_id
