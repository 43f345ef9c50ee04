"""Where a pipeline runs: the few things that differ between Ray Train workers and one process.

A :class:`Session` says which rank this is, wraps the model for data parallelism, hands
back the checkpoint to resume from and takes reports (metrics plus, from rank 0, a
checkpoint folder). The pipeline's stages are written once against this interface:

* :class:`RayTrainSession` on TorchTrainer workers (DDP for several workers, Ray's
  checkpoints in the run storage, Ray's restarts);
* :class:`TuneSession` inside a Ray Tune trial's own process (one-worker search trials);
* :class:`LocalSession` in the calling process (``raysparse prune``, ``raysparse.prune()``,
  in-process runs): checkpoints, if a folder is given, are written there atomically and
  a rerun resumes from them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from torch import nn

WriteCheckpoint = Callable[[Path], None]


class Session:
    rank: int = 0
    world_size: int = 1

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @property
    def node_id(self) -> str | None:
        return None

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to run forward passes through (DDP on several workers)."""
        return model

    def restore(self) -> contextlib.AbstractContextManager[Path | None]:
        """A context yielding the folder of the checkpoint to resume from, or None."""
        return contextlib.nullcontext(None)

    def report(self, metrics: dict, write: WriteCheckpoint | None = None) -> None:
        """Report ``metrics``; with ``write``, rank 0 also saves a checkpoint written by ``write(folder)``."""

    def no_sync(self, model: nn.Module):
        """DDP's ``no_sync`` for gradient accumulation, or None with one worker."""
        return getattr(model, "no_sync", None) if self.world_size > 1 else None


class RayTrainSession(Session):
    """A Ray Train worker: ranks, DDP, checkpoints and reports through ``ray.train``."""

    def __init__(self):
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()

    @property
    def node_id(self) -> str | None:
        import ray

        return ray.get_runtime_context().get_node_id()

    def wrap(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, parallel_strategy="ddp" if self.world_size > 1 else None)

    @contextlib.contextmanager
    def restore(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with tempfile.TemporaryDirectory(prefix="raysparse-restore-") as folder:
            checkpoint.to_directory(folder)
            yield Path(folder)

    def report(self, metrics: dict, write: WriteCheckpoint | None = None) -> None:
        import ray.train

        if write is None or not self.is_chief:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="raysparse-ckpt-") as folder:
            write(Path(folder))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


class TuneSession(Session):
    """A one-worker trial executed inside the Ray Tune trial's own process (no Ray Train controller or
    worker processes): checkpoints and reports through ``ray.tune``, so Tune's restore after a killed
    trial, node or driver resumes the pipeline from its last checkpoint."""

    def __init__(self, use_gpu: bool = False):
        import torch

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    @property
    def node_id(self) -> str | None:
        import ray

        return ray.get_runtime_context().get_node_id()

    def wrap(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    @contextlib.contextmanager
    def restore(self) -> Iterator[Path | None]:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def report(self, metrics: dict, write: WriteCheckpoint | None = None) -> None:
        from ray import tune

        if write is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="raysparse-ckpt-") as folder:
            write(Path(folder))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


class LocalSession(Session):
    """The calling process; checkpoints go to ``folder`` (none when it is None)."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.metrics: dict = {}

    @contextlib.contextmanager
    def restore(self) -> Iterator[Path | None]:
        latest = self.folder / "checkpoint" if self.folder is not None else None
        yield latest if latest is not None and (latest / "state.json").is_file() else None

    def report(self, metrics: dict, write: WriteCheckpoint | None = None) -> None:
        self.metrics = dict(metrics)
        if write is None or self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=self.folder))
        write(staging)
        latest, old = self.folder / "checkpoint", self.folder / ".checkpoint-old"
        shutil.rmtree(old, ignore_errors=True)
        if latest.exists():
            os.replace(latest, old)
        os.replace(staging, latest)   # a kill between the two renames leaves the old one beside it
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["LocalSession", "RayTrainSession", "Session", "TuneSession"]
