"""Latency tables and pruning to a latency budget (docs/efficiency.md).

The table is measured on the tiny encoder at batch 8 x 128 tokens, where its attention costs
milliseconds and timing is stable enough to order and check predictions (at batch 1 a forward of
the tiny model is mostly Python overhead: dense and fully pruned differ by 1.7x at most)."""

import copy
import statistics

import numpy as np
import pytest
import torch

import raysparse
from raysparse.config import RunSpec, parse
from raysparse.efficiency.latency import fixed_threads, ratio_interval, time_rounds
from raysparse.efficiency.latency_table import LatencyTable, increasing, standard_masks
from raysparse.errors import RaysparseError
from raysparse.pruning import Selection, UnitScores, select_to_latency
from raysparse.runner import run_in_process
from raysparse.structure import Mask, shrink

BATCH, LENGTH = 8, 128


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return raysparse.load_model(str(tiny_model_dir)).eval()


@pytest.fixture(scope="module")
def table(tiny):
    return LatencyTable.build(tiny, BATCH, LENGTH, threads=1, rounds=10)


def synthetic(layers=12, heads=12, neurons=1536, head_ms=0.2, neuron_ms=0.002, fixed=1.0, empty=0.3):
    """A table with known numbers: every head costs ``head_ms``, every neuron ``neuron_ms``."""
    grid = [round(neurons * k / 16) for k in range(17)]
    return LatencyTable((layers, heads, neurons), 1, 128, "float32", "cpu", 1, [h * head_ms for h in range(heads + 1)],
                        grid, [n * neuron_ms for n in grid], empty, fixed)


def test_predictions_are_positive_and_fall_with_the_units_kept(table, tiny):
    assert table.shape == (2, 4, 64) and table.neurons[0] == 0 and table.neurons[-1] == 64
    assert table.environment["threads"] == 1 and table.environment["dtype"] == "float32"
    assert all(b >= a for a, b in zip(table.attention_ms, table.attention_ms[1:]))
    assert all(b >= a for a, b in zip(table.ffn_ms, table.ffn_ms[1:]))
    masks = standard_masks(table.shape)
    chain = [table.dense_ms(), *(table.predict(masks[f"uniform {s}%"]) for s in (25, 50, 75))]
    assert all(value > 0 for value in chain)
    assert all(later <= earlier for earlier, later in zip(chain, chain[1:]))
    assert chain[-1] < chain[0]   # 1 of 4 heads and 16 of 64 neurons against all: clearly less
    shrunk = shrink(copy.deepcopy(tiny), masks["uniform 50%"])   # a live shrunk model predicts as its mask
    assert table.predict(shrunk) == pytest.approx(table.predict(masks["uniform 50%"]))
    assert table.predict(([4, 4], [64, 64])) == pytest.approx(table.dense_ms())
    dropped = Mask.full(*table.shape)
    dropped.kept_layers[1] = False   # a dropped layer costs nothing
    assert table.predict(dropped) == pytest.approx(table.dense_ms() - table.layer_latency(4, 64))
    with pytest.raises(RaysparseError, match="latency table"):
        table.predict(([5, 4], [64, 64]))
    # calibrated on the dense model timed in the same rounds: every layer cost scaled alike
    assert "dense" in table.measured_ms and table.layer_scale > 0
    assert table.layer_latency(2, 32) == pytest.approx(table.layer_scale * (
        table.layer_ms + table.attention_ms[2] + float(np.interp(32, table.neurons, table.ffn_ms))))


def test_a_table_saves_loads_and_is_measured_once_per_environment(table, tiny, tmp_path, monkeypatch):
    path = table.save(tmp_path / "table.json")
    loaded = LatencyTable.load(path)
    assert loaded == table and loaded.origin == str(path)
    uneven = standard_masks(table.shape)["non-uniform"]
    assert loaded.predict(uneven) == table.predict(uneven)
    with pytest.raises(RaysparseError, match="latency table"):
        LatencyTable.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"format": 1, "shape": [2, 4]}')
    with pytest.raises(RaysparseError, match="latency table"):
        LatencyTable.load(tmp_path / "bad.json")

    first = LatencyTable.cached(tiny, 2, 16, threads=1, cache=tmp_path / "cache", rounds=2, warmup=0)
    assert (tmp_path / "cache" / f"{first.key}.json").is_file() and first.origin == "measured"
    monkeypatch.setattr(LatencyTable, "build", classmethod(lambda cls, *a, **k: pytest.fail("measured again")))
    again = LatencyTable.cached(tiny, 2, 16, threads=1, cache=tmp_path / "cache", rounds=2, warmup=0)
    assert again == first and again.origin.endswith(f"{first.key}.json")
    assert LatencyTable.key_for(tiny, 4, 16, None, "cpu", 1, 16, 2, 0) != first.key   # another batch size


