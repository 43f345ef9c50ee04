"""Dynamic Sparsification on Ray Train: one run, the whole curve (real Ray, real MLflow, real data)."""


import pytest

import raysparse
from raysparse.config import RunSpec, parse
from raysparse.errors import RaysparseError
from raysparse.tracking.runs import spec_key

LANGS = ["de", "fr", "ru"]
GRID = [0.0, 0.3, 0.6]


def tiny_dynamic_spec(tracking_uri, storage):
    return {
        "name": "test-dynamic",
        "data": {"task": "tatoeba", "languages": LANGS, "max_train_examples": 32, "max_eval_examples": 30,
                 "max_length": 32},
        "finetune": {"steps": 2, "batch_size": 8},
        "pruning": {"algorithm": "gradient", "schedule": "dynamic", "sparsity": 0.3, "scoring_examples": 8},
        "dynamic": {"grid": GRID, "samples_per_step": 1, "steps": 3, "distill": True},
        "efficiency": {"batch_sizes": [1], "repeats": 2, "warmup": 1, "sequence_length": 16},
        "resources": {"num_workers": 1, "checkpoint_every": 50},
        "tracking": {"uri": tracking_uri, "experiment": "test-dynamic"},
        "storage": str(storage),
    }


@pytest.mark.timeout(900)
def test_one_dynamic_run_reports_the_whole_curve(ray_local, tracking_server, tmp_path, embedded_dir):
    import mlflow
    from ray import tune

    from raysparse.dynamic import dynamic_trainable
    from raysparse.structure import load_dynamic, measure, save_pruned, shrink_to
    from raysparse.training.dynamic import copy_sharing_embeddings
    from raysparse.training.evaluate import evaluate

    spec = tiny_dynamic_spec(tracking_server, tmp_path / "runs")
    tuner = tune.Tuner(tune.with_resources(dynamic_trainable, {"cpu": 0.25}), param_space={"spec": spec},
                       run_config=tune.RunConfig(name="ds", storage_path=str(tmp_path / "tune"), verbose=0))
    [result] = list(tuner.fit())
    assert result.error is None, result.error
    metrics = result.metrics
    keys = [f"{level:g}" for level in GRID]
    for key in keys:                                   # every level: every language, avg and worst
        for lang in [*LANGS, "avg", "worst"]:
            assert 0.0 <= metrics[f"level/{key}/tatoeba/{lang}/accuracy"] <= 1.0
        assert f"level/{key}/latency/b1_ms" in metrics and f"level/{key}/bytes" in metrics
    params = [metrics[f"level/{key}/params/total"] for key in keys]
    encoder = [metrics[f"level/{key}/params/encoder"] for key in keys]
    sparsity = [metrics[f"level/{key}/encoder_sparsity"] for key in keys]
    assert params == sorted(params, reverse=True) and len(set(params)) == len(params), params
    assert encoder == sorted(encoder, reverse=True) and len(set(encoder)) == len(encoder), encoder
    assert sparsity[0] == 0.0 and sparsity[1] == pytest.approx(0.283, abs=0.01) and sparsity[2] == pytest.approx(0.594, abs=0.01)
    assert metrics["tatoeba/avg/accuracy"] == metrics["level/0.3/tatoeba/avg/accuracy"], "headline = level nearest 0.3"
    assert metrics["level/0/tatoeba/avg/accuracy"] > 0.5, "the full model must still retrieve"

    client = mlflow.MlflowClient(tracking_server)
    key = spec_key(parse(RunSpec, spec).model_dump())
    [run] = client.search_runs([client.get_experiment_by_name("test-dynamic").experiment_id],
                               filter_string=f"tags.`raysparse.run_key` = '{key}'")
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "curve/tatoeba/avg/accuracy")
    assert sorted((m.step, m.value) for m in history) == [(round(100 * level), metrics[f"level/{k}/tatoeba/avg/accuracy"])
                                                          for level, k in zip(GRID, keys)]
    sizes = client.get_metric_history(run.info.run_id, "curve/params/total")
    assert sorted(m.step for m in sizes) == [0, 30, 60]
    files = {f.path for f in client.list_artifacts(run.info.run_id, "results")}
    assert {"results/curve.png", "results/curve.json", "results/curve.txt"} <= files, files
    assert "model/dynamic/raysparse.json" in {f.path for f in client.list_artifacts(run.info.run_id, "model/dynamic")}

    # one checkpoint serves every size: slice each level, save, load it like any shrunk model, evaluate it
    local = client.download_artifacts(run.info.run_id, "model/dynamic", str(tmp_path / "download"))
    full = load_dynamic(local)
    tokenizer = raysparse.load_tokenizer(local)
    for level, k in zip(GRID, keys):
        small = shrink_to(copy_sharing_embeddings(full), level)
        loaded = raysparse.load_model(str(save_pruned(small, tmp_path / f"level-{k}")))
        assert measure(loaded.encoder).total_params == metrics[f"level/{k}/params/total"]
        again = evaluate(loaded, tokenizer, "tatoeba", ["de"], max_examples=30, seed=0, train_fraction=0.5,
                         max_length=32, verbose=False)   # as the run evaluates: at its data.max_length
        assert again.metrics["tatoeba/de/accuracy"] == pytest.approx(metrics[f"level/{k}/tatoeba/de/accuracy"], abs=1e-9)


