"""Optuna samplers for a search, and a record of which trials each one actually suggested.

A sampler draws its first ``startup_trials`` trials at random (TPE's start-up trials,
NSGA-II's first generation) and only then models the results. A search that ends before
that point has only sampled at random, whatever its spec says, so every trial is marked
with where its values came from: ``fixed`` (the spec's ``trials:``), ``random`` (start-up
or the random sampler) or the sampler's name (TPE's model, NSGA-II's offspring). The search
table, the parent run in MLflow and the tests read that mark.
"""

from __future__ import annotations

from typing import Any

import optuna

SUGGESTED_BY = "raysparse:suggested_by"


def startup_trials(spec) -> int:
    """Random trials before the sampler models (TPE's start-up trials, NSGA-II's population size)."""
    return spec.startup_trials or max(2, min(10, spec.num_samples // 3))


def make_sampler(spec, multi: bool):
    """The spec's Optuna sampler, seeded, wrapped so that each trial records who suggested it."""
    if spec.sampler == "random":
        inner = optuna.samplers.RandomSampler(seed=spec.seed)
    elif spec.sampler == "nsga2":
        inner = optuna.samplers.NSGAIISampler(seed=spec.seed, population_size=startup_trials(spec))
    else:
        inner = optuna.samplers.TPESampler(seed=spec.seed, multivariate=True, group=True,
                                           n_startup_trials=startup_trials(spec))
    return Recorded(inner, spec.sampler)


class Recorded(optuna.samplers.BaseSampler):
    """``inner`` (an Optuna sampler) that marks a trial ``name`` when the sampler's model produced it
    (TPE's relative sampling; NSGA-II's generations after the first); the others are ``random``.
    A module-level class, so that Tune can pickle the searcher into its experiment checkpoints."""

    def __init__(self, inner, name: str):
        self.inner, self.name = inner, name

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        params = self.inner.sample_relative(study, trial, search_space)
        if hasattr(self.inner, "get_trial_generation"):   # NSGA-II: offspring, even where all mutated
            mark = self.name if self.inner.get_trial_generation(study, trial) > 0 else "random"
        else:
            mark = self.name if params else "random"
        study._storage.set_trial_system_attr(trial._trial_id, SUGGESTED_BY, mark)
        return params

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def suggested_by(searcher, trial_id: str) -> str:
    """The mark of a Tune trial (``fixed``, ``random`` or the sampler's name), from the OptunaSearch
    that suggested it; ``?`` for a trial it does not know (a search restored from storage)."""
    trial = getattr(searcher, "_ot_trials", {}).get(trial_id)
    if trial is None:
        return "?"
    return trial_mark(searcher._ot_study, trial)


def trial_mark(study, trial) -> str:
    """The mark of an Optuna trial of ``study``: ``fixed`` (enqueued), ``random`` or the sampler's name."""
    attrs = study._storage.get_trial(trial._trial_id).system_attrs
    # a trial whose every value is fixed never asks the sampler, so it carries no mark
    return "fixed" if "fixed_params" in attrs else attrs.get(SUGGESTED_BY, "random")


__all__ = ["SUGGESTED_BY", "make_sampler", "startup_trials", "suggested_by", "trial_mark"]