def test_a_table_in_another_dtype_leaves_the_model_as_it_was(tiny):
    bf16 = LatencyTable.build(tiny, 2, 16, dtype="bfloat16", threads=1, rounds=2, warmup=0)
    assert bf16.dtype == "bfloat16" and bf16.environment["dtype"] == "bfloat16"
    assert next(tiny.parameters()).dtype == torch.float32 and len(tiny.encoder.layer) == 2


def test_isotonic_fit_makes_costs_non_decreasing():
    assert increasing([0, 2, 1, 3]) == [0, 1.5, 1.5, 3]
    assert increasing([0, -1, 2]) == [-0.5, -0.5, 2]


def test_the_selected_mask_fits_the_target_with_the_fewest_removals():
    table = synthetic()
    generator = torch.Generator().manual_seed(0)
    scores = UnitScores(torch.rand(12, 12, generator=generator), torch.rand(12, 1536, generator=generator))
    dense = table.dense_ms()
    for speedup in (1.1, 1.5, 2.0, 3.0):
        target = dense / speedup
        mask = select_to_latency(scores, table, target)
        predicted = table.predict(mask)
        assert predicted <= target
        assert predicted > target - table.unit_ms()[0] - 1e-9   # no more removed than needed (a head at most)
    assert select_to_latency(scores, table, dense * 2) == Mask.full(12, 12, 1536)
    with pytest.raises(RaysparseError, match="pruning.latency_target"):
        select_to_latency(scores, table, table.fixed_ms + 12 * table.layer_ms - 0.01)

    base = Mask.full(12, 12, 1536)
    base.kept_heads[0, :3] = False   # an earlier round removed these: they stay removed
    kept = select_to_latency(scores, table, dense / 1.2, Selection(min_heads_per_layer=2), base)
    assert not kept.kept_heads[0, :3].any() and bool((kept.kept_heads.sum(dim=1) >= 2).all())


def test_units_are_ranked_by_importance_per_millisecond():
    scores = UnitScores(torch.ones(12, 12), torch.ones(12, 1536))   # every unit equally important
    expensive_heads = synthetic(head_ms=1.0, neuron_ms=0.0001)
    mask = select_to_latency(scores, expensive_heads, expensive_heads.dense_ms() * 0.8)
    assert mask.kept_neurons.all() and not mask.kept_heads.all()   # heads cost most per unit of importance
    expensive_neurons = synthetic(head_ms=0.001, neuron_ms=0.01)
    mask = select_to_latency(scores, expensive_neurons, expensive_neurons.dense_ms() * 0.8)
    assert mask.kept_heads.all() and not mask.kept_neurons.all()


@pytest.mark.parametrize("pruning,message", [
    ({"latency_target": {}}, "pruning.latency_target: expected exactly one of ms or speedup"),
    ({"latency_target": {"ms": 5, "speedup": 2}}, "pruning.latency_target: expected exactly one of ms or speedup"),
    ({"latency_target": {"speedup": 2}, "sparsity": 0.3}, "pruning.sparsity: a latency target decides"),
    ({"latency_target": {"speedup": 2}, "schedule": "gradual"}, "pruning.latency_target: selection to a latency"),
    ({"latency_target": {"speedup": 2}, "algorithm": "l0"}, "pruning.latency_target: 'l0' decides its mask"),
    ({"latency_target": {"speedup": 2}, "setting": "per-language"}, "pruning.latency_target: per-language"),
    ({"latency_target": {"speedup": 2}, "scope": "per-layer"}, "pruning.scope: a latency target"),
    ({"latency_target": {"speedup": 2}, "head_ratio": 0.6}, "pruning.head_ratio: a latency target ranks heads"),
    ({"head_ratio": 0.6, "schedule": "dynamic"}, "pruning.head_ratio: the dynamic schedule's levels"),
    ({"head_ratio": 0.6, "algorithm": "l0"}, "pruning.head_ratio: 'l0' decides its mask itself"),
    ({"head_ratio": 2.5}, "pruning.head_ratio: 2.5 at sparsity 0.5 removes more than every head"),
])
def test_a_latency_target_or_head_ratio_is_refused_where_selection_cannot_honour_it(pruning, message):
    with pytest.raises(RaysparseError, match=message.replace("(", r"\(")):
        parse(RunSpec, {"pruning": pruning})
    assert raysparse.prune_spec(speedup=1.5).pruning.latency_target.speedup == 1.5


