"""The same sub-network search in one process and as Ray Tune trials, side by side.

1. A short Dynamic Sparsification run of the embedded model (per-layer sampling), saved as a DS run logs
   its checkpoint, or ``--checkpoint`` (a checkpoint trained before; quality does not matter here).
2. One search spec (``--candidates`` candidates, NSGA-II, seed 0, no refine), run three ways in turn:
   in this process (``workers: 0``, torch's threads), as Tune trials one at a time (``workers: 1`` with
   every CPU), and ``--workers`` at a time (one CPU each), on a local Ray started for the purpose.
3. Prints, for each way: wall seconds of the whole search (Ray's start, actors' checkpoint loads and
   writing the result included), candidates per minute and its ratio to the in-process loop, the
   median seconds a candidate's evaluation took where it ran, and the Tune ways' actors (processes
   that scored candidates: with reused actors, at most ``workers``). Then whether the fixed first
   generation (uniform levels and spread starts) scored the same every way.

Usage:  .venv/bin/python experiments/bench/subnetwork_trials.py [--candidates 40] [--workers 2]
About 10 minutes on 2 idle cores. Not a test: nothing is timed in tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def train_checkpoint(out: Path, languages: list[str]) -> Path:
    from raysparse.runner import run_in_process
    from raysparse.structure import save_dynamic
    from raysparse.training.dynamic import checkpoint_extra

    spec = {"name": f"bench-subnetwork-trials-{int(time.time())}", "model": {"source": "embedded"},
            "data": {"task": "tatoeba", "languages": languages, "max_train_examples": 64, "max_eval_examples": 50,
                     "max_length": 32},
            "finetune": {"steps": 2, "batch_size": 8, "learning_rate": 5e-5},
            "pruning": {"algorithm": "gradient", "schedule": "dynamic", "sparsity": 0.5, "scoring_examples": 16},
            "dynamic": {"grid": [0.0, 0.2, 0.4, 0.6], "samples_per_step": 1, "steps": 4, "sampling": "per-layer",
                        "per_layer_max_sparsity": 0.85},
            "efficiency": {"latency": False}, "tracking": {"log_models": "none"}, "storage": str(out / "runs")}
    pipeline = run_in_process(spec)
    return save_dynamic(pipeline.model, out / "dynamic", pipeline.tokenizer, grid=pipeline.spec.dynamic.grid,
                        extra=checkpoint_extra(pipeline.spec, "tatoeba", pipeline.languages["evaluation"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a DS checkpoint folder (default: train a short one)")
    parser.add_argument("--languages", default="de,fr,ru")
    parser.add_argument("--candidates", type=int, default=40)
    parser.add_argument("--examples", type=int, default=100, help="Tatoeba rows per language scored per candidate")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    from raysparse.search.subnetworks import search_subnetworks

    out = Path(args.out or tempfile.mkdtemp(prefix="raysparse-bench-trials-")).resolve()
    cpus = os.cpu_count() or 2
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    else:
        started = time.time()
        checkpoint = train_checkpoint(out, args.languages.split(","))
        print(f"checkpoint trained in {time.time() - started:.0f}s: {checkpoint}", flush=True)
    common = {"model_dir": str(checkpoint), "candidates": args.candidates, "seed": 0, "max_examples": args.examples,
              "skip_examples": 0, "sequence_length": 64, "threads": 1, "latency_table": str(out / "tables"),
              "tracking": False, "verbose": False}
    search_subnetworks(**{**common, "candidates": 1, "out": str(out / "warm")})   # the latency table, measured once
    ways = [("in this process", {"workers": 0}), ("Tune, 1 at a time", {"workers": 1, "cpus_per_worker": cpus}),
            (f"Tune, {args.workers} at a time", {"workers": args.workers, "cpus_per_worker": cpus / args.workers})]
    results = []
    for k, (name, fields) in enumerate(ways):
        started = time.time()
        result = search_subnetworks(**common, **fields, name=f"way-{k}", out=str(out / f"way-{k}"))
        results.append((name, time.time() - started, result))
        print(f"{name}: {len(result.rows)} candidates in {results[-1][1]:.0f}s", flush=True)
    ray.shutdown()

    base = results[0][1]
    print(f"\nsub-network search, {args.candidates} candidates of {checkpoint.name} (Tatoeba {args.languages}, "
          f"{args.examples} rows each), {cpus} CPUs")
    print(f"{'way':22} {'wall s':>7} {'cand/min':>9} {'vs loop':>8} {'eval s (median)':>16} {'actors':>7}")
    for name, seconds, result in results:
        actors = len({r['actor'] for r in result.rows if 'actor' in r}) or "-"
        print(f"{name:22} {seconds:7.0f} {60 * len(result.rows) / seconds:9.2f} {base / seconds:8.2f} "
              f"{statistics.median(r['eval_seconds'] for r in result.rows):16.2f} {actors!s:>7}")
    fixed = [r for r in results[0][2].rows if r["suggested_by"] in ("uniform", "spread")]
    quality = "tatoeba/avg/accuracy"
    same = all(other[2].rows[r["trial"]]["subnetwork"] == r["subnetwork"] and
               abs(other[2].rows[r["trial"]][quality] - r[quality]) < 1e-9 for other in results[1:] for r in fixed)
    print(f"\nthe {len(fixed)} fixed first candidates scored the same every way: {same}")


if __name__ == "__main__":
    main()
