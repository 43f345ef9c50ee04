"""Task metrics, as XTREME defines them, computed offline; all scores are fractions in [0, 1].

- Pair classification: accuracy (scikit-learn).
- PAN-X (NER): entity-level micro F1/precision/recall with seqeval's default conlleval
  rules (an I- tag without a preceding B- opens a new entity), as XTREME's run_tag.py.
- UD-POS: token accuracy and macro F1 over tags (scikit-learn). XTREME ran seqeval on POS
  tags too; without B-/I- prefixes seqeval merges runs of equal tags into one "entity",
  which is not a POS measure, so we report token accuracy (= token-level micro F1) instead.
- QA: SQuAD v1.1 exact match and token F1 after the standard normalisation (lowercase,
  drop ASCII punctuation and English articles a/an/the, collapse whitespace), maximised
  over gold answers. MLQA's official script normalises per language; this does not.
- Retrieval: top-1 accuracy of cosine nearest neighbours (Tatoeba); F1 of mined pairs (BUCC).

Beside each task's primary metric, ``*_examples`` functions give its per-example sufficient
statistics (rows of numbers whose column sums determine the metric, one row per example), which
:mod:`raysparse.data.bootstrap` resamples for 95% intervals: correct or not (accuracy), correct and
scored tokens per sentence (token accuracy), entity tp/fp/fn per sentence (entity F1), F1 per
question (QA), own translation found or not (retrieval).

``evaluate.load`` would fetch metric scripts from the hub, so nothing here uses it.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Collection, Mapping, Sequence

import numpy as np
from seqeval.metrics import f1_score as seqeval_f1
from seqeval.metrics import precision_score as seqeval_precision
from seqeval.metrics import recall_score as seqeval_recall
from seqeval.metrics.sequence_labeling import get_entities
from sklearn.metrics import accuracy_score
from sklearn.metrics import f1_score as sklearn_f1

from raysparse.errors import RaysparseError
from raysparse.metric_keys import avg_key, check_languages, metric_key, worst_key

# --- classification and tagging -----------------------------------------------------------


def _check_lengths(labels: Sequence, predictions: Sequence) -> None:
    if len(labels) != len(predictions):
        raise RaysparseError(f"metrics: {len(labels)} labels but {len(predictions)} predictions (expected equal lengths)")


def accuracy(labels: Sequence, predictions: Sequence) -> float:
    """Share of predictions equal to their labels."""
    _check_lengths(labels, predictions)
    return float(accuracy_score(list(labels), list(predictions)))


def _check_sequences(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> None:
    if len(gold) != len(predicted) or any(len(g) != len(p) for g, p in zip(gold, predicted)):
        raise RaysparseError("metrics: gold and predicted tag sequences differ in number or length (expected equal shapes)")


def entity_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level micro ``f1``/``precision``/``recall`` of IOB tag sequences (seqeval)."""
    _check_sequences(gold, predicted)
    gold, predicted = [list(s) for s in gold], [list(s) for s in predicted]
    return {
        "f1": float(seqeval_f1(gold, predicted, zero_division=0)),
        "precision": float(seqeval_precision(gold, predicted, zero_division=0)),
        "recall": float(seqeval_recall(gold, predicted, zero_division=0)),
    }


def token_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    """Token ``accuracy`` and ``macro_f1`` over the tags that occur (POS tagging)."""
    _check_sequences(gold, predicted)
    flat_gold = [tag for sentence in gold for tag in sentence]
    flat_predicted = [tag for sentence in predicted for tag in sentence]
    return {
        "accuracy": accuracy(flat_gold, flat_predicted),
        "macro_f1": float(sklearn_f1(flat_gold, flat_predicted, average="macro", zero_division=0)),
    }


def correct_examples(labels: Sequence, predictions: Sequence) -> np.ndarray:
    """Per example: 1 where the prediction equals the label, else 0 (their mean is :func:`accuracy`)."""
    _check_lengths(labels, predictions)
    return np.array([int(label == prediction) for label, prediction in zip(labels, predictions)], dtype=np.int64)


