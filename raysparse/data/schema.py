"""What the rows of each task kind are, whatever the source file or the hub.

pair_classification: sentence1, sentence2, label (ClassLabel)
tagging:             tokens (list[str]), tags (list[ClassLabel])
qa:                  id, context, question, answers {text: list[str], answer_start: list[int]}
retrieval:           source, target (aligned rows; target is English)

Besides its columns, a kind's rows decide which rows stay together when a file is split into a
training and a held-out part, and whether they can be trained on at all. These decisions live here,
below the loaders and the regimes that need them, rather than in :mod:`raysparse.data.kinds`, which
builds on the loaders (its features, metrics and training rows) and so must never be imported by them.
``datasets`` is imported on first use, so :mod:`raysparse.data.kinds` can import this module cheaply.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

from raysparse.data.tasks import TASK_KINDS, Task
from raysparse.errors import RaysparseError

if TYPE_CHECKING:
    from datasets import Dataset, Features

    from raysparse.data.layout import DataFile


class RowSchema:
    """The rows of one task kind. Subclasses override what differs."""

    name: ClassVar[str]
    trainable: ClassVar[bool] = True    # labelled rows to fine-tune on (retrieval: scored from embeddings)

    def features(self, task: Task) -> Features:
        """The ``datasets.Features`` of the kind's rows (labels carry the task's names)."""
        raise NotImplementedError

    def columns(self, rows: Sequence) -> dict[str, list]:
        """Typed reader rows -> the kind's columns."""
        raise NotImplementedError

    def group_keys(self, found: DataFile, rows: Dataset,
                   pivot: Callable[[], tuple[DataFile, Dataset]]) -> tuple[list[str], str]:
        """One key per row (equal keys stay on one side of a seeded split) and what they group by.

        ``pivot()`` gives the file that keys every parallel file of the split, and its rows.
        """
        raise RaysparseError(f"data: {found.path} of a {self.name} task is never split into parts "
                             "(expected whole files)")

    def check_labelled(self, found: DataFile, rows: Dataset) -> None:
        """Raise one line if the rows cannot be trained or scored on (no gold labels)."""


class PairRows(RowSchema):
    name = "pair_classification"

    def features(self, task):
        from datasets import ClassLabel, Features, Value

        return Features({
            "sentence1": Value("string"),
            "sentence2": Value("string"),
            "label": ClassLabel(names=list(task.label_names)),
        })

    def columns(self, rows):
        return {
            "sentence1": [r.sentence1 for r in rows],
            "sentence2": [r.sentence2 for r in rows],
            "label": [r.label for r in rows],
        }

    def group_keys(self, found, rows, pivot):
        pivot_file, pivot_rows = pivot()
        if len(pivot_rows) != len(rows):
            raise RaysparseError(
                f"{found.path}: has {len(rows)} rows but {pivot_file.label()} has {len(pivot_rows)} "
                f"(expected parallel files with one row per translated example)"
            )
        return [f"text:{s}" for s in pivot_rows["sentence1"]], f"{pivot_file.language} sentence1 of the same row"


class TaggingRows(RowSchema):
    name = "tagging"

    def features(self, task):
        from datasets import ClassLabel, Features, List, Value

        return Features({
            "tokens": List(Value("string")),
            "tags": List(ClassLabel(names=list(task.label_names))),
        })

    def columns(self, rows):
        return {"tokens": [list(r.tokens) for r in rows], "tags": [list(r.tags) for r in rows]}

    def group_keys(self, found, rows, pivot):
        return [f"row:{i}" for i in range(len(rows))], "sentence"


class QuestionRows(RowSchema):
    name = "qa"

    def features(self, task):
        from datasets import Features, List, Value

        return Features({
            "id": Value("string"),
            "context": Value("string"),
            "question": Value("string"),
            "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))},
        })

    def columns(self, rows):
        return {
            "id": [r.id for r in rows],
            "context": [r.context for r in rows],
            "question": [r.question for r in rows],
            "answers": [{"text": list(r.answer_texts), "answer_start": list(r.answer_starts)} for r in rows],
        }

    def group_keys(self, found, rows, pivot):
        # Questions on one paragraph stay together; parallel sets find it through the pivot's id.
        pivot_file, pivot_rows = pivot()
        pivot_context = dict(zip(pivot_rows["id"], pivot_rows["context"]))
        keys = [
            f"context:{pivot_context.get(qid, context)}" for qid, context in zip(rows["id"], rows["context"])
        ]
        return keys, f"{pivot_file.language} context of the same question id"

    def check_labelled(self, found, rows):
        unlabelled = sum(1 for answers in rows["answers"] if not answers["text"])
        if unlabelled:
            raise RaysparseError(
                f"{found.path}: {unlabelled} of its {len(rows)} questions have no gold answer (empty answer "
                "texts, as in XTREME's unlabelled releases); expected labelled data to train or evaluate on"
            )


class RetrievalRows(RowSchema):
    name = "retrieval"
    trainable = False

    def features(self, task):
        from datasets import Features, Value

        return Features({"source": Value("string"), "target": Value("string")})

    def columns(self, rows):
        return {"source": [r.source for r in rows], "target": [r.target for r in rows]}


SCHEMAS: dict[str, RowSchema] = {schema.name: schema for schema in (PairRows(), TaggingRows(), QuestionRows(),
                                                                    RetrievalRows())}
assert tuple(SCHEMAS) == TASK_KINDS, "one row schema per task kind, in the registry's order"


def schema_of(task: Task) -> RowSchema:
    return SCHEMAS[task.kind]


def features_for(task: Task) -> Features:
    """The ``datasets.Features`` of ``task``'s rows (labels carry their names)."""
    return schema_of(task).features(task)


def rows_to_dataset(task: Task, rows: Sequence) -> Dataset:
    """A Dataset with ``task``'s columns from typed reader rows."""
    from datasets import Dataset

    return Dataset.from_dict(schema_of(task).columns(rows), features=features_for(task))
