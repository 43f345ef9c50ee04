"""Which positions of a batch are real tokens: what losses and statistics over hidden states read.

A padded batch of short sentences can be half padding; the pooled embedding and a classifier
never read those positions, so hidden-state distillation and activation statistics leave them out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def token_mask(batch: Any) -> torch.Tensor | None:
    """A batch's ``attention_mask`` as bool ([batch, seq]); a (source, target) pair batch: both
    sides' masks flattened and joined in the order the sides are run; None when there is none."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        return mask.bool() if isinstance(mask, torch.Tensor) else None
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(b, Mapping) for b in batch):
        masks = [token_mask(b) for b in batch]
        return None if any(m is None for m in masks) else torch.cat([m.reshape(-1) for m in masks])
    return None
