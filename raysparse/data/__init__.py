"""XTREME data: tasks, local and hub loaders, per-language splits, features and metrics.

Independent of pruning and of Ray: everything here takes plain arguments and returns
``datasets.Dataset`` objects, typed records or plain dicts of floats.

Names are imported on first use, so ``import raysparse.data.tasks`` (config validation)
does not pay for importing ``datasets``, ``transformers`` and scikit-learn.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, tuple[str, ...]] = {
    "tasks": ("TASKS", "Task", "get_task", "task_names"),
    "kinds": ("KINDS", "Kind", "kind_of"),
    "layout": ("DataFile", "find_data_files"),
    "load": ("BuccCorpus", "available_splits", "available_tasks", "data_file", "languages", "load_bucc_corpus", "load_split"),
    "hub": ("load_from_hub",),
    "splits": ("RowSplit", "split_rows"),
    "regimes": ("REGIMES", "LanguageData", "TrainingData", "evaluation_data", "training_data"),
    "features": (
        "IGNORE_INDEX", "AnswerCandidate", "pair_features", "qa_candidates", "qa_eval_features", "qa_predictions",
        "qa_train_features", "retrieval_features", "tagging_features", "tagging_predictions",
    ),
    "metrics": (
        "accuracy", "aggregate", "answer_f1", "bucc_scores", "entity_scores", "exact_match", "normalize_answer",
        "retrieval_accuracy", "squad_scores", "tagging_scores", "token_scores", "correct_examples", "entity_examples",
        "token_examples", "tagging_examples", "answer_f1_examples", "retrieval_examples",
    ),
    "bootstrap": ("example_form", "intervals", "paired_difference", "point_estimates", "metric_from_sums"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'raysparse.data' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"raysparse.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

