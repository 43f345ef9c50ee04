"""Which vocabulary a set of languages uses, read from the local XTREME text.

Vocabulary trimming (``raysparse.structure.vocab``) keeps the embedding rows a corpus
uses; this module supplies that corpus for a language set from Tatoeba (both sides) and
the parallel XNLI dev files (premises and hypotheses). English is a language like any
other here: include ``"en"`` to keep it (Tatoeba and XNLI evaluate against English).
"""

from __future__ import annotations

from collections.abc import Sequence

from raysparse.data.load import languages as available_languages
from raysparse.data.load import load_split
from raysparse.errors import RaysparseError, expect
from raysparse.structure.adapters import E5_PROMPT, retrieval_prompt
from raysparse.structure.vocab import trim_vocabulary, vocabulary_for_texts

VOCABULARY_SOURCES = ("tatoeba", "xnli")
ENGLISH = "en"


def _present(source: str, data_dir) -> list[str]:
    found = set(available_languages(source, data_dir))
    if source == "tatoeba" and found:
        found.add(ENGLISH)          # the English side of every Tatoeba file
    return sorted(found)


def _head(texts: list[str], limit: int | None) -> list[str]:
    return texts if limit is None else texts[:limit]


def _tatoeba(language: str, others: list[str], limit: int | None, data_dir) -> list[str]:
    if language != ENGLISH:
        return _head(list(load_split("tatoeba", language, "test", data_dir)["source"]), limit)
    texts = []
    for other in others:
        texts += _head(list(load_split("tatoeba", other, "test", data_dir)["target"]), limit)
    return texts


def _xnli(language: str, limit: int | None, data_dir) -> list[str]:
    rows = load_split("xnli", language, "dev", data_dir)
    premises = list(dict.fromkeys(rows["sentence1"]))       # each premise repeats for its three hypotheses
    return _head(premises, limit) + _head(list(rows["sentence2"]), limit)


def languages_with_text(sources: Sequence[str] = VOCABULARY_SOURCES, data_dir=None) -> list[str]:
    """Languages some vocabulary source has text for (English included where Tatoeba is present)."""
    return sorted(set().union(*(_present(source, data_dir) for source in sources)))


def corpus_for_languages(languages: Sequence[str] | None = None, sources: Sequence[str] = VOCABULARY_SOURCES,
                         max_sentences: int | None = None, data_dir=None) -> dict[str, list[str]]:
    """{language: sentences} from ``sources``; ``None`` = every language present (English included).

    ``max_sentences`` caps each language's share of each source (premises and
    hypotheses count separately), taken from the start of the files, so the rest can
    serve as held-out text. English from Tatoeba is the English side of the requested
    languages' files (of all files when English is the only language asked for).
    """
    bad = [s for s in sources if s not in VOCABULARY_SOURCES]
    expect(not bad and len(sources) > 0,
           f"vocabulary.sources: expected some of {VOCABULARY_SOURCES}, got {list(sources)}")
    expect(max_sentences is None or max_sentences > 0,
           f"vocabulary.max_sentences: expected a positive number, got {max_sentences}")
    present = {source: _present(source, data_dir) for source in sources}
    everything = sorted(set().union(*present.values()))
    wanted = everything if languages is None else list(dict.fromkeys(languages))
    missing = [lang for lang in wanted if lang not in everything]
    if missing:
        raise RaysparseError(f"vocabulary.languages: {', '.join(missing)} not found in {', '.join(sources)} "
                             f"(available: {', '.join(everything)})")
    corpus = {lang: [] for lang in wanted}
    for source in sources:
        tatoeba_others = [lang for lang in wanted if lang != ENGLISH and lang in present[source]]
        if source == "tatoeba" and not tatoeba_others:
            tatoeba_others = [lang for lang in present[source] if lang != ENGLISH]
        for lang in wanted:
            if lang not in present[source]:
                continue
            if source == "tatoeba":
                corpus[lang] += _tatoeba(lang, tatoeba_others, max_sentences, data_dir)
            else:
                corpus[lang] += _xnli(lang, max_sentences, data_dir)
    return corpus


def vocabulary_for_languages(tokenizer, languages: Sequence[str] | None = None,
                             sources: Sequence[str] = VOCABULARY_SOURCES, max_sentences: int | None = None,
                             prefix: str = E5_PROMPT, data_dir=None) -> list[int]:
    """Sorted ids of ``tokenizer`` that the languages' text uses, plus every special token.

    Each sentence is read with ``prefix`` before it: the model's retrieval prompt
    (``raysparse.structure.retrieval_prompt``; default: e5's, the embedded model's).
    Feed the result to ``raysparse.structure.vocab.trim_vocabulary``.
    """
    corpus = corpus_for_languages(languages, sources, max_sentences, data_dir)
    return vocabulary_for_texts(tokenizer, (text for texts in corpus.values() for text in texts), prefix)


def trim_to_languages(model, tokenizer, languages: Sequence[str] | None = None,
                      sources: Sequence[str] = VOCABULARY_SOURCES, max_sentences: int | None = None,
                      prefix: str | None = None, data_dir=None):
    """Keep only the vocabulary ``languages`` use; the model shrinks in place. Returns (model, tokenizer).

    ``prefix`` (default: the model's retrieval prompt) goes before every sentence read.
    """
    prefix = retrieval_prompt(model) if prefix is None else prefix
    kept = vocabulary_for_languages(tokenizer, languages, sources, max_sentences, prefix, data_dir)
    return trim_vocabulary(model, tokenizer, kept)


__all__ = ["VOCABULARY_SOURCES", "corpus_for_languages", "languages_with_text", "trim_to_languages", "vocabulary_for_languages"]
