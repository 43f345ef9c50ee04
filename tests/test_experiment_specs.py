"""Every committed run and search spec under experiments/ validates and passes the pre-cluster checks
on the real data and the embedded model, so a user's first `raysparse run` of one cannot fail on its file."""

from pathlib import Path

import pytest

from raysparse.config import load_spec
from raysparse.jobs import check_spec, spec_kind
from raysparse.runner import preflight
from raysparse.search.spec import SearchSpec, check_search, preflight_trials

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.mark.parametrize("path", sorted((EXPERIMENTS / "specs").glob("*.yaml")), ids=lambda p: p.stem)
def test_run_specs_pass_preflight(path, data_dir):
    spec = load_spec(path)
    assert spec.name == path.stem
    assert preflight(spec)["evaluation"]


@pytest.mark.parametrize("path", sorted((EXPERIMENTS / "searches").glob("*.yaml")), ids=lambda p: p.stem)
def test_search_specs_pass_preflight(path, data_dir):
    if getattr(check_spec(path), "kind", None) == "subnetworks":   # a checkpoint's search: the fields validate, the file is read as one
        assert spec_kind(path) == "search" and check_spec(path).workers >= 1
        return
    spec = load_spec(path, SearchSpec)
    base = check_search(spec)
    assert preflight(base)["evaluation"]
    preflight_trials(spec, base)


def test_the_benchmark_spec_is_the_benchmarks_best_configuration(data_dir):
    """experiments/specs/e5-small-tatoeba-50.yaml restates the configuration quality_per_cost.py chose
    (docs/benchmarks.md): magnitude, 400 recovery steps without dropout on batches grouped by length,
    distilled from a bfloat16 teacher."""
    spec = load_spec(EXPERIMENTS / "specs" / "e5-small-tatoeba-50.yaml")
    languages = preflight(spec)
    assert spec.data.task == "tatoeba" and len(languages["evaluation"]) == 32
    assert set(languages["scoring"]) < set(languages["evaluation"])   # XNLI pairs exist for some Tatoeba languages
    assert (spec.pruning.algorithm, spec.pruning.sparsity, spec.recovery.steps) == ("magnitude", 0.5, 400)
    assert spec.data.group_by_length
    assert spec.pruning.head_ratio == 0.6   # 30% of the heads, 60% of the FFN neurons
    distillation = spec.recovery.distillation
    assert distillation.enabled and distillation.hidden and distillation.teacher_dtype == "bfloat16"
    assert not spec.recovery.dropout and spec.recovery.learning_rate == 2e-4
