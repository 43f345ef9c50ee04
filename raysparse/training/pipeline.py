"""Which pipeline executes a spec, and the entry point Ray Train calls on every worker.

Both executors build the same pipeline: :func:`raysparse.runner.run_in_process` with a
:class:`~raysparse.training.session.LocalSession`, TorchTrainer workers through
:func:`train_loop_per_worker` with a :class:`~raysparse.training.session.RayTrainSession`.
"""

from __future__ import annotations

import torch

from raysparse.config import RunSpec
from raysparse.training.dynamic import DynamicRun
from raysparse.training.session import RayTrainSession, Session
from raysparse.training.worker import Run


def build_pipeline(spec: RunSpec, languages: dict, session: Session, tracking_uri: str | None = None,
                   run_id: str | None = None, storage: str | None = None) -> Run:
    """The pipeline of ``spec`` in ``session`` (Dynamic Sparsification's for the ``dynamic`` schedule);
    ``storage``: the run storage folder, where the stage cache lives."""
    config = {"spec": spec.model_dump(), "languages": languages, "tracking_uri": tracking_uri, "run_id": run_id,
              "storage": storage}
    return pipeline_from_config(config, session)


def pipeline_from_config(config: dict, session: Session) -> Run:
    dynamic = RunSpec.model_validate(config["spec"]).pruning.schedule == "dynamic"
    return (DynamicRun if dynamic else Run)(config, session)


def train_loop_per_worker(config: dict) -> None:
    """Entry point Ray Train calls on every worker."""
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    pipeline_from_config(config, RayTrainSession()).execute()


__all__ = ["build_pipeline", "pipeline_from_config", "train_loop_per_worker"]
