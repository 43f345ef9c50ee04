"""Trivial baselines on the real XTREME data: the floor of each task, on the rows evaluate() scores.

The rows evaluate() would score are caught where it scores them (its per-language scorer replaced,
no model runs), so each figure is checked against those very rows.
"""

from collections import Counter

import pytest
import torch
from datasets import Dataset

from raysparse.data.regimes import training_data
from raysparse.data.tasks import get_task
from raysparse.errors import RaysparseError
from raysparse.metric_keys import avg_key, metric_key, worst_key
from raysparse.training import evaluate as evaluation
from raysparse.training.baselines import trivial_baseline


class Caught(Exception):
    """Raised in place of scoring a language: carries the rows evaluate() was about to score."""


@pytest.fixture()
def evaluated_rows(monkeypatch):
    """``rows_of(task, languages, **options)``: language -> the rows ``evaluate`` scores with those options.

    Its per-language scorer is replaced by one that raises with the rows it was given (whatever it
    would return), so one call of ``evaluate`` per language catches that language's rows.
    """

    def catch(*args, **kwargs):
        raise Caught(next(arg for arg in (*args, *kwargs.values()) if isinstance(arg, Dataset)))

    monkeypatch.setattr(evaluation, "_score", catch)
    monkeypatch.setattr(evaluation, "check_head", lambda model, task: None)

    def rows_of(task, languages, **options):
        caught = {}
        for language in languages:
            with pytest.raises(Caught) as info:
                evaluation.evaluate(torch.nn.Linear(1, 1), None, task, [language], verbose=False, **options)
            caught[language] = info.value.args[0]
        return caught

    return rows_of


def keys(task, languages):
    metrics = get_task(task).metric_names
    return ({metric_key(task, lang, m) for lang in languages for m in metrics}
            | {avg_key(task, m) for m in metrics} | {worst_key(task, m) for m in metrics})


def check_shape(result, task, languages, examples):
    assert result.task == task and result.scored
    assert set(result.metrics) == keys(task, languages)
    assert all(0.0 <= value <= 1.0 for value in result.metrics.values())
    assert result.examples == dict.fromkeys(languages, examples)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("task", ["xnli", "pawsx"])
def test_pair_classification_scores_the_training_majority(task, data_dir, evaluated_rows):
    languages, options = ["en", "de"], {"max_examples": 60, "skip_examples": 30, "seed": 1, "train_fraction": 0.6}
    result = trivial_baseline(task, languages, data_dir=data_dir, **options)
    check_shape(result, task, languages, 60)
    train = list(training_data(task, "zero-shot", languages, 1, 0.6, data_dir).rows()["label"])
    majority = max(sorted(set(train)), key=train.count)
    assert f"majority label '{get_task(task).label_names[majority]}'" in result.predictor
    assert f"of {len(train)} training rows (zero-shot: en)" in result.predictor
    for language, rows in evaluated_rows(task, languages, data_dir=data_dir, **options).items():
        labels = list(rows["label"])
        assert result.per_language[language]["accuracy"] == pytest.approx(labels.count(majority) / len(labels))
    if task == "xnli":    # three balanced classes
        assert abs(result.metrics[avg_key(task, "accuracy")] - 1 / 3) < 0.1


@pytest.mark.timeout(120)
def test_udpos_accuracy_is_the_share_of_the_majority_tag(data_dir, evaluated_rows):
    languages = ["en", "de"]
    result = trivial_baseline("udpos", languages, data_dir=data_dir, max_examples=50)
    check_shape(result, "udpos", languages, 50)
    tags = Counter(t for row in training_data("udpos", "zero-shot", languages, 0, 0.5, data_dir).rows()["tags"]
                   for t in row)
    majority = tags.most_common(1)[0][0]
    assert f"tagged '{get_task('udpos').label_names[majority]}'" in result.predictor
    for language, rows in evaluated_rows("udpos", languages, data_dir=data_dir, max_examples=50).items():
        words = [t for row in rows["tags"] for t in row]
        assert result.per_language[language]["accuracy"] == pytest.approx(words.count(majority) / len(words))
        assert 0 < result.per_language[language]["macro_f1"] < result.per_language[language]["accuracy"]


@pytest.mark.timeout(120)
def test_panx_all_outside_has_no_entity_and_qa_empty_answers_score_nothing(data_dir):
    panx = trivial_baseline("panx", ["en", "de"], data_dir=data_dir, max_examples=40)
    check_shape(panx, "panx", ["en", "de"], 40)
    assert set(panx.metrics.values()) == {0.0}
    xquad = trivial_baseline("xquad", ["en", "de"], data_dir=data_dir, max_examples=40)
    check_shape(xquad, "xquad", ["en", "de"], 40)
    assert xquad.metrics[avg_key("xquad", "f1")] == 0.0 and xquad.predictor == "the empty answer to every question"
    # this copy's TyDiQA dev files carry no gold answers: the baseline refuses them as evaluate does
    with pytest.raises(RaysparseError, match="no gold answer"):
        trivial_baseline("tydiqa", ["ar"], data_dir=data_dir, max_examples=40)


@pytest.mark.timeout(60)
def test_retrieval_has_none_and_bad_input_is_one_line(data_dir):
    tatoeba = trivial_baseline("tatoeba", ["de"], data_dir=data_dir)
    assert not tatoeba.scored and tatoeba.metrics == {} and tatoeba.predictor.startswith("none: tatoeba is retrieval")
    with pytest.raises(RaysparseError, match="data.regime"):
        trivial_baseline("xnli", ["de"], data_dir=data_dir, regime="few-shot")
    with pytest.raises(RaysparseError, match="evaluate.skip_examples: 5000 leaves no rows of xnli de"):
        trivial_baseline("xnli", ["de"], data_dir=data_dir, skip_examples=5000)
    in_language = trivial_baseline("xnli", ["de", "sw"], data_dir=data_dir, regime="in-language", max_examples=20)
    assert "(in-language: de, sw)" in in_language.predictor
