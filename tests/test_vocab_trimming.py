"""Vocabulary trimming on the real embedded model and real Tatoeba text.

The trimming corpus is the first 200 Tatoeba pairs of German and French (both sides);
the next 100 pairs are held out. On the corpus the trimmed tokenizer and model must
reproduce the full ones exactly; on held-out text the share of dropped tokens and the
change in Tatoeba quality are printed; any text still encodes.
"""

import copy

import pytest
import torch

import raysparse
from raysparse.data.parallel import tatoeba_pairs
from raysparse.data.vocabulary import vocabulary_for_languages
from raysparse.errors import RaysparseError
from raysparse.pruning import Selection, get_algorithm, select_mask
from raysparse.standalone import tatoeba_quality
from raysparse.structure import Encoder, apply_mask, save_pruned, shrink, structure_of
from raysparse.structure.vocab import dropped_token_share, required_ids, trim_vocabulary, vocabulary_for_texts

LANGUAGES = ["de", "fr"]
CORPUS_PAIRS = 200
HELD_OUT_PAIRS = 100
PREFIX = "query: "


@pytest.fixture(scope="module")
def pairs(data_dir):
    return tatoeba_pairs(LANGUAGES, max_pairs=CORPUS_PAIRS + HELD_OUT_PAIRS, data_dir=data_dir)


@pytest.fixture(scope="module")
def corpus(pairs):
    return [s for lang in LANGUAGES for side in pairs[lang] for s in side[:CORPUS_PAIRS]]


@pytest.fixture(scope="module")
def held_out(pairs):
    return {lang: (src[CORPUS_PAIRS:], tgt[CORPUS_PAIRS:]) for lang, (src, tgt) in pairs.items()}


@pytest.fixture(scope="module")
def kept(embedded_tokenizer, data_dir):
    return vocabulary_for_languages(embedded_tokenizer, LANGUAGES + ["en"], sources=("tatoeba",),
                                    max_sentences=CORPUS_PAIRS, data_dir=data_dir)


@pytest.fixture(scope="module")
def full(embedded_dir):
    return raysparse.load_model(str(embedded_dir))


@pytest.fixture(scope="module")
def trimmed(full, embedded_tokenizer, kept):
    return trim_vocabulary(copy.deepcopy(full), embedded_tokenizer, kept)


@pytest.fixture(scope="module")
def trimmed_then_shrunk(trimmed, head_mask):
    return shrink(copy.deepcopy(trimmed[0]), head_mask)


@pytest.fixture(scope="module")
def head_mask(full):
    enc = Encoder(full)
    mask = select_mask(get_algorithm("magnitude").score(full), 0.5, enc.hidden_size, enc.head_dim,
                       Selection(scope="per-layer"))
    mask.kept_layers[10] = False
    return mask


def encoded(tokenizer, texts):
    return tokenizer([PREFIX + t for t in texts], padding=True, return_tensors="pt")


def hidden(model, batch):
    with torch.inference_mode():
        return model(**batch).last_hidden_state


@pytest.mark.timeout(120)
def test_kept_ids_are_the_corpus_vocabulary_plus_required(embedded_tokenizer, corpus, kept):
    assert kept == vocabulary_for_texts(embedded_tokenizer, corpus, PREFIX)
    assert set(required_ids(embedded_tokenizer)) <= set(kept)
    for token in ("<s>", "</s>", "<pad>", "<unk>", "<mask>"):
        assert embedded_tokenizer.convert_tokens_to_ids(token) in kept
    assert 1000 < len(kept) < 20000, len(kept)


