"""Load: a search of many short trials over a local multi-node Ray cluster.

Starts its own cluster (`raysparse.cluster.LocalCluster`: a head and worker nodes on loopback)
and its own MLflow server, builds a tiny random BERT with the real (trimmed) tokenizer, so a
trial costs what Ray, Ray Train and MLflow cost rather than what a model costs, and runs a
search of --trials trials, --concurrent at a time. Then it checks, over MLflow's REST API,
that every trial's run and metrics arrived exactly once, and prints:

  trials per minute          finished trials / wall time of the search
  scheduling overhead/trial  a trial's MLflow run time (opened when the trial starts, closed
                             when its TorchTrainer returns) minus its own work: the sum of
                             its stages' wall time (cost/<stage>/wall_s, measured in the worker)
  tracking server            how long /health and runs/search took to answer during the search

Usage:  .venv/bin/python experiments/bench/search_load.py [--trials 64] [--concurrent 8] [--nodes 4]
Takes about 20 minutes for 64 trials on 2 cores (measured: 1241 s). Not a test: nothing is timed in tests.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import quote

STAGES = ("finetune", "prune", "recover", "evaluate", "finalize")
TRIAL_MEMORY_GB = 1.3      # a trial's driver, its Train controller and its worker: each imports torch
ONCE = ("xnli/avg/accuracy", "xnli/worst/accuracy", "encoder_sparsity", "params/total")   # logged at the end


def rest(uri: str, path: str, payload: dict | None = None) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(f"{uri}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


class Prober(threading.Thread):
    """Asks the tracking server every half second while the search runs; keeps the latencies."""

    def __init__(self, uri: str, experiment_id: str):
        super().__init__(daemon=True)
        self.uri, self.experiment_id = uri, experiment_id
        self.health: list[float] = []
        self.search: list[float] = []
        self.failures = 0
        self.stop = threading.Event()

    def run(self) -> None:
        count = 0
        while not self.stop.is_set():
            for kind, call in (("health", lambda: urllib.request.urlopen(f"{self.uri}/health", timeout=10).read()),
                               ("search", lambda: rest(self.uri, "/api/2.0/mlflow/runs/search",
                                                       {"experiment_ids": [self.experiment_id], "max_results": 50}))):
                if kind == "search" and count % 10:
                    continue
                started = time.perf_counter()
                try:
                    call()
                    getattr(self, kind).append(time.perf_counter() - started)
                except OSError:
                    self.failures += 1
            count += 1
            self.stop.wait(0.5)


def spec_for(args, model_dir: Path, uri: str, storage: Path, name: str) -> dict:
    base = {"model": {"source": str(model_dir)},
            "data": {"task": "xnli", "languages": ["en", "de"], "max_train_examples": 16, "max_eval_examples": 8,
                     "max_length": 32},
            "finetune": {"steps": 2, "batch_size": 4}, "pruning": {"algorithm": "magnitude", "scoring_examples": 4},
            "recovery": {"steps": 1}, "efficiency": {"latency": False},
            "resources": {"num_workers": 1, "checkpoint_every": 50}, "tracking": {"log_models": "none"}}
    return {"name": name, "num_samples": args.trials, "max_concurrent": args.concurrent, "sampler": "random",
            "objectives": [{"metric": "xnli/avg/accuracy", "mode": "max"}],
            "space": {"pruning.sparsity": {"uniform": [0.2, 0.7]}}, "base": base,
            "tracking": {"uri": uri, "experiment": name}, "storage": str(storage)}


def trial_runs(uri: str, experiment_id: str) -> list[dict]:
    runs, token = [], None
    while True:
        page = rest(uri, "/api/2.0/mlflow/runs/search",
                    {"experiment_ids": [experiment_id], "max_results": 500, **({"page_token": token} if token else {})})
        runs += page.get("runs", [])
        token = page.get("next_page_token")
        if not token:
            return runs


def check_exactly_once(uri: str, experiment_id: str, trials: int) -> tuple[list[dict], list[dict]]:
    runs = trial_runs(uri, experiment_id)
    tags = lambda r: {t["key"]: t["value"] for t in r["data"].get("tags", [])}
    parents = [r for r in runs if tags(r).get("raysparse.kind") == "search"]
    children = [r for r in runs if tags(r).get("raysparse.kind") == "trial"]
    ids = Counter(tags(r)["raysparse.trial_id"] for r in children)
    assert len(parents) == 1, f"{len(parents)} parent runs"
    assert len(children) == trials and len(ids) == trials, f"{len(children)} trial runs for {len(ids)} trial ids"
    assert all(r["info"]["status"] == "FINISHED" for r in children), Counter(r["info"]["status"] for r in children)
    for run in children:
        for key in ONCE:
            history = rest(uri, f"/api/2.0/mlflow/metrics/get-history?run_id={run['info']['run_id']}"
                                f"&metric_key={quote(key, safe='')}").get("metrics", [])
            assert len(history) == 1, f"{key} logged {len(history)} times in {tags(run)['raysparse.trial_id']}"
    return parents, children


def available_memory_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024 ** 2
    return float("inf")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=4, help="head + workers")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (storage, MLflow, logs)")
    args = parser.parse_args()

    import ray

    from raysparse.cluster import LocalCluster, LocalClusterSpec, NodeSpec
    from raysparse.models.tiny import make_tiny_encoder
    from raysparse.runner import ensure_ray
    from raysparse.search import search
    from raysparse.search.driver import TRIAL_DRIVER_CPU
    from raysparse.tracking.server import start_server, stop_server

    available = available_memory_gb()
    if available < TRIAL_MEMORY_GB * args.concurrent + 2:
        print(f"warning: {available:.1f} GB of memory available; {args.concurrent} trials at once take about "
              f"{TRIAL_MEMORY_GB * args.concurrent:.0f} GB (three processes that import torch each) plus the "
              "cluster's own: expect Ray to kill workers for memory, and trials to be retried", flush=True)
    root = Path(tempfile.mkdtemp(prefix="rs-load-"))
    cpus = math.ceil(args.concurrent * (1 + TRIAL_DRIVER_CPU))        # one train worker + the trial's driver
    per_node = math.ceil(cpus / args.nodes)
    cluster = LocalCluster(LocalClusterSpec(head=NodeSpec(num_cpus=per_node),
                                            workers=[NodeSpec(num_cpus=per_node)] * (args.nodes - 1)))
    started = time.time()
    try:
        model_dir = make_tiny_encoder(root / "model")
        uri = start_server(root / "mlflow")
        cluster.start()
        ensure_ray(cluster.address)
        print(f"set-up {time.time() - started:.0f}s: {len(cluster.nodes)} nodes, {per_node * args.nodes} logical "
              f"CPUs, MLflow {uri}", flush=True)
        name = f"search-load-{int(time.time())}"
        from raysparse.tracking.runs import client, experiment_id

        exp_id = experiment_id(client(uri), name)
        prober = Prober(uri, exp_id)
        prober.start()
        t0 = time.time()
        result = search(spec_for(args, model_dir, uri, root / "storage", name), address=cluster.address,
                        verbose=False)
        wall = time.time() - t0
        prober.stop.set()
        prober.join()
        names = {v: k for k, v in cluster.node_ids().items()}
        parents, children = check_exactly_once(uri, exp_id, args.trials)
    finally:
        ray.shutdown()
        cluster.shutdown()
        stop_server(root / "mlflow")
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    assert all(r["status"] == "done" for r in result.rows), [r for r in result.rows if r["status"] != "done"]
    # Own work: every stage's wall time as the worker measured it (its last report to Tune carries all five).
    work_of = {r["trial"]: sum(r.get(f"cost/{stage}/wall_s", 0.0) for stage in STAGES) for r in result.rows}
    trial_id = lambda r: next(t["value"] for t in r["data"]["tags"] if t["key"] == "raysparse.trial_id")
    work = [work_of[trial_id(r)] for r in children]
    run_time = [(int(r["info"]["end_time"]) - int(r["info"]["start_time"])) / 1000 for r in children]
    overhead = [t - w for t, w in zip(run_time, work)]
    slot = wall * args.concurrent / args.trials - statistics.mean(work)
    nodes = Counter(names.get(next((t["value"] for t in r["data"]["tags"] if t["key"] == "raysparse.node_id"), ""),
                              "gone") for r in children)
    ms = lambda values, q: 1000 * percentile(values, q)
    print(f"\nsearch of {args.trials} trials, {args.concurrent} at a time, over {args.nodes} nodes "
          f"({per_node * args.nodes} logical CPUs) on this machine")
    print(f"  wall time                   {wall:8.1f} s")
    print(f"  trials per minute           {args.trials / wall * 60:8.2f}")
    print(f"  per trial (median, p90)     run {statistics.median(run_time):.1f} s, {percentile(run_time, .9):.1f} s; "
          f"own work {statistics.median(work):.1f} s, {percentile(work, .9):.1f} s")
    print(f"  scheduling overhead/trial   {statistics.median(overhead):8.1f} s median, "
          f"{statistics.mean(overhead):.1f} s mean, {percentile(overhead, .9):.1f} s p90 (run time - own work)")
    print(f"  slot overhead/trial         {slot:8.1f} s (wall x concurrency / trials - mean own work)")
    print(f"  tracking server             /health median {ms(prober.health, .5):.0f} ms, p99 "
          f"{ms(prober.health, .99):.0f} ms, max {ms(prober.health, 1):.0f} ms ({len(prober.health)} probes); "
          f"runs/search median {ms(prober.search, .5):.0f} ms, max {ms(prober.search, 1):.0f} ms; "
          f"{prober.failures} failed")
    print(f"  exactly once                {len(children)} trial runs, {len(children)} trial ids, {len(parents)} parent; "
          f"{', '.join(ONCE)} logged once each")
    print(f"  trials per node             {', '.join(f'{k}: {v}' for k, v in sorted(nodes.items()))}")
    print(f"  total                       {time.time() - started:8.1f} s with set-up")


if __name__ == "__main__":
    main()
