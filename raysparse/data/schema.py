"""The columns every loader returns for a task kind, whatever the source file or the hub.

pair_classification: sentence1, sentence2, label (ClassLabel)
tagging:             tokens (list[str]), tags (list[ClassLabel])
qa:                  id, context, question, answers {text: list[str], answer_start: list[int]}
retrieval:           source, target (aligned rows; target is English)
"""

from __future__ import annotations

from collections.abc import Sequence

from datasets import ClassLabel, Dataset, Features, List, Value

from raysparse.data.tasks import Task


def features_for(task: Task) -> Features:
    """The ``datasets.Features`` of ``task``'s rows (labels carry their names)."""
    if task.kind == "pair_classification":
        return Features({
            "sentence1": Value("string"),
            "sentence2": Value("string"),
            "label": ClassLabel(names=list(task.label_names)),
        })
    if task.kind == "tagging":
        return Features({
            "tokens": List(Value("string")),
            "tags": List(ClassLabel(names=list(task.label_names))),
        })
    if task.kind == "qa":
        return Features({
            "id": Value("string"),
            "context": Value("string"),
            "question": Value("string"),
            "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))},
        })
    return Features({"source": Value("string"), "target": Value("string")})


def rows_to_dataset(task: Task, rows: Sequence) -> Dataset:
    """A Dataset with ``task``'s columns from typed reader rows."""
    if task.kind == "pair_classification":
        columns = {
            "sentence1": [r.sentence1 for r in rows],
            "sentence2": [r.sentence2 for r in rows],
            "label": [r.label for r in rows],
        }
    elif task.kind == "tagging":
        columns = {"tokens": [list(r.tokens) for r in rows], "tags": [list(r.tags) for r in rows]}
    elif task.kind == "qa":
        columns = {
            "id": [r.id for r in rows],
            "context": [r.context for r in rows],
            "question": [r.question for r in rows],
            "answers": [{"text": list(r.answer_texts), "answer_start": list(r.answer_starts)} for r in rows],
        }
    else:
        columns = {"source": [r.source for r in rows], "target": [r.target for r in rows]}
    return Dataset.from_dict(columns, features=features_for(task))

