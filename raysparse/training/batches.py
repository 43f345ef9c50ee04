"""From a task's rows to padded torch batches, a task model and its loss.

The building blocks one training worker needs, with no Ray in them: a Ray Train loop
calls ``task_loader(task, tokenizer, rows, rank=r, world_size=n)`` (or passes its own ``sampler``) and
``task_loss`` on each batch, exactly as the single-process ``finetune`` does.

- ``task_features``: tokenised inputs of a task kind (``raysparse.data.features``).
- ``feature_loader``: a seeded ``DataLoader`` over them that pads per batch;
  ``task_loader`` does both from rows.
- ``build_task_model``: the encoder plus the head of the task's kind.
- ``task_loss``: the mean loss of a ``TaskModel`` batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from raysparse.data.features import IGNORE_INDEX
from raysparse.data.kinds import KINDS, kind_of
from raysparse.data.tasks import Task, get_task
from raysparse.errors import RaysparseError
from raysparse.models.heads import TaskModel

# Columns a TaskModel reads; anything else (QA example ids and offsets) stays in the features.
MODEL_COLUMNS = ("input_ids", "attention_mask", "labels", "start_positions", "end_positions")
# Default sequence length per task kind (QA windows are longer, with a stride between them).
MAX_LENGTH = {name: kind.max_length for name, kind in KINDS.items()}


def default_max_length(task: str | Task) -> int:
    return kind_of(task).max_length


def task_features(
    task: str | Task,
    tokenizer,
    rows: Dataset,
    *,
    train: bool = True,
    max_length: int | None = None,
    stride: int = 128,
) -> Dataset:
    """Unpadded inputs of ``rows`` for ``task``: training features (labels, answer positions) or,
    with ``train=False``, evaluation features (QA: windows with ``example_id``/``offset_mapping``)."""
    task, kind = get_task(task), kind_of(task)
    if not kind.trainable:
        raise RaysparseError(
            f"data.task: '{task.name}' is a retrieval task (scored from embeddings; it has no labelled batches)"
        )
    max_length = max_length or default_max_length(task)
    if kind.windows and stride >= max_length:
        raise RaysparseError(f"data.stride: {stride} (expected fewer tokens than max_length={max_length})")
    build = kind.train_features if train else kind.eval_features
    with quiet_datasets():
        return build(rows, tokenizer, max_length, stride)


@contextlib.contextmanager
def quiet_datasets():
    """No ``Map: ...`` progress bars from ``datasets`` inside the block (restored after)."""
    from datasets.utils import logging as datasets_logging

    enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            datasets_logging.enable_progress_bar()


@dataclass(frozen=True)
class PaddingCollator:
    """Pads a list of feature rows to the longest in the batch; returns LongTensors.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0, token
    ``labels`` with ``IGNORE_INDEX``; scalar labels and answer positions are stacked.
    Columns outside ``MODEL_COLUMNS`` are dropped. Picklable, for DataLoader workers.
    """

    pad_token_id: int

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not rows:
            raise RaysparseError("batches: empty batch (expected at least one row)")
        batch: dict[str, torch.Tensor] = {}
        for column in MODEL_COLUMNS:
            if column not in rows[0]:
                continue
            values = [row[column] for row in rows]
            if isinstance(values[0], (list, tuple)):
                pad = {"input_ids": self.pad_token_id, "attention_mask": 0}.get(column, IGNORE_INDEX)
                width = max(len(v) for v in values)
                rows_padded = [list(v) + [pad] * (width - len(v)) for v in values]
                batch[column] = torch.tensor(rows_padded, dtype=torch.long)
            else:
                batch[column] = torch.tensor(values, dtype=torch.long)
        return batch


def feature_loader(
    features: Dataset,
    tokenizer,
    batch_size: int = 16,
    *,
    shuffle: bool = True,
    seed: int = 0,
    sampler: Sampler | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    drop_last: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """A ``DataLoader`` of padded batches over ``features`` (from :func:`task_features`).

    Order is deterministic given ``seed``. For data-parallel training give ``rank`` and
    ``world_size`` (a ``DistributedSampler`` seeded with ``seed``; call
    ``loader.sampler.set_epoch(epoch)`` each epoch, as ``finetune`` does) or any ``sampler``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise RaysparseError(f"batches.batch_size: {batch_size!r} (expected a positive integer)")
    if len(features) == 0:
        raise RaysparseError("batches: no features to load (expected at least one row)")
    if tokenizer.pad_token_id is None:
        raise RaysparseError(f"tokenizer: {type(tokenizer).__name__} has no pad token (expected one to pad batches)")
    if (rank is None) != (world_size is None):
        raise RaysparseError("batches: give both rank and world_size, or neither")
    if sampler is not None and rank is not None:
        raise RaysparseError("batches: give either a sampler or rank/world_size, not both")
    columns = [c for c in MODEL_COLUMNS if c in features.column_names]
    dataset = features.select_columns(columns) if len(columns) < len(features.column_names) else features
    if rank is not None:
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise RaysparseError(
                f"batches: rank {rank!r} of world_size {world_size!r} (expected 0 <= rank < world_size)"
            )
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                     drop_last=drop_last)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        collate_fn=PaddingCollator(tokenizer.pad_token_id),
        drop_last=drop_last,
        num_workers=num_workers,
        generator=generator,
    )


