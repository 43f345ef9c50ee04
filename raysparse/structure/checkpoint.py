"""Save and load shrunk models: safetensors weights, the original config, a JSON sidecar.

transformers configs cannot describe per-layer shapes, so the sidecar ``raysparse.json``
records the Structure; loading rebuilds the full-size model from config.json, slices it
to that structure and then loads the weights (strictly: every tensor must match). The
sidecar also records the retrieval prompt the model expects (``retrieval_prompt``,
:func:`raysparse.structure.adapters.retrieval_prompt`).
"""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from raysparse.errors import RaysparseError
from raysparse.structure.adapters import (
    E5_PROMPT,
    PROMPT_ATTRIBUTE,
    Encoder,
    recorded_retrieval_prompt,
    retrieval_prompt,
    set_retrieval_prompt,
)
from raysparse.structure.shrink import Structure, select_units, source_config, structure_of

SIDECAR = "raysparse.json"
WEIGHTS = "model.safetensors"
FORMAT = "raysparse-pruned/1"
# A sidecar written before the prompt was recorded: raysparse used e5's prompt for every model then.
LEGACY_PROMPT = E5_PROMPT


def _class_path(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_class(path: str):
    module_name, _, qualname = path.partition(":")
    if module_name.split(".")[0] not in ("transformers", "raysparse"):
        raise RaysparseError(f"checkpoint: model_class {path!r} is not a transformers or raysparse class")
    try:
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise RaysparseError(f"checkpoint: model_class {path!r} cannot be imported") from None
    return obj


def _init_kwargs(model: nn.Module) -> dict:
    """Constructor arguments beyond the config that rebuild the same module tree."""
    if hasattr(model, "init_kwargs"):
        return model.init_kwargs()
    if hasattr(model, "pooler") and model.pooler is None:
        return {"add_pooling_layer": False}
    return {}


def save_pruned(model: nn.Module, directory: str | Path, tokenizer=None, extra: dict | None = None) -> Path:
    """Write ``model`` (shrunk or not) so that :func:`load_pruned` rebuilds it exactly."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = source_config(model)
    config.save_pretrained(directory)
    save_model(model, str(directory / WEIGHTS))
    sidecar = {
        "format": FORMAT,
        "model_class": _class_path(model),
        "init": _init_kwargs(model),
        "structure": structure_of(model).to_dict(),
        "live_config": {"pad_token_id": Encoder(model).config.pad_token_id},
        "retrieval_prompt": retrieval_prompt(model),
        "extra": extra or {},
    }
    (directory / SIDECAR).write_text(json.dumps(sidecar))
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory)
    return directory


def save_tokenizer(tokenizer, directory: str | Path) -> None:
    """``tokenizer.save_pretrained`` without the truncation and padding of its last call: a fast tokenizer
    keeps them in its backend, which would write them into tokenizer.json (a shipped tokenizer that cuts
    every text at the run's max_length, and a file that no longer equals the base model's)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and (backend.truncation is not None or backend.padding is not None):
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.backend_tokenizer.no_truncation()
        tokenizer.backend_tokenizer.no_padding()
    tokenizer.save_pretrained(directory)


def is_pruned_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / SIDECAR).is_file()


def read_sidecar(directory: str | Path) -> dict:
    path = Path(directory) / SIDECAR
    try:
        sidecar = json.loads(path.read_text())
    except FileNotFoundError:
        raise RaysparseError(f"checkpoint: {path} is missing (expected a folder written by raysparse)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RaysparseError(f"checkpoint: {path} is not valid JSON (corrupt checkpoint?)") from None
    if not isinstance(sidecar, dict):
        raise RaysparseError(f"checkpoint: {path} holds a JSON {type(sidecar).__name__}, not an object "
                             "(expected the format, model_class and structure raysparse writes)")
    if sidecar.get("format") != FORMAT:
        raise RaysparseError(f"checkpoint: {path} has format {sidecar.get('format')!r}; expected {FORMAT!r}")
    missing = [key for key, kind in (("model_class", str), ("structure", dict))
               if not isinstance(sidecar.get(key), kind)]
    if missing:
        raise RaysparseError(f"checkpoint: {path} has no {' or '.join(missing)} "
                             "(expected the model class and per-layer structure raysparse writes; corrupt checkpoint?)")
    return sidecar


def _sidecar_prompt(sidecar: dict, config_prompt: str | None) -> str:
    """The sidecar's retrieval prompt; for a sidecar older than that record, the config's or e5's."""
    prompt = sidecar.get("retrieval_prompt")
    if isinstance(prompt, str):
        return prompt
    return config_prompt if config_prompt is not None else LEGACY_PROMPT


def checkpoint_retrieval_prompt(directory: str | Path) -> str:
    """The retrieval prompt of the model in ``directory`` (what :func:`load_pruned` gives it), weights unread."""
    sidecar = read_sidecar(directory)
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    prompt = config.get(PROMPT_ATTRIBUTE) if isinstance(config, dict) else None
    return _sidecar_prompt(sidecar, prompt if isinstance(prompt, str) else None)


def build_from_config(model_class, config, init: dict | None = None) -> nn.Module:
    """Instantiate a transformers (or raysparse) model class from a config, without weights."""
    init = init or {}
    if hasattr(model_class, "from_config"):
        return model_class.from_config(config, **init)
    return model_class(config, **init)


def restructure(model: nn.Module, structure: Structure) -> nn.Module:
    """Slice a full-size model to ``structure`` (positions in a full model = original indices)."""
    return select_units(model, structure.layers, structure.heads, structure.neurons, structure.vocab)


def load_pruned(directory: str | Path, model_class=None, base_state: dict | None = None) -> nn.Module:
    """Load a model written by :func:`save_pruned`, non-uniform layers included.

    ``base_state``: tensors a lean folder left out (identical to its base model's), by name in
    this model; only those may be missing from the weights file."""
    from transformers import AutoConfig

    directory = Path(directory)
    if not directory.is_dir():
        raise RaysparseError(f"checkpoint: {directory} does not exist (expected a folder written by raysparse)")
    sidecar = read_sidecar(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise RaysparseError(f"checkpoint: {directory} has no {WEIGHTS} (expected weights beside {SIDECAR})")
    config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    cls = model_class or _resolve_class(sidecar["model_class"])
    model = build_from_config(cls, config, sidecar.get("init"))
    structure = Structure.from_dict(sidecar["structure"])
    if not structure.is_full:
        restructure(model, structure)
    Encoder(model).config.pad_token_id = sidecar.get("live_config", {}).get("pad_token_id", config.pad_token_id)
    set_retrieval_prompt(model, _sidecar_prompt(sidecar, recorded_retrieval_prompt(config)))
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, OSError) as exc:
        raise RaysparseError(f"checkpoint: {weights} cannot be read ({exc}); the file is corrupt or truncated") from None
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise RaysparseError(f"checkpoint: {weights} does not match its {SIDECAR} ({first})") from None
    filled = {name for name in missing if base_state is not None and name in base_state}
    if filled:
        import torch

        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                if name in filled:
                    tensor.copy_(base_state[name])
        missing = [name for name in missing if name not in filled]
    if missing or unexpected:
        raise RaysparseError(f"checkpoint: {weights} does not match its {SIDECAR} "
                             f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.eval()
    return model
