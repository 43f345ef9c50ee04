"""Sub-networks with a width per layer: per-layer sampling in Dynamic Sparsification, slicing against
masking, the search without retraining, and the one-line errors of bad input. In-process, tiny models."""

import copy
import json

import pytest
import torch
from transformers import BertConfig, BertModel

import raysparse
from raysparse.config import RunSpec, parse
from raysparse.errors import RaysparseError
from raysparse.search.subnetworks import SubnetworkSearchResult
from raysparse.structure import (Encoder, Subnetwork, apply_mask, load_dynamic, measure, rewire, save_dynamic,
                                 save_pruned, shrink_subnetwork, structure_of, subnetwork_mask, subnetwork_slices)
from raysparse.structure.subnetwork import Costs, read_subnetwork
from raysparse.training.dynamic import sample_levels, sample_subnetworks
from tests.test_rewire import FAMILIES, forward_backward, hidden, inputs, random_scores, tiny

def one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.timeout(60)
def test_per_layer_sampling_is_seeded_within_bounds_and_differs_between_layers():
    shape, smallest = (12, 12, 1536), (5, 615)
    seen_drops, different_layers = set(), 0
    for step in range(40):
        subs = sample_subnetworks(shape, smallest, 2, seed=3, step=step, drop_layers_max=2)
        assert subs == sample_subnetworks(shape, smallest, 2, seed=3, step=step, drop_layers_max=2), \
            "a pure function of (seed, step): a resumed run draws the same"
        assert len(subs) == 2
        for sub in subs:
            kept = sub.kept_layers
            assert 10 <= len(kept) <= 12
            seen_drops.add(12 - len(kept))
            assert all(5 <= sub.heads[i] <= 12 and 615 <= sub.neurons[i] <= 1536 for i in kept)
            assert all(sub.heads[i] == sub.neurons[i] == 0 for i in range(12) if i not in kept)
            different_layers += len({sub.heads[i] for i in kept}) > 1 and len({sub.neurons[i] for i in kept}) > 1
    assert different_layers == 80, "each layer draws its own width"
    assert seen_drops == {0, 1, 2}
    assert sample_subnetworks(shape, smallest, 2, 3, 0) != sample_subnetworks(shape, smallest, 2, 3, 1)
    assert sample_subnetworks(shape, smallest, 2, 3, 0) != sample_subnetworks(shape, smallest, 2, 4, 0)
    assert all(sub.layers is None for step in range(20) for sub in sample_subnetworks(shape, smallest, 2, 0, step))
    assert all(len(sub.kept_layers) == 1 for sub in sample_subnetworks((2, 4, 8), (1, 1), 30, 0, 0, drop_layers_max=5)
               if sub.layers is not None), "never every layer dropped"
    # the uniform sampler is untouched by the new option
    assert sample_levels([0.0, 0.3, 0.6, 0.9], 1, 0, 5) == sample_levels([0.0, 0.3, 0.6, 0.9], 1, 0, 5)


def test_per_layer_training_samples_spread_over_the_whole_latency_range():
    """With dynamic.per_layer_spread (the default) the super-network trains sub-networks at every cost,
    each non-uniform; of 100 with independent per-layer draws (spread None), none is in the outer fifths."""
    import statistics

    shape, smallest = (12, 12, 1536), (2, 231)

    def widths(spread):
        return [statistics.mean((n - 231) / (1536 - 231) for n in sub.neurons)
                for step in range(50) for sub in sample_subnetworks(shape, smallest, 2, 0, step, spread=spread)]

    spread, independent = widths(0.25), widths(None)
    assert min(spread) < 0.15 and max(spread) > 0.85, (min(spread), max(spread))
    ends = lambda values: sum(w < 0.2 or w > 0.8 for w in values)   # noqa: E731
    assert ends(spread) >= 20 and ends(independent) == 0, (ends(spread), ends(independent))
    subs = [sub for step in range(50) for sub in sample_subnetworks(shape, smallest, 2, 0, step, spread=0.25)]
    assert subs == [sub for step in range(50) for sub in sample_subnetworks(shape, smallest, 2, 0, step, spread=0.25)]
    assert all(2 <= h <= 12 for sub in subs for h in sub.heads) and all(231 <= n <= 1536 for sub in subs
                                                                       for n in sub.neurons)
    assert sum(len(set(sub.neurons)) > 1 for sub in subs) >= 95, "non-uniform: layers stray from the width"


