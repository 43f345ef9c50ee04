"""Training and evaluation data for the three cross-lingual regimes.

Regimes (which languages the model is trained on):
- ``zero-shot``: English only; every language is evaluated.
- ``translate-train``: English plus each requested language, to be trained on jointly.
- ``in-language``: each requested language's own training data.

Which rows of a language train and which evaluate (the same in every regime, so scores
are comparable across regimes):
1. The evaluation file is ``test`` if present, else ``dev``.
2. The training file is ``train`` if present, else ``dev``, else ``test``.
3. A non-train file is split by ``splits.split_rows`` when the same file would both train
   and evaluate, and always in parallel tasks (XNLI, PAWS-X, XQuAD, MLQA), where row i
   of one language is row i of every other translated. Training uses the train part,
   evaluation the held-out part; otherwise a file is used whole.
So PAN-X English trains on ``train-en`` (whole) and evaluates on ``dev-en`` (whole),
PAN-X German trains and evaluates on the two parts of ``dev-de``, and XNLI trains and
evaluates on parts of each ``dev-<lang>`` whose row indices are the same in every
language. Retrieval tasks have no training data; they evaluate on whole files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from datasets import Dataset, concatenate_datasets

from raysparse.data.layout import DataFile, find_data_files
from raysparse.data.load import available_splits, data_file, read_rows
from raysparse.data.schema import rows_to_dataset, schema_of
from raysparse.data.splits import RowSplit, check_seed, check_train_fraction, split_rows
from raysparse.data.tasks import PIVOT_LANGUAGE, Task, get_task
from raysparse.errors import RaysparseError
from raysparse.paths import data_dir as resolve_data_dir

Regime = Literal["zero-shot", "translate-train", "in-language"]
REGIMES: tuple[Regime, ...] = ("zero-shot", "translate-train", "in-language")
Part = Literal["whole", "train", "eval"]


@dataclass(frozen=True)
class LanguageData:
    """One language's rows for training or evaluation, and where they came from.

    ``part`` is ``whole`` for a whole file, or ``train``/``eval`` for one side of a seeded
    split of ``file_split`` (often ``dev``), described by ``row_split``. ``source`` says
    all of that in one line, for logs and MLflow.
    """

    task: str
    language: str
    rows: Dataset
    file_split: str
    part: Part
    source: str
    row_split: RowSplit | None = None

    @property
    def from_split(self) -> bool:
        """True when the rows are one side of a seeded split of a dev/test file."""
        return self.part != "whole"


@dataclass(frozen=True)
class TrainingData:
    """Per-language training data of one task under one regime."""

    task: str
    regime: Regime
    per_language: dict[str, LanguageData] = field(default_factory=dict)

    @property
    def languages(self) -> list[str]:
        return list(self.per_language)

    def rows(self) -> Dataset:
        """All languages' rows in one Dataset (for joint training), in language order."""
        return concatenate_datasets([data.rows for data in self.per_language.values()])

    def sources(self) -> dict[str, str]:
        return {language: data.source for language, data in self.per_language.items()}


def training_data(
    task: str | Task,
    regime: str,
    languages: Sequence[str],
    seed: int,
    train_fraction: float,
    data_dir: str | os.PathLike | None = None,
) -> TrainingData:
    """The training rows of ``task`` under ``regime`` (see the module docstring).

    For ``zero-shot``, ``languages`` are only checked to exist: training is English.
    """
    task = get_task(task)
    if regime not in REGIMES:
        raise RaysparseError(f"data.regime: unknown regime '{regime}' (expected one of: {', '.join(REGIMES)})")
    if not schema_of(task).trainable:
        raise RaysparseError(
            f"data.regime: task '{task.name}' has no training data (retrieval is scored zero-shot from embeddings)"
        )
    files = _TaskFiles(task, data_dir, seed, train_fraction)
    requested = files.check_languages(languages)
    if regime == "zero-shot":
        train_languages = [PIVOT_LANGUAGE]
    elif regime == "translate-train":
        train_languages = [PIVOT_LANGUAGE] + [lang for lang in requested if lang != PIVOT_LANGUAGE]
    else:
        train_languages = requested
    files.check_languages(train_languages)
    return TrainingData(task.name, regime, {lang: files.training(lang) for lang in train_languages})  # type: ignore[arg-type]


