"""Search specs on the tiny random encoder, and MLflow queries, shared by the cluster tests."""

from urllib.error import HTTPError
from urllib.parse import quote

from tests.test_runs import rest


def tiny_base(model_dir, finetune_steps=2, checkpoint_every=50):
    return {"model": {"source": str(model_dir)},
            "data": {"task": "xnli", "languages": ["en", "de"], "max_train_examples": 16, "max_eval_examples": 8,
                     "max_length": 32},
            "finetune": {"steps": finetune_steps, "batch_size": 4},
            "pruning": {"algorithm": "magnitude", "scoring_examples": 4},
            "recovery": {"steps": 1}, "efficiency": {"latency": False},
            "resources": {"num_workers": 1, "checkpoint_every": checkpoint_every}, "tracking": {"log_models": "none"}}


def tiny_search_spec(name, model_dir, tracking_uri, storage, num_samples=2, max_concurrent=2, **base):
    return {"name": name, "num_samples": num_samples, "max_concurrent": max_concurrent, "sampler": "random",
            "objectives": [{"metric": "xnli/avg/accuracy", "mode": "max"}],
            "space": {"pruning.sparsity": {"uniform": [0.2, 0.6]}},
            "base": tiny_base(model_dir, **base),
            "tracking": {"uri": tracking_uri, "experiment": name}, "storage": str(storage)}


def tags_of(run) -> dict:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def metrics_of(run) -> dict:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def runs_of(uri, experiment) -> list[dict]:
    """Every run of an MLflow experiment (paged), over the REST API; none while it does not exist."""
    try:
        found = rest(uri, f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={quote(experiment)}")
    except HTTPError as error:
        if error.code == 404:      # the driver has not created it yet
            return []
        raise
    exp_id = found["experiment"]["experiment_id"]
    runs, token = [], None
    while True:
        body = {"experiment_ids": [exp_id], "max_results": 500, **({"page_token": token} if token else {})}
        page = rest(uri, "/api/2.0/mlflow/runs/search", body)
        runs += page.get("runs", [])
        token = page.get("next_page_token")
        if not token:
            return runs


def trial_runs(uri, experiment) -> tuple[list[dict], list[dict]]:
    """(parent runs, trial runs) of a search."""
    runs = runs_of(uri, experiment)
    parents = [r for r in runs if tags_of(r).get("raysparse.kind") == "search"]
    return parents, [r for r in runs if tags_of(r).get("raysparse.kind") == "trial"]
