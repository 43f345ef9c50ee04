"""Where heads, FFN neurons and layers live in each supported encoder family.

An adapter is the only place that knows attribute paths inside a transformers model;
everything else in raysparse asks it. BERT, RoBERTa, XLM-R and e5 share one layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from raysparse.errors import RaysparseError


@dataclass(frozen=True)
class EncoderLayout:
    """Attribute paths of one architecture family (relative to a layer module)."""

    family: str
    model_types: tuple[str, ...]
    attention: str = "attention.self"          # holds query/key/value
    attention_output: str = "attention.output.dense"
    ffn_input: str = "intermediate.dense"
    ffn_output: str = "output.dense"

    def submodule(self, layer: nn.Module, path: str) -> nn.Module:
        return layer.get_submodule(path)


BERT_LIKE = EncoderLayout(
    family="bert",
    model_types=("bert", "roberta", "xlm-roberta", "camembert", "e5"),
)
LAYOUTS = (BERT_LIKE,)
SUPPORTED_MODEL_TYPES = tuple(t for layout in LAYOUTS for t in layout.model_types)


def layout_for(model_type: str) -> EncoderLayout:
    for layout in LAYOUTS:
        if model_type in layout.model_types:
            return layout
    raise RaysparseError(
        f"model: unknown architecture '{model_type}' (expected one of: {', '.join(SUPPORTED_MODEL_TYPES)})"
    )


def find_encoder(model: nn.Module) -> nn.Module:
    """The transformers base encoder inside ``model`` (itself, or a task model's backbone)."""
    for module in model.modules():
        if hasattr(module, "encoder") and hasattr(module, "embeddings") and hasattr(module, "config"):
            if hasattr(module.encoder, "layer"):
                return module
    raise RaysparseError(
        f"model: {type(model).__name__} has no transformers encoder with embeddings and encoder.layer "
        f"(expected a model of type {', '.join(SUPPORTED_MODEL_TYPES)})"
    )


class Encoder:
    """A view of a live encoder that names its prunable parts."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.base = find_encoder(model)
        self.config = self.base.config
        self.layout = layout_for(self.config.model_type)

    @property
    def layers(self) -> list[nn.Module]:
        return list(self.base.encoder.layer)

    @property
    def embeddings(self) -> nn.Module:
        return self.base.embeddings

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.layout.attention)

    def attention_output(self, layer: nn.Module) -> nn.Linear:
        return layer.get_submodule(self.layout.attention_output)

    def ffn_input(self, layer: nn.Module) -> nn.Linear:
        return layer.get_submodule(self.layout.ffn_input)

    def ffn_output(self, layer: nn.Module) -> nn.Linear:
        return layer.get_submodule(self.layout.ffn_output)

    @property
    def head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def heads_per_layer(self) -> list[int]:
        """Current head count of every layer (shrunk layers have fewer)."""
        return [self.attention_output(layer).in_features // self.head_dim for layer in self.layers]

    def neurons_per_layer(self) -> list[int]:
        return [self.ffn_output(layer).in_features for layer in self.layers]
