"""Overrides of a spec file's fields: named budgets in the file, and ``--set path=value``.

One spec file serves several scales: its ``budgets:`` section names sets of overrides
(``tiny`` for CI, ``xlmr-base`` for a GPU cluster, ...), applied to the raw YAML before
validation, so the validated spec is exactly what ran and keys the same way as a file
that spelled the values out. ``--set`` overrides come after the budget.

A dotted path walks nested mappings; at each level the longest run of path parts that
is an existing key wins, so keys that themselves contain dots (``base: {...}`` is nested,
but ``grid: {pruning.sparsity: [...]}`` and ``trials`` entries are flat) are addressed
as ``grid.pruning.sparsity``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from raysparse.errors import RaysparseError

BUDGETS_KEY = "budgets"


def parse_assignment(text: str) -> tuple[str, Any]:
    """``path=value`` -> (path, value); the value is read as YAML (``2``, ``[0.5]``, ``true``, ``{a: 1}``)."""
    path, sep, raw = text.partition("=")
    path = path.strip()
    if not sep or not path or any(not part for part in path.split(".")):
        raise RaysparseError(f"set: expected path=value (e.g. base.recovery.steps=2), got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise RaysparseError(f"set: {path}: value {raw!r} is not valid YAML") from None
    return path, value


def set_override(data: dict, path: str, value: Any) -> None:
    """Set ``value`` at dotted ``path`` in ``data`` (in place); missing sections are created."""
    parts = path.split(".")
    current = data
    while True:
        # the longest prefix of the remaining parts that is an existing key of this mapping
        for cut in range(len(parts), 0, -1):
            key = ".".join(parts[:cut])
            if key in current:
                break
        else:
            cut, key = 1, parts[0]
        rest = parts[cut:]
        if not rest:
            current[key] = value
            return
        nxt = current.get(key)
        if nxt is None:
            nxt = current[key] = {}
        if not isinstance(nxt, dict):
            raise RaysparseError(f"set: {path}: '{key}' is not a section (it holds {nxt!r})")
        current, parts = nxt, rest


def apply_overrides(data: dict, overrides: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> dict:
    """A copy of ``data`` with every (path, value) set in order."""
    out = copy.deepcopy(data)
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    for path, value in items:
        set_override(out, path, value)
    return out


def pop_budgets(data: dict, where: str) -> dict[str, dict[str, Any]]:
    """Remove and check the ``budgets:`` section of a spec file: {name: {path: value}}."""
    budgets = data.pop(BUDGETS_KEY, None) or {}
    if not isinstance(budgets, dict):
        raise RaysparseError(f"budgets: expected a mapping of names to overrides, got {type(budgets).__name__} "
                             f"(in {where})")
    for name, overrides in budgets.items():
        if not isinstance(overrides, dict):
            raise RaysparseError(f"budgets.{name}: expected a mapping of dotted paths to values, got "
                                 f"{type(overrides).__name__} (in {where})")
    return budgets


def resolve_overrides(data: dict, where: str, budget: str | None = None,
                      assignments: Iterable[str | tuple[str, Any]] = ()) -> dict:
    """The spec file's raw mapping with its budget (if named) and then ``assignments`` applied.

    A named budget also renames the spec ``<name>-<budget>`` (unless the budget sets
    ``name``), so runs at different budgets never mix in MLflow or in storage.
    """
    budgets = pop_budgets(data, where)
    if budget is not None:
        if budget not in budgets:
            known = ", ".join(budgets) or "none defined"
            raise RaysparseError(f"budget: '{budget}' is not defined in {where} (budgets: {known})")
        chosen = budgets[budget]
        data = apply_overrides(data, chosen)
        if "name" not in chosen:
            data["name"] = f"{data.get('name') or 'run'}-{budget}"
    pairs = [parse_assignment(a) if isinstance(a, str) else a for a in assignments]
    return apply_overrides(data, pairs)


def budget_names(data: Mapping[str, Any]) -> list[str]:
    return list((data.get(BUDGETS_KEY) or {}).keys())


__all__ = ["apply_overrides", "budget_names", "parse_assignment", "pop_budgets", "resolve_overrides", "set_override"]
