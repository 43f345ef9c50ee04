"""Distillation from the dense fine-tuned teacher during recovery.

Pure functions over model outputs (dicts, transformers ``ModelOutput`` s or bare tensors):

* soft targets: KL(teacher || student) of temperature-softened logits, scaled by T^2
  (Hinton et al.); QA start/end logits are distilled separately over positions;
  retrieval models without logits distil their in-batch similarity distribution
  (cosine similarities / ``similarity_temperature``, each row over the other rows);
* hidden states (optional): MSE between matched layers, the embedding output included, over
  the batch's real tokens (padding positions carry nothing the pooled output reads; counting
  them spends the student's capacity on copying the teacher's junk there).
  A shrunk student's layer ``p`` is the original layer ``structure_of(student).layers[p]``
  and is matched to that layer of the teacher (:func:`layer_map_for`).

``distillation_loss = alpha * soft + (1 - alpha) * task loss + hidden_weight * hidden``,
the task loss taken from ``student_out["loss"]`` (or given); without one the task term
is absent, so identical student and teacher give exactly zero.

Hidden states are recorded with forward hooks on the encoder (embeddings output and every
layer's output, after any gate hooks), so task models that do not return them work too.

:class:`Distillation` plugs this into the training loop as a callback: it reshapes each
pass's loss from the pass's batch and outputs, so recovery's objective stays the task loss.
The teacher is frozen and in eval mode, so its soft targets on a batch never change: they
can be computed once (:func:`target_outputs`) and cached for every trial that recovers on the
same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raysparse.errors import RaysparseError
from raysparse.structure import Encoder, Mask, structure_of
from raysparse.structure.tokens import token_mask
from raysparse.training.loop import Callback, Forward
from raysparse.training.teacher_cache import Outputs, TeacherCache


# --- running models -----------------------------------------------------------------------------------
def as_outputs(out: Any) -> Outputs:
    """A plain dict of a model's outputs (a bare tensor is taken as logits)."""
    if isinstance(out, torch.Tensor):
        return {"logits": out}
    if isinstance(out, Mapping):
        return {k: v for k, v in out.items() if v is not None}
    if hasattr(out, "to_tuple"):   # a ModelOutput that is not a Mapping
        return {k: getattr(out, k) for k in out.keys() if getattr(out, k) is not None}
    raise RaysparseError(f"distillation: cannot read model outputs of type {type(out).__name__}")


@contextmanager
def record_hidden_states(model: nn.Module):
    """Collect the encoder's hidden states during the forward passes inside the block.

    Yields a list that, after the block, holds one list per forward pass: the embedding
    output followed by each layer's output. Use :func:`stack_hidden_states` to combine.
    """
    enc = Encoder(model)
    passes: list[list[torch.Tensor]] = []

    def on_embeddings(module, args, output):
        passes.append([output[0] if isinstance(output, tuple) else output])

    def on_layer(module, args, output):
        if passes:
            passes[-1].append(output[0] if isinstance(output, tuple) else output)

    handles = [enc.embeddings.register_forward_hook(on_embeddings)]
    handles += [layer.register_forward_hook(on_layer) for layer in enc.layers]
    try:
        yield passes
    finally:
        for handle in handles:
            handle.remove()


