"""Parameter/FLOP accounting against hand-computed XLM-R base figures; exact-sparsity selection."""

import pytest
import torch
from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel

from raysparse.errors import RaysparseError
from raysparse.pruning import Selection, UnitScores, get_algorithm, iterative_targets, prune_schedule, select_mask
from raysparse.pruning.schedules import cubic_sparsity
from raysparse.structure import (Mask, encoder_flops, encoder_sparsity_of, measure, params_per_head,
                                 params_per_neuron, shrink)


def xlmr_base_on_meta():
    config = XLMRobertaConfig(vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                              intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1)
    with torch.device("meta"):
        return XLMRobertaModel(config)


def test_xlmr_base_figures_match_hand_computed_values():
    model = xlmr_base_on_meta()
    size = measure(model)
    assert size.total_params == 278_043_648
    assert model.embeddings.word_embeddings.weight.numel() == 192_001_536
    assert params_per_head(768, 64) == 196_800
    assert params_per_neuron(768) == 1_537
    assert size.prunable_params == 144 * 196_800 + 12 * 3072 * 1_537  # 28.3M heads + 56.7M neurons
    assert size.bytes == 4 * 278_043_648
    assert size.encoder_sparsity == 0.0


def test_half_sparsity_on_xlmr_base_shape_is_exact_and_counted():
    model = xlmr_base_on_meta()
    scores = UnitScores(torch.rand(12, 12), torch.rand(12, 3072))
    mask = select_mask(scores, 0.5, 768, 64)
    assert encoder_sparsity_of(mask, 768, 64) == pytest.approx(0.5, abs=1e-9)
    shrink(model, mask)
    size = measure(model)
    assert size.prunable_params == 72 * 196_800 + 6 * 3072 * 1_537
    assert size.total_params == 278_043_648 - 72 * 196_800 - 6 * 3072 * 1_537
    assert size.encoder_sparsity == pytest.approx(0.5, abs=1e-9)


def test_flops_hand_computed():
    # one layer, 2 heads of 4 dims, hidden 8, 16 neurons, length 3
    flops = encoder_flops([2], [16], hidden_size=8, head_dim=4, sequence_length=3)
    qkv = 2 * 3 * 8 * 8 * 3
    attn = 2 * 2 * 3 * 3 * 8
    out = 2 * 3 * 8 * 8
    ffn = 2 * 2 * 3 * 8 * 16
    assert flops == qkv + attn + out + ffn


def e5_small_scores() -> UnitScores:
    g = torch.Generator().manual_seed(0)
    return UnitScores(torch.rand(12, 12, generator=g), torch.rand(12, 1536, generator=g))


def assert_within_half_a_neuron(mask: Mask, sparsity: float) -> None:
    total = 144 * params_per_head(384, 32) + 12 * 1536 * params_per_neuron(384)
    assert abs(encoder_sparsity_of(mask, 384, 32) - sparsity) <= params_per_neuron(384) / 2 / total + 1e-12


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3, 0.5, 0.73, 0.9])
@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_selection_reaches_target_within_half_a_neuron(sparsity, scope):
    """e5-small shape: 12 layers x 12 heads of 32 dims, FFN 1536, hidden 384."""
    scores = e5_small_scores()
    mask = select_mask(scores, sparsity, 384, 32, Selection(scope=scope))
    assert_within_half_a_neuron(mask, sparsity)
    if scope == "per-layer":
        kept = mask.kept_heads.sum(1)
        assert kept.max() - kept.min() <= 1


def test_selection_keeps_highest_scores_and_rounds_to_multiples():
    heads = torch.arange(24.0).reshape(2, 12)
    neurons = torch.arange(64.0).reshape(2, 32)
    mask = select_mask(UnitScores(heads, neurons), 0.5, 64, 8, Selection(normalize="none"))
    assert mask.kept_heads[1].all() and not mask.kept_heads[0].any()
    rounded = select_mask(UnitScores(torch.rand(2, 12), torch.rand(2, 32)), 0.4, 64, 8, Selection(round_to=8))
    assert all(int(k) % 8 == 0 for k in rounded.kept_neurons.sum(1))
    assert all(int(k) % 8 == 0 or int(k) == 12 for k in rounded.kept_heads.sum(1))


def test_per_layer_normalisation_protects_layers_with_small_scores():
    g = torch.Generator().manual_seed(0)
    # every early-layer score (< 0.01) below every late-layer one (>= 1): raw ranking empties the early layer
    heads = torch.cat([torch.rand(1, 12, generator=g) * 0.01, 1 + torch.rand(1, 12, generator=g) * 16])
    scores = UnitScores(heads, torch.rand(2, 64, generator=g))
    raw = select_mask(scores, 0.5, 64, 8, Selection(normalize="none"))
    normalised = select_mask(scores, 0.5, 64, 8, Selection(normalize="l2"))
    assert raw.kept_heads[0].sum() == 0
    assert normalised.kept_heads[0].sum() > 0


def test_iterative_schedule_never_restores_removed_units():
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=24)).eval()
    batches = [torch.randint(3, 50, (4, 6)) for _ in range(2)]
    loss = lambda m, b: m(input_ids=b).last_hidden_state.pow(2).mean()  # noqa: E731
    history = prune_schedule(model, get_algorithm("gradient"), 0.6, steps=3, batches_for=lambda r: batches,
                             loss_fn=loss)
    assert [round(h.sparsity, 6) for h in history] == [0.2, 0.4, 0.6]
    for earlier, later in zip(history, history[1:]):
        assert not (later.mask.kept_heads & ~earlier.mask.kept_heads).any()
        assert not (later.mask.kept_neurons & ~earlier.mask.kept_neurons).any()


