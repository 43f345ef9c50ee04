"""Algorithms that score units, selection that turns scores into masks, and schedules."""

from raysparse.pruning import algorithms as _algorithms  # noqa: F401  (registers the built-in methods)
from raysparse.pruning import l0 as _l0, layers as _layers, movement as _movement  # noqa: F401  (learned and depth methods)
from raysparse.pruning.registry import ALGORITHMS, Importance, Options, algorithm_for, get_algorithm, register
from raysparse.pruning.schedules import PruneStep, cubic_sparsity, iterative_targets, prune_schedule
from raysparse.pruning.scores import UnitScores
from raysparse.pruning.selection import Selection, check_sparsity, select_mask, select_to_latency

__all__ = [
    "ALGORITHMS", "Importance", "Options", "PruneStep", "algorithm_for", "Selection", "UnitScores", "check_sparsity", "cubic_sparsity",
    "get_algorithm", "iterative_targets", "prune_schedule", "register", "select_mask", "select_to_latency",
]
