"""Depth versus width at equal encoder sparsity, timed in interleaved rounds, on a tiny random encoder.

Timings are never asserted against each other (the machine is shared): only the shapes of
the result, that the interval holds the point ratio, that the verdict follows the interval,
and that both cuts remove the same share of the encoder.
"""

import statistics

import pytest
import torch
from transformers import XLMRobertaConfig, XLMRobertaModel

from raysparse.efficiency import ratio_interval
from raysparse.efficiency.depth_width import VERDICTS, depth_vs_width, depth_vs_width_latency
from raysparse.errors import RaysparseError
from raysparse.structure import params_per_head, params_per_neuron

HIDDEN, HEADS, FFN, LAYERS = 32, 4, 64, 4
PRUNABLE = LAYERS * (HEADS * params_per_head(HIDDEN, HIDDEN // HEADS) + FFN * params_per_neuron(HIDDEN))
ONE_NEURON = params_per_neuron(HIDDEN) / PRUNABLE


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=120, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                              intermediate_size=FFN, max_position_embeddings=64, pad_token_id=1)
    return XLMRobertaModel(config).eval()


@pytest.mark.timeout(120)
def test_rounds_ratios_and_equal_sparsity(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    result = depth_vs_width_latency(tiny, (0.25, 0.5, 0.75), batch_sizes=(1, 2), sequence_length=16, rounds=7,
                                    warmup=1, threads=1, resamples=500)
    assert [(r.removed_layers, r.batch_size) for r in result.rows] == [(k, b) for k in (1, 2, 3) for b in (1, 2)]
    assert result.dropped_layers == {1: [3], 2: [2, 3], 3: [1, 2, 3]}
    for r in result.rows:
        timed = result.times[(r.removed_layers, r.batch_size)]
        assert sorted(timed) == ["dense", "depth", "width"] and all(len(v) == 7 for v in timed.values())
        assert r.sparsity == pytest.approx(r.removed_layers / LAYERS)
        assert abs(r.width_sparsity - r.sparsity) <= ONE_NEURON            # equal within rounding
        assert (r.dense_ms, r.depth_ms, r.width_ms) == tuple(statistics.median(timed[n])
                                                             for n in ("dense", "depth", "width"))
        assert r.ratio == pytest.approx(r.width_ms / r.depth_ms)
        assert r.ratio_low <= r.ratio <= r.ratio_high
        assert r.depth_speedup == pytest.approx(r.dense_ms / r.depth_ms)
        assert r.verdict == ("depth faster" if r.ratio_low > 1 else "width faster" if r.ratio_high < 1
                             else "undecided")
        assert r.as_dict()["verdict"] in VERDICTS
    lines = result.table().splitlines()
    assert len(lines) == 2 + len(result.rows)
    assert "threads 1" in lines[0] and f"torch {torch.__version__}" in lines[0]
    assert all(column in lines[1] for column in ("dense ms", "depth x", "width/depth", "95% interval", "verdict"))
    assert result.environment["threads"] == 1
    assert all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())    # the model is copied, not cut


@pytest.mark.timeout(30)
def test_ratio_interval_resamples_paired_rounds():
    g = torch.Generator().manual_seed(0)
    depth = (10 + torch.rand(30, generator=g)).tolist()
    drift = [d * (1 + 0.5 * (i % 3)) for i, d in enumerate(depth)]            # load that both models saw
    ratio, low, high = ratio_interval([1.2 * d for d in drift], drift)
    assert ratio == pytest.approx(1.2) and low == pytest.approx(1.2) and high == pytest.approx(1.2)
    ratio, low, high = ratio_interval(drift, drift)
    assert (ratio, low, high) == (1.0, 1.0, 1.0)
    ratio, low, high = ratio_interval(depth[::-1], depth)     # same times, other rounds: no difference to find
    assert ratio == 1.0 and low < 1 < high
    with pytest.raises(RaysparseError, match="paired"):
        ratio_interval([1.0, 2.0], [1.0])


@pytest.mark.timeout(30)
def test_sparsities_must_drop_whole_layers(tiny):
    with pytest.raises(RaysparseError, match="depth.sparsities"):
        depth_vs_width_latency(tiny, (0.05,), rounds=3)
    with pytest.raises(RaysparseError, match="depth.rounds"):
        depth_vs_width_latency(tiny, (0.5,), rounds=1)


@pytest.mark.timeout(60)
def test_one_sparsity_comparison_and_latency_harness_on_the_same_cuts(tiny):
    result = depth_vs_width(tiny, None, 2, pairs={}, batch_sizes=(1, 2), sequence_length=8, warmup=1, repeats=3,
                            threads=1)
    assert result.dropped_layers == [2, 3] and result.quality == {}
    assert result.sizes["depth"].encoder_sparsity == pytest.approx(0.5)
    assert abs(result.sizes["width"].encoder_sparsity - 0.5) <= ONE_NEURON
    assert [(r.name, r.batch_size) for r in result.latency] == [(n, b) for b in (1, 2)
                                                                for n in ("dense", "depth", "width")]
    assert all(r.repeats == 3 and r.threads == 1 and r.p10_ms <= r.median_ms <= r.p90_ms for r in result.latency)
    assert result.speedups()[("dense", 1)] == 1.0
