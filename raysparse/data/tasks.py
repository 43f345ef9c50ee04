"""The XTREME tasks raysparse knows: what kind each is, its labels and its metrics.

A task's kind decides everything downstream (reader, columns, features, metrics), so the
registry is the one place that names the nine tasks and says how they differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from raysparse.errors import RaysparseError

TaskKind = Literal["pair_classification", "tagging", "qa", "retrieval"]
TASK_KINDS: tuple[TaskKind, ...] = ("pair_classification", "tagging", "qa", "retrieval")

# The 17 UD v2 universal POS tags, in the order of the Hugging Face `google/xtreme`
# udpos ClassLabel, so tag ids agree between local files and the hub.
UPOS_TAGS = (
    "ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM",
    "PART", "PRON", "PROPN", "PUNCT", "SCONJ", "SYM", "VERB", "X",
)
PANX_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")
XNLI_LABELS = ("entailment", "neutral", "contradiction")
PAWSX_LABELS = ("0", "1")

# The language every other one is translated from in XTREME's parallel sets.
PIVOT_LANGUAGE = "en"


@dataclass(frozen=True)
class Task:
    """One XTREME task.

    ``parallel`` means row i of every language's dev/test file is the same example
    translated (XNLI, PAWS-X by row; XQuAD, MLQA by question id), so a dev split must keep
    each example on the same side in every language. ``metric_names[0]`` is the one
    number a search optimises.
    """

    name: str
    kind: TaskKind
    metric_names: tuple[str, ...]
    label_names: tuple[str, ...]
    directory: str
    parallel: bool = False

    @property
    def primary_metric(self) -> str:
        return self.metric_names[0]


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("xnli", "pair_classification", ("accuracy",), XNLI_LABELS, "xnli", parallel=True),
        Task("pawsx", "pair_classification", ("accuracy",), PAWSX_LABELS, "pawsx", parallel=True),
        # POS: token accuracy and macro F1 over tags (see metrics.tagging_scores for why).
        Task("udpos", "tagging", ("accuracy", "macro_f1"), UPOS_TAGS, "udpos"),
        Task("panx", "tagging", ("f1", "precision", "recall"), PANX_TAGS, "panx"),
        Task("xquad", "qa", ("f1", "exact_match"), (), "xquad", parallel=True),
        Task("mlqa", "qa", ("f1", "exact_match"), (), "mlqa", parallel=True),
        Task("tydiqa", "qa", ("f1", "exact_match"), (), "tydiqa"),
        Task("tatoeba", "retrieval", ("accuracy",), (), "tatoeba"),
        # BUCC is scored by mining pairs from two corpora (metrics.bucc_scores), not top-1.
        Task("bucc", "retrieval", ("f1", "precision", "recall"), (), "bucc2018"),
    )
}


def task_names() -> list[str]:
    return list(TASKS)


def get_task(name: str | Task) -> Task:
    """The registered task called ``name`` (a :class:`Task` passes through)."""
    if isinstance(name, Task):
        return name
    task = TASKS.get(str(name).strip().lower())
    if task is None:
        raise RaysparseError(f"data.task: unknown task '{name}' (expected one of: {', '.join(TASKS)})")
    return task
