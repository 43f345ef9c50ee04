"""Where raysparse keeps things (the model cache, the XTREME data directory), and files' digests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from raysparse.errors import RaysparseError


def file_digest(path: Path, chunk: int = 1 << 22, hasher=None) -> str:
    """SHA-256 of a file's bytes (or fed into ``hasher``), read in blocks: cache entries, lean folders' files."""
    hasher = hasher or hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            hasher.update(block)
    return hasher.hexdigest()


def cache_dir() -> Path:
    """Cache for converted models and other derived files (``RAYSPARSE_CACHE``)."""
    root = os.environ.get("RAYSPARSE_CACHE") or Path.home() / ".cache" / "raysparse"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The local XTREME directory: ``explicit`` if given, else ``RAYSPARSE_DATA``."""
    value = explicit or os.environ.get("RAYSPARSE_DATA")
    if not value:
        raise RaysparseError(
            "data.dir: no XTREME data directory given; set RAYSPARSE_DATA or the spec's "
            "data.dir to a folder laid out like XTREME's downloads (tatoeba/, xnli/, ...)"
        )
    path = Path(value).expanduser()
    if not path.is_dir():
        raise RaysparseError(f"data.dir: {path} is not a directory (expected XTREME data laid out as tatoeba/, xnli/, ...)")
    return path


def hub_allowed() -> bool:
    """Hub access is opt-in: only when RAYSPARSE_ALLOW_HUB=1 and HF_HUB_OFFLINE is not set."""
    return os.environ.get("RAYSPARSE_ALLOW_HUB") == "1" and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "")


def check_output(out: str | Path, *inputs: str) -> None:
    """Refuse, before any work, an output folder that is (or holds) an input or is a file."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise RaysparseError(f"out: {out} is a file (expected a folder)")
    for source in inputs:
        path = Path(source).expanduser()
        if path.exists() and (out == path.resolve() or path.resolve() in out.parents
                              or out in path.resolve().parents):
            raise RaysparseError(f"out: {out} would overwrite the input {path} (expected a separate folder)")