def test_cubic_ramp():
    assert cubic_sparsity(0, 100, 0.5) == 0.0
    assert cubic_sparsity(100, 100, 0.5) == 0.5
    assert cubic_sparsity(50, 100, 0.5) == pytest.approx(0.5 * (1 - 0.125))
    assert iterative_targets(0.5, 2) == [0.25, 0.5]


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "half", None, True])
def test_sparsity_outside_unit_interval_is_rejected(bad):
    with pytest.raises(RaysparseError, match=r"pruning.sparsity: expected a number in \[0, 1\)"):
        select_mask(UnitScores(torch.rand(2, 4), torch.rand(2, 8)), bad, 16, 4)


def test_unknown_algorithm_is_named():
    with pytest.raises(RaysparseError, match="unknown algorithm 'obd'.*gradient"):
        get_algorithm("obd")


def test_magnitude_and_random_ignore_removed_units():
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=24)).eval()
    mask = Mask.for_model(model)
    mask.kept_heads[0, 1] = False
    for name in ("magnitude", "random"):
        scores = get_algorithm(name).score(model, mask=mask)
        assert scores.heads[0, 1] == float("-inf") and torch.isfinite(scores.heads[1]).all()


def test_magnitude_and_movement_sum_exactly_the_weights_a_unit_owns():
    """Head 2 of layer 1 owns Q/K/V rows 16-23 (and biases) and output columns 16-23; neuron 5 owns W1 row 5
    (and bias) and W2 column 5. Magnitude is the L2 norm of those weights, movement -sum(W * grad)."""
    from raysparse.pruning.movement import unit_movement

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=24)).eval()
    layer = model.encoder.layer[1]
    qkv = [layer.attention.self.query, layer.attention.self.key, layer.attention.self.value]
    rows = slice(16, 24)
    head_weights = [p.weight[rows] for p in qkv] + [layer.attention.output.dense.weight[:, rows]]
    neuron_weights = [layer.intermediate.dense.weight[5], layer.output.dense.weight[:, 5]]
    scores = get_algorithm("magnitude").score(model)
    assert scores.heads[1, 2].item() == pytest.approx(torch.sqrt(sum(w.pow(2).sum() for w in head_weights)).item())
    assert scores.neurons[1, 5].item() == pytest.approx(torch.sqrt(sum(w.pow(2).sum() for w in neuron_weights)).item())
    grads = {id(p): torch.randn_like(p) for p in model.parameters()}
    heads, neurons = unit_movement(model, lambda p: grads.get(id(p)))
    owned_head = [(p.weight, rows) for p in qkv] + [(p.bias, rows) for p in qkv]
    expected = -sum((p[r] * grads[id(p)][r]).sum() for p, r in owned_head)
    out = layer.attention.output.dense.weight
    expected -= (out[:, rows] * grads[id(out)][:, rows]).sum()
    assert heads[1][2].item() == pytest.approx(expected.item(), rel=1e-4)
    w1, b1, w2 = layer.intermediate.dense.weight, layer.intermediate.dense.bias, layer.output.dense.weight
    expected = -((w1[5] * grads[id(w1)][5]).sum() + b1[5] * grads[id(b1)][5] + (w2[:, 5] * grads[id(w2)][:, 5]).sum())
    assert neurons[1][5].item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("sparsity,head_ratio", [(0.5, 0.6), (0.5, 0.0), (0.3, 1.8), (0.7, 0.5)])
def test_head_ratio_moves_the_removal_between_heads_and_neurons_at_the_same_sparsity(sparsity, head_ratio):
    """e5-small shape: heads lose head_ratio x the target share, neurons the rest; still exact."""
    scores = e5_small_scores()
    mask = select_mask(scores, sparsity, 384, 32, Selection(head_ratio=head_ratio))
    assert_within_half_a_neuron(mask, sparsity)
    assert int((~mask.kept_heads).sum()) == round(head_ratio * sparsity * 144)
    same = select_mask(scores, sparsity, 384, 32)
    assert int((~same.kept_heads).sum()) == round(sparsity * 144)
    if head_ratio < 1:   # fewer heads removed, more neurons, each type still its highest scores
        assert (same.kept_heads & ~mask.kept_heads).sum() == 0 and (mask.kept_neurons & ~same.kept_neurons).sum() == 0


@pytest.mark.parametrize("sparsity,head_ratio,message", [
    (0.7, 0.1, "pruning.head_ratio: 0.1 at sparsity 0.7 needs 7% of the heads and 102% of the neurons removed "
               "(expected a ratio from 0.14 to 1.43 at this sparsity)"),
    (0.5, 2.5, "pruning.head_ratio: 2.5 at sparsity 0.5 needs 125% of the heads"),
])
def test_a_head_ratio_the_shape_cannot_honour_is_one_line(sparsity, head_ratio, message):
    scores = UnitScores(torch.rand(12, 12), torch.rand(12, 1536))
    with pytest.raises(RaysparseError) as error:
        select_mask(scores, sparsity, 384, 32, Selection(head_ratio=head_ratio))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    with pytest.raises(RaysparseError, match="pruning.head_ratio: expected a number >= 0"):
        Selection(head_ratio=-0.5)
