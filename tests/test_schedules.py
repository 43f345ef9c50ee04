"""The gradual schedule through the pipeline: during fine-tuning the shared mask tightens every
``pruning.prune_every`` steps along Zhu & Gupta's cubic ramp, reaching the target after ``ramp_fraction``
of the steps, and units once removed stay removed. In-process on the tiny encoder (``LocalSession``)."""

import pytest

from raysparse.runner import as_spec, preflight
from raysparse.structure import Mask, encoder_sparsity_of, params_per_neuron
from raysparse.training.loop import Callback
from raysparse.training.pipeline import build_pipeline
from raysparse.training.session import LocalSession
from tests.test_pipeline import HEAD_DIM, HIDDEN, TOTAL, tiny_spec

STEPS, EVERY, RAMP, TARGET = 12, 3, 0.75, 0.5


def cubic(step: int) -> float:
    """METHOD.md's ramp s_t = s_f + (s_0 - s_f)(1 - (t - t_0)/(t_1 - t_0))^3 with s_0 = 0, t_0 = 0 and
    t_1 = ramp_fraction x fine-tuning steps."""
    end = RAMP * STEPS
    return TARGET if step >= end else TARGET * (1 - (1 - step / end) ** 3)


class MaskPerStep(Callback):
    """The shared mask after every fine-tuning step (after the schedule's own callback ran)."""

    def __init__(self, pipeline):
        self.pipeline, self.masks = pipeline, {}

    def on_step_end(self, step, loss):
        if self.pipeline.state.stage == "finetune":
            mask = self.pipeline.state.masks.get("shared")
            self.masks[step] = None if mask is None else mask.to_dict()


@pytest.mark.timeout(300)
def test_gradual_tightens_the_mask_every_prune_every_steps_on_the_cubic_ramp(tiny_model_dir, capsys):
    data = tiny_spec(tiny_model_dir, "gradual", schedule="gradual", sparsity=TARGET, prune_every=EVERY,
                     ramp_fraction=RAMP)
    data["finetune"]["steps"] = STEPS
    spec = as_spec(data)
    pipeline = build_pipeline(spec, preflight(spec), LocalSession())
    watch = MaskPerStep(pipeline)
    pipeline.observers.append(watch)
    pipeline.execute()

    masks = {step: None if m is None else Mask.from_dict(m) for step, m in watch.masks.items()}
    assert sorted(masks) == list(range(1, STEPS + 1))
    sparsity = {step: 0.0 if m is None else encoder_sparsity_of(m, HIDDEN, HEAD_DIM) for step, m in masks.items()}
    granularity = params_per_neuron(HIDDEN) / 2 / TOTAL          # selection is exact up to half a neuron
    expected = {}
    for step in range(1, STEPS + 1):
        # re-scored only on multiples of prune_every, and only when the ramp has risen
        expected[step] = cubic(step) if step % EVERY == 0 else expected.get(step - 1, 0.0)
    assert sparsity == pytest.approx(expected, abs=granularity), sparsity
    assert [step for step in range(2, STEPS + 1) if watch.masks[step] != watch.masks[step - 1]] == [3, 6, 9], \
        "the mask changes only on multiples of prune_every where the ramp rises (flat at the target: step 12)"
    assert masks[EVERY - 1] is None and masks[EVERY] is not None
    for earlier, later in zip(range(EVERY, STEPS), range(EVERY + 1, STEPS + 1)):   # removed units stay removed
        assert not (masks[later].effective_heads() & ~masks[earlier].effective_heads()).any()
        assert not (masks[later].effective_neurons() & ~masks[earlier].effective_neurons()).any()
    printed = capsys.readouterr().out
    assert [line for line in printed.splitlines() if line.startswith("[gradual]")] == \
        [f"[gradual] step {step}: sparsity {cubic(step):.3f}" for step in (3, 6, 9)]

    final = pipeline.state.masks["shared"]        # the prune stage selects the target under the last mask
    assert pipeline.state.metrics["encoder_sparsity"] == pytest.approx(TARGET, abs=granularity)
    assert not (final.effective_heads() & ~masks[STEPS].effective_heads()).any()
    assert not (final.effective_neurons() & ~masks[STEPS].effective_neurons()).any()
