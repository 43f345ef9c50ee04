"""Seeded train/eval splits of a labelled file, by groups of rows that must stay together.

A group goes to the train part when ``blake2b("<seed>:<group key>")``, read as a number
in [0, 1), is below ``train_fraction``. The decision depends only on the seed and the
key, never on row order or on which other rows exist, so:

- the same seed gives the same split on every machine and every run;
- rows sharing a key (an XNLI premise with its three hypotheses, the questions on one
  QA paragraph) never straddle train and eval;
- in parallel tasks every language keys row i by the pivot language's row i, so a
  translated copy of a training example never lands in any language's eval part, even
  when a language holds only a subset of the pivot's questions (MLQA).

The train share is ``train_fraction`` in expectation, not exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from raysparse.errors import RaysparseError


@dataclass(frozen=True)
class RowSplit:
    """Row indices of one file's train and eval parts, and how they were drawn."""

    train_rows: tuple[int, ...]
    eval_rows: tuple[int, ...]
    seed: int
    train_fraction: float
    grouped_by: str

    def describe(self) -> str:
        return f"seed={self.seed}, train_fraction={self.train_fraction}, grouped by {self.grouped_by}"


def check_train_fraction(train_fraction: float) -> float:
    if not isinstance(train_fraction, (int, float)) or not 0.0 < float(train_fraction) < 1.0:
        raise RaysparseError(f"data.train_fraction: {train_fraction!r} (expected a number strictly between 0 and 1)")
    return float(train_fraction)


def check_seed(seed: int) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise RaysparseError(f"data.seed: {seed!r} (expected an integer)")
    return seed


def group_position(seed: int, key: str) -> float:
    """Where ``key`` falls in [0, 1) for ``seed``: a stable hash, the same in every process."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_rows(group_keys: Sequence[str], train_fraction: float, seed: int, grouped_by: str) -> RowSplit:
    """Split rows by their group keys; both parts must come out non-empty."""
    train_fraction = check_train_fraction(train_fraction)
    check_seed(seed)
    decisions: dict[str, bool] = {}
    train_rows: list[int] = []
    eval_rows: list[int] = []
    for row, key in enumerate(group_keys):
        goes_to_train = decisions.get(key)
        if goes_to_train is None:
            goes_to_train = decisions[key] = group_position(seed, key) < train_fraction
        (train_rows if goes_to_train else eval_rows).append(row)
    if not train_rows or not eval_rows:
        empty = "train" if not train_rows else "eval"
        raise RaysparseError(
            f"data.train_fraction: splitting {len(group_keys)} rows ({len(decisions)} groups) at {train_fraction} "
            f"with seed {seed} left the {empty} part empty (expected a fraction that leaves rows on both sides)"
        )
    return RowSplit(tuple(train_rows), tuple(eval_rows), seed, train_fraction, grouped_by)
