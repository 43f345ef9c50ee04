"""A study's tables: quality against sparsity per setting and algorithm, per language, efficiency,
Dynamic Sparsification against separate runs, and the comparisons the paper's findings rest on.

Input is the flat trial rows of a search (:class:`raysparse.search.report.SearchReport`), so
the tables come out the same from MLflow or from an exported run set. A Dynamic
Sparsification trial stands for one point per level of its grid. Trials that differ only by
seed are averaged (mean, spread and count shown). Every number is formatted here, so a
report regenerated from the same run set is byte for byte the same.

Uncertainty. A trial whose row carries its per-example statistics (the ``examples`` record,
:mod:`raysparse.data.bootstrap`) gets a bootstrap 95% interval beside every quality value of the
quality and per-language tables: ``0.812 [0.781, 0.842]``. With several seeds in a cell the
value is the seeds' mean with their spread, ``0.812 ± 0.010 (n=2) [0.771, 0.850]``, and the
interval is that of the *pooled* resamples (1000 per seed, concatenated), so it spans the
examples' variation and the seeds'. A cell with one trial and no statistics but logged interval
keys (``ci95_low/...``, a Dynamic Sparsification level) shows those; anything else shows no interval.

The findings carry a verdict per task, from the 95% interval of a difference in the average
over languages of the primary metric: *paired* when every trial compared holds statistics on the
same examples (same sources, first row and count per language: both sides take the same
resampling draws), *unpaired* when they hold statistics on different examples (independent
draws), and from the logged intervals when a side has none (one trial a side: the difference of
the bounds, ``[low_b − high_a, high_b − low_a]``, a conservative interval). Without any, no
verdict (the run sets of docs/results predate the statistics). See :func:`findings` for the rules.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

from raysparse.data import bootstrap
from raysparse.metric_keys import AGGREGATES, AVG, avg_key, interval_of, languages_in, metric_key, worst_key

LABELS = ("variant", "algorithm", "setting", "schedule")   # what distinguishes curves, in this order
EXAMPLES = "examples"   # the row field of a trial's per-example statistics (an examples record), when it has them
SIMPLEST = "gradient"   # the simplest method of METHOD.md's second finding: gradient importance (Michel et al.)
CONFIRMED, CONTRADICTED, UNDECIDED = "confirmed", "contradicted", "undecided"


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


# --- 95% intervals ---------------------------------------------------------------------------------------

_RESAMPLED: dict[tuple, tuple[dict, dict]] = {}   # (id of a record, languages, seed) -> (record, resamples)


def _records(items: Sequence[dict], task: str) -> list[dict] | None:
    """The examples records of ``items`` for ``task``, or None unless every item has one."""
    records = [p.get(EXAMPLES) for p in items]
    ok = items and all(bootstrap.record_stats(r, task) is not None for r in records)
    return records if ok else None


def _resampled(records: Sequence[dict], seed: int = bootstrap.SEED) -> list[dict]:
    """Every record resampled on the languages all of them have (cached: tables and findings ask again)."""
    languages = tuple(lang for lang in records[0]["stats"] if all(r["stats"].get(lang) for r in records))
    out = []
    for record in records:
        key = (id(record), languages, seed)
        if key not in _RESAMPLED or _RESAMPLED[key][0] is not record:
            if len(_RESAMPLED) > 1024:
                _RESAMPLED.clear()
            stats = bootstrap.record_stats(record)
            _RESAMPLED[key] = (record, bootstrap.resample(record["form"], {lang: stats[lang] for lang in languages},
                                                          seed=seed))
        out.append(_RESAMPLED[key][1])
    return out


def interval(items: Sequence[dict], task: str, language: str) -> tuple[float, float] | None:
    """The 95% interval of ``task``'s primary metric for ``language`` (or ``avg``, ``worst``) over ``items``
    (seeds pooled); None without statistics or a logged interval."""
    records = _records(items, task)
    if records is not None:
        pooled = bootstrap.pool(_resampled(records))
        return bootstrap.percentile_interval(pooled[language]) if language in pooled else None
    return interval_of(items[0], metric_key(task, language, primary_metric(task))) if len(items) == 1 else None


def quality_cell(items: Sequence[dict], task: str, language: str) -> str:
    """:func:`cell` of the primary metric of ``task`` in ``language`` (or an aggregate), with its 95% interval."""
    text = cell(items, metric_key(task, language, primary_metric(task)))
    bounds = interval(items, task, language) if text != "–" else None
    return text if bounds is None else f"{text} [{bounds[0]:.3f}, {bounds[1]:.3f}]"


def difference(a: Sequence[dict], b: Sequence[dict], task: str,
               language: str = AVG) -> tuple[tuple[float, float], str] | None:
    """The 95% interval of ``b − a`` in ``task``'s primary metric for ``language`` (default: the average), and
    how it was found: ``paired`` or ``unpaired`` bootstrap, or ``logged intervals``; None when neither side
    can say (see the module docstring)."""
    a_records, b_records = _records(a, task), _records(b, task)
    if a_records is not None and b_records is not None:
        paired = bootstrap.same_examples([*a_records, *b_records])
        both = _resampled([*a_records, *b_records])   # the same languages on both sides
        if not paired:
            both = both[:len(a)] + _resampled([*a_records, *b_records], bootstrap.SEED + 1)[len(a):]
        values = bootstrap.pool_differences(both[:len(a)], both[len(a):])
        if language in values:
            return bootstrap.percentile_interval(values[language]), "paired" if paired else "unpaired"
        return None
    if len(a) == 1 and len(b) == 1:
        key = metric_key(task, language, primary_metric(task))
        found_a, found_b = interval_of(a[0], key), interval_of(b[0], key)
        if found_a is not None and found_b is not None:
            return (found_b[0] - found_a[1], found_b[1] - found_a[0]), "logged intervals"
    return None


def _side(bounds: tuple[float, float]) -> int:
    """1 when an interval lies above 0, -1 when below, 0 when it holds 0."""
    return 1 if bounds[0] > 0 else -1 if bounds[1] < 0 else 0


def overall(verdicts: Sequence[str]) -> str:
    """A task's verdict from its sparsities': confirmed when at least one sparsity confirms and none contradicts,
    contradicted the other way round, undecided otherwise (none decided, or both ways)."""
    if CONFIRMED in verdicts and CONTRADICTED not in verdicts:
        return CONFIRMED
    if CONTRADICTED in verdicts and CONFIRMED not in verdicts:
        return CONTRADICTED
    return UNDECIDED


def _points(bounds: tuple[float, float]) -> str:
    return f"[{100 * bounds[0]:+.1f}, {100 * bounds[1]:+.1f}]"


def _how(methods: Iterable[str]) -> str:
    return "/".join(sorted(set(methods)))


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
    """Rows: sparsity level; columns: avg and worst language of every group (setting, algorithm, ...), each
    with its 95% interval where the trials have per-example statistics (see the module docstring)."""
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
            row += [quality_cell(found, task, which) for which in AGGREGATES]
        body.append(row)
    return markdown_table(header, body)


def language_table(items: Sequence[dict], task: str) -> str:
    """Every group and level: quality per language, average and worst (with 95% intervals, as :func:`quality_table`)."""
    mine = [p for p in items if p.get("task") == task]
    labels = varying_labels(mine)
    languages = languages_of(mine, task)
    header = ["group", "sparsity", *languages, *AGGREGATES]
    body = [[group, f"{level:g}", *[quality_cell(found, task, lang) for lang in [*languages, *AGGREGATES]]]
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


# --- dense baselines --------------------------------------------------------------------------------------

PIVOT = "en"          # the language zero-shot fine-tuning reads: the cross-lingual figures leave it out
CURVE = "learning_curve"   # a dense trial's row field: its fine-tuning's dev scores by step (report.load_search)


def is_baseline(row: dict) -> bool:
    """A trial that measured its dense fine-tuned model and the trivial predictor beside it (nothing pruned)."""
    task = row.get("task")
    return bool(task) and (row.get("target_sparsity") or 0.0) == 0.0 and any(
        k.startswith(f"trivial/{task}/") for k in row)


def _cross_lingual(row: dict, task: str) -> tuple[float | None, tuple[float, float] | None, str, float | None]:
    """(average over the languages but English, its 95% interval, the worst of them, its score)."""
    metric = primary_metric(task)
    languages = [lang for lang in languages_in(list(row), task) if lang != PIVOT]
    values = {lang: row[metric_key(task, lang, metric)] for lang in languages}
    if not values:
        return None, None, "–", None
    average = sum(values.values()) / len(values)
    worst = min(values, key=values.get)
    bounds = None
    stats = bootstrap.record_stats(row.get(EXAMPLES), task)
    if stats is not None and all(lang in stats for lang in languages):
        resampled = bootstrap.resample(row[EXAMPLES]["form"], {lang: stats[lang] for lang in languages})
        bounds = bootstrap.percentile_interval(resampled[AVG])
    return average, bounds, worst, values[worst]


def baseline_table(rows: Sequence[dict]) -> str:
    """One row per task: English, the cross-lingual average (95% interval) and worst language of the dense
    fine-tuned model, the trivial predictor's cross-lingual average on the same rows, the gap in points,
    and the fine-tuning budget."""
    header = ["task", "metric", "fine-tuning", "English", "cross-lingual avg [95%]", "worst language", "trivial",
              "gap (points)"]
    body = []
    for row in rows:
        if not is_baseline(row):
            continue
        task = row["task"]
        metric = primary_metric(task)
        english = row.get(metric_key(task, PIVOT, metric))
        average, bounds, worst, worst_value = _cross_lingual(row, task)
        trivial = [v for k, v in row.items() if k.startswith(f"trivial/{task}/") and k.endswith(f"/{metric}")
                   and k.split("/")[2] not in (PIVOT, *AGGREGATES)]
        floor = sum(trivial) / len(trivial) if trivial else None
        steps = row.get("finetune_steps")
        body.append([task, metric, "–" if steps is None else f"{steps:.0f} steps",
                     "–" if english is None else f"{english:.3f}",
                     "–" if average is None else f"{average:.3f}" + ("" if bounds is None else
                                                                     f" [{bounds[0]:.3f}, {bounds[1]:.3f}]"),
                     "–" if worst_value is None else f"{worst} {worst_value:.3f}",
                     "–" if floor is None else f"{floor:.3f}",
                     "–" if floor is None or average is None else f"{100 * (average - floor):+.1f}"])
    return markdown_table(header, body)


def learning_curve_table(rows: Sequence[dict]) -> str:
    """Each dense trial's fine-tuning curve: the cross-lingual average (and English) on development rows
    (after the reported ones) at every evaluated step."""
    header = ["task", "step", "English (dev)", "cross-lingual avg (dev)"]
    body = []
    for row in rows:
        curve = row.get(CURVE) or {}
        task = row.get("task")
        if not curve or not task or not is_baseline(row):
            continue
        metric = primary_metric(task)
        for step, scores in sorted(curve.items(), key=lambda kv: int(kv[0])):
            others = [v for k, v in scores.items() if k.split("/")[1] not in (PIVOT, *AGGREGATES)]
            english = scores.get(metric_key(task, PIVOT, metric))
            body.append([task, str(step), "–" if english is None else f"{english:.3f}",
                         f"{sum(others) / len(others):.3f}" if others else "–"])
    return markdown_table(header, body)


def findings(items: Sequence[dict], rows: Sequence[dict]) -> list[str]:
    """One line per comparison the run set supports (settings, algorithms, efficiency, DS).

    Where intervals can be had (see the module docstring), each of the first two findings ends in a
    verdict per task, from the 95% interval of a difference in the average over languages of the
    task's primary metric at each sparsity, the sparsities' verdicts combined by :func:`overall`:

    - settings ("a sub-network per language is not better than one shared"), interval of
      per-language − shared: above 0 contradicted, below 0 confirmed, holding 0 undecided;
    - algorithms ("the simplest method performs best"; the simplest is gradient importance,
      :data:`SIMPLEST`), interval of gradient − each other method at that sparsity: confirmed when
      every one lies above 0, contradicted when any lies below 0, undecided otherwise; no verdict
      without gradient trials.
    """
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
        lines += _settings_verdict(mine, task)
    return lines


def _settings_verdict(mine: Sequence[dict], task: str) -> list[str]:
    """The verdict line of the settings finding for ``task`` (none without intervals)."""
    def judge(at: list[dict]):
        found = difference([p for p in at if p.get("setting") == "shared"],
                           [p for p in at if p.get("setting") == "per-language"], task)
        if found is None:
            return None
        bounds, how = found
        return _points(bounds), (CONTRADICTED, UNDECIDED, CONFIRMED)[1 - _side(bounds)], [how]

    return _verdict("settings", mine, task, judge, "a sub-network per language is not better than one shared",
                    "per-language minus shared")


def _verdict(finding: str, mine: Sequence[dict], task: str, judge, claim: str, compared: str) -> list[str]:
    """A finding's verdict line for ``task``: ``judge(points at one sparsity)`` gives (text, verdict, how the
    intervals were found) or None; the sparsities' verdicts combine by :func:`overall`. None without any."""
    parts, verdicts, methods = [], [], []
    for level in sorted({p["level"] for p in mine}):
        judged = judge([p for p in mine if p["level"] == level])
        if judged is not None:
            text, verdict, how = judged
            parts.append(f"at {level:g}: {text} {verdict}")
            verdicts.append(verdict)
            methods += how
    if not parts:
        return []
    return [f"{finding}, {task}: verdict {overall(verdicts)} ({claim}): {compared}, avg "
            f"{primary_metric(task)}, 95% interval in points ({_how(methods)}): " + "; ".join(parts)]


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
        lines += _algorithm_verdict(mine, task)
    return lines


