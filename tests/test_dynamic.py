"""Dynamic Sparsification on Ray Train: one run, the whole curve, and `--compare` with separate runs (real Ray,
real MLflow, real data); a stopped DS run resuming exactly (in-process, the stages Ray Train workers run)."""


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

    spec = parse(RunSpec, {"pruning": {"schedule": "dynamic"}, "dynamic": {"steps": 7, "distill": True, "dropout": True}})
    separate = separate_spec(spec, 0.4)
    assert separate.pruning.schedule == "one-shot" and separate.pruning.sparsity == 0.4
    assert separate.recovery.steps == 7 and separate.recovery.distillation.enabled and separate.recovery.dropout
    assert not separate_spec(parse(RunSpec, {"pruning": {"schedule": "dynamic"}}), 0.4).recovery.dropout
    assert separate.finetune == spec.finetune and separate.data == spec.data


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sampling", [{}, {"sampling": "per-layer", "drop_layers_max": 1}], ids=["uniform", "per-layer"])
def test_a_stopped_ds_run_is_rewired_before_its_weights_load_and_resumes_exactly(sampling, tiny_model_dir, tmp_path,
                                                                                 one_torch_thread):
    """Stopped in the middle of DS training, the run resumes from its checkpoint: the restored model is rewired
    before the checkpoint's (rewired) weights load, so it holds exactly the weights the stopped run held, and it
    ends where an uninterrupted run ends (weights and every level's quality); per-layer sampling draws the same
    sub-networks on every step."""
    from raysparse.runner import as_spec, preflight
    from raysparse.structure import is_rewired
    from raysparse.structure.rewire import dynamic_info
    from raysparse.training.pipeline import build_pipeline
    from raysparse.training.session import LocalSession
    from tests.test_pipeline import Interrupt, assert_same_weights
    from tests.test_subnetworks import ds_spec

    data = ds_spec(tiny_model_dir, tmp_path / "runs", steps=3, **sampling)
    data["resources"]["checkpoint_every"] = 1
    spec = as_spec(data)
    languages = preflight(spec)
    straight = build_pipeline(spec, languages, LocalSession(), storage=str(tmp_path / "runs"))
    straight.execute()
    first = build_pipeline(spec, languages, LocalSession(tmp_path / "ckpt"), storage=str(tmp_path / "runs"))
    first.finetune(), first.prune()
    first.observers.append(Interrupt(after=2))
    with pytest.raises(Interrupt.Killed):
        first.recover()

    resumed = build_pipeline(spec, languages, LocalSession(tmp_path / "ckpt"), storage=str(tmp_path / "runs"))
    assert (resumed.state.stage, resumed.state.step) == ("recover", 2)
    assert is_rewired(resumed.model) and dynamic_info(resumed.model)["grid"] == spec.dynamic.grid
    assert_same_weights(first.model, resumed.model, atol=0)   # rewired after the load, they would be permuted twice
    resumed.execute()
    assert_same_weights(straight.model, resumed.model, atol=1e-6)
    curve = {k: v for k, v in straight.state.metrics.items() if k.startswith("level/") and "/tatoeba/" in k}
    assert curve and {k: resumed.state.metrics[k] for k in curve} == pytest.approx(curve, abs=1e-9)


def pixels_of(image, hex_colour: str) -> int:
    """How many pixels of an RGB(A) float image are (nearly) ``hex_colour``."""
    import numpy as np

    rgb = np.array([int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(image[..., :3] - rgb).max(axis=-1) < 0.02).sum())


@pytest.mark.timeout(600)
def test_run_compare_prints_both_curves_plots_them_and_logs_the_comparison(ray_local, tracking_server, tmp_path,
                                                                           tiny_model_dir, capsys):
    """`raysparse run DS_SPEC --compare --plot FILE`: the DS run (its curve printed), then every level of the grid
    as a separate run (one-shot prune to the level, as many recovery steps as DS steps, distilled as DS distils),
    both curves and the wall times printed, the PNG written with both curves, and the same comparison logged
    to the DS run in MLflow, its numbers those of the runs it compares (read back from MLflow)."""
    import json
    from pathlib import Path

    import mlflow
    import yaml
    from matplotlib.image import imread

    from raysparse.cli import main

    grid = [0.0, 0.5]
    spec = {"name": "compare", "model": {"source": str(tiny_model_dir)},
            "data": {"task": "tatoeba", "languages": ["de"], "max_train_examples": 16, "max_eval_examples": 20,
                     "max_length": 24},
            "finetune": {"steps": 1, "batch_size": 8},
            "pruning": {"algorithm": "gradient", "schedule": "dynamic", "sparsity": 0.5, "scoring_examples": 8},
            "dynamic": {"grid": grid, "samples_per_step": 0, "steps": 2, "distill": True},
            "efficiency": {"latency": False}, "resources": {"num_workers": 1, "checkpoint_every": 50},
            "tracking": {"uri": tracking_server, "experiment": "test-compare", "log_models": "none"},
            "storage": str(tmp_path / "runs")}
    path, png = tmp_path / "compare.yaml", tmp_path / "ds-vs-separate.png"
    path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(path), "--compare", "--plot", str(png)]) == 0
    printed = capsys.readouterr().out

    client = mlflow.MlflowClient(tracking_server)
    runs = client.search_runs([client.get_experiment_by_name("test-compare").experiment_id])
    by_schedule = {}
    for run in runs:
        assert run.info.status == "FINISHED"
        by_schedule.setdefault(run.data.params["pruning.schedule"], []).append(run)
    [ds] = by_schedule.pop("dynamic")
    separate = {float(run.data.params["pruning.sparsity"]): run for run in by_schedule.pop("one-shot")}
    assert not by_schedule and sorted(separate) == grid
    for level, run in separate.items():
        params = run.data.params
        assert (params["recovery.steps"], params["recovery.distillation.enabled"]) == ("2", "True"), params
        assert run.data.metrics["encoder_sparsity"] == pytest.approx(level, abs=0.01)

    local = client.download_artifacts(ds.info.run_id, "compare/comparison.json", str(tmp_path / "compare"))
    logged = json.loads(Path(local).read_text())
    ds_curve = {m.step: m.value for m in client.get_metric_history(ds.info.run_id, "curve/tatoeba/avg/accuracy")}
    assert [row["level"] for row in logged["rows"]] == grid
    for row in logged["rows"]:
        assert row["ds"] == ds_curve[round(100 * row["level"])]
        assert row["separate"] == separate[row["level"]].data.metrics["tatoeba/avg/accuracy"]
        assert row["separate_seconds"] > 0
    assert ds.data.metrics["compare/time_ratio"] == pytest.approx(logged["time_ratio"]) and logged["time_ratio"] > 0

    assert "tatoeba accuracy at every level of one Dynamic Sparsification run" in printed   # the DS curve
    table = printed[printed.index("one DS run vs a separate run per level"):]
    for row in logged["rows"]:
        line = next(line for line in table.splitlines()[2:] if line.split()[0] == f"{row['level']:g}")
        assert line.split()[3:5] == [f"{row['ds']:.3f}", f"{row['separate']:.3f}"], line
    assert "wall time: DS" in table and "ratio" in table and f"wrote {png}" in printed

    image = imread(png)
    assert image.shape[:2] == (480, 720)
    assert pixels_of(image, "#4c72b0") > 100 and pixels_of(image, "#c44e52") > 100, "both curves are drawn"
