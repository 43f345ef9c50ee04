"""`raysparse prune` end to end on the embedded model and real XTREME data, and its bad input."""

import json
import subprocess
import sys

import pytest
import torch

import raysparse
from raysparse.errors import RaysparseError
from raysparse.data.parallel import tatoeba_pairs
from raysparse.standalone import tatoeba_quality
from raysparse.structure import Mask, apply_mask, measure, shrink


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "raysparse.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_prune_cli_end_to_end(tmp_path, embedded_dir):
    out = tmp_path / "pruned"
    proc = run_cli("prune", "--sparsity", "0.5", "--languages", "de,ru,zh", "--scoring-pairs", "48",
                   "--batch-size", "16", "--eval-pairs", "60", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "encoder sparsity" in proc.stdout and "0.500" in proc.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["pruned"]["encoder_sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert result["pruned"]["bytes"] < result["dense"]["bytes"]
    assert result["quality"]["dense"]["tatoeba/avg/accuracy"] > 0.7

    reloaded = raysparse.load_model(str(out))
    assert measure(reloaded).total_params == result["pruned"]["total_params"]
    tokenizer = raysparse.load_tokenizer(str(out))
    again = tatoeba_quality(reloaded, tokenizer, tatoeba_pairs(["de", "ru", "zh"], max_pairs=60))
    assert again["tatoeba/avg/accuracy"] == pytest.approx(result["quality"]["pruned"]["tatoeba/avg/accuracy"], abs=1e-6)
    assert Mask.load(out / "mask.json").shape == (12, 12, 1536)


def test_embedded_model_masked_equals_shrunk(embedded_model, embedded_tokenizer):
    g = torch.Generator().manual_seed(0)
    mask = Mask.for_model(embedded_model)
    mask.kept_heads = torch.rand(12, 12, generator=g) > 0.5
    mask.kept_neurons = torch.rand(12, 1536, generator=g) > 0.5
    mask.kept_layers[5] = False
    batch = embedded_tokenizer(["query: Der schnelle braune Fuchs.", "query: 東京は日本の首都です。"], padding=True,
                               return_tensors="pt")
    with torch.no_grad(), apply_mask(embedded_model, mask):
        masked = embedded_model(**batch).last_hidden_state
    shrink(embedded_model, mask)
    with torch.no_grad():
        shrunk = embedded_model(**batch).last_hidden_state
    torch.testing.assert_close(shrunk, masked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("args,expected", [
    (["--sparsity", "1.2"], r"pruning.sparsity: expected a number in [0, 1), got 1.2"),
    (["--algorithm", "obd"], "pruning.algorithm: unknown algorithm 'obd'"),
    (["--languages", "xx"], "data.languages: xx not available for tatoeba"),
    (["--model", "/nonexistent/model"], "model.source: /nonexistent/model does not exist"),
    (["--languages", ""], "languages: expected comma-separated language codes"),
    (["--eval-pairs", "-5"], "data.max_eval_examples: Input should be greater than or equal to 1"),
    (["--steps", "1", "--algorithm", "layerdrop", "--round-to", "0"], "pruning.round_to: Input should be greater"),
])
def test_bad_input_is_one_line(args, expected, embedded_dir):
    proc = run_cli("prune", "--eval-pairs", "5", "--scoring-pairs", "4", *args, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected in lines[0]


def test_model_folder_problems_are_named(tmp_path):
    from transformers import GPT2Config, GPT2Model

    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(RaysparseError, match="has no weights"):
        raysparse.load_model(str(empty))
    gpt = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)).save_pretrained(gpt)
    with pytest.raises(RaysparseError, match="unknown architecture 'gpt2'"):
        raysparse.load_model(str(gpt))


@pytest.mark.timeout(900)
def test_prune_and_run_execute_the_same_pipeline(ray_local, tracking_server, tmp_path, embedded_dir):
    """`raysparse prune` is the in-process executor of the run spec its flags make: the same spec
    and seed through `raysparse run` on Ray Train give the same mask and the same metrics."""
    from raysparse.runner import run, run_in_process
    from raysparse.standalone import prune_spec

    spec = prune_spec(sparsity=0.4, languages=["de", "ru"], scoring_pairs=32, batch_size=8, eval_pairs=30,
                      recover_steps=3, learning_rate=1e-4, latency=False).model_dump()
    spec["storage"] = str(tmp_path / "runs")
    spec["tracking"] = {**spec["tracking"], "uri": tracking_server, "experiment": "test-prune-equals-run"}
    torch.set_num_threads(1)   # as the one Ray Train worker (cpus_per_worker 1): the same float sums
    try:
        local = run_in_process(spec)
    finally:
        torch.set_num_threads(2)
    remote = run(spec, verbose=False)
    key = "tatoeba/avg/accuracy"
    assert local.state.metrics[key] == pytest.approx(remote.metrics[key], abs=1e-6)
    assert local.state.metrics["encoder_sparsity"] == pytest.approx(remote.metrics["encoder_sparsity"])
    assert local.state.metrics["dense/tatoeba/avg/accuracy"] == pytest.approx(remote.metrics["dense/tatoeba/avg/accuracy"])
    import mlflow

    folder = mlflow.MlflowClient(tracking_server).download_artifacts(remote.run_id, "results", str(tmp_path / "dl"))
    assert Mask.load(f"{folder}/mask-shared.json") == local.state.masks["shared"]
    assert local.state.masks["shared"].summary() != Mask.full(12, 12, 1536).summary()   # something was pruned


def test_prune_prints_the_spec_it_executes(tmp_path):
    """`--print-spec` gives a run spec that `raysparse run` accepts, with the flags in it (what each flag
    changes in the pruning: tests/test_cli_flags.py)."""
    proc = run_cli("prune", "--sparsity", "0.3", "--algorithm", "magnitude", "--languages", "de,fr",
                   "--recover-steps", "7", "--scope", "per-layer", "--normalize", "none", "--round-to", "4",
                   "--head-ratio", "0.6", "--steps", "3", "--print-spec", timeout=120)
    assert proc.returncode == 0, proc.stderr
    from raysparse.config import RunSpec, parse
    import yaml

    spec = parse(RunSpec, yaml.safe_load(proc.stdout))
    assert (spec.pruning.sparsity, spec.pruning.algorithm, spec.recovery.steps) == (0.3, "magnitude", 7)
    assert (spec.pruning.scope, spec.pruning.normalize, spec.pruning.round_to) == ("per-layer", "none", 4)
    assert spec.pruning.head_ratio == 0.6
    assert (spec.pruning.schedule, spec.pruning.iterations) == ("iterative", 3)
    assert spec.data.task == "tatoeba" and spec.data.languages == ["de", "fr"] and spec.finetune.steps == 0


def test_prune_refuses_to_write_over_its_input(tmp_path, tiny_model_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    for out in (model, model / "pruned"):
        proc = run_cli("prune", "--model", str(model), "--out", str(out), "--languages", "de", timeout=120)
        assert proc.returncode == 2 and "would overwrite the input" in proc.stderr, proc.stderr
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before
    afile = tmp_path / "file"
    afile.write_text("x")
    proc = run_cli("prune", "--model", str(model), "--out", str(afile), "--languages", "de", timeout=120)
    assert proc.returncode == 2 and "is a file" in proc.stderr, proc.stderr
