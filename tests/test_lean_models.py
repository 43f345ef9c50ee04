"""Lean model folders: tensors identical to the base model stay out, load_model fills them back in,
a missing or different base fails in one line, `raysparse export` writes the self-contained form."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

import raysparse
from raysparse.errors import RaysparseError
from raysparse.models.lean import save_lean
from raysparse.structure import Mask, save_pruned, shrink
from raysparse.structure.checkpoint import WEIGHTS, read_sidecar
from raysparse.training.batches import build_task_model


def pruned_task_model(base_dir):
    model = build_task_model(raysparse.load_model(str(base_dir)), "xnli", seed=0)
    mask = Mask.for_model(model)
    mask.kept_heads[0, :2] = False
    mask.kept_neurons[1, ::2] = False
    return shrink(model, mask).eval()


def outputs(model, tokenizer):
    batch = tokenizer(["The quick brown fox.", "Der schnelle braune Fuchs springt."], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        return model(**batch)["logits"]


def test_lean_folder_round_trip_and_its_base_checks(tiny_model_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    tokenizer = raysparse.load_tokenizer(str(base))
    tokenizer(["a run's batches are cut and padded"], truncation=True, max_length=4, padding=True)   # as in a run
    model = pruned_task_model(base)
    lean = save_lean(model, tmp_path / "lean", str(base), tokenizer, load=raysparse.load_model)
    full = save_pruned(model, tmp_path / "full", tokenizer)
    recorded = read_sidecar(lean)["base"]
    assert "embeddings.word_embeddings.weight" in recorded["tensors"] and recorded["source"] == str(base)
    assert not any(name.startswith("encoder.encoder.layer.0.attention") for name in recorded["tensors"])  # pruned
    assert (lean / WEIGHTS).stat().st_size < 0.5 * (full / WEIGHTS).stat().st_size
    # the tokenizer is the base's, byte for byte: it stays out too (0.6 of a full tiny model)
    assert "tokenizer.json" in recorded["files"] and not (lean / "tokenizer.json").exists()
    assert (full / "tokenizer.json").is_file()
    lean_bytes = sum(p.stat().st_size for p in lean.iterdir())
    assert lean_bytes < 0.3 * sum(p.stat().st_size for p in full.iterdir())

    again = raysparse.load_model(str(lean))
    torch.testing.assert_close(outputs(again, tokenizer), outputs(model, tokenizer), atol=0, rtol=0)
    torch.testing.assert_close(outputs(again, raysparse.load_tokenizer(str(lean))), outputs(model, tokenizer),
                               atol=0, rtol=0)
    assert sorted(again.state_dict()) == sorted(model.state_dict())

    shipped = tmp_path / "shipped"
    proc = subprocess.run([sys.executable, "-m", "raysparse.cli", "export", str(lean), "--out", str(shipped)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "base" not in read_sidecar(shipped) and (shipped / "tokenizer.json").is_file()
    shipped_json = json.loads((shipped / "tokenizer.json").read_text())
    assert shipped_json["truncation"] is None and shipped_json["padding"] is None   # not the run's last call
    proc = subprocess.run([sys.executable, "-m", "raysparse.cli", "export", str(lean), "--out", str(lean / "x")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "would overwrite the input" in proc.stderr

    (base / "tokenizer.json").write_text((base / "tokenizer.json").read_text() + "\n")   # same vocabulary, other bytes
    with pytest.raises(RaysparseError, match=r"another version of its base model .*\(tokenizer.json differs there"):
        raysparse.load_tokenizer(str(lean))
    changed = raysparse.load_model(str(base))
    with torch.no_grad():
        changed.embeddings.word_embeddings.weight[3] += 1
    save_pruned(changed, base, tokenizer)
    with pytest.raises(RaysparseError, match="saved against another version of its base model"):
        raysparse.load_model(str(lean))
    shutil.rmtree(base)
    with pytest.raises(RaysparseError, match="which cannot be loaded here"):
        raysparse.load_model(str(lean))
    exported = raysparse.load_model(str(shipped))   # the self-contained form needs no base
    torch.testing.assert_close(outputs(exported, tokenizer), outputs(model, tokenizer), atol=0, rtol=0)
