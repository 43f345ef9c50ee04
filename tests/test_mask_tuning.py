"""Mask tuning (Kwon et al. 2022): least-squares scales for the kept units, folded into the weights.

On the tiny encoder: the fit lowers the error it minimises (on held-out tokens too), leaves a model
that keeps everything as it was, runs through the pipeline (one-shot and iterative) and logs its
metrics, and refuses what it cannot serve with one line."""

import copy
import random

import pytest
import torch

import raysparse
from raysparse.config import RunSpec, parse
from raysparse.errors import RaysparseError
from raysparse.pruning.mask_tuning import sublayer_errors, tune_kept_units
from raysparse.runner import run_in_process
from raysparse.structure import Mask, shrink
from raysparse.tracking.runs import RunLogger

from tests.test_pipeline import tiny_spec

WORDS = {"en": ("the man", "a woman", "my friend", "the children", "our teacher", "his dog", "they", "she"),
         "de": ("der Mann", "eine Frau", "mein Freund", "die Kinder", "unser Lehrer", "sein Hund", "sie", "er")}
VERBS = {"en": ("sees", "likes", "reads", "buys", "finds", "wants"), "de": ("sieht", "mag", "liest", "kauft", "findet")}
OBJECTS = {"en": ("the book", "a house", "the red car", "some bread", "the letter", "a small garden"),
           "de": ("das Buch", "ein Haus", "das rote Auto", "etwas Brot", "den Brief", "einen kleinen Garten")}


def sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        lang = rng.choice(("en", "de"))
        out.append(f"{rng.choice(WORDS[lang])} {rng.choice(VERBS[lang])} {rng.choice(OBJECTS[lang])} "
                   f"{rng.choice(('today', 'heute', 'again', 'wieder', ''))}.".capitalize())
    return out


def batches(tokenizer, texts: list[str], size: int = 16) -> list[dict]:
    return [dict(tokenizer(texts[i:i + size], padding=True, return_tensors="pt")) for i in range(0, len(texts), size)]


@pytest.fixture()
def tiny(tiny_model_dir, one_torch_thread):
    return raysparse.load_model(str(tiny_model_dir)).eval(), raysparse.load_tokenizer(str(tiny_model_dir))


def test_tuning_lowers_the_sub_block_error_on_calibration_and_held_out_tokens(tiny):
    dense, tokenizer = tiny
    generator = torch.Generator().manual_seed(1)
    mask = Mask(torch.rand(2, 4, generator=generator) < 0.5, torch.rand(2, 64, generator=generator) < 0.5)
    mask.kept_heads[:, 0] = True   # at least one head per layer
    untuned = shrink(copy.deepcopy(dense), mask)
    tuned = copy.deepcopy(untuned)

    report = tune_kept_units(tuned, dense, batches(tokenizer, sentences(192, seed=0)))
    held_out = batches(tokenizer, sentences(64, seed=1))
    before, after = sublayer_errors(untuned, dense, held_out), sublayer_errors(tuned, dense, held_out)
    for block in ("attention", "ffn"):
        assert sorted(report[block]) == [0, 1]
        for layer, row in report[block].items():
            assert row["accepted"] == 1.0
            assert row["error_after"] < row["error_before"], (block, layer)
            assert after[block][layer] < before[block][layer], (block, layer)
    assert not torch.equal(tuned.encoder.layer[0].output.dense.weight, untuned.encoder.layer[0].output.dense.weight)
    assert tuned.encoder.layer[0].output.dense.weight.shape == untuned.encoder.layer[0].output.dense.weight.shape


def test_a_mask_that_keeps_everything_keeps_scales_at_one_and_outputs_unchanged(tiny):
    dense, tokenizer = tiny
    model = shrink(copy.deepcopy(dense), Mask.for_model(dense))
    report = tune_kept_units(model, dense, batches(tokenizer, sentences(64, seed=2)))
    for rows in report.values():
        for row in rows.values():
            assert row["scale_min"] == pytest.approx(1.0, abs=1e-4) and row["scale_max"] == pytest.approx(1.0, abs=1e-4)
            assert row["error_before"] < 1e-4
    batch = batches(tokenizer, sentences(8, seed=3))[0]
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).last_hidden_state, dense(**batch).last_hidden_state, atol=1e-5, rtol=0)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule", [{}, {"schedule": "iterative", "iterations": 2}])
def test_the_pipeline_tunes_after_every_shrink_and_logs_the_errors(schedule, tiny_model_dir, tmp_path, monkeypatch):
    logged: list[tuple[dict, int | None]] = []
    monkeypatch.setattr(RunLogger, "metrics", lambda self, values, step=None: logged.append((dict(values), step)))
    spec = {**tiny_spec(tiny_model_dir, "mask-tuning", mask_tuning={"enabled": True, "examples": 32}, **schedule),
            "storage": str(tmp_path)}
    pipeline = run_in_process(spec)

    rounds = [(values, step) for values, step in logged if "mask_tuning/error_before" in values]
    assert [step for _, step in rounds] == list(range(1, schedule.get("iterations", 1) + 1))
    first = rounds[0][0]
    assert first["mask_tuning/error_after"] < first["mask_tuning/error_before"]
    assert {"mask_tuning/attention/0/error_before", "mask_tuning/ffn/1/error_after"} <= set(first)
    metrics = pipeline.state.metrics
    assert metrics["mask_tuning/error_after"] == rounds[-1][0]["mask_tuning/error_after"]
    assert "xnli/avg/accuracy" in metrics


@pytest.mark.parametrize("pruning,recovery,message", [
    ({"mask_tuning": {"enabled": True, "examples": 0}}, {}, "pruning.mask_tuning.examples: "),
    ({"mask_tuning": {"enabled": True, "damping": -0.1}}, {}, "pruning.mask_tuning.damping: "),
    ({"mask_tuning": {"enabled": True, "bogus": 1}}, {}, "pruning.mask_tuning.bogus: unknown key"),
    ({"mask_tuning": {"enabled": True}, "setting": "per-language"}, {}, "pruning.mask_tuning: per-language masks"),
    ({"mask_tuning": {"enabled": True}, "schedule": "dynamic"}, {}, "pruning.mask_tuning: the dynamic schedule"),
    ({"mask_tuning": {"enabled": True}}, {"shrink": False}, "pruning.mask_tuning: rescales the physically shrunk"),
])
def test_a_bad_mask_tuning_config_fails_in_one_line(pruning, recovery, message):
    spec = tiny_spec("unused", **pruning)
    spec["recovery"].update(recovery)
    with pytest.raises(RaysparseError) as error:
        parse(RunSpec, spec)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_prune_tune_masks_flag_enables_it_in_the_spec(capsys):
    import yaml

    from raysparse.cli import main

    assert main(["prune", "--tune-masks", "--languages", "de,fr", "--print-spec"]) == 0
    spec = parse(RunSpec, yaml.safe_load(capsys.readouterr().out))
    assert spec.pruning.mask_tuning.enabled and spec.recovery.steps == 0
    assert not raysparse.prune_spec().pruning.mask_tuning.enabled
