"""Masks, gates, physical shrinking and checkpoints on tiny random models of every family."""

import pytest
import torch
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel, XLMRobertaConfig, XLMRobertaModel

from raysparse.errors import RaysparseError
from raysparse.structure import (Mask, UnitGates, apply_mask, attach_gates, load_pruned, measure, save_pruned,
                                 shrink, structure_of)

FAMILIES = [(BertModel, BertConfig), (RobertaModel, RobertaConfig), (XLMRobertaModel, XLMRobertaConfig)]


def tiny(model_cls, config_cls, seed=0):
    torch.manual_seed(seed)
    config = config_cls(vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=40, max_position_embeddings=64, pad_token_id=1)
    return model_cls(config).eval()


def random_mask(model, seed, drop_layer=True, empty_layer=True):
    g = torch.Generator().manual_seed(seed)
    mask = Mask.for_model(model)
    mask.kept_heads = torch.rand(mask.kept_heads.shape, generator=g) > 0.4
    mask.kept_neurons = torch.rand(mask.kept_neurons.shape, generator=g) > 0.5
    if empty_layer:
        mask.kept_heads[1] = False       # a layer with no heads at all
    if drop_layer:
        mask.kept_layers[2] = False
    return mask


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (3, 11), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": attention}


def hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


@pytest.mark.parametrize("model_cls,config_cls", FAMILIES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shrunk_model_computes_what_masked_model_computes(model_cls, config_cls, seed):
    model, batch = tiny(model_cls, config_cls), inputs()
    mask = random_mask(model, seed)
    dense = hidden(model, batch)
    with apply_mask(model, mask):
        masked = hidden(model, batch)
    assert not torch.allclose(masked, dense, atol=1e-3), "the mask must change the output"
    shrink(model, mask)
    torch.testing.assert_close(hidden(model, batch), masked, atol=1e-5, rtol=0)
    assert [len(h) for h in structure_of(model).heads] == [int(r.sum()) for r in mask.kept_heads[mask.kept_layers]]
    assert measure(model).layers == int(mask.kept_layers.sum())


@pytest.mark.parametrize("model_cls,config_cls", FAMILIES)
def test_save_load_round_trips_exactly(model_cls, config_cls, tmp_path):
    model, batch = tiny(model_cls, config_cls), inputs()
    shrink(model, random_mask(model, 3))
    save_pruned(model, tmp_path / "m")
    loaded = load_pruned(tmp_path / "m")
    assert type(loaded) is type(model)
    assert structure_of(loaded) == structure_of(model)
    saved, again = model.state_dict(), loaded.state_dict()
    assert list(again) == list(saved)   # the same tensors, by name, before comparing them
    for name, tensor in saved.items():
        assert torch.equal(again[name], tensor), name
    assert torch.equal(hidden(loaded, batch), hidden(model, batch))


def test_shrinking_twice_equals_shrinking_once_with_both_masks():
    first, second = tiny(BertModel, BertConfig), tiny(BertModel, BertConfig)
    a, b = random_mask(first, 4, empty_layer=False), random_mask(first, 5, drop_layer=False, empty_layer=False)
    shrink(first, a)
    shrink(first, b)                      # b is in original coordinates, applied to a shrunk model
    shrink(second, a.intersect(b))
    batch = inputs()
    torch.testing.assert_close(hidden(first, batch), hidden(second, batch), atol=1e-6, rtol=0)
    assert structure_of(first).to_mask() == a.intersect(b)


def test_mask_applies_to_an_already_shrunk_model():
    model, batch = tiny(BertModel, BertConfig), inputs()
    a, b = random_mask(model, 6, empty_layer=False), random_mask(model, 7, drop_layer=False, empty_layer=False)
    shrink(model, a)
    with apply_mask(model, b):
        masked = hidden(model, batch)
    shrink(model, b)
    torch.testing.assert_close(hidden(model, batch), masked, atol=1e-5, rtol=0)


def test_gates_are_differentiable_and_zero_gates_equal_removal():
    model, batch = tiny(BertModel, BertConfig), inputs()
    gates = UnitGates.ones(model)
    with attach_gates(model, gates):
        loss = model(**batch).last_hidden_state.pow(2).sum()
        grads = torch.autograd.grad(loss, [*gates.heads, *gates.neurons])
    assert all(g.abs().sum() > 0 for g in grads)
    mask = random_mask(model, 8, drop_layer=False, empty_layer=False)
    zeros = UnitGates([r.float() for r in mask.kept_heads], [r.float() for r in mask.kept_neurons])
    with attach_gates(model, zeros):
        gated = hidden(model, batch)
    shrink(model, mask)
    torch.testing.assert_close(hidden(model, batch), gated, atol=1e-5, rtol=0)


def test_mask_json_round_trip(tmp_path):
    mask = random_mask(tiny(BertModel, BertConfig), 9)
    mask.save(tmp_path / "mask.json")
    assert Mask.load(tmp_path / "mask.json") == mask


def test_mask_of_wrong_shape_is_one_clear_line():
    model = tiny(BertModel, BertConfig)
    wrong = Mask.full(4, 8, 40)
    with pytest.raises(RaysparseError, match=r"mask: shape .* does not fit") as err:
        shrink(model, wrong)
    assert "\n" not in str(err.value)
    with pytest.raises(RaysparseError, match="kept_heads must be"):
        Mask(torch.ones(4), torch.ones(4, 40))
    with pytest.raises(RaysparseError, match="layer counts disagree"):
        Mask(torch.ones(4, 4), torch.ones(3, 40))


def test_missing_and_corrupt_checkpoints_fail_with_one_line(tmp_path):
    with pytest.raises(RaysparseError, match="does not exist"):
        load_pruned(tmp_path / "nope")
    model = tiny(BertModel, BertConfig)
    shrink(model, random_mask(model, 10))
    save_pruned(model, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(RaysparseError, match="corrupt or truncated"):
        load_pruned(tmp_path / "m")
    weights.unlink()
    with pytest.raises(RaysparseError, match="has no model.safetensors"):
        load_pruned(tmp_path / "m")
    (tmp_path / "m" / "raysparse.json").write_text("{not json")
    with pytest.raises(RaysparseError, match="not valid JSON"):
        load_pruned(tmp_path / "m")
