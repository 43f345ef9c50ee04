"""What each task kind decides, in one strategy object per kind.

A task's kind (:attr:`raysparse.data.tasks.Task.kind`) decides its features, the size of
its head, how its outputs are scored, what it trains on and which languages can train it.
:func:`kind_of` gives a task's strategy:

    pair_classification  XNLI, PAWS-X
    tagging              UD-POS, PAN-X
    qa                   XQuAD, MLQA, TyDiQA
    retrieval            Tatoeba, BUCC (scored from sentence embeddings, no head)

This module sits on top of the data layer: it builds on the features, metrics, regimes and
loaders, and none of them imports it. So what the loaders and regimes need of a kind (its
columns, how a file's rows group when split, whether it trains) is the kind's row schema, in
:mod:`raysparse.data.schema`, one layer down. It knows no torch model: the heads of each kind
live in :mod:`raysparse.models.heads`, batches and losses in :mod:`raysparse.training.kinds`.
``datasets`` and the feature code are imported on first use, so importing this module stays cheap.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from raysparse.data.schema import SCHEMAS
from raysparse.data.tasks import TASK_KINDS, Task, get_task
from raysparse.errors import RaysparseError

if TYPE_CHECKING:
    import numpy as np
    from datasets import Dataset

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


@dataclass(frozen=True)
class Scores:
    """One language's scores: ``metrics`` (name -> value) and ``examples``, the per-example statistics of the
    primary metric ([examples, columns] in the form :func:`raysparse.data.bootstrap.example_form` names;
    None for a task without them)."""

    metrics: dict[str, float]
    examples: np.ndarray | None = None


class Kind:
    """The decisions of one task kind. Subclasses override what differs."""

    name: ClassVar[str]
    embeds: ClassVar[bool] = False          # scored from sentence embeddings: any encoder will do, no head
    objective: ClassVar[str] = "head"       # what training minimises: the head's loss, or "contrastive"
    max_length: ClassVar[int] = 128         # default tokens per sequence
    windows: ClassVar[bool] = False         # long inputs become overlapping windows (a doc stride)
    labelled_by_names: ClassVar[bool] = False   # the head has one output per label name
    training_source: ClassVar[str] = "training rows"

    def __repr__(self) -> str:
        return f"<kind {self.name}>"

    @property
    def trainable(self) -> bool:
        """Labelled rows to fine-tune on (retrieval: scored from embeddings), as the kind's rows say."""
        return SCHEMAS[self.name].trainable

    # --- the model's side ----------------------------------------------------------------
    def num_labels(self, task: str | Task) -> int:
        """Output classes of the task's head: labels (classification), tags (tagging), else 0."""
        return len(get_task(task).label_names) if self.labelled_by_names else 0

    def train_features(self, rows: Dataset, tokenizer, max_length: int, stride: int = 128) -> Dataset:
        raise NotImplementedError

    def eval_features(self, rows: Dataset, tokenizer, max_length: int, stride: int = 128, prefix: str = "") -> Dataset:
        return self.train_features(rows, tokenizer, max_length)

    def score(self, task: Task, rows: Dataset, features: Dataset | None, outputs: Mapping[str, Any]) -> Scores:
        """The task's metrics of one language from the model's outputs (per feature row), with the
        per-example statistics of its primary metric (:mod:`raysparse.data.bootstrap`)."""
        raise NotImplementedError

    # --- training ------------------------------------------------------------------------
    def training_languages(self, task: Task, present: Sequence[str], evaluation: Sequence[str], regime: str,
                           data_dir=None) -> TrainingLanguages:
        """Languages that can train ``task`` and those a run fine-tunes and scores on by default."""
        return TrainingLanguages(set(present), list(evaluation), FINETUNE_LANGUAGES[regime](evaluation))

    def training_rows(self, task: Task, language: str, tokenizer, *, seed: int, train_fraction: float,
                      max_examples: int | None, max_length: int, stride: int, data_dir=None) -> tuple[list, str]:
        """One language's training rows (features ready to batch) and where they came from."""
        from raysparse.data.regimes import training_data

        data = training_data(task, "in-language", [language], seed, train_fraction, data_dir).per_language[language]
        table = data.rows
        if max_examples and len(table) > max_examples:
            table = table.shuffle(seed=seed).select(range(max_examples))
        features = self.train_features(table, tokenizer, max_length, stride)
        keep = [c for c in TRAINING_COLUMNS if c in features.column_names]
        return features.select_columns(keep).to_list(), data.source


