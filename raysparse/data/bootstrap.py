"""Bootstrap 95% intervals of a task's primary metric, from per-example statistics.

Every task but BUCC scores its primary metric from per-example sufficient statistics (rows of
numbers, one per evaluation example, whose column sums determine the metric; see
:mod:`raysparse.data.metrics`). Their *form* says how:

    mean   [value]          mean of the values (accuracy of XNLI, PAWS-X, Tatoeba: correct or not;
                            QA F1: per question)
    ratio  [correct, total] sum(correct) / sum(total)   (UD-POS token accuracy, per sentence)
    f1     [tp, fp, fn]     entity F1 of the summed counts, with seqeval's arithmetic (PAN-X, per sentence)

:func:`metric_from_sums` is the one place that turns summed statistics into the metric; on the full
sample it gives the reported figure (exactly for counts; to the last bits for QA's float F1s).

A resample draws each language's examples with replacement (``resamples`` times, 1000 by
default), from a generator seeded by ``seed`` (0) and the language's code, so a language's draws
do not depend on which other languages are there: two runs scored on the same examples get the
same draws, which makes their difference *paired*. The average over languages is the mean of the
resampled per-language metrics (each language resampled independently), the worst language
their minimum. An interval is the 2.5 and 97.5 percentiles of the resampled values.

The statistics travel as an *examples record* (``results/examples.json`` of a run, the
``examples`` field of a run set's rows): task, metric, form, where each language's rows came
from, and the statistics as compact lists (:func:`compact`).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from raysparse.data.tasks import Task, get_task
from raysparse.errors import RaysparseError
from raysparse.metric_keys import AVG, WORST, check_languages, interval_keys, metric_key

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95
FORMS: dict[str, tuple[str, ...]] = {"mean": ("value",), "ratio": ("correct", "total"), "f1": ("tp", "fp", "fn")}
RECORD_FORMAT = "raysparse-examples/1"
DIGITS = 4                   # floats in a record are rounded to this many digits
_CELLS_PER_CHUNK = 4_000_000  # resample counts held at once: [resamples, examples]

Stats = Mapping[str, "np.ndarray | Sequence"]   # language -> per-example statistics


def example_form(task: str | Task) -> str | None:
    """The form of ``task``'s primary-metric statistics, or None when it has none (BUCC)."""
    task = get_task(task)
    if task.name == "bucc":
        return None
    if task.kind == "tagging":
        return "ratio" if task.name == "udpos" else "f1"
    return "mean"


def _matrix(stats) -> np.ndarray:
    values = np.asarray(stats, dtype=np.float64)
    return values.reshape(len(values), -1)


