"""Fine-tuning and evaluating task heads on real XTREME data with the embedded model.

XNLI zero-shot: a short fine-tune on a few hundred rows of the English training part
must beat the majority class on other languages' held-out rows; the fine-tuned model
must save and reload to the same numbers; per-language masks must change them. The other
trainable tasks are fine-tuned and evaluated on the tiny encoder in test_task_finetune.py.
"""

from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch

import raysparse
from raysparse.cli import main
from raysparse.data.features import IGNORE_INDEX
from raysparse.data.regimes import evaluation_data, training_data
from raysparse.errors import RaysparseError
from raysparse.metric_keys import interval_keys
from raysparse.models.heads import TaskModel
from raysparse.structure import Mask, save_pruned
from raysparse.structure.adapters import Encoder
from raysparse.training.batches import build_task_model, task_features, task_loader, task_loss
from raysparse.training.evaluate import evaluate
from raysparse.training.finetune import finetune, freeze_word_embeddings, make_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED, FRACTION = 0, 0.5
XNLI_LANGUAGES = ["de", "es", "ru"]
XNLI_EXAMPLES = 200  # held-out rows scored per language


@pytest.fixture(scope="module")
def xnli(embedded_dir, embedded_tokenizer, data_dir):
    """The embedded encoder fine-tuned on 512 English XNLI rows (32 steps of 16, length 64)."""
    model = build_task_model(raysparse.load_model(str(embedded_dir)), "xnli", seed=SEED)
    freeze_word_embeddings(model)
    english = training_data("xnli", "zero-shot", XNLI_LANGUAGES, SEED, FRACTION, data_dir)
    rows = english.rows().shuffle(seed=SEED).select(range(512))
    loader = task_loader("xnli", embedded_tokenizer, rows, 16, max_length=64, seed=SEED)
    losses = finetune(model, loader, steps=32, learning_rate=1e-4, warmup_ratio=0.1, seed=SEED, log_every=8)
    result = evaluate(model, embedded_tokenizer, "xnli", XNLI_LANGUAGES, data_dir=data_dir, max_examples=XNLI_EXAMPLES,
                      seed=SEED, train_fraction=FRACTION)
    print(result.table())
    return model, losses, result


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_xnli_zero_shot_beats_majority(xnli, data_dir):
    model, losses, result = xnli
    assert len(losses) == 32 and all(math.isfinite(loss) for loss in losses)
    held_out = evaluation_data("xnli", XNLI_LANGUAGES, SEED, FRACTION, data_dir)
    beaten = []
    for language in XNLI_LANGUAGES:
        labels = held_out[language].rows["label"][:XNLI_EXAMPLES]
        majority = Counter(labels).most_common(1)[0][1] / len(labels)
        accuracy = result.per_language[language]["accuracy"]
        print(f"{language}: accuracy {accuracy:.3f} vs majority {majority:.3f}")
        if accuracy > majority + 0.02:
            beaten.append(language)
    assert len(beaten) >= 2, result.table()
    keys = {f"xnli/{k}/accuracy" for k in [*XNLI_LANGUAGES, "avg", "worst"]}
    assert set(result.metrics) == keys | {bound for key in keys for bound in interval_keys(key)}
    assert all("eval part" in result.sources[language] and "seeded dev split" in result.sources[language]
               for language in XNLI_LANGUAGES)
    assert result.examples == dict.fromkeys(XNLI_LANGUAGES, XNLI_EXAMPLES)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_saved_task_model_reloads_to_the_same_numbers(xnli, embedded_tokenizer, tmp_path, data_dir, capsys):
    model, _, result = xnli
    folder = save_pruned(model, tmp_path / "xnli-model", embedded_tokenizer)
    reloaded = raysparse.load_model(str(folder))
    assert isinstance(reloaded, TaskModel) and reloaded.kind == "pair_classification" and reloaded.num_labels == 3
    again = evaluate(reloaded, raysparse.load_tokenizer(str(folder)), "xnli", ["de"], data_dir=data_dir,
                     max_examples=XNLI_EXAMPLES, seed=SEED, train_fraction=FRACTION)
    assert again.per_language["de"] == pytest.approx(result.per_language["de"], abs=1e-12)

    assert main(["evaluate", str(folder), "--task", "xnli", "--languages", "de", "--max-examples", "40"]) == 0
    printed = capsys.readouterr().out
    assert "xnli: 1 language" in printed and "40 of 1176" in printed


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_per_language_masks_change_the_evaluation(xnli, embedded_tokenizer, data_dir):
    model, _, result = xnli
    generator = torch.Generator().manual_seed(SEED)
    masks = {}
    for language in ("de", "es"):
        mask = Mask.for_model(model)
        mask.kept_heads = torch.rand(mask.kept_heads.shape, generator=generator) > 0.5
        mask.kept_neurons = torch.rand(mask.kept_neurons.shape, generator=generator) > 0.5
        masks[language] = mask
    masked = evaluate(model, embedded_tokenizer, "xnli", ["de", "es"], data_dir=data_dir, max_examples=XNLI_EXAMPLES,
                      seed=SEED, train_fraction=FRACTION, masks=masks)
    print(masked.table())
    assert masked.masked and "each under its own mask" in masked.table()
    assert any(masked.per_language[lang] != result.per_language[lang] for lang in ("de", "es"))
    encoder = Encoder(model)  # the masks' hooks are gone afterwards
    assert not any(encoder.attention_output(layer)._forward_pre_hooks for layer in encoder.layers)
    partly = evaluate(model, embedded_tokenizer, "xnli", ["de", "ru"], data_dir=data_dir, max_examples=4, masks=masks)
    assert partly.masked_languages == ["de"] and "(unmasked: ru)" in partly.table()  # the es mask is not used


