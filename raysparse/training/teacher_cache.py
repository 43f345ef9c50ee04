"""The teacher's outputs per recurring row, kept in memory: a row met again costs no teacher pass.

The teacher is frozen, so what it computes for a row never changes, and recovery meets rows again:
XNLI is 15-way parallel, so the English side of the translation pairs recurs in every language
(the committed spec's 400 steps meet each of its English sentences about six times), and a small
training set recurs every epoch. A row met for the second time has its teacher outputs kept (up to
a memory limit; a row met once is only remembered by its key, so rows that never recur cost no
memory); a batch runs the teacher on its rows that are not kept, alone, and is put together from
what was kept and what the teacher just gave.

A row is keyed by its real tokens, so the same sentence in another batch, padded to another
length, is the same row. Only what distillation reads of a row is kept: its row-level targets
(a sentence embedding, a sequence's logits) and its hidden states at real tokens (the hidden-state
loss leaves padding out; assembled batches hold zeros there). Batches whose targets are per token
(QA positions, token labels), which would read the teacher's padding too, and (source, target)
tuple batches always run the teacher on the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

Outputs = dict[str, Any]
ROW_TARGETS = ("logits", "embeddings")   # one vector per row: what soft targets read of a row


class TeacherCache:
    """The teacher's outputs per recurring row, up to ``limit_bytes`` (0: off). ``passes`` counts the
    teacher's passes, ``rows_run`` the rows it ran on, ``rows_read`` the rows asked for."""

    def __init__(self, limit_bytes: int, dtype: torch.dtype = torch.float32):
        self.limit, self.used, self.dtype = limit_bytes, 0, dtype
        self.rows: dict[bytes, dict[str, torch.Tensor]] = {}
        self.seen: set[bytes] = set()
        self.passes = self.rows_run = self.rows_read = 0

    def outputs(self, batch: Any, compute: Callable[[Any], Outputs]) -> Outputs:
        """The teacher's outputs on ``batch``; ``compute(b)`` runs the teacher on a batch ``b``."""
        keys = row_keys(batch) if self.limit > 0 else None
        self.rows_read += _rows(batch)
        if keys is None:
            return self._run(compute, batch)
        mask = batch["attention_mask"].bool()
        missing = [i for i, key in enumerate(keys) if key not in self.rows]
        if not missing:
            return _assemble([self.rows[key] for key in keys], mask)
        whole = len(missing) == len(keys)
        part = batch if whole else _rows_of(batch, missing)
        out = self._run(compute, part)
        # row j of ``part`` is row missing[j]: split the rows met before (they are kept), and every row of a part
        wanted, here = set(), set()
        for j, i in enumerate(missing):
            if not whole or keys[i] in self.seen or keys[i] in here:
                wanted.add(j)
            here.add(keys[i])
        fresh = _split(out, part["attention_mask"].bool(), self.dtype, wanted)
        if fresh is None:   # per-token targets: this stage runs the teacher on whole batches
            self.limit = 0
            return out if whole else self._run(compute, batch)
        for j, i in enumerate(missing):
            key = keys[i]
            if key in self.seen and j in fresh and self.used < self.limit:
                self.rows[key] = fresh[j]
                self.used += sum(v.numel() * v.element_size() for v in fresh[j].values())
            self.seen.add(key)
        if whole:
            return out
        position = {i: j for j, i in enumerate(missing)}
        return _assemble([fresh[position[i]] if i in position else self.rows[key] for i, key in enumerate(keys)], mask)

    def _run(self, compute: Callable[[Any], Outputs], batch: Any) -> Outputs:
        self.passes += 1
        self.rows_run += _rows(batch)
        return compute(batch)


def _rows(batch: Any) -> int:
    """How many rows a dict batch has (0 for other batches: they are not counted)."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return len(mask) if isinstance(mask, torch.Tensor) else 0


def row_keys(batch: Any) -> list[bytes] | None:
    """One key per row of a dict batch: the row's integer inputs at its real tokens; None for other batches."""
    if not isinstance(batch, Mapping) or not isinstance(batch.get("attention_mask"), torch.Tensor):
        return None
    mask = batch["attention_mask"].bool()
    if mask.dim() != 2:
        return None
    inputs = [v for _, v in sorted(batch.items()) if isinstance(v, torch.Tensor) and v.shape == mask.shape
              and not v.is_floating_point()]
    return [b"".join(v[i][mask[i]].cpu().numpy().tobytes() for v in inputs) for i in range(len(mask))]


def _rows_of(batch: Mapping, rows: list[int]) -> dict:
    """The token inputs of ``rows`` alone, cut to their longest real length (what the teacher reads)."""
    mask = batch["attention_mask"]
    index = torch.tensor(rows, device=mask.device)
    width = int(mask[index].bool().any(0).nonzero().max()) + 1
    return {k: v[index][:, :width] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.shape == mask.shape}


def _split(out: Outputs, mask: torch.Tensor, dtype: torch.dtype,
           which: set[int]) -> dict[int, dict[str, torch.Tensor]] | None:
    """What distillation reads of rows ``which`` of the teacher's ``out``; None when its targets are per token."""
    rows = len(mask)
    targets = {k: out[k] for k in ROW_TARGETS if k in out}
    if any(k in out for k in ("start_logits", "end_logits")) or any(
            v.dim() != 2 or len(v) != rows for v in targets.values()):
        return None
    hidden = out.get("hidden_states")
    stacked = torch.stack(hidden) if hidden else None   # [states, rows, seq, width]
    if stacked is not None and stacked.shape[1:3] != mask.shape:
        return None
    mask = mask.to(stacked.device) if stacked is not None else mask
    split = {}
    for i in sorted(which):
        row = {k: v[i].detach().clone() for k, v in targets.items()}
        if stacked is not None:
            row["hidden_states"] = stacked[:, i, mask[i]].to(dtype)   # [states, real tokens, width]
        split[i] = row
    return split


def _assemble(found: list[dict[str, torch.Tensor]], mask: torch.Tensor) -> Outputs:
    """A batch's outputs from its rows' outputs, shaped as the teacher gives them (zeros at padding)."""
    out: Outputs = {k: torch.stack([row[k] for row in found]).float() for k in found[0] if k != "hidden_states"}
    if "hidden_states" in found[0]:
        first = found[0]["hidden_states"]
        mask = mask.to(first.device)
        states = torch.zeros(first.shape[0], *mask.shape, first.shape[-1], device=first.device)
        states[:, mask] = torch.cat([row["hidden_states"] for row in found], dim=1).float()
        out["hidden_states"] = tuple(states.unbind(0))
        out["hidden_mask"] = mask
    return out


__all__ = ["TeacherCache", "row_keys"]
