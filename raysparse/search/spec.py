"""The search spec: a base run spec, a space over its fields, objectives, budget."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from raysparse.config import RunSpec, Strict, TrackingConfig, parse
from raysparse.errors import RaysparseError
from raysparse.metric_keys import avg_key, key_pattern, worst_key
from raysparse.search.space import Param, check_space


class Objective(Strict):
    metric: str
    mode: Literal["max", "min"] = "max"


class SchedulerConfig(Strict):
    """ASHA stops weak trials early, comparing them on quality after the same number of recovery
    steps (its resource): trials evaluate every ``grace_period`` steps (``recovery.evaluate_every``)."""

    type: Literal["none", "asha"] = "none"
    grace_period: int | None = Field(None, ge=1)   # recovery steps before the first cut; default: a quarter
    reduction_factor: float = Field(2.0, gt=1)


class SearchSpec(Strict):
    name: str = "search"
    seed: int = 0
    base: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Param] = Field(default_factory=dict)
    objectives: list[Objective] | None = Field(None, min_length=1)   # left out: the task's avg metric, max
    num_samples: int = Field(4, ge=1)
    max_concurrent: int = Field(1, ge=1)
    # a finished trial's process runs the next trial (its imports, about 5 s, paid once); false: a fresh
    # process per trial, for model code that leaves global state behind
    reuse_trial_processes: bool = True
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    # random trials before the sampler models the results (TPE's start-up trials, NSGA-II's
    # population size); default num_samples // 3, between 2 and 10
    startup_trials: int | None = Field(None, ge=2)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    trials: list[dict[str, Any]] = Field(default_factory=list)   # fixed trials evaluated first
    storage: str | None = None
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _expand_grid(cls, data: Any) -> Any:
        """``grid:`` (a study's axes) becomes fixed trials and choice parameters (raysparse.search.grid)."""
        from raysparse.search.grid import expand_into

        return expand_into(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _consistent(self) -> "SearchSpec":
        if self.scheduler.type == "asha" and len(self.objectives or ()) > 1:
            raise ValueError(f"scheduler.type: asha takes one objective; got {len(self.objectives)} "
                             "(use type: none for multi-objective search)")
        return self

    def max_recovery_steps(self) -> int:
        """The most recovery steps any trial can take (ASHA's ``max_t``)."""
        steps = self.base_spec().recovery.steps
        param = self.space.get("recovery.steps")
        if param is not None:
            steps = max([steps, *(param.choice or []), *(param.int or ())])
        return int(steps)

    def grace_period(self) -> int:
        """ASHA's first cut, in recovery steps."""
        return self.scheduler.grace_period or max(1, self.max_recovery_steps() // 4)

    def scheduled_base(self) -> RunSpec:
        """The base spec trials run: under ASHA, evaluating every ``grace_period`` recovery steps."""
        base = self.base_spec()
        if self.scheduler.type != "asha" or base.recovery.evaluate_every:
            return base
        data = base.model_dump()
        data["recovery"]["evaluate_every"] = self.grace_period()
        return parse(RunSpec, data)

    def base_spec(self) -> RunSpec:
        try:
            return parse(RunSpec, self.base)
        except RaysparseError as exc:
            raise RaysparseError(f"base.{exc}") from None

    def resolved_objectives(self) -> list[Objective]:
        if self.objectives:
            return self.objectives
        from raysparse.data.tasks import get_task

        task = get_task(self.base_spec().data.task)
        return [Objective(metric=avg_key(task.name, task.primary_metric), mode="max")]


def reported_metric_patterns(base: RunSpec, space: dict[str, Param]) -> list[str]:
    """Regexes of the metric names trials report (quality per task, size, latency)."""
    from raysparse.data.tasks import get_task

    tasks = {base.data.task, *(space["data.task"].choice if "data.task" in space else [])}
    patterns = []
    for name in tasks:
        task = get_task(name)
        patterns.append(key_pattern(task.name, task.metric_names))
    patterns += [r"encoder_sparsity", r"params/(total|encoder|embedding)", r"bytes", r"flops",
                 r"dense/(params/total|bytes|flops)"]
    if base.efficiency.latency:
        sizes = "|".join(str(b) for b in base.efficiency.batch_sizes)
        patterns += [rf"latency/(dense|pruned)/b({sizes})_ms", rf"speedup/b({sizes})"]
    return patterns


def check_search(spec: SearchSpec) -> RunSpec:
    """Everything that can be checked before any trial: base, space, objectives."""
    base = spec.base_spec()
    check_space(spec.space, base.model_dump())
    patterns = reported_metric_patterns(base, spec.space)
    for index, objective in enumerate(spec.resolved_objectives()):
        if not any(re.fullmatch(p, objective.metric) for p in patterns):
            raise RaysparseError(f"objectives[{index}].metric: '{objective.metric}' is not reported by any trial "
                                 f"(expected e.g. {avg_key(base.data.task, '<metric>')}, "
                                 f"{worst_key(base.data.task, '<metric>')}, "
                                 "encoder_sparsity, bytes, latency/pruned/b<batch>_ms)")
    names = [o.metric for o in spec.resolved_objectives()]
    if len(set(names)) != len(names):
        raise RaysparseError(f"objectives: {names} names a metric twice")
    for index, fixed in enumerate(spec.trials):
        unknown = [path for path in fixed if path not in spec.space]
        if unknown:
            raise RaysparseError(f"trials[{index}]: {unknown} are not parameters of the space")
        _check_trial(base, fixed, index)
    return base


def _check_trial(base: RunSpec, fixed: dict[str, Any], index: int) -> None:
    """A fixed trial (a grid point) must make a valid run spec as a whole, not just value by value."""
    from raysparse.search.space import trial_spec

    try:
        trial_spec(base.model_dump(), fixed)
    except RaysparseError as exc:
        raise RaysparseError(f"trials[{index}] {fixed}: {exc}") from None


def preflight_trials(spec: SearchSpec, base: RunSpec) -> None:
    """Data and model checks (``runner.preflight``) for every distinct task, language set and model
    the fixed trials use, so a grid point with missing data fails before any trial starts."""
    from raysparse.runner import preflight
    from raysparse.search.space import trial_spec

    seen = set()
    for index, fixed in enumerate(spec.trials):
        trial = trial_spec(base.model_dump(), fixed)
        key = (trial.data.task, tuple(trial.data.languages or ()), trial.data.regime, trial.data.dir,
               tuple(trial.pruning.scoring_languages or ()), trial.model.source)
        if key in seen:
            continue
        seen.add(key)
        try:
            preflight(trial)
        except RaysparseError as exc:
            raise RaysparseError(f"trials[{index}] {fixed}: {exc}") from None
