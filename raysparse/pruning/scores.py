"""Unit scores: higher means more important; always in the original model's coordinates."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file


@dataclass
class UnitScores:
    """Importance of every head [layers x heads], FFN neuron [layers x ffn] and layer [layers]."""

    heads: torch.Tensor
    neurons: torch.Tensor
    layers: torch.Tensor | None = None

    def save(self, path) -> None:
        tensors = {"heads": self.heads.contiguous(), "neurons": self.neurons.contiguous()}
        if self.layers is not None:
            tensors["layers"] = self.layers.contiguous()
        save_file(tensors, str(path))

    @classmethod
    def load(cls, path) -> "UnitScores":
        tensors = load_file(str(path))
        return cls(tensors["heads"], tensors["neurons"], tensors.get("layers"))

    def __add__(self, other: "UnitScores") -> "UnitScores":
        layers = None if self.layers is None or other.layers is None else self.layers + other.layers
        return UnitScores(self.heads + other.heads, self.neurons + other.neurons, layers)
