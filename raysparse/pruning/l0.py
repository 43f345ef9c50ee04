"""L0 regularisation with hard-concrete gates (Louizos et al. 2018; Wang et al. 2020).

Every head and FFN neuron of the live model gets a learnable ``log_alpha``. While the
model trains, each forward pass multiplies a unit's output by a gate drawn from the
hard-concrete distribution; in eval mode the gate is deterministic. A Lagrangian term
pushes the *expected* encoder sparsity (parameters a unit owns x P(gate != 0)) to a
target that ramps linearly from 0; its multipliers are maximised. At the end the
deterministic gates are folded into the weights and :meth:`final_mask` keeps exactly
the target share of parameters, ranking units by ``log_alpha`` (heads and neurons
separately, through :func:`select_mask`), like every other method.

Everything happens in the :class:`Importance` callbacks; the training loop is untouched:

    attach(model) -> optimizer(+ extra_parameters()) -> per step:
        loss = task_loss + regularization(step, total); loss.backward(); after_backward(model, step); step
    -> detach(model) -> final_mask(model, sparsity)

Sign of the multipliers: :meth:`regularization` returns the Lagrangian with a gradient
reversal on ``lambda1``/``lambda2`` (value unchanged, gradient negated), so the ordinary
optimizer step that *descends* on the loss *ascends* on the multipliers. No negative
learning rate and no special optimizer flag are needed; the groups from
:meth:`extra_parameters` carry a positive ``lr`` and ``weight_decay=0``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from raysparse.errors import RaysparseError, expect
from raysparse.pruning.algorithms import _to_original
from raysparse.pruning.registry import Importance, Options, exclude_removed, register
from raysparse.pruning.scores import UnitScores
from raysparse.pruning.selection import Selection, check_sparsity, select_mask
from raysparse.structure import Encoder, Mask, UnitGates, attach_gates, params_per_head, params_per_neuron, structure_of

_EPS = 1e-6


# --- the hard-concrete distribution --------------------------------------------------------------
def sample_gates(log_alpha: torch.Tensor, beta: float = 2 / 3, l: float = -0.1, r: float = 1.1,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One hard-concrete draw per entry: s = sigmoid((log u - log(1-u) + log_alpha) / beta), stretched to
    (l, r) and clamped to [0, 1]. Differentiable in ``log_alpha``."""
    u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device, dtype=log_alpha.dtype)
    u = u.clamp(_EPS, 1 - _EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (r - l) + l).clamp(0.0, 1.0)


def deterministic_gates(log_alpha: torch.Tensor, l: float = -0.1, r: float = 1.1) -> torch.Tensor:
    """Test-time gates (Louizos et al.): clamp(sigmoid(log_alpha) * (r - l) + l, 0, 1)."""
    return (torch.sigmoid(log_alpha) * (r - l) + l).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor, beta: float = 2 / 3, l: float = -0.1, r: float = 1.1) -> torch.Tensor:
    """P(gate != 0) = sigmoid(log_alpha - beta * log(-l / r)): the expected L0 norm per unit."""
    return torch.sigmoid(log_alpha - beta * math.log(-l / r))


def prob_one(log_alpha: torch.Tensor, beta: float = 2 / 3, l: float = -0.1, r: float = 1.1) -> torch.Tensor:
    """P(gate == 1) = sigmoid(log_alpha - beta * log((1 - l) / (r - 1)))."""
    return torch.sigmoid(log_alpha - beta * math.log((1 - l) / (r - 1)))


def _ascend(x: torch.Tensor) -> torch.Tensor:
    """Value ``x``, gradient ``-d/dx``: minimising a loss built on it maximises over ``x``."""
    return 2 * x.detach() - x


class _HardConcreteGates(UnitGates):
    """UnitGates whose rows are computed from the owner's log-alphas when a hook reads them.

    Train mode: one sample per step (drawn at the first forward after ``after_backward``),
    shared by every forward of that step (e.g. both sides of a contrastive pair).
    Eval mode: deterministic gates.
    """

    def __init__(self, owner: "L0Importance", model: nn.Module):
        self._owner = owner
        self._model = model
        self.layers = None

    @property
    def heads(self):
        return self._owner._gate_rows(self._model.training)[0]

    @property
    def neurons(self):
        return self._owner._gate_rows(self._model.training)[1]


