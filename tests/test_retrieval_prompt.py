"""The retrieval prompt (e5's "query: ") belongs to the model: recorded on its config, saved and reloaded with it."""

import copy
import json

import pytest
import torch
from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel

from raysparse.models.heads import TaskModel
from raysparse.models.sources import load_encoder, source_retrieval_prompt
from raysparse.structure import Mask, load_pruned, retrieval_prompt, save_pruned, shrink
from raysparse.structure.adapters import E5_PROMPT, set_retrieval_prompt
from raysparse.structure.checkpoint import SIDECAR, checkpoint_retrieval_prompt, read_sidecar
from raysparse.training.retrieval import encode


def tiny(model_cls=BertModel, config_cls=BertConfig, vocab_size=120):
    torch.manual_seed(0)
    config = config_cls(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=40, max_position_embeddings=64, pad_token_id=1)
    return model_cls(config, add_pooling_layer=False).eval()


def half_mask(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = Mask.for_model(model)
    mask.kept_heads = torch.rand(mask.kept_heads.shape, generator=g) > 0.5
    mask.kept_neurons = torch.rand(mask.kept_neurons.shape, generator=g) > 0.5
    return mask


def rewrite_sidecar(folder, **changes):
    sidecar = json.loads((folder / SIDECAR).read_text())
    for key, value in changes.items():
        if value is None:
            sidecar.pop(key, None)
        else:
            sidecar[key] = value
    (folder / SIDECAR).write_text(json.dumps(sidecar))


def test_the_embedded_model_is_e5_and_a_saved_shrunk_copy_keeps_its_prompt(embedded_dir, embedded_model, tmp_path):
    assert retrieval_prompt(embedded_model) == E5_PROMPT == "query: "
    assert source_retrieval_prompt(str(embedded_dir)) == source_retrieval_prompt("embedded") == E5_PROMPT
    assert retrieval_prompt(TaskModel(embedded_model, "retrieval")) == E5_PROMPT
    shrink(embedded_model, half_mask(embedded_model))
    assert retrieval_prompt(embedded_model) == E5_PROMPT
    save_pruned(embedded_model, tmp_path / "m")
    assert read_sidecar(tmp_path / "m")["retrieval_prompt"] == E5_PROMPT
    assert retrieval_prompt(load_pruned(tmp_path / "m")) == E5_PROMPT
    assert retrieval_prompt(load_encoder(str(tmp_path / "m"))) == E5_PROMPT
    assert checkpoint_retrieval_prompt(tmp_path / "m") == source_retrieval_prompt(str(tmp_path / "m")) == E5_PROMPT


def test_a_model_whose_sidecar_says_empty_gets_empty(tmp_path):
    model = tiny()
    set_retrieval_prompt(model, E5_PROMPT)           # config.json records e5's prompt, the sidecar says ""
    save_pruned(model, tmp_path / "m")
    rewrite_sidecar(tmp_path / "m", retrieval_prompt="")
    assert retrieval_prompt(load_pruned(tmp_path / "m")) == ""
    assert source_retrieval_prompt(str(tmp_path / "m")) == ""


@pytest.mark.parametrize("model_cls,config_cls", [(BertModel, BertConfig), (XLMRobertaModel, XLMRobertaConfig)])
def test_plain_models_have_their_familys_prompt_none(model_cls, config_cls, tmp_path):
    model = tiny(model_cls, config_cls)
    assert retrieval_prompt(model) == ""
    shrink(model, half_mask(model))
    save_pruned(model, tmp_path / "m")
    assert read_sidecar(tmp_path / "m")["retrieval_prompt"] == ""
    assert retrieval_prompt(load_pruned(tmp_path / "m")) == ""
    model.config.save_pretrained(tmp_path / "plain")                  # a plain transformers folder
    torch.save({}, tmp_path / "plain" / "pytorch_model.bin")
    assert source_retrieval_prompt(str(tmp_path / "plain")) == ""


def test_a_sidecar_older_than_the_record_keeps_e5s_prompt(tmp_path):
    model = tiny()
    save_pruned(model, tmp_path / "m")
    rewrite_sidecar(tmp_path / "m", retrieval_prompt=None)     # as written before prompts were recorded
    assert retrieval_prompt(load_pruned(tmp_path / "m")) == E5_PROMPT


def test_copies_keep_the_prompt_and_bad_prompts_fail():
    model = tiny()
    set_retrieval_prompt(model, "passage: ")
    assert retrieval_prompt(copy.deepcopy(model)) == "passage: "
    from raysparse.errors import RaysparseError

    with pytest.raises(RaysparseError, match="not a string"):
        set_retrieval_prompt(model, None)


def test_encode_defaults_to_the_models_prompt(embedded_tokenizer):
    model = tiny(vocab_size=len(embedded_tokenizer))
    texts = ["Der schnelle braune Fuchs.", "東京は日本の首都です。"]
    set_retrieval_prompt(model, E5_PROMPT)
    torch.testing.assert_close(encode(model, embedded_tokenizer, texts), encode(model, embedded_tokenizer, texts,
                                                                               prefix=E5_PROMPT))
    set_retrieval_prompt(model, "")
    plain = encode(model, embedded_tokenizer, texts)
    torch.testing.assert_close(plain, encode(model, embedded_tokenizer, texts, prefix=""))
    assert not torch.allclose(plain, encode(model, embedded_tokenizer, texts, prefix=E5_PROMPT))


def test_the_tiny_test_model_reads_text_as_e5_does(tmp_path, data_dir):
    from raysparse.models.tiny import make_tiny_encoder

    folder = make_tiny_encoder(tmp_path / "tiny", data_dir=data_dir)
    assert read_sidecar(folder)["retrieval_prompt"] == E5_PROMPT
    assert retrieval_prompt(load_encoder(str(folder))) == source_retrieval_prompt(str(folder)) == E5_PROMPT
