"""Per-layer sub-networks of one super-network against its uniform levels, at equal latency.

1. ONE Dynamic Sparsification run in this process (no Ray, no MLflow) on the embedded model with
   ``dynamic.sampling: per-layer``: fine-tune on XNLI translation pairs, score, rewire, then every step
   trains the full network, the grid's smallest level and ``--samples-per-step`` sub-networks with a
   width of their own in every layer (some layers dropped with ``--drop-layers``), distilled from the
   full one. Its checkpoint is saved as a DS run logs it.
2. A sub-network search on it (``raysparse search-subnetworks``, NSGA-II): ``--candidates``
   sub-networks, each scored on Tatoeba *search rows* (the ``--search-examples`` rows of every language
   after the report rows) with latency predicted by the per-layer table (calibrated on the dense model).
3. For every uniform level of the grid: the point the search hands a user for that level's predicted
   latency (``SubnetworkSearchResult.best_within``: the highest average on the search rows among the
   candidates that fit, if the paired bootstrap on the search rows says it beats the best uniform level
   that fits, else that level; ``--plain-best``: the highest average, however narrow its margin). Both are then scored
   on the *report rows* (``--report-examples`` rows of every language from ``--report-from``, which
   the search never saw) and timed directly, interleaved.

``--checkpoint`` and ``--search-dir`` reuse a trained super-network and a finished search (the search's
rows, recorded in its subnetworks.json, must not overlap the report rows).

Prints, per level: measured latency of both, quality of both on the report rows (avg and worst
language), the quality ratio (searched / uniform), the measured-latency ratio and the point chosen;
the mean gain in points; then the latency table's prediction error (|predicted - measured| / measured)
over every timed shrunk model (the dense model is the table's calibration point). No assertions.

Defaults (the full size, about 35-40 minutes on 2 idle cores): Tatoeba de, fr, ru; 256 XNLI pairs
per language; 20 fine-tuning steps and 120 DS steps of batch 16 at 32 tokens, 2 per-layer sub-networks
per step (4 passes), grid 0, 0.1, ..., 0.7, per-layer floor 0.85 (a layer keeps at least 15% of its heads
and neurons in training and in the search; the grid's sparsest level keeps 30% everywhere), no dropped
layers; 200 candidates; 400 report rows (0-399) and 200 search rows (400-599) per language; latency at
batch 1 x 64 tokens on 1 thread. The latency table is measured at the search's start and the models are
timed at the end: keep the machine idle.

    .venv/bin/python experiments/bench/subnetwork_front.py                       # the full size
    .venv/bin/python experiments/bench/subnetwork_front.py --model tiny --languages de --steps 2 \\
        --finetune-steps 1 --candidates 10 --report-examples 20 --search-examples 20   # the smoke run (1 minute)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def ds_spec(args, model: str, storage: Path) -> dict:
    grid = [round(0.1 * i, 1) for i in range(args.levels)]
    return {
        "name": f"bench-subnetwork-front-{int(time.time())}",
        "seed": args.seed,
        "model": {"source": model},
        "data": {"task": "tatoeba", "languages": args.languages.split(","), "max_train_examples": args.train_examples,
                 "max_eval_examples": args.report_examples, "max_length": args.max_length},
        "finetune": {"steps": args.finetune_steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate},
        "pruning": {"algorithm": "gradient", "schedule": "dynamic", "sparsity": 0.5,
                    "scoring_examples": args.scoring_examples},
        "dynamic": {"grid": grid, "samples_per_step": args.samples_per_step, "steps": args.steps,
                    "learning_rate": args.learning_rate, "distill": True, "sampling": "per-layer",
                    "drop_layers_max": args.drop_layers,
                    "per_layer_max_sparsity": None if args.floor < 0 else args.floor},
        "efficiency": {"latency": False},
        "resources": {"checkpoint_every": 10_000},
        "tracking": {"log_models": "none"},
        "storage": str(storage),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="embedded, tiny (the random test encoder) or a folder")
    parser.add_argument("--languages", default="de,fr,ru")
    parser.add_argument("--levels", type=int, default=8, help="grid 0, 0.1, ..., (levels-1)/10")
    parser.add_argument("--finetune-steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=120, help="DS (super-network) training steps")
    parser.add_argument("--samples-per-step", type=int, default=2, help="per-layer sub-networks per step")
    parser.add_argument("--drop-layers", type=int, default=0, help="dynamic.drop_layers_max (and the search's)")
    parser.add_argument("--floor", type=float, default=0.85,
                        help="dynamic.per_layer_max_sparsity: the fewest units a layer keeps in training and in the "
                             "search, as a sparsity (0.85; -1: the grid's sparsest level)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--train-examples", type=int, default=256, help="XNLI translation pairs per language")
    parser.add_argument("--scoring-examples", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--refine", type=int, default=12,
                        help="after the search, candidates per uniform level's latency, each a mutation of the best "
                             "point within it (search-subnetworks --refine)")
    parser.add_argument("--latency-tables", default=None,
                        help="a folder of measured latency tables to reuse (default: OUT/latency-tables)")
    parser.add_argument("--report-examples", type=int, default=400, help="Tatoeba pairs per language of the report")
    parser.add_argument("--search-examples", type=int, default=200,
                        help="Tatoeba pairs per language the search scores (after the report's)")
    parser.add_argument("--seq-len", type=int, default=64, help="sequence length of the latency objective and timing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15, help="timing rounds (table and direct timing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for the checkpoint, the search and front.json")
    parser.add_argument("--report-from", type=int, default=0,
                        help="the report rows start at this row (default 0; with --search-dir, past its search rows)")
    parser.add_argument("--plain-best", action="store_true",
                        help="at each budget take the search's highest average, not best_within's confident choice")
    parser.add_argument("--checkpoint", default=None,
                        help="a trained DS checkpoint (its run's settings): skip step 1")
    parser.add_argument("--search-dir", default=None,
                        help="a finished search of that checkpoint (its subnetworks.json): skip step 2")
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from raysparse.efficiency import fixed_threads
    from raysparse.efficiency.latency import time_rounds
    from raysparse.efficiency.latency_table import LatencyTable
    from raysparse.models.sources import load_tokenizer
    from raysparse.runner import run_in_process
    from raysparse.errors import RaysparseError
    from raysparse.metric_keys import avg_key, worst_key
    from raysparse.search.subnetworks import SubnetworkSearchResult, search_subnetworks, uniform_levels
    from raysparse.structure import Encoder, Subnetwork, load_dynamic, save_dynamic, shrink_subnetwork, subnetwork_slices
    from raysparse.training.dynamic import checkpoint_extra, copy_sharing_embeddings
    from raysparse.training.evaluate import evaluate

    out = Path(args.out or tempfile.mkdtemp(prefix="raysparse-bench-front-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model == "tiny":
        from raysparse.models.tiny import make_tiny_encoder

        model = str(make_tiny_encoder(out / "tiny", languages=("en", *args.languages.split(","))))
    trained = searched_seconds = 0.0
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
        print(f"super-network: {checkpoint} (trained before)", flush=True)
    else:
        spec = ds_spec(args, model, out / "runs")
        print(f"super-network: {args.finetune_steps} fine-tuning + {args.steps} DS steps of batch {args.batch_size} at "
              f"{args.max_length} tokens, {args.samples_per_step} per-layer sub-networks per step"
              f"{f', up to {args.drop_layers} layers dropped' if args.drop_layers else ''}"
              f"{f', per-layer floor {args.floor:g}' if args.floor >= 0 else ''}; grid "
              f"{spec['dynamic']['grid']}; Tatoeba {args.languages}; results in {out}", flush=True)
        started = time.time()
        pipeline = run_in_process(spec)
        trained = time.time() - started
        checkpoint = save_dynamic(pipeline.model, out / "dynamic", pipeline.tokenizer, grid=pipeline.spec.dynamic.grid,
                                  extra=checkpoint_extra(pipeline.spec, "tatoeba", pipeline.languages["evaluation"]))
        del pipeline
        print(f"\nsuper-network trained in {trained:.0f}s; checkpoint {checkpoint}", flush=True)

    tables = args.latency_tables or str(out / "latency-tables")
    if args.search_dir:
        result = SubnetworkSearchResult.read(args.search_dir)
        record = json.loads((Path(args.search_dir) / "subnetworks.json").read_text())
        seen = record["evaluation"]
        searched_rows = range(seen["skip_examples"], seen["skip_examples"] + seen["max_examples"])
        report_rows = range(args.report_from, args.report_from + args.report_examples)
        if set(searched_rows) & set(report_rows):
            raise SystemExit(f"--search-dir: its search scored rows {searched_rows.start}..{searched_rows.stop - 1}, "
                             f"which overlap the report rows {report_rows.start}..{report_rows.stop - 1} "
                             "(expected --report-from past them)")
        print(f"search: {len(result.rows)} candidates read from {args.search_dir} (search rows "
              f"{searched_rows.start}..{searched_rows.stop - 1})", flush=True)
    else:
        started = time.time()
        result = search_subnetworks(model_dir=str(checkpoint), name="bench-front", candidates=args.candidates,
                                    seed=args.seed, max_examples=args.search_examples,
                                    skip_examples=args.report_from + args.report_examples,
                                    sequence_length=args.seq_len,
                                    threads=args.threads, rounds=args.rounds,
                                    latency_table=tables, out=str(out / "search"), refine=args.refine,
                                    tracking=False, drop_layers=args.drop_layers, verbose=False)
        searched_seconds = time.time() - started
        print(f"search: {len(result.rows)} candidates in {searched_seconds:.0f}s "
              f"({searched_seconds / len(result.rows):.1f}s each), front {len(result.front)}", flush=True)
    quality, worst = avg_key(result.task, result.metric), worst_key(result.task, result.metric)

    full = load_dynamic(checkpoint).eval()
    tokenizer = load_tokenizer(str(checkpoint))
    tables = Path(record["spec"]["latency_table"]) if args.search_dir else Path(tables)   # the search's
    table = LatencyTable.cached(Encoder(full).base, 1, args.seq_len, threads=args.threads, cache=tables,
                                rounds=args.rounds)
    grid = [round(0.1 * i, 1) for i in range(args.levels)]
    # at each level's predicted latency, the point the search would hand a user for that budget
    # (SubnetworkSearchResult.best_within: its best average there if surely above the best uniform level
    # that fits, else that level; --plain-best: its best average, however narrow the margin)
    pairs = []
    for level, sub in uniform_levels(full, grid):
        budget = table.predict(sub.counts())
        try:
            best = result.best_within(budget, level=None if args.plain_best else 0.95)
        except RaysparseError:   # nothing within the budget
            best = None
        pairs.append((level, sub, budget, best))

    def report(sub: Subnetwork) -> dict:
        with subnetwork_slices(full, sub):
            metrics = evaluate(full, tokenizer, "tatoeba", args.languages.split(","), max_examples=args.report_examples,
                               skip_examples=args.report_from, seed=args.seed, train_fraction=0.5,
                               verbose=False).metrics
        return {"avg": metrics[quality], "worst": metrics[worst]}

    models, predicted = {}, {}
    for level, sub, budget, _ in pairs:
        models[f"level {level:g}"] = shrink_subnetwork(copy_sharing_embeddings(full), sub).eval()
        predicted[f"level {level:g}"] = budget
    results = []
    for level, sub, budget, best in pairs:
        row = {"level": level, "uniform": report(sub), "uniform_predicted_ms": budget}
        if best is not None:
            chosen = Subnetwork.from_dict(best["subnetwork"])
            uniform = best.get("uniform_level")
            name = f"level {uniform:g}" if uniform is not None else f"trial {best['trial']}"
            if name not in models:
                models[name] = shrink_subnetwork(copy_sharing_embeddings(full), chosen).eval()
                predicted[name] = best["latency_ms"]
            row.update({"trial": best["trial"], "chosen": name, "searched_search_rows": best[quality],
                        "because": best["chosen_because"],
                        "searched": row["uniform"] if uniform == level else report(chosen),
                        "searched_predicted_ms": best["latency_ms"], "subnetwork": best["subnetwork"]})
        results.append(row)
    with fixed_threads(args.threads):
        times = time_rounds({name: Encoder(m).base for name, m in models.items()}, 1, args.seq_len, args.rounds,
                            warmup=3)
    measured = {name: statistics.median(values) for name, values in times.items()}

    rule = ("its highest search-row average" if args.plain_best else
            "best_within: its highest search-row average if surely above the uniform level, else the level")
    print(f"\nat each uniform level's latency (batch 1 x {args.seq_len} tokens, {args.threads} thread(s)): the point "
          f"of the search (uniform levels included) by {rule}; both scored on the {args.report_examples} report rows "
          "per language")
    header = (f"{'level':>5}  {'uni ms':>7}  {'srch ms':>7}  {'uni avg':>7}  {'srch avg':>8}  {'uni worst':>9}  "
              f"{'srch worst':>10}  {'q ratio':>7}  {'ms ratio':>8}  chosen")
    print(header)
    # the uniform curve at any measured latency: linear between the levels' (measured ms, report avg), flat beyond
    curve = sorted((measured[f"level {row['level']:g}"], row["uniform"]["avg"]) for row in results)

    def uniform_at(ms: float) -> float:
        if ms <= curve[0][0]:
            return curve[0][1]
        for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
            if ms <= x1:
                return y0 + (y1 - y0) * (ms - x0) / (x1 - x0) if x1 > x0 else max(y0, y1)
        return curve[-1][1]

    ratios, gains, measured_gains = [], [], []
    for row in results:
        level = f"level {row['level']:g}"
        row["uniform_measured_ms"] = measured[level]
        if "trial" not in row:
            print(f"{row['level']:>5g}  {measured[level]:7.2f}  {'-':>7}  {row['uniform']['avg']:7.3f}  (no searched "
                  "sub-network within its predicted latency)")
            continue
        mine = measured[row["chosen"]]
        row["searched_measured_ms"] = mine
        ratio = row["searched"]["avg"] / row["uniform"]["avg"] if row["uniform"]["avg"] else float("nan")
        ratios.append(ratio)
        gains.append(100 * (row["searched"]["avg"] - row["uniform"]["avg"]))
        measured_gains.append(100 * (row["searched"]["avg"] - uniform_at(mine)))
        row["uniform_at_searched_ms"] = uniform_at(mine)
        print(f"{row['level']:>5g}  {measured[level]:7.2f}  {mine:7.2f}  {row['uniform']['avg']:7.3f}  "
              f"{row['searched']['avg']:8.3f}  {row['uniform']['worst']:9.3f}  {row['searched']['worst']:10.3f}  "
              f"{ratio:7.3f}  {mine / measured[level]:8.3f}  {row['chosen']}")
    for row in results:
        if "trial" in row:
            print(f"  level {row['level']:g}: {row['chosen']} ({row['because']})")
    if ratios:
        print(f"quality ratio searched / uniform (report rows): median {statistics.median(ratios):.3f}, "
              f"min {min(ratios):.3f}, max {max(ratios):.3f}; searched - uniform: mean {statistics.mean(gains):+.1f} "
              f"points, at or above at {sum(g >= 0 for g in gains)} of {len(gains)} levels")
        print(f"against the uniform curve at the searched point's measured latency (linear between levels): mean "
              f"{statistics.mean(measured_gains):+.1f} points, at or above at {sum(g >= 0 for g in measured_gains)} of "
              f"{len(measured_gains)} ({', '.join(f'{g:+.1f}' for g in measured_gains)})")
    errors = {name: abs(predicted[name] - measured[name]) / measured[name] for name in measured if name != "level 0"}
    print(f"latency table prediction error over {len(errors)} timed shrunk models (the dense one calibrates it): median "
          f"{100 * statistics.median(errors.values()):.1f}%, max {100 * max(errors.values()):.1f}% "
          f"(dense: predicted {table.dense_ms():.2f} ms, measured {measured['level 0']:.2f} ms)")
    print(f"times: super-network {trained:.0f}s, search {searched_seconds:.0f}s")
    (out / "front.json").write_text(json.dumps({"settings": vars(args), "train_seconds": trained,
                                                "search_seconds": searched_seconds, "levels": results,
                                                "prediction_errors": errors}, indent=1, default=str))
    print(f"wrote {out / 'front.json'}; the search: {out / 'search'}")


if __name__ == "__main__":
    main()
