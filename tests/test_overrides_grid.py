"""Budgets and --set overrides of spec files, and grid studies expanding into fixed trials."""

import pytest
import yaml

from raysparse.cli import main
from raysparse.config import RunSpec, load_spec
from raysparse.errors import RaysparseError
from raysparse.overrides import (
    apply_overrides,
    parse_assignment,
    resolve_overrides,
    set_override,
)
from raysparse.search.grid import expand_grid
from raysparse.search.spec import SearchSpec, check_search


def test_set_walks_nested_sections_and_dotted_keys():
    data = {"base": {"recovery": {"steps": 8}}, "grid": {"pruning.sparsity": [0.3, 0.5]}}
    set_override(data, "base.recovery.steps", 2)
    set_override(data, "grid.pruning.sparsity", [0.5])
    set_override(data, "base.finetune.steps", 0)             # a missing section is created
    assert data == {"base": {"recovery": {"steps": 2}, "finetune": {"steps": 0}},
                    "grid": {"pruning.sparsity": [0.5]}}
    assert apply_overrides({"a": {"b": 1}}, {"a.b": 2}) == {"a": {"b": 2}}


@pytest.mark.parametrize("text, expected", [("base.recovery.steps=2", ("base.recovery.steps", 2)),
                                            ("grid.pruning.sparsity=[0.5, 0.7]", ("grid.pruning.sparsity", [0.5, 0.7])),
                                            ("efficiency.latency=false", ("efficiency.latency", False)),
                                            ("model.source=xlm-roberta-base", ("model.source", "xlm-roberta-base"))])
def test_assignments_read_values_as_yaml(text, expected):
    assert parse_assignment(text) == expected


@pytest.mark.parametrize("text", ["steps", "=2", "a..b=1", "a=[1"])
def test_bad_assignments_are_one_line(text):
    with pytest.raises(RaysparseError, match=r"^set: ") as error:
        parse_assignment(text)
    assert "\n" not in str(error.value)


def test_a_budget_overrides_then_set_then_renames(tmp_path):
    data = {"name": "s", "finetune": {"steps": 100}, "budgets": {"tiny": {"finetune.steps": 2, "recovery.steps": 1}}}
    out = resolve_overrides(dict(data), "spec.yaml", "tiny", ["finetune.steps=3"])
    assert out == {"name": "s-tiny", "finetune": {"steps": 3}, "recovery": {"steps": 1}}
    assert resolve_overrides(dict(data), "spec.yaml") == {"name": "s", "finetune": {"steps": 100}}
    with pytest.raises(RaysparseError, match=r"budget: 'large' is not defined in spec.yaml \(budgets: tiny\)"):
        resolve_overrides(dict(data), "spec.yaml", "large")


def test_run_specs_take_budgets_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "finetune": {"steps": 50},
                                    "budgets": {"tiny": {"finetune.steps": 1, "data.max_eval_examples": 4}}}))
    spec = load_spec(path, RunSpec, budget="tiny", overrides=["recovery.steps=0"])
    assert (spec.name, spec.finetune.steps, spec.data.max_eval_examples, spec.recovery.steps) == ("r-tiny", 1, 4, 0)
    assert load_spec(path).finetune.steps == 50       # the budgets section itself is never a spec field
    with pytest.raises(RaysparseError, match=r"^recovery.steps: .*greater than or equal to 0"):
        load_spec(path, RunSpec, overrides=["recovery.steps=-1"])


def test_cli_reports_a_bad_budget_in_one_line(tmp_path, capsys):
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "space": {"pruning.sparsity": {"choice": [0.5]}}}))
    assert main(["search", str(path), "--budget", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: budget: 'tiny' is not defined in {path} (budgets: none defined)"


def test_grid_expands_axes_in_order_and_fills_unset_paths_from_the_base():
    grid = {"method": [{"pruning.algorithm": "gradient"}, {"pruning.algorithm": "random", "seed": 3}],
            "pruning.sparsity": [0.3, 0.6]}
    trials, choices = expand_grid(grid, {"seed": 7})
    assert trials == [{"pruning.algorithm": "gradient", "seed": 7, "pruning.sparsity": 0.3},
                      {"pruning.algorithm": "gradient", "seed": 7, "pruning.sparsity": 0.6},
                      {"pruning.algorithm": "random", "seed": 3, "pruning.sparsity": 0.3},
                      {"pruning.algorithm": "random", "seed": 3, "pruning.sparsity": 0.6}]
    assert choices == {"pruning.algorithm": ["gradient", "random"], "seed": [7, 3], "pruning.sparsity": [0.3, 0.6]}


def test_a_grid_search_is_a_search_with_fixed_trials():
    spec = SearchSpec.model_validate({"name": "g", "grid": {"pruning.setting": ["shared", "per-language"],
                                                            "pruning.sparsity": [0.3, 0.5, 0.7]},
                                      "base": {"data": {"task": "xnli"}}})
    assert spec.num_samples == len(spec.trials) == 6
    assert spec.space["pruning.sparsity"].choice == [0.3, 0.5, 0.7]
    check_search(spec)
    again = SearchSpec.model_validate(spec.model_dump())       # what the driver and resume see
    assert again.trials == spec.trials and "grid" not in spec.model_dump()


@pytest.mark.parametrize("grid, expected", [
    ({"pruning.sparsity": []}, r"^grid.pruning.sparsity: expected a non-empty list"),
    ({"pruning.sparsity": 0.5}, r"^grid.pruning.sparsity: expected a non-empty list"),
    ({"x": [{"pruning.sparsity": 0.3}, 0.5]}, r"^grid.x: expected either values"),
    ({"data.languages": [["de"]]}, r"^grid.data.languages: .*put lists in base"),
    ({"a": [{"pruning.sparsity": 0.3}], "b": [{"pruning.sparsity": 0.5}]}, r"^grid: two axes set pruning.sparsity"),
])
def test_bad_grids_are_one_line(grid, expected):
    with pytest.raises(RaysparseError, match=expected):
        SearchSpec.model_validate({"grid": grid})


def test_grid_points_are_checked_as_whole_specs():
    spec = SearchSpec.model_validate({"grid": {"run": [{"pruning.schedule": "dynamic", "pruning.setting": "per-language"}]},
                                      "base": {"data": {"task": "tatoeba"}}})
    with pytest.raises(RaysparseError, match=r"^trials\[0\] .*pruning.setting: the dynamic schedule trains one shared"):
        check_search(spec)
    with pytest.raises(RaysparseError, match=r"^grid.pruning.sparsity: also declared in space"):
        SearchSpec.model_validate({"grid": {"pruning.sparsity": [0.5]},
                                   "space": {"pruning.sparsity": {"choice": [0.5]}}})