def stack_hidden_states(passes: list[list[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """One tensor per hidden-state index: [batch, seq, hidden] for one pass, tokens flattened over several."""
    if not passes:
        return ()
    if len(passes) == 1:
        return tuple(passes[0])
    return tuple(torch.cat([p[i].reshape(-1, p[i].shape[-1]) for p in passes]) for i in range(len(passes[0])))


def default_forward(model: nn.Module, batch: Any) -> Outputs:
    """``model(**batch)`` for a dict batch; embeddings of both sides for a (source, target) pair batch."""
    device = next(model.parameters()).device
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(b, Mapping) for b in batch):
        from raysparse.training.retrieval import embed

        return {"embeddings": torch.cat([embed(model, _to(b, device)) for b in batch])}
    return as_outputs(model(**_to(batch, device)))


def _to(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def forward_outputs(model: nn.Module, batch: Any, hidden_states: bool = False,
                    forward: Callable[[nn.Module, Any], Any] | None = None) -> Outputs:
    """Run ``model`` on ``batch`` (with gradients as the caller has them); optionally record hidden states."""
    forward = forward or default_forward
    if not hidden_states:
        return as_outputs(forward(model, batch))
    with record_hidden_states(model) as passes:
        out = as_outputs(forward(model, batch))
    out["hidden_states"] = stack_hidden_states(passes)
    mask = token_mask(batch)
    if mask is not None and out["hidden_states"] and mask.numel() == out["hidden_states"][0].shape[:-1].numel():
        out["hidden_mask"] = mask.reshape(out["hidden_states"][0].shape[:-1]).to(out["hidden_states"][0].device)
    return out


def teacher_outputs(teacher: nn.Module, batch: Any, hidden_states: bool = True,
                    forward: Callable[[nn.Module, Any], Any] | None = None, dtype: str = "float32") -> Outputs:
    """The teacher's outputs under ``no_grad`` in eval mode (its mode is restored), as float32.

    ``dtype="bfloat16"`` runs it under autocast: about half the time where the hardware has
    bfloat16 units (recent Xeons' AMX, Ampere and later GPUs), for targets that differ in the
    third significant digit, which soft targets at temperature 2 do not notice; its hidden states
    are then rounded to bfloat16 (what :class:`TeacherCache` keeps of them)."""
    was_training = teacher.training
    teacher.eval()
    device = next(teacher.parameters()).device.type
    try:
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            out = forward_outputs(teacher, batch, hidden_states, forward)
    finally:
        teacher.train(was_training)
    if dtype == "bfloat16" and "hidden_states" in out:   # held at the precision they were computed in (as cached)
        out["hidden_states"] = tuple(h.to(torch.bfloat16) for h in out["hidden_states"])
    return {k: _as_float(v) for k, v in out.items()}


def _as_float(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    if isinstance(value, tuple):
        return tuple(_as_float(v) for v in value)
    return value


TARGETS = ("logits", "start_logits", "end_logits", "embeddings")


def target_outputs(teacher: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any] | None = None,
                   dtype: str = "float32") -> Outputs:
    """The teacher's outputs that soft targets read (no loss, no hidden states), on the CPU: what
    a cache of teacher targets stores per step."""
    out = teacher_outputs(teacher, batch, hidden_states=False, forward=forward, dtype=dtype)
    return {k: v.detach().cpu() for k, v in out.items() if k in TARGETS and isinstance(v, torch.Tensor)}


def layer_map_for(student: nn.Module, teacher: nn.Module | None = None, mask: Mask | None = None) -> dict[int, int]:
    """{student hidden-state index: teacher hidden-state index}; 0 is the embedding output on both.

    Student layer ``p`` (current position) is original layer ``structure_of(student).layers[p]``;
    the teacher (dense unless given) holds it at its own position. Layers ``mask`` drops
    (a masked, not shrunk, student) and layers the teacher lacks are left out.
    """
    student_layers = structure_of(student).layers
    teacher_layers = structure_of(teacher).layers if teacher is not None else list(range(structure_of(student).shape[0]))
    where = {layer: pos for pos, layer in enumerate(teacher_layers)}
    mapping = {0: 0}
    for pos, layer in enumerate(student_layers):
        if layer in where and (mask is None or bool(mask.kept_layers[layer])):
            mapping[pos + 1] = where[layer] + 1
    return mapping


# --- losses ---------------------------------------------------------------------------------------------
def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over rows (the last dim is the class)."""
    low = torch.finfo(student_logits.dtype).min
    s = (student_logits.float() / temperature).clamp_min(low).reshape(-1, student_logits.shape[-1])
    t = (teacher_logits.float() / temperature).clamp_min(low).reshape(-1, teacher_logits.shape[-1])
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean") * temperature ** 2


def similarity_logits(embeddings: torch.Tensor, similarity_temperature: float = 0.05) -> torch.Tensor:
    """In-batch cosine similarities / temperature, each row without its own entry: [n, n - 1]."""
    e = F.normalize(embeddings.float(), dim=-1)
    n = len(e)
    sims = e @ e.T / similarity_temperature
    return sims[~torch.eye(n, dtype=torch.bool, device=sims.device)].reshape(n, n - 1)


def hidden_state_loss(student_hidden, teacher_hidden, layer_map: Mapping[int, int] | None = None,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over matched layers of the MSE between hidden states, over the positions ``mask`` keeps
    (a bool tensor shaped like the states without their last dim; None: every position)."""
    if layer_map is None:
        if len(student_hidden) != len(teacher_hidden):
            raise RaysparseError(f"distillation: the student has {len(student_hidden)} hidden states and the teacher "
                                 f"{len(teacher_hidden)}; pass layer_map=layer_map_for(student)")
        layer_map = {i: i for i in range(len(student_hidden))}
    if not layer_map:
        raise RaysparseError("distillation: the layer map matches no layers")
    # weight the squared errors rather than gather the real tokens: no copies, a cheaper backward
    weight = None if mask is None else mask[..., None].float()

    def mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        error = (student.float() - teacher.float()).square()
        return error.mean() if weight is None else (error * weight).sum() / (weight.sum() * error.shape[-1])

    return torch.stack([mse(student_hidden[s], teacher_hidden[t]) for s, t in layer_map.items()]).mean()


def soft_loss(student_out: Outputs, teacher_out: Outputs, temperature: float,
              similarity_temperature: float = 0.05) -> torch.Tensor | None:
    """The soft-target term for whatever both outputs carry (QA start/end, logits, or embeddings)."""
    if "start_logits" in student_out and "start_logits" in teacher_out:
        return (soft_target_loss(student_out["start_logits"], teacher_out["start_logits"], temperature)
                + soft_target_loss(student_out["end_logits"], teacher_out["end_logits"], temperature)) / 2
    if "logits" in student_out and "logits" in teacher_out:
        return soft_target_loss(student_out["logits"], teacher_out["logits"], temperature)
    if "embeddings" in student_out and "embeddings" in teacher_out and len(student_out["embeddings"]) > 1:
        return soft_target_loss(similarity_logits(student_out["embeddings"], similarity_temperature),
                                similarity_logits(teacher_out["embeddings"], similarity_temperature), temperature)
    return None


def distillation_loss(student_out: Outputs, teacher_out: Outputs, temperature: float = 2.0, alpha: float = 0.5,
                      hidden_weight: float = 0.0, layer_map: Mapping[int, int] | None = None, *,
                      task_loss: torch.Tensor | None = None, similarity_temperature: float = 0.05,
                      embedding_weight: float = 0.0) -> torch.Tensor:
    """alpha * soft + (1 - alpha) * task + hidden_weight * hidden (+ embedding_weight * embedding MSE).

    ``task_loss`` defaults to ``student_out["loss"]`` (absent: no task term). Hidden states
    are needed only when ``hidden_weight > 0``; ``layer_map`` as from :func:`layer_map_for`.
    """
    if temperature <= 0:
        raise RaysparseError(f"distillation.temperature: expected a positive number, got {temperature!r}")
    if not 0 <= alpha <= 1:
        raise RaysparseError(f"distillation.alpha: expected a number in [0, 1], got {alpha!r}")
    student_out, teacher_out = as_outputs(student_out), as_outputs(teacher_out)
    task_loss = task_loss if task_loss is not None else student_out.get("loss")
    terms = []
    soft = soft_loss(student_out, teacher_out, temperature, similarity_temperature)
    if soft is not None and alpha > 0:
        terms.append(alpha * soft)
    if task_loss is not None and alpha < 1:
        terms.append((1 - alpha) * task_loss)
    if hidden_weight > 0:
        if "hidden_states" not in student_out or "hidden_states" not in teacher_out:
            raise RaysparseError("distillation: hidden-state matching needs hidden states from both models "
                                 "(forward_outputs(..., hidden_states=True))")
        terms.append(hidden_weight * hidden_state_loss(student_out["hidden_states"], teacher_out["hidden_states"],
                                                       layer_map, student_out.get("hidden_mask")))
    if embedding_weight > 0 and "embeddings" in student_out and "embeddings" in teacher_out:
        terms.append(embedding_weight * F.mse_loss(student_out["embeddings"].float(), teacher_out["embeddings"].float()))
    if not terms:
        raise RaysparseError("distillation: nothing to distil (no logits or embeddings in both outputs, no task "
                             "loss, hidden_weight 0)")
    return torch.stack([t.reshape(()) for t in terms]).sum()


class Distillation(Callback):
    """Distil the dense teacher during a training stage: each pass's loss becomes
    ``alpha * soft + (1 - alpha) * task (+ hidden_weight * hidden)``.

    ``config`` has ``temperature``, ``alpha``, ``hidden``, ``hidden_weight`` and optionally
    ``teacher_dtype`` (``raysparse.config.DistillationConfig``). The stage's passes return a
    :class:`~raysparse.training.loop.Forward` with their batch and outputs (with hidden states
    when ``config.hidden``; record them with :func:`forward_outputs`), and, with several masks,
    the key of ``layer_maps`` that matches the student's layers to the teacher's.
    ``targets`` (step -> :func:`target_outputs`) replaces running the teacher when given; otherwise
    the teacher's outputs per recurring row are kept in memory (``config.row_cache_mb``;
    :class:`TeacherCache`), and the teacher runs on the rows of a batch that are not kept.
    """

    def __init__(self, teacher: nn.Module, config, layer_maps: Mapping[str | None, Mapping[int, int]] | None = None,
                 targets: Mapping[int, Outputs] | None = None):
        self.teacher, self.config, self.layer_maps, self.targets = teacher, config, layer_maps or {}, targets
        self.dtype = getattr(config, "teacher_dtype", "float32")
        self.cache = TeacherCache(int(getattr(config, "row_cache_mb", 0)) << 20,
                                  torch.bfloat16 if self.dtype == "bfloat16" else torch.float32)

    def after_loss(self, step: int, forward: Forward) -> torch.Tensor:
        if forward.outputs is None:
            raise RaysparseError("distillation: the stage's passes return no outputs to distil into")
        hidden = bool(self.config.hidden)
        if self.targets is not None and not hidden:
            device = forward.loss.device
            teacher_out = {k: v.to(device) for k, v in self.targets[step].items()}
        else:
            teacher_out = self.cache.outputs(forward.batch,
                                             lambda batch: teacher_outputs(self.teacher, batch, hidden, dtype=self.dtype))
        return distillation_loss(forward.outputs, teacher_out, self.config.temperature, self.config.alpha,
                                 self.config.hidden_weight if hidden else 0.0, self.layer_maps.get(forward.key),
                                 task_loss=forward.loss)
