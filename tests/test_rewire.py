"""Rewiring for Dynamic Sparsification: permutation leaves outputs unchanged, every size is a prefix."""

import copy
import math

import pytest
import torch
from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel

import raysparse
from raysparse.errors import RaysparseError
from raysparse.pruning import UnitScores
from raysparse.structure import (Encoder, apply_mask, is_rewired, load_dynamic, measure, prefix_mask, prefix_sparsity,
                                 rewire, save_dynamic, save_pruned, shrink_to, structure_of)
from raysparse.structure.rewire import prefix_counts, read_dynamic_info
from raysparse.training.dynamic import copy_sharing_embeddings

FAMILIES = [(BertModel, BertConfig), (XLMRobertaModel, XLMRobertaConfig)]
GRID = [round(0.1 * i, 1) for i in range(10)]


def tiny(model_cls, config_cls, seed=0):
    torch.manual_seed(seed)
    config = config_cls(vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                        intermediate_size=40, max_position_embeddings=64, pad_token_id=1)
    return model_cls(config).eval()


def random_scores(model, seed=0):
    num_layers, num_heads, ffn = structure_of(model).shape
    g = torch.Generator().manual_seed(seed)
    return UnitScores(torch.rand(num_layers, num_heads, generator=g), torch.rand(num_layers, ffn, generator=g))


def forward_backward(model, batch, context):
    """Outputs and gradients of one forward and backward pass inside ``context`` (gates or slices)."""
    model.zero_grad(set_to_none=True)
    with context:
        out = model(**batch).last_hidden_state
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def inputs(vocab=120, seed=1, length=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, length), generator=g)
    attention = torch.ones_like(ids)
    attention[1, length - 4:] = 0
    return {"input_ids": ids, "attention_mask": attention}


def hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def top_units_mask(model, scores, sparsity):
    """The reference: per layer, the ceil((1-s)N) highest-scoring units (original coordinates)."""
    enc = Encoder(model)
    heads, neurons = scores.heads, scores.neurons
    keep_h, keep_n = prefix_counts(sparsity, heads.shape[1], neurons.shape[1], enc.hidden_size, enc.head_dim)
    mask = raysparse.structure.Mask.for_model(model)
    mask.kept_heads[:] = False
    mask.kept_neurons[:] = False
    for layer in range(heads.shape[0]):
        mask.kept_heads[layer, torch.argsort(-heads[layer], stable=True)[:keep_h]] = True
        mask.kept_neurons[layer, torch.argsort(-neurons[layer], stable=True)[:keep_n]] = True
    return mask


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model_cls,config_cls", FAMILIES)
def test_rewired_model_computes_the_same_and_prefixes_equal_masked_model(model_cls, config_cls):
    model, batch = tiny(model_cls, config_cls), inputs()
    original = copy.deepcopy(model)
    scores = random_scores(model)
    dense = hidden(model, batch)
    rewire(model, scores)
    assert is_rewired(model) and not is_rewired(original)
    structure = structure_of(model)
    assert structure.heads[0] != list(range(6)), "rewiring must reorder units"
    for layer, order in enumerate(structure.heads):
        assert scores.heads[layer, order].tolist() == sorted(scores.heads[layer].tolist(), reverse=True)
    torch.testing.assert_close(hidden(model, batch), dense, atol=1e-5, rtol=0)

    for sparsity in GRID:
        mask = prefix_mask(model, sparsity)
        assert mask == top_units_mask(original, scores, sparsity), f"prefix at {sparsity} is not the top units"
        with apply_mask(original, mask):
            masked = hidden(original, batch)          # the unpermuted model, masked in original coordinates
        with apply_mask(model, mask):
            torch.testing.assert_close(hidden(model, batch), masked, atol=1e-5, rtol=0)
        small = shrink_to(copy.deepcopy(model), sparsity)
        torch.testing.assert_close(hidden(small, batch), masked, atol=1e-5, rtol=0)
        assert structure_of(small).to_mask() == mask
        keep_h, keep_n = prefix_counts(sparsity, 6, 40, 48, 8)
        assert Encoder(small).heads_per_layer() == [keep_h] * 3 and Encoder(small).neurons_per_layer() == [keep_n] * 3
        assert keep_h == math.ceil((1 - sparsity) * 6 - 1e-9) and keep_n == math.ceil((1 - sparsity) * 40 - 1e-9)
        assert measure(small).encoder_sparsity == pytest.approx(prefix_sparsity(model, sparsity))


@pytest.mark.timeout(60)
def test_match_sparsity_lets_neurons_absorb_head_rounding():
    model = tiny(BertModel, BertConfig)
    rewire(model, random_scores(model))
    half_neuron = (2 * 48 + 1) / (6 * (4 * 48 * 8 + 3 * 8) + 40 * (2 * 48 + 1)) / 2
    for sparsity in GRID:
        plain = prefix_sparsity(model, sparsity)
        matched = prefix_sparsity(model, sparsity, match_sparsity=True)
        assert plain <= sparsity + 1e-9, "the ceil rule never removes more than asked"
        assert abs(matched - sparsity) <= abs(plain - sparsity) + 1e-9
        if sparsity <= 0.5:
            assert abs(matched - sparsity) <= half_neuron + 1e-9