@pytest.mark.timeout(180)
def test_trimmed_model_equals_full_model_on_trimming_corpus(full, embedded_tokenizer, trimmed, kept, corpus):
    model, tokenizer = trimmed
    assert len(tokenizer) == len(kept) == Encoder(model).base.get_input_embeddings().num_embeddings
    assert structure_of(model).vocab == kept
    full_ids, trim_ids = encoded(embedded_tokenizer, corpus), encoded(tokenizer, corpus)
    mapped = torch.tensor(kept)[trim_ids["input_ids"]]
    assert torch.equal(mapped, full_ids["input_ids"])
    assert torch.equal(trim_ids["attention_mask"], full_ids["attention_mask"])
    for row_full, row_trim in zip(full_ids["input_ids"][:50], trim_ids["input_ids"][:50]):
        assert tokenizer.convert_ids_to_tokens(row_trim) == embedded_tokenizer.convert_ids_to_tokens(row_full)
    sample = corpus[::8]                       # a spread of the corpus, both languages and English
    torch.testing.assert_close(hidden(model, encoded(tokenizer, sample)),
                               hidden(full, encoded(embedded_tokenizer, sample)), atol=1e-5, rtol=0)
    assert tokenizer.pad_token_id == kept.index(embedded_tokenizer.pad_token_id)
    assert tokenizer.decode(trim_ids["input_ids"][0], skip_special_tokens=True) == \
        embedded_tokenizer.decode(full_ids["input_ids"][0], skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_held_out_dropped_share_and_quality(full, embedded_tokenizer, trimmed, kept, held_out):
    model, tokenizer = trimmed
    texts = [s for src, tgt in held_out.values() for s in src + tgt]
    share = dropped_token_share(embedded_tokenizer, texts, kept, PREFIX)
    dense_quality = tatoeba_quality(full, embedded_tokenizer, held_out)
    trimmed_quality = tatoeba_quality(model, tokenizer, held_out)
    change = trimmed_quality["tatoeba/avg/accuracy"] - dense_quality["tatoeba/avg/accuracy"]
    print(f"\nheld-out {', '.join(LANGUAGES)} (+English), vocabulary of {len(kept)} pieces from "
          f"{CORPUS_PAIRS} pairs per language: {share:.1%} of tokens outside it; Tatoeba top-1 "
          f"{dense_quality['tatoeba/avg/accuracy']:.3f} -> {trimmed_quality['tatoeba/avg/accuracy']:.3f} "
          f"({change:+.3f})")
    assert 0.0 < share < 0.5
    assert change > -0.2


@pytest.mark.timeout(120)
def test_text_with_dropped_pieces_still_encodes(trimmed, embedded_tokenizer, kept, corpus):
    model, tokenizer = trimmed
    texts = ["这是一个测试。", "ภาษาไทย", "Привет, мир!", "مرحبا", "emoji ❤️🚀 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "",
             "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.", "<mask> <s> </s> <unk>", corpus[0]]
    batch = encoded(tokenizer, texts)
    ids = batch["input_ids"]
    assert int(ids.max()) < len(tokenizer)
    assert (ids == tokenizer.unk_token_id).any(dim=1)[:5].all()      # scripts the corpus never saw
    assert hidden(model, batch).isfinite().all()
    decoded = tokenizer.batch_decode(ids)
    # every id decodes to the piece it stands for in the full vocabulary; dropped pieces as <unk>
    assert decoded == embedded_tokenizer.batch_decode(torch.tensor(kept)[ids])
    assert all("<unk>" in text for text in decoded[:5])
    # text made only of kept pieces decodes as the full tokenizer decodes it
    assert tokenizer.decode(ids[-1], skip_special_tokens=True) == \
        embedded_tokenizer.decode(encoded(embedded_tokenizer, [corpus[0]])["input_ids"][0], skip_special_tokens=True)


@pytest.mark.timeout(240)
def test_trimmed_and_shrunk_saves_and_reloads(trimmed, trimmed_then_shrunk, corpus, tmp_path):
    model, tokenizer = trimmed_then_shrunk, trimmed[1]
    save_pruned(model, tmp_path, tokenizer=tokenizer)
    reloaded, reloaded_tokenizer = raysparse.load_model(str(tmp_path)), raysparse.load_tokenizer(str(tmp_path))
    assert structure_of(reloaded) == structure_of(model)
    sample = corpus[:40] + ["这是一个测试。"]
    batch = encoded(tokenizer, sample)
    assert torch.equal(encoded(reloaded_tokenizer, sample)["input_ids"], batch["input_ids"])
    torch.testing.assert_close(hidden(reloaded, batch), hidden(model, batch), atol=0, rtol=0)
    weights = (tmp_path / "model.safetensors").stat().st_size
    assert weights < 0.25 * 470e6, weights


@pytest.mark.timeout(300)
def test_trimming_composes_with_shrinking_in_either_order(full, embedded_tokenizer, trimmed, trimmed_then_shrunk,
                                                          head_mask, kept, corpus):
    trim_then_shrink = trimmed_then_shrunk
    shrink_then_trim, tokenizer = trim_vocabulary(shrink(copy.deepcopy(full), head_mask), embedded_tokenizer, kept)
    assert structure_of(trim_then_shrink) == structure_of(shrink_then_trim)
    sample = corpus[::10]
    batch = encoded(tokenizer, sample)
    assert torch.equal(batch["input_ids"], encoded(trimmed[1], sample)["input_ids"])
    once = hidden(trim_then_shrink, batch)
    torch.testing.assert_close(hidden(shrink_then_trim, batch), once, atol=1e-5, rtol=0)
    with apply_mask(full, head_mask):                  # and both compute what the masked full model computes
        torch.testing.assert_close(once, hidden(full, encoded(embedded_tokenizer, sample)), atol=1e-5, rtol=0)


@pytest.mark.timeout(60)
def test_bad_input_is_one_line(trimmed, full, embedded_tokenizer, data_dir):
    model, tokenizer = trimmed
    with pytest.raises(RaysparseError, match="tokenizer has 250002 tokens"):
        trim_vocabulary(copy.deepcopy(model), embedded_tokenizer, [5, 6])
    with pytest.raises(RaysparseError, match="outside the tokenizer"):
        trim_vocabulary(full, embedded_tokenizer, [len(embedded_tokenizer) + 3])
    with pytest.raises(RaysparseError, match="xx not found"):
        vocabulary_for_languages(tokenizer, ["xx"], data_dir=data_dir)
