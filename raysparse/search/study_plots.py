"""A study's figures: quality against sparsity per task, per language, size and speed, DS vs separate."""

from __future__ import annotations

from collections.abc import Sequence

from raysparse.metric_keys import avg_key, metric_key, worst_key
from raysparse.search.study import (
    dynamic_pairs,
    grouped,
    languages_of,
    primary_metric,
    tasks_of,
    varying_labels,
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean(values) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else None


def _curves(items: Sequence[dict], key: str, x: str = "encoder_sparsity") -> dict[str, list[tuple[float, float]]]:
    """{group: [(x, mean of key)]} over levels, seeds averaged."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for (group, _), found in grouped(items, varying_labels(items)).items():
        xs, ys = _mean([p.get(x) for p in found]), _mean([p.get(key) for p in found])
        if xs is not None and ys is not None:
            curves.setdefault(group, []).append((xs, ys))
    return {g: sorted(c) for g, c in curves.items()}


def _task_panels(items: Sequence[dict]):
    """A figure with one panel per task, and (axis, task, that task's items) per panel."""
    tasks = tasks_of(items)
    figure, axes = _pyplot().subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    return figure, [(axis, task, [p for p in items if p.get("task") == task]) for axis, task in zip(axes[0], tasks)]


def quality_vs_sparsity(items: Sequence[dict]):
    """One panel per task: average quality (solid) and the worst language (dashed) per group."""
    figure, panels = _task_panels(items)
    for axis, task, mine in panels:
        metric = primary_metric(task)
        worst = _curves(mine, worst_key(task, metric))
        for group, curve in _curves(mine, avg_key(task, metric)).items():
            line, = axis.plot(*zip(*curve), "o-", label=group)
            if group in worst:
                axis.plot(*zip(*worst[group]), "x--", color=line.get_color(), alpha=0.6)
        axis.set_title(task)
        axis.set_xlabel("encoder sparsity")
        axis.set_ylabel(f"{metric} (solid: average, dashed: worst language)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def per_language(items: Sequence[dict]):
    """One panel per task: quality per language for every group and level."""
    figure, panels = _task_panels(items)
    for axis, task, mine in panels:
        metric, languages = primary_metric(task), languages_of(mine, task)
        for (group, level), found in grouped(mine, varying_labels(mine)).items():
            values = [_mean([p.get(metric_key(task, lang, metric)) for p in found]) for lang in languages]
            if languages and all(v is not None for v in values):
                axis.plot(languages, values, "o-", alpha=0.8, label=f"{group} {level:g}")
        axis.set_title(task)
        axis.set_ylabel(metric)
        axis.legend(fontsize=6)
    figure.tight_layout()
    return figure


def efficiency(items: Sequence[dict]):
    """Latency (largest batch timed) and bytes against encoder sparsity: fast is not necessarily small."""
    plt = _pyplot()
    batches = sorted({int(k.split("/b")[1].split("_")[0]) for p in items for k in p
                      if k.startswith("latency/pruned/b") and k.endswith("_ms")})
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    dense = [p for p in items if p.get("dense/bytes")]
    if batches:
        for group, curve in _curves(items, f"latency/pruned/b{batches[-1]}_ms").items():
            left.plot(*zip(*curve), "o-", label=group)
        reference = _mean([p.get(f"latency/dense/b{batches[-1]}_ms") for p in dense])
        if reference is not None:
            left.plot([0.0], [reference], "kx", markersize=9, label="dense")
        left.set_ylabel(f"median latency, batch {batches[-1]} (ms)")
        left.legend(fontsize=7)
    for group, curve in _curves(items, "bytes").items():
        right.plot([x for x, _ in curve], [y / 1e6 for _, y in curve], "o-", label=group)
    reference = _mean([p.get("dense/bytes") for p in dense])
    if reference is not None:
        right.plot([0.0], [reference / 1e6], "kx", markersize=9, label="dense")
    right.set_ylabel("size (MB, float32)")
    right.legend(fontsize=7)
    for axis in (left, right):
        axis.set_xlabel("encoder sparsity")
        axis.set_ylim(bottom=0)     # from zero: a 10% smaller file must look 10% smaller
    figure.tight_layout()
    return figure


def dynamic_vs_separate(items: Sequence[dict]):
    """Average (solid) and worst-language (dashed) quality: one DS run against a separate run per level."""
    plt = _pyplot()
    task = tasks_of(items)[0]
    metric = primary_metric(task)
    figure, axis = plt.subplots(figsize=(6, 4))
    pairs = dynamic_pairs(items)
    for which, index, style, color in (("DS (one run)", 1, "o", "#4c72b0"), ("separate runs", 2, "s", "#c44e52")):
        points = [(_mean([p.get("encoder_sparsity") for p in found[index]]),
                   _mean([p.get(avg_key(task, metric)) for p in found[index]]),
                   _mean([p.get(worst_key(task, metric)) for p in found[index]])) for found in pairs]
        points = [p for p in points if None not in p]
        if points:
            axis.plot([p[0] for p in points], [p[1] for p in points], f"{style}-", color=color, label=which)
            axis.plot([p[0] for p in points], [p[2] for p in points], f"{style}--", color=color, alpha=0.5)
    axis.set_xlabel("encoder sparsity")
    axis.set_ylabel(f"{task} {metric} (dashed: worst language)")
    axis.set_title("Dynamic Sparsification vs separate runs")
    axis.legend()
    figure.tight_layout()
    return figure


__all__ = ["dynamic_vs_separate", "efficiency", "per_language", "quality_vs_sparsity"]
