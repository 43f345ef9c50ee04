"""Where each task's files live in a local XTREME directory, and which are present.

Languages and splits are discovered from file names, never listed in code: the local copy
holds a subset of XTREME, and another copy may hold a different one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from raysparse.data.tasks import Task, get_task
from raysparse.errors import RaysparseError
from raysparse.paths import data_dir as resolve_data_dir

SPLITS = ("train", "dev", "test")
_LANG = r"(?P<lang>[a-z]{2,3})"
_GZ = r"(?:\.gz)?"

# One file-name pattern per task (matched against base names anywhere under the task
# directory, so XTREME's nested download folders work too). A pattern without a `split`
# group names the split in FIXED_SPLIT.
FILE_PATTERNS: dict[str, re.Pattern[str]] = {
    "xnli": re.compile(rf"(?P<split>train|dev|test)-{_LANG}\.tsv{_GZ}"),
    "pawsx": re.compile(rf"(?P<split>train|dev|test)-{_LANG}\.tsv{_GZ}"),
    "panx": re.compile(rf"(?P<split>train|dev|test)-{_LANG}\.tsv{_GZ}"),
    "udpos": re.compile(rf"{_LANG}-(?P<split>train|dev|test)\.conllu{_GZ}"),
    "xquad": re.compile(rf"xquad\.{_LANG}\.json{_GZ}"),
    "mlqa": re.compile(rf"(?P<split>dev|test)-context-{_LANG}-question-(?P=lang)\.json{_GZ}"),
    "tydiqa": re.compile(rf"tydiqa\.goldp\.{_LANG}\.(?P<split>train|dev)\.json{_GZ}"),
    "tatoeba": re.compile(rf"tatoeba\.{_LANG}-eng\.(?P=lang){_GZ}"),
    "bucc": re.compile(rf"{_LANG}-en\.(?P<split>dev|test)\.(?P=lang){_GZ}"),
}
FIXED_SPLIT = {"xquad": "test", "tatoeba": "test"}


@dataclass(frozen=True)
class DataFile:
    """One task file for one language and split (for retrieval: the non-English side)."""

    task: str
    language: str
    split: str
    path: Path

    def label(self) -> str:
        """``<task dir>/<file name>``, short enough for messages and provenance strings."""
        return f"{self.path.parent.name}/{self.path.name}"


def task_directory(task: str | Task, data_dir: str | os.PathLike | None = None) -> Path:
    """The task's folder under the data directory; an error says what was expected."""
    task = get_task(task)
    root = resolve_data_dir(data_dir)
    folder = root / task.directory
    if not folder.is_dir():
        raise RaysparseError(
            f"data.dir: {root} has no {task.directory}/ folder for task '{task.name}' "
            f"(expected XTREME files under {folder})"
        )
    return folder


def find_data_files(task: str | Task, data_dir: str | os.PathLike | None = None) -> list[DataFile]:
    """Every file of ``task`` present, sorted by language then split."""
    task = get_task(task)
    folder = task_directory(task, data_dir)
    pattern = FILE_PATTERNS[task.name]
    found: dict[tuple[str, str], DataFile] = {}
    for path in sorted(folder.rglob("*")):
        match = pattern.fullmatch(path.name)
        if match is None or not path.is_file():
            continue
        split = match.groupdict().get("split") or FIXED_SPLIT[task.name]
        key = (match["lang"], split)
        if key in found:
            raise RaysparseError(
                f"data.dir: two files for {task.name} {key[0]} {split}: {found[key].path} and {path} "
                "(expected one; remove or rename the other)"
            )
        found[key] = DataFile(task.name, key[0], split, path)
    return sorted(found.values(), key=lambda f: (f.language, SPLITS.index(f.split)))
