"""The columns every loader returns for a task kind, whatever the source file or the hub.

pair_classification: sentence1, sentence2, label (ClassLabel)
tagging:             tokens (list[str]), tags (list[ClassLabel])
qa:                  id, context, question, answers {text: list[str], answer_start: list[int]}
retrieval:           source, target (aligned rows; target is English)

Each kind's strategy (:mod:`raysparse.data.kinds`) holds its columns.
"""

from __future__ import annotations

from collections.abc import Sequence

from datasets import Dataset, Features

from raysparse.data.tasks import Task


def features_for(task: Task) -> Features:
    """The ``datasets.Features`` of ``task``'s rows (labels carry their names)."""
    return task.strategy.features(task)


def rows_to_dataset(task: Task, rows: Sequence) -> Dataset:
    """A Dataset with ``task``'s columns from typed reader rows."""
    return Dataset.from_dict(task.strategy.columns(rows), features=features_for(task))

