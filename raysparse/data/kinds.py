"""What each task kind decides, in one strategy object per kind.

A task's kind (:attr:`raysparse.data.tasks.Task.kind`) decides its columns, how a file's
rows are grouped when it is split into a training and a held-out part, its features, the
size of its head, how its outputs are scored, what it trains on and which languages can
train it. :func:`kind_of` gives a task's strategy (``Task.strategy`` is the same object):

    pair_classification  XNLI, PAWS-X
    tagging              UD-POS, PAN-X
    qa                   XQuAD, MLQA, TyDiQA
    retrieval            Tatoeba, BUCC (scored from sentence embeddings, no head)

This module sits in the data layer, so it knows no torch model: the heads of each kind
live in :mod:`raysparse.models.heads`, batches and losses in :mod:`raysparse.training.kinds`.
``datasets`` and the feature code are imported on first use, so importing this module
(``Task.strategy``, config validation) stays cheap.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from raysparse.data.tasks import TASK_KINDS, Task, get_task
from raysparse.errors import RaysparseError

if TYPE_CHECKING:
    import numpy as np
    from datasets import Dataset, Features

    from raysparse.data.layout import DataFile

# Columns of a training row a model (or the collator) reads.
TRAINING_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels", "start_positions", "end_positions")
# Regime -> the languages fine-tuning reads, given the evaluation languages.
FINETUNE_LANGUAGES: dict[str, Callable[[Sequence[str]], list[str]]] = {
    "zero-shot": lambda evaluation: ["en"],
    "translate-train": lambda evaluation: sorted({"en", *evaluation}),
    "in-language": lambda evaluation: list(evaluation),
}


@dataclass(frozen=True)
class TrainingLanguages:
    """Which languages can train (or score) a task, and which a run uses by default."""

    trainable: set[str]        # languages with rows to fine-tune or score on
    candidates: list[str]      # evaluation languages that can be scored on (the default scoring languages)
    finetune: list[str]        # the languages fine-tuning reads


class Kind:
    """The decisions of one task kind. Subclasses override what differs."""

    name: ClassVar[str]
    trainable: ClassVar[bool] = True        # labelled rows to fine-tune on (retrieval: scored from embeddings)
    embeds: ClassVar[bool] = False          # scored from sentence embeddings: any encoder will do, no head
    objective: ClassVar[str] = "head"       # what training minimises: the head's loss, or "contrastive"
    max_length: ClassVar[int] = 128         # default tokens per sequence
    windows: ClassVar[bool] = False         # long inputs become overlapping windows (a doc stride)
    labelled_by_names: ClassVar[bool] = False   # the head has one output per label name
    training_source: ClassVar[str] = "training rows"

    def __repr__(self) -> str:
        return f"<kind {self.name}>"

    # --- rows ------------------------------------------------------------------------------
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

    # --- the model's side ----------------------------------------------------------------
    def num_labels(self, task: str | Task) -> int:
        """Output classes of the task's head: labels (classification), tags (tagging), else 0."""
        return len(get_task(task).label_names) if self.labelled_by_names else 0

    def train_features(self, rows: Dataset, tokenizer, max_length: int, stride: int = 128) -> Dataset:
        raise NotImplementedError

    def eval_features(self, rows: Dataset, tokenizer, max_length: int, stride: int = 128, prefix: str = "") -> Dataset:
        return self.train_features(rows, tokenizer, max_length)

    def score(self, task: Task, rows: Dataset, features: Dataset | None,
              outputs: Mapping[str, Any]) -> dict[str, float]:
        """The task's metrics of one language from the model's outputs (per feature row)."""
        raise NotImplementedError

    # --- training ------------------------------------------------------------------------
    def training_languages(self, task: Task, present: Sequence[str], evaluation: Sequence[str], regime: str,
                           data_dir=None) -> TrainingLanguages:
        """Languages that can train ``task`` and those a run fine-tunes and scores on by default."""
        return TrainingLanguages(set(present), list(evaluation), FINETUNE_LANGUAGES[regime](evaluation))

    def training_rows(self, task: Task, language: str, tokenizer, *, seed: int, train_fraction: float,
                      max_examples: int | None, max_length: int, stride: int, data_dir=None) -> tuple[list, str]:
        """One language's training rows (features ready to batch) and where they came from."""
        from raysparse.data.features import train_features
        from raysparse.data.regimes import training_data

        data = training_data(task, "in-language", [language], seed, train_fraction, data_dir).per_language[language]
        table = data.rows
        if max_examples and len(table) > max_examples:
            table = table.shuffle(seed=seed).select(range(max_examples))
        features = train_features(task, table, tokenizer, max_length, stride)
        keep = [c for c in TRAINING_COLUMNS if c in features.column_names]
        return features.select_columns(keep).to_list(), data.source