def test_the_search_starts_spread_over_the_whole_latency_range():
    """Independent per-layer draws average near the middle; the start must reach both ends, stay
    non-uniform, stay within the bounds and be seeded."""
    import statistics

    from raysparse.search.subnetworks import spread_start

    shape, low = (12, 12, 1536), (4, 461)
    subs = spread_start(shape, *low, count=17, seed=0)
    assert subs == spread_start(shape, *low, count=17, seed=0) != spread_start(shape, *low, count=17, seed=1)
    widths = [statistics.mean((h - 4) / 8 for h in sub.heads) for sub in subs]
    assert min(widths) < 0.15 and max(widths) > 0.85, widths
    assert all(4 <= h <= 12 for sub in subs for h in sub.heads) and all(461 <= n <= 1536 for sub in subs for n in sub.neurons)
    assert all(len(set(sub.neurons)) > 1 for sub in subs), "non-uniform: every layer strays from the width"
    assert all(sub.kept_layers == tuple(range(12)) for sub in subs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model_cls,config_cls", FAMILIES)
def test_slicing_a_subnetwork_equals_masking_the_super_network(model_cls, config_cls):
    model, batch = tiny(model_cls, config_cls), inputs()
    original = copy.deepcopy(model)
    rewire(model, random_scores(model))
    for sub in (Subnetwork([6, 2, 4], [40, 7, 1]), Subnetwork([3, 5, 1], [9, 40, 22], layers=[0, 2]),
                Subnetwork([1, 6, 2], [3, 12, 40], layers=[1])):
        mask = subnetwork_mask(model, sub)
        assert mask.kept_layers.tolist() == [i in sub.kept_layers for i in range(3)]
        with apply_mask(original, mask):      # the unrewired model, masked in original coordinates
            masked = hidden(original, batch)
        with apply_mask(model, mask):
            torch.testing.assert_close(hidden(model, batch), masked, atol=1e-5, rtol=0)
        with subnetwork_slices(model, sub):
            sliced = hidden(model, batch)
        torch.testing.assert_close(sliced, masked, atol=1e-5, rtol=0)
        assert len(Encoder(model).layers) == 3 and all("forward" not in vars(m) for m in model.modules()), \
            "the slices outlived the block"
        small = shrink_subnetwork(copy.deepcopy(model), sub)
        torch.testing.assert_close(hidden(small, batch), masked, atol=1e-5, rtol=0)
        assert structure_of(small).to_mask() == mask
        assert Encoder(small).heads_per_layer() == [sub.heads[i] for i in sub.kept_layers]
        size, costs = measure(small), Costs.of(model)
        assert (costs.params(sub), costs.bytes(sub)) == (size.total_params, size.bytes)
        assert costs.encoder_sparsity(sub) == pytest.approx(size.encoder_sparsity)
        assert costs.flops(sub) == size.flops_per_sequence


@pytest.mark.timeout(60)
def test_a_sliced_subnetwork_trains_the_shared_weights_as_gates_would():
    """Per-layer sampling trains through the slices: the gradients of the kept layers are the gated ones."""
    from raysparse.structure import UnitGates, attach_gates
    from raysparse.structure.shrink import mask_rows_for

    model, batch = tiny(BertModel, BertConfig), inputs()
    rewire(model, random_scores(model))
    sub = Subnetwork([2, 6, 3], [11, 4, 40], layers=[0, 1])

    gated_out, gated = forward_backward(model, batch, attach_gates(model, UnitGates(*mask_rows_for(model, subnetwork_mask(model, sub)))))
    sliced_out, sliced = forward_backward(model, batch, subnetwork_slices(model, sub))
    torch.testing.assert_close(sliced_out, gated_out, atol=1e-5, rtol=1e-4)
    assert not any(name.startswith("encoder.layer.2.") for name in sliced), "a dropped layer is skipped"
    for name, grad in sliced.items():
        torch.testing.assert_close(grad, gated[name], atol=1e-5, rtol=1e-4, msg=name)


def ds_spec(model_dir, storage, **dynamic):
    return {"name": "per-layer-ds", "model": {"source": str(model_dir)},
            "data": {"task": "tatoeba", "languages": ["de"], "max_train_examples": 32, "max_eval_examples": 20,
                     "max_length": 24},
            "finetune": {"steps": 1, "batch_size": 8, "learning_rate": 1e-3},
            "pruning": {"algorithm": "gradient", "schedule": "dynamic", "sparsity": 0.3, "scoring_examples": 8},
            "dynamic": {"grid": [0.0, 0.3, 0.6], "samples_per_step": 2, "steps": 2, "learning_rate": 1e-3, **dynamic},
            "efficiency": {"latency": False}, "resources": {"checkpoint_every": 50},
            "tracking": {"log_models": "none"}, "storage": str(storage)}


@pytest.fixture(scope="module")
def per_layer_checkpoint(tiny_model_dir, tmp_path_factory, one_torch_thread):
    """A per-layer DS run in-process on the tiny encoder, saved as the run logs its checkpoint."""
    from raysparse.runner import run_in_process
    from raysparse.training.dynamic import checkpoint_extra

    folder = tmp_path_factory.mktemp("per-layer-ds")
    spec = ds_spec(tiny_model_dir, folder / "runs", sampling="per-layer", drop_layers_max=1,
                   per_layer_max_sparsity=0.8)
    pipeline = run_in_process(spec)
    spec = pipeline.spec
    out = save_dynamic(pipeline.model, folder / "dynamic", pipeline.tokenizer, grid=spec.dynamic.grid,
                       extra=checkpoint_extra(spec, "tatoeba", ["de"]))
    return out, pipeline


@pytest.mark.timeout(300)
def test_a_per_layer_run_trains_and_records_its_sampling(per_layer_checkpoint):
    folder, pipeline = per_layer_checkpoint
    info = json.loads((folder / "raysparse.json").read_text())["extra"]
    assert info["dynamic"]["sampling"] == "per-layer" and info["dynamic"]["drop_layers_max"] == 1
    assert info["dynamic"]["per_layer_max_sparsity"] == 0.8 and info["dynamic"]["per_layer_spread"] == 0.25
    from raysparse.training.dynamic import smallest_counts

    floor, top = smallest_counts(pipeline.model, [0.0, 0.3, 0.6], False, 0.8), smallest_counts(pipeline.model,
                                                                                                [0.0, 0.3, 0.6], False)
    assert floor[0] < top[0] and floor[1] < top[1]   # below the sparsest level: what the floor is for
    assert info["evaluation"] == {"languages": ["de"], "seed": 0, "train_fraction": 0.5, "max_examples": 20,
                                  "skip_examples": 0, "max_length": 24, "stride": 64}
    for level in ("0", "0.3", "0.6"):
        assert 0.0 <= pipeline.state.metrics[f"level/{level}/tatoeba/avg/accuracy"] <= 1.0


@pytest.mark.timeout(300)
def test_a_tiny_search_finds_a_front_whose_points_slice_load_and_evaluate(per_layer_checkpoint, tmp_path, capsys):
    import mlflow

    from raysparse.cli import main
    from raysparse.training.evaluate import evaluate

    folder, _ = per_layer_checkpoint
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_experiment("subnetworks", artifact_location=(tmp_path / "artifacts").as_uri())
    result = raysparse.search_subnetworks(model_dir=str(folder), candidates=8, population=3, seed=1,
                                          objectives=["avg", "worst", "latency", "params"], out=str(tmp_path / "out"),
                                          latency_table=str(tmp_path / "tables"), rounds=2, sequence_length=16,
                                          tracking_uri=uri, experiment="subnetworks", verbose=False)
    assert len(result.rows) == 8 and result.front
    assert [r["uniform_level"] for r in result.rows[:3]] == [0.0, 0.3, 0.6]
    assert {r["suggested_by"] for r in result.rows[:3]} == {"uniform"}
    assert any(r["suggested_by"] == "nsga2" for r in result.rows), "NSGA-II bred offspring after its population"
    keys = ["tatoeba/avg/accuracy", "tatoeba/worst/accuracy", "latency_ms", "params"]
    assert [key for key, _ in result.objectives] == keys
    assert all(isinstance(r[k], (int, float)) for r in result.rows for k in keys)
    assert any(r["subnetwork"]["layers"] != [0, 1] for r in result.rows), "depth is searched (drop_layers_max 1)"
    record = json.loads((tmp_path / "out" / "subnetworks.json").read_text())
    assert record["front"] == [r["trial"] for r in result.front] and len(record["candidates"]) == 8
    assert record["evaluation"]["max_examples"] == 20 and record["space"]["drop_layers"] == 1
    from raysparse.training.dynamic import smallest_counts   # the search's default floor: the checkpoint's

    assert (record["space"]["min_heads"], record["space"]["min_neurons"]) == \
        smallest_counts(raysparse.load_model(str(folder)), [0.0], False, 0.8)
    assert {p.name for p in (tmp_path / "out" / "points").iterdir()} == {f"trial-{r['trial']}.json" for r in result.front}
    # every first evaluation's per-example statistics are kept, and the folder reads back as the result
    read = raysparse.SubnetworkSearchResult.read(tmp_path / "out")
    assert [r["trial"] for r in read.rows] == [r["trial"] for r in result.rows]
    assert [r["trial"] for r in read.front] == [r["trial"] for r in result.front]
    assert set(read.examples) == {r["trial"] for r in result.rows if not r["repeat"]}
    for row in result.rows:
        if not row["repeat"]:
            [correct] = read.examples[row["trial"]].values()
            assert len(correct) == 20 and sum(correct) / 20 == pytest.approx(row["tatoeba/avg/accuracy"])
    dense = result.rows[0]["latency_ms"]
    chosen = read.best_within(dense)
    assert chosen["latency_ms"] <= dense and chosen["chosen_because"]
    fitting = [r for r in result.rows if r["latency_ms"] <= dense]
    assert chosen["tatoeba/avg/accuracy"] >= max(r["tatoeba/avg/accuracy"] for r in fitting
                                                 if r["uniform_level"] is not None)

    [run] = client.search_runs([client.get_experiment_by_name("subnetworks").experiment_id])
    assert run.info.run_id == result.run_id and run.info.status == "FINISHED"
    assert run.data.tags["raysparse.kind"] == "subnetwork-search" and run.data.metrics["pareto_size"] == len(result.front)
    assert len(client.get_metric_history(run.info.run_id, "candidate/tatoeba/avg/accuracy")) == 8
    assert {"search/subnetworks.json", "search/pareto.png", "search/candidates.csv", "search/pareto.txt"} <= \
        {f.path for f in client.list_artifacts(run.info.run_id, "search")}

    point = result.front[-1]
    trial = point["trial"]
    assert main(["shrink", str(folder), "--config", str(tmp_path / "out" / "subnetworks.json"), "--trial", str(trial),
                 "--out", str(tmp_path / "small")]) == 0
    assert "sub-network" in capsys.readouterr().out
    small = raysparse.load_model(str(tmp_path / "small"))
    sub = Subnetwork.from_dict(point["subnetwork"])
    assert Encoder(small).heads_per_layer() == [sub.heads[i] for i in sub.kept_layers]
    assert measure(small).total_params == point["params"]
    again = evaluate(small, raysparse.load_tokenizer(str(tmp_path / "small")), "tatoeba", ["de"], max_examples=20,
                     seed=0, train_fraction=0.5, verbose=False)
    assert again.metrics["tatoeba/avg/accuracy"] == pytest.approx(point["tatoeba/avg/accuracy"], abs=1 / 20 + 1e-9)
    from_point = raysparse.shrink_checkpoint(folder, None, tmp_path / "small-2",
                                             config=tmp_path / "out" / "points" / f"trial-{trial}.json")
    assert from_point.subnetwork == sub and from_point.shrunk.total_params == point["params"]
    budget = result.rows[2]["latency_ms"]   # the sparsest uniform level's
    picked = read.best_within(budget)
    assert main(["shrink", str(folder), "--config", str(tmp_path / "out" / "subnetworks.json"), "--within-ms",
                 str(budget), "--out", str(tmp_path / "small-3")]) == 0
    assert f"trial {picked['trial']}" in capsys.readouterr().out
    assert measure(raysparse.load_model(str(tmp_path / "small-3"))).total_params == picked["params"]


@pytest.mark.timeout(60)
def test_a_refined_candidate_moves_units_between_layers_and_fills_its_budget():
    import random

    from raysparse.search.subnetworks import refine_candidate

    shape, cost = (4, 6, 64), lambda counts: sum(counts[0]) * 4.0 + sum(counts[1]) * 0.25   # noqa: E731
    parent = Subnetwork([6, 3, 2, 6], [64, 20, 10, 64])
    budget = cost(parent.counts())
    rng, children = random.Random(0), []
    for _ in range(30):
        child = refine_candidate(parent, shape, 1, 4, budget, cost, rng)
        child.check(shape)
        assert cost(child.counts()) <= budget and child.kept_layers == parent.kept_layers
        assert all(1 <= h <= 6 for h in child.heads) and all(4 <= n <= 64 for n in child.neurons)
        children.append(child.key())
    assert len(set(children)) > 10   # moves of its own each time
    dropped = Subnetwork([6, 0, 2, 6], [64, 0, 10, 64], layers=[0, 2, 3])   # a dropped layer stays dropped
    child = refine_candidate(dropped, shape, 1, 4, cost(dropped.counts()) + 40.0, cost, random.Random(1))
    assert child.kept_layers == (0, 2, 3) and cost(child.counts()) > cost(dropped.counts())   # filled up
    floor = refine_candidate(None, shape, 1, 4, 30.0, cost, random.Random(2))   # no parent: the floor (20), filled
    assert 20.0 < cost(floor.counts()) <= 30.0


@pytest.mark.timeout(300)
def test_refining_adds_candidates_within_each_budget(per_layer_checkpoint, tmp_path):
    folder, _ = per_layer_checkpoint
    result = raysparse.search_subnetworks(model_dir=str(folder), candidates=4, population=3, refine=2, seed=1,
                                          out=str(tmp_path / "out"), latency_table=str(tmp_path / "tables"), rounds=2,
                                          sequence_length=16, tracking=False, verbose=False)
    refined = [r for r in result.rows if r["suggested_by"] == "refine"]
    levels = [r for r in result.rows if r["uniform_level"] is not None and r["suggested_by"] == "uniform"]
    assert len(refined) == 2 * len(levels) == 6
    assert [r["budget_ms"] for r in refined] == [r["latency_ms"] for r in levels for _ in range(2)]
    assert all(r["latency_ms"] <= r["budget_ms"] * (1 + 1e-9) for r in refined)
    assert [r["trial"] for r in result.rows] == list(range(10))
    read = raysparse.SubnetworkSearchResult.read(tmp_path / "out" / "subnetworks.json")
    assert len(read.rows) == 10 and set(read.examples) == {r["trial"] for r in result.rows if not r["repeat"]}
    with pytest.raises(RaysparseError) as info:
        raysparse.search_subnetworks(model_dir=str(folder), refine=2, latency="measured", tracking=False)
    assert one_line(info).startswith("search-subnetworks.refine: fills each candidate up to its budget")


@pytest.mark.timeout(400)
def test_candidates_run_as_tune_trials_and_score_as_the_in_process_loop(per_layer_checkpoint, ray_local, tmp_path):
    """workers: every candidate a Tune trial on the session's three-node cluster, actors reused (each builds its
    scorer once, from a copy shipped to its node), the same fixed candidates scored the same as in this process,
    NSGA-II and refine proposing the rest."""
    folder, _ = per_layer_checkpoint
    common = {"model_dir": str(folder), "candidates": 8, "population": 3, "refine": 1, "seed": 1, "rounds": 2,
              "latency_table": str(tmp_path / "tables"), "sequence_length": 16, "tracking": False, "verbose": False}
    here = raysparse.search_subnetworks(**common, out=str(tmp_path / "here"))
    tuned = raysparse.search_subnetworks(**common, out=str(tmp_path / "tune"), workers=2)
    assert len(tuned.rows) == len(here.rows) == 8 + 3 and [r["trial"] for r in tuned.rows] == list(range(11))
    keys = ["tatoeba/avg/accuracy", "tatoeba/worst/accuracy", "latency_ms", "params"]
    for mine, theirs in zip(here.rows[:3], tuned.rows[:3]):   # the uniform levels, as fixed trials
        assert theirs["suggested_by"] == mine["suggested_by"] == "uniform"
        assert theirs["subnetwork"] == mine["subnetwork"] and theirs["uniform_level"] == mine["uniform_level"]
        assert [theirs[k] for k in keys] == pytest.approx([mine[k] for k in keys])
        assert tuned.examples[theirs["trial"]] == here.examples[mine["trial"]]
    assert any(r["suggested_by"] == "nsga2" for r in tuned.rows[:8])
    refined = tuned.rows[8:]
    assert [r["suggested_by"] for r in refined] == ["refine"] * 3
    assert [r["budget_ms"] for r in refined] == [r["budget_ms"] for r in here.rows[8:]]
    assert all(r["latency_ms"] <= r["budget_ms"] * (1 + 1e-9) for r in refined)
    actors = {r["actor"] for r in tuned.rows}
    assert 1 <= len(actors) <= 2, "two actors at a time, each kept across trials (reuse_actors)"
    assert [r["trial"] for r in SubnetworkSearchResult.read(tmp_path / "tune").front] == [r["trial"] for r in tuned.front]
    with pytest.raises(RaysparseError) as info:   # refused before any cluster work
        raysparse.search_subnetworks(model_dir=str(folder), workers=2, latency="measured", tracking=False)
    assert one_line(info).startswith("search-subnetworks.workers: latency: measured times candidates one at a time")
    with pytest.raises(RaysparseError) as info:
        raysparse.search_subnetworks(model_dir=str(folder), address="127.0.0.1:1", tracking=False)
    assert one_line(info).startswith("search-subnetworks.address: a cluster runs the candidates as Tune trials")


@pytest.mark.timeout(300)
def test_raysparse_search_runs_a_subnetworks_spec(per_layer_checkpoint, tmp_path, capsys):
    """`raysparse search SPEC` with kind: subnetworks is the sub-network search (and a job submits it as a search)."""
    import yaml

    from raysparse.cli import main
    from raysparse.jobs import spec_kind

    folder, _ = per_layer_checkpoint
    path = tmp_path / "subnetworks.yaml"
    path.write_text(yaml.safe_dump({"kind": "subnetworks", "name": "tiny-front", "model_dir": str(folder),
                                    "candidates": 4, "population": 3, "rounds": 2, "sequence_length": 16,
                                    "latency_table": str(tmp_path / "tables"), "out": str(tmp_path / "out"),
                                    "tracking": False}))
    assert spec_kind(path) == "search" and isinstance(raysparse.check_spec(path), raysparse.SubnetworkSearchSpec)
    assert main(["search", str(path), "--set", "candidates=5"]) == 0
    assert "search-subnetworks tiny-front: 5 candidates" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "out" / "subnetworks.json").read_text())["candidates"]) == 5
    path.write_text(path.read_text() + "candidate: 3\n")
    assert main(["search", str(path)]) == 2
    assert "candidate" in capsys.readouterr().err.strip().splitlines()[-1]