BAD = [
    ({"dynamic": {"grid": [0.2, 0.5]}}, "dynamic.grid: expected the full model (0) as the first level"),
    ({"dynamic": {"grid": [0.0, 0.6, 0.3]}}, "dynamic.grid: expected increasing levels without repeats"),
    ({"dynamic": {"grid": [0.0, 1.0]}}, "dynamic.grid: expected numbers in [0, 1), got 1.0"),
    ({"dynamic": {"samples": 2}}, "dynamic.samples: unknown key (expected one of: grid, samples_per_step"),
    ({"pruning": {"schedule": "dynamic", "setting": "per-language"}}, "pruning.setting: the dynamic schedule"),
    ({"pruning": {"schedule": "dynamic", "algorithm": "layerdrop"}}, "pruning.algorithm: the dynamic schedule"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("data,expected", BAD)
def test_bad_dynamic_sections_fail_in_one_line(data, expected):
    with pytest.raises(RaysparseError) as info:
        parse(RunSpec, data)
    message = str(info.value)
    assert expected in message and "\n" not in message


@pytest.mark.timeout(60)
def test_sandwich_sampling_and_separate_specs():
    from raysparse.dynamic import separate_spec
    from raysparse.training.dynamic import nearest_level, sample_levels

    grid = [round(0.1 * i, 1) for i in range(10)]
    seen = set()
    for step in range(50):
        levels = sample_levels(grid, 2, seed=0, step=step)
        assert levels[0] == 0.0 and levels[-1] == 0.9 and len(levels) == 4 and len(set(levels)) == 4
        assert levels == sample_levels(grid, 2, seed=0, step=step), "seeded by step (a resumed run sees the same)"
        seen.update(levels)
    assert seen == set(grid)
    assert sample_levels([0.0], 3, 0, 0) == [0.0] and sample_levels([0.0, 0.5], 3, 0, 0) == [0.0, 0.5]
    assert nearest_level(grid, 0.34) == 0.3

    spec = parse(RunSpec, {"pruning": {"schedule": "dynamic"}, "dynamic": {"steps": 7, "distill": True}})
    separate = separate_spec(spec, 0.4)
    assert separate.pruning.schedule == "one-shot" and separate.pruning.sparsity == 0.4
    assert separate.recovery.steps == 7 and separate.recovery.distillation.enabled
    assert separate.finetune == spec.finetune and separate.data == spec.data
