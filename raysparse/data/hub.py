"""Opt-in loading from the Hugging Face hub (``google/xtreme``), converted to our columns.

Offline first: nothing here touches the network unless RAYSPARSE_ALLOW_HUB=1 (and
HF_HUB_OFFLINE is unset). The hub names configs by language *name* for UD-POS and by
ISO 639-3 code for Tatoeba; those are the only language tables in the data layer.
"""

from __future__ import annotations

from collections.abc import Callable

from datasets import ClassLabel, Dataset

from raysparse.data.schema import features_for
from raysparse.data.tasks import Task, get_task
from raysparse.errors import RaysparseError
from raysparse.paths import hub_allowed

HUB_DATASET = "google/xtreme"

UDPOS_LANGUAGE_NAMES = {
    "af": "Afrikaans", "ar": "Arabic", "bg": "Bulgarian", "de": "German", "el": "Greek",
    "en": "English", "es": "Spanish", "et": "Estonian", "eu": "Basque", "fa": "Persian",
    "fi": "Finnish", "fr": "French", "he": "Hebrew", "hi": "Hindi", "hu": "Hungarian",
    "id": "Indonesian", "it": "Italian", "ja": "Japanese", "kk": "Kazakh", "ko": "Korean",
    "mr": "Marathi", "nl": "Dutch", "pt": "Portuguese", "ru": "Russian", "ta": "Tamil",
    "te": "Telugu", "th": "Thai", "tl": "Tagalog", "tr": "Turkish", "ur": "Urdu",
    "vi": "Vietnamese", "yo": "Yoruba", "zh": "Chinese",
}
TATOEBA_ISO3 = {
    "af": "afr", "ar": "ara", "bg": "bul", "bn": "ben", "de": "deu", "el": "ell", "es": "spa",
    "et": "est", "eu": "eus", "fa": "pes", "fi": "fin", "fr": "fra", "he": "heb", "hi": "hin",
    "hu": "hun", "id": "ind", "it": "ita", "ja": "jpn", "jv": "jav", "ka": "kat", "kk": "kaz",
    "ko": "kor", "ml": "mal", "mr": "mar", "nl": "nld", "pt": "por", "ru": "rus", "sw": "swh",
    "ta": "tam", "te": "tel", "th": "tha", "tl": "tgl", "tr": "tur", "ur": "urd", "vi": "vie",
    "zh": "cmn",
}
TYDIQA_LANGUAGE_NAMES = {
    "ar": "arabic", "bn": "bengali", "en": "english", "fi": "finnish", "id": "indonesian",
    "ko": "korean", "ru": "russian", "sw": "swahili", "te": "telugu",
}
# Our split names -> the hub's, where they differ (XQuAD and Tatoeba are test-only locally).
HUB_SPLITS = {"dev": "validation", "test": "test", "train": "train"}
HUB_TEST_ONLY = {"xquad", "tatoeba"}


def hub_config(task: Task, language: str) -> str:
    """The ``google/xtreme`` config holding ``task`` in ``language``."""
    def known(table: dict[str, str]) -> str:
        if language not in table:
            raise RaysparseError(
                f"data.languages: no hub config for {task.name} '{language}' (expected one of: {', '.join(sorted(table))})"
            )
        return table[language]

    configs: dict[str, Callable[[], str]] = {
        "xnli": lambda: "XNLI",
        "pawsx": lambda: f"PAWS-X.{language}",
        "panx": lambda: f"PAN-X.{language}",
        "udpos": lambda: f"udpos.{known(UDPOS_LANGUAGE_NAMES)}",
        "xquad": lambda: f"XQuAD.{language}",
        "mlqa": lambda: f"MLQA.{language}.{language}",
        "tydiqa": lambda: "tydiqa",
        "tatoeba": lambda: f"tatoeba.{known(TATOEBA_ISO3)}",
        "bucc": lambda: f"bucc18.{language}",
    }
    return configs[task.name]()


def load_from_hub(task: str | Task, language: str, split: str, revision: str | None = None) -> Dataset:
    """``task``/``language``/``split`` from ``google/xtreme`` with the same columns as ``load_split``.

    Only when RAYSPARSE_ALLOW_HUB=1; otherwise a RaysparseError says how to opt in.
    """
    task = get_task(task)
    if not hub_allowed():
        raise RaysparseError(
            "data.source: hub access is off (offline first); set RAYSPARSE_ALLOW_HUB=1 and unset HF_HUB_OFFLINE "
            f"to download {HUB_DATASET}, or point RAYSPARSE_DATA at a local XTREME directory"
        )
    if split not in HUB_SPLITS:
        raise RaysparseError(f"data.split: unknown split '{split}' (expected one of: {', '.join(HUB_SPLITS)})")
    hub_split = "validation" if task.name in HUB_TEST_ONLY and split == "test" else HUB_SPLITS[split]
    import datasets

    raw = datasets.load_dataset(HUB_DATASET, hub_config(task, language), split=hub_split, revision=revision)
    return _to_schema(task, language, hub_split, raw)


def _label_names(raw: Dataset, column: str) -> list[str] | None:
    feature = raw.features[column]
    inner = getattr(feature, "feature", feature)
    return list(inner.names) if isinstance(inner, ClassLabel) else None


def _to_schema(task: Task, language: str, hub_split: str, raw: Dataset) -> Dataset:
    labels = list(task.label_names)
    if task.name == "xnli":
        raw = raw.filter(lambda row: row["language"] == language)
    if task.name == "tydiqa" and hub_split == "validation":  # all languages in one split
        prefix = TYDIQA_LANGUAGE_NAMES.get(language, language) + "-"
        raw = raw.filter(lambda row: row["id"].startswith(prefix))

    if task.kind == "pair_classification":
        column = "gold_label" if "gold_label" in raw.column_names else "label"
        names = _label_names(raw, column)

        def convert(batch):
            values = [names[v] if names else str(v) for v in batch[column]]
            return {"sentence1": batch["sentence1"], "sentence2": batch["sentence2"], "label": [labels.index(v) for v in values]}
    elif task.kind == "tagging":
        column = "pos_tags" if "pos_tags" in raw.column_names else "ner_tags"
        names = _label_names(raw, column)

        def convert(batch):
            return {
                "tokens": batch["tokens"],
                "tags": [[labels.index(names[t] if names else str(t)) for t in tags] for tags in batch[column]],
            }
    elif task.kind == "qa":
        def convert(batch):
            return {key: batch[key] for key in ("id", "context", "question", "answers")}
    else:
        def convert(batch):
            return {"source": batch["source_sentence"], "target": batch["target_sentence"]}

    return raw.map(convert, batched=True, remove_columns=raw.column_names, features=features_for(task))
