"""Translation pairs for retrieval-style scoring, recovery and evaluation.

XNLI dev files are a parallel corpus: row i of every language is the same example
translated, and each premise repeats for its three hypotheses, so premises are
de-duplicated before they become contrastive batches. Tatoeba pairs are kept for
evaluation; scoring and recovery default to XNLI so evaluation stays clean.
"""

from __future__ import annotations

import random

from raysparse.data.load import languages as available_languages
from raysparse.data.load import load_split
from raysparse.errors import RaysparseError

PIVOT = "en"


def _pick_languages(task: str, requested: list[str] | None, data_dir) -> list[str]:
    present = [lang for lang in available_languages(task, data_dir) if lang != PIVOT]
    if requested is None:
        return present
    missing = [lang for lang in requested if lang not in present and lang != PIVOT]
    if missing:
        raise RaysparseError(f"languages: {', '.join(missing)} not found for {task} "
                             f"(available: {', '.join(present)})")
    return [lang for lang in requested if lang != PIVOT]


def tatoeba_pairs(languages: list[str] | None = None, max_pairs: int | None = None,
                  data_dir=None) -> dict[str, tuple[list[str], list[str]]]:
    """{lang: (sentences in lang, their English translations)}, the first ``max_pairs`` of each."""
    pairs = {}
    for lang in _pick_languages("tatoeba", languages, data_dir):
        rows = load_split("tatoeba", lang, "test", data_dir)
        limit = len(rows) if max_pairs is None else min(max_pairs, len(rows))
        rows = rows.select(range(limit))
        pairs[lang] = (list(rows["source"]), list(rows["target"]))
    return pairs


def xnli_premise_pairs(languages: list[str] | None = None, data_dir=None) -> dict[str, tuple[list[str], list[str]]]:
    """{lang: (unique premises in lang, the same premises in English)} from the parallel XNLI dev files."""
    english = list(load_split("xnli", PIVOT, "dev", data_dir)["sentence1"])
    keep, seen = [], set()
    for i, premise in enumerate(english):
        if premise not in seen:
            seen.add(premise)
            keep.append(i)
    pairs = {}
    for lang in _pick_languages("xnli", languages, data_dir):
        premises = list(load_split("xnli", lang, "dev", data_dir)["sentence1"])
        if len(premises) != len(english):
            raise RaysparseError(f"xnli: dev-{lang} has {len(premises)} rows but dev-en has {len(english)}; "
                                 "expected parallel files")
        pairs[lang] = ([premises[i] for i in keep], [english[i] for i in keep])
    return pairs


def parallel_pairs(source: str, languages: list[str] | None = None, max_pairs: int = 256, seed: int = 0,
                   data_dir=None) -> tuple[list[str], list[str]]:
    """A seeded mix of (sentence, English translation) pairs over ``languages``.

    For XNLI, languages without XNLI data are skipped (scoring data need not cover
    every evaluation language), and each English premise is used once; an empty
    result means nothing matched.
    """
    rng = random.Random(seed)
    if source == "xnli":
        present = set(available_languages("xnli", data_dir))
        wanted = None if languages is None else [lang for lang in languages if lang in present]
        by_language = xnli_premise_pairs(wanted, data_dir) if wanted != [] else {}
        if not by_language:
            return [], []
        # one language per English premise, so no English sentence appears twice (no false negatives)
        langs = sorted(by_language)
        rows = list(range(len(next(iter(by_language.values()))[0])))
        rng.shuffle(rows)
        pool = [(by_language[langs[k % len(langs)]][0][row], by_language[langs[k % len(langs)]][1][row])
                for k, row in enumerate(rows)]
    elif source == "tatoeba":
        by_language = tatoeba_pairs(languages, None, data_dir)
        pool = [(s, t) for lang in sorted(by_language) for s, t in zip(*by_language[lang])]
        rng.shuffle(pool)
    else:
        raise RaysparseError(f"scoring_data: expected 'xnli' or 'tatoeba', got {source!r}")
    pool = pool[:max_pairs]
    return [s for s, _ in pool], [t for _, t in pool]
