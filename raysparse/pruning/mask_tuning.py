"""Mask tuning (Kwon et al. 2022): rescale the units a pruned model keeps, by least squares, no training.

Removing heads and FFN neurons takes their share out of every layer's output; the units that stay
can make up for much of it when each is scaled. One scalar per kept head (on its columns of the
attention output projection) and per kept neuron (its column of the FFN output projection) is a
linear least-squares problem per sub-block, solved on a few hundred unlabelled tokens:

    min_s  || sum_u s_u * contribution_u(pruned inputs) + bias + pruned residual
              - (dense sub-block output + dense residual) ||^2 + damping * mean(diag G) * ||s - 1||^2

Layer by layer, in order, as Kwon et al. do: the pruned model's inputs come from its own forward
pass through the layers already tuned (so an error left upstream is corrected downstream, not
compounded), the target from the dense model's own forward. The target is the dense pre-LayerNorm
sum (sub-block output plus residual), so a kept unit also absorbs what the residual stream lost
upstream. The attention block is solved first; the FFN block of the same layer then sees the
rescaled attention. The scales are folded into the output projections' weight columns, so the
model keeps its shape and its forward pass, and can be shrunk, saved and trained as before.

Where Kwon et al. solve the normal equations with LSMR (damping 1, absolute) and stop at a scale
outside [-10, 10], this solves them directly with a ridge toward scale 1 relative to the problem's
scale (independent of how many tokens calibrate), so the calibration error never grows; a sub-block
whose solution is not finite or leaves [-max_scale, max_scale] keeps scale 1 and the walk goes on.

The layers follow the post-LayerNorm layout of every family the adapters know: the attention block
adds the layer's input, the FFN block adds its own input (the input of the FFN input projection).
Layers the pruned model dropped are stepped over on the dense side. Nothing here reads data: the
caller passes batches of encoder inputs (``input_ids``, ``attention_mask``, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from raysparse.structure import Encoder, structure_of

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
BLOCKS = ("attention", "ffn")
Reduce = Callable[[torch.Tensor], torch.Tensor]


class _Stop(Exception):
    """Ends a forward pass once a hook has what it came for."""


def encoder_inputs(batch: Mapping) -> dict:
    """What the base encoder takes from a task batch (labels and other targets left out)."""
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


class _Side:
    """One model's walk through its layers on every calibration batch: each batch's hidden states
    entering the current layer, and the rest of the call its encoder makes to every layer."""

    def __init__(self, model: nn.Module, batches: list[dict]):
        self.enc = Encoder(model)
        self.original = structure_of(model).layers   # original index of each current layer
        device = next(model.parameters()).device
        self.hidden, self.calls, self.tokens = [], [], []
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            args, kwargs = _first_layer_call(self.enc, batch)
            self.hidden.append(args[0])
            self.calls.append((args[1:], kwargs))
            self.tokens.append(_valid_tokens(batch, args[0]))

    def run(self, position: int, taps: dict[str, tuple[nn.Module, str]], stop: str | None = None,
            advance: bool = False) -> list[dict[str, torch.Tensor]]:
        """Run layer ``position`` on every batch, recording each tap's input (``"in"``) or output
        (``"out"``) over the valid tokens; ``stop``: end each pass once that tap has fired;
        ``advance``: the layer's outputs become the next layer's inputs."""
        layer = self.enc.layers[position]
        captured = []
        for index, (hidden, (args, kwargs)) in enumerate(zip(self.hidden, self.calls)):
            record: dict[str, torch.Tensor] = {}
            with _tapped(taps, record, self.tokens[index], stop):
                try:
                    out = layer(hidden, *args, **kwargs)
                except _Stop:
                    out = None
            if advance:
                self.hidden[index] = out[0] if isinstance(out, tuple) else out
            record["input"] = hidden[self.tokens[index]]
            captured.append(record)
        return captured


def _first_layer_call(enc: Encoder, batch: dict) -> tuple[tuple, dict]:
    """The positional and keyword arguments of the encoder's call to its first layer."""
    seen: dict = {}

    def hook(module, args, kwargs):
        if args:
            seen["args"], seen["kwargs"] = args, kwargs
        else:
            kwargs = dict(kwargs)
            seen["args"], seen["kwargs"] = (kwargs.pop("hidden_states"),), kwargs
        raise _Stop

    handle = enc.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        enc.base(**batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["args"], seen["kwargs"]


def _valid_tokens(batch: dict, hidden: torch.Tensor) -> torch.Tensor:
    """Which positions are real tokens (padding takes no part in the fit)."""
    mask = batch.get("attention_mask")
    return torch.ones(hidden.shape[:-1], dtype=torch.bool, device=hidden.device) if mask is None else mask.bool()


@contextmanager
def _tapped(taps: dict[str, tuple[nn.Module, str]], record: dict, tokens: torch.Tensor, stop: str | None):
    def pre(name):
        def hook(module, args):
            record[name] = args[0][tokens]
            if name == stop:
                raise _Stop
        return hook

    def post(name):
        def hook(module, args, output):
            record[name] = output[tokens]
            if name == stop:
                raise _Stop
        return hook

    handles = [module.register_forward_pre_hook(pre(name)) if where == "in" else
               module.register_forward_hook(post(name)) for name, (module, where) in taps.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Normal:
    """The normal equations of one sub-block, summed over batches (and over workers by ``reduce``)."""

    def __init__(self, units: int, device):
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)   # noqa: E731
        self.gram, self.rhs, self.target, self.reference = zeros(units, units), zeros(units), zeros(()), zeros(())

    def add(self, gram, rhs, target: torch.Tensor, reference: torch.Tensor) -> None:
        self.gram += gram
        self.rhs += rhs
        self.target += target.double().pow(2).sum()
        self.reference += reference.double().pow(2).sum()

    def reduce(self, reduce: Reduce | None) -> None:
        if reduce is not None:
            self.gram, self.rhs, self.target, self.reference = (reduce(t) for t in (self.gram, self.rhs, self.target,
                                                                                    self.reference))

    def error(self, scales: torch.Tensor) -> float:
        """||fit - target|| / ||dense sub-block output|| for these scales (exact: the problem is quadratic)."""
        squared = scales @ self.gram @ scales - 2 * scales @ self.rhs + self.target
        return float(squared.clamp_min(0).sqrt() / self.reference.sqrt().clamp_min(1e-30))

    def solve(self, damping: float, max_scale: float) -> tuple[torch.Tensor, bool]:
        """Scales minimising the damped problem, and whether they were accepted (else all ones)."""
        ones = torch.ones_like(self.rhs)
        diagonal = self.gram.diagonal().mean()
        if not torch.isfinite(diagonal) or diagonal <= 0:
            return ones, False
        system = self.gram + damping * diagonal * torch.eye(len(ones), dtype=ones.dtype, device=ones.device)
        try:
            delta = torch.linalg.solve(system, self.rhs - self.gram @ ones)
        except RuntimeError:   # singular without damping
            return ones, False
        scales = ones + delta
        if not torch.isfinite(scales).all() or scales.abs().max() > max_scale:
            return ones, False
        return scales, True


def _attention_terms(record: dict, weight: torch.Tensor, target: torch.Tensor, head_dim: int):
    """Gram matrix and right-hand side of per-head contributions: head h adds ctx_h @ W_o[:, h].T."""
    context = record["context"].double()
    heads = context.shape[-1] // head_dim
    per_head = torch.einsum("nhd,ohd->hno", context.view(-1, heads, head_dim),
                            weight.double().view(weight.shape[0], heads, head_dim))
    return torch.einsum("hno,kno->hk", per_head, per_head), torch.einsum("hno,no->h", per_head, target.double())


def _ffn_terms(record: dict, weight_gram: torch.Tensor, weight: torch.Tensor, target: torch.Tensor):
    """Gram matrix and right-hand side of per-neuron contributions: neuron n adds a_n * W_2[:, n]."""
    activation = record["activation"].double()
    return (activation.T @ activation) * weight_gram, (activation * (target.double() @ weight.double())).sum(0)


def _fold(linear: nn.Linear, scales: torch.Tensor, width: int) -> None:
    """Scale each unit's ``width`` input columns of ``linear`` by its scale."""
    with torch.no_grad():
        linear.weight.mul_(scales.to(linear.weight.dtype).repeat_interleave(width).unsqueeze(0))


def _walk(model: nn.Module, dense: nn.Module, batches: Iterable[Mapping], fit: bool, damping: float = 0.0,
          max_scale: float = 10.0, reduce: Reduce | None = None) -> dict[str, dict[int, dict[str, float]]]:
    batches = [encoder_inputs(b) for b in batches]
    modes = (model.training, dense.training)
    model.eval(), dense.eval()
    report: dict[str, dict[int, dict[str, float]]] = {block: {} for block in BLOCKS}
    try:
        with torch.no_grad():
            pruned, reference = _Side(model, batches), _Side(dense, batches)
            kept = {layer: position for position, layer in enumerate(pruned.original)}
            for position, layer in enumerate(reference.original):
                enc = reference.enc
                unit = enc.layers[position]
                targets = reference.run(position, {"attention": (enc.attention_output(unit), "out"),
                                                   "ffn_residual": (enc.ffn_input(unit), "in"),
                                                   "ffn": (enc.ffn_output(unit), "out")}, advance=True)
                if layer in kept:
                    for block in BLOCKS:
                        fitted = _sub_block(pruned, kept[layer], block, targets, fit, damping, max_scale, reduce)
                        if fitted is not None:
                            report[block][layer] = fitted
                    pruned.run(kept[layer], {}, advance=True)
    finally:
        model.train(modes[0]), dense.train(modes[1])
    return report


def _sub_block(side: _Side, position: int, block: str, targets: list[dict], fit: bool, damping: float,
               max_scale: float, reduce: Reduce | None) -> dict[str, float] | None:
    """Fit (or only measure) one sub-block of the pruned model's layer ``position``."""
    enc = side.enc
    unit = enc.layers[position]
    if block == "attention":
        linear, width = enc.attention_output(unit), enc.head_dim
        taps = {"context": (linear, "in")}
    else:
        linear, width = enc.ffn_output(unit), 1
        taps = {"ffn_residual": (enc.ffn_input(unit), "in"), "activation": (linear, "in")}
    units = linear.in_features // width
    if units == 0:
        return None
    records = side.run(position, taps, stop=next(reversed(taps)))
    weight, bias = linear.weight, linear.bias if linear.bias is not None else 0.0
    normal = _Normal(units, weight.device)
    weight_gram = None if block == "attention" else weight.double().T @ weight.double()
    for record, dense in zip(records, targets):
        residual, dense_residual = ((record["input"], dense["input"]) if block == "attention"
                                    else (record["ffn_residual"], dense["ffn_residual"]))
        target = dense[block] + dense_residual - bias - residual
        gram, rhs = (_attention_terms(record, weight, target, width) if block == "attention"
                     else _ffn_terms(record, weight_gram, weight, target))
        normal.add(gram, rhs, target, dense[block])
    normal.reduce(reduce)
    ones = torch.ones(units, dtype=torch.float64, device=weight.device)
    before = normal.error(ones)
    if not fit:
        return {"error": before}
    scales, accepted = normal.solve(damping, max_scale)
    if accepted:
        _fold(linear, scales, width)
    return {"error_before": before, "error_after": normal.error(scales), "accepted": float(accepted),
            "scale_min": float(scales.min()), "scale_max": float(scales.max())}


def tune_kept_units(model: nn.Module, dense: nn.Module, batches: Iterable[Mapping], damping: float = 0.01,
                    max_scale: float = 10.0, reduce: Reduce | None = None) -> dict[str, dict[int, dict[str, float]]]:
    """Rescale every kept head and FFN neuron of ``model`` (in place) to match ``dense`` layer by layer.

    ``model``: the pruned (shrunk) model; ``dense``: the reference it was pruned from (unchanged);
    ``batches``: unlabelled batches (task batches do: only encoder inputs are read). ``damping``:
    ridge toward scale 1, relative to the mean diagonal of each sub-block's Gram matrix;
    ``reduce``: sums a tensor over workers, so every worker folds the same scales.

    Returns ``{"attention" | "ffn": {original layer: {"error_before", "error_after", "accepted",
    "scale_min", "scale_max"}}}``; errors are relative (see :func:`sublayer_errors`), on the
    calibration tokens, with the inputs the pruned model gives that layer after the layers before it
    were tuned.
    """
    return _walk(model, dense, batches, fit=True, damping=damping, max_scale=max_scale, reduce=reduce)


def sublayer_errors(model: nn.Module, dense: nn.Module, batches: Iterable[Mapping]) -> dict[str, dict[int, float]]:
    """Per sub-block relative error of ``model`` against ``dense`` on ``batches``, each model on its own
    inputs: ``||pruned pre-LayerNorm sum - dense pre-LayerNorm sum|| / ||dense sub-block output||``
    over the real tokens, keyed ``{"attention" | "ffn": {original layer: error}}``."""
    report = _walk(model, dense, batches, fit=False)
    return {block: {layer: row["error"] for layer, row in rows.items()} for block, rows in report.items()}


def tuning_metrics(report: dict[str, dict[int, dict[str, float]]], prefix: str = "mask_tuning") -> dict[str, float]:
    """The report as flat metrics: ``<prefix>/<block>/<layer>/error_before|error_after`` and the means
    over every sub-block, ``<prefix>/error_before`` and ``<prefix>/error_after``."""
    rows = [(block, layer, row) for block, by_layer in report.items() for layer, row in by_layer.items()]
    metrics = {f"{prefix}/{block}/{layer}/{name}": row[name] for block, layer, row in rows
               for name in ("error_before", "error_after")}
    for name in ("error_before", "error_after"):
        metrics[f"{prefix}/{name}"] = sum(row[name] for *_, row in rows) / len(rows) if rows else 0.0
    metrics[f"{prefix}/rejected"] = float(sum(1 - row["accepted"] for *_, row in rows))
    return metrics


__all__ = ["encoder_inputs", "sublayer_errors", "tune_kept_units", "tuning_metrics"]
