"""Batches for every stage of a run, addressed by step so a resumed run sees the same data.

A batch is a pure function of (purpose, languages, step, rank): the rows of step ``s``
come from a permutation seeded by the epoch, sliced for this rank. Resuming at step
``s`` therefore continues exactly where the killed run stopped, with no iterator state.

Retrieval tasks (Tatoeba, BUCC) train on translation pairs: XNLI premises paired with
their English originals (a parallel corpus), with a contrastive loss; every other task
trains on its own rows with its head's loss. The task's kind decides which
(``raysparse.data.kinds`` for the rows, ``raysparse.training.kinds`` for batches and loss).
"""

from __future__ import annotations

import functools
import random

import torch
from torch import nn

from raysparse.config import RunSpec
from raysparse.data.kinds import kind_of
from raysparse.data.tasks import Task, get_task
from raysparse.errors import RaysparseError
from raysparse.training.batches import model_device, to_device
from raysparse.training.kinds import objective_of


def step_indices(step: int, batch_size: int, num_rows: int, seed: int, rank: int = 0, world_size: int = 1,
                 lengths: RowLengths | None = None) -> list[int]:
    """Row indices of this rank's share of global batch ``step`` (epochs reshuffle, seeded); with
    ``lengths``, each global batch holds rows of similar length (:func:`length_grouped_order`)."""
    global_size = batch_size * world_size
    start = step * global_size
    indices = []
    for position in range(start + rank * batch_size, start + (rank + 1) * batch_size):
        epoch, offset = divmod(position, num_rows)
        epoch_seed = seed * 1_000_003 + epoch
        order = (epoch_order(num_rows, epoch_seed) if lengths is None else
                 length_grouped_order(lengths, global_size, epoch_seed, (-epoch * num_rows) % global_size))
        indices.append(order[offset])
    return indices


@functools.lru_cache(maxsize=8)
def epoch_order(num_rows: int, seed: int) -> tuple[int, ...]:
    """The seeded permutation of one epoch's rows: shuffled once per epoch, not once per row (a
    shuffle of a 10k-row pool per row was 40 ms of every training step)."""
    order = list(range(num_rows))
    random.Random(seed).shuffle(order)
    return tuple(order)


class RowLengths:
    """The token lengths of a pool's rows, hashed by identity: the grouped order of an epoch is
    cached per pool without hashing thousands of lengths at every row."""

    __slots__ = ("values",)

    def __init__(self, values) -> None:
        self.values = tuple(values)


GROUP_BATCHES = 64   # global batches whose rows are sorted by length together


@functools.lru_cache(maxsize=8)
def length_grouped_order(lengths: RowLengths, global_size: int, seed: int, phase: int = 0) -> tuple[int, ...]:
    """The epoch's permutation (:func:`epoch_order`), each run of ``GROUP_BATCHES`` global batches
    re-cut into batches of rows of similar length, in a seeded order.

    Every row still comes once per epoch and a batch still mixes languages, but a padded batch
    is mostly real tokens: on XNLI translation pairs padding was 45% of what a contrastive
    step computed. ``phase`` rows first complete the batch that began in the previous epoch.
    """
    order = epoch_order(len(lengths.values), seed)
    rng, span = random.Random(seed + 1), global_size * GROUP_BATCHES
    grouped = list(order[:phase])
    for start in range(phase, len(order), span):
        part = sorted(order[start:start + span], key=lambda i: lengths.values[i])
        batches = [part[i:i + global_size] for i in range(0, len(part), global_size)]
        tail = batches.pop() if len(batches[-1]) < global_size else []   # the epoch's last, partial batch stays last
        rng.shuffle(batches)
        grouped += [i for batch in batches for i in batch] + tail
    return tuple(grouped)


class TaskData:
    """Training/scoring batches of one task for the languages a stage asks for."""

    def __init__(self, spec: RunSpec, tokenizer, rank: int = 0, world_size: int = 1, prompt: str | None = None):
        self.spec, self.tokenizer = spec, tokenizer
        self._prompt = prompt
        self.task: Task = get_task(spec.data.task)
        self.objective = objective_of(self.task)     # batches and loss of the task's kind
        self.rank, self.world_size = rank, world_size
        self._features: dict[str, list] = {}
        self._pools: dict[tuple[str, tuple[str, ...]], list] = {}
        self._lengths: dict[int, tuple[list, RowLengths]] = {}
        self.sources: dict[str, str] = {}

    @property
    def prompt(self) -> str:
        """What goes before each retrieval sentence: the model's prompt (given, else read from the source)."""
        if self._prompt is None:
            from raysparse.models.sources import source_retrieval_prompt

            self._prompt = source_retrieval_prompt(self.spec.model.source, self.spec.model.trust_remote_code)
        return self._prompt

    # --- rows ------------------------------------------------------------------------
    def _language_features(self, language: str, task: Task) -> list:
        key = language if task is self.task else f"{task.name}:{language}"
        if key in self._features:
            return self._features[key]
        spec = self.spec
        rows, self.sources[key] = kind_of(task).training_rows(
            task, language, self.tokenizer, seed=spec.seed, train_fraction=spec.data.train_fraction,
            max_examples=spec.data.max_train_examples, max_length=spec.data.max_length, stride=spec.data.doc_stride,
            data_dir=spec.data.dir)
        self._features[key] = rows
        return rows

    def pool(self, languages: list[str], fine_tuning: bool = False) -> list:
        """All training rows of ``languages``, in a fixed order; ``fine_tuning``: of ``data.train_task``
        when the spec names one (the task's own rows otherwise). The same list each time it is asked
        for (read it, do not change it): every stage then shares its lengths, measured once."""
        task = get_task(self.spec.data.train_task) if fine_tuning and self.spec.data.train_task else self.task
        key = (task.name, tuple(sorted(languages)))
        if key not in self._pools:
            self._pools[key] = [row for language in key[1] for row in self._language_features(language, task)]
        return self._pools[key]

    # --- batches ---------------------------------------------------------------------
    def batch(self, rows: list, step: int, batch_size: int, salt: int = 0):
        if not rows:
            raise RaysparseError(f"data: no training rows for {self.task.name}")
        chosen = [rows[i] for i in step_indices(step, batch_size, len(rows), self.spec.seed + salt, self.rank,
                                                self.world_size, self.lengths(rows))]
        return self.objective.batch(self, chosen)

    def lengths(self, rows: list) -> RowLengths | None:
        """The token lengths of ``rows`` (a pool), measured once, when ``data.group_by_length`` is on."""
        if not self.spec.data.group_by_length:
            return None
        known = self._lengths.get(id(rows))
        if known is None or known[0] is not rows:
            known = self._lengths[id(rows)] = (rows, RowLengths(self.objective.lengths(self, rows)))
        return known[1]

    def batches(self, rows: list, start: int, count: int, batch_size: int, salt: int = 0) -> list:
        return [self.batch(rows, step, batch_size, salt) for step in range(start, start + count)]

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The task's loss of ``model`` on ``batch`` (one forward)."""
        return self.loss_of(model(**to_device(batch, model_device(model))))

    def loss_of(self, outputs: dict) -> torch.Tensor:
        """The task's loss from a forward's outputs: the head's loss, or InfoNCE for retrieval."""
        return self.objective.loss(outputs)
