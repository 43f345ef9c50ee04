"""Features with real fast tokenizers, built offline from the shared data.

Two small tokenizers are trained here with the `tokenizers` library and loaded back with
``AutoTokenizer.from_pretrained``: a sentencepiece-style BPE (Metaspace ``▁`` pieces, like
XLM-R) and a BERT-style WordPiece (``##`` pieces). The converted multilingual-e5-small
tokenizer joins them when another engineer's cache holds it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from raysparse.data import (
    IGNORE_INDEX,
    load_split,
    pair_features,
    qa_candidates,
    qa_eval_features,
    qa_predictions,
    qa_train_features,
    retrieval_features,
    squad_scores,
    tagging_features,
    tagging_predictions,
)
from raysparse.data.tasks import PANX_TAGS

DATA = Path(os.environ.get("RAYSPARSE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "xtreme")
pytestmark = pytest.mark.usefixtures("data_dir")   # missing data fails every test (conftest), never skips

MAX_LENGTH, STRIDE = 160, 48  # short windows, so contexts overflow into several


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    texts: list[str] = []
    for language in ("en", "zh"):
        xquad = load_split("xquad", language, "test", DATA)
        texts += list(dict.fromkeys(xquad["context"])) + list(xquad["question"])
    texts += [" ".join(tokens) for tokens in load_split("panx", "de", "dev", DATA).select(range(1000))["tokens"]]
    return texts


def _train_tokenizer(kind: str, texts: list[str], folder: Path):
    if kind == "metaspace-bpe":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.normalizer = normalizers.NFKC()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=3000, special_tokens=specials, show_progress=False)
        cls, sep, pair = "<s>", "</s>", "<s> $A </s> </s> $B </s>"
        names = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                     cls_token="<s>", sep_token="</s>", mask_token="<mask>")
    else:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=3000, special_tokens=specials, show_progress=False)
        cls, sep, pair = "[CLS]", "[SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1"
        names = dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=pair,
        special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))],
    )
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **names).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module", params=["metaspace-bpe", "wordpiece", "e5"])
def tokenizer(request, corpus, tmp_path_factory):
    if request.param == "e5":   # converted into the cache on first use (conftest's embedded_dir)
        return AutoTokenizer.from_pretrained(request.getfixturevalue("embedded_dir"))
    return _train_tokenizer(request.param, corpus, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def questions():
    """QA rows in two scripts: English XQuAD and whitespace-free Chinese XQuAD."""
    return {lang: load_split("xquad", lang, "test", DATA).select(range(120)) for lang in ("en", "zh")}


BARE = ("\u2581", "\u0120")   # SentencePiece's and byte-level BPE's word boundary alone


def _first_text_positions(word_ids, pieces):
    """Each word's first sub-word that is more than a bare word boundary (its first if it has no other)."""
    by_word: dict[int, list[int]] = {}
    for p, word in enumerate(word_ids):
        if word is not None:
            by_word.setdefault(word, []).append(p)
    return sorted(next((p for p in positions if pieces[p] not in BARE), positions[0]) for positions in by_word.values())


@pytest.mark.parametrize("task,language,split", [("panx", "de", "dev"), ("udpos", "zh", "test")])
def test_tagging_labels_sit_on_first_subwords(tokenizer, task, language, split):
    """On each word's first sub-word, or the next one when the first is only the boundary piece
    (words of Chinese, written without spaces, often split so: a tag read there is a guess)."""
    rows = load_split(task, language, split, DATA).select(range(300))
    features = tagging_features(rows, tokenizer, max_length=64)
    assert len(features) == len(rows)   # one feature per sentence, so the pairs below cover every row
    moved = 0
    for row, feature in zip(rows, features):
        word_ids = tokenizer(row["tokens"], is_split_into_words=True, truncation=True, max_length=64).word_ids()
        pieces = tokenizer.convert_ids_to_tokens(feature["input_ids"])
        labelled = [p for p, label in enumerate(feature["labels"]) if label != IGNORE_INDEX]
        assert labelled == _first_text_positions(word_ids, pieces)
        assert [feature["labels"][p] for p in labelled] == [row["tags"][word_ids[p]] for p in labelled]
        moved += sum(word_ids[p - 1] == word_ids[p] for p in labelled)
    if tokenizer.name_or_path.endswith("multilingual-e5-small") and language == "zh":
        assert moved > 300, "e5 splits many Chinese words into the boundary piece and the word"
    if task != "panx":
        return
    # Reading predictions back at labelled positions gives one tag per (kept) word.
    one_hot = [np.eye(len(PANX_TAGS))[[max(label, 0) for label in f["labels"]]] for f in features]
    gold, predicted = tagging_predictions(features["labels"], one_hot, PANX_TAGS)
    assert gold == predicted
    assert gold[0] == [PANX_TAGS[t] for t in rows[0]["tags"]]


