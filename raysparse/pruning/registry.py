"""Pruning algorithms found by name. Adding one = one small class with @register."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from raysparse.errors import RaysparseError
from raysparse.pruning.scores import UnitScores
from raysparse.structure import Mask

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class Options(BaseModel):
    """An algorithm's typed options (``pruning.options`` in a spec), validated before any work.

    A field named ``seed`` or ``target_sparsity`` that the spec leaves unset takes the run's
    seed and ``pruning.sparsity``.
    """

    model_config = ConfigDict(extra="forbid")


class Importance:
    """Turns a model (and, for data-driven methods, batches and a loss) into unit scores.

    ``mask`` is the current mask (original coordinates) for iterative schedules;
    units it removed must score ``-inf`` so selection never brings them back.
    Methods that learn during training (movement, L0) also implement the callback
    methods of :class:`TrainingCallback` in ``raysparse.pruning.callbacks``.
    """

    name: ClassVar[str]
    Options: ClassVar[type[Options]] = Options    # the constructor's keyword arguments, typed
    needs_data: ClassVar[bool] = False
    learns_during_training: ClassVar[bool] = False   # True: the training loop drives the callbacks below

    def score(self, model: nn.Module, batches: Iterable | None = None, loss_fn: LossFn | None = None,
              mask: Mask | None = None) -> UnitScores:
        raise NotImplementedError

    # --- callbacks for methods that learn during fine-tuning (movement, L0) ---------------
    # The loop calls: attach(model) once before training; per step, after the task loss,
    # loss = task_loss + regularization(step, total_steps); backward; after_backward(model, step);
    # optimizer step (extra_parameters() are optimised too); detach(model) at the end, then
    # score(model, ...) and, for methods that decide the mask themselves, final_mask(model, sparsity).

    def attach(self, model: nn.Module) -> None:
        """Install gates/hooks on ``model`` before training."""

    def extra_parameters(self) -> list[dict]:
        """Optimizer parameter groups the method learns (e.g. log-alpha, Lagrange multipliers)."""
        return []

    def regularization(self, step: int, total_steps: int) -> torch.Tensor | None:
        """Term added to the task loss at ``step`` (None = nothing)."""
        return None

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Read gradients (e.g. accumulate movement) after ``loss.backward()``."""

    def detach(self, model: nn.Module) -> None:
        """Remove what ``attach`` installed."""

    def final_mask(self, model: nn.Module, sparsity: float) -> Mask | None:
        """A mask the method decided itself (L0: deterministic gates); None = select from scores."""
        return None

    def metrics(self) -> dict[str, float]:
        """Numbers worth logging during training (expected sparsity, lambdas, ...)."""
        return {}


ALGORITHMS: dict[str, type[Importance]] = {}


def register(cls: type[Importance]) -> type[Importance]:
    ALGORITHMS[cls.name] = cls
    return cls


def get_algorithm(name: str, **options) -> Importance:
    """The algorithm ``name`` built from ``options`` (checked against its ``Options``)."""
    from pydantic import ValidationError

    if name not in ALGORITHMS:
        raise RaysparseError(f"pruning.algorithm: unknown algorithm '{name}' (expected one of: {', '.join(sorted(ALGORITHMS))})")
    cls = ALGORITHMS[name]
    try:
        typed = cls.Options.model_validate(options)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RaysparseError(f"pruning.options.{where}: {first['msg'].removeprefix('Value error, ')} "
                             f"({name} takes: {', '.join(cls.Options.model_fields) or 'no options'})") from None
    return cls(**typed.model_dump(exclude_unset=True))


def algorithm_for(name: str, options: dict, seed: int, sparsity: float) -> Importance:
    """The algorithm of a run: ``options`` (None values: the default) plus the run's seed and target
    sparsity where the algorithm's ``Options`` declare them."""
    fields = ALGORITHMS[name].Options.model_fields if name in ALGORITHMS else {}
    given = {k: v for k, v in options.items() if v is not None}
    run = {"seed": seed, "target_sparsity": sparsity}
    return get_algorithm(name, **{**{k: v for k, v in run.items() if k in fields}, **given})


def exclude_removed(scores: UnitScores, mask: Mask | None) -> UnitScores:
    """Give units the mask already removed a score of -inf."""
    if mask is None:
        return scores
    heads = scores.heads.masked_fill(~mask.effective_heads(), float("-inf"))
    neurons = scores.neurons.masked_fill(~mask.effective_neurons(), float("-inf"))
    layers = None if scores.layers is None else scores.layers.masked_fill(~mask.kept_layers, float("-inf"))
    return UnitScores(heads, neurons, layers)
