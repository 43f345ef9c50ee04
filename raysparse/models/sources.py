"""Where an encoder comes from: the embedded default, a local folder, or the hub (opt-in)."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from torch import nn

from raysparse.errors import RaysparseError, first_line
from raysparse.models.locate import EMBEDDED, resolve_model
from raysparse.paths import hub_allowed
from raysparse.structure import SUPPORTED_MODEL_TYPES, is_pruned_checkpoint, layout_for
from raysparse.structure.adapters import recorded_retrieval_prompt, set_retrieval_prompt
from raysparse.structure.checkpoint import checkpoint_retrieval_prompt, read_sidecar


def _read_config(location: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(location, local_files_only=not hub_allowed(),
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise RaysparseError(f"model.source: cannot read the config of {location} ({first_line(exc)})") from None


def check_architecture(location: str, trust_remote_code: bool = False) -> str:
    """Fail early, with one line, on an architecture raysparse has no adapter for."""
    config = _read_config(location, trust_remote_code)
    layout_for(config.model_type)
    return config.model_type


def check_model(location: str, trust_remote_code: bool = False) -> None:
    """What a model folder must hold before any worker loads it, checked without loading its weights:
    a sidecar (``raysparse.json``) raysparse can read, a readable config of a supported architecture,
    and safetensors files whose headers cover them (a truncated copy fails here, in one line)."""
    path = Path(location)
    pruned = path.is_dir() and is_pruned_checkpoint(path)
    if pruned:
        read_sidecar(path)
    # raysparse's own folders are read with trust_remote_code=False (load_pruned), whatever the spec says
    check_architecture(location, trust_remote_code and not pruned)
    if path.is_dir():
        check_weights(path)


def check_weights(folder: Path) -> None:
    """Every safetensors file of a model folder opens and its header covers the file."""
    from safetensors import safe_open

    files = [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        try:
            files += [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise RaysparseError(f"model.source: {index} is not a safetensors index "
                                 "(expected JSON with a weight_map)") from None
    for file in files:
        if not file.is_file():
            if file.name != "model.safetensors":
                raise RaysparseError(f"model.source: {file} is missing (named in {index.name})")
            continue
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise RaysparseError(f"model.source: {file} cannot be read ({first_line(exc)}); the file is corrupt or "
                                 "truncated (expected a complete safetensors file)") from None


def _embedded_prompt(location: str) -> str | None:
    """e5's prompt for a folder converted from the embedded model (its config predates the record)."""
    from raysparse.models.embedded import conversion_prompt

    return conversion_prompt(location) if Path(location).is_dir() else None


def source_retrieval_prompt(source: str = EMBEDDED, trust_remote_code: bool = False) -> str:
    """What ``raysparse.structure.retrieval_prompt(load_encoder(source))`` is, without loading weights."""
    location = resolve_model(source)
    if Path(location).is_dir() and is_pruned_checkpoint(location):
        return checkpoint_retrieval_prompt(location)
    config = _read_config(location, trust_remote_code)
    recorded = recorded_retrieval_prompt(config)
    if recorded is None:
        recorded = _embedded_prompt(location)
    return recorded if recorded is not None else layout_for(config.model_type).retrieval_prompt


def load_encoder(source: str = EMBEDDED, model_class=None, trust_remote_code: bool = False) -> nn.Module:
    """Load an encoder (or a task model class around it) from any supported source.

    Folders written by raysparse (shrunk models) are rebuilt with their per-layer shapes.
    Code shipped with a model (``auto_map``) runs only with ``trust_remote_code`` (the spec's
    ``model.trust_remote_code``); weights load from safetensors, or ``.bin`` with weights_only.
    """
    location = resolve_model(source)
    if Path(location).is_dir() and is_pruned_checkpoint(location):
        from raysparse.models.lean import materialize

        return materialize(location, model_class=model_class, load=load_encoder)   # a lean folder: base tensors back
    check_architecture(location, trust_remote_code)
    from transformers import AutoModel

    cls = model_class or AutoModel
    kwargs = {"add_pooling_layer": False} if cls is AutoModel else {}
    try:
        model = cls.from_pretrained(location, local_files_only=not hub_allowed(), trust_remote_code=trust_remote_code,
                                    **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:
        raise RaysparseError(f"model.source: cannot load weights from {location} ({first_line(exc)})") from None
    if recorded_retrieval_prompt(model.config) is None and (prompt := _embedded_prompt(location)) is not None:
        set_retrieval_prompt(model, prompt)
    return model.eval()


def load_tokenizer(source: str = EMBEDDED, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    from raysparse.models.lean import complete_folder

    location = resolve_model(source)
    try:
        if not Path(location).is_dir():
            return AutoTokenizer.from_pretrained(location, local_files_only=not hub_allowed(),
                                                 trust_remote_code=trust_remote_code)
        with complete_folder(location) as folder:   # a lean folder: the base's tokenizer files back
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise RaysparseError(f"model.source: cannot load a tokenizer from {location} ({first_line(exc)})") from None


__all__ = ["EMBEDDED", "SUPPORTED_MODEL_TYPES", "check_architecture", "check_model", "check_weights", "load_encoder",
           "load_tokenizer", "resolve_model", "source_retrieval_prompt"]