def test_tagging_hand_example(tokenizer):
    rows = load_split("panx", "en", "dev", DATA).select(range(1))  # Sioux Falls Arena ( Sioux Falls , South Dakota )
    feature = tagging_features(rows, tokenizer)[0]
    pieces = tokenizer.convert_ids_to_tokens(feature["input_ids"])
    labelled = [(pieces[p], PANX_TAGS[label]) for p, label in enumerate(feature["labels"]) if label != IGNORE_INDEX]
    assert [tag for _, tag in labelled] == ["B-ORG", "I-ORG", "I-ORG", "O", "B-LOC", "I-LOC", "I-LOC", "I-LOC", "I-LOC", "O"]
    assert all(not piece.startswith("##") for piece, _ in labelled)


def _window_spans(rows, tokenizer):
    train = qa_train_features(rows, tokenizer, MAX_LENGTH, STRIDE)
    evaluation = qa_eval_features(rows, tokenizer, MAX_LENGTH, STRIDE)
    assert len(train) == len(evaluation) and train["input_ids"] == evaluation["input_ids"]
    return train, evaluation


def test_qa_train_positions_map_back_to_the_gold_answer(tokenizer, questions):
    for rows in questions.values():
        train, evaluation = _window_spans(rows, tokenizer)
        assert len(train) > len(rows)  # long contexts were split into sliding windows
        gold = {row["id"]: (row["context"], row["answers"]["text"][0]) for row in rows}
        found: dict[str, list[str]] = {}
        for window, offsets in zip(train, evaluation):
            start, end = window["start_positions"], window["end_positions"]
            if start == end == 0:
                continue
            context, answer = gold[offsets["example_id"]]
            span = context[offsets["offset_mapping"][start][0] : offsets["offset_mapping"][end][1]].strip()
            assert answer in span  # never cuts the answer
            found.setdefault(offsets["example_id"], []).append(span)
        assert set(found) == set(gold)  # every answer fits in some window
        exact = sum(any(span == gold[i][1] for span in spans) for i, spans in found.items())
        assert exact / len(gold) >= 0.9  # the rest end inside a sub-word (e.g. "1920s" in "1920s.")


def test_qa_postprocessing_recovers_gold_from_one_hot_logits(tokenizer, questions):
    for rows in questions.values():
        train, evaluation = _window_spans(rows, tokenizer)
        width = max(len(ids) for ids in train["input_ids"])
        start_logits = np.zeros((len(train), width))
        end_logits = np.zeros((len(train), width))
        for index, window in enumerate(train):
            if window["start_positions"] or window["end_positions"]:
                start_logits[index, window["start_positions"]] = 1.0
                end_logits[index, window["end_positions"]] = 1.0
        predictions = qa_predictions(rows, evaluation, start_logits, end_logits, n_best=5, max_answer_length=64)
        references = {row["id"]: row["answers"]["text"] for row in rows}
        gold_span = {row["id"]: (row["answers"]["answer_start"][0], row["answers"]["text"][0]) for row in rows}
        exact = [i for i in references if predictions[i] == gold_span[i][1]]
        assert len(exact) / len(rows) >= 0.9
        assert squad_scores(predictions, references)["f1"] >= 0.95
        candidates = qa_candidates(rows, evaluation, start_logits, end_logits, n_best=5, max_answer_length=64)
        for question_id in exact:
            best = candidates[question_id][0]
            assert (best.start_char, best.text) == gold_span[question_id] and best.score == 2.0
            assert len(candidates[question_id]) <= 5
            assert [c.score for c in candidates[question_id]] == sorted((c.score for c in candidates[question_id]), reverse=True)
        # A one-token limit rules out every multi-token gold span.
        short = qa_predictions(rows, evaluation, start_logits, end_logits, n_best=5, max_answer_length=1)
        long_answers = [i for i in exact if len(tokenizer.tokenize(gold_span[i][1])) > 3]
        assert long_answers and all(short[i] != gold_span[i][1] for i in long_answers)


def test_pair_features_truncate_and_keep_labels(tokenizer):
    rows = load_split("xnli", "de", "dev", DATA).select(range(64))
    features = pair_features(rows, tokenizer, max_length=24)
    assert features["labels"] == rows["label"]
    assert max(len(ids) for ids in features["input_ids"]) <= 24
    assert {"input_ids", "attention_mask", "labels"} <= set(features.column_names)


def test_retrieval_features_add_the_prefix(tokenizer):
    rows = load_split("tatoeba", "de", "test", DATA).select(range(8))
    plain = retrieval_features(rows, tokenizer)
    prefixed = retrieval_features(rows, tokenizer, prefix="query: ")
    assert set(plain.column_names) == {"source_input_ids", "source_attention_mask", "target_input_ids", "target_attention_mask"}
    assert "query" in tokenizer.decode(prefixed[0]["source_input_ids"]).replace(" ", "")
    assert len(prefixed[0]["target_input_ids"]) > len(plain[0]["target_input_ids"])
