"""Lean model folders: leave out what the base model already holds, record which base it was.

A pruned e5-small is 82% word-embedding table, and unless the vocabulary was trimmed that
table is the base model's, bit for bit. :func:`save_lean` writes a model like
:func:`~raysparse.structure.checkpoint.save_pruned` but without the tensors identical to its
base's, and records the base's source and a SHA-256 of exactly those tensors;
:func:`materialize` (behind ``raysparse.load_model``) loads the base again, checks the digest
and fills them in, or says in one line that the base is missing or differs.
``raysparse export`` writes the self-contained form for shipping.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
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
    if not omitted:
        return directory
    save_file({k: v for k, v in state.items() if k[len(prefix):] not in omitted or not k.startswith(prefix)},
              str(weights))
    sidecar = read_sidecar(directory)
    sidecar[BASE] = {"source": base_source, "prefix": prefix, "tensors": omitted, "sha256": digest(base, omitted)}
    (directory / SIDECAR).write_text(json.dumps(sidecar))
    return directory


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


__all__ = ["encoder_prefix", "export", "materialize", "save_lean"]
