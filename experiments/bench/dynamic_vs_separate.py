"""Dynamic Sparsification vs separate runs over the same grid, measured side by side in one session.

DS: ONE run on Ray Train (fine-tune, score, rewire, train every level at once, evaluate every level,
slice and time every level). Separate: one full run per level (fine-tune, one-shot prune to the level,
recover, evaluate, shrink, time), with the same data, the same fine-tuning, and as many recovery steps
(distilled from the dense model when DS distils) as DS has training steps.

Prints, per level, the encoder sparsity each side reached and its average quality, then
  - the wall-time ratio: DS / sum of the separate runs (target <= 0.35),
  - the mean quality gap (separate - DS) over levels <= 0.5 (target: within 2 points).
Ray is started before any timing, so neither side pays for it; models are not logged on either side.

    .venv/bin/python experiments/bench/dynamic_vs_separate.py                 # defaults: about 20 min on 2 shared cores
    .venv/bin/python experiments/bench/dynamic_vs_separate.py --levels 10 --steps 40 --finetune-steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def bench_spec(args, storage: Path, tracking_uri: str) -> dict:
    grid = [round(0.1 * i, 1) for i in range(args.levels)]
    return {
        "name": f"bench-ds-{int(time.time())}",
        "seed": args.seed,
        "data": {"task": "tatoeba", "languages": args.languages.split(","), "max_train_examples": args.train_examples,
                 "max_eval_examples": args.eval_examples, "max_length": 64},
        "finetune": {"steps": args.finetune_steps, "batch_size": args.batch_size},
        "pruning": {"algorithm": "gradient", "schedule": "dynamic", "sparsity": 0.5,
                    "scoring_examples": args.scoring_examples},
        "dynamic": {"grid": grid, "samples_per_step": args.samples_per_step, "steps": args.steps,
                    "learning_rate": args.learning_rate, "distill": not args.no_distill, "match_sparsity": True},
        "efficiency": {"batch_sizes": [1], "sequence_length": 64, "repeats": 3, "warmup": 1},
        "resources": {"num_workers": args.workers, "checkpoint_every": 10_000},
        "tracking": {"uri": tracking_uri, "experiment": "bench-dynamic-vs-separate", "log_models": "none"},
        "storage": str(storage),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, default=8, help="grid 0, 0.1, ..., (levels-1)/10 (at least 8)")
    parser.add_argument("--languages", default="de,fr,ru")
    parser.add_argument("--finetune-steps", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="DS training steps = recovery steps of each separate run")
    parser.add_argument("--samples-per-step", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--train-examples", type=int, default=256, help="XNLI translation pairs per language")
    parser.add_argument("--scoring-examples", type=int, default=32)
    parser.add_argument("--eval-examples", type=int, default=100, help="Tatoeba pairs per language")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--no-distill", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for comparison.json and comparison.png (default: a temp dir)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow URI (default: a SQLite file in --out)")
    args = parser.parse_args()
    if args.levels < 2 or args.levels > 10:
        parser.error("--levels: expected 2..10")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from raysparse.dynamic import compare_with_separate_runs, dynamic_spec
    from raysparse.runner import ensure_ray, preflight

    out = Path(args.out or tempfile.mkdtemp(prefix="raysparse-bench-ds-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = args.tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
    spec = dynamic_spec(bench_spec(args, out / "runs", tracking_uri))
    preflight(spec)
    if args.tracking_uri is None:      # artifacts beside the SQLite file, not under the current directory
        import mlflow

        client = mlflow.MlflowClient(tracking_uri)
        if client.get_experiment_by_name(spec.tracking.experiment) is None:
            client.create_experiment(spec.tracking.experiment, artifact_location=(out / "artifacts").as_uri())
    ensure_ray()
    print(f"grid {spec.dynamic.grid}; {args.finetune_steps} fine-tuning steps, {args.steps} DS / recovery steps, "
          f"batch {args.batch_size}, {args.samples_per_step} random levels per DS step (+ largest and smallest); "
          f"Tatoeba {args.languages}, {args.eval_examples} pairs each; results in {out}", flush=True)
    started = time.time()
    comparison = compare_with_separate_runs(spec, verbose=True)
    print(f"\nwhole benchmark: {time.time() - started:.0f}s")
    ratio, gap = comparison.time_ratio, comparison.mean_difference(0.5)
    print(f"wall-time ratio DS / separate: {ratio:.3f} (target <= 0.35: {'met' if ratio <= 0.35 else 'NOT met'})")
    print(f"mean quality gap over levels <= 0.5 (separate - DS): {gap:+.2f} points "
          f"(target <= 2: {'met' if gap <= 2.0 else 'NOT met'})")
    (out / "comparison.json").write_text(json.dumps(comparison.to_dict(), indent=1))
    comparison.plot(out / "comparison.png")
    print(f"wrote {out / 'comparison.json'} and {out / 'comparison.png'}")


if __name__ == "__main__":
    main()
