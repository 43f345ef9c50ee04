"""One small reader per XTREME file format, returning typed rows.

Readers check every row as they go, so a malformed file fails with one line naming the
file, the line (or JSON path) and what was expected, instead of surfacing later as a
shape error in training. Text files are read as bytes and decoded per line, so CRLF files
and gzip files (``*.gz``) read the same as plain LF text.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from raysparse.errors import RaysparseError


@dataclass(frozen=True, slots=True)
class SentencePair:
    """A pair-classification example; ``label`` indexes the task's label names."""

    sentence1: str
    sentence2: str
    label: int


@dataclass(frozen=True, slots=True)
class TaggedSentence:
    """A tagging example; ``tags[i]`` indexes the task's label names."""

    tokens: tuple[str, ...]
    tags: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class QuestionAnswer:
    """An extractive QA example. No answers means unlabelled (XTREME strips test labels)."""

    id: str
    context: str
    question: str
    answer_texts: tuple[str, ...]
    answer_starts: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TranslationPair:
    """Line i of a parallel corpus: ``source`` and its English translation ``target``."""

    source: str
    target: str


def _fail(path: Path, line: int | None, message: str) -> NoReturn:
    where = f"{path} line {line}" if line is not None else str(path)
    raise RaysparseError(f"{where}: {message}")


