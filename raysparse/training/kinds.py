"""How each task kind trains: what a batch of its rows is and which loss it minimises.

A kind's strategy (:mod:`raysparse.data.kinds`) names its objective; this module holds the
torch side of the two there are:

- ``head``: rows are token features with labels (or answer positions), padded per batch;
  the loss is the one the task head returns (classification, tagging, QA).
- ``contrastive``: rows are (sentence, English) translation pairs, both sides tokenised
  after the model's retrieval prompt in one batch; the loss is a symmetric InfoNCE over
  the normalised sentence embeddings (retrieval).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from raysparse.data.kinds import kind_of
from raysparse.data.tasks import Task
from raysparse.training.batches import PaddingCollator

# ``data`` below is a raysparse.training.taskdata.TaskData (which imports this module): it is read for its
# tokenizer, sequence length and retrieval prompt only, so it is typed structurally here.
TaskData = Any


class Objective:
    """The batches and the loss of one training objective."""

    name: str

    def batch(self, data: TaskData, rows: Sequence) -> dict:
        """One batch of training ``rows`` (as a kind's ``training_rows`` gives them), with ``data``'s
        tokenizer, sequence length and retrieval prompt."""
        raise NotImplementedError

    def loss(self, outputs: dict) -> torch.Tensor:
        """The loss from a TaskModel forward over such a batch."""
        raise NotImplementedError

    def lengths(self, data: TaskData, rows: Sequence) -> list[int]:
        """Each row's length in tokens, as its batch would pad it (for ``data.group_by_length``)."""
        raise NotImplementedError


class HeadObjective(Objective):
    name = "head"

    def batch(self, data, rows):
        return PaddingCollator(data.tokenizer.pad_token_id)(rows)

    def lengths(self, data, rows):
        return [len(row["input_ids"]) for row in rows]

    def loss(self, outputs):
        return outputs["loss"]


class ContrastiveObjective(Objective):
    name = "contrastive"

    def batch(self, data, rows):
        from raysparse.training.retrieval import tokenize

        sources, targets = zip(*rows)   # one forward over both sides (DDP syncs once)
        batch = dict(tokenize(data.tokenizer, [*sources, *targets], data.prompt, data.spec.data.max_length))
        first = {}   # pairs of one English sentence share an id: not each other's negatives (info_nce)
        batch["labels"] = torch.tensor([first.setdefault(target, len(first)) for target in targets])
        return batch

    def lengths(self, data, rows):
        """The longer side of each pair, with the prompt and special tokens, truncated as a batch is."""
        sides = [data.tokenizer([data.prompt + text for text in side], truncation=True,
                                max_length=data.spec.data.max_length)["input_ids"] for side in zip(*rows)]
        return [max(len(ids) for ids in pair) for pair in zip(*sides)]

    def loss(self, outputs):
        from raysparse.training.retrieval import info_nce

        embeddings = outputs["embeddings"]
        half = len(embeddings) // 2   # sources, then their translations
        return info_nce(embeddings[:half], embeddings[half:], groups=outputs.get("labels"))


OBJECTIVES: dict[str, Objective] = {objective.name: objective for objective in (HeadObjective(),
                                                                               ContrastiveObjective())}


def objective_of(task: str | Task) -> Objective:
    """The objective ``task``'s kind trains with."""
    return OBJECTIVES[kind_of(task).objective]


__all__ = ["ContrastiveObjective", "HeadObjective", "OBJECTIVES", "Objective", "objective_of"]
