"""Vocabulary trimming: keep the embedding rows a corpus uses, and a tokenizer whose ids match.

In the XLM-R family the word-embedding table is most of the model (82% of e5-small), so
removing heads and neurons makes a model fast but not small. A set of languages uses a
small share of the 250k pieces; keeping only those rows (and every special token) makes
it small as well.

The model side is an ordinary shrink: the kept ids go into ``Mask.kept_vocab`` and
:func:`~raysparse.structure.shrink.shrink` slices the embedding and records
``Structure.vocab``, so trimming composes with head, neuron and layer removal in either
order and saves and loads like any shrunk model.

The tokenizer side rewrites ``tokenizer.json``: the subword model keeps the kept pieces
with their scores, renumbered in kept order; added tokens, the post-processor's special
ids and the unknown token are remapped; normaliser, pre-tokenizer and decoder stay as
they are. A Unigram Viterbi over a subset of the pieces finds the same segmentation
whenever the full vocabulary's optimum uses kept pieces only, so on the trimming corpus
the trimmed tokenizer and model reproduce the full ones exactly; other text falls back
to other kept pieces or ``<unk>``. The lowest-scoring piece is always kept, because a
Unigram model prices ``<unk>`` relative to its lowest score: with it kept, ``<unk>``
costs what it cost before and can never displace the full optimum.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from raysparse.errors import RaysparseError, expect
from raysparse.structure.adapters import E5_PROMPT, Encoder
from raysparse.structure.mask import Mask
from raysparse.structure.shrink import shrink, source_config, structure_of

TOKENIZER_FILE = "tokenizer.json"
SUPPORTED_TOKENIZER_MODELS = ("Unigram", "WordPiece")


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise RaysparseError(f"vocabulary: {type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; "
                             "vocabulary trimming rewrites tokenizer.json and needs one")
    return json.loads(backend.to_str())


def _piece_ids(model_json: dict) -> dict[str, int]:
    """piece -> id of the subword model."""
    kind = model_json.get("type")
    if kind == "Unigram":
        return {piece: i for i, (piece, _) in enumerate(model_json["vocab"])}
    if kind == "WordPiece":
        return dict(model_json["vocab"])
    raise RaysparseError(f"vocabulary: cannot trim a {kind} tokenizer (supported: "
                         f"{', '.join(SUPPORTED_TOKENIZER_MODELS)}); BPE merges would need rewriting")


def _post_processor_ids(processor: dict | None) -> list[int]:
    if not processor:
        return []
    kind = processor.get("type")
    if kind == "TemplateProcessing":
        return [i for token in processor["special_tokens"].values() for i in token["ids"]]
    if kind in ("RobertaProcessing", "BertProcessing"):
        return [processor["sep"][1], processor["cls"][1]]
    if kind == "Sequence":
        return [i for p in processor["processors"] for i in _post_processor_ids(p)]
    if kind == "ByteLevel":
        return []
    raise RaysparseError(f"vocabulary: cannot remap the ids of a {kind} post-processor")


def required_ids(tokenizer) -> list[int]:
    """Ids every trimmed vocabulary keeps: special and added tokens, <unk>, the lowest-scoring piece."""
    data = _backend_json(tokenizer)
    model_json = data["model"]
    pieces = _piece_ids(model_json)
    ids = {token["id"] for token in data.get("added_tokens", [])}
    ids.update(int(i) for i in getattr(tokenizer, "all_special_ids", []))
    ids.update(_post_processor_ids(data.get("post_processor")))
    if data.get("padding") and data["padding"].get("pad_id") is not None:
        ids.add(int(data["padding"]["pad_id"]))
    if model_json["type"] == "Unigram":
        if model_json.get("unk_id") is not None:
            ids.add(int(model_json["unk_id"]))
        scores = torch.tensor([score for _, score in model_json["vocab"]], dtype=torch.float64)
        ids.add(int(scores.argmin()))
        if model_json.get("byte_fallback"):
            ids.update(i for piece, i in pieces.items()
                       if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"))
    elif model_json.get("unk_token") in pieces:
        ids.add(pieces[model_json["unk_token"]])
    return sorted(ids)


def complete_vocabulary(tokenizer, ids: Iterable[int]) -> list[int]:
    """``ids`` plus :func:`required_ids`, sorted and checked against the tokenizer's size."""
    kept = sorted(set(int(i) for i in ids) | set(required_ids(tokenizer)))
    size = len(tokenizer)
    bad = [i for i in kept if not 0 <= i < size]
    expect(not bad, f"vocabulary: ids {bad[:5]} are outside the tokenizer's 0..{size - 1}")
    return kept


def vocabulary_for_texts(tokenizer, texts: Iterable[str], prefix: str = E5_PROMPT, batch_size: int = 1024) -> list[int]:
    """Sorted ids ``tokenizer`` produces for ``texts`` (each with ``prefix``, never truncated), plus required ids.

    ``prefix``: the model's :func:`~raysparse.structure.adapters.retrieval_prompt` (default: e5's,
    the embedded model's)."""
    used: set[int] = set()
    batch: list[str] = []

    def flush() -> None:
        for ids in tokenizer(batch, add_special_tokens=True, truncation=False)["input_ids"]:
            used.update(ids)
        batch.clear()

    for text in texts:
        batch.append(prefix + text)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return complete_vocabulary(tokenizer, used)


