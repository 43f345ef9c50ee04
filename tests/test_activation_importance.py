"""Activation importance: each unit's root-mean-square contribution to the residual stream over the
scoring batches' real tokens, checked against a direct computation on real XNLI pairs."""

import pytest
import torch

import raysparse
from raysparse.data.parallel import parallel_pairs
from raysparse.errors import RaysparseError
from raysparse.pruning import get_algorithm
from raysparse.structure import Encoder, Mask, shrink
from raysparse.training.retrieval import contrastive_loss, pair_batches


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return raysparse.load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def pairs(data_dir):
    return parallel_pairs("xnli", ["de", "zh"], max_pairs=6, seed=0, data_dir=data_dir)


def batches_of(tiny_model_dir, pairs, pad_to: int | None = None):
    """Pair batches padded to their longest sentence, or every side padded on to ``pad_to`` tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    batches = pair_batches(tokenizer, *pairs, 4, max_length=32)
    if pad_to is None:
        return batches

    def pad(side):
        extra = pad_to - side["input_ids"].shape[1]
        fill = {"input_ids": tokenizer.pad_token_id}
        return {k: torch.nn.functional.pad(v, (0, extra), value=fill.get(k, 0)) for k, v in side.items()}
    return [(pad(source), pad(target)) for source, target in batches]


def direct_contributions(model, batches, layer: int, head: int, neuron: int) -> tuple[float, float]:
    """RMS over real tokens of |W_O[:, head] z_head| and |a_neuron W2[:, neuron]|, from hooks."""
    enc = Encoder(model)
    out, w2 = enc.attention_output(enc.layers[layer]), enc.ffn_output(enc.layers[layer])
    seen = {"out": [], "w2": []}
    handles = [out.register_forward_pre_hook(lambda m, a: seen["out"].append(a[0])),
               w2.register_forward_pre_hook(lambda m, a: seen["w2"].append(a[0]))]
    head_sq, neuron_sq, tokens = 0.0, 0.0, 0
    cols = slice(head * enc.head_dim, (head + 1) * enc.head_dim)
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                seen["out"].clear(), seen["w2"].clear()
                contrastive_loss(model, batch)
                for side, z, a in zip(batch, seen["out"], seen["w2"]):
                    real = side["attention_mask"].bool()
                    head_sq += float((z[real][:, cols] @ out.weight[:, cols].T).pow(2).sum())
                    neuron_sq += float((a[real][:, neuron:neuron + 1] @ w2.weight[:, neuron:neuron + 1].T).pow(2).sum())
                    tokens += int(real.sum())
    finally:
        for handle in handles:
            handle.remove()
    return (head_sq / tokens) ** 0.5, (neuron_sq / tokens) ** 0.5


def test_scores_are_each_units_rms_contribution_over_real_tokens(tiny, tiny_model_dir, pairs):
    batches = batches_of(tiny_model_dir, pairs)
    scores = get_algorithm("activation").score(tiny, batches, contrastive_loss)
    for layer, head, neuron in [(0, 1, 5), (1, 0, 17)]:
        head_rms, neuron_rms = direct_contributions(tiny, batches, layer, head, neuron)
        assert float(scores.heads[layer, head]) == pytest.approx(head_rms, rel=1e-4)
        assert float(scores.neurons[layer, neuron]) == pytest.approx(neuron_rms, rel=1e-4)
    assert bool((scores.heads > 0).all()) and bool((scores.neurons >= 0).all())
    # padding every batch to the full length changes what the model computes nowhere that counts
    padded = get_algorithm("activation").score(tiny, batches_of(tiny_model_dir, pairs, pad_to=48),
                                               contrastive_loss)
    assert torch.allclose(padded.heads, scores.heads, rtol=1e-4) and torch.allclose(padded.neurons, scores.neurons,
                                                                                     rtol=1e-4, atol=1e-6)


def test_a_shrunk_model_scores_its_kept_units_in_original_coordinates(tiny, tiny_model_dir, pairs):
    import copy

    batches = batches_of(tiny_model_dir, pairs)
    full = get_algorithm("activation").score(tiny, batches, contrastive_loss)
    mask = Mask.for_model(tiny)
    mask.kept_neurons[0, ::2] = False           # FFN neurons write independently: the kept ones score as before
    student = copy.deepcopy(tiny)
    shrink(student, mask)
    shrunk = get_algorithm("activation").score(student, batches, contrastive_loss, mask=mask)
    assert torch.isinf(shrunk.neurons[0, ::2]).all()
    assert torch.allclose(shrunk.neurons[0, 1::2], full.neurons[0, 1::2], rtol=1e-4, atol=1e-6)
    with pytest.raises(RaysparseError, match="activation importance needs scoring data"):
        get_algorithm("activation").score(tiny)