def _search_of(rows: list[dict], examples: dict) -> "raysparse.SubnetworkSearchResult":
    from pathlib import Path

    keys = [("tatoeba/avg/accuracy", "max"), ("latency_ms", "min")]
    return raysparse.SubnetworkSearchResult("s", "ds", "tatoeba", "accuracy", keys, rows, rows, Path("."),
                                           examples=examples)


def _row(trial: int, correct: list[int], ms: float, level: float | None = None) -> dict:
    accuracy = sum(correct) / len(correct)
    return {"trial": trial, "uniform_level": level, "repeat": False, "latency_ms": ms,
            "tatoeba/avg/accuracy": accuracy, "tatoeba/worst/accuracy": accuracy}


@pytest.mark.timeout(60)
def test_a_budget_keeps_the_uniform_level_unless_a_candidate_is_surely_better():
    """best_within: the paired bootstrap on the search rows decides between the best candidate and the level."""
    level = [1] * 60 + [0] * 40
    narrow = level[:60] + [1] + [0] * 39              # one more example right: within the noise
    wide = level[:60] + [1] * 20 + [0] * 20            # twenty more, none lost: surely better
    rows = [_row(0, [1] * 100, 40.0, 0.0), _row(1, level, 20.0, 0.5), _row(2, narrow, 19.0), _row(3, wide, 21.0)]
    search = _search_of(rows, {r: {"de": c} for r, c in enumerate([[1] * 100, level, narrow, wide])})
    kept = search.best_within(20.0)                    # the level and `narrow` fit; `narrow` averages higher
    assert kept["trial"] == 1 and "not surely better" in kept["chosen_because"]
    assert search.best_within(21.0)["trial"] == 3      # `wide` fits too, and beats the level for sure
    assert search.best_within(50.0)["trial"] == 0      # the dense level itself
    assert search.best_within(20.0, level=None)["trial"] == 2   # no check: the highest average
    without = _search_of(rows, {})                     # no statistics: the highest average
    assert without.best_within(20.0)["trial"] == 2
    with pytest.raises(RaysparseError) as info:
        search.best_within(10.0)
    assert one_line(info) == "best_within.latency_ms: no candidate within 10 ms (the cheapest: 19.00 ms)"


