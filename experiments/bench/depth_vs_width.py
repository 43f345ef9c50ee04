"""Benchmark: depth versus width at equal removed parameters (docs/METHOD.md, finding 3).

Drops the top 6 of the embedded model's 12 layers, and separately removes the same
prunable parameters as heads and FFN neurons (magnitude scores, per layer); both shrunk
physically, timed side by side with the dense model (interleaved, threads fixed,
median of repeats) and scored on Tatoeba top-1 without recovery training.

    .venv/bin/python experiments/bench/depth_vs_width.py [--removed-layers 6] [--layers top] [--pairs 100]
"""

import argparse

import torch

import raysparse
from raysparse.data.parallel import tatoeba_pairs
from raysparse.efficiency import environment
from raysparse.efficiency.depth_width import depth_vs_width


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--removed-layers", type=int, default=6)
    parser.add_argument("--layers", default="top", help="top | bottom | alternate")
    parser.add_argument("--pairs", type=int, default=100, help="Tatoeba pairs per language (0 = skip quality)")
    parser.add_argument("--languages", default=None, help="comma-separated (default: all present)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,8")
    args = parser.parse_args()

    model, tokenizer = raysparse.load_model(args.model), raysparse.load_tokenizer(args.model)
    languages = args.languages.split(",") if args.languages else None
    pairs = tatoeba_pairs(languages, max_pairs=args.pairs) if args.pairs else {}
    result = depth_vs_width(model, tokenizer, args.removed_layers, layers=args.layers, pairs=pairs,
                            batch_sizes=[int(b) for b in args.batch_sizes.split(",")], sequence_length=args.seq_len,
                            repeats=args.repeats, threads=args.threads)
    print(f"environment: { {**environment(), 'threads': args.threads} }")
    print(f"depth: dropped layers {result.dropped_layers}; width: {result.masks['width'].summary()}")
    print(f"Tatoeba: {len(pairs)} languages x {args.pairs} pairs, no recovery training")
    print(result.table())


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
