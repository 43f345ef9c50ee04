"""Load: searches of many short trials over a local multi-node Ray cluster.

Starts its own cluster (`raysparse.cluster.LocalCluster`: a head and worker nodes on loopback)
and its own MLflow server, builds a tiny random BERT with the real (trimmed) tokenizer, so a
trial costs what Ray, Tune and MLflow cost rather than what a model costs, and runs a search of
--trials trials --concurrent at a time, after a first search of --single trials one at a time.
Trials have one worker, so each runs in its Tune trial's own process; they log their pruned
model (`log_models: one`, lean: without the tensors the base model holds). Each search runs twice,
side by side: every trial in a fresh process (`reuse_trial_processes: false`) and in reused ones (the
default: a finished trial's process, its imports paid, runs the next). Then it checks, over MLflow's
REST API, that every trial's run and metrics arrived exactly once, and prints per search:

  trials per minute          finished trials / wall time of the search
  overhead/trial             a trial's MLflow run time minus its own work: the sum of its
                             stages' wall time (cost/<stage>/wall_s, measured where it ran),
                             finalize included
  cache hits                 trials that loaded the fine-tuned model from the stage cache
  bytes logged/trial         artifacts of a trial's MLflow run, against one full model copy
  tracking server            how long /health and runs/search took to answer during the search

Targets (issue 15): overhead median <= 5 s at 1 concurrent and <= 15 s at 8 concurrent; trials per
minute >= 3x the 3.26 measured before (9.8); bytes per trial <= 20% of a full model copy.

Usage:  .venv/bin/python experiments/bench/search_load.py [--trials 64] [--concurrent 8] [--nodes 4] [--single 8]
Not a test: nothing is timed in tests.
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
TRIAL_MEMORY_GB = 0.7      # a one-process trial: one Python process that imports torch
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


def spec_for(trials: int, concurrent: int, model_dir: Path, uri: str, storage: Path, name: str, reuse: bool) -> dict:
    base = {"model": {"source": str(model_dir)},
            "data": {"task": "xnli", "languages": ["en", "de"], "max_train_examples": 16, "max_eval_examples": 8,
                     "max_length": 32},
            "finetune": {"steps": 2, "batch_size": 4}, "pruning": {"algorithm": "magnitude", "scoring_examples": 4},
            "recovery": {"steps": 1}, "efficiency": {"latency": False},
            "resources": {"num_workers": 1, "checkpoint_every": 50}, "tracking": {"log_models": "one"}}
    return {"name": name, "num_samples": trials, "max_concurrent": concurrent, "sampler": "random",
            "reuse_trial_processes": reuse,
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


def artifact_bytes(uri: str, run_id: str, path: str = "") -> int:
    """Bytes of every artifact a run logged (MLflow's artifact listing, recursively)."""
    listing = rest(uri, f"/api/2.0/mlflow/artifacts/list?run_id={run_id}" + (f"&path={quote(path)}" if path else ""))
    total = 0
    for entry in listing.get("files", []):
        total += (artifact_bytes(uri, run_id, entry["path"]) if entry.get("is_dir") else int(entry.get("file_size", 0)))
    return total


def available_memory_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024 ** 2
    return float("inf")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def one_search(label: str, trials: int, concurrent: int, model_dir: Path, uri: str, root: Path, cluster,
               full_model_bytes: int, reuse: bool) -> dict:
    """One search over the cluster; its figures, printed."""
    from raysparse.search import search
    from raysparse.tracking.runs import client, experiment_id

    name = f"search-load-{label}-{'reused' if reuse else 'fresh'}-{int(time.time())}"
    label = f"{label}, {'reused' if reuse else 'fresh'} processes"
    exp_id = experiment_id(client(uri), name)
    prober = Prober(uri, exp_id)
    prober.start()
    t0 = time.time()
    result = search(spec_for(trials, concurrent, model_dir, uri, root / "storage", name, reuse), address=cluster.address,
                    verbose=False)
    wall = time.time() - t0
    prober.stop.set()
    prober.join()
    names = {v: k for k, v in cluster.node_ids().items()}
    parents, children = check_exactly_once(uri, exp_id, trials)
    assert all(r["status"] == "done" for r in result.rows), [r for r in result.rows if r["status"] != "done"]
    # Own work: every stage's wall time as the trial measured it (its last report carries all five).
    work_of = {r["trial"]: sum(r.get(f"cost/{stage}/wall_s", 0.0) for stage in STAGES) for r in result.rows}
    hits = sum(r.get("cache/finetune/hit", 0.0) for r in result.rows)
    trial_id = lambda r: next(t["value"] for t in r["data"]["tags"] if t["key"] == "raysparse.trial_id")
    work = [work_of[trial_id(r)] for r in children]
    run_time = [(int(r["info"]["end_time"]) - int(r["info"]["start_time"])) / 1000 for r in children]
    overhead = [t - w for t, w in zip(run_time, work)]
    logged = [artifact_bytes(uri, r["info"]["run_id"]) for r in children]
    nodes = Counter(names.get(next((t["value"] for t in r["data"]["tags"] if t["key"] == "raysparse.node_id"), ""),
                              "this process") for r in children)
    ms = lambda values, q: 1000 * percentile(values, q)
    figures = {"trials_per_minute": trials / wall * 60, "overhead_median": statistics.median(overhead),
               "bytes_share": statistics.median(logged) / full_model_bytes, "hits": hits}
    print(f"\n[{label}] search of {trials} trials, {concurrent} at a time, over {len(cluster.nodes)} nodes")
    print(f"  wall time                   {wall:8.1f} s")
    print(f"  trials per minute           {figures['trials_per_minute']:8.2f}")
    print(f"  per trial (median, p90)     run {statistics.median(run_time):.1f} s, {percentile(run_time, .9):.1f} s; "
          f"own work {statistics.median(work):.1f} s, {percentile(work, .9):.1f} s")
    print(f"  overhead/trial              {statistics.median(overhead):8.1f} s median, "
          f"{statistics.mean(overhead):.1f} s mean, {percentile(overhead, .9):.1f} s p90 (run time - own work)")
    print(f"  cache hits                  {hits:.0f} of {trials} trials loaded the fine-tuned model")
    print(f"  bytes logged/trial          {statistics.median(logged) / 1e6:.2f} MB median "
          f"({figures['bytes_share']:.1%} of a full model copy, {full_model_bytes / 1e6:.2f} MB)")
    print(f"  tracking server             /health median {ms(prober.health, .5):.0f} ms, p99 "
          f"{ms(prober.health, .99):.0f} ms, max {ms(prober.health, 1):.0f} ms ({len(prober.health)} probes); "
          f"runs/search median {ms(prober.search, .5):.0f} ms, max {ms(prober.search, 1):.0f} ms; "
          f"{prober.failures} failed")
    print(f"  exactly once                {len(children)} trial runs, {len(children)} trial ids, {len(parents)} parent; "
          f"{', '.join(ONCE)} logged once each")
    print(f"  trials per node             {', '.join(f'{k}: {v}' for k, v in sorted(nodes.items()))}", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=4, help="head + workers")
    parser.add_argument("--single", type=int, default=8, help="trials of the first search, one at a time (0: none)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (storage, MLflow, logs)")
    args = parser.parse_args()

    import ray

    from raysparse.cluster import LocalCluster, LocalClusterSpec, NodeSpec
    from raysparse.models.tiny import make_tiny_encoder
    from raysparse.runner import ensure_ray
    from raysparse.tracking.server import start_server, stop_server

    available = available_memory_gb()
    if available < TRIAL_MEMORY_GB * args.concurrent + 2:
        print(f"warning: {available:.1f} GB of memory available; {args.concurrent} trials at once take about "
              f"{TRIAL_MEMORY_GB * args.concurrent:.0f} GB plus the cluster's own: expect Ray to kill workers for "
              "memory, and trials to be retried", flush=True)
    root = Path(tempfile.mkdtemp(prefix="rs-load-"))
    per_node = math.ceil(args.concurrent / args.nodes)      # a one-process trial takes one CPU
    cluster = LocalCluster(LocalClusterSpec(head=NodeSpec(num_cpus=per_node),
                                            workers=[NodeSpec(num_cpus=per_node)] * (args.nodes - 1)))
    started = time.time()
    figures = {}
    try:
        model_dir = make_tiny_encoder(root / "model")
        full = sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())
        uri = start_server(root / "mlflow")
        cluster.start()
        ensure_ray(cluster.address)
        print(f"set-up {time.time() - started:.0f}s: {len(cluster.nodes)} nodes, {per_node * args.nodes} logical "
              f"CPUs, MLflow {uri}", flush=True)
        for reuse in (False, True):
            if args.single:
                figures[1, reuse] = one_search("single", args.single, 1, model_dir, uri, root, cluster, full, reuse)
            figures[args.concurrent, reuse] = one_search("load", args.trials, args.concurrent, model_dir, uri, root,
                                                         cluster, full, reuse)
    finally:
        ray.shutdown()
        cluster.shutdown()
        stop_server(root / "mlflow")
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("\nreused processes against fresh ones, trials per minute")
    for concurrent in (1, args.concurrent):
        if (concurrent, True) in figures:
            fresh, reused = figures[concurrent, False]["trials_per_minute"], figures[concurrent, True]["trials_per_minute"]
            print(f"  {concurrent} at a time{'':17} {fresh:5.2f} fresh, {reused:5.2f} reused: {reused / fresh:.2f}x")
    print("\ntargets (issue 15), reused processes")
    for concurrent, limit in ((1, 5.0), (args.concurrent, 15.0)):
        if (concurrent, True) in figures:
            value = figures[concurrent, True]["overhead_median"]
            print(f"  overhead median at {concurrent} concurrent  {value:5.1f} s (target <= {limit:g}): "
                  f"{'met' if value <= limit else 'NOT met'}")
    load = figures[args.concurrent, True]
    print(f"  trials per minute            {load['trials_per_minute']:5.2f} (target >= {3 * 3.26:.2f}): "
          f"{'met' if load['trials_per_minute'] >= 3 * 3.26 else 'NOT met'}")
    print(f"  bytes per trial              {load['bytes_share']:.1%} of a full copy (target <= 20%): "
          f"{'met' if load['bytes_share'] <= 0.2 else 'NOT met'}")
    print(f"  total                        {time.time() - started:8.1f} s with set-up")


if __name__ == "__main__":
    main()
