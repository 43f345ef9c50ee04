"""Search spaces, spec validation and Pareto fronts (no cluster needed)."""

import itertools
import random

import optuna
import pytest

from raysparse.errors import RaysparseError
from raysparse.search import check_search, define_by_run, dominates, pareto_front
from raysparse.search.driver import as_search_spec

BASE = {"data": {"task": "xnli", "languages": ["en", "de"]}}


def spec(**fields):
    return as_search_spec({"base": BASE, "space": {"pruning.algorithm": {"choice": ["gradient", "random"]}}, **fields})


def test_conditional_parameters_sampled_only_when_their_condition_holds():
    space = as_search_spec({"base": BASE, "space": {
        "pruning.algorithm": {"choice": ["gradient", "random"]},
        "pruning.options.max_batches": {"int": [1, 4], "when": {"pruning.algorithm": "gradient"}},
        "pruning.sparsity": {"uniform": [0.2, 0.6]},
    }}).space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sample = define_by_run(space)
    for _ in range(30):
        trial = study.ask()
        sample(trial)
        params = trial.params
        assert ("pruning.options.max_batches" in params) == (params["pruning.algorithm"] == "gradient")
        assert 0.2 <= params["pruning.sparsity"] <= 0.6
        study.tell(trial, 0.0)


@pytest.mark.parametrize("fields,expected", [
    ({"space": {}}, "space: the search space is empty"),
    ({"space": {"pruning.sparsty": {"choice": [0.5]}}}, "space.pruning.sparsty: not a spec field"),
    ({"space": {"pruning.sparsity": {"choice": [0.5, 1.2]}}}, "space.pruning.sparsity: value 1.2 makes an invalid spec"),
    ({"space": {"pruning.sparsity": {"uniform": [0.6, 0.2]}}}, "low < high"),
    ({"space": {"pruning.algorithm": {"choice": ["gradient"]},
                "pruning.options.temperature": {"uniform": [0.1, 1], "when": {"pruning.algorithm": "l0x"}}}},
     "never occur in pruning.algorithm's choices"),
    ({"space": {"pruning.options.temperature": {"uniform": [0.1, 1], "when": {"pruning.algorithm": "gradient"}},
                "pruning.algorithm": {"choice": ["gradient"]}}}, "must be a parameter declared before"),
    ({"objectives": [{"metric": "xnli/avg/f1"}]}, "objectives[0].metric: 'xnli/avg/f1' is not reported"),
    ({"objectives": [{"metric": "latency/pruned/b64_ms", "mode": "min"}]}, "is not reported by any trial"),
    ({"objectives": [{"metric": "xnli/avg/accuracy"}, {"metric": "bytes", "mode": "min"}],
      "scheduler": {"type": "asha"}}, "scheduler.type: asha takes one objective"),
    ({"trials": [{"pruning.sparsity": 0.3}]}, "trials[0]: ['pruning.sparsity'] are not parameters"),
])
def test_bad_search_specs_are_one_line(fields, expected):
    with pytest.raises(RaysparseError) as err:
        check_search(spec(**fields))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_default_objective_is_the_task_average():
    assert [o.metric for o in spec().resolved_objectives()] == ["xnli/avg/accuracy"]


def brute_force_front(rows, metrics, modes):
    front = []
    for a in rows:
        beaten = False
        for b in rows:
            if b is a:
                continue
            signs = [1 if m == "max" else -1 for m in modes]
            at_least = all(s * b[k] >= s * a[k] for k, s in zip(metrics, signs))
            strictly = any(s * b[k] > s * a[k] for k, s in zip(metrics, signs))
            beaten |= at_least and strictly
        if not beaten:
            front.append(a)
    return front


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    for _ in range(20):
        rows = [{"q": rng.choice([0.5, 0.6, 0.7, 0.8]), "lat": rng.choice([10.0, 20.0, 30.0]),
                 "bytes": rng.choice([1, 2, 3])} for _ in range(12)]
        metrics, modes = ["q", "lat", "bytes"], ["max", "min", "min"]
        expected = brute_force_front(rows, metrics, modes)
        got = pareto_front(rows, metrics, modes)
        assert sorted(map(id, got)) == sorted(map(id, expected))


def test_dominance():
    assert dominates([0.8, 10], [0.7, 10], ["max", "min"])
    assert not dominates([0.8, 10], [0.8, 10], ["max", "min"])
    assert not dominates([0.9, 30], [0.8, 10], ["max", "min"])
    assert all(not dominates(a, a, ["max"]) for a in itertools.product([1, 2]))
