"""Movement scores, layer dropping (depth vs width), distillation losses, the per-language
importance study, and: every newly registered algorithm reaches the exact target sparsity."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch

import raysparse
from raysparse.data.parallel import parallel_pairs
from raysparse.errors import RaysparseError
from raysparse.pruning import ALGORITHMS, Selection, UnitScores, get_algorithm, select_mask
from raysparse.pruning.analysis import head_overlap, jaccard, layer_importance, masks_per_language, write_language_study
from raysparse.pruning.layers import select_layers
from raysparse.pruning.movement import MovementImportance
from raysparse.structure import Mask, encoder_sparsity_of, params_per_head, params_per_neuron, shrink
from raysparse.training.distill import (Distillation, distillation_loss, forward_outputs, hidden_state_loss,
                                        layer_map_for, target_outputs, teacher_outputs)
from raysparse.training.loop import Forward
from raysparse.training.retrieval import contrastive_loss, pair_batches

HIDDEN, HEAD_DIM = 384, 32
TOTAL = 12 * (12 * params_per_head(HIDDEN, HEAD_DIM) + 1536 * params_per_neuron(HIDDEN))
HALF_NEURON = params_per_neuron(HIDDEN) / 2 / TOTAL
LAYER = 1 / 12          # one layer's share of the prunable parameters


@pytest.fixture(scope="module")
def model():
    return raysparse.load_model("embedded")


@pytest.fixture(scope="module")
def batches(embedded_tokenizer, data_dir):
    sources, targets = parallel_pairs("xnli", ["de", "ru", "zh", "sw"], max_pairs=8, seed=1, data_dir=data_dir)
    return pair_batches(embedded_tokenizer, sources, targets, 4, max_length=16)


def sparsity(mask):
    return encoder_sparsity_of(mask, HIDDEN, HEAD_DIM)


# --- movement ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_movement_accumulates_minus_weight_times_gradient_per_unit(model, batches):
    assert ALGORITHMS["movement"] is MovementImportance and MovementImportance.learns_during_training
    student = copy.deepcopy(model)
    alg = get_algorithm("movement")
    alg.attach(student)
    optimizer = torch.optim.SGD([p for p in student.encoder.parameters()], lr=1e-3)
    expected_head = expected_neuron = 0.0
    for step, batch in enumerate(batches):
        loss = contrastive_loss(student, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            layer = student.encoder.layer[2]
            attn, rows = layer.attention.self, slice(5 * HEAD_DIM, 6 * HEAD_DIM)   # head 5 of layer 2
            expected_head -= sum(float((p[rows] * p.grad[rows]).sum()) for proj in (attn.query, attn.key, attn.value)
                                 for p in (proj.weight, proj.bias))
            out = layer.attention.output.dense.weight
            expected_head -= float((out[:, rows] * out.grad[:, rows]).sum())
            w1, w2 = layer.intermediate.dense, layer.output.dense.weight            # neuron 7 of layer 2
            expected_neuron -= float((w1.weight[7] * w1.weight.grad[7]).sum() + w1.bias[7] * w1.bias.grad[7]
                                     + (w2[:, 7] * w2.grad[:, 7]).sum())
        alg.after_backward(student, step)
        optimizer.step()
    alg.detach(student)
    scores = alg.score(student)
    assert alg.steps == len(batches) and alg.metrics()["movement_steps"] == len(batches)
    assert scores.heads.shape == (12, 12) and scores.neurons.shape == (12, 1536)
    assert torch.isfinite(scores.heads).all() and torch.isfinite(scores.neurons).all()
    assert (scores.heads != 0).all() and (scores.neurons != 0).float().mean() > 0.99
    assert float(scores.heads[2, 5]) == pytest.approx(expected_head, rel=1e-4, abs=1e-7)
    assert float(scores.neurons[2, 7]) == pytest.approx(expected_neuron, rel=1e-4, abs=1e-9)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_movement_one_shot_and_on_a_shrunk_model(model, batches):
    with pytest.raises(RaysparseError, match="needs scoring data"):
        MovementImportance().score(model)
    scores = MovementImportance(max_batches=1).score(model, batches, contrastive_loss)
    assert torch.isfinite(scores.heads).all() and (scores.heads != 0).all()
    student = copy.deepcopy(model)
    mask = select_mask(scores, 0.4, HIDDEN, HEAD_DIM)
    shrink(student, mask)
    shrunk = MovementImportance(max_batches=1).score(student, batches, contrastive_loss)
    assert torch.isinf(shrunk.heads[~mask.kept_heads]).all() and torch.isfinite(shrunk.heads[mask.kept_heads]).all()
    assert torch.isinf(shrunk.neurons[~mask.kept_neurons]).all()


# --- layer dropping -----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_layerdrop_by_position_drops_top_or_bottom_layers(model):
    top = get_algorithm("layerdrop")
    mask = top.final_mask(model, 0.25)
    assert mask.kept_layers.tolist() == [True] * 9 + [False] * 3
    assert sparsity(mask) == pytest.approx(0.25, abs=1e-12)
    assert top.metrics() == {"layers_dropped": 3.0, "achieved_sparsity": pytest.approx(0.25)}
    bottom = get_algorithm("layerdrop", drop_first="bottom")
    assert bottom.final_mask(model, 0.25).kept_layers.tolist() == [False] * 3 + [True] * 9
    # 0.3 lies nearer 4/12 than 3/12: whole layers reach only multiples of 1/12
    assert top.final_mask(model, 0.3).kept_layers.sum() == 8 and top.metrics()["layers_dropped"] == 4
    with pytest.raises(RaysparseError, match="pruning.options.by"):
        get_algorithm("layerdrop", by="depth")
    scores = UnitScores(torch.zeros(4, 2), torch.zeros(4, 3), torch.tensor([3.0, 1.0, 2.0, 1.0]))
    assert select_layers(scores, 2).kept_layers.tolist() == [True, False, True, False]


@pytest.mark.timeout(240)
def test_layerdrop_by_gradient_and_depth_vs_width_at_equal_removed_parameters(model, batches):
    alg = get_algorithm("layerdrop", by="gradient", max_batches=2)
    assert alg.needs_data
    with pytest.raises(RaysparseError, match="before final_mask"):
        alg.final_mask(model, 0.3)
    scores = alg.score(model, batches, contrastive_loss)
    assert scores.layers.shape == (12,) and torch.isfinite(scores.layers).all() and (scores.layers > 0).all()
    depth = alg.final_mask(model, 0.3)
    dropped = (~depth.kept_layers).nonzero().flatten().tolist()
    assert len(dropped) == 4
    assert sorted(dropped) == sorted(torch.argsort(scores.layers)[:4].tolist())   # the least important layers
    achieved = sparsity(depth)
    assert alg.metrics()["achieved_sparsity"] == pytest.approx(achieved)

    width_scores = get_algorithm("magnitude").score(model)
    width = select_mask(width_scores, 0.3, HIDDEN, HEAD_DIM)
    assert abs(sparsity(width) - achieved) <= LAYER
    matched = select_mask(width_scores, achieved, HIDDEN, HEAD_DIM)               # equal removed parameters
    assert sparsity(matched) == pytest.approx(achieved, abs=HALF_NEURON)
    assert depth.kept_layers.sum() == 8 and matched.kept_layers.all()


# --- distillation -------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_distillation_loss_zero_for_identical_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=g)
    assert float(distillation_loss({"logits": logits}, {"logits": logits.clone()}, 2.0, 0.5)) == pytest.approx(0, abs=1e-6)
    assert float(distillation_loss({"logits": logits}, {"logits": logits + torch.randn(6, 3, generator=g)}, 2.0, 0.5)) > 1e-3
    tokens = torch.randn(2, 5, 7, generator=g)                                      # tagging: [batch, seq, labels]
    assert float(distillation_loss({"logits": tokens}, {"logits": tokens}, 1.0, 1.0)) == pytest.approx(0, abs=1e-6)
    emb = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)   # retrieval: similarity logits
    assert float(distillation_loss({"embeddings": emb}, {"embeddings": emb}, 1.0, 1.0)) == pytest.approx(0, abs=1e-6)
    assert float(distillation_loss({"embeddings": emb}, {"embeddings": emb.roll(1, 0)}, 1.0, 1.0)) > 1e-3
    # T^2 scaling and the task term
    t = 4.0
    a, b = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    kl = torch.nn.functional.kl_div(torch.log_softmax(a / t, -1), torch.softmax(b / t, -1), reduction="batchmean")
    assert float(distillation_loss({"logits": a}, {"logits": b}, t, 1.0)) == pytest.approx(float(kl) * t * t, rel=1e-5)
    mixed = distillation_loss({"logits": a, "loss": torch.tensor(2.0)}, {"logits": b}, t, 0.25)
    assert float(mixed) == pytest.approx(0.25 * float(kl) * t * t + 0.75 * 2.0, rel=1e-5)
    with pytest.raises(RaysparseError, match="hidden states"):
        distillation_loss({"logits": a}, {"logits": b}, 2.0, 0.5, hidden_weight=1.0)


@pytest.mark.timeout(240)
def test_hidden_state_matching_uses_the_layer_map_of_a_shrunk_student(model, batches):
    teacher = model
    student = copy.deepcopy(model)
    mask = Mask.for_model(student)
    mask.kept_layers[[3, 7]] = False
    shrink(student, mask)
    layer_map = layer_map_for(student)
    assert layer_map == {0: 0, 1: 1, 2: 2, 3: 3, 4: 5, 5: 6, 6: 7, 7: 9, 8: 10, 9: 11, 10: 12}
    batch = batches[0]
    with torch.no_grad():
        s = forward_outputs(student, batch, hidden_states=True)
    t = teacher_outputs(teacher, batch)
    assert len(s["hidden_states"]) == 11 and len(t["hidden_states"]) == 13
    # before the first dropped layer the student computes exactly what the teacher does
    for k in (0, 1, 2, 3):
        assert float(hidden_state_loss(s["hidden_states"], t["hidden_states"], {k: layer_map[k]})) < 1e-9
    assert float(hidden_state_loss(s["hidden_states"], t["hidden_states"], {4: 5})) > 1e-6
    with pytest.raises(RaysparseError, match="layer_map"):
        hidden_state_loss(s["hidden_states"], t["hidden_states"])
    same = teacher_outputs(teacher, batch)
    assert float(distillation_loss(same, t, 2.0, 0.5, hidden_weight=1.0)) == pytest.approx(0, abs=1e-9)
    assert float(distillation_loss(s, t, 2.0, 0.5, hidden_weight=1.0, layer_map=layer_map)) > 0

    config = SimpleNamespace(temperature=2.0, alpha=0.5, hidden=True, hidden_weight=1.0)
    outputs = forward_outputs(student, batch, hidden_states=True)
    task = contrastive_loss(student, batch)
    callback = Distillation(teacher, config, {None: layer_map})
    loss = callback.after_loss(0, Forward(task, batch, outputs))
    assert torch.isfinite(loss) and loss.requires_grad and float(loss.detach()) > 0.5 * float(task.detach())


def test_hidden_states_are_matched_on_real_tokens_only(model, batches):
    """Padding positions carry nothing the pooled embedding reads: a student that differs from the
    teacher only there has zero hidden-state loss; a difference on one real token counts."""
    batch = batches[0]
    real = torch.cat([side["attention_mask"].reshape(-1) for side in batch]).bool()
    assert 0 < int(real.sum()) < real.numel()                # the pair batch is padded
    t = teacher_outputs(model, batch)
    assert torch.equal(t["hidden_mask"].reshape(-1), real)
    hidden = t["hidden_states"]
    junk = tuple(h.masked_fill(~t["hidden_mask"][..., None], 7.0) for h in hidden)
    assert float(hidden_state_loss(junk, hidden, mask=t["hidden_mask"])) == 0
    assert float(hidden_state_loss(junk, hidden)) > 1                 # unmasked, the padding would count
    student = {**t, "hidden_states": junk}
    assert float(distillation_loss(student, t, 2.0, 0.5, hidden_weight=1.0)) == pytest.approx(0, abs=1e-9)
    first = int(real.nonzero()[0])
    moved = tuple(h.clone() for h in hidden)
    moved[3].reshape(-1, moved[3].shape[-1])[first] += 1.0
    assert float(hidden_state_loss(moved, hidden, mask=t["hidden_mask"])) > 0


def test_cached_teacher_targets_give_the_loss_the_teacher_gives(model, batches):
    """Soft targets read from a cache (computed once, on the CPU) equal running the frozen teacher."""
    teacher, student = model, copy.deepcopy(model)
    mask = Mask.for_model(student)
    mask.kept_heads[:, ::2] = False
    shrink(student, mask)
    config = SimpleNamespace(temperature=2.0, alpha=0.7, hidden=False, hidden_weight=1.0)
    targets = {step: target_outputs(teacher, batch) for step, batch in enumerate(batches[:2])}
    assert set(targets[0]) == {"embeddings"}
    for step, batch in enumerate(batches[:2]):
        outputs = forward_outputs(student, batch)
        task = contrastive_loss(student, batch)
        live = Distillation(teacher, config).after_loss(step, Forward(task, batch, outputs))
        cached = Distillation(None, config, targets=targets).after_loss(step, Forward(task, batch, outputs))
        assert float(cached) == pytest.approx(float(live), rel=1e-6)
        assert float(live) != pytest.approx(0.3 * float(task), rel=1e-3)   # the soft term is there
    with pytest.raises(RaysparseError, match="no outputs"):
        Distillation(teacher, config).after_loss(0, Forward(task, batches[0]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_batch_of_rows_met_before_is_read_from_memory_as_the_teacher_gives_it(model, embedded_tokenizer,
                                                                               data_dir, dtype):
    """Rows met in other batches, padded to another length and in another order, are put together from
    what the teacher gave for them: the teacher does not run, and the distillation loss (soft targets
    and hidden states) is the one the teacher's own pass gives. A new row, or a cache that is off or
    full, runs the teacher."""
    from raysparse.training.batches import build_task_model
    from raysparse.training.retrieval import tokenize
    from raysparse.training.teacher_cache import TeacherCache

    sources, targets = parallel_pairs("xnli", ["de", "ru"], max_pairs=6, seed=3, data_dir=data_dir)
    texts = sources[:4] + targets[:4]
    batch = lambda rows: dict(tokenize(embedded_tokenizer, rows, "query: ", 32))   # noqa: E731
    first = batch(texts)
    shortest = sorted(range(len(texts)), key=lambda i: int(first["attention_mask"][i].sum()))[:4]
    again = batch([texts[i] for i in reversed(shortest)])
    assert again["input_ids"].shape[1] < first["input_ids"].shape[1]     # padded to another length
    retrieval = build_task_model(model, "tatoeba")   # sentence embeddings, as recovery distils them
    teacher = lambda b: teacher_outputs(retrieval, b, dtype=dtype)   # noqa: E731
    student = copy.deepcopy(retrieval)
    mask = Mask.for_model(student)
    mask.kept_neurons[:, ::2] = False
    shrink(student, mask)
    with torch.no_grad():
        student_out = forward_outputs(student, again, hidden_states=True)

    cache = TeacherCache(1 << 30, torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    for _ in range(2):   # a row's outputs are kept when it comes again (rows met once cost no memory)
        cache.outputs(first, teacher)
    assert (cache.passes, len(cache.rows)) == (2, len(texts))
    kept = cache.outputs(again, lambda b: pytest.fail("the teacher ran on rows it has kept"))
    assert cache.passes == 2
    live = teacher(again)
    assert torch.equal(kept["hidden_mask"], live["hidden_mask"])
    torch.testing.assert_close(kept["embeddings"], live["embeddings"], atol=2e-3 if dtype == "bfloat16" else 1e-5,
                               rtol=0)
    for k, v in zip(kept["hidden_states"], live["hidden_states"]):
        torch.testing.assert_close(k[live["hidden_mask"]], v[live["hidden_mask"]], rtol=0,
                                   atol=0.1 if dtype == "bfloat16" else 1e-4)
    losses = [float(distillation_loss(student_out, out, 2.0, 0.5, hidden_weight=1.0)) for out in (kept, live)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3 if dtype == "bfloat16" else 1e-5)

    mixed = batch([sources[4], texts[shortest[0]], targets[4], texts[shortest[1]]])   # two new rows, two kept
    run = cache.rows_run
    got, live = cache.outputs(mixed, teacher), teacher(mixed)
    assert (cache.passes, cache.rows_run - run) == (3, 2)         # the teacher ran on the new rows alone
    torch.testing.assert_close(got["embeddings"], live["embeddings"], atol=2e-3 if dtype == "bfloat16" else 1e-5,
                               rtol=0)
    for limit in (0, 1):   # off; full after one row
        small = TeacherCache(limit)
        for b in (first, first, again):
            small.outputs(b, teacher)
        assert (small.passes, len(small.rows)) == (3, limit)


def test_a_bfloat16_teacher_gives_float32_targets_close_to_the_float32_teacher(model, batches):
    exact = teacher_outputs(model, batches[0])
    fast = teacher_outputs(model, batches[0], dtype="bfloat16")
    assert fast["embeddings"].dtype == torch.float32 and all(h.dtype == torch.float32 for h in fast["hidden_states"])
    assert not torch.equal(fast["embeddings"], exact["embeddings"])      # it did run in bfloat16
    cosine = torch.nn.functional.cosine_similarity(fast["embeddings"], exact["embeddings"])
    assert float(cosine.min()) > 0.99
    soft = distillation_loss(fast, exact, temperature=2.0, alpha=1.0)
    assert float(soft) < 0.01 * float(distillation_loss(teacher_outputs(model, batches[1]), exact, 2.0, 1.0))


# --- importance per language ----------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_language_study_overlap_and_artifacts(tmp_path):
    a = Mask.full(12, 12, 1536)
    a.kept_heads[:, 6:] = False
    b = Mask.full(12, 12, 1536)
    b.kept_heads[:, :6] = False
    assert jaccard(a.kept_heads, a.kept_heads.clone()) == 1.0
    assert jaccard(a.kept_heads, b.kept_heads) == 0.0
    overlap = head_overlap({"de": a, "de2": copy.deepcopy(a), "sw": b})
    assert overlap["heads"]["matrix"][0][1] == 1.0 and overlap["heads"]["matrix"][0][2] == 0.0
    pair = next(p for p in overlap["pairs"] if (p["a"], p["b"]) == ("de", "sw"))
    assert pair["heads_per_layer"] == [0.0] * 12 and pair["neurons"] == 1.0

    g = torch.Generator().manual_seed(0)
    base = UnitScores(torch.rand(12, 12, generator=g) * torch.arange(1, 13)[:, None], torch.rand(12, 1536, generator=g))
    scores = {"de": base, "fr": UnitScores(base.heads.clone(), base.neurons.clone()),
              "sw": UnitScores(torch.rand(12, 12, generator=g), torch.rand(12, 1536, generator=g))}
    masks = masks_per_language(scores, 0.5, HIDDEN, HEAD_DIM)
    assert all(sparsity(m) == pytest.approx(0.5, abs=HALF_NEURON) for m in masks.values())
    importance = layer_importance(base)
    assert importance.mean() == pytest.approx(1.0, abs=1e-5) and importance[-1] > importance[0]

    paths = write_language_study(tmp_path / "study", scores, 0.5, HIDDEN, HEAD_DIM, Selection(normalize="none"))
    written = json.loads(paths["overlap"].read_text())
    assert written["languages"] == ["de", "fr", "sw"] and written["heads"]["matrix"][0][1] == 1.0
    assert 0.0 <= written["heads"]["matrix"][0][2] < 1.0 and written["sparsity"] == 0.5
    for key in ("importance_png", "overlap_png"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    torch.testing.assert_close(UnitScores.load(paths["scores"] / "sw.safetensors").heads, scores["sw"].heads)
    assert Mask.load(paths["masks"] / "de.json") == masks_per_language(scores, 0.5, HIDDEN, HEAD_DIM,
                                                                         Selection(normalize="none"))["de"]


# --- every new algorithm reaches the exact target ---------------------------------------------------------
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["l0", "movement", "layerdrop"])
def test_new_algorithms_reach_exact_target_sparsity(name, model, batches):
    target = 0.37
    student = copy.deepcopy(model) if name == "l0" else model
    alg = get_algorithm(name, **({"target_sparsity": target} if name == "l0" else {}))
    if alg.learns_during_training and name == "l0":
        alg.attach(student)
        optimizer = torch.optim.AdamW(alg.extra_parameters(), lr=1e-3)
        student.requires_grad_(False)
        student.train()
        for step, batch in enumerate(batches):
            loss = contrastive_loss(student, batch) + alg.regularization(step, len(batches))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            alg.after_backward(student, step)
            optimizer.step()
        alg.detach(student)
    final = alg.final_mask(student, target)
    if final is None:
        final = select_mask(alg.score(student, batches, contrastive_loss), target, HIDDEN, HEAD_DIM)
    if name == "layerdrop":
        # whole layers: the nearest multiple of 1/12, and exact through select_mask from its scores
        assert sparsity(final) == pytest.approx(round(target * 12) / 12, abs=1e-12)
        final = select_mask(alg.score(student), target, HIDDEN, HEAD_DIM, Selection(normalize="none"))
    assert sparsity(final) == pytest.approx(target, abs=HALF_NEURON)
    assert int((~final.effective_heads()).sum()) == round(target * 144)
