"""Tokenisation of each task kind with a Hugging Face fast tokenizer, and the way back.

Model inputs are built with ``Dataset.map(batched=True)`` and left unpadded (the
collator pads per batch). The way back (model outputs -> words or answer text) lives
here too, because only this module knows how sub-words were aligned to the input:
``tagging_predictions`` and ``qa_predictions``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from raysparse.errors import RaysparseError

IGNORE_INDEX = -100  # label of sub-words the loss and the metrics skip


def _map(rows: Dataset, function: Callable[[dict], dict], remove: Sequence[str] | None = None) -> Dataset:
    # A fresh fingerprint: hashing a closure over a tokenizer (a large vocabulary) is slow
    # and these in-memory datasets are never cached to disk anyway.
    return rows.map(
        function,
        batched=True,
        remove_columns=list(rows.column_names if remove is None else remove),
        new_fingerprint=uuid.uuid4().hex,
    )


def _check_fast(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise RaysparseError(
            f"tokenizer: {type(tokenizer).__name__} is not a fast tokenizer "
            "(expected one backed by the `tokenizers` library: word ids and offsets need it)"
        )


# --- pair classification --------------------------------------------------------------

def pair_features(rows: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int = 128) -> Dataset:
    """``input_ids``, ``attention_mask``, ``labels`` for sentence pairs, truncated to ``max_length``."""

    def encode(batch: dict) -> dict:
        encoded = tokenizer(batch["sentence1"], batch["sentence2"], truncation=True, max_length=max_length)
        return {**encoded, "labels": batch["label"]}

    return _map(rows, encode)


# --- tagging ----------------------------------------------------------------------------

def tagging_features(rows: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int = 128) -> Dataset:
    """Word-aligned ``labels``: each word's tag on its first sub-word that is more than the word
    boundary, ``-100`` on the rest.

    SentencePiece often splits a word of a language written without spaces (Chinese, Japanese)
    into a bare boundary piece ``▁`` and the word itself; the bare piece is the same for every
    word, so a tag read there could only be guessed from context (UD-POS Chinese sat at 0.28
    accuracy that way). Words cut off by ``max_length`` get no label, so they drop out of loss
    and metrics.
    """
    _check_fast(tokenizer)
    bare = _boundary_pieces(tokenizer)

    def encode(batch: dict) -> dict:
        encoded = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
        labels = []
        for i, tags in enumerate(batch["tags"]):
            ids, words = encoded["input_ids"][i], encoded.word_ids(i)
            row = [IGNORE_INDEX] * len(ids)
            labelled: set[int] = set()
            for position, word in enumerate(words):
                if word is None or word in labelled:
                    continue
                last_piece = position + 1 == len(words) or words[position + 1] != word
                if ids[position] in bare and not last_piece:
                    continue   # the word's own text follows the bare boundary piece
                row[position] = tags[word]
                labelled.add(word)
            labels.append(row)
        return {**encoded, "labels": labels}

    return _map(rows, encode)


def _boundary_pieces(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of the pieces that are nothing but a word boundary (SentencePiece's ``▁``, BPE's ``Ġ``)."""
    vocabulary = tokenizer.get_vocab()
    return {vocabulary[piece] for piece in ("\u2581", "\u0120") if piece in vocabulary}


def tagging_predictions(
    labels: Sequence[Sequence[int]], logits: np.ndarray | Sequence, label_names: Sequence[str]
) -> tuple[list[list[str]], list[list[str]]]:
    """Gold and predicted tag names per sentence, read at labelled (first sub-word) positions.

    ``logits`` is [sentences, positions, tags] (or already-argmaxed [sentences, positions]).
    """
    gold: list[list[str]] = []
    predicted: list[list[str]] = []
    for row_labels, row_logits in zip(labels, logits):
        row_logits = np.asarray(row_logits)
        best = row_logits.argmax(-1) if row_logits.ndim == 2 else row_logits
        keep = [p for p, label in enumerate(row_labels) if label != IGNORE_INDEX]
        gold.append([label_names[row_labels[p]] for p in keep])
        predicted.append([label_names[int(best[p])] for p in keep])
    return gold, predicted


# --- extractive QA ----------------------------------------------------------------------

def _encode_windows(batch: dict, tokenizer: PreTrainedTokenizerBase, max_length: int, stride: int):
    """Question + context windows; the overlap shrinks where a long question leaves less context per window
    than ``stride`` (the tokenizer requires it smaller), and a question too long for any context fails here."""
    if tokenizer.padding_side != "right":
        raise RaysparseError("tokenizer: padding_side must be 'right' for QA (question first, then context)")
    questions = [q.lstrip() for q in batch["question"]]
    longest = max(len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"])
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True) - longest
    if room < 2:
        raise RaysparseError(f"data.max_length: {max_length} tokens leave no context beside a question of {longest} "
                             f"tokens (expected at least {max_length - room + 2})")
    return tokenizer(
        questions,
        batch["context"],
        truncation="only_second",
        max_length=max_length,
        stride=min(stride, room - 1),
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )


def _answer_span(context: str, answers: dict) -> tuple[int, int] | None:
    """Character span of the first gold answer, with surrounding whitespace trimmed."""
    if not answers["text"]:
        return None
    text, start = answers["text"][0], answers["answer_start"][0]
    start += len(text) - len(text.lstrip())
    end = start + len(text.strip())
    return (start, end) if end > start else None


