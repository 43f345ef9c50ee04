"""Metrics against hand-computed values and the reference libraries (scikit-learn, seqeval)."""

from __future__ import annotations

import numpy as np
import pytest
from seqeval.metrics import f1_score as seqeval_f1
from sklearn.metrics import accuracy_score

from raysparse.data import (
    accuracy,
    aggregate,
    answer_f1,
    bucc_scores,
    entity_scores,
    exact_match,
    normalize_answer,
    retrieval_accuracy,
    squad_scores,
    tagging_scores,
    token_scores,
)
from raysparse.errors import RaysparseError


def test_accuracy_matches_sklearn():
    labels = [0, 1, 2, 2, 1, 0, 1]
    predictions = [0, 2, 2, 2, 1, 1, 1]
    assert accuracy(labels, predictions) == pytest.approx(5 / 7)
    assert accuracy(labels, predictions) == accuracy_score(labels, predictions)
    with pytest.raises(RaysparseError, match="7 labels but 2 predictions"):
        accuracy(labels, [0, 1])


def test_squad_normalisation_drops_case_punctuation_and_articles():
    assert normalize_answer("The  Eiffel Tower.") == "eiffel tower"
    assert exact_match("The Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert exact_match("Eiffel", ["eiffel tower"]) == 0.0


def test_answer_f1_partial_overlap_by_hand():
    # "the tower in Paris" -> [tower, in, paris]; "Eiffel Tower, Paris" -> [eiffel, tower, paris]:
    # 2 shared tokens, precision 2/3, recall 2/3, F1 2/3. Against "Paris": P 1/3, R 1, F1 1/2.
    assert answer_f1("the tower in Paris", ["Eiffel Tower, Paris"]) == pytest.approx(2 / 3)
    assert answer_f1("the tower in Paris", ["Paris"]) == pytest.approx(1 / 2)
    assert answer_f1("the tower in Paris", ["Paris", "Eiffel Tower, Paris"]) == pytest.approx(2 / 3)  # max over golds
    assert answer_f1("a", ["the"]) == 0.0  # both normalise to nothing


def test_squad_scores_average_and_count_missing_predictions_as_zero():
    references = {"q1": ["eiffel tower"], "q2": ["Paris", "Eiffel Tower, Paris"], "q3": ["1889"]}
    predictions = {"q1": "The Eiffel Tower.", "q2": "the tower in Paris"}
    scores = squad_scores(predictions, references)
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    with pytest.raises(RaysparseError, match="'q' has no gold answer"):
        squad_scores({}, {"q": []})


def test_entity_f1_with_broken_spans_matches_seqeval_and_hand_count():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC"], ["O", "B-ORG", "O"]]
    predicted = [["I-PER", "I-PER", "O", "I-LOC", "B-LOC"], ["O", "I-ORG", "I-PER"]]
    # conlleval rules: an I- tag after O (or another type) opens an entity. Predicted:
    # PER(0-1) right, LOC(3) and LOC(4) wrong, ORG(1) right, PER(2) wrong -> 2 of 5 right,
    # 2 of 3 gold found: precision 2/5, recall 2/3, F1 1/2.
    scores = entity_scores(gold, predicted)
    assert scores == pytest.approx({"f1": 0.5, "precision": 0.4, "recall": 2 / 3})
    assert scores["f1"] == pytest.approx(seqeval_f1(gold, predicted))
    assert tagging_scores("panx", gold, predicted) == scores


def test_pos_uses_token_accuracy_and_macro_f1():
    gold = [["NOUN", "VERB", "NOUN"], ["DET", "NOUN"]]
    predicted = [["NOUN", "NOUN", "NOUN"], ["DET", "NOUN"]]
    scores = token_scores(gold, predicted)
    assert scores["accuracy"] == pytest.approx(4 / 5)
    # Per tag F1: NOUN 2*(3/4*1)/(3/4+1)=6/7, VERB 0, DET 1 -> macro (6/7 + 0 + 1)/3.
    assert scores["macro_f1"] == pytest.approx((6 / 7 + 0 + 1) / 3)
    assert tagging_scores("udpos", gold, predicted) == scores
    with pytest.raises(RaysparseError, match="differ in number or length"):
        token_scores(gold, [["NOUN"], ["DET", "NOUN"]])


def test_retrieval_accuracy_is_cosine_top1():
    source = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    target = np.array([[2.0, 0.1], [0.1, 3.0], [-1.0, -1.0]])
    # Row 2 is closest to target 0 (cosine 0.742 vs 0.730 vs -1): 2 of 3 right.
    assert retrieval_accuracy(source, target) == pytest.approx(2 / 3)
    assert retrieval_accuracy(source * 100, target) == pytest.approx(2 / 3)  # cosine, not dot product
    assert retrieval_accuracy(source, source[[0, 1, 2]] * 5) == 1.0
    with pytest.raises(RaysparseError, match="expected two equal"):
        retrieval_accuracy(source, target[:2])


def test_bucc_scores_from_pair_sets():
    predicted = {("de-1", "en-1"), ("de-2", "en-2"), ("de-3", "en-3")}
    gold = {("de-1", "en-1"), ("de-2", "en-9")}
    assert bucc_scores(predicted, gold) == pytest.approx({"precision": 1 / 3, "recall": 1 / 2, "f1": 0.4})
    assert bucc_scores(set(), gold)["f1"] == 0.0


def test_aggregate_flat_keys_avg_and_worst():
    flat = aggregate({"de": {"f1": 0.8, "exact_match": 0.7}, "fr": {"f1": 0.6, "exact_match": 0.5}, "sw": {"f1": 0.4}}, "xquad")
    assert flat["xquad/de/f1"] == 0.8 and flat["xquad/sw/f1"] == 0.4
    assert flat["xquad/avg/f1"] == pytest.approx(0.6)
    assert flat["xquad/worst/f1"] == pytest.approx(0.4)
    assert flat["xquad/avg/exact_match"] == pytest.approx(0.6)  # over the languages that report it
    assert flat["xquad/worst/exact_match"] == pytest.approx(0.5)
    assert len(flat) == 5 + 4
    with pytest.raises(RaysparseError, match="reserved"):
        aggregate({"avg": {"f1": 1.0}}, "xquad")
