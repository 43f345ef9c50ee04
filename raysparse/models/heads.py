"""Task heads on top of any encoder the structure layer provides (shrunk ones included).

``TaskModel`` is an encoder plus one small head per task kind. It saves and loads
through ``raysparse.structure.save_pruned`` / ``load_pruned`` like a bare encoder.
What each kind's head is and outputs is one :class:`Head` per kind (:data:`HEADS`); the
rest of what a kind decides is in :mod:`raysparse.data.kinds`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raysparse.errors import RaysparseError


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class Head:
    """One kind's head: the module on top of the encoder, and what a forward returns.

    ``output_keys``: the outputs evaluation reads; ``per_token``: they hold one row per
    token (cut at each input's length), not one per input.
    """

    output_keys: tuple[str, ...] = ("logits",)
    per_token: bool = True

    def build(self, hidden: int, num_labels: int, dropout: float) -> nn.Module:
        raise NotImplementedError

    def outputs(self, model: "TaskModel", hidden: torch.Tensor, attention_mask: torch.Tensor, labels=None,
                start_positions=None, end_positions=None) -> dict:
        raise NotImplementedError


class ClassificationHead(Head):
    """pair_classification: the first token's state through a small MLP; cross-entropy over labels."""

    per_token = False

    def build(self, hidden, num_labels, dropout):
        return nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, num_labels))

    def outputs(self, model, hidden, attention_mask, labels=None, start_positions=None, end_positions=None):
        logits = model.head(model.dropout(hidden[:, 0]))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return {"logits": logits, "loss": loss}


class TaggingHead(Head):
    """tagging: one linear per token; cross-entropy over the tags of labelled sub-words."""

    def build(self, hidden, num_labels, dropout):
        return nn.Linear(hidden, num_labels)

    def outputs(self, model, hidden, attention_mask, labels=None, start_positions=None, end_positions=None):
        logits = model.head(model.dropout(hidden))
        loss = (F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
                if labels is not None else None)
        return {"logits": logits, "loss": loss}


class SpanHead(Head):
    """qa: start and end logits per token (padding masked); the mean of both cross-entropies."""

    output_keys = ("start_logits", "end_logits")

    def build(self, hidden, num_labels, dropout):
        return nn.Linear(hidden, 2)

    def outputs(self, model, hidden, attention_mask, labels=None, start_positions=None, end_positions=None):
        start_logits, end_logits = model.head(model.dropout(hidden)).unbind(-1)
        start_logits = start_logits.masked_fill(attention_mask == 0, torch.finfo(start_logits.dtype).min)
        end_logits = end_logits.masked_fill(attention_mask == 0, torch.finfo(end_logits.dtype).min)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = (F.cross_entropy(start_logits, start_positions) + F.cross_entropy(end_logits, end_positions)) / 2
        return {"start_logits": start_logits, "end_logits": end_logits,
                "logits": torch.stack([start_logits, end_logits], -1), "loss": loss}


class EmbeddingHead(Head):
    """retrieval: no head; the normalised mean of the token states. ``labels`` (one per translation
    pair of a contrastive batch: which English sentence it has) pass through to the loss."""

    output_keys = ("embeddings",)
    per_token = False

    def build(self, hidden, num_labels, dropout):
        return nn.Identity()

    def outputs(self, model, hidden, attention_mask, labels=None, start_positions=None, end_positions=None):
        outputs = {"embeddings": F.normalize(mean_pool(hidden, attention_mask), dim=-1)}
        if labels is not None:
            outputs["labels"] = labels
        return outputs


HEADS: dict[str, Head] = {"pair_classification": ClassificationHead(), "tagging": TaggingHead(), "qa": SpanHead(),
                          "retrieval": EmbeddingHead()}
KINDS = tuple(HEADS)


class TaskModel(nn.Module):
    """Encoder + head. Outputs a dict with ``logits`` (or ``embeddings``) and ``loss`` when labels are given."""

    def __init__(self, encoder: nn.Module, kind: str, num_labels: int = 0, dropout: float = 0.1):
        super().__init__()
        if kind not in KINDS:
            raise RaysparseError(f"task.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        self.encoder = encoder
        self.kind = kind
        self.num_labels = num_labels
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.head = HEADS[kind].build(hidden, num_labels, dropout)

    @property
    def config(self):
        return self.encoder.config

    def init_kwargs(self) -> dict:
        return {"kind": self.kind, "num_labels": self.num_labels}

    @classmethod
    def from_config(cls, config, kind: str = "retrieval", num_labels: int = 0) -> "TaskModel":
        from transformers import AutoModel

        return cls(AutoModel.from_config(config, add_pooling_layer=False), kind, num_labels)

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None, start_positions=None,
                end_positions=None, **_) -> dict:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return HEADS[self.kind].outputs(self, hidden, attention_mask, labels, start_positions, end_positions)
