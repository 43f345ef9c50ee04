"""The names of quality metrics: ``<task>/<lang>/<metric>`` plus the aggregates ``avg`` and ``worst``.

Every result of a run (MLflow metrics, Tune results, stored run sets, reports) names a
task's quality per language as ``<task>/<language>/<metric>`` (``xnli/de/accuracy``), the
mean over languages as ``<task>/avg/<metric>`` and the lowest language as
``<task>/worst/<metric>``. This module is the one place that builds and reads such keys.

Other results share the flat namespace and some have three parts too
(``cost/finetune/wall_s``, ``latency/pruned/b8_ms``), so :func:`parse_metric_key` only
says whether a key has the *shape* of a quality key; callers keep the keys of the task
they mean (``parsed.task == task``), as :func:`languages_in` does.

A quality value's bootstrap 95% interval (:mod:`raysparse.data.bootstrap`) is logged beside it under
a prefix, ``ci95_low/<task>/<lang>/<metric>`` and ``ci95_high/<task>/<lang>/<metric>`` (aggregates
too), as the dense model's quality is under ``dense/``: a prefixed key has four parts, so
:func:`parse_metric_key` does not take it for a quality key, and :func:`languages_in`, tables and
objectives never see it. :func:`interval_keys` builds the pair, :func:`interval_of` reads it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from raysparse.errors import RaysparseError

AVG = "avg"
WORST = "worst"
AGGREGATES: tuple[str, ...] = (AVG, WORST)   # the mean over languages, the lowest language
SEPARATOR = "/"
INTERVAL_BOUNDS: tuple[str, ...] = ("ci95_low", "ci95_high")   # prefixes of a 95% interval's bounds


def metric_key(task: str, language: str, metric: str) -> str:
    """``<task>/<language>/<metric>``; ``language`` may be an aggregate (``avg``, ``worst``)."""
    return SEPARATOR.join((task, language, metric))


def avg_key(task: str, metric: str) -> str:
    """``<task>/avg/<metric>``: ``metric`` averaged over the task's languages."""
    return metric_key(task, AVG, metric)


def worst_key(task: str, metric: str) -> str:
    """``<task>/worst/<metric>``: the lowest language's ``metric``."""
    return metric_key(task, WORST, metric)


def interval_keys(key: str) -> tuple[str, str]:
    """The keys of the lower and upper bound of ``key``'s 95% interval: ``ci95_low/<key>``, ``ci95_high/<key>``."""
    low, high = INTERVAL_BOUNDS
    return f"{low}{SEPARATOR}{key}", f"{high}{SEPARATOR}{key}"


def interval_of(values, key: str) -> tuple[float, float] | None:
    """``key``'s logged 95% interval in ``values`` (a mapping of metric keys); None unless both bounds are numbers."""
    low, high = (values.get(k) for k in interval_keys(key))
    return (low, high) if isinstance(low, (int, float)) and isinstance(high, (int, float)) else None


def is_aggregate(language: str) -> bool:
    return language in AGGREGATES


def check_languages(languages: Iterable[str]) -> None:
    """Raise one line if a language code is one of the aggregate names (it would clash with them)."""
    reserved = [aggregate for aggregate in AGGREGATES if aggregate in set(languages)]
    if reserved:
        raise RaysparseError(f"metrics: '{sorted(reserved)[0]}' is reserved and cannot be a language code")


@dataclass(frozen=True)
class MetricKey:
    """A parsed ``<task>/<language>/<metric>`` key."""

    task: str
    language: str
    metric: str

    @property
    def aggregate(self) -> bool:
        """True for ``avg`` and ``worst``, which are no language."""
        return is_aggregate(self.language)

    @property
    def key(self) -> str:
        return metric_key(self.task, self.language, self.metric)

    def __str__(self) -> str:
        return self.key


def parse_metric_key(key: str) -> MetricKey | None:
    """The parts of ``key``, or None unless it is three non-empty parts joined by ``/``.

    Any three-part key parses (``cost/finetune/wall_s`` too): compare ``.task`` with the
    task you mean.
    """
    if not isinstance(key, str):
        return None
    parts = key.split(SEPARATOR)
    if len(parts) != 3 or not all(parts):
        return None
    return MetricKey(*parts)


def task_keys(metrics: Iterable[str], task: str, metric: str | None = None) -> list[MetricKey]:
    """The parsed keys of ``task`` (of ``metric`` only, when given) among ``metrics``, in their order."""
    found = []
    for key in metrics:
        parsed = parse_metric_key(key)
        if parsed is not None and parsed.task == task and (metric is None or parsed.metric == metric):
            found.append(parsed)
    return found


def languages_in(metrics: Iterable[str], task: str, metric: str | None = None) -> list[str]:
    """The languages (sorted, aggregates left out) that ``metrics`` (keys, or a mapping keyed
    by them) has ``task``'s ``metric`` for (any metric of the task, when None)."""
    return sorted({k.language for k in task_keys(metrics, task, metric) if not k.aggregate})


def with_language(key: str, language: str) -> str:
    """``key`` for another language (or aggregate); a key that is not a metric key comes back as it is."""
    parsed = parse_metric_key(key)
    return key if parsed is None else metric_key(parsed.task, language, parsed.metric)


def worst_of(key: str) -> str:
    """The ``worst`` key that goes with an ``avg`` key; any other key comes back as it is."""
    parsed = parse_metric_key(key)
    return worst_key(parsed.task, parsed.metric) if parsed is not None and parsed.language == AVG else key


def key_pattern(task: str, metrics: Iterable[str]) -> str:
    """A regex that fully matches ``task``'s keys of ``metrics`` in any language or aggregate."""
    names = "|".join(re.escape(m) for m in metrics)
    return rf"{re.escape(task)}{SEPARATOR}[^{SEPARATOR}]+{SEPARATOR}({names})"


__all__ = [
    "AGGREGATES", "AVG", "INTERVAL_BOUNDS", "MetricKey", "WORST", "avg_key", "check_languages", "interval_keys",
    "interval_of", "is_aggregate", "key_pattern", "languages_in", "metric_key", "parse_metric_key", "task_keys",
    "with_language", "worst_key", "worst_of",
]
