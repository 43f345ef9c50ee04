"""The mask-tuning step of a run (``pruning.mask_tuning``): after each round's shrink, rescale the kept
units against the dense model (:func:`raysparse.pruning.mask_tuning.tune_kept_units`).

The dense reference is the run's dense fine-tuned copy (``Run.teacher``: kept for distillation, or
for this alone), so checkpoints carry it and a resumed iterative run tunes against the same model.
Calibration batches are rows of the scoring pool, read without their labels; every worker sums its
normal equations with the others' so all fold the same scales.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist

from raysparse.pruning.mask_tuning import tune_kept_units, tuning_metrics

CALIBRATION_SALT = 3000   # batches of their own, not the scoring batches


def keep_dense_reference(run) -> None:
    """Keep a frozen copy of the still-dense model as the reference (unless a teacher is kept already)."""
    if run.spec.pruning.mask_tuning.enabled and run.teacher is None:
        run.teacher = copy.deepcopy(run.model).eval().requires_grad_(False)


def _sum_over_workers(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def tune_after_shrink(run, round_index: int) -> dict[str, float]:
    """Rescale the shrunk model's kept units (when enabled); log per-layer errors before and after."""
    config, spec = run.spec.pruning.mask_tuning, run.spec
    if not config.enabled:
        return {}
    wall, cpu = time.time(), time.process_time()
    rows = run.data.pool(run.languages["scoring"])
    batch_size = spec.finetune.batch_size
    count = max(1, -(-config.examples // (batch_size * run.world_size)))
    batches = run.data.batches(rows, 0, count, batch_size, salt=CALIBRATION_SALT + round_index)
    report = tune_kept_units(run.model, run.teacher, batches, damping=config.damping, max_scale=config.max_scale,
                             reduce=_sum_over_workers)
    metrics = tuning_metrics(report)
    metrics.update({"mask_tuning/wall_s": time.time() - wall, "mask_tuning/cpu_s": time.process_time() - cpu})
    run.log.metrics(metrics, step=round_index + 1)
    run.state.metrics.update({k: v for k, v in metrics.items() if k.count("/") == 1})
    if run.is_chief:
        print(f"[mask-tuning] round {round_index + 1}: relative error {metrics['mask_tuning/error_before']:.3f} -> "
              f"{metrics['mask_tuning/error_after']:.3f} (mean over {sum(map(len, report.values()))} sub-blocks, "
              f"{metrics['mask_tuning/cpu_s']:.1f} CPU s)", flush=True)
    return metrics


__all__ = ["keep_dense_reference", "tune_after_shrink"]