def qa_train_features(
    rows: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int = 384, stride: int = 128
) -> Dataset:
    """Sliding windows over each context with ``start_positions``/``end_positions``.

    A window that does not contain the whole answer (and a question without one) points
    both positions at the CLS token, as in SQuAD v1 fine-tuning.
    """
    _check_fast(tokenizer)

    def encode(batch: dict) -> dict:
        encoded = _encode_windows(batch, tokenizer, max_length, stride)
        starts, ends = [], []
        for i, offsets in enumerate(encoded["offset_mapping"]):
            ids = encoded["input_ids"][i]
            cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            example = encoded["overflow_to_sample_mapping"][i]
            span = _answer_span(batch["context"][example], batch["answers"][example])
            sequence_ids = encoded.sequence_ids(i)
            context_tokens = [t for t, s in enumerate(sequence_ids) if s == 1]
            if span is None or not context_tokens:
                starts.append(cls), ends.append(cls)
                continue
            first, last = context_tokens[0], context_tokens[-1]
            if offsets[first][0] > span[0] or offsets[last][1] < span[1]:
                starts.append(cls), ends.append(cls)
                continue
            start = first
            while start <= last and offsets[start][0] <= span[0]:
                start += 1
            end = last
            while end >= first and offsets[end][1] >= span[1]:
                end -= 1
            starts.append(start - 1), ends.append(end + 1)
        encoded.pop("offset_mapping")
        encoded.pop("overflow_to_sample_mapping")
        return {**encoded, "start_positions": starts, "end_positions": ends}

    return _map(rows, encode)


def qa_eval_features(
    rows: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int = 384, stride: int = 128
) -> Dataset:
    """Sliding windows with ``example_id`` and context-only ``offset_mapping`` (None elsewhere)."""
    _check_fast(tokenizer)

    def encode(batch: dict) -> dict:
        encoded = _encode_windows(batch, tokenizer, max_length, stride)
        sample = encoded.pop("overflow_to_sample_mapping")
        encoded["example_id"] = [batch["id"][example] for example in sample]
        encoded["offset_mapping"] = [
            [offset if s == 1 else None for offset, s in zip(offsets, encoded.sequence_ids(i))]
            for i, offsets in enumerate(encoded["offset_mapping"])
        ]
        return dict(encoded)

    return _map(rows, encode)


@dataclass(frozen=True)
class AnswerCandidate:
    """One answer span proposed for a question, scored by start + end logit."""

    text: str
    score: float
    start_char: int
    end_char: int


def qa_candidates(
    rows: Dataset,
    features: Dataset,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> dict[str, list[AnswerCandidate]]:
    """Up to ``n_best`` answers per question id, best first, over all of its windows.

    Spans must lie in the context, end at or after their start, and be at most
    ``max_answer_length`` tokens long.
    """
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    if len(start_logits) != len(features) or len(end_logits) != len(features):
        raise RaysparseError(
            f"qa: {len(start_logits)} start and {len(end_logits)} end logit rows for {len(features)} features (expected one per feature)"
        )
    windows: dict[str, list[int]] = {}
    for index, example_id in enumerate(features["example_id"]):
        windows.setdefault(example_id, []).append(index)
    offsets_column = list(features["offset_mapping"])
    candidates: dict[str, list[AnswerCandidate]] = {}
    for example_id, context in zip(rows["id"], rows["context"]):
        found: list[AnswerCandidate] = []
        for index in windows.get(example_id, []):
            offsets = offsets_column[index]
            starts, ends = start_logits[index], end_logits[index]
            top_starts = np.argsort(starts[: len(offsets)])[::-1][:n_best]
            top_ends = np.argsort(ends[: len(offsets)])[::-1][:n_best]
            for s in top_starts:
                for e in top_ends:
                    if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    candidate = _candidate(context, offsets[s][0], offsets[e][1], float(starts[s] + ends[e]))
                    if candidate.text:  # a span of only whitespace is no answer
                        found.append(candidate)
        found.sort(key=lambda c: c.score, reverse=True)
        unique: dict[tuple[int, int], AnswerCandidate] = {}
        for candidate in found:
            unique.setdefault((candidate.start_char, candidate.end_char), candidate)
        candidates[example_id] = list(unique.values())[:n_best]
    return candidates


def _candidate(context: str, start: int, end: int, score: float) -> AnswerCandidate:
    raw = context[start:end]
    start += len(raw) - len(raw.lstrip())  # a leading "▁" token's offset may cover a space
    text = raw.strip()
    return AnswerCandidate(text, score, start, start + len(text))


def qa_predictions(
    rows: Dataset,
    features: Dataset,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> dict[str, str]:
    """The best answer text per question id ("" when no valid span was found)."""
    candidates = qa_candidates(rows, features, start_logits, end_logits, n_best, max_answer_length)
    return {example_id: (found[0].text if found else "") for example_id, found in candidates.items()}


# --- retrieval --------------------------------------------------------------------------

def retrieval_features(
    rows: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int = 128, prefix: str = ""
) -> Dataset:
    """``source_*`` and ``target_*`` inputs, each sentence encoded alone; ``prefix`` is
    prepended to both (the model's ``raysparse.structure.retrieval_prompt``: e5's ``"query: "``)."""

    def encode(batch: dict) -> dict:
        columns = {}
        for side in ("source", "target"):
            encoded = tokenizer([prefix + s for s in batch[side]], truncation=True, max_length=max_length)
            columns.update({f"{side}_{key}": value for key, value in encoded.items()})
        return columns

    return _map(rows, encode)