def _open_binary(path: Path):
    if not path.is_file():
        raise RaysparseError(f"{path}: file not found")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` for each line, without its line ending."""
    path = Path(path)
    with _open_binary(path) as handle:
        try:
            for number, raw in enumerate(handle, start=1):
                try:
                    yield number, raw.rstrip(b"\n").rstrip(b"\r").decode("utf-8")
                except UnicodeDecodeError:
                    _fail(path, number, "not valid UTF-8 text (expected UTF-8)")
        except (OSError, EOFError) as error:  # a truncated or corrupt .gz
            _fail(path, None, f"cannot be read ({error})")


def _label_index(path: Path, line: int, field: str, value: str, names: Sequence[str]) -> int:
    try:
        return names.index(value)
    except ValueError:
        _fail(path, line, f"{field} '{value}' is not a known label (expected one of: {', '.join(names)})")


# --- pair classification (XNLI, PAWS-X) ----------------------------------------------

def read_pair_tsv(path: str | Path, label_names: Sequence[str]) -> list[SentencePair]:
    """``sentence1<TAB>sentence2<TAB>label`` rows, or any TSV whose header names
    ``sentence1``, ``sentence2`` and ``label`` columns (PAWS-X labelled test files)."""
    path = Path(path)
    label_names = list(label_names)
    columns = ("sentence1", "sentence2", "label")
    positions = (0, 1, 2)
    width = 3
    rows: list[SentencePair] = []
    for number, line in read_lines(path):
        fields = line.split("\t")
        if number == 1 and {"sentence1", "sentence2", "label"} <= {f.strip().lower() for f in fields}:
            header = [f.strip().lower() for f in fields]
            positions = tuple(header.index(name) for name in columns)
            width = len(header)
            continue
        if len(fields) != width:
            _fail(path, number, f"expected {width} tab-separated fields ({', '.join(columns)}), found {len(fields)}")
        sentence1, sentence2, label = (fields[i] for i in positions)
        if not sentence1.strip() or not sentence2.strip():
            _fail(path, number, "empty sentence (expected text in sentence1 and sentence2)")
        rows.append(SentencePair(sentence1, sentence2, _label_index(path, number, "label", label.strip(), label_names)))
    return rows


# --- tagging (PAN-X, UD) --------------------------------------------------------------

def read_blocks(path: str | Path) -> Iterator[list[tuple[int, str]]]:
    """The blank-line separated blocks of a file, each as ``(line number, text)`` pairs."""
    block: list[tuple[int, str]] = []
    for number, line in read_lines(path):
        if line.strip():
            block.append((number, line))
        elif block:
            yield block
            block = []
    if block:
        yield block


def _sentences(path: Path, word_of) -> list[TaggedSentence]:
    """Tagged sentences, one per block; ``word_of(number, line)`` gives ``(token, tag)`` or None to skip."""
    sentences = []
    for block in read_blocks(path):
        words = [word for word in (word_of(number, line) for number, line in block) if word is not None]
        if words:
            tokens, tags = zip(*words)
            sentences.append(TaggedSentence(tuple(tokens), tuple(tags)))
    return sentences


def read_token_tag_blocks(path: str | Path, tag_names: Sequence[str]) -> list[TaggedSentence]:
    """PAN-X: ``token<TAB>tag`` per line, a blank line between sentences."""
    path, tag_names = Path(path), list(tag_names)

    def word_of(number: int, line: str) -> tuple[str, int]:
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0]:
            _fail(path, number, f"expected 'token<TAB>tag' (2 fields, a non-empty token), found {len(fields)} field(s)")
        return fields[0], _label_index(path, number, "tag", fields[1].strip(), tag_names)

    return _sentences(path, word_of)


def read_conllu(path: str | Path, upos_names: Sequence[str]) -> list[TaggedSentence]:
    """CoNLL-U: FORM and UPOS of each syntactic word.

    Multiword-token range lines (``1-2``) and empty nodes (``1.1``) are skipped, as XTREME
    does, so tokens are the syntactic words UD annotates.
    """
    path, upos_names = Path(path), list(upos_names)

    def word_of(number: int, line: str) -> tuple[str, int] | None:
        if line.startswith("#"):
            return None
        fields = line.split("\t")
        if len(fields) != 10:
            _fail(path, number, f"expected 10 tab-separated CoNLL-U fields (ID FORM LEMMA UPOS ...), found {len(fields)}")
        word_id = fields[0]
        if not word_id.isdigit():
            if "-" in word_id or "." in word_id:
                return None  # a multiword token range or an empty node
            _fail(path, number, f"ID '{word_id}' is not a word index, range (1-2) or empty node (1.1)")
        return fields[1], _label_index(path, number, "UPOS", fields[3], upos_names)

    return _sentences(path, word_of)


# --- extractive QA (XQuAD, MLQA, TyDiQA-GoldP) ---------------------------------------

def _field(path: Path, where: str, obj: Any, key: str, kind: type) -> Any:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        _fail(path, None, f"{where}.{key}: expected {kind.__name__}, found {type(value).__name__}")
    return value


def read_squad_json(path: str | Path) -> list[QuestionAnswer]:
    """SQuAD v1.1 JSON (``data[].paragraphs[].qas[]``), plain or ``.gz``.

    An answer with empty text counts as no answer: XTREME's unlabelled releases keep the
    field but blank it. Ids must identify questions; a file whose ids repeat (TyDiQA's
    English train file) gets ``<id>-<question index>`` for every question instead.
    """
    path = Path(path)
    with _open_binary(path) as handle:
        try:
            document = json.load(handle)
        except json.JSONDecodeError as error:
            _fail(path, error.lineno, f"invalid JSON ({error.msg}, column {error.colno}); expected SQuAD v1.1 JSON")
        except (OSError, EOFError, UnicodeDecodeError) as error:
            _fail(path, None, f"cannot be read ({error})")
    rows: list[QuestionAnswer] = []
    for a, article in enumerate(_field(path, "<top>", document, "data", list)):
        for p, paragraph in enumerate(_field(path, f"data[{a}]", article, "paragraphs", list)):
            where = f"data[{a}].paragraphs[{p}]"
            context = _field(path, where, paragraph, "context", str)
            for q, qa in enumerate(_field(path, where, paragraph, "qas", list)):
                rows.append(_read_question(path, f"{where}.qas[{q}]", qa, context))
    ids = [row.id for row in rows]
    if len(set(ids)) != len(ids):
        rows = [
            QuestionAnswer(f"{row.id}-{i}", row.context, row.question, row.answer_texts, row.answer_starts)
            for i, row in enumerate(rows)
        ]
    return rows


def _read_question(path: Path, where: str, qa: Any, context: str) -> QuestionAnswer:
    question_id = qa.get("id") if isinstance(qa, dict) else None
    if not isinstance(question_id, (str, int)) or isinstance(question_id, bool):
        _fail(path, None, f"{where}.id: expected a string id")
    texts: list[str] = []
    starts: list[int] = []
    for n, answer in enumerate(_field(path, where, qa, "answers", list)):
        text = _field(path, f"{where}.answers[{n}]", answer, "text", str)
        start = _field(path, f"{where}.answers[{n}]", answer, "answer_start", int)
        if not text:
            continue
        if context[start : start + len(text)] != text:
            _fail(path, None, f"{where}.answers[{n}]: answer_start {start} does not point at '{text}' in the context")
        texts.append(text)
        starts.append(start)
    return QuestionAnswer(str(question_id), context, _field(path, where, qa, "question", str), tuple(texts), tuple(starts))


# --- retrieval (Tatoeba, BUCC) --------------------------------------------------------

def _read_sentences(path: Path) -> list[str]:
    sentences = []
    for number, line in read_lines(path):
        if not line.strip():
            _fail(path, number, "empty line (expected one sentence per line)")
        sentences.append(line)
    return sentences


def read_parallel_text(source_path: str | Path, target_path: str | Path) -> list[TranslationPair]:
    """Two line-aligned files (Tatoeba): line i of one translates line i of the other."""
    source_path, target_path = Path(source_path), Path(target_path)
    sources, targets = _read_sentences(source_path), _read_sentences(target_path)
    if len(sources) != len(targets):
        _fail(source_path, None, f"has {len(sources)} lines but {target_path.name} has {len(targets)} (expected line-aligned files)")
    return [TranslationPair(s, t) for s, t in zip(sources, targets)]


def read_bucc_sentences(path: str | Path) -> dict[str, str]:
    """BUCC 2018 corpus file: ``id<TAB>sentence`` per line."""
    path = Path(path)
    sentences: dict[str, str] = {}
    for number, line in read_lines(path):
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0] or not fields[1].strip():
            _fail(path, number, "expected 'id<TAB>sentence'")
        if fields[0] in sentences:
            _fail(path, number, f"id '{fields[0]}' appears twice (expected unique ids)")
        sentences[fields[0]] = fields[1]
    return sentences


def read_bucc_gold(path: str | Path) -> list[tuple[str, str]]:
    """BUCC 2018 gold file: ``source id<TAB>English id`` per line."""
    path = Path(path)
    pairs = []
    for number, line in read_lines(path):
        fields = line.split("\t")
        if len(fields) != 2 or not all(fields):
            _fail(path, number, "expected 'source id<TAB>English id'")
        pairs.append((fields[0], fields[1]))
    return pairs
