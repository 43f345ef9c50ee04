"""Batches for every stage of a run, addressed by step so a resumed run sees the same data.

A batch is a pure function of (purpose, languages, step, rank): the rows of step ``s``
come from a permutation seeded by the epoch, sliced for this rank. Resuming at step
``s`` therefore continues exactly where the killed run stopped, with no iterator state.

Retrieval tasks (Tatoeba, BUCC) train on translation pairs: XNLI premises paired with
their English originals (a parallel corpus), with a contrastive loss; every other task
trains on its own rows with its head's loss.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from raysparse.config import RunSpec
from raysparse.data.tasks import Task, get_task
from raysparse.errors import RaysparseError
from raysparse.training.batches import PaddingCollator, model_device, to_device


def step_indices(step: int, batch_size: int, num_rows: int, seed: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Row indices of this rank's share of global batch ``step`` (epochs reshuffle, seeded)."""
    global_size = batch_size * world_size
    start = step * global_size
    indices = []
    for position in range(start + rank * batch_size, start + (rank + 1) * batch_size):
        epoch, offset = divmod(position, num_rows)
        order = list(range(num_rows))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        indices.append(order[offset])
    return indices


class TaskData:
    """Training/scoring batches of one task for the languages a stage asks for."""

    def __init__(self, spec: RunSpec, tokenizer, rank: int = 0, world_size: int = 1):
        self.spec, self.tokenizer = spec, tokenizer
        self.task: Task = get_task(spec.data.task)
        self.rank, self.world_size = rank, world_size
        self._features: dict[str, list] = {}
        self.sources: dict[str, str] = {}

    # --- rows ------------------------------------------------------------------------
    def _language_features(self, language: str) -> list:
        if language in self._features:
            return self._features[language]
        spec = self.spec
        if self.task.kind == "retrieval":
            from raysparse.data.parallel import xnli_premise_pairs

            pairs = xnli_premise_pairs([language], spec.data.dir).get(language)
            if not pairs:
                raise RaysparseError(f"data.languages: no XNLI translation pairs for '{language}' to train "
                                     f"{self.task.name} on")
            rows = list(zip(*pairs))
            if spec.data.max_train_examples:
                random.Random(spec.seed).shuffle(rows)
                rows = rows[: spec.data.max_train_examples]
            self.sources[language] = f"xnli/dev-{language}.tsv premises paired with dev-en ({len(rows)} pairs)"
        else:
            from raysparse.data.features import train_features
            from raysparse.data.regimes import training_data

            data = training_data(self.task, "in-language", [language], spec.seed, spec.data.train_fraction,
                                 spec.data.dir).per_language[language]
            table = data.rows
            if spec.data.max_train_examples and len(table) > spec.data.max_train_examples:
                table = table.shuffle(seed=spec.seed).select(range(spec.data.max_train_examples))
            features = train_features(self.task, table, self.tokenizer, spec.data.max_length, spec.data.doc_stride)
            keep = [c for c in ("input_ids", "attention_mask", "token_type_ids", "labels", "start_positions",
                                "end_positions") if c in features.column_names]
            rows = features.select_columns(keep).to_list()
            self.sources[language] = data.source
        self._features[language] = rows
        return rows

    def pool(self, languages: list[str]) -> list:
        """All training rows of ``languages``, in a fixed order."""
        return [row for language in sorted(languages) for row in self._language_features(language)]

    # --- batches ---------------------------------------------------------------------
    def batch(self, rows: list, step: int, batch_size: int, salt: int = 0):
        if not rows:
            raise RaysparseError(f"data: no training rows for {self.task.name}")
        chosen = [rows[i] for i in step_indices(step, batch_size, len(rows), self.spec.seed + salt, self.rank,
                                                self.world_size)]
        if self.task.kind == "retrieval":
            from raysparse.training.retrieval import tokenize

            sources, targets = zip(*chosen)   # one forward over both sides (DDP syncs once)
            return dict(tokenize(self.tokenizer, [*sources, *targets], "query: ", self.spec.data.max_length))
        return PaddingCollator(self.tokenizer.pad_token_id)(chosen)

    def batches(self, rows: list, start: int, count: int, batch_size: int, salt: int = 0) -> list:
        return [self.batch(rows, step, batch_size, salt) for step in range(start, start + count)]

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The task's loss of ``model`` on ``batch`` (one forward)."""
        return self.loss_of(model(**to_device(batch, model_device(model))))

    def loss_of(self, outputs: dict) -> torch.Tensor:
        """The task's loss from a forward's outputs: the head's loss, or InfoNCE for retrieval."""
        if self.task.kind != "retrieval":
            return outputs["loss"]
        from raysparse.training.retrieval import info_nce

        embeddings = outputs["embeddings"]
        half = len(embeddings) // 2   # sources, then their translations
        return info_nce(embeddings[:half], embeddings[half:])
