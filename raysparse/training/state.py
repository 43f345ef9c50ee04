"""What a run has done so far, saved in every checkpoint so a restarted run continues.

A checkpoint folder holds ``state.json`` (stage, step, results so far), the model's
weights (``model.safetensors``), the dense teacher once fine-tuning ended, the
optimizer state, masks (JSON) and unit scores (safetensors). Nothing is unpickled:
optimizer state is read with ``torch.load(weights_only=True)``. Frozen weights (the
word-embedding table, 82% of e5-small) are left out: a restarted worker loads them from
the model source as the first start did, so a checkpoint is a fifth of the model's size.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raysparse.pruning import UnitScores
from raysparse.structure import Mask

# "learn": L0/movement learning their scores after a cached fine-tune (pruning.learning_steps)
STAGES = ("finetune", "learn", "prune", "recover", "evaluate", "finalize", "done")


@dataclass
class RunState:
    stage: str = "finetune"
    step: int = 0                     # steps done within the current stage
    prune_round: int = 0              # iterative schedule: rounds done
    metrics: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    masks: dict[str, Mask] = field(default_factory=dict)       # "shared" or a language -> mask
    scores: dict[str, UnitScores] = field(default_factory=dict)

    def advance(self, stage: str) -> None:
        self.stage, self.step = stage, 0

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        plain = {k: v for k, v in asdict(self).items() if k not in ("masks", "scores")}
        plain["mask_keys"] = sorted(self.masks)
        plain["score_keys"] = sorted(self.scores)
        (folder / "state.json").write_text(json.dumps(plain, indent=1))
        for key, mask in self.masks.items():
            mask.save(folder / f"mask-{key}.json")
        for key, scores in self.scores.items():
            scores.save(folder / f"scores-{key}.safetensors")

    @classmethod
    def load(cls, folder: Path) -> "RunState":
        plain = json.loads((folder / "state.json").read_text())
        masks = {key: Mask.load(folder / f"mask-{key}.json") for key in plain.pop("mask_keys")}
        scores = {key: UnitScores.load(folder / f"scores-{key}.safetensors") for key in plain.pop("score_keys")}
        return cls(**plain, masks=masks, scores=scores)


def save_weights(model: nn.Module, path: Path, skip: frozenset[str] = frozenset()) -> None:
    """Every tensor of ``model`` but those named in ``skip`` (weights the source restores)."""
    state = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()
             if name not in skip}
    save_file(state, str(path))


def load_weights(model: nn.Module, path: Path, skip: frozenset[str] = frozenset()) -> None:
    """Load what :func:`save_weights` wrote; only the ``skip`` tensors may be missing."""
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    absent = set(missing) - set(skip)
    if absent or unexpected:
        raise RuntimeError(f"checkpoint {path} does not fit the model: missing {sorted(absent)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")


def save_optimizer(optimizer, scheduler, path: Path) -> None:
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path)


def read_optimizer(path: Path) -> dict | None:
    return torch.load(path, weights_only=True) if path.is_file() else None


def load_optimizer(optimizer, scheduler, state: dict | None) -> None:
    if state is None:
        return
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
