"""Benchmark: what a recovery step costs when the model is trained at the size it keeps.

The embedded multilingual-e5-small, pruned to 50% encoder sparsity by gradient importance
(global scope; otherwise the committed best spec ``experiments/specs/e5-small-tatoeba-50.yaml``), then
the same N recovery steps (same batches, same seed, no dropout and distillation from the dense model
as in that spec) three ways in this process, each through the run pipeline:

* dense:  sparsity 0, the full model trains (the reference cost of a step);
* gated:  the full-size model with the pruned units gated off (``recovery.shrink: false``,
          how recovery ran before);
* shrunk: the model physically shrunk to the mask, then trained (``recovery.shrink: true``,
          the default now), the teacher running beside the student;
* ungrouped: shrunk, with ``data.group_by_length`` off when the spec turns it on (every batch padded to
          its longest pair whatever the others): two real recoveries of ``--steps`` distinct steps
          each, taking turns with grouped ones, compared by the mean step (the batches differ);
* dense-c, cached: dense and shrunk again, with the teacher's soft targets read from the stage
          cache (what every trial of a search after the first pays; the one-off cost of
          computing them, paid by dense-c here, is printed).

Every turn is a new recovery, whose teacher keeps no rows yet (``recovery.distillation.row_cache_mb``):
the teacher's pass is timed as a first epoch pays it; over the spec's 400 steps it runs on 63% of
the rows (docs/runs.md). The variants take turns of ``--chunk`` steps while they are timed (a drift in the machine's speed,
large on shared VMs, reaches all of them alike); the quality figures come from a separate real
recovery of ``--steps`` steps. Prints the median milliseconds per step of each, the ratios
shrunk/dense and gated/dense step by step (the median over steps of the ratio on the same batch),
and Tatoeba top-1 after recovery for gated and shrunk (first ``--eval-pairs`` pairs of every
language present). Targets (issue 14): shrunk/dense <= 0.55 at 50% sparsity; shrunk quality within
1 point of gated.

Measured 2026-12-02, session 5 (2 threads, idle, 20 steps, a CPU without AMX): with the spec's
distillation dense 3409, gated 4761, shrunk 1959 ms/step (shrunk/dense 0.57), Tatoeba avg gated 0.767,
shrunk 0.775; without distillation 2517 / 2508 / 1308 (0.52).
Measured 2026-12-02, session 6 (2 threads, idle, 16 steps, a Xeon with AMX: every step about 2.5x
faster, so what does not shrink weighs more): ``--teacher-dtype bfloat16``: dense 1328, gated 1405,
shrunk 898 ms/step (shrunk/dense 0.68, gated/dense 1.06); Tatoeba avg gated 0.763, shrunk 0.768 (+0.4).
``--teacher-dtype bfloat16 --hidden off --no-eval``: dense 1289, shrunk 860 (0.67); with cached teacher
targets dense 1199, shrunk 733 (0.61; computing them once took 190 ms per step). A bare step without
a teacher (forward / backward / AdamW): dense 500 / 524 / 45 ms, shrunk 336 / 306 / 29 ms (0.63):
at 50% encoder sparsity this CPU does not halve a step, whatever the loop does around it.
Measured 2026-12-06 (turns of 6 steps, paired ratios; recovery without dropout since): shrunk/dense
0.57 without distillation, 0.60 with dropout kept, 0.54 with the spec's distillation; Tatoeba after 20
steps gated 0.773, shrunk 0.773 (docs/benchmarks.md).
Measured 2026-12-06, later (one shuffle per epoch, fused AdamW; ``--distill off --head-ratio 1 --steps 30
--no-eval``): paired shrunk/dense 0.51 and 0.53 in two runs (target met); with the spec's distillation 0.65.
Measured 2026-12-06, sixth session (the spec grouping batches by length, ``--steps 18 --no-eval``): dense 1101,
gated 1065, shrunk 613 ms/step median, paired shrunk/dense 0.61; a grouped shrunk step 764 ms on average
against 1118 ungrouped (0.68).

    .venv/bin/python experiments/bench/recovery_cost.py --steps 20            # ~20 min on 2 cores
    .venv/bin/python experiments/bench/recovery_cost.py --steps 10 --eval-pairs 50 --languages de,fr,ru
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from raysparse.training.loop import Callback

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "experiments" / "specs" / "e5-small-tatoeba-50.yaml"


class StepTimer(Callback):
    """Wall time of every training step of the stages it observes."""

    def __init__(self):
        self.times: list[float] = []
        self._last = 0.0

    def on_start(self, step):
        self._last = time.perf_counter()

    def on_step_end(self, step, loss):
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now


def variant(spec, **changes):
    data = spec.model_dump()
    for path, value in changes.items():
        section, key = path.split(".")
        data[section][key] = value
    return data


def main() -> None:
    from raysparse.config import RunSpec, load_spec, parse
    from raysparse.runner import preflight
    from raysparse.training.pipeline import build_pipeline
    from raysparse.structure import Encoder, encoder_sparsity_of
    from raysparse.training.session import LocalSession

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="recovery steps per variant (timed, and before evaluation)")
    parser.add_argument("--chunk", type=int, default=6, help="steps per turn when the variants take turns")
    parser.add_argument("--eval-pairs", type=int, default=500, help="Tatoeba pairs per language evaluated")
    parser.add_argument("--languages", default=None, help="Tatoeba languages (default: every one present)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--distill", choices=("spec", "on", "off"), default="spec",
                        help="distillation from the dense model: as the spec says (on), or forced on/off; the "
                             "teacher's forward pass is the same in every variant, so it narrows the ratios")
    parser.add_argument("--teacher-dtype", choices=("spec", "float32", "bfloat16"), default="spec",
                        help="the teacher's forward passes in this dtype (recovery.distillation.teacher_dtype)")
    parser.add_argument("--hidden", choices=("spec", "on", "off"), default="spec",
                        help="hidden-state distillation (off: the teacher's soft targets can be cached)")
    parser.add_argument("--dropout", choices=("spec", "on", "off"), default="spec",
                        help="the model's dropout during recovery (recovery.dropout; off by default): its random masks "
                             "cost the same at every size")
    parser.add_argument("--head-ratio", default="spec",
                        help="pruning.head_ratio: heads lose this x the target share, neurons the rest (1: an even "
                             "split, as the issue's figures were measured; default: the spec's)")
    parser.add_argument("--group-by-length", choices=("spec", "on", "off"), default="spec",
                        help="batches of rows of similar length (the spec: on); on adds the ungrouped variant")
    parser.add_argument("--no-eval", action="store_true", help="time the steps only (no Tatoeba evaluation)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = load_spec(SPEC)
    data = base.model_dump()
    distillation = data["recovery"]["distillation"]
    if args.distill != "spec":
        distillation["enabled"] = args.distill == "on"
    if args.teacher_dtype != "spec":
        distillation["teacher_dtype"] = args.teacher_dtype
    if args.hidden != "spec":
        distillation["hidden"] = args.hidden == "on"
    if args.dropout != "spec":
        data["recovery"]["dropout"] = args.dropout == "on"
    if args.head_ratio != "spec":
        data["pruning"]["head_ratio"] = float(args.head_ratio)
    if args.group_by_length != "spec":
        data["data"]["group_by_length"] = args.group_by_length == "on"
    base = parse(RunSpec, data)
    base = parse(RunSpec, variant(base, **{"pruning.algorithm": "gradient", "recovery.steps": args.steps,
                                          "data.max_eval_examples": args.eval_pairs,
                                          "data.languages": args.languages.split(",") if args.languages else None,
                                          "efficiency.latency": False, "tracking.log_models": "none"}))
    languages = preflight(base)
    print(f"{SPEC.name}: {base.pruning.algorithm} to {base.pruning.sparsity} encoder sparsity (head ratio "
          f"{base.pruning.head_ratio:g}), {args.steps} recovery "
          f"steps (batch {base.finetune.batch_size}, length {base.data.max_length}, distillation "
          f"{'on' if base.recovery.distillation.enabled else 'off'}, hidden {base.recovery.distillation.hidden}, teacher "
          f"{base.recovery.distillation.teacher_dtype}, dropout {'on' if base.recovery.dropout else 'off'}, grouped by length {base.data.group_by_length}), "
          f"{args.threads} threads; Tatoeba: "
          f"{len(languages['evaluation'])} languages, first {args.eval_pairs} pairs", flush=True)
    variants = {"dense": variant(base, **{"pruning.sparsity": 0.0}),
                "gated": variant(base, **{"recovery.shrink": False}),
                "shrunk": variant(base, **{"recovery.shrink": True})}
    distill = base.recovery.distillation
    if distill.enabled and distill.cache_targets and not distill.hidden:   # the teacher's soft targets from the stage cache, as every trial after a search's first
        variants["dense-c"], variants["cached"] = variants["dense"], variants["shrunk"]
    ms, quality, sparsity, times = {}, {}, {}, {}
    cache = tempfile.TemporaryDirectory(prefix="recovery-cost-")

    def pruned(name: str, spec: dict | None = None):
        storage = cache.name if name in ("dense-c", "cached") else None
        pipeline = build_pipeline(parse(RunSpec, spec or variants[name]), languages, LocalSession(), storage=storage)
        pipeline.finetune()
        pipeline.prune()
        return pipeline

    # Timing: the variants take turns, --chunk steps each (the same batches every turn), so a drift in
    # the machine's speed reaches all of them alike; the first step of a turn (AdamW's state) is not timed.
    pipelines = {name: pruned(name) for name in variants}
    timers = {name: StepTimer() for name in variants}
    for name, pipeline in pipelines.items():
        pipeline.observers.append(timers[name])
        enc = Encoder(pipeline.model)
        sparsity[name] = encoder_sparsity_of(pipeline.state.masks["shared"], enc.hidden_size, enc.head_dim)
        times[name] = []
    for turn in range(max(1, args.steps // args.chunk)):
        for name, pipeline in pipelines.items():
            timer, started = timers[name], time.perf_counter()
            timer.times.clear()
            pipeline._recover(args.chunk, "recover", resumable=False)
            if turn == 0 and name == "dense-c":   # the first to need them: computes and stores them
                once = time.perf_counter() - started - sum(timer.times)
                print(f"[{name}] the teacher's targets for {args.chunk} steps took {once:.1f} s once "
                      f"({1000 * once / args.chunk:.0f} ms per step; later trials read them)", flush=True)
            times[name] += timer.times[1:]
    del pipelines
    if base.data.group_by_length:   # the same recovery over distinct batches, grouped and not, taking turns
        grouping = {"grouped": variants["shrunk"],
                    "ungrouped": variant(base, **{"recovery.shrink": True, "data.group_by_length": False})}
        steps_of = {name: [] for name in grouping}
        for _ in range(2):
            for name, spec in grouping.items():
                pipeline, timer = pruned("shrunk", spec), StepTimer()
                pipeline.observers.append(timer)
                pipeline._recover(args.steps, "recover", resumable=False)
                steps_of[name] += timer.times[1:]
                del pipeline
    for name in variants:
        ms[name] = 1000 * statistics.median(times[name])
        spread = [1000 * t for t in times[name]]
        print(f"[{name}] {ms[name]:.0f} ms/step median (min {min(spread):.0f}, max {max(spread):.0f}) over "
              f"{len(spread)} steps; encoder sparsity {sparsity[name]:.3f}", flush=True)
    if not args.no_eval:   # quality after a real recovery of --steps steps, from freshly pruned models
        for name in ("gated", "shrunk"):
            pipeline = pruned(name)
            pipeline.recover()
            pipeline.evaluate()
            quality[name] = pipeline.state.metrics
            del pipeline

    task = "tatoeba"
    print()
    print(f"{'':8} {'ms/step':>8} {'/ dense':>8} {'avg top-1':>10} {'worst':>7}")
    for name in variants:
        q = quality.get(name, {})
        avg, worst = q.get(f"{task}/avg/accuracy"), q.get(f"{task}/worst/accuracy")
        print(f"{name:8} {ms[name]:8.0f} {ms[name] / ms['dense']:8.2f} "
              f"{'' if avg is None else f'{avg:.3f}':>10} {'' if worst is None else f'{worst:.3f}':>7}")
    def paired(name: str, reference: str) -> float:
        """Median over steps of (this variant's step / the reference's step on the same batch): batches
        differ in length, so pairing them removes most of the spread that medians of each keep."""
        return statistics.median(a / b for a, b in zip(times[name], times[reference]))

    ratio = paired("shrunk", "dense")
    print(f"\nstep by step on the same batches: shrunk/dense {ratio:.2f} (target <= 0.55): "
          f"{'met' if ratio <= 0.55 else 'NOT met'}; gated/dense {paired('gated', 'dense'):.2f}; "
          f"shrunk/gated {paired('shrunk', 'gated'):.2f}")
    if base.data.group_by_length:
        grouped, ungrouped = statistics.mean(steps_of["grouped"]), statistics.mean(steps_of["ungrouped"])
        print(f"batches grouped by length: a shrunk step {1000 * grouped:.0f} ms on average against "
              f"{1000 * ungrouped:.0f} ungrouped ({grouped / ungrouped:.2f}; {args.steps} distinct steps, twice each)")
    if "cached" in ms:
        cached = paired("cached", "dense-c")
        print(f"with cached teacher targets (both): shrunk/dense {cached:.2f} (target <= 0.55): "
              f"{'met' if cached <= 0.55 else 'NOT met'}")
    if quality:
        gap = quality["shrunk"][f"{task}/avg/accuracy"] - quality["gated"][f"{task}/avg/accuracy"]
        print(f"shrunk - gated Tatoeba avg: {100 * gap:+.1f} points (target: within 1): "
              f"{'met' if abs(gap) <= 0.01 or gap > 0 else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
