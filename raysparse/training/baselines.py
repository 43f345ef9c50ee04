"""Trivial baselines: what each task scores without a model, on the rows a model is scored on.

A pruned model's score means little without the floor beneath it: a model that has lost
everything still predicts the majority label. :func:`trivial_baseline` scores the trivial
predictor of a task on exactly the evaluation rows that :func:`raysparse.training.evaluate.evaluate`
scores for the same ``languages``, ``seed``, ``train_fraction``, ``max_examples`` and
``skip_examples`` (``raysparse.data.regimes.evaluation_data``, then the same row selection), with the
same metric functions, and returns metrics under the same keys:

    pair classification (XNLI, PAWS-X)  the majority label of the regime's training rows, for every pair
    UD-POS                              the most frequent tag of the regime's training tokens, for every word
    PAN-X                               ``O`` for every word (no entity): entity F1 is 0 by construction
    QA (XQuAD, MLQA, TyDiQA)            the empty answer: F1 is 0 (exact match only where a gold answer
                                        normalises to nothing)
    retrieval (Tatoeba, BUCC)           none: a result without metrics that says so

"The regime's training rows" are those ``raysparse.data.regimes.training_data`` gives for ``regime``,
pooled over its languages (English for zero-shot), as one model is fine-tuned on them all; they
never overlap the evaluation rows. Tagging is scored on every word of a row, whereas ``evaluate``
scores only the words that fit in ``max_length`` sub-word tokens: on the rare longer sentences the
two count slightly different words.

``metrics`` holds ``<task>/<lang>/<metric>`` plus ``<task>/avg/<metric>`` and ``<task>/worst/<metric>``
(``raysparse.data.metrics.aggregate``), ``predictor`` one line on what was predicted and from which
rows, e.g. ``majority label 'entailment' (33.7%) of 1245 training rows (zero-shot: en)``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from datasets import Dataset

from raysparse.data.kinds import kind_of
from raysparse.data.load import languages as available_languages
from raysparse.data.metrics import accuracy, aggregate, squad_scores, tagging_scores
from raysparse.data.regimes import REGIMES, evaluation_data, training_data
from raysparse.data.tasks import Task, get_task
from raysparse.errors import RaysparseError
from raysparse.training.evaluate import evaluated_rows

NO_ENTITY = "O"


@dataclass
class TrivialBaseline:
    """The trivial predictor's scores on one task: ``metrics`` keyed as ``EvaluationResult.metrics``.

    ``per_language``: language -> metric -> value; ``examples``: rows scored per language;
    ``predictor``: what was predicted. Retrieval has no trivial predictor: no metrics, and
    ``predictor`` says why.
    """

    task: str
    predictor: str
    metrics: dict[str, float] = field(default_factory=dict)
    per_language: dict[str, dict[str, float]] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)

    @property
    def scored(self) -> bool:
        return bool(self.metrics)


def trivial_baseline(task: str | Task, languages: Sequence[str] | str | None = None, *,
                     data_dir: str | os.PathLike | None = None, seed: int = 0, train_fraction: float = 0.5,
                     max_examples: int | None = None, skip_examples: int = 0,
                     regime: str = "zero-shot") -> TrivialBaseline:
    """Score the trivial predictor of ``task`` on the rows ``evaluate`` would score (see the module docstring).

    ``languages`` default to all present; ``regime`` decides which training rows a majority is
    taken from (pair classification, UD-POS); the other arguments are ``evaluate``'s.
    """
    task = get_task(task)
    if regime not in REGIMES:
        raise RaysparseError(f"data.regime: unknown regime '{regime}' (expected one of: {', '.join(REGIMES)})")
    if kind_of(task).embeds:
        return TrivialBaseline(task.name, f"none: {task.name} is retrieval, scored by nearest neighbours of "
                                          "sentence embeddings; without a model there is nothing to rank, so no "
                                          "trivial baseline")
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise RaysparseError(f"evaluate.max_examples: {max_examples!r} (expected a positive integer or None)")
    if languages is None:
        languages = available_languages(task, data_dir)
    if isinstance(languages, str):
        languages = [part.strip() for part in languages.split(",") if part.strip()]
    predict, predictor = _predictor(task, languages, regime, seed, train_fraction, data_dir)
    per_language: dict[str, dict[str, float]] = {}
    examples: dict[str, int] = {}
    for language, data in evaluation_data(task, languages, seed, train_fraction, data_dir).items():
        rows = evaluated_rows(data.rows, task, language, max_examples, skip_examples)
        examples[language] = len(rows)
        per_language[language] = predict(rows)
    return TrivialBaseline(task.name, predictor, aggregate(per_language, task.name), per_language, examples)


def _predictor(task: Task, languages: Sequence[str], regime: str, seed: int, train_fraction: float, data_dir):
    """The task's trivial predictor (rows -> metrics) and its description."""
    kind = task.kind
    if kind == "qa":
        def empty_answers(rows: Dataset) -> dict[str, float]:
            references = {qid: list(answers["text"]) for qid, answers in zip(rows["id"], rows["answers"])}
            scores = squad_scores({qid: "" for qid in references}, references)
            return {name: scores[name] for name in task.metric_names}

        return empty_answers, "the empty answer to every question"
    names = task.label_names
    if kind == "tagging" and task.name == "panx":
        constant, described = NO_ENTITY, f"'{NO_ENTITY}' (no entity) for every word"
    else:
        train = training_data(task, regime, languages, seed, train_fraction, data_dir)
        rows = train.rows()
        column = list(rows["label"]) if kind == "pair_classification" else [t for tags in rows["tags"] for t in tags]
        counts = Counter(column)
        if not counts:
            raise RaysparseError(f"baseline: no training {'labels' if kind == 'pair_classification' else 'tags'} "
                                 f"of {task.name} under {regime} to take a majority from")
        majority = min(counts, key=lambda label: (-counts[label], label))   # ties: the first label
        share = counts[majority] / len(column)
        constant = names[majority]
        what = "rows" if kind == "pair_classification" else "tokens"
        source = f"{len(column)} training {what} ({regime}: {', '.join(train.languages)})"
        described = (f"majority label '{constant}' ({share:.1%}) of {source}" if kind == "pair_classification"
                     else f"every word tagged '{constant}', the most frequent tag ({share:.1%}) of {source}")
    if kind == "pair_classification":
        label = names.index(constant)
        return (lambda rows: {"accuracy": accuracy(list(rows["label"]), [label] * len(rows))}), described

    def constant_tags(rows: Dataset) -> dict[str, float]:
        gold = [[names[t] for t in tags] for tags in rows["tags"]]
        return tagging_scores(task.name, gold, [[constant] * len(tags) for tags in gold])

    return constant_tags, described


__all__ = ["TrivialBaseline", "trivial_baseline"]
