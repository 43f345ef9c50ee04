"""Per-language evaluation of the embedded model (no fine-tuning), and `raysparse evaluate`; per-example
statistics and 95% intervals of every task kind on the tiny random encoder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import raysparse
from raysparse.cli import main
from raysparse.data.bootstrap import paired_difference, percentile_interval, point_estimates, pool_differences, \
    record_stats, resample
from raysparse.data.load import languages
from raysparse.metric_keys import metric_key
from raysparse.structure import Mask
from raysparse.training.evaluate import evaluate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TATOEBA_PAIRS = 50  # per language: the first pairs of each file (all 32 languages: the cost is the encoding)


@pytest.fixture(scope="module")
def encoder(embedded_dir):
    return raysparse.load_model(str(embedded_dir))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_embedded_tatoeba_retrieval_without_finetuning(encoder, embedded_tokenizer, data_dir):
    result = evaluate(encoder, embedded_tokenizer, "tatoeba", data_dir=data_dir, max_examples=TATOEBA_PAIRS)
    print(result.table())
    present = languages("tatoeba", data_dir)
    assert result.languages == present and len(present) >= 20
    assert result.average >= 0.7, result.table()
    assert result.metrics["tatoeba/avg/accuracy"] == pytest.approx(
        sum(scores["accuracy"] for scores in result.per_language.values()) / len(present))
    assert result.metrics["tatoeba/worst/accuracy"] == min(s["accuracy"] for s in result.per_language.values())
    assert all(result.examples[lang] == min(TATOEBA_PAIRS, result.available[lang]) for lang in present)
    assert all("whole" in line for line in result.table().splitlines()[2:-2])
    assert all(result.sources[lang].startswith(f"tatoeba/tatoeba.{lang}-eng.{lang}") for lang in present)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_evaluate_cli_prints_the_table(embedded_dir):
    proc = subprocess.run([sys.executable, "-m", "raysparse.cli", "evaluate", "embedded", "--task", "tatoeba",
                           "--languages", "de,fr", "--max-examples", "50"], capture_output=True, text=True, timeout=280,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout)
    lines = proc.stdout.splitlines()
    assert "tatoeba: 2 languages" in lines
    table = {line.split()[0]: line.split() for line in lines if line[:3] in ("de ", "fr ", "avg", "wor")}
    assert set(table) == {"de", "fr", "avg", "worst"}
    assert table["de"][2:5] == ["50", "of", "1000"]
    assert all(0.7 <= float(table[row][1]) <= 1.0 for row in ("de", "fr"))
    assert "  tatoeba de: 50 examples" in proc.stdout  # progress lines


@pytest.mark.parametrize("argv,expected", [
    (["--task", "nli"], "data.task: unknown task 'nli' (expected one of: xnli, pawsx,"),
    (["--task", "tatoeba", "--languages", "de,xx"], "data.languages: task 'tatoeba' has no language 'xx' in"),
    (["--task", "tatoeba", "--data-dir", "/nonexistent/xtreme"],
     "data.dir: /nonexistent/xtreme is not a directory (expected XTREME data"),
    (["--task", "xnli", "--languages", "de"], "evaluate.model: task 'xnli' needs a trained pair_classification head"),
])
@pytest.mark.timeout(120)
def test_evaluate_cli_bad_input_is_one_line(argv, expected, capsys, embedded_dir):
    assert main(["evaluate", "embedded", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert expected in lines[0]
    if "languages" in expected:
        assert "(available: af, ar," in lines[0]


@pytest.mark.timeout(120)
def test_bucc_mining_when_its_files_exist(encoder, embedded_tokenizer, tmp_path):
    """BUCC is evaluated only where its files exist; a tiny corpus in the BUCC layout."""
    folder = tmp_path / "xtreme" / "bucc2018"
    folder.mkdir(parents=True)
    german = ["Der Hund schläft im Garten.", "Ich trinke gern Kaffee am Morgen.", "Das Wetter ist heute schön.",
              "Berlin ist die Hauptstadt von Deutschland.", "Mein Bruder spielt Fußball."]
    english = ["I like to drink coffee in the morning.", "The dog is sleeping in the garden.",
               "Berlin is the capital of Germany.", "Prices of electricity rose sharply.",
               "The weather is nice today.", "She reads a book every week."]
    (folder / "de-en.test.de").write_text("".join(f"de-{i}\t{s}\n" for i, s in enumerate(german)))
    (folder / "de-en.test.en").write_text("".join(f"en-{i}\t{s}\n" for i, s in enumerate(english)))
    (folder / "de-en.test.gold").write_text("de-0\ten-1\nde-1\ten-0\nde-2\ten-4\nde-3\ten-2\n")
    result = evaluate(encoder, embedded_tokenizer, "bucc", data_dir=tmp_path / "xtreme")
    print(result.table())
    assert set(result.metrics) == {f"bucc/{lang}/{m}" for lang in ("de", "avg", "worst")
                                   for m in ("f1", "precision", "recall")}
    assert result.per_language["de"] == {"f1": 1.0, "precision": 1.0, "recall": 1.0}


# --- per-example statistics and 95% intervals, on the tiny random encoder -----------------------------------

TINY_TASKS = {"xnli": ["en", "de"], "udpos": ["en", "de"], "panx": ["en", "de"], "mlqa": ["en", "de"],
              "tatoeba": ["de", "fr"]}


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    return raysparse.load_tokenizer(str(tiny_model_dir))


def tiny_model(tiny_model_dir, task):
    from raysparse.training.batches import build_task_model

    encoder = raysparse.load_model(str(tiny_model_dir))
    return encoder if task == "tatoeba" else build_task_model(encoder, task, seed=0)


@pytest.mark.parametrize("task", TINY_TASKS)
@pytest.mark.timeout(120)
def test_per_example_statistics_reproduce_the_reported_metric(task, tiny_model_dir, tiny_tokenizer, data_dir):
    result = evaluate(tiny_model(tiny_model_dir, task), tiny_tokenizer, task, TINY_TASKS[task], data_dir=data_dir,
                      max_examples=40, max_length=128, stride=64, verbose=False)
    print(result.table())
    metric, form = result.primary_metric, result.example_form
    assert list(result.example_stats) == TINY_TASKS[task]
    assert all(len(result.example_stats[lang]) == result.examples[lang] == 40 for lang in TINY_TASKS[task])
    estimates = point_estimates(form, result.example_stats)
    for language in [*TINY_TASKS[task], "avg", "worst"]:
        reported = result.metrics[metric_key(task, language, metric)]
        if task == "mlqa":   # a mean of float F1s: summed in another order
            assert estimates[language] == pytest.approx(reported, abs=1e-12)
        else:
            assert estimates[language] == reported, language
        low, high = result.interval(language)
        assert result.metrics[f"ci95_low/{task}/{language}/{metric}"] == low and low <= high
        if language != "worst":   # the minimum of resampled metrics leans low
            assert low <= reported <= high, language
    assert f"95% interval ({metric})" in result.table().splitlines()[1]
    record = json.loads(json.dumps(result.examples_record()))
    assert record_stats(record, task).keys() == set(TINY_TASKS[task]) and record["form"] == form


@pytest.mark.timeout(300)
def test_paired_difference_on_real_evaluation_output(encoder, embedded_tokenizer, data_dir):
    """The embedded model on 200 Swahili Tatoeba pairs, whole and with 30% of its heads masked at random: scored on
    the same pairs, their paired difference is narrower than the unpaired one; a run against itself is [0, 0]."""
    mask = Mask.for_model(encoder)
    mask.kept_heads = torch.rand(mask.kept_heads.shape, generator=torch.Generator().manual_seed(0)) > 0.3
    options = dict(data_dir=data_dir, max_examples=200, verbose=False)
    whole = evaluate(encoder, embedded_tokenizer, "tatoeba", ["sw"], **options)
    masked = evaluate(encoder, embedded_tokenizer, "tatoeba", ["sw"], masks={"sw": mask}, **options)
    assert whole.example_stats != masked.example_stats
    same = paired_difference("mean", whole.example_stats, whole.example_stats)
    assert same == {"sw": (0.0, 0.0), "avg": (0.0, 0.0), "worst": (0.0, 0.0)}
    paired = paired_difference("mean", whole.example_stats, masked.example_stats)["avg"]
    unpaired = percentile_interval(pool_differences([resample("mean", whole.example_stats)],
                                                    [resample("mean", masked.example_stats, seed=1)])["avg"])
    print(f"masked minus whole: paired {paired}, unpaired {unpaired}")
    assert paired[0] <= masked.average - whole.average <= paired[1]
    assert paired[1] - paired[0] < unpaired[1] - unpaired[0]
