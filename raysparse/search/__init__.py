"""Search: Ray Tune + Optuna over run specs, Pareto fronts, reports."""

from raysparse.search.driver import SearchResult, search
from raysparse.search.pareto import dominates, pareto_front
from raysparse.search.space import Param, define_by_run, trial_spec
from raysparse.search.spec import Objective, SearchSpec, check_search

__all__ = ["Objective", "Param", "SearchResult", "SearchSpec", "check_search", "define_by_run", "dominates",
           "pareto_front", "search", "trial_spec"]
