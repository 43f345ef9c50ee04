"""Load one task, language and split from a local XTREME directory as a ``datasets.Dataset``.

Every loader returns the columns of ``schema.py`` for the task's kind, so training and
evaluation code never needs to know which file format a language came from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset

from raysparse.data import readers
from raysparse.data.hub import load_from_hub
from raysparse.data.layout import DataFile, find_data_files, task_directory
from raysparse.data.schema import rows_to_dataset
from raysparse.data.tasks import TASKS, Task, get_task
from raysparse.errors import RaysparseError
from raysparse.paths import data_dir as resolve_data_dir

__all__ = [
    "BuccCorpus",
    "available_splits",
    "available_tasks",
    "data_file",
    "languages",
    "load_bucc_corpus",
    "load_from_hub",
    "load_split",
    "read_rows",
]


def available_tasks(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Registered tasks with at least one file in the data directory (BUCC only if present)."""
    root = resolve_data_dir(data_dir)
    return [name for name, task in TASKS.items() if (root / task.directory).is_dir() and find_data_files(task, root)]


def languages(task: str | Task, data_dir: str | os.PathLike | None = None, split: str | None = None) -> list[str]:
    """Languages with a file for ``task`` (and ``split``, if given), discovered from file names."""
    files = find_data_files(task, data_dir)
    return sorted({f.language for f in files if split is None or f.split == split})


def available_splits(task: str | Task, language: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Splits present for one language, in train/dev/test order."""
    return [f.split for f in _language_files(get_task(task), language, data_dir)]


def data_file(task: str | Task, language: str, split: str, data_dir: str | os.PathLike | None = None) -> DataFile:
    """The file for one task, language and split; errors list what is available."""
    task = get_task(task)
    files = _language_files(task, language, data_dir)
    for found in files:
        if found.split == split:
            return found
    raise RaysparseError(
        f"data.split: {task.name} {language} has no '{split}' split "
        f"(available: {', '.join(f.split for f in files)})"
    )


def load_split(task: str | Task, language: str, split: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """One language's ``split`` of ``task`` with the task kind's uniform columns."""
    task = get_task(task)
    return rows_to_dataset(task, read_rows(data_file(task, language, split, data_dir)))


def read_rows(found: DataFile) -> list:
    """Typed rows of one data file, read with the reader for its task's format."""
    task = get_task(found.task)
    if task.kind == "pair_classification":
        return readers.read_pair_tsv(found.path, task.label_names)
    if task.name == "udpos":
        return readers.read_conllu(found.path, task.label_names)
    if task.kind == "tagging":
        return readers.read_token_tag_blocks(found.path, task.label_names)
    if task.kind == "qa":
        return readers.read_squad_json(found.path)
    if task.name == "bucc":
        corpus = _read_bucc(found)
        return [readers.TranslationPair(corpus.source[s], corpus.target[t]) for s, t in corpus.gold]
    return readers.read_parallel_text(found.path, _companion(found, "eng"))


@dataclass(frozen=True)
class BuccCorpus:
    """A BUCC 2018 mining corpus: both sides by sentence id, and the gold (source, English) id pairs."""

    source: dict[str, str]
    target: dict[str, str]
    gold: list[tuple[str, str]]


def load_bucc_corpus(language: str, split: str, data_dir: str | os.PathLike | None = None) -> BuccCorpus:
    """The whole BUCC corpus for mining (``load_split('bucc', ...)`` gives only gold pairs)."""
    return _read_bucc(data_file("bucc", language, split, data_dir))


def _read_bucc(found: DataFile) -> BuccCorpus:
    corpus = BuccCorpus(
        source=readers.read_bucc_sentences(found.path),
        target=readers.read_bucc_sentences(_companion(found, "en")),
        gold=readers.read_bucc_gold(_companion(found, "gold")),
    )
    for number, (source_id, target_id) in enumerate(corpus.gold, start=1):
        if source_id not in corpus.source or target_id not in corpus.target:
            raise RaysparseError(
                f"{_companion(found, 'gold')} line {number}: pair ({source_id}, {target_id}) names a sentence id "
                "missing from the corpus files (expected ids present in both)"
            )
    return corpus


def _companion(found: DataFile, extension: str) -> Path:
    """The sibling file that differs only in its last extension (``.de`` -> ``.eng``)."""
    name = found.path.name
    gz = name.endswith(".gz")
    stem = name[: -len(".gz")] if gz else name
    path = found.path.with_name(f"{stem.rsplit('.', 1)[0]}.{extension}" + (".gz" if gz else ""))
    if not path.is_file():
        raise RaysparseError(f"{found.path}: its companion file {path.name} is missing (expected it beside it)")
    return path


def _language_files(task: Task, language: str, data_dir: str | os.PathLike | None) -> list[DataFile]:
    files = find_data_files(task, data_dir)
    mine = [f for f in files if f.language == language]
    if not mine:
        known = sorted({f.language for f in files})
        raise RaysparseError(
            f"data.languages: task '{task.name}' has no language '{language}' in {task_directory(task, data_dir)} "
            f"(available: {', '.join(known) or 'none'})"
        )
    return mine
