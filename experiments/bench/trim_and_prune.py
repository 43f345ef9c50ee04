"""Benchmark: vocabulary trimming makes the fast model small as well (docs/METHOD.md, finding 3).

The embedded multilingual-e5-small against (a) 50% encoder sparsity alone (magnitude
scores, per-layer selection, shrunk physically), (b) its vocabulary trimmed to the
languages of the local Tatoeba and XNLI files (English included) alone, (c) both.
All four are measured in one run by ``raysparse.efficiency.bench``: interleaved, warmed
up, threads fixed, median and p10-p90 of repeats, bytes in memory and on disk. Targets
for (c): at most 45% of the dense bytes and at least 1.8x faster at batch 8, sequence
length 128, on CPU.

    .venv/bin/python experiments/bench/trim_and_prune.py [--threads 1] [--repeats 20] [--memory]

One thread by default: on a shared machine, intra-op threads stall whenever another
process takes one of their cores, which swamps the differences being measured.
"""

import argparse
import copy
import time

import torch

import raysparse
from raysparse.data.vocabulary import vocabulary_for_languages
from raysparse.efficiency import bench
from raysparse.pruning import Selection, get_algorithm, select_mask
from raysparse.structure import Encoder, shrink
from raysparse.structure.vocab import trim_vocabulary

BYTES_TARGET, SPEEDUP_TARGET, TARGET_BATCH = 0.45, 1.8, 8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--memory", action="store_true", help="also resident memory (a fresh process per model)")
    parser.add_argument("--csv", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    dense, tokenizer = raysparse.load_model(args.model), raysparse.load_tokenizer(args.model)
    enc = Encoder(dense)
    mask = select_mask(get_algorithm("magnitude").score(dense), args.sparsity, enc.hidden_size, enc.head_dim,
                       Selection(scope="per-layer"))
    started = time.time()
    kept = vocabulary_for_languages(tokenizer)          # every Tatoeba/XNLI language present, English included
    print(f"vocabulary: {len(kept)} of {len(tokenizer)} pieces used by the local Tatoeba and XNLI text "
          f"({time.time() - started:.0f}s)")
    pruned = shrink(copy.deepcopy(dense), mask)
    trimmed, _ = trim_vocabulary(copy.deepcopy(dense), tokenizer, kept)
    both, _ = trim_vocabulary(copy.deepcopy(pruned), tokenizer, kept)
    models = {"dense": dense, "(a) pruned": pruned, "(b) trimmed": trimmed, "(c) both": both}

    report = bench(models, batch_sizes, args.seq_len, warmup=args.warmup, repeats=args.repeats,
                   threads=args.threads, devices=["cpu"], memory=args.memory)
    print(f"mask: {mask.summary()}, encoder sparsity {report.rows[1].encoder_sparsity:.3f}")
    print(report.table())
    print()
    base = report.row("dense", batch_sizes[0])
    for name in list(models)[1:]:
        row = report.row(name, batch_sizes[0])
        speed = ", ".join(f"{report.row(name, b).speedup:.2f}x at batch {b}" for b in batch_sizes)
        print(f"{name:12}  bytes {row.param_bytes / base.param_bytes:.3f} of dense "
              f"(disk {row.disk_bytes / base.disk_bytes:.3f}), {speed}")
    if TARGET_BATCH in batch_sizes:
        row = report.row("(c) both", TARGET_BATCH)
        ratio = row.disk_bytes / base.disk_bytes
        print(f"targets for (c): bytes on disk {ratio:.3f} of dense (<= {BYTES_TARGET}: "
              f"{'met' if ratio <= BYTES_TARGET else 'missed'}), speedup {row.speedup:.2f}x at batch {TARGET_BATCH} "
              f"(>= {SPEEDUP_TARGET}: {'met' if row.speedup >= SPEEDUP_TARGET else 'missed'})")
    if args.csv:
        print(f"wrote {report.to_csv(args.csv)}")
    if args.plot:
        print(f"wrote {report.plot(args.plot)}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
