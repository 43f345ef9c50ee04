"""A study's tables: quality against sparsity per setting and algorithm, per language, efficiency,
Dynamic Sparsification against separate runs, and the comparisons the paper's findings rest on.

Input is the flat trial rows of a search (:class:`raysparse.search.report.SearchReport`), so
the tables come out the same from MLflow or from an exported run set. A Dynamic
Sparsification trial stands for one point per level of its grid. Trials that differ only by
seed are averaged (mean, spread and count shown). Every number is formatted here, so a
report regenerated from the same run set is byte for byte the same.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

from raysparse.metric_keys import AGGREGATES, avg_key, languages_in, metric_key, worst_key

LABELS = ("variant", "algorithm", "setting", "schedule")   # what distinguishes curves, in this order


def primary_metric(task: str) -> str:
    from raysparse.data.tasks import get_task

    return get_task(task).primary_metric


def variant_of(row: dict) -> str:
    """Efficiency label: depth (layers) or width (heads and neurons), with +vocab when trimmed."""
    base = "depth" if row.get("algorithm") == "layerdrop" else "width"
    return base + ("+vocab" if row.get("trim_vocabulary") else "")


def points(rows: Sequence[dict], curves: dict[str, dict[str, dict]]) -> list[dict]:
    """One point per trial and sparsity level: a DS trial becomes one point per level of its grid."""
    out = []
    for row in rows:
        common = {k: row.get(k) for k in ("trial", "task", "algorithm", "setting", "schedule", "seed",
                                           "trim_vocabulary", "wall_s")}
        common["variant"] = variant_of(row)
        curve = curves.get(str(row.get("trial")))
        if row.get("schedule") == "dynamic" and curve:
            for level, values in sorted(curve.items(), key=lambda kv: float(kv[0])):
                point = {**common, **values, "level": float(level)}
                for key, value in values.items():   # DS levels time against the full sub-network
                    if key.startswith("latency/b"):
                        point["latency/pruned/" + key[len("latency/"):]] = value
                out.append(point)
        else:
            out.append({**row, **common, "level": row.get("target_sparsity")})
    return out


def varying_labels(items: Sequence[dict]) -> list[str]:
    """The label columns whose value differs between points (algorithm dropped when variant implies it)."""
    labels = [c for c in LABELS if len({str(p.get(c)) for p in items}) > 1]
    if "variant" in labels and "algorithm" in labels:
        by_variant: dict[str, set] = {}
        for p in items:
            by_variant.setdefault(p["variant"], set()).add(p.get("algorithm"))
        if all(len(v) == 1 for v in by_variant.values()):
            labels.remove("algorithm")
    return labels


def group_name(point: dict, labels: Sequence[str]) -> str:
    """The point's curve: its varying labels, or algorithm/setting when nothing varies."""
    return "/".join(str(point.get(c)) for c in (labels or ("algorithm", "setting")))


def tasks_of(items: Iterable[dict]) -> list[str]:
    return list(dict.fromkeys(p["task"] for p in items if p.get("task")))


def languages_of(items: Iterable[dict], task: str) -> list[str]:
    return languages_in([k for p in items for k in p], task, primary_metric(task))


# --- aggregation over seeds -------------------------------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def aggregate(items: Sequence[dict], key: str) -> tuple[float | None, float | None, int]:
    """(mean, standard deviation or None, count) of ``key`` over ``items`` that have it."""
    values = [p[key] for p in items if isinstance(p.get(key), (int, float)) and math.isfinite(p[key])]
    if not values:
        return None, None, 0
    spread = statistics.stdev(values) if len(values) > 1 else None
    return sum(values) / len(values), spread, len(values)


def cell(items: Sequence[dict], key: str, digits: int = 3, scale: float = 1.0) -> str:
    mean, spread, count = aggregate(items, key)
    if mean is None:
        return "–"
    text = f"{mean * scale:.{digits}f}"
    if count > 1 and f"{spread * scale:.{digits}f}".strip("-0.") != "":   # seeds that disagree: say by how much
        text += f" ± {spread * scale:.{digits}f} (n={count})"
    return text


