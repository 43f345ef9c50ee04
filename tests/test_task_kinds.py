"""One strategy per task kind: the data side (raysparse.data.kinds, its rows in raysparse.data.schema), heads and
training objectives."""

import pytest
import torch
from transformers import BertConfig, BertModel

from raysparse.data.kinds import KINDS, Retrieval, TrainingLanguages, kind_of, stack_ragged
from raysparse.data.load import languages
from raysparse.data.schema import SCHEMAS, features_for
from raysparse.data.tasks import TASK_KINDS, TASKS, get_task
from raysparse.errors import RaysparseError
from raysparse.models.heads import HEADS, TaskModel
from raysparse.training.batches import MAX_LENGTH, default_max_length, num_labels_of
from raysparse.training.kinds import OBJECTIVES, objective_of


def test_one_strategy_per_kind_everywhere():
    assert tuple(KINDS) == TASK_KINDS == tuple(SCHEMAS) == tuple(HEADS)
    assert MAX_LENGTH == {"pair_classification": 128, "tagging": 128, "qa": 384, "retrieval": 128}
    for task in TASKS.values():
        kind = kind_of(task)
        assert kind is kind_of(task.name) is kind_of(task.kind) is KINDS[task.kind]
        assert kind.name == SCHEMAS[task.kind].name == task.kind
        assert kind.trainable == (task.kind != "retrieval") == (not kind.embeds)
        assert default_max_length(task) == MAX_LENGTH[task.kind]
        assert objective_of(task) is OBJECTIVES["contrastive" if task.kind == "retrieval" else "head"]
    assert {t: num_labels_of(t) for t in ("xnli", "pawsx", "udpos", "panx", "xquad", "tatoeba", "bucc")} == \
        {"xnli": 3, "pawsx": 2, "udpos": 17, "panx": 7, "xquad": 0, "tatoeba": 0, "bucc": 0}
    with pytest.raises(RaysparseError, match="unknown task"):
        kind_of("nli")


def test_schema_columns_per_kind():
    columns = {kind: set(features_for(next(t for t in TASKS.values() if t.kind == kind)))
               for kind in TASK_KINDS}
    assert columns == {"pair_classification": {"sentence1", "sentence2", "label"}, "tagging": {"tokens", "tags"},
                       "qa": {"id", "context", "question", "answers"}, "retrieval": {"source", "target"}}


@pytest.mark.parametrize("kind,keys,per_token", [("pair_classification", ("logits",), False),
                                                 ("tagging", ("logits",), True),
                                                 ("qa", ("start_logits", "end_logits"), True),
                                                 ("retrieval", ("embeddings",), False)])
def test_heads_build_and_output_what_evaluation_reads(kind, keys, per_token):
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=20, max_position_embeddings=32), add_pooling_layer=False)
    model = TaskModel(encoder, kind, 3 if kind in ("pair_classification", "tagging") else 0).eval()
    head = HEADS[kind]
    assert (head.output_keys, head.per_token) == (keys, per_token)
    ids = torch.randint(5, 50, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    targets = {"pair_classification": {"labels": torch.tensor([0, 2])},
               "tagging": {"labels": torch.randint(0, 3, (2, 7))},
               "qa": {"start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3, 4])},
               "retrieval": {}}[kind]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **targets)
    assert all(key in out for key in keys)
    if kind == "retrieval":
        torch.testing.assert_close(out["embeddings"].norm(dim=-1), torch.ones(2))
        assert "loss" not in out
    else:
        assert torch.isfinite(out["loss"])
    if kind == "qa":
        assert out["start_logits"][1, 5:].max() == torch.finfo(torch.float32).min
    state = set(model.state_dict())          # checkpoints keep their tensor names
    assert {name for name in state if name.startswith("head.")} == {
        "pair_classification": {"head.0.weight", "head.0.bias", "head.3.weight", "head.3.bias"},
        "tagging": {"head.weight", "head.bias"}, "qa": {"head.weight", "head.bias"}, "retrieval": set()}[kind]


def test_training_languages_per_kind(data_dir):
    xnli = get_task("xnli")
    present = languages(xnli, data_dir)
    plan = kind_of(xnli).training_languages(xnli, present, ["de", "fr"], "translate-train", data_dir)
    assert plan == TrainingLanguages(set(present), ["de", "fr"], ["de", "en", "fr"])
    assert kind_of(xnli).training_languages(xnli, present, ["de"], "zero-shot", data_dir).finetune == ["en"]
    assert kind_of(xnli).training_languages(xnli, present, ["de"], "in-language", data_dir).finetune == ["de"]
    tatoeba = get_task("tatoeba")
    plan = kind_of(tatoeba).training_languages(tatoeba, languages(tatoeba, data_dir), ["de", "zz"], "zero-shot",
                                               data_dir)
    assert plan.trainable == set(present) - {"en"} and plan.candidates == plan.finetune == ["de"]
    assert kind_of(tatoeba).training_source == "XNLI translation pairs"
    assert kind_of(xnli).training_source == "training rows"


def test_retrieval_rows_and_objective(data_dir, embedded_tokenizer):
    tatoeba = get_task("tatoeba")
    rows, source = kind_of(tatoeba).training_rows(tatoeba, "de", embedded_tokenizer, seed=0, train_fraction=0.5,
                                                  max_examples=4, max_length=16, stride=8, data_dir=data_dir)
    assert len(rows) == 4 and all(isinstance(s, str) and isinstance(t, str) for s, t in rows)
    assert source == "xnli/dev-de.tsv premises paired with dev-en (4 pairs)"

    class Data:                      # what an objective reads of TaskData
        tokenizer, prompt = embedded_tokenizer, "query: "

        class spec:
            class data:
                max_length = 16

    batch = objective_of(tatoeba).batch(Data, rows)
    assert batch["input_ids"].shape[0] == 8      # sources, then their translations
    assert embedded_tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True).startswith("query:")
    with pytest.raises(RaysparseError, match="zz not found for xnli"):
        kind_of(tatoeba).training_rows(tatoeba, "zz", embedded_tokenizer, seed=0, train_fraction=0.5,
                                       max_examples=None, max_length=16, stride=8, data_dir=data_dir)
    assert isinstance(kind_of(tatoeba), Retrieval)


def test_stack_ragged_pads_with_the_lowest_float():
    import numpy as np

    out = stack_ragged([np.array([1.0, 2.0]), np.array([3.0])])
    assert out.shape == (2, 2) and out[0].tolist() == [1.0, 2.0] and out[1, 1] == np.finfo(np.float32).min