@register
class L0Importance(Importance):
    """Learned hard-concrete gates on heads and neurons; scores are the final ``log_alpha``.

    Options:
      target_sparsity  encoder sparsity the Lagrangian aims at (required for training)
      beta, l, r       hard-concrete temperature (2/3) and stretch interval (-0.1, 1.1)
      droprate_init    initial P(drop) that sets the mean of log_alpha (CoFi: 0.5)
      init_noise       std of the log_alpha initialisation
      ramp_fraction    share of training over which the target ramps linearly from 0
      lr               learning rate of the log-alphas
      lambda_lr        learning rate of lambda1 (the integral-like multiplier)
      lambda2_lr       learning rate of lambda2 (the quadratic term's multiplier); keeping it well above
                       lambda_lr damps the overshoot (with Adam each multiplier moves about its lr per step)
      fold_gates       detach() multiplies each unit's output weights by its deterministic gate,
                       so the un-gated model computes what the gated eval model computed
      seed             seeds the gate initialisation and sampling
    """

    name = "l0"
    learns_during_training = True

    class Options(Options):
        target_sparsity: float | None = Field(None, ge=0, lt=1)   # what the Lagrangian aims at (default: the run's)
        beta: float = Field(2 / 3, gt=0)            # hard-concrete temperature
        l: float = Field(-0.1, lt=0)                # stretch interval, lower end
        r: float = Field(1.1, gt=1)                 # stretch interval, upper end
        droprate_init: float = Field(0.5, gt=0, lt=1)   # initial P(drop): the mean of log_alpha
        init_noise: float = Field(0.01, ge=0)       # std of the log_alpha initialisation
        ramp_fraction: float = Field(0.3, ge=0, le=1)   # share of training over which the target ramps up
        lr: float = Field(0.1, gt=0)                # learning rate of the log-alphas
        lambda_lr: float = Field(0.03, gt=0)        # learning rate of lambda1
        lambda2_lr: float = Field(1.0, gt=0)        # learning rate of lambda2 (well above lambda_lr)
        fold_gates: bool = True                     # fold deterministic gates into the output weights
        seed: int = 0

    def __init__(self, target_sparsity: float | None = None, beta: float = 2 / 3, l: float = -0.1, r: float = 1.1,
                 droprate_init: float = 0.5, init_noise: float = 0.01, ramp_fraction: float = 0.3,
                 lr: float = 0.1, lambda_lr: float = 0.03, lambda2_lr: float = 1.0, fold_gates: bool = True,
                 seed: int = 0):
        if target_sparsity is not None:
            check_sparsity(target_sparsity, "pruning.options.target_sparsity")
        expect(beta > 0, f"pruning.options.beta: expected a positive temperature, got {beta!r}")
        expect(l < 0 < 1 < r, f"pruning.options.l/r: expected l < 0 and r > 1, got l={l!r}, r={r!r}")
        expect(0 < droprate_init < 1, f"pruning.options.droprate_init: expected a number in (0, 1), got {droprate_init!r}")
        expect(0 <= ramp_fraction <= 1, f"pruning.options.ramp_fraction: expected a number in [0, 1], got {ramp_fraction!r}")
        expect(lr > 0 and lambda_lr > 0 and lambda2_lr > 0, "pruning.options.lr/lambda_lr/lambda2_lr: expected positive "
               f"learning rates, got {lr!r}, {lambda_lr!r}, {lambda2_lr!r}")
        self.target_sparsity = target_sparsity
        self.beta, self.l, self.r = float(beta), float(l), float(r)
        self.droprate_init, self.init_noise = float(droprate_init), float(init_noise)
        self.ramp_fraction = float(ramp_fraction)
        self.lr, self.lambda_lr, self.lambda2_lr = float(lr), float(lambda_lr), float(lambda2_lr)
        self.fold_gates = fold_gates
        self.seed = seed
        self.head_log_alpha: nn.ParameterList | None = None
        self.neuron_log_alpha: nn.ParameterList | None = None
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))
        self._handle = None
        self._generator: torch.Generator | None = None
        self._sample: tuple[list, list] | None = None
        self._sample_grad: bool | None = None
        self._eval_cache: tuple[tuple, tuple[list, list]] | None = None
        self._per_head = self._per_neuron = self._total = 0
        self._last: dict[str, float] = {}

    # --- distribution over the live model's units -------------------------------------------------
    def _check_attached(self) -> None:
        if self.head_log_alpha is None:
            raise RaysparseError("pruning.algorithm: l0 learns its gates during training; call attach(model) "
                                 "and train before asking for its parameters, scores or mask")

    def _gate_rows(self, training: bool) -> tuple[list, list]:
        if training:
            grad = torch.is_grad_enabled()
            if self._sample is None or self._sample_grad != grad:
                draw = lambda la: sample_gates(la, self.beta, self.l, self.r, self._generator)  # noqa: E731
                self._sample = ([draw(la) for la in self.head_log_alpha], [draw(la) for la in self.neuron_log_alpha])
                self._sample_grad = grad
            return self._sample
        key = tuple(p._version for p in self._all_log_alphas())
        if self._eval_cache is None or self._eval_cache[0] != key:
            with torch.no_grad():      # eval gates are fixed: nothing learns through them
                self._eval_cache = (key, self.deterministic())
        return self._eval_cache[1]

    def _all_log_alphas(self) -> list[nn.Parameter]:
        return [*self.head_log_alpha, *self.neuron_log_alpha]

    def deterministic(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Deterministic gates per current layer: (heads, neurons)."""
        self._check_attached()
        return ([deterministic_gates(la, self.l, self.r) for la in self.head_log_alpha],
                [deterministic_gates(la, self.l, self.r) for la in self.neuron_log_alpha])

    def expected_sparsity(self) -> torch.Tensor:
        """1 - E[kept prunable parameters] / all prunable parameters of the original model (differentiable)."""
        self._check_attached()
        kept = sum(prob_nonzero(la, self.beta, self.l, self.r).sum() * self._per_head for la in self.head_log_alpha)
        kept = kept + sum(prob_nonzero(la, self.beta, self.l, self.r).sum() * self._per_neuron
                          for la in self.neuron_log_alpha)
        return 1.0 - kept / self._total

    def target_at(self, step: int, total_steps: int) -> float:
        """The target ramps linearly from 0 to ``target_sparsity`` over ``ramp_fraction`` of training."""
        if self.target_sparsity is None:
            raise RaysparseError("pruning.options.target_sparsity: l0 needs the target encoder sparsity to train "
                                 "towards (e.g. options: {target_sparsity: 0.5})")
        ramp = self.ramp_fraction * total_steps
        return self.target_sparsity if ramp <= 0 else self.target_sparsity * min(1.0, step / ramp)

    # --- callbacks -----------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        enc = Encoder(model)
        device = next(model.parameters()).device
        heads, neurons = enc.heads_per_layer(), enc.neurons_per_layer()
        shape_now = ([len(p) for p in self.head_log_alpha], [len(p) for p in self.neuron_log_alpha]) \
            if self.head_log_alpha is not None else None
        if shape_now != (heads, neurons):
            generator = torch.Generator().manual_seed(self.seed)
            mean = math.log(1 - self.droprate_init) - math.log(self.droprate_init)
            init = lambda n: nn.Parameter(  # noqa: E731
                (mean + self.init_noise * torch.randn(n, generator=generator)).to(device))
            self.head_log_alpha = nn.ParameterList([init(n) for n in heads])
            self.neuron_log_alpha = nn.ParameterList([init(n) for n in neurons])
        self.head_log_alpha.to(device)
        self.neuron_log_alpha.to(device)
        self.lambda1.data = self.lambda1.data.to(device)
        self.lambda2.data = self.lambda2.data.to(device)
        num_layers, num_heads, ffn = structure_of(model).shape
        self._per_head = params_per_head(enc.hidden_size, enc.head_dim)
        self._per_neuron = params_per_neuron(enc.hidden_size)
        self._total = num_layers * (num_heads * self._per_head + ffn * self._per_neuron)
        self._generator = torch.Generator(device=device).manual_seed(self.seed + 1)
        self._sample = self._eval_cache = None
        self.detach(model, fold=False)
        self._handle = attach_gates(model, _HardConcreteGates(self, model))

    def extra_parameters(self) -> list[dict]:
        self._check_attached()
        return [{"params": self._all_log_alphas(), "lr": self.lr, "weight_decay": 0.0},
                {"params": [self.lambda1], "lr": self.lambda_lr, "weight_decay": 0.0},
                {"params": [self.lambda2], "lr": self.lambda2_lr, "weight_decay": 0.0}]

    def regularization(self, step: int, total_steps: int) -> torch.Tensor:
        target = self.target_at(step, total_steps)
        expected = self.expected_sparsity()
        gap = expected - target
        term = _ascend(self.lambda1) * gap + _ascend(self.lambda2) * gap * gap
        self._last = {"expected_sparsity": float(expected.detach()), "target_sparsity": target,
                      "lagrangian": float(term.detach())}
        return term

    def after_backward(self, model: nn.Module, step: int) -> None:
        self._sample = None          # the next forward draws fresh gates (after the optimizer step)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for p in [*self._all_log_alphas(), self.lambda1, self.lambda2]:   # DDP does not see these
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()

    def detach(self, model: nn.Module, fold: bool | None = None) -> None:
        if self._handle is None:
            return
        self._handle.remove()
        self._handle = None
        self._sample = self._eval_cache = None
        if self.fold_gates if fold is None else fold:
            self._fold(model)

    def _fold(self, model: nn.Module) -> None:
        """Scale each head's output-projection columns and each neuron's W2 column by its deterministic gate."""
        enc = Encoder(model)
        heads, neurons = self.deterministic()
        with torch.no_grad():
            for i, layer in enumerate(enc.layers):
                out, w2 = enc.attention_output(layer), enc.ffn_output(layer)
                out.weight.mul_(heads[i].repeat_interleave(enc.head_dim).to(out.weight)[None, :])
                w2.weight.mul_(neurons[i].to(w2.weight)[None, :])

    def final_mask(self, model: nn.Module, sparsity: float) -> Mask:
        """Exactly ``sparsity``: the units with the highest log_alpha, heads and neurons ranked separately."""
        enc = Encoder(model)
        structure = structure_of(model)
        base = None if structure.is_full else structure.to_mask()
        mask = select_mask(self.score(model), sparsity, enc.hidden_size, enc.head_dim,
                           Selection(scope="global", normalize="none"), base=base)
        return mask

    def score(self, model, batches=None, loss_fn=None, mask=None) -> UnitScores:
        self._check_attached()
        enc = Encoder(model)
        if [len(p) for p in self.head_log_alpha] != enc.heads_per_layer() or \
                [len(p) for p in self.neuron_log_alpha] != enc.neurons_per_layer():
            raise RaysparseError("pruning.algorithm: l0 gates were learned on a model of a different shape "
                                 "(was it shrunk after attach?)")
        scores = _to_original(model, list(self.head_log_alpha), list(self.neuron_log_alpha))
        return exclude_removed(scores, mask)

    def metrics(self) -> dict[str, float]:
        if self.head_log_alpha is None or not self._total:
            return {}
        with torch.no_grad():
            heads, neurons = self.deterministic()
            zero = sum(int((g == 0).sum()) for g in heads) * self._per_head + \
                sum(int((g == 0).sum()) for g in neurons) * self._per_neuron
            absent = self._total - (sum(len(g) for g in heads) * self._per_head
                                    + sum(len(g) for g in neurons) * self._per_neuron)
            out = {**self._last, "expected_sparsity": float(self.expected_sparsity()),
                   "deterministic_sparsity": (zero + absent) / self._total,
                   "lambda1": float(self.lambda1), "lambda2": float(self.lambda2)}
        return out

    # --- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Learned state (log-alphas per current layer, multipliers) for checkpoints."""
        self._check_attached()
        state = {"lambda1": self.lambda1.detach().cpu(), "lambda2": self.lambda2.detach().cpu()}
        state.update({f"heads.{i}": p.detach().cpu() for i, p in enumerate(self.head_log_alpha)})
        state.update({f"neurons.{i}": p.detach().cpu() for i, p in enumerate(self.neuron_log_alpha)})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        count = sum(1 for k in state if k.startswith("heads."))
        self.head_log_alpha = nn.ParameterList([nn.Parameter(state[f"heads.{i}"].clone()) for i in range(count)])
        self.neuron_log_alpha = nn.ParameterList([nn.Parameter(state[f"neurons.{i}"].clone()) for i in range(count)])
        self.lambda1 = nn.Parameter(state["lambda1"].clone())
        self.lambda2 = nn.Parameter(state["lambda2"].clone())
