"""Benchmark: does a 50%-sparse shrunk encoder run as much faster as its FLOPs say?

The embedded multilingual-e5-small, 50% encoder sparsity uniform across layers
(per-layer selection of heads and neurons), timed against the dense model on CPU at
batch 1 and 8, sequence length 128, threads fixed, the two interleaved, median of
repeats after warm-up. Prints measured speedup and speedup / FLOP ratio (target at
batch 8: >= 0.9).

    .venv/bin/python experiments/bench/shrink_speedup.py [--threads 2] [--repeats 20]
"""

import argparse
import copy

import torch

from raysparse.efficiency import environment, measure_latency, median_speedups
from raysparse.models.sources import load_encoder
from raysparse.pruning import Selection, get_algorithm, select_mask
from raysparse.structure import Encoder, measure, shrink


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()

    dense = load_encoder(args.model)
    enc = Encoder(dense)
    scores = get_algorithm("magnitude").score(dense)
    mask = select_mask(scores, args.sparsity, enc.hidden_size, enc.head_dim, Selection(scope="per-layer"))
    pruned = shrink(copy.deepcopy(dense), mask)
    flop_ratio = measure(dense, args.seq_len).flops_per_sequence / measure(pruned, args.seq_len).flops_per_sequence

    results = measure_latency({"dense": dense, "pruned": pruned}, batch_sizes=(1, 8), sequence_length=args.seq_len,
                              repeats=args.repeats, threads=args.threads)
    speedups = median_speedups(results, "dense")
    print(f"environment: {environment()}  threads used: {args.threads}")
    print(f"mask: {mask.summary()}  encoder FLOP ratio dense/pruned at length {args.seq_len}: {flop_ratio:.2f}")
    print(f"{'batch':>5}  {'dense ms':>9}  {'pruned ms':>9}  {'p10-p90 pruned':>15}  {'speedup':>7}  {'speedup/FLOP ratio':>18}")
    for batch in (1, 8):
        d = next(r for r in results if r.name == "dense" and r.batch_size == batch)
        p = next(r for r in results if r.name == "pruned" and r.batch_size == batch)
        s = speedups[("pruned", batch)]
        print(f"{batch:>5}  {d.median_ms:9.1f}  {p.median_ms:9.1f}  {p.p10_ms:7.1f}-{p.p90_ms:<7.1f}  {s:7.2f}  {s / flop_ratio:18.2f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