def grouped(items: Sequence[dict], labels: Sequence[str]) -> dict[tuple[str, float], list[dict]]:
    """{(group, level): points}, in first-seen group order and increasing level."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for p in items:
        groups.setdefault((group_name(p, labels), round(float(p.get("level") or 0.0), 4)), []).append(p)
    order = list(dict.fromkeys(g for g, _ in groups))
    return {k: groups[k] for k in sorted(groups, key=lambda k: (order.index(k[0]), k[1]))}


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


# --- tables ------------------------------------------------------------------------------------------------


def quality_table(items: Sequence[dict], task: str) -> str:
    """Rows: sparsity level; columns: avg and worst language of every group (setting, algorithm, ...)."""
    mine = [p for p in items if p.get("task") == task]
    labels = varying_labels(mine)
    metric = primary_metric(task)
    cells = grouped(mine, labels)
    groups = list(dict.fromkeys(g for g, _ in cells))
    levels = sorted({level for _, level in cells})
    header = ["sparsity", *[f"{g} {which}" for g in groups for which in AGGREGATES]]
    body = []
    for level in levels:
        row = [f"{level:g}"]
        for g in groups:
            found = cells.get((g, level), [])
            row += [cell(found, avg_key(task, metric)), cell(found, worst_key(task, metric))]
        body.append(row)
    return markdown_table(header, body)


def language_table(items: Sequence[dict], task: str) -> str:
    """Every group and level: quality per language, average and worst."""
    mine = [p for p in items if p.get("task") == task]
    labels = varying_labels(mine)
    metric = primary_metric(task)
    languages = languages_of(mine, task)
    header = ["group", "sparsity", *languages, *AGGREGATES]
    body = [[group, f"{level:g}", *[cell(found, metric_key(task, lang, metric)) for lang in [*languages, *AGGREGATES]]]
            for (group, level), found in grouped(mine, labels).items()]
    return markdown_table(header, body)


def _megabytes(value) -> str:
    return "–" if value is None else f"{value / 1e6:.1f}"


def efficiency_table(items: Sequence[dict]) -> str:
    """Size and speed of every group and level: fast is not necessarily small."""
    labels = varying_labels(items)
    if len(tasks_of(items)) > 1:   # a task's head and sequence lengths differ: its own rows
        labels = ["task", *labels]
    batches = sorted({int(k.split("/b")[1].split("_")[0]) for p in items for k in p
                      if k.startswith("latency/pruned/b") and k.endswith("_ms")})
    header = ["group", "sparsity", "encoder sparsity", "params (M)", "encoder (M)", "embedding (M)", "MB",
              "size vs dense", "GFLOPs/seq", *[f"ms b{b}" for b in batches], *[f"speedup b{b}" for b in batches]]
    body = []
    dense = [p for p in items if p.get("dense/bytes")]
    if dense:   # every trial timed the dense model beside its own: their spread is the timing noise
        body.append(["dense (each trial's reference)", "0", "0.000", cell(dense, "dense/params/total", 2, 1e-6),
                     "–", "–", _megabytes(_mean([p.get("dense/bytes") for p in dense])), "1.000",
                     cell(dense, "dense/flops", 2, 1e-9), *[cell(dense, f"latency/dense/b{b}_ms", 1) for b in batches],
                     *["1.00" for _ in batches]])
    for (group, level), found in grouped(items, labels).items():
        if "params/total" not in found[0] and "bytes" not in found[0]:
            continue
        dense_bytes = _mean([p.get("dense/bytes") for p in found])
        size_ratio = _mean([p["bytes"] / p["dense/bytes"] for p in found if p.get("bytes") and p.get("dense/bytes")])
        if size_ratio is None and dense_bytes is None:   # DS levels: against the DS run's own level 0
            size_ratio = _ds_size_ratio(items, found)
        row = [group, f"{level:g}", cell(found, "encoder_sparsity"), cell(found, "params/total", 2, 1e-6),
               cell(found, "params/encoder", 2, 1e-6), cell(found, "params/embedding", 2, 1e-6),
               _megabytes(_mean([p.get("bytes") for p in found])),
               "–" if size_ratio is None else f"{size_ratio:.3f}", cell(found, "flops", 2, 1e-9)]
        row += [cell(found, f"latency/pruned/b{b}_ms", 1) for b in batches]
        row += [cell(found, f"speedup/b{b}", 2) for b in batches]
        body.append(row)
    return markdown_table(header, body)


def _ds_size_ratio(items: Sequence[dict], found: Sequence[dict]) -> float | None:
    trial = found[0].get("trial")
    full = [p for p in items if p.get("trial") == trial and p.get("level") == 0.0]
    if not full or not full[0].get("bytes") or not found[0].get("bytes"):
        return None
    return found[0]["bytes"] / full[0]["bytes"]


def dynamic_pairs(items: Sequence[dict]) -> list[tuple[float, list[dict], list[dict]]]:
    """(level, DS points, separate one-shot points at that level) for every level of the DS runs."""
    ds = [p for p in items if p.get("schedule") == "dynamic"]
    separate = [p for p in items if p.get("schedule") != "dynamic"]
    levels = sorted({p["level"] for p in ds})
    return [(level, [p for p in ds if p["level"] == level],
             [p for p in separate if p.get("level") is not None and abs(p["level"] - level) < 1e-9])
            for level in levels]


def dynamic_table(items: Sequence[dict], rows: Sequence[dict]) -> str:
    """DS (one run) against separate runs per level, and the wall time each way."""
    task = tasks_of(items)[0]
    metric = primary_metric(task)
    header = ["level", "DS encoder sparsity", "DS avg", "DS worst", "separate encoder sparsity", "separate avg",
              "separate worst", "DS − separate (points)", "separate CPU s"]
    body = []
    for level, ds, separate in dynamic_pairs(items):
        avg, worst = avg_key(task, metric), worst_key(task, metric)
        gap = _gap(ds, separate, avg)
        body.append([f"{level:g}", cell(ds, "encoder_sparsity"), cell(ds, avg),
                     cell(ds, worst), cell(separate, "encoder_sparsity"),
                     cell(separate, avg), cell(separate, worst),
                     "–" if gap is None else f"{gap:+.1f}",
                     "–" if not separate else f"{sum(stage_cost(p) for p in separate):.0f}"])
    footer = ""
    for what, key in (("Worker CPU time (every stage, summed over restarts)", "cpu_s"),
                      ("Worker wall time (every stage, summed over restarts)", "wall_s")):
        ds, separate = dynamic_costs(items, rows, key)
        if ds and separate:
            footer += (f"\n{what}: one DS run {ds:.0f} s; the separate runs at its levels {separate:.0f} s in all; "
                       f"ratio {ds / separate:.2f}.")
    return markdown_table(header, body) + ("\n" + footer if footer else "")


def _gap(ds: Sequence[dict], separate: Sequence[dict], key: str) -> float | None:
    a, b = _mean([p.get(key) for p in ds]), _mean([p.get(key) for p in separate])
    return None if a is None or b is None else 100 * (a - b)


def stage_cost(row: dict, kind: str = "cpu_s") -> float:
    """Seconds a run's worker spent in its stages (``cost/<stage>/<kind>``), carried across restarts.

    CPU seconds count every thread of the worker, so they hold on a loaded machine, where the
    wall time of a run (and of its restarts) says more about the neighbours than about the run.
    """
    return sum(v for k, v in row.items() if k.startswith("cost/") and k.endswith(f"/{kind}") and v is not None)


def dynamic_costs(items: Sequence[dict], rows: Sequence[dict], kind: str = "cpu_s") -> tuple[float, float]:
    """(DS runs, separate runs at the DS levels): summed stage seconds of ``kind`` (cpu_s or wall_s)."""
    ds_trials = {p["trial"] for p in items if p.get("schedule") == "dynamic"}
    levels = {p["level"] for p in items if p.get("schedule") == "dynamic"}
    ds = sum(stage_cost(r, kind) for r in rows if r.get("trial") in ds_trials)
    separate = sum(stage_cost(r, kind) for r in rows if r.get("schedule") != "dynamic"
                   and any(abs((r.get("target_sparsity") or 0.0) - level) < 1e-9 for level in levels))
    return ds, separate


# --- findings: the comparisons behind the paper's claims ---------------------------------------------------


def findings(items: Sequence[dict], rows: Sequence[dict]) -> list[str]:
    """One line per comparison the run set supports (settings, algorithms, efficiency, DS)."""
    lines = []
    labels = varying_labels(items)
    if "setting" in labels:
        lines += _settings_findings(items)
    if "algorithm" in labels and "variant" not in labels:
        lines += _algorithm_findings(items)
    if "variant" in labels:
        lines += _efficiency_findings(items)
    if any(p.get("schedule") == "dynamic" for p in items) and any(p.get("schedule") != "dynamic" for p in items):
        lines += _dynamic_findings(items, rows)
    return lines


def _settings_findings(items: Sequence[dict]) -> list[str]:
    lines = []
    for task in tasks_of(items):
        metric = primary_metric(task)
        mine = [p for p in items if p.get("task") == task]
        diffs: dict[str, list[float]] = {which: [] for which in AGGREGATES}
        for level in sorted({p["level"] for p in mine}):
            at = [p for p in mine if p["level"] == level]
            for which, found in diffs.items():
                key = metric_key(task, which, metric)
                shared = _mean([p.get(key) for p in at if p.get("setting") == "shared"])
                per = _mean([p.get(key) for p in at if p.get("setting") == "per-language"])
                if shared is not None and per is not None:
                    found.append(100 * (per - shared))
        overlap = [(level, _mean([p.get("language_study/head_jaccard") for p in mine
                                  if p["level"] == level and p.get("setting") == "per-language"]))
                   for level in sorted({p["level"] for p in mine})]
        if any(v is not None for _, v in overlap):
            lines.append(f"settings, {task}: kept heads shared between the per-language masks (mean Jaccard): "
                         + ", ".join(f"{v:.2f} at {level:g}" for level, v in overlap if v is not None))
        if diffs["avg"]:
            wins = sum(d > 0 for d in diffs["avg"])
            lines.append(f"settings, {task}: per-language minus shared, mean over {len(diffs['avg'])} sparsities: "
                         f"avg {sum(diffs['avg']) / len(diffs['avg']):+.1f} points, worst language "
                         f"{sum(diffs['worst']) / max(len(diffs['worst']), 1):+.1f} points; per-language ahead on "
                         f"average at {wins} of {len(diffs['avg'])} sparsities")
    return lines


def _algorithm_findings(items: Sequence[dict]) -> list[str]:
    lines = []
    for task in tasks_of(items):
        metric = primary_metric(task)
        mine = [p for p in items if p.get("task") == task]
        levels = sorted({p["level"] for p in mine})
        means = {}
        for algorithm in dict.fromkeys(p.get("algorithm") for p in mine):
            per_level = [_mean([p.get(avg_key(task, metric)) for p in mine
                                if p.get("algorithm") == algorithm and p["level"] == level]) for level in levels]
            if all(v is not None for v in per_level):
                means[algorithm] = sum(per_level) / len(per_level)
        ranking = sorted(means, key=means.get, reverse=True)
        if ranking:
            lines.append(f"algorithms, {task}: mean avg {metric} over sparsities {', '.join(f'{lv:g}' for lv in levels)}: "
                         + ", ".join(f"{a} {means[a]:.3f}" for a in ranking))
        for level in levels:
            seeds = [p.get(avg_key(task, metric)) for p in mine if p.get("algorithm") == "random" and p["level"] == level]
            _, spread, count = aggregate([{"v": v} for v in seeds if v is not None], "v")
            if count > 1:
                lines.append(f"algorithms, {task}: random at {level:g} over {count} seeds: spread (sd) "
                             f"{100 * spread:.1f} points")
    return lines


def _efficiency_findings(items: Sequence[dict]) -> list[str]:
    lines = []
    batches = sorted({int(k.split("/b")[1].split("_")[0]) for p in items for k in p if k.startswith("speedup/b")})
    batch = batches[-1] if batches else None
    for (group, level), found in grouped(items, varying_labels(items)).items():
        ratio = _mean([p["bytes"] / p["dense/bytes"] for p in found if p.get("bytes") and p.get("dense/bytes")])
        speedup = _mean([p.get(f"speedup/b{batch}") for p in found]) if batch else None
        if ratio is None:
            continue
        lines.append(f"efficiency, {group} at {level:g}: " + (f"{speedup:.2f}x faster at batch {batch}, "
                                                               if speedup is not None else "")
                     + f"{ratio:.3f} of the dense model's bytes")
    return lines


def _dynamic_findings(items: Sequence[dict], rows: Sequence[dict]) -> list[str]:
    task = tasks_of(items)[0]
    key = avg_key(task, primary_metric(task))
    gaps = [g for _, ds, sep in dynamic_pairs(items) if (g := _gap(ds, sep, key)) is not None]
    ds, separate = dynamic_costs(items, rows, "cpu_s")
    line = (f"dynamic sparsification, {task}: DS minus separate runs, mean over {len(gaps)} levels: "
            f"{sum(gaps) / len(gaps):+.1f} points" if gaps else f"dynamic sparsification, {task}: no matching levels")
    if ds and separate:
        line += f"; worker CPU time DS / separate runs = {ds / separate:.2f}"
    return [line]


__all__ = ["aggregate", "dynamic_table", "efficiency_table", "findings", "language_table", "points",
           "quality_table", "variant_of", "varying_labels"]