class PairClassification(Kind):
    name = "pair_classification"
    labelled_by_names = True

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

    def train_features(self, rows, tokenizer, max_length, stride=128):
        from raysparse.data.features import pair_features

        return pair_features(rows, tokenizer, max_length)

    def score(self, task, rows, features, outputs):
        from raysparse.data.metrics import accuracy

        return {"accuracy": accuracy(list(rows["label"]), [int(o.argmax()) for o in outputs["logits"]])}


class Tagging(Kind):
    name = "tagging"
    labelled_by_names = True

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

    def train_features(self, rows, tokenizer, max_length, stride=128):
        from raysparse.data.features import tagging_features

        return tagging_features(rows, tokenizer, max_length)

    def score(self, task, rows, features, outputs):
        from raysparse.data.features import tagging_predictions
        from raysparse.data.metrics import tagging_scores

        predicted = [o.argmax(-1) for o in outputs["logits"]]
        gold, guessed = tagging_predictions(features["labels"], predicted, task.label_names)
        return tagging_scores(task.name, gold, guessed)


class QuestionAnswering(Kind):
    name = "qa"
    max_length = 384
    windows = True

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

    def train_features(self, rows, tokenizer, max_length, stride=128):
        from raysparse.data.features import qa_train_features

        return qa_train_features(rows, tokenizer, max_length, stride)

    def eval_features(self, rows, tokenizer, max_length, stride=128, prefix=""):
        from raysparse.data.features import qa_eval_features

        return qa_eval_features(rows, tokenizer, max_length, stride)

    def score(self, task, rows, features, outputs):
        from raysparse.data.features import qa_predictions
        from raysparse.data.metrics import squad_scores

        start_logits = stack_ragged(outputs["start_logits"])
        end_logits = stack_ragged(outputs["end_logits"])
        predictions = qa_predictions(rows, features, start_logits, end_logits)
        references = {qid: list(answers["text"]) for qid, answers in zip(rows["id"], rows["answers"])}
        scores = squad_scores(predictions, references)
        return {name: scores[name] for name in task.metric_names}


class Retrieval(Kind):
    name = "retrieval"
    trainable = False
    embeds = True
    objective = "contrastive"
    training_source = "XNLI translation pairs"

    def features(self, task):
        from datasets import Features, Value

        return Features({"source": Value("string"), "target": Value("string")})

    def columns(self, rows):
        return {"source": [r.source for r in rows], "target": [r.target for r in rows]}

    def train_features(self, rows, tokenizer, max_length, stride=128):
        raise RaysparseError(f"data.task: a {self.name} task has no training features")

    def eval_features(self, rows, tokenizer, max_length, stride=128, prefix=""):
        from raysparse.data.features import retrieval_features

        return retrieval_features(rows, tokenizer, max_length, prefix)

    def score(self, task, rows, features, outputs):
        """``outputs``: the ``source`` and ``target`` sentence embeddings, row by row."""
        from raysparse.data.metrics import retrieval_accuracy

        return {"accuracy": retrieval_accuracy(outputs["source"], outputs["target"])}

    def training_languages(self, task, present, evaluation, regime, data_dir=None):
        """Retrieval trains (and scores) on XNLI premises paired with English: every XNLI language but English."""
        from raysparse.data.load import languages

        trainable = set(languages("xnli", data_dir)) - {"en"}
        candidates = [lang for lang in evaluation if lang in trainable]
        return TrainingLanguages(trainable, candidates, candidates)

    def training_rows(self, task, language, tokenizer, *, seed, train_fraction, max_examples, max_length, stride,
                      data_dir=None):
        """(sentence, English) pairs: XNLI dev premises with their English originals."""
        from raysparse.data.parallel import xnli_premise_pairs

        pairs = xnli_premise_pairs([language], data_dir).get(language)
        if not pairs:
            raise RaysparseError(f"data.languages: no XNLI translation pairs for '{language}' to train "
                                 f"{task.name} on")
        rows = list(zip(*pairs))
        if max_examples:
            random.Random(seed).shuffle(rows)
            rows = rows[:max_examples]
        return rows, f"xnli/dev-{language}.tsv premises paired with dev-en ({len(rows)} pairs)"


KINDS: dict[str, Kind] = {kind.name: kind for kind in (PairClassification(), Tagging(), QuestionAnswering(),
                                                        Retrieval())}
assert tuple(KINDS) == TASK_KINDS, "one strategy per task kind, in the registry's order"


def kind_of(task: str | Task) -> Kind:
    """The strategy of ``task`` (a Task, a task name, or a kind name)."""
    if isinstance(task, Task):
        return KINDS[task.kind]
    if task in KINDS:
        return KINDS[task]
    return KINDS[get_task(task).kind]


def stack_ragged(rows: list[np.ndarray]) -> np.ndarray:
    """[windows, longest] with -inf-like padding (QA post-processing never reads it)."""
    import numpy as np

    width = max(len(row) for row in rows)
    out = np.full((len(rows), width), np.finfo(np.float32).min, dtype=np.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


__all__ = ["KINDS", "Kind", "PairClassification", "QuestionAnswering", "Retrieval", "Tagging", "TrainingLanguages",
           "kind_of", "stack_ragged"]
