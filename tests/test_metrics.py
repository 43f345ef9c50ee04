"""Metrics against hand-computed values and the reference libraries (scikit-learn, seqeval); per-example
statistics and their bootstrap intervals on real rows with hand-made predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from seqeval.metrics import f1_score as seqeval_f1
from sklearn.metrics import accuracy_score

from raysparse.data import (
    accuracy,
    aggregate,
    answer_f1,
    answer_f1_examples,
    bucc_scores,
    correct_examples,
    entity_examples,
    entity_scores,
    exact_match,
    normalize_answer,
    retrieval_accuracy,
    retrieval_examples,
    squad_scores,
    tagging_scores,
    token_examples,
    token_scores,
)
from raysparse.data.bootstrap import (
    compact,
    examples_record,
    intervals,
    metric_from_sums,
    paired_difference,
    percentile_interval,
    point_estimates,
    pool_differences,
    record_stats,
    resample,
    same_examples,
)
from raysparse.data.regimes import evaluation_data
from raysparse.data.tasks import get_task
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


# --- per-example statistics and bootstrap intervals (raysparse.data.bootstrap), on real rows ----------------



def _rows(task: str, language: str, count: int):
    rows = evaluation_data(task, [language], 0, 0.5)[language].rows
    return rows.select(range(min(count, len(rows))))


def _perturbed(sequences, names, share: float, seed: int):
    """Tag sequences with ``share`` of the tags replaced by random names (broken spans included)."""
    rng = np.random.default_rng(seed)
    return [[names[rng.integers(len(names))] if rng.random() < share else tag for tag in sentence]
            for sentence in sequences]


def _tag_names(task: str, rows) -> list[list[str]]:
    names = get_task(task).label_names
    return [[names[t] for t in tags] for tags in rows["tags"]]


def _predictions(labels, share: float, classes: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(rng.integers(classes)) if rng.random() < share else label for label in labels]


def test_entity_counts_per_sentence_reproduce_seqeval_on_real_panx_rows(data_dir):
    gold = _tag_names("panx", _rows("panx", "de", 400))
    predicted = _perturbed(gold, get_task("panx").label_names, 0.15, seed=0)
    counts = entity_examples(gold, predicted)
    assert counts.shape == (len(gold), 3) and counts.dtype == np.int64
    tp, fp, fn = counts.sum(axis=0)
    scores = entity_scores(gold, predicted)
    assert 0 < scores["f1"] < 1
    assert float(metric_from_sums("f1", counts.sum(axis=0), len(counts))) == scores["f1"]   # exactly
    assert (tp / (tp + fp), tp / (tp + fn)) == (scores["precision"], scores["recall"])
    assert point_estimates("f1", {"de": counts})["de"] == scores["f1"] == seqeval_f1(gold, predicted)
    assert float(metric_from_sums("f1", np.zeros(3), 0)) == entity_scores([["O"]], [["O"]])["f1"] == 0.0


def test_per_example_statistics_reproduce_every_metric_on_real_rows(data_dir):
    xnli = _rows("xnli", "de", 300)
    predicted = _predictions(xnli["label"], 0.6, 3, seed=1)
    correct = correct_examples(xnli["label"], predicted)
    assert point_estimates("mean", {"de": correct})["de"] == accuracy(xnli["label"], predicted)

    gold = _tag_names("udpos", _rows("udpos", "de", 200))
    guessed = _perturbed(gold, get_task("udpos").label_names, 0.3, seed=2)
    assert point_estimates("ratio", {"de": token_examples(gold, guessed)})["de"] == token_scores(gold, guessed)["accuracy"]

    mlqa = _rows("mlqa", "de", 100)
    references = {qid: list(answers["text"]) for qid, answers in zip(mlqa["id"], mlqa["answers"])}
    answers = {qid: " ".join((gold[0] + " und so weiter").split()[: 1 + i % 4])   # partly right, some missing
               for i, (qid, gold) in enumerate(references.items()) if i % 5}
    f1s = answer_f1_examples(answers, references)
    assert 0 < f1s.mean() < 1 and len(f1s) == len(references)
    assert point_estimates("mean", {"de": f1s})["de"] == pytest.approx(squad_scores(answers, references)["f1"],
                                                                       abs=1e-12)

    rng = np.random.default_rng(3)
    source = rng.normal(size=(200, 8))
    target = source + rng.normal(scale=1.0, size=source.shape)
    found = retrieval_examples(source, target)
    assert point_estimates("mean", {"de": found})["de"] == retrieval_accuracy(source, target)


def test_intervals_hold_the_estimate_and_narrow_with_more_examples(data_dir):
    widths = {}
    for count in (100, 1000):
        rows = {lang: _rows("xnli", lang, count) for lang in ("de", "fr", "ru")}
        stats = {lang: correct_examples(r["label"], _predictions(r["label"], 0.5, 3, seed=4)) for lang, r in rows.items()}
        estimates, found = point_estimates("mean", stats), intervals("mean", stats)
        assert set(found) == {"de", "fr", "ru", "avg", "worst"}
        for key in ("de", "fr", "ru", "avg"):
            assert found[key][0] <= estimates[key] <= found[key][1], key
        assert found["worst"][0] <= estimates["worst"]
        widths[count] = {key: high - low for key, (low, high) in found.items()}
    assert all(widths[1000][key] < widths[100][key] for key in widths[100]), widths
    assert intervals("mean", stats) == found and intervals("mean", stats, seed=1) != found   # seeded


def test_paired_difference_of_a_run_with_itself_is_zero_and_pairing_narrows(data_dir):
    rows = {lang: _rows("xnli", lang, 200) for lang in ("de", "fr")}
    guesses = {lang: _predictions(r["label"], 0.5, 3, seed=5) for lang, r in rows.items()}
    a = {lang: correct_examples(r["label"], guesses[lang]) for lang, r in rows.items()}
    # b: a's predictions with a tenth of them redrawn, so the two runs agree on most examples
    b = {lang: correct_examples(r["label"], _predictions(guesses[lang], 0.1, 3, seed=6)) for lang, r in rows.items()}
    assert paired_difference("mean", a, a) == dict.fromkeys(["de", "fr", "avg", "worst"], (0.0, 0.0))
    paired = paired_difference("mean", a, b)
    unpaired = {key: percentile_interval(values)
                for key, values in pool_differences([resample("mean", a)], [resample("mean", b, seed=1)]).items()}
    for key in ("de", "fr", "avg"):
        assert paired[key][1] - paired[key][0] < unpaired[key][1] - unpaired[key][0], key
    with pytest.raises(RaysparseError, match="same examples"):
        paired_difference("mean", a, {"de": a["de"][:-1], "fr": a["fr"]})


def test_intervals_do_not_depend_on_the_order_of_the_languages():
    """A run set read back from JSON has its languages sorted; rows from MLflow keep the run's order. The
    average (and so its interval) must come out bit for bit the same both ways, or a report regenerated
    offline differs from the one written from MLflow in the third decimal."""
    rng = np.random.default_rng(0)
    stats = {lang: rng.random(37).round(4) for lang in ("de", "ru", "zh", "sw", "ar", "hi")}
    reordered = {lang: stats[lang] for lang in sorted(stats, reverse=True)}
    one, two = resample("mean", stats), resample("mean", reordered)
    assert all(np.array_equal(one[key], two[key]) for key in one)
    assert point_estimates("mean", stats) == point_estimates("mean", reordered)


def test_examples_record_is_compact_and_round_trips():
    stats = {"de": np.array([1, 0, 1]), "fr": np.array([[2, 1, 0], [0, 0, 3]]), "es": np.array([0.123456, 1.0])}
    assert compact(stats["de"]) == [1, 0, 1] and all(type(v) is int for v in compact(stats["de"]))
    assert compact(stats["fr"]) == [[2, 1, 0], [0, 0, 3]] and compact(stats["es"]) == [0.1235, 1.0]
    record = json.loads(json.dumps(examples_record("xnli", stats, {"de": "xnli/dev-de.tsv"}, skip=0)))
    assert (record["task"], record["metric"], record["form"]) == ("xnli", "accuracy", "mean")
    back = record_stats(record, "xnli")
    assert back["fr"].tolist() == [[2, 1, 0], [0, 0, 3]] and back["de"].shape == (3, 1)
    assert record_stats(record, "panx") is None and record_stats({"stats": {}}) is None
    assert same_examples([record, record])
    assert not same_examples([record, {**record, "sources": {**record["sources"], "de": "xnli/dev-de.tsv (seed=1)"}}])
