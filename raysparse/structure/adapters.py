"""Where heads, FFN neurons and layers live in each supported encoder family.

An adapter is the only place that knows attribute paths inside a transformers model;
everything else in raysparse asks it. BERT, RoBERTa, XLM-R and e5 share one layout.

It also knows what a model expects before each sentence it embeds for retrieval (e5:
``"query: "``; BERT and XLM-R: nothing). e5 checkpoints are plain ``BertModel``s, so the
family cannot tell: the prompt is recorded on the model's config
(``raysparse_retrieval_prompt``, set when the embedded e5 model is loaded, written by
``save_pruned`` and restored by ``load_pruned``) and :func:`retrieval_prompt` reads it.
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
    retrieval_prompt: str = ""                 # before each sentence embedded, unless the config records one

    def submodule(self, layer: nn.Module, path: str) -> nn.Module:
        return layer.get_submodule(path)


BERT_LIKE = EncoderLayout(
    family="bert",
    model_types=("bert", "roberta", "xlm-roberta", "camembert", "e5"),
)
LAYOUTS = (BERT_LIKE,)
SUPPORTED_MODEL_TYPES = tuple(t for layout in LAYOUTS for t in layout.model_types)

E5_PROMPT = "query: "   # what e5 models expect before each sentence (the embedded model is e5)
PROMPT_ATTRIBUTE = "raysparse_retrieval_prompt"   # a config attribute: the prompt recorded with a model


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


def recorded_retrieval_prompt(config) -> str | None:
    """The retrieval prompt ``config`` records, or None when it records none."""
    prompt = getattr(config, PROMPT_ATTRIBUTE, None)
    return prompt if isinstance(prompt, str) else None


def set_retrieval_prompt(model: nn.Module, prompt: str) -> None:
    """Record ``prompt`` on ``model``'s encoder config (copies, saves and shrunk models keep it)."""
    if not isinstance(prompt, str):
        raise RaysparseError(f"model: retrieval prompt {prompt!r} is not a string")
    setattr(find_encoder(model).config, PROMPT_ATTRIBUTE, prompt)


def retrieval_prompt(model: nn.Module) -> str:
    """The text put before every sentence ``model`` embeds (retrieval scoring and training, the
    text that decides a trimmed vocabulary): the prompt its config records, else its family's."""
    config = find_encoder(model).config
    recorded = recorded_retrieval_prompt(config)
    return recorded if recorded is not None else layout_for(config.model_type).retrieval_prompt
