"""Benchmark: depth versus width at equal encoder sparsity (docs/METHOD.md, finding 3).

At each sparsity (default 25%, 50%, 75% of the embedded model's encoder: 3, 6, 9 of 12 layers
dropped) the same share of prunable parameters is removed once as whole layers and once as heads
and FFN neurons (magnitude scores, per layer); both are shrunk physically and timed with the dense
model, interleaved in rounds (each round times each model once, order rotated per round, threads
fixed, warm-up first). Per sparsity and batch size it prints the median latencies, the speedups
over dense, width / depth latency with a 95% bootstrap interval over rounds, and a verdict where
the interval excludes 1. ``--pairs N`` adds Tatoeba top-1 (no recovery training).

    .venv/bin/python experiments/bench/depth_vs_width.py [--sparsities 0.25,0.5,0.75] [--rounds 30]
        [--batch-sizes 1,8] [--threads 1] [--device cpu|cuda] [--pairs 0] [--model embedded]
"""

import argparse

import torch

import raysparse
from raysparse.efficiency.depth_width import depth_vs_width_latency


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--sparsities", default="0.25,0.5,0.75", help="encoder sparsities, rounded to whole layers")
    parser.add_argument("--layers", default="top", help="which layers the depth cut drops: top | bottom | alternate")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (the bootstrap resamples them)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu | cuda (timed with CUDA events after a synchronise)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--pairs", type=int, default=0, help="Tatoeba pairs per language for quality (0 = skip)")
    parser.add_argument("--languages", default=None, help="Tatoeba languages, comma-separated (default: all present)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")

    model = raysparse.load_model(args.model)
    tokenizer, pairs = None, None
    if args.pairs:
        from raysparse.data.parallel import tatoeba_pairs

        tokenizer = raysparse.load_tokenizer(args.model)
        pairs = tatoeba_pairs(args.languages.split(",") if args.languages else None, max_pairs=args.pairs)
    result = depth_vs_width_latency(model, [float(s) for s in args.sparsities.split(",")], layers=args.layers,
                                    batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
                                    sequence_length=args.seq_len, rounds=args.rounds, warmup=args.warmup,
                                    threads=args.threads, device=args.device, tokenizer=tokenizer, pairs=pairs)
    print(f"environment: {result.environment}")
    print(f"model: {args.model}; depth drops the {args.layers} layers "
          f"{', '.join(f'{k}: {v}' for k, v in result.dropped_layers.items())}; width: magnitude, per layer")
    if pairs:
        print(f"Tatoeba: {len(pairs)} languages x {args.pairs} pairs (avg top-1), no recovery training")
    print(result.table())


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
