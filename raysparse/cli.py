"""`raysparse` command line: thin front ends over the Python API."""

from __future__ import annotations

import argparse
import os
import sys

from raysparse.errors import RaysparseError


def _languages(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def cmd_fetch_model(args) -> None:
    from raysparse.models.embedded import embedded_model_dir

    print(embedded_model_dir())


def cmd_prune(args) -> None:
    from raysparse.standalone import prune

    result = prune(args.model, args.sparsity, args.algorithm, languages=_languages(args.languages),
                   scoring_data=args.scoring_data, scoring_pairs=args.scoring_pairs, batch_size=args.batch_size,
                   steps=args.steps, scope=args.scope, normalize=args.normalize, round_to=args.round_to,
                   recover_steps=args.recover_steps, learning_rate=args.lr, eval_pairs=args.eval_pairs,
                   seed=args.seed, sequence_length=args.seq_len, out=args.out, data_dir=args.data_dir)
    print()
    print(result.table())
    if result.quality:
        print()
        print(result.language_table())
    if result.out_dir:
        print(f"\nsaved to {result.out_dir} (load with raysparse.load_model('{result.out_dir}'))")


def cmd_evaluate(args) -> None:
    from raysparse.data.tasks import get_task
    from raysparse.models.sources import load_encoder, load_tokenizer
    from raysparse.paths import data_dir
    from raysparse.training.evaluate import check_head, evaluate

    task = get_task(args.task)
    data_dir(args.data_dir)  # a missing data folder fails before the model loads
    model = load_encoder(args.model)
    check_head(model, task)
    result = evaluate(model, load_tokenizer(args.tokenizer or args.model), task, _languages(args.languages),
                      data_dir=args.data_dir, max_examples=args.max_examples, batch_size=args.batch_size,
                      seed=args.seed, train_fraction=args.train_fraction)
    print()
    print(result.table())


def cmd_run(args) -> None:
    from raysparse.runner import run

    run(args.spec, address=args.address)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysparse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("fetch-model", help="convert the embedded multilingual-e5-small into the cache; print its folder")

    p = sub.add_parser("prune", help="score, select, shrink (and optionally recover) an encoder; print sizes")
    p.add_argument("--model", default="embedded", help="'embedded', a local folder, or a hub id (opt-in)")
    p.add_argument("--sparsity", type=float, default=0.5, help="target encoder sparsity in [0, 1)")
    p.add_argument("--algorithm", default="gradient", help="gradient | magnitude | random | ...")
    p.add_argument("--languages", help="comma-separated languages (default: all present)")
    p.add_argument("--scoring-data", default="xnli", help="xnli (parallel dev premises) or tatoeba")
    p.add_argument("--scoring-pairs", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=1, help="scoring rounds: 1 = one-shot, more = iterative")
    p.add_argument("--scope", default="global", choices=["global", "per-layer"])
    p.add_argument("--normalize", default="l2", choices=["l2", "none"])
    p.add_argument("--round-to", type=int, default=1, help="round kept units per layer to a multiple")
    p.add_argument("--recover-steps", type=int, default=0, help="contrastive recovery steps after shrinking")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--eval-pairs", type=int, default=200, help="Tatoeba pairs per language to evaluate (0 = skip)")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length for FLOP accounting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="XTREME data folder (default: $RAYSPARSE_DATA)")
    p.add_argument("--out", default=None, help="folder to save the shrunk model in")

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
    return parser


COMMANDS = {"run": cmd_run, "fetch-model": cmd_fetch_model, "prune": cmd_prune, "evaluate": cmd_evaluate}


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