def _algorithm_verdict(mine: Sequence[dict], task: str) -> list[str]:
    """The verdict line of the algorithms finding for ``task`` (none without gradient trials or intervals)."""
    def judge(at: list[dict]):
        simplest = [p for p in at if p.get("algorithm") == SIMPLEST]
        others = dict.fromkeys(p.get("algorithm") for p in at if p.get("algorithm") != SIMPLEST)
        found = {a: difference([p for p in at if p.get("algorithm") == a], simplest, task) for a in others} \
            if simplest else {}
        found = {a: f for a, f in found.items() if f is not None}
        if not found:
            return None
        sides = [_side(bounds) for bounds, _ in found.values()]
        verdict = CONTRADICTED if -1 in sides else CONFIRMED if all(side == 1 for side in sides) else UNDECIDED
        return (", ".join(f"{a} {_points(bounds)}" for a, (bounds, _) in found.items()), verdict,
                [how for _, how in found.values()])

    return _verdict("algorithms", mine, task, judge, f"the simplest method, {SIMPLEST}, performs best",
                    f"{SIMPLEST} minus each other method")


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


__all__ = ["aggregate", "difference", "dynamic_table", "efficiency_table", "findings", "interval", "language_table",
           "overall", "points", "quality_cell", "quality_table", "variant_of", "varying_labels"]