def metric_from_sums(form: str, sums: np.ndarray, count: int | np.ndarray) -> np.ndarray:
    """The metric from column sums ``sums`` [..., columns] of ``count`` examples (vectorised over leading axes)."""
    sums = np.asarray(sums, dtype=np.float64)
    if form == "mean":
        return sums[..., 0] / np.maximum(count, 1)
    if form == "ratio":
        return _divide(sums[..., 0], sums[..., 1])
    if form == "f1":   # seqeval's micro F1, operation for operation
        tp, fp, fn = sums[..., 0], sums[..., 1], sums[..., 2]
        precision, recall = _divide(tp, tp + fp), _divide(tp, tp + fn)
        denominator = precision + recall
        return 2.0 * precision * recall / np.where(denominator == 0, 1.0, denominator)
    raise RaysparseError(f"bootstrap.form: unknown form {form!r} (expected one of: {', '.join(FORMS)})")


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (as seqeval and scikit-learn's zero_division=0)."""
    return np.where(denominator == 0, 0.0, numerator / np.where(denominator == 0, 1.0, denominator))


def point_estimates(form: str, stats: Stats) -> dict[str, float]:
    """The metric of every language on its full sample, plus ``avg`` and ``worst`` over languages."""
    values = {lang: float(metric_from_sums(form, _matrix(s).sum(axis=0), len(s)))
              for lang, s in stats.items() if len(s)}
    ordered = [values[lang] for lang in sorted(values)]   # one summation order, however the stats were keyed
    return {**values, AVG: float(np.mean(ordered)), WORST: float(min(ordered))}


def _draw_counts(n: int, resamples: int, rng: np.random.Generator):
    """Blocks of [resamples, n] counts: how often each example is drawn in each resample."""
    block = max(1, _CELLS_PER_CHUNK // n)
    for start in range(0, resamples, block):
        rows = min(block, resamples - start)
        drawn = rng.integers(0, n, size=(rows, n)) + (np.arange(rows) * n)[:, None]
        yield np.bincount(drawn.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)


def resample(form: str, stats: Stats, resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, np.ndarray]:
    """``resamples`` bootstrap values of every language's metric, of ``avg`` and of ``worst``.

    Languages without examples are left out. Same ``seed``, language and example count: same draws.
    """
    check_languages(stats)
    out: dict[str, np.ndarray] = {}
    for language, values in stats.items():
        matrix = _matrix(values)
        if not len(matrix):
            continue
        rng = np.random.default_rng([seed, zlib.crc32(language.encode())])
        out[language] = np.concatenate([metric_from_sums(form, counts @ matrix, len(matrix))
                                        for counts in _draw_counts(len(matrix), resamples, rng)])
    if not out:
        raise RaysparseError("bootstrap: no examples to resample (expected at least one language with examples)")
    # sorted: the average's last bit must not depend on the order the languages came in (a run set read
    # back from JSON has its keys sorted; rows from MLflow keep the run's order)
    languages = np.stack([out[lang] for lang in sorted(out)])
    out[AVG], out[WORST] = languages.mean(axis=0), languages.min(axis=0)
    return out


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of ``values``."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def intervals(form: str, stats: Stats, resamples: int = RESAMPLES, seed: int = SEED,
              level: float = LEVEL) -> dict[str, tuple[float, float]]:
    """The 95% interval of every language's metric, of ``avg`` and of ``worst``."""
    return {key: percentile_interval(values, level) for key, values in resample(form, stats, resamples, seed).items()}


def _common(runs: Sequence[Stats]) -> list[str]:
    """The languages every run has examples of, in the first run's order."""
    return [lang for lang in runs[0] if all(len(run.get(lang, ())) for run in runs)]


def pool(resampled: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Several runs (seeds) of one configuration, each resampled by :func:`resample`: their values pooled
    (concatenated), so the interval of the pool spans the examples' variation and the seeds'. Keys all runs have."""
    return {key: np.concatenate([values[key] for values in resampled])
            for key in resampled[0] if all(key in values for values in resampled)}


def pool_differences(a: Sequence[Mapping[str, np.ndarray]],
                     b: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Resampled ``b − a`` for every pair of a run of ``a`` and a run of ``b`` (each resampled by :func:`resample`),
    pooled.

    Paired when both sides were resampled with the same seed on the same examples (the same draws);
    unpaired when their draws are independent (another seed, or other examples).
    """
    return {key: np.concatenate([y[key] - x[key] for x in a for y in b])
            for key in a[0] if all(key in values for values in [*a, *b])}


def paired_difference(form: str, a: Stats, b: Stats, resamples: int = RESAMPLES, seed: int = SEED,
                      level: float = LEVEL) -> dict[str, tuple[float, float]]:
    """The 95% interval of ``b − a`` per language, of the average and of the worst language, for two runs
    scored on the same examples: both resampled with the same draws (their common languages only)."""
    languages = _common([a, b])
    uneven = [lang for lang in languages if len(a[lang]) != len(b[lang])]
    if uneven or not languages:
        raise RaysparseError(f"bootstrap: a paired difference needs the same examples in both runs "
                             f"({'differing counts in ' + ', '.join(uneven) if uneven else 'no common language'})")
    a_values, b_values = (resample(form, {lang: run[lang] for lang in languages}, resamples, seed) for run in (a, b))
    return {key: percentile_interval(values, level)
            for key, values in pool_differences([a_values], [b_values]).items()}


def interval_metrics(task: str, metric: str, form: str, stats: Stats, resamples: int = RESAMPLES,
                     seed: int = SEED) -> dict[str, float]:
    """``ci95_low/<task>/<lang>/<metric>`` and ``ci95_high/...`` for every language, ``avg`` and ``worst``."""
    flat = {}
    for language, bounds in intervals(form, stats, resamples, seed).items():
        flat.update(zip(interval_keys(metric_key(task, language, metric)), bounds))
    return flat


# --- the examples record -----------------------------------------------------------------------------------


def compact(stats, digits: int | None = DIGITS) -> list:
    """Per-example statistics as a compact JSON list: one column flattened, whole numbers as ints,
    other floats rounded to ``digits`` digits (None: kept as they are)."""
    matrix = _matrix(stats)
    whole = bool(np.all(matrix == np.round(matrix)))
    values = (matrix.astype(np.int64) if whole else matrix if digits is None else np.round(matrix, digits)).tolist()
    return [row[0] for row in values] if matrix.shape[1] == 1 else values


def examples_record(task: str | Task, stats: Stats, sources: Mapping[str, str], skip: int = 0) -> dict:
    """The JSON-ready record of a run's per-example statistics (what ``results/examples.json`` holds)."""
    task = get_task(task)
    form = example_form(task)
    return {"format": RECORD_FORMAT, "task": task.name, "metric": task.primary_metric, "form": form,
            "columns": list(FORMS[form]), "skip": skip, "sources": {lang: sources.get(lang, "") for lang in stats},
            "stats": {lang: compact(values) for lang, values in stats.items()}}


def record_stats(record: Mapping | None, task: str | None = None) -> dict[str, np.ndarray] | None:
    """The statistics of an examples record as arrays (language -> [examples, columns]), or None when
    there is no record, it is not one, or it is of another task than ``task``."""
    if not isinstance(record, Mapping) or record.get("format") != RECORD_FORMAT or record.get("form") not in FORMS:
        return None
    if task is not None and record.get("task") != task:
        return None
    return {lang: _matrix(values) for lang, values in record.get("stats", {}).items()}


def same_examples(records: Sequence[Mapping]) -> bool:
    """True when the records scored the same examples: same sources, first row and count per common language."""
    first = records[0]
    languages = set.intersection(*(set(r.get("stats", {})) for r in records))
    return bool(languages) and all(
        r.get("skip") == first.get("skip")
        and all(r["sources"].get(lang) == first["sources"].get(lang)
                and len(r["stats"][lang]) == len(first["stats"][lang]) for lang in languages)
        for r in records[1:])


__all__ = ["FORMS", "LEVEL", "RESAMPLES", "SEED", "compact", "example_form", "examples_record", "interval_metrics",
           "intervals", "metric_from_sums", "paired_difference", "percentile_interval", "point_estimates", "pool",
           "pool_differences", "record_stats", "resample", "same_examples"]