def dropped_token_share(tokenizer, texts: Sequence[str], kept_ids: Iterable[int], prefix: str = E5_PROMPT) -> float:
    """Share of the tokens ``tokenizer`` produces for ``texts`` whose ids a trimmed vocabulary drops."""
    kept = set(int(i) for i in kept_ids)
    total = dropped = 0
    for ids in tokenizer([prefix + t for t in texts], add_special_tokens=True, truncation=False)["input_ids"]:
        total += len(ids)
        dropped += sum(1 for i in ids if i not in kept)
    return dropped / total if total else 0.0


def vocabulary_mask(model: nn.Module, kept_ids: Iterable[int]) -> Mask:
    """A mask keeping the model's current units and the embedding rows ``kept_ids`` (current row numbers).

    The mask is in the original model's coordinates, so it intersects with head, neuron
    and layer masks and shrinks an already shrunk model.
    """
    structure = structure_of(model)
    rows = structure.vocab if structure.vocab is not None else list(range(source_config(model).vocab_size))
    kept = sorted(set(int(i) for i in kept_ids))
    bad = [i for i in kept if not 0 <= i < len(rows)]
    expect(not bad, f"vocabulary: ids {bad[:5]} are outside the model's {len(rows)} embedding rows")
    mask = structure.to_mask()
    mask.kept_vocab = torch.tensor([rows[i] for i in kept], dtype=torch.long).unique(sorted=True)
    return mask


def _remap_post_processor(processor: dict | None, new_id: dict[int, int]) -> None:
    if not processor:
        return
    kind = processor.get("type")
    if kind == "TemplateProcessing":
        for token in processor["special_tokens"].values():
            token["ids"] = [new_id[i] for i in token["ids"]]
    elif kind in ("RobertaProcessing", "BertProcessing"):
        for key in ("sep", "cls"):
            processor[key][1] = new_id[processor[key][1]]
    elif kind == "Sequence":
        for p in processor["processors"]:
            _remap_post_processor(p, new_id)


def trimmed_tokenizer_json(data: dict, kept: list[int]) -> dict:
    """``tokenizer.json`` content keeping the pieces ``kept`` (sorted old ids), renumbered 0..len-1."""
    new_id = {old: new for new, old in enumerate(kept)}
    model_json = data["model"]
    if model_json["type"] == "Unigram":
        model_json["vocab"] = [model_json["vocab"][i] for i in kept]
        if model_json.get("unk_id") is not None:
            model_json["unk_id"] = new_id[model_json["unk_id"]]
    else:
        pieces = _piece_ids(model_json)
        by_id = {i: piece for piece, i in pieces.items()}
        model_json["vocab"] = {by_id[old]: new for old, new in new_id.items()}
    for token in data.get("added_tokens", []):
        token["id"] = new_id[token["id"]]
    _remap_post_processor(data.get("post_processor"), new_id)
    if data.get("padding") and data["padding"].get("pad_id") is not None:
        data["padding"]["pad_id"] = new_id[data["padding"]["pad_id"]]
    return data


def trim_tokenizer(tokenizer, kept_ids: Iterable[int]):
    """A new tokenizer that keeps the pieces ``kept_ids`` (plus required ids), renumbered in kept order.

    Written with ``save_pretrained``, edited, and read back by the same class, so its
    configuration (special token names, maximum length, normaliser) is the original's.
    """
    kept = complete_vocabulary(tokenizer, kept_ids)
    with tempfile.TemporaryDirectory(prefix="raysparse-vocab-") as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        path = folder / TOKENIZER_FILE
        expect(path.is_file(), f"vocabulary: {type(tokenizer).__name__}.save_pretrained wrote no {TOKENIZER_FILE}")
        data = trimmed_tokenizer_json(json.loads(path.read_text(encoding="utf-8")), kept)
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        _remap_tokenizer_config(folder, {old: new for new, old in enumerate(kept)})
        for name in getattr(tokenizer, "vocab_files_names", {}).values():   # a slow tokenizer's files would disagree
            if name != TOKENIZER_FILE and (folder / name).is_file():
                (folder / name).unlink()
        trimmed = type(tokenizer).from_pretrained(folder, local_files_only=True)
    expect(len(trimmed) == len(kept),
           f"vocabulary: the trimmed tokenizer has {len(trimmed)} tokens, expected {len(kept)}")
    return trimmed


def _remap_tokenizer_config(folder: Path, new_id: dict[int, int]) -> None:
    """``added_tokens_decoder`` in tokenizer_config.json is keyed by id; renumber it."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if "added_tokens_decoder" in config:
        config["added_tokens_decoder"] = {str(new_id[int(k)]): v for k, v in config["added_tokens_decoder"].items()}
        path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")


def trim_vocabulary(model: nn.Module, tokenizer, kept_ids: Iterable[int]):
    """Keep the embedding rows ``kept_ids`` (ids of ``tokenizer``, plus required ids). Returns (model, tokenizer).

    The model is shrunk in place (like ``shrink``); the tokenizer is new. Rows no token
    reaches (e5-small pads its table to 250,037 rows for 250,002 pieces) go too. Works on
    a model that was already shrunk or trimmed, as long as ``tokenizer`` matches it.
    """
    rows = Encoder(model).base.get_input_embeddings().num_embeddings
    expect(len(tokenizer) <= rows, f"vocabulary: the tokenizer has {len(tokenizer)} tokens but the model only {rows} "
                                   "embedding rows; trim a model together with its own tokenizer")
    kept = complete_vocabulary(tokenizer, kept_ids)
    shrink(model, vocabulary_mask(model, kept))
    return model, trim_tokenizer(tokenizer, kept)


__all__ = ["complete_vocabulary", "dropped_token_share", "required_ids", "trim_tokenizer", "trim_vocabulary",
           "trimmed_tokenizer_json", "vocabulary_for_texts", "vocabulary_mask"]