class PairClassification(Kind):
    name = "pair_classification"
    labelled_by_names = True

    def train_features(self, rows, tokenizer, max_length, stride=128):
        from raysparse.data.features import pair_features

        return pair_features(rows, tokenizer, max_length)

    def score(self, task, rows, features, outputs):
        from raysparse.data.metrics import accuracy, correct_examples

        labels, predicted = list(rows["label"]), [int(o.argmax()) for o in outputs["logits"]]
        return Scores({"accuracy": accuracy(labels, predicted)}, correct_examples(labels, predicted))


class Tagging(Kind):
    name = "tagging"
    labelled_by_names = True

    def train_features(self, rows, tokenizer, max_length, stride=128):
        from raysparse.data.features import tagging_features

        return tagging_features(rows, tokenizer, max_length)

    def score(self, task, rows, features, outputs):
        from raysparse.data.features import tagging_predictions
        from raysparse.data.metrics import tagging_examples, tagging_scores

        predicted = [o.argmax(-1) for o in outputs["logits"]]
        gold, guessed = tagging_predictions(features["labels"], predicted, task.label_names)
        return Scores(tagging_scores(task.name, gold, guessed), tagging_examples(task.name, gold, guessed))


class QuestionAnswering(Kind):
    name = "qa"
    max_length = 384
    windows = True

    def train_features(self, rows, tokenizer, max_length, stride=128):
        from raysparse.data.features import qa_train_features

        return qa_train_features(rows, tokenizer, max_length, stride)

    def eval_features(self, rows, tokenizer, max_length, stride=128, prefix=""):
        from raysparse.data.features import qa_eval_features

        return qa_eval_features(rows, tokenizer, max_length, stride)

    def score(self, task, rows, features, outputs):
        from raysparse.data.features import qa_predictions
        from raysparse.data.metrics import answer_f1_examples, squad_scores

        start_logits = stack_ragged(outputs["start_logits"])
        end_logits = stack_ragged(outputs["end_logits"])
        predictions = qa_predictions(rows, features, start_logits, end_logits)
        references = {qid: list(answers["text"]) for qid, answers in zip(rows["id"], rows["answers"])}
        scores = squad_scores(predictions, references)
        return Scores({name: scores[name] for name in task.metric_names}, answer_f1_examples(predictions, references))


class Retrieval(Kind):
    name = "retrieval"
    embeds = True
    objective = "contrastive"
    training_source = "XNLI translation pairs"

    def train_features(self, rows, tokenizer, max_length, stride=128):
        raise RaysparseError(f"data.task: a {self.name} task has no training features")

    def eval_features(self, rows, tokenizer, max_length, stride=128, prefix=""):
        from raysparse.data.features import retrieval_features

        return retrieval_features(rows, tokenizer, max_length, prefix)

    def score(self, task, rows, features, outputs):
        """``outputs``: the ``source`` and ``target`` sentence embeddings, row by row."""
        from raysparse.data.metrics import retrieval_examples

        found = retrieval_examples(outputs["source"], outputs["target"])
        return Scores({"accuracy": float(found.mean())}, found)

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


__all__ = ["KINDS", "Kind", "PairClassification", "QuestionAnswering", "Retrieval", "Scores", "Tagging",
           "TrainingLanguages", "kind_of", "stack_ragged"]
