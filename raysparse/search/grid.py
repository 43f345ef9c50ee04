"""Grid studies: a search whose trials are every combination of a few axes.

A study (settings x sparsity, algorithms x seeds, ...) is a search with fixed trials.
``grid:`` in a search spec spells them as axes instead of a list:

```yaml
grid:
  pruning.setting: [shared, per-language]        # a plain axis: a spec path and its values
  pruning.sparsity: [0.3, 0.5, 0.7]
  task:                                           # a linked axis: a label and a list of
    - {data.task: xnli, finetune.steps: 24}       #   {path: value} mappings set together
    - {data.task: tatoeba, finetune.steps: 0}
```

The grid expands (first axis outermost) into ``trials`` (after any listed ones) and a
``choice`` parameter per path, so Tune, Optuna, resume and MLflow treat a study like any
search; ``num_samples`` defaults to the number of trials. A path a trial does not set
takes the base spec's value, so no parameter is ever sampled in a grid study.
"""

from __future__ import annotations

import itertools
from typing import Any

from raysparse.errors import RaysparseError


def _axis(label: str, values: Any) -> list[dict[str, Any]]:
    """One axis as a list of {path: value} assignments."""
    if not isinstance(values, list) or not values:
        raise RaysparseError(f"grid.{label}: expected a non-empty list of values")
    if all(isinstance(v, dict) for v in values):
        for index, item in enumerate(values):
            if not item:
                raise RaysparseError(f"grid.{label}[{index}]: expected at least one path: value")
        for item in values:
            for path, value in item.items():
                if isinstance(value, (list, dict)):
                    raise RaysparseError(f"grid.{label}: {path} = {value!r}: expected a number, string, boolean or "
                                         "null (Optuna choices); put lists in base (languages: one string, \"de,zh\")")
        return [dict(v) for v in values]
    if any(isinstance(v, dict) for v in values):
        raise RaysparseError(f"grid.{label}: expected either values of {label} or {{path: value}} mappings, not both")
    items = [{label: v} for v in values]
    for item in items:
        for path, value in item.items():
            if isinstance(value, (list, dict)):
                raise RaysparseError(f"grid.{label}: {path} = {value!r}: expected a number, string, boolean or null "
                                     "(Optuna choices); put lists in base (languages: one string, \"de,zh\")")
    return items


def _base_value(base: dict, path: str) -> Any:
    from raysparse.config import RunSpec, parse

    data: Any = parse(RunSpec, base).model_dump()
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def expand_grid(grid: dict[str, Any], base: dict) -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
    """(trials, choices): every combination of the axes, and the values each path takes."""
    if not isinstance(grid, dict) or not grid:
        raise RaysparseError("grid: expected a mapping of axes (spec path: [values], or label: [{path: value}])")
    axes = [_axis(str(label), values) for label, values in grid.items()]
    paths = list(dict.fromkeys(path for axis in axes for item in axis for path in item))
    trials = []
    for combination in itertools.product(*axes):
        trial: dict[str, Any] = {}
        for item in combination:
            for path, value in item.items():
                if path in trial and trial[path] != value:
                    raise RaysparseError(f"grid: two axes set {path} to {trial[path]!r} and {value!r} in one trial")
                trial[path] = value
        trials.append(trial)
    for path in paths:
        missing = [t for t in trials if path not in t]
        if missing:
            default = _base_value(base, path)
            for trial in missing:
                trial[path] = default
    choices: dict[str, list[Any]] = {}
    for path in paths:
        choices[path] = list(dict.fromkeys(trial[path] for trial in trials))
    return [{path: trial[path] for path in paths} for trial in trials], choices


def expand_into(data: dict) -> dict:
    """A raw search spec with ``grid`` replaced by the trials and choice parameters it stands for."""
    if "grid" not in data:
        return data
    data = dict(data)
    grid = data.pop("grid")
    if grid is None:
        return data
    base = data.get("base") or {}
    try:
        trials, choices = expand_grid(grid, base)
    except RaysparseError as exc:
        if str(exc).startswith(("grid", "base")):
            raise
        raise RaysparseError(f"base.{exc}") from None
    space = dict(data.get("space") or {})
    clash = [path for path in choices if path in space]
    if clash:
        raise RaysparseError(f"grid.{clash[0]}: also declared in space (a path is either searched or a grid axis)")
    for path, values in choices.items():
        space[path] = {"choice": values}
    data["space"] = space
    data["trials"] = [*(data.get("trials") or []), *trials]
    data.setdefault("num_samples", len(data["trials"]))
    return data


__all__ = ["expand_grid", "expand_into"]