# --- building blocks --------------------------------------------------------------------------------


def test_loader_pads_shards_and_is_seeded(embedded_tokenizer, data_dir):
    rows = training_data("panx", "zero-shot", ["en"], SEED, FRACTION, data_dir).rows().select(range(20))
    features = task_features("panx", embedded_tokenizer, rows, max_length=32)
    batch = next(iter(task_loader("panx", embedded_tokenizer, rows, 5, max_length=32, shuffle=False)))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    padded = batch["attention_mask"] == 0
    assert (batch["input_ids"][padded] == embedded_tokenizer.pad_token_id).all()
    assert (batch["labels"][padded] == IGNORE_INDEX).all()
    assert batch["input_ids"][0, : len(features[0]["input_ids"])].tolist() == features[0]["input_ids"]

    def order(**kwargs):
        loader = task_loader("panx", embedded_tokenizer, rows, 4, max_length=32, **kwargs)
        return [tuple(ids.tolist()) for batch in loader for ids in batch["input_ids"]]

    assert order(seed=1) == order(seed=1) != order(seed=2)
    shards = [order(seed=1, rank=rank, world_size=2) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 10 and not set(shards[0]) & set(shards[1])
    with pytest.raises(RaysparseError, match="rank 2 of world_size 2"):
        task_loader("panx", embedded_tokenizer, rows, 4, rank=2, world_size=2)
    with pytest.raises(RaysparseError, match="retrieval task"):
        task_features("tatoeba", embedded_tokenizer, rows)


def test_build_task_model_and_optimizer(embedded_dir):
    encoder = raysparse.load_model(str(embedded_dir))
    retrieval = build_task_model(encoder, "tatoeba")
    assert (retrieval.kind, retrieval.num_labels) == ("retrieval", 0) and isinstance(retrieval.head, torch.nn.Identity)
    xnli_a, xnli_b = build_task_model(encoder, "xnli", seed=3), build_task_model(encoder, "xnli", seed=3)
    assert torch.equal(xnli_a.head[0].weight, xnli_b.head[0].weight)  # seeded heads
    assert build_task_model(xnli_a, "pawsx").num_labels == 2 and build_task_model(xnli_a, "xnli") is xnli_a
    frozen = freeze_word_embeddings(xnli_a)
    optimizer, scheduler = make_optimizer(xnli_a, 1e-4, 0.01, steps=10, warmup=2)
    counted = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    assert counted + frozen == sum(p.numel() for p in xnli_a.parameters())
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    # fused AdamW (one kernel over every tensor) makes the same updates as the per-tensor loop
    assert optimizer.defaults["fused"]
    reference = copy.deepcopy(xnli_a)
    groups = make_optimizer(reference, 1e-4, 0.01, steps=10, warmup=2)[0].param_groups
    plain = torch.optim.AdamW([{k: v for k, v in g.items() if k != "fused"} for g in groups], fused=False)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(xnli_a.parameters(), reference.parameters()):
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=generator)
                q.grad = p.grad.clone()
        optimizer.step(), plain.step()
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(xnli_a.parameters(), reference.parameters()))
    optimizer.zero_grad(), plain.zero_grad()
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step(), scheduler.step()
    assert lrs[1] == pytest.approx(1e-4) and lrs[0] < lrs[1] and lrs[-1] < lrs[2] and scheduler.get_last_lr()[0] == 0
    with pytest.raises(RaysparseError, match="no loss"):
        task_loss(retrieval, {"input_ids": torch.tensor([[0, 2]]), "attention_mask": torch.tensor([[1, 1]])})