def evaluation_data(
    task: str | Task,
    languages: Sequence[str],
    seed: int,
    train_fraction: float,
    data_dir: str | os.PathLike | None = None,
) -> dict[str, LanguageData]:
    """The held-out rows of each language: the same for every regime, given seed and fraction."""
    task = get_task(task)
    files = _TaskFiles(task, data_dir, seed, train_fraction)
    return {lang: files.evaluation(lang) for lang in files.check_languages(languages)}


class _TaskFiles:
    """One task's files in one data directory, loaded once and split once per call."""

    def __init__(self, task: Task, data_dir: str | os.PathLike | None, seed: int, train_fraction: float):
        self.task = task
        self.data_dir = resolve_data_dir(data_dir)
        self.seed = check_seed(seed)
        self.train_fraction = check_train_fraction(train_fraction)
        self.files = find_data_files(task, self.data_dir)
        self._loaded: dict[tuple[str, str], Dataset] = {}

    def check_languages(self, languages: Sequence[str]) -> list[str]:
        if isinstance(languages, str):
            languages = [part.strip() for part in languages.split(",") if part.strip()]
        requested = list(dict.fromkeys(languages))
        if not requested:
            raise RaysparseError("data.languages: empty list (expected at least one language code)")
        for language in requested:
            self.splits(language)  # raises for an unknown language, listing the known ones
        return requested

    def splits(self, language: str) -> list[str]:
        splits = [f.split for f in self.files if f.language == language]
        if not splits:
            available_splits(self.task, language, self.data_dir)  # raises, listing the known languages
        return splits

    def training(self, language: str) -> LanguageData:
        splits = self.splits(language)
        train_split = next(s for s in ("train", "dev", "test") if s in splits)
        return self._part(language, train_split, "train")

    def evaluation(self, language: str) -> LanguageData:
        splits = self.splits(language)
        eval_split = next((s for s in ("test", "dev") if s in splits), None)
        if eval_split is None:
            raise RaysparseError(
                f"data.languages: {self.task.name} {language} has no dev or test file to evaluate on "
                f"(available: {', '.join(splits)})"
            )
        return self._part(language, eval_split, "eval")

    def _is_split(self, language: str, split: str) -> bool:
        if split == "train" or not schema_of(self.task).trainable:
            return False
        if self.task.parallel:
            return True
        splits = self.splits(language)
        train_split = next(s for s in ("train", "dev", "test") if s in splits)
        eval_split = next((s for s in ("test", "dev") if s in splits), None)
        return split == train_split == eval_split

    def _part(self, language: str, split: str, side: Literal["train", "eval"]) -> LanguageData:
        found = data_file(self.task, language, split, self.data_dir)
        rows = self._load(found)
        if not self._is_split(language, split):
            data = LanguageData(self.task.name, language, rows, split, "whole", f"{found.label()}, all {len(rows)} rows")
        else:
            row_split = self._row_split(found, rows)
            indices = row_split.train_rows if side == "train" else row_split.eval_rows
            data = LanguageData(
                self.task.name, language, rows.select(indices), split, side,
                f"{found.label()}, {side} part: {len(indices)} of {len(rows)} rows "
                f"(seeded {split} split: {row_split.describe()})",
                row_split,
            )
        self._check_labelled(found, data)
        return data

    def _load(self, found: DataFile) -> Dataset:
        key = (found.language, found.split)
        if key not in self._loaded:
            self._loaded[key] = rows_to_dataset(self.task, read_rows(found))
        return self._loaded[key]

    def _row_split(self, found: DataFile, rows: Dataset) -> RowSplit:
        keys, grouped_by = self._group_keys(found, rows)
        return split_rows(keys, self.train_fraction, self.seed, grouped_by)

    def _group_keys(self, found: DataFile, rows: Dataset) -> tuple[list[str], str]:
        """Rows with equal keys stay on one side; parallel tasks key by the pivot's rows."""

        def pivot() -> tuple[DataFile, Dataset]:
            pivot_file = self._pivot(found) if self.task.parallel else found
            return pivot_file, self._load(pivot_file)

        return schema_of(self.task).group_keys(found, rows, pivot)

    def _pivot(self, found: DataFile) -> DataFile:
        """The language whose rows key every parallel file of this split: English if present."""
        candidates = sorted({f.language for f in self.files if f.split == found.split})
        pivot = PIVOT_LANGUAGE if PIVOT_LANGUAGE in candidates else candidates[0]
        return data_file(self.task, pivot, found.split, self.data_dir)

    def _check_labelled(self, found: DataFile, data: LanguageData) -> None:
        schema_of(self.task).check_labelled(found, data.rows)