def test_the_prune_command_takes_a_latency_budget(capsys):
    import yaml

    from raysparse.cli import main

    assert main(["prune", "--speedup", "1.5", "--print-spec"]) in (None, 0)
    printed = parse(RunSpec, yaml.safe_load(capsys.readouterr().out))
    assert printed.pruning.latency_target.speedup == 1.5 and printed.pruning.latency_target.ms is None
    assert main(["prune", "--latency-ms", "40", "--print-spec"]) in (None, 0)
    assert parse(RunSpec, yaml.safe_load(capsys.readouterr().out)).pruning.latency_target.ms == 40
    assert main(["prune", "--speedup", "1.5", "--sparsity", "0.3", "--print-spec"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: pruning.sparsity: a latency target") and len(err.splitlines()) == 1


@pytest.mark.timeout(300)
def test_a_run_with_a_speedup_target_meets_its_budget(tiny_model_dir, tmp_path):
    spec = {"name": "latency-target", "model": {"source": str(tiny_model_dir)},
            "data": {"task": "xnli", "languages": ["en", "de"], "max_train_examples": 32, "max_eval_examples": 16,
                     "max_length": 32},
            "finetune": {"steps": 2, "batch_size": 8, "learning_rate": 1e-3},
            "pruning": {"algorithm": "gradient", "scoring_examples": 16,
                        "latency_target": {"speedup": 1.5, "batch_size": BATCH, "table": str(tmp_path / "tables")}},
            "recovery": {"steps": 2, "learning_rate": 1e-3},
            "efficiency": {"latency": True, "batch_sizes": [BATCH], "sequence_length": LENGTH, "threads": 1},
            "resources": {"checkpoint_every": 50},
            "tracking": {"log_models": "none"}, "storage": str(tmp_path / "runs")}
    pipeline = run_in_process(spec)
    metrics, mask = pipeline.state.metrics, pipeline.state.masks["shared"]
    table = LatencyTable.load(next((tmp_path / "tables").glob("*.json")))
    assert metrics["latency/target_ms"] == pytest.approx(table.dense_ms() / 1.5)
    assert metrics["latency/predicted_ms"] == pytest.approx(table.predict(mask))
    assert metrics["latency/predicted_ms"] <= metrics["latency/target_ms"]
    assert f"latency/pruned/b{BATCH}_ms" in metrics and mask != Mask.full(*table.shape)

    # Timed again, interleaved: the budget on the clock is the dense model's measured time / 1.5. Rounds
    # vary (a shared machine), so the pruned model meets it when its fastest decile is within the
    # dense model's slowest decile / 1.5, and its speedup's bootstrap interval reaches 1.5 / (1 + that spread).
    dense = raysparse.load_model(str(tiny_model_dir)).eval()
    pruned = shrink(copy.deepcopy(dense), mask).eval()
    with fixed_threads(1):
        times = time_rounds({"dense": dense, "pruned": pruned}, BATCH, LENGTH, rounds=30, warmup=3)

    def decile(values, q):
        return sorted(values)[round(q * (len(values) - 1))]

    assert decile(times["pruned"], 0.1) <= decile(times["dense"], 0.9) / 1.5
    spread = decile(times["dense"], 0.9) / decile(times["dense"], 0.1)
    ratio, low, high = ratio_interval(times["dense"], times["pruned"])
    assert high >= 1.5 / spread, (ratio, low, high, spread, statistics.median(times["pruned"]))