@pytest.mark.timeout(120)
def test_bad_input_fails_in_one_line(tiny_model_dir, tmp_path, capsys):
    from raysparse.cli import main

    model = tiny(BertModel, BertConfig)
    plain = save_pruned(model, tmp_path / "plain")
    with pytest.raises(RaysparseError) as info:
        raysparse.search_subnetworks(model_dir=str(plain), tracking=False, verbose=False)
    assert one_line(info).startswith("search-subnetworks.model_dir: ") and "not a Dynamic Sparsification" in str(info.value)
    with pytest.raises(RaysparseError) as info:
        raysparse.search_subnetworks(model_dir=str(tmp_path / "nowhere"), tracking=False)
    assert one_line(info).startswith("search-subnetworks.model_dir: ") and "does not exist" in str(info.value)
    assert main(["search-subnetworks", str(plain), "--no-tracking"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: search-subnetworks.model_dir:")
    with pytest.raises(RaysparseError) as info:
        raysparse.search_subnetworks(model_dir=str(plain), candidates=0)
    assert one_line(info).startswith("candidates: ")
    with pytest.raises(RaysparseError) as info:
        raysparse.search_subnetworks(model_dir=str(plain), objectives=["avg", "speed"])
    assert one_line(info).startswith("objectives")

    rewire(model, random_scores(model))
    ds = save_dynamic(model, tmp_path / "ds", grid=[0.0, 0.5])
    point = tmp_path / "point.json"
    point.write_text(json.dumps({"heads": [6, 9, 6], "neurons": [40, 40, 40]}))
    assert main(["shrink", str(ds), "--config", str(point), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: subnetwork.heads[1]: 9, but layer 1 holds 6 heads") \
        and str(point) in err[0], err
    for data, expected in [({"heads": [6, 6], "neurons": [40, 40]}, "subnetwork.heads: 2 counts for a 3-layer model"),
                           ({"heads": [6, 6, 6], "neurons": [40, 0, 40]}, "subnetwork.neurons[1]: 0, but layer 1"),
                           ({"heads": [6, 6, 6], "neurons": [40, 40]}, "subnetwork.neurons: 2 counts"),
                           ({"heads": [6, 6, 6], "neurons": [40, 40, 40], "layers": [3]}, "subnetwork.layers: "),
                           ({"heads": [6, 6, 6], "neurons": [40, 40, 40], "depth": 2}, "subnetwork.depth: unknown key"),
                           ({"heads": "6", "neurons": [40, 40, 40]}, "subnetwork.heads: expected a list of integers")]:
        point.write_text(json.dumps(data))
        with pytest.raises(RaysparseError) as info:
            raysparse.shrink_checkpoint(ds, None, tmp_path / "o", config=point)
        assert one_line(info).startswith(expected) and str(info.value).endswith(f"(in {point})"), str(info.value)
    point.write_text("{not json")
    assert main(["shrink", str(ds), "--config", str(point), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith(f"error: shrink.config: {point} is not valid JSON")
    for argv, expected in [(["--sparsity", "0.3", "--config", str(point)], "error: shrink: expected --sparsity"),
                           (["--sparsity", "0.3", "--trial", "2"], "error: shrink.trial: --trial picks"),
                           (["--config", str(tmp_path / "missing.json")], "error: shrink.config: "),
                           (["--within-ms", "20"], "error: shrink --within-ms: picks a candidate of --config"),
                           (["--config", str(point), "--within-ms", "20", "--trial", "1"], "error: shrink --within-ms"),
                           (["--config", str(tmp_path / "nothing" / "s.json"), "--within-ms", "20"],
                            f"error: search-subnetworks.out: {tmp_path / 'nothing' / 's.json'} does not exist")]:
        assert main(["shrink", str(ds), *argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(expected), err
    search_file = tmp_path / "subnetworks.json"
    search_file.write_text(json.dumps({"candidates": [{"trial": 0, "subnetwork": {"heads": [1, 1, 1],
                                                                                   "neurons": [1, 1, 1]}}]}))
    with pytest.raises(RaysparseError, match=r"^shrink.trial: no trial 5 in .* \(its trials: 0..0\)$"):
        read_subnetwork(search_file, 5)
    with pytest.raises(RaysparseError, match="name one with --trial N"):
        read_subnetwork(search_file)
    assert read_subnetwork(search_file, 0) == Subnetwork([1, 1, 1], [1, 1, 1])
    small = shrink_subnetwork(load_dynamic(ds), Subnetwork([2, 2, 2], [5, 5, 5], layers=[0, 1]))
    with pytest.raises(RaysparseError, match="cannot grow"):
        subnetwork_mask(small, Subnetwork([2, 2, 2], [5, 5, 5]))


BAD_SPECS = [
    ({"dynamic": {"drop_layers_max": 1}}, "dynamic.drop_layers_max: layers are dropped only with dynamic.sampling: "
                                          "per-layer"),
    ({"dynamic": {"sampling": "random"}}, "dynamic.sampling: "),
    ({"dynamic": {"sampling": "per-layer", "drop_layers_max": -1}}, "dynamic.drop_layers_max: "),
    ({"dynamic": {"per_layer_max_sparsity": 0.8}}, "dynamic.per_layer_max_sparsity: a per-layer floor applies only "
                                                   "with dynamic.sampling: per-layer"),
    ({"dynamic": {"grid": [0.0, 0.5], "sampling": "per-layer", "per_layer_max_sparsity": 0.4}},
     "dynamic.per_layer_max_sparsity: expected at least the grid's sparsest level 0.5, got 0.4"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("data,expected", BAD_SPECS)
def test_bad_sampling_settings_fail_in_one_line(data, expected):
    with pytest.raises(RaysparseError) as info:
        parse(RunSpec, {"pruning": {"schedule": "dynamic"}, **data})
    assert one_line(info).startswith(expected), str(info.value)
    assert parse(RunSpec, {"dynamic": {"sampling": "per-layer", "drop_layers_max": 2}}).dynamic.drop_layers_max == 2


@pytest.mark.timeout(120)
def test_dropping_every_layer_is_refused_before_training(tiny_model_dir, tmp_path):
    from raysparse.runner import run_in_process

    with pytest.raises(RaysparseError) as info:
        run_in_process(ds_spec(tiny_model_dir, tmp_path, sampling="per-layer", drop_layers_max=2))
    assert one_line(info) == "dynamic.drop_layers_max: 2 would leave no layer of this 2-layer model (expected at most 1)"