@pytest.mark.timeout(60)
def test_shrink_to_round_trips_through_save_and_load(tmp_path):
    model, batch = tiny(XLMRobertaModel, XLMRobertaConfig), inputs()
    rewire(model, random_scores(model, seed=3))
    folder = save_dynamic(model, tmp_path / "ds", grid=[0.0, 0.3, 0.6])
    assert read_dynamic_info(folder) == {"rewired": True, "grid": [0.0, 0.3, 0.6]}
    loaded = load_dynamic(folder)
    assert structure_of(loaded) == structure_of(model)
    torch.testing.assert_close(hidden(loaded, batch), hidden(model, batch), atol=1e-6, rtol=0)
    for sparsity in (0.3, 0.6):
        expected = hidden(shrink_to(copy.deepcopy(model), sparsity), batch)
        small = shrink_to(folder, sparsity)                    # from the folder, as `raysparse shrink` does
        out = save_pruned(small, tmp_path / f"s{sparsity}")
        again = raysparse.load_model(str(out))                 # loads like any shrunk model
        torch.testing.assert_close(hidden(again, batch), expected, atol=1e-6, rtol=0)
        assert measure(again).encoder_sparsity == pytest.approx(prefix_sparsity(model, sparsity))
    half = shrink_to(copy.deepcopy(model), 0.3)                # a smaller prefix of a shrunk level
    torch.testing.assert_close(hidden(shrink_to(half, 0.6), batch), hidden(shrink_to(copy.deepcopy(model), 0.6), batch),
                               atol=1e-6, rtol=0)
    with pytest.raises(RaysparseError, match="cannot grow"):
        shrink_to(shrink_to(copy.deepcopy(model), 0.6), 0.3)


@pytest.mark.timeout(60)
def test_shrink_refuses_models_that_are_not_rewired(tmp_path, capsys):
    from raysparse.cli import main

    model = tiny(BertModel, BertConfig)
    with pytest.raises(RaysparseError, match="not rewired"):
        shrink_to(model, 0.5)
    plain = save_pruned(model, tmp_path / "plain")
    assert main(["shrink", str(plain), "--sparsity", "0.5", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: shrink:") and "not a Dynamic Sparsification checkpoint" in err[0]

    rewire(model, random_scores(model))
    ds = save_dynamic(model, tmp_path / "ds", grid=[0.0, 0.5])
    assert main(["shrink", str(ds), "--sparsity", "1.5", "--out", str(tmp_path / "out")]) == 2
    assert "expected a number in [0, 1), got 1.5" in capsys.readouterr().err
    assert main(["shrink", str(ds), "--sparsity", "0.5", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "encoder sparsity" in printed
    small = raysparse.load_model(str(tmp_path / "out"))
    assert Encoder(small).heads_per_layer() == [3, 3, 3]


@pytest.mark.timeout(240)
def test_rewiring_the_embedded_model_leaves_outputs_unchanged(embedded_model, embedded_tokenizer):
    model = embedded_model
    batch = dict(embedded_tokenizer(["query: Das Haus ist klein.", "query: The weather is nice today in Paris."],
                                    padding=True, return_tensors="pt"))
    dense = hidden(model, batch)
    original = copy_sharing_embeddings(model)          # the 96M-row embedding table is never touched
    scores = random_scores(model, seed=7)
    rewire(model, scores)
    torch.testing.assert_close(hidden(model, batch), dense, atol=1e-5, rtol=0)
    for sparsity in (0.3, 0.6, 0.9):
        mask = prefix_mask(model, sparsity)
        assert mask == top_units_mask(original, scores, sparsity)
        with apply_mask(original, mask):
            masked = hidden(original, batch)
        small = shrink_to(copy_sharing_embeddings(model), sparsity)
        torch.testing.assert_close(hidden(small, batch), masked, atol=1e-5, rtol=0)
    # the encoder sparsity of the ceil rule: heads are coarse (12 per layer), so it lands a little below target
    assert prefix_sparsity(model, 0.5) == pytest.approx(0.5, abs=1e-9)
    assert 0.08 < prefix_sparsity(model, 0.1) < 0.1
    assert prefix_sparsity(model, 0.1, match_sparsity=True) == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize("model_cls,config_cls", FAMILIES)
@pytest.mark.parametrize("level", [0.3, 0.7])
def test_a_prefix_level_trains_at_its_own_size_with_the_gated_gradients(model_cls, config_cls, level):
    """Dynamic Sparsification trains a level through weight views of its prefix: the same outputs and
    the same gradients in the shared weights as gating the full-width model, at the level's cost."""
    from raysparse.structure import UnitGates, attach_gates
    from raysparse.structure.shrink import mask_rows_for
    from raysparse.structure.slicing import prefix_lengths, prefix_slices

    model = tiny(model_cls, config_cls)
    rewire(model, random_scores(model))
    model.train(False)
    batch = inputs()
    heads, neurons, layers = mask_rows_for(model, prefix_mask(model, level))
    counts = prefix_lengths(heads), prefix_lengths(neurons)
    assert None not in counts and bool(layers.all())

    gated_out, gated_grads = forward_backward(model, batch, attach_gates(model, UnitGates(heads, neurons, layers)))
    sliced_out, sliced_grads = forward_backward(model, batch, prefix_slices(model, *counts))
    torch.testing.assert_close(sliced_out, gated_out, atol=1e-5, rtol=1e-4)
    assert sorted(sliced_grads) == sorted(gated_grads)
    for name, grad in gated_grads.items():
        torch.testing.assert_close(sliced_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert all("forward" not in vars(m) for m in model.modules()), "the slices outlived the block"
    assert prefix_lengths([torch.tensor([1.0, 0.0, 1.0])]) is None
