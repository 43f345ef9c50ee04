"""Fine-tune once, prune many: stage outputs that no pruning choice changes, stored once per key.

Four stages are cached: the dense fine-tuned model; the importance scores of that model for an
algorithm, its options and the scoring batches (trials that differ in sparsity or schedule score
alike); the distillation teacher's outputs on the recovery batches (every trial of a search with
the same seed and data recovers on the same batches from the same teacher, so only the first pays
for the teacher's forward passes); and, with ``data.evaluate_dense``, the dense model's scores on
the evaluation rows (the reference of every trial's share of dense).
The dense fine-tuned model depends on the model source (and its weights), the task, the data
selection, the fine-tuning settings and the seed, never on the algorithm, sparsity, setting or
recovery. :class:`StageCache` keeps such outputs under ``<storage>/cache/<stage>/<key>/``,
where ``key`` hashes everything that determines them plus :data:`STAGE_VERSION` (bump it when
a stage's code changes what it computes). A run whose key exists loads the entry instead of
recomputing it.

Entries are written to a temporary folder and renamed into place, with the SHA-256 of their
weights in ``entry.json``: a partial or corrupt entry fails the check and is recomputed, never
used. When several runs need the same missing key at once, the first to create
``<key>.lock`` (``mkdir`` is atomic, also on a filesystem the nodes of a cluster share)
computes it and the others wait for the entry; the owner touches the lock while it works, and
a lock nobody touched for ``stale_after`` seconds (a killed owner) is broken. The cache needs a
folder every node sees (a local path, or NFS on a cluster); with object-store storage
(``s3://``) it is off.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from raysparse.paths import file_digest

STAGE_VERSION = {"finetune": 2, "teacher-targets": 1, "scores": 1, "dense-eval": 1}
ENTRY = "entry.json"


def entry_digest(folder: Path) -> str:
    """SHA-256 over every file of an entry but its record (names and contents)."""
    hasher = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ENTRY)
    if not files:
        raise OSError(f"stage cache: {folder} holds no files")
    for p in files:
        hasher.update(str(p.relative_to(folder)).encode())
        file_digest(p, hasher=hasher)
    return hasher.hexdigest()


def tensors_digest(value: Any) -> str:
    """SHA-256 of tensors and plain values nested in dicts, lists and tuples (a model's state dict, a
    list of batches): a key for outputs computed from them."""
    import torch

    hasher = hashlib.sha256()

    def visit(item: Any) -> None:
        if isinstance(item, torch.Tensor):
            tensor = item.detach().cpu().contiguous()
            hasher.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(item, Mapping):
            for name in sorted(item, key=str):
                hasher.update(str(name).encode())
                visit(item[name])
        elif isinstance(item, (list, tuple)):
            hasher.update(f"[{len(item)}".encode())
            for element in item:
                visit(element)
        else:
            hasher.update(repr(item).encode())

    visit(value)
    return hasher.hexdigest()


def weights_digest(location: str | Path) -> str:
    """SHA-256 over a model folder's weight files (memoised by path, size and mtime in the cache dir)."""
    from raysparse.paths import cache_dir

    files = sorted(p for p in Path(location).iterdir()
                   if p.suffix in (".safetensors", ".bin") and p.is_file())
    stamp = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    memo = cache_dir() / "weight-digests.json"
    known = json.loads(memo.read_text()) if memo.is_file() else {}
    token = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()
    if token not in known:
        hasher = hashlib.sha256()
        for p in files:
            hasher.update(p.name.encode())
            hasher.update(file_digest(p).encode())
        known[token] = hasher.hexdigest()
        memo.write_text(json.dumps(known))
    return known[token]


def stage_key(stage: str, determinants: Mapping[str, Any]) -> str:
    payload = {"stage": stage, "version": STAGE_VERSION[stage], **determinants}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


class StageCache:
    def __init__(self, root: str | Path, owner: str | None = None, stale_after: float = 600.0, poll: float = 2.0):
        self.root = Path(root)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.stale_after, self.poll = stale_after, poll

    def folder(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def _lock(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.lock"

    # --- reading -------------------------------------------------------------------------
    def get(self, stage: str, key: str) -> dict | None:
        """The entry's record (``entry.json``) if a complete, intact entry exists; a broken one is removed."""
        folder = self.folder(stage, key)
        record_path = folder / ENTRY
        if not record_path.is_file():
            return None
        try:
            record = json.loads(record_path.read_text())
            intact = record.get("key") == key and entry_digest(folder) == record.get("sha256")
        except (OSError, ValueError):
            intact = False
        if not intact:
            shutil.rmtree(folder, ignore_errors=True)
            return None
        record["folder"] = str(folder)
        return record

    # --- writing -------------------------------------------------------------------------
    def put(self, stage: str, key: str, write: Callable[[Path], None], record: Mapping[str, Any]) -> dict:
        """Write an entry with ``write(folder)`` (at least one file), atomically."""
        (self.root / stage).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.root / stage))
        write(staging)
        full = {**record, "key": key, "stage": stage, "sha256": entry_digest(staging),
                "created": time.time(), "owner": self.owner}
        (staging / ENTRY).write_text(json.dumps(full, indent=1))
        target = self.folder(stage, key)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        return {**full, "folder": str(target)}

    # --- one computes, the others wait ---------------------------------------------------------
    def acquire(self, stage: str, key: str, timeout: float = 7200.0) -> dict | None:
        """Either the entry (someone computed it, maybe while we waited), or None with the lock held:
        then compute, :meth:`put`, and :meth:`release`."""
        lock = self._lock(stage, key)
        lock.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.time() + timeout
        while True:
            found = self.get(stage, key)
            if found is not None:
                return found
            try:
                lock.mkdir()
                (lock / "owner").write_text(self.owner)
                return None
            except FileExistsError:
                if self._owned_by_me(lock) or self._stale(lock):
                    shutil.rmtree(lock, ignore_errors=True)
                    continue
            if time.time() > deadline:
                raise TimeoutError(f"stage cache: waited {timeout:.0f}s for {lock}")
            time.sleep(self.poll)

    def touch(self, stage: str, key: str) -> None:
        """The owner is alive: keep waiters from breaking the lock."""
        try:
            os.utime(self._lock(stage, key))
        except OSError:
            pass

    def release(self, stage: str, key: str) -> None:
        shutil.rmtree(self._lock(stage, key), ignore_errors=True)

    def _owned_by_me(self, lock: Path) -> bool:
        try:
            return (lock / "owner").read_text() == self.owner
        except OSError:
            return False

    def _stale(self, lock: Path) -> bool:
        try:
            return time.time() - lock.stat().st_mtime > self.stale_after
        except OSError:
            return True


__all__ = ["STAGE_VERSION", "StageCache", "stage_key", "tensors_digest", "weights_digest"]