def task_loader(
    task: str | Task,
    tokenizer,
    rows: Dataset,
    batch_size: int = 16,
    *,
    train: bool = True,
    max_length: int | None = None,
    stride: int = 128,
    shuffle: bool | None = None,
    seed: int = 0,
    sampler: Sampler | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A loader of ``rows`` for ``task``: ``task_features`` then ``feature_loader``; shuffles
    when ``train`` unless told otherwise."""
    features = task_features(task, tokenizer, rows, train=train, max_length=max_length, stride=stride)
    return feature_loader(features, tokenizer, batch_size, shuffle=train if shuffle is None else shuffle, seed=seed,
                       sampler=sampler, rank=rank, world_size=world_size, drop_last=drop_last)


def num_labels_of(task: str | Task) -> int:
    """Output classes of the task's head: labels (classification), tags (tagging), else 0."""
    return kind_of(task).num_labels(task)


def build_task_model(encoder: nn.Module, task: str | Task, seed: int | None = 0) -> TaskModel:
    """``encoder`` with a freshly initialised head for ``task`` (retrieval: no head).

    A ``TaskModel`` that already fits the task is returned as it is; one of another kind
    gives its encoder to the new head. ``seed`` makes the head's initial weights
    reproducible without touching the global random state (None: use it).
    """
    task = get_task(task)
    num_labels = num_labels_of(task)
    if isinstance(encoder, TaskModel):
        if encoder.kind == task.kind and encoder.num_labels == num_labels:
            return encoder
        encoder = encoder.encoder
    if seed is None:
        return TaskModel(encoder, task.kind, num_labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TaskModel(encoder, task.kind, num_labels)
    device = next(encoder.parameters()).device
    return model.to(device)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def task_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The mean loss of ``model`` (a ``TaskModel``, possibly wrapped by DDP) on ``batch``.

    The batch is moved to the model's device first.
    """
    output = model(**to_device(batch, model_device(model)))
    loss = output.get("loss") if isinstance(output, Mapping) else None
    if loss is None:
        raise RaysparseError(
            "batches: the model returned no loss (expected a TaskModel of a trainable kind and a batch with labels "
            "or answer positions)"
        )
    return loss


__all__ = [
    "MAX_LENGTH", "MODEL_COLUMNS", "PaddingCollator", "build_task_model", "default_max_length", "model_device",
    "feature_loader", "num_labels_of", "task_features", "task_loader", "task_loss", "to_device",
]
