"""Lean model folders: leave out what the base model already holds, record which base it was.

A pruned e5-small is 82% word-embedding table, and unless the vocabulary was trimmed that
table is the base model's, bit for bit. :func:`save_lean` writes a model like
:func:`~raysparse.structure.checkpoint.save_pruned` but without the tensors identical to its
base's (and without the files beside them, such as the tokenizer's, that the base's folder holds
byte for byte), and records the base's source and a SHA-256 of exactly those tensors and files;
:func:`materialize` (behind ``raysparse.load_model``) loads the base again, checks the digest
and fills them in, or says in one line that the base is missing or differs.
``raysparse export`` writes the self-contained form for shipping.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raysparse.errors import RaysparseError
from raysparse.structure.adapters import Encoder
from raysparse.structure.checkpoint import SIDECAR, WEIGHTS, load_pruned, read_sidecar, save_pruned

BASE = "base"


def encoder_prefix(model: nn.Module) -> str:
    """Where the base encoder sits inside ``model`` (``""`` for a bare encoder, ``"encoder."`` in a task model)."""
    base = Encoder(model).base
    for name, module in model.named_modules():
        if module is base:
            return f"{name}." if name else ""
    return ""


def digest(state: dict[str, torch.Tensor], names: list[str]) -> str:
    hasher = hashlib.sha256()
    for name in sorted(names):
        tensor = state[name].detach().contiguous().cpu()
        hasher.update(name.encode())
        hasher.update(str(tuple(tensor.shape)).encode())
        hasher.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return hasher.hexdigest()


def save_lean(model: nn.Module, directory: str | Path, base_source: str, tokenizer=None,
              extra: dict | None = None, *, load: Callable[[str], nn.Module]) -> Path:
    """:func:`save_pruned` without the tensors identical to ``base_source``'s (same name, shape, values);
    ``load(source)`` loads the base (``raysparse.load_model``)."""
    directory = save_pruned(model, directory, tokenizer=tokenizer, extra=extra)
    base = load(base_source).state_dict()
    prefix = encoder_prefix(model)
    weights = directory / WEIGHTS
    state = load_file(str(weights))
    omitted = sorted(name[len(prefix):] for name, tensor in state.items()
                     if name.startswith(prefix) and name[len(prefix):] in base
                     and base[name[len(prefix):]].shape == tensor.shape and torch.equal(base[name[len(prefix):]], tensor))
    files = _same_files_as_base(directory, base_source)
    if not omitted and not files:
        return directory
    save_file({k: v for k, v in state.items() if k[len(prefix):] not in omitted or not k.startswith(prefix)},
              str(weights))
    for name in files:
        (directory / name).unlink()
    sidecar = read_sidecar(directory)
    sidecar[BASE] = {"source": base_source, "prefix": prefix, "tensors": omitted, "sha256": digest(base, omitted),
                     "files": files}
    (directory / SIDECAR).write_text(json.dumps(sidecar))
    return directory


def _same_files_as_base(directory: Path, base_source: str) -> dict[str, str]:
    """{name: sha256} of the files beside the weights (the tokenizer's: 0.6 of a full tiny model, 17 MB of
    e5-small's) that the base model's folder holds byte for byte under the same name."""
    from raysparse.models.locate import resolve_model
    from raysparse.paths import file_digest

    try:
        location = Path(resolve_model(base_source))
    except RaysparseError:
        return {}
    if not location.is_dir():
        return {}
    same = {}
    for path in sorted(directory.iterdir()):
        twin = location / path.name
        if path.name in (WEIGHTS, SIDECAR, "config.json") or not path.is_file() or not twin.is_file():
            continue
        if path.stat().st_size == twin.stat().st_size and (sha := file_digest(path)) == file_digest(twin):
            same[path.name] = sha
    return same


@contextmanager
def complete_folder(directory: str | Path):
    """``directory`` with the files it leaves out of its base back in place (a temporary folder of links
    when it leaves some out; the folder itself otherwise): what a tokenizer loads from."""
    from raysparse.models.locate import resolve_model
    from raysparse.paths import file_digest

    directory = Path(directory)
    base = read_sidecar(directory).get(BASE) or {} if (directory / SIDECAR).is_file() else {}
    files = base.get("files") or {}
    if not files:
        yield directory
        return
    try:
        location = Path(resolve_model(base["source"]))
    except RaysparseError as exc:
        raise RaysparseError(f"model: {directory} leaves out {', '.join(files)} of its base model {base['source']!r}, "
                             f"which cannot be found here ({exc}); export it where the base is (raysparse export) "
                             "to get a self-contained folder") from None
    for name, sha in files.items():
        if not (location / name).is_file() or file_digest(location / name) != sha:
            raise RaysparseError(f"model: {directory} was saved against another version of its base model "
                                 f"{base['source']!r} ({name} differs there: expected sha256 {sha[:12]}...)")
    with tempfile.TemporaryDirectory(prefix="raysparse-lean-") as folder:
        for path in directory.iterdir():
            (Path(folder) / path.name).symlink_to(path.resolve())
        for name in files:
            (Path(folder) / name).symlink_to((location / name).resolve())
        yield Path(folder)


def materialize(directory: str | Path, model_class=None, *, load: Callable[[str], nn.Module]) -> nn.Module:
    """Load a folder written by :func:`save_lean` (or a self-contained one), filling in the base's tensors
    (``load(source)`` loads the base)."""
    sidecar = read_sidecar(directory)
    base = sidecar.get(BASE)
    if not base:
        return load_pruned(directory, model_class=model_class)
    try:
        state = load(base["source"]).state_dict()
    except RaysparseError as exc:
        raise RaysparseError(f"model: {directory} leaves out {len(base['tensors'])} tensors of its base model "
                             f"{base['source']!r}, which cannot be loaded here ({exc}); export it where the base "
                             "is (raysparse export) to get a self-contained folder") from None
    absent = [name for name in base["tensors"] if name not in state]
    if absent or digest(state, base["tensors"]) != base["sha256"]:
        raise RaysparseError(f"model: {directory} was saved against another version of its base model "
                             f"{base['source']!r} (the {len(base['tensors'])} tensors it leaves out differ here: "
                             f"expected sha256 {base['sha256'][:12]}...)")
    return load_pruned(directory, model_class=model_class,
                       base_state={base["prefix"] + name: state[name] for name in base["tensors"]})


def export(directory: str | Path, out: str | Path, tokenizer=None, *, load: Callable[[str], nn.Module]) -> Path:
    """The self-contained form of a (lean) model folder, for shipping."""
    model = materialize(directory, load=load)
    return save_pruned(model, out, tokenizer=tokenizer, extra=read_sidecar(directory).get("extra"))


__all__ = ["complete_folder", "encoder_prefix", "export", "materialize", "save_lean"]
