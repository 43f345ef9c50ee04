"""Where a model source lives: the embedded default's cache folder, a local folder, or a hub id.

Its own module because both the loaders (:mod:`raysparse.models.sources`) and lean folders
(:mod:`raysparse.models.lean`, which find their base model's files) need it, and the loaders use lean
folders: kept in either, it would tie the two into an import cycle.
"""

from __future__ import annotations

from pathlib import Path

from raysparse.errors import RaysparseError
from raysparse.paths import hub_allowed

EMBEDDED = "embedded"
EMBEDDED_NAMES = (EMBEDDED, "embedded:multilingual-e5-small", "multilingual-e5-small")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def resolve_model(source: str) -> str:
    """A local folder path for ``source``, or the hub id itself when hub access is allowed."""
    if not isinstance(source, str) or not source:
        raise RaysparseError(f"model.source: expected 'embedded', a local folder or a hub id, got {source!r}")
    if source in EMBEDDED_NAMES:
        from raysparse.models.embedded import embedded_model_dir

        return str(embedded_model_dir())
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RaysparseError(f"model.source: {path} is a file; expected a model folder (config.json + weights)")
        if not (path / "config.json").is_file():
            raise RaysparseError(f"model.source: {path} has no config.json (expected a transformers model folder)")
        if not any((path / name).is_file() for name in WEIGHT_FILES):
            raise RaysparseError(f"model.source: {path} has no weights (expected one of {', '.join(WEIGHT_FILES)})")
        return str(path)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise RaysparseError(f"model.source: {source} does not exist (expected a model folder)")
    if not hub_allowed():
        raise RaysparseError(
            f"model.source: '{source}' is not a local folder and hub access is off "
            "(set RAYSPARSE_ALLOW_HUB=1 and unset HF_HUB_OFFLINE to download it, or pass a local folder)"
        )
    return source


__all__ = ["EMBEDDED", "EMBEDDED_NAMES", "WEIGHT_FILES", "resolve_model"]