def entity_examples(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> np.ndarray:
    """Per sentence ``[tp, fp, fn]`` of entities under seqeval's default (conlleval) rules.

    seqeval joins the sentences with an ``O`` between them, so no entity crosses a sentence
    and the column sums are its micro counts: F1 from them is :func:`entity_scores`'s.
    """
    _check_sequences(gold, predicted)
    rows = []
    for gold_tags, predicted_tags in zip(gold, predicted):
        true, found = set(get_entities(list(gold_tags))), set(get_entities(list(predicted_tags)))
        tp = len(true & found)
        rows.append((tp, len(found) - tp, len(true) - tp))
    return np.array(rows, dtype=np.int64).reshape(len(rows), 3)


def token_examples(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> np.ndarray:
    """Per sentence ``[correct tokens, tokens]``: summed, their ratio is :func:`token_scores`'s accuracy."""
    _check_sequences(gold, predicted)
    rows = [(sum(g == p for g, p in zip(gold_tags, predicted_tags)), len(gold_tags))
            for gold_tags, predicted_tags in zip(gold, predicted)]
    return np.array(rows, dtype=np.int64).reshape(len(rows), 2)


def tagging_scores(task: str, gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    """The metrics of a tagging task: entity scores for NER (panx), token scores for POS."""
    return token_scores(gold, predicted) if task == "udpos" else entity_scores(gold, predicted)


def tagging_examples(task: str, gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> np.ndarray:
    """The per-sentence statistics of a tagging task's primary metric (token counts for POS, entity counts for NER)."""
    return token_examples(gold, predicted) if task == "udpos" else entity_examples(gold, predicted)


# --- extractive QA ------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold_answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer."""
    return max(float(normalize_answer(prediction) == normalize_answer(gold)) for gold in _answers(gold_answers))


def answer_f1(prediction: str, gold_answers: Sequence[str]) -> float:
    """Best token-overlap F1 between the prediction and any gold answer."""
    return max(_token_f1(prediction, gold) for gold in _answers(gold_answers))


def _answers(gold_answers: Sequence[str]) -> Sequence[str]:
    if isinstance(gold_answers, str) or not gold_answers:
        raise RaysparseError("metrics: expected a non-empty list of gold answer texts")
    return gold_answers


def _token_f1(prediction: str, gold: str) -> float:
    predicted_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = sum((Counter(predicted_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def answer_f1_examples(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> np.ndarray:
    """Per question (in ``references``' order): its answer F1, 0 without a prediction (their mean is
    :func:`squad_scores`'s ``f1``)."""
    return np.array([answer_f1(predictions.get(question_id, ""), gold) for question_id, gold in references.items()],
                    dtype=np.float64)


def squad_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Mean ``exact_match`` and ``f1`` over the questions in ``references`` (id -> gold texts).

    A question with no prediction scores 0, as in the official SQuAD script.
    """
    if not references:
        raise RaysparseError("metrics: no QA references to score (expected at least one question)")
    em = f1 = 0.0
    for question_id, gold in references.items():
        if not gold:
            raise RaysparseError(f"metrics: question '{question_id}' has no gold answer (expected labelled QA data)")
        prediction = predictions.get(question_id, "")
        em += exact_match(prediction, gold)
        f1 += answer_f1(prediction, gold)
    return {"exact_match": em / len(references), "f1": f1 / len(references)}


# --- retrieval ----------------------------------------------------------------------------


def retrieval_accuracy(source_embeddings: np.ndarray, target_embeddings: np.ndarray) -> float:
    """Share of sources whose cosine-nearest target is their own translation (row i <-> row i)."""
    return float(retrieval_examples(source_embeddings, target_embeddings).mean())


def retrieval_examples(source_embeddings: np.ndarray, target_embeddings: np.ndarray) -> np.ndarray:
    """Per source: 1 when its cosine-nearest target is its own translation (row i <-> row i), else 0."""
    source = np.asarray(source_embeddings, dtype=np.float64)
    target = np.asarray(target_embeddings, dtype=np.float64)
    if source.ndim != 2 or source.shape != target.shape:
        raise RaysparseError(
            f"metrics: embeddings of shapes {source.shape} and {target.shape} (expected two equal [rows, dim] matrices)"
        )
    source = source / np.maximum(np.linalg.norm(source, axis=1, keepdims=True), 1e-12)
    target = target / np.maximum(np.linalg.norm(target, axis=1, keepdims=True), 1e-12)
    nearest = (source @ target.T).argmax(axis=1)
    return (nearest == np.arange(len(source))).astype(np.int64)


def bucc_scores(predicted_pairs: Collection[tuple[str, str]], gold_pairs: Collection[tuple[str, str]]) -> dict[str, float]:
    """Precision, recall and F1 of mined (source id, English id) pairs against the gold pairs."""
    predicted, gold = set(predicted_pairs), set(gold_pairs)
    correct = len(predicted & gold)
    precision = correct / len(predicted) if predicted else 0.0
    recall = correct / len(gold) if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if correct else 0.0
    return {"f1": f1, "precision": precision, "recall": recall}


# --- across languages -----------------------------------------------------------------------


def aggregate(per_language: Mapping[str, Mapping[str, float]], task: str) -> dict[str, float]:
    """Flat ``<task>/<lang>/<metric>`` keys plus ``<task>/avg/<metric>`` and
    ``<task>/worst/<metric>`` (the minimum over languages), the scheme MLflow and Tune use.

    A metric missing for some languages is averaged over the languages that have it.
    """
    check_languages(per_language)
    flat: dict[str, float] = {}
    by_metric: dict[str, list[float]] = {}
    for language, scores in per_language.items():
        for metric, value in scores.items():
            flat[metric_key(task, language, metric)] = float(value)
            by_metric.setdefault(metric, []).append(float(value))
    for metric, values in by_metric.items():
        flat[avg_key(task, metric)] = float(np.mean(values))
        flat[worst_key(task, metric)] = float(min(values))
    return flat
