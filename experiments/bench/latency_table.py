"""Benchmark: how well a latency table predicts the latency of shrunk models (docs/efficiency.md).

Builds the per-layer latency table of the embedded model (attention by heads 0..H, FFN on a grid of
neuron counts, the fixed cost of embeddings and pooler; ``raysparse.efficiency.latency_table``),
prints its build time and the table, then times the dense model and shrunk copies directly
(uniform 25/50/75% of every layer's heads and neurons removed, and a non-uniform mask), interleaved
in rounds, and prints each prediction beside the measured median, their ratio and the median
absolute percentage error. It asserts nothing: the numbers are the result.

    .venv/bin/python experiments/bench/latency_table.py [--batch-size 1] [--seq-len 128] [--threads 1]
        [--rounds 10] [--table-rounds 10] [--device cpu|cuda] [--dtype float32] [--model embedded]
"""

import argparse

import torch

import raysparse
from raysparse.efficiency.latency_table import LatencyTable, check_predictions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu | cuda (timed with CUDA events after a synchronise)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: the model's)")
    parser.add_argument("--table-rounds", type=int, default=10, help="timed rounds of every layer configuration")
    parser.add_argument("--neuron-steps", type=int, default=16, help="FFN grid: 0, N/steps, ..., N neurons")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds of the shrunk models")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")

    model = raysparse.load_model(args.model).eval()
    table = LatencyTable.build(model, args.batch_size, args.seq_len, args.dtype, args.device, args.threads,
                               rounds=args.table_rounds, neuron_steps=args.neuron_steps)
    print(f"environment: {table.environment}")
    print(f"table built in {table.build_seconds:.1f} s ({len(table.measured_ms)} configurations x "
          f"{table.rounds} rounds + {table.warmup} warm-up)")
    print(table.summary())
    print()
    check = check_predictions(table, model, rounds=args.rounds)
    print(f"direct timing: {args.rounds} interleaved rounds of every shrunk model (shapes: dense "
          f"{table.shape[0]} layers x {table.shape[1]} heads x {table.shape[2]} neurons)")
    print(check.table())


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
