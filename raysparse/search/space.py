"""Search spaces over any spec field, conditional parameters included.

A space maps dotted RunSpec paths to a distribution:
``{choice: [...]}``, ``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``, ``{int: [lo, hi]}``,
each with an optional ``when: {other.path: value-or-list}``. Optuna's define-by-run API
samples a conditional parameter only when its condition holds, so a choice set never
changes between trials (Optuna requires that) and, e.g., an L0 temperature is only
sampled for L0 trials.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, model_validator

from raysparse.config import RunSpec, Strict, variants_of
from raysparse.errors import RaysparseError


class Param(Strict):
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    int: tuple[builtins.int, builtins.int] | None = None   # noqa: A003 (the YAML key users write)
    when: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_distribution(self) -> "Param":
        given = [name for name in ("choice", "uniform", "loguniform", "int") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"expected exactly one of choice, uniform, loguniform, int; got {given or 'none'}")
        if self.choice is not None and not self.choice:
            raise ValueError("choice: expected a non-empty list")
        for name in ("uniform", "loguniform", "int"):
            bounds = getattr(self, name)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{name}: expected [low, high] with low < high, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: expected positive bounds")
        return self

    def values_for_check(self) -> list[Any]:
        """Representative values, to check each one makes a valid spec."""
        if self.choice is not None:
            return list(self.choice)
        bounds = self.uniform or self.loguniform or self.int
        return list(bounds)


def _has_path(model: type[BaseModel], path: str) -> bool:
    """Whether ``path`` names a spec field (in any variant of a union such as ``pruning``)."""
    current: list[Any] = [model]
    for part in path.split("."):
        if all(getattr(c, "model_fields", None) is None for c in current):
            return any(c is dict or getattr(c, "__origin__", None) is dict or "dict" in str(c) for c in current)
        found = [c.model_fields[part].annotation for c in current if part in getattr(c, "model_fields", {})]
        if not found:
            return False
        current = [variant for annotation in found for variant in (variants_of(annotation) or {"": annotation}).values()]
    return True


def set_path(data: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        data = data.setdefault(part, {})
        if not isinstance(data, dict):
            raise RaysparseError(f"space.{path}: {part} is not a section")
    data[parts[-1]] = value


def get_path(data: Mapping, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(data, Mapping) or part not in data:
            return None
        data = data[part]
    return data


def condition_holds(when: Mapping[str, Any] | None, values: Mapping[str, Any]) -> bool:
    if not when:
        return True
    for path, expected in when.items():
        allowed = expected if isinstance(expected, list) else [expected]
        if path not in values or values[path] not in allowed:
            return False
    return True


_GOVERNED_BY = {"pruning.learning_steps": "pruning.algorithm", "data.train_task": "data.task"}


def check_space(space: Mapping[str, Param], base: dict) -> None:
    """Every path exists, conditions refer to earlier choices, every value makes a valid spec."""
    from raysparse.config import parse

    if not space:
        raise RaysparseError("space: the search space is empty (expected at least one parameter)")
    seen: dict[str, Param] = {}
    for path, param in space.items():
        if not _has_path(RunSpec, path):
            raise RaysparseError(f"space.{path}: not a spec field (expected a dotted path such as pruning.sparsity)")
        for other, expected in (param.when or {}).items():
            if other not in seen:
                raise RaysparseError(f"space.{path}.when: '{other}' must be a parameter declared before '{path}'")
            if seen[other].choice is None:
                raise RaysparseError(f"space.{path}.when: '{other}' must be a choice parameter")
            allowed = expected if isinstance(expected, list) else [expected]
            missing = [v for v in allowed if v not in seen[other].choice]
            if missing:
                raise RaysparseError(f"space.{path}.when: {missing} never occur in {other}'s choices {seen[other].choice}")
        # a value valid only beside another choice (an algorithm's option with the algorithm that takes it,
        # a training task with its task): try each value the space may choose for that one
        governing = _GOVERNED_BY.get(path, "pruning.algorithm" if path.startswith("pruning.options.") else None)
        partners = [None]
        if governing in space:
            partners += list(space[governing].choice or [])
        for value in param.values_for_check():
            errors = []
            for partner in partners:
                trial = _deep_copy({**base})
                set_path(trial, path, value)
                if partner is not None:
                    set_path(trial, governing, partner)
                try:
                    parse(RunSpec, trial)
                    break
                except RaysparseError as exc:
                    errors.append(exc)
            else:
                raise RaysparseError(f"space.{path}: value {value!r} makes an invalid spec ({errors[0]})") from None
        seen[path] = param


def _deep_copy(data):
    import copy

    return copy.deepcopy(data)


class define_by_run:  # noqa: N801  (used like a function; a class so Tune can pickle it)
    """An Optuna define-by-run callable sampling ``space`` (conditions respected)."""

    def __init__(self, space: Mapping[str, Param]):
        self.space = dict(space)

    def __call__(self, trial) -> None:
        values: dict[str, Any] = {}
        for path, param in self.space.items():
            if not condition_holds(param.when, values):
                continue
            if param.choice is not None:
                values[path] = trial.suggest_categorical(path, param.choice)
            elif param.uniform is not None:
                values[path] = trial.suggest_float(path, *param.uniform)
            elif param.loguniform is not None:
                values[path] = trial.suggest_float(path, *param.loguniform, log=True)
            else:
                values[path] = trial.suggest_int(path, *param.int)
        return None


def trial_spec(base: dict, params: Mapping[str, Any]) -> RunSpec:
    """The run spec of one trial: the base with sampled values set at their paths."""
    from raysparse.config import parse

    data = _deep_copy(base)
    for path, value in params.items():
        set_path(data, path, value)
    return parse(RunSpec, data)
