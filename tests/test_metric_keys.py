"""The metric key scheme: ``<task>/<lang>/<metric>`` plus ``avg`` and ``worst``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from raysparse.errors import RaysparseError
from raysparse.metric_keys import (
    AGGREGATES,
    MetricKey,
    avg_key,
    check_languages,
    key_pattern,
    languages_in,
    metric_key,
    parse_metric_key,
    task_keys,
    with_language,
    worst_key,
    worst_of,
)


def test_build_and_parse_round_trip():
    assert metric_key("xnli", "de", "accuracy") == "xnli/de/accuracy"
    assert avg_key("xnli", "accuracy") == "xnli/avg/accuracy"
    assert worst_key("panx", "f1") == "panx/worst/f1"
    assert AGGREGATES == ("avg", "worst")
    for task, language, metric in [("xnli", "de", "accuracy"), ("udpos", "zh", "macro_f1"), ("tatoeba", "avg", "accuracy")]:
        key = metric_key(task, language, metric)
        parsed = parse_metric_key(key)
        assert parsed == MetricKey(task, language, metric)
        assert parsed.key == key == str(parsed)
    assert parse_metric_key(avg_key("xnli", "accuracy")).aggregate
    assert parse_metric_key(worst_key("xnli", "accuracy")).aggregate
    assert not parse_metric_key("xnli/de/accuracy").aggregate


def test_parse_rejects_keys_of_another_shape():
    for key in ["encoder_sparsity", "params/total", "level/0.3/xnli/de/accuracy", "dense/xnli/de/accuracy",
                "xnli//accuracy", "/de/accuracy", "xnli/de/", "", None, 3]:
        assert parse_metric_key(key) is None, key
    # three parts parse whatever they name: callers keep the task they mean
    assert parse_metric_key("cost/finetune/wall_s") == MetricKey("cost", "finetune", "wall_s")
    assert task_keys(["cost/finetune/wall_s", "xnli/de/accuracy"], "xnli") == [MetricKey("xnli", "de", "accuracy")]


def test_languages_in_sorted_without_aggregates_and_other_tasks():
    metrics = {"xnli/fr/accuracy": 0.7, "xnli/de/accuracy": 0.8, "xnli/avg/accuracy": 0.75,
               "xnli/worst/accuracy": 0.7, "xnli/sw/loss": 1.0, "pawsx/ja/accuracy": 0.6,
               "cost/finetune/wall_s": 3.0, "encoder_sparsity": 0.5, "dense/xnli/en/accuracy": 0.9}
    assert languages_in(metrics, "xnli", "accuracy") == ["de", "fr"]
    assert languages_in(metrics, "xnli") == ["de", "fr", "sw"]
    assert languages_in(list(metrics), "pawsx", "accuracy") == ["ja"]
    assert languages_in(metrics, "cost", "accuracy") == []
    assert languages_in(metrics, "udpos", "accuracy") == []


def test_related_keys_and_patterns():
    assert worst_of("xnli/avg/accuracy") == "xnli/worst/accuracy"
    assert worst_of("encoder_sparsity") == "encoder_sparsity"
    assert worst_of("xnli/de/accuracy") == "xnli/de/accuracy"
    assert worst_of("") == ""
    assert with_language("xnli/avg/accuracy", "de") == "xnli/de/accuracy"
    assert with_language("bytes", "de") == "bytes"
    pattern = key_pattern("panx", ("f1", "precision"))
    assert re.fullmatch(pattern, "panx/avg/f1") and re.fullmatch(pattern, "panx/de/precision")
    assert not re.fullmatch(pattern, "panx/de/recall") and not re.fullmatch(pattern, "panx/de/x/f1")
    assert not re.fullmatch(pattern, "xnli/de/f1")


def test_aggregate_names_are_no_language():
    check_languages(["de", "fr"])
    with pytest.raises(RaysparseError, match="'avg' is reserved"):
        check_languages(["de", "worst", "avg"])


def test_aggregate_uses_the_scheme():
    from raysparse.data.metrics import aggregate

    flat = aggregate({"de": {"accuracy": 0.5}, "fr": {"accuracy": 1.0}}, "xnli")
    assert flat == {metric_key("xnli", "de", "accuracy"): 0.5, metric_key("xnli", "fr", "accuracy"): 1.0,
                    avg_key("xnli", "accuracy"): 0.75, worst_key("xnli", "accuracy"): 0.5}
    assert languages_in(flat, "xnli", "accuracy") == ["de", "fr"]


def test_module_imports_only_errors_from_raysparse():
    source = Path(__file__).resolve().parents[1] / "raysparse" / "metric_keys.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert {name for name in imported if name.split(".")[0] == "raysparse"} == {"raysparse.errors"}


def test_interval_keys_are_prefixed_and_never_taken_for_quality_keys():
    from raysparse.metric_keys import interval_keys, interval_of

    low, high = interval_keys(avg_key("xnli", "accuracy"))
    assert (low, high) == ("ci95_low/xnli/avg/accuracy", "ci95_high/xnli/avg/accuracy")
    assert parse_metric_key(low) is None and parse_metric_key(f"dense/{high}") is None
    values = {"xnli/de/accuracy": 0.5, "xnli/avg/accuracy": 0.5, low: 0.4, high: 0.6,
              **dict(zip(interval_keys("xnli/de/accuracy"), (0.3, 0.7)))}
    assert languages_in(values, "xnli") == ["de"] and [k.key for k in task_keys(values, "xnli")] == \
        ["xnli/de/accuracy", "xnli/avg/accuracy"]
    assert interval_of(values, "xnli/avg/accuracy") == (0.4, 0.6) and interval_of(values, "xnli/fr/accuracy") is None
