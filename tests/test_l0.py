"""L0 hard-concrete gates: sampling statistics against closed forms, deterministic eval gates,
folding, and a small real run in which the Lagrangian drives expected sparsity to the target."""

import copy

import pytest
import torch

import raysparse
from raysparse.data.parallel import parallel_pairs
from raysparse.errors import RaysparseError
from raysparse.pruning import ALGORITHMS, get_algorithm
from raysparse.pruning.l0 import L0Importance, deterministic_gates, prob_nonzero, prob_one, sample_gates
from raysparse.structure import Encoder, encoder_sparsity_of, params_per_head, params_per_neuron
from raysparse.training.retrieval import contrastive_loss, pair_batches

LOG_ALPHA = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0, 4.0])


def quadrature_mean(log_alpha, beta, l, r, points=400_000):
    """E[gate] = integral over u in (0, 1) of the gate the noise u produces (midpoint rule)."""
    u = ((torch.arange(points, dtype=torch.float64) + 0.5) / points)[:, None]
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha.double()) / beta)
    return (s * (r - l) + l).clamp(0, 1).mean(0).float()


@pytest.fixture(scope="module")
def model():
    return raysparse.load_model("embedded")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("beta,l,r", [(2 / 3, -0.1, 1.1), (0.5, -0.2, 1.05)])
def test_hard_concrete_sampling_matches_closed_forms(beta, l, r):
    n = 100_000   # standard error of a share <= 0.5 / sqrt(n) = 0.0016
    z = sample_gates(LOG_ALPHA.repeat(n, 1), beta, l, r, torch.Generator().manual_seed(0))
    assert z.min() >= 0 and z.max() <= 1
    torch.testing.assert_close((z > 0).float().mean(0), prob_nonzero(LOG_ALPHA, beta, l, r), atol=0.006, rtol=0)
    torch.testing.assert_close((z == 1).float().mean(0), prob_one(LOG_ALPHA, beta, l, r), atol=0.006, rtol=0)
    torch.testing.assert_close(z.mean(0), quadrature_mean(LOG_ALPHA, beta, l, r), atol=0.006, rtol=0)
    # gates are differentiable in log_alpha, and a larger log_alpha opens them
    la = LOG_ALPHA.clone().requires_grad_()
    sample_gates(la.repeat(2000, 1), beta, l, r, torch.Generator().manual_seed(1)).mean().backward()
    assert (la.grad > 0).all()


@pytest.mark.timeout(30)
def test_deterministic_gates_formula():
    gates = deterministic_gates(LOG_ALPHA)
    expected = (torch.sigmoid(LOG_ALPHA) * 1.2 - 0.1).clamp(0, 1)
    torch.testing.assert_close(gates, expected)
    assert gates[0] == 0 and gates[-1] == 1


@pytest.mark.timeout(120)
def test_gates_on_the_live_model_eval_is_deterministic_train_samples_once_per_step(model, embedded_tokenizer):
    assert ALGORITHMS["l0"] is L0Importance and L0Importance.learns_during_training
    student = copy.deepcopy(model)
    alg = get_algorithm("l0", target_sparsity=0.5, seed=3)
    with pytest.raises(RaysparseError, match="attach"):
        alg.score(student)
    alg.attach(student)
    with torch.no_grad():   # spread the gates: some closed, some fractional, some open
        g = torch.Generator().manual_seed(0)
        for p in alg._all_log_alphas():
            p.copy_(torch.randn(p.shape, generator=g) * 3)
    batch = embedded_tokenizer(["query: Der schnelle braune Fuchs.", "query: 東京は日本の首都です。"], padding=True,
                               return_tensors="pt")
    student.eval()
    with torch.no_grad():
        first = student(**batch).last_hidden_state
        second = student(**batch).last_hidden_state
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    heads, neurons = alg._gate_rows(False)
    assert len(heads) + len(neurons) == len(alg.head_log_alpha) + len(alg.neuron_log_alpha)
    for row, la in zip(heads + neurons, list(alg.head_log_alpha) + list(alg.neuron_log_alpha)):
        torch.testing.assert_close(row, deterministic_gates(la))

    student.train()
    step_sample = alg._gate_rows(True)
    assert alg._gate_rows(True) is step_sample        # every forward of one step sees one sample
    alg.after_backward(student, 0)
    assert not torch.equal(torch.cat(alg._gate_rows(True)[1]), torch.cat(step_sample[1]))

    # folding the deterministic gates into the weights keeps the eval function
    student.eval()
    alg.detach(student)
    with torch.no_grad():
        folded = student(**batch).last_hidden_state
    torch.testing.assert_close(folded, first, atol=1e-4, rtol=1e-4)
    metrics = alg.metrics()
    assert 0 < metrics["deterministic_sparsity"] < 1 and 0 < metrics["expected_sparsity"] < 1


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lagrangian_drives_expected_sparsity_to_target_on_real_pairs(model, embedded_tokenizer, data_dir):
    """The embedded model, contrastive loss on XNLI premise pairs; the loop follows the Importance call order.

    Kept small for 2 CPU cores: 30 steps of 4 pairs, model weights frozen (the gates and the
    multipliers learn, the task loss still shapes which gates close). Fast multipliers for the
    short horizon: the default rates suit a few hundred steps.
    """
    target, steps = 0.5, 30
    student = copy.deepcopy(model)
    sources, targets = parallel_pairs("xnli", ["ar", "de", "es", "fr", "hi", "ru", "sw", "zh"], max_pairs=4 * steps,
                                      seed=0, data_dir=data_dir)
    batches = pair_batches(embedded_tokenizer, sources, targets, 4, max_length=24)
    student.requires_grad_(False)
    alg = get_algorithm("l0", target_sparsity=target, lr=1.0, lambda_lr=0.3, lambda2_lr=20.0, ramp_fraction=0.3)
    alg.attach(student)
    optimizer = torch.optim.AdamW([*alg.extra_parameters()], lr=2e-5)
    student.train()
    trajectory = []
    for step in range(steps):
        loss = contrastive_loss(student, batches[step % len(batches)])
        regularization = alg.regularization(step, steps)
        full = loss + regularization if regularization is not None else loss
        optimizer.zero_grad(set_to_none=True)
        full.backward()
        alg.after_backward(student, step)
        optimizer.step()
        trajectory.append(alg.metrics()["expected_sparsity"])
    alg.detach(student)
    print("expected sparsity:", " ".join(f"{x:.3f}" for x in trajectory))
    assert trajectory[-1] == pytest.approx(target, abs=0.02)
    assert alg.metrics()["lambda2"] > 0

    enc = Encoder(student)
    hidden, head_dim = enc.hidden_size, enc.head_dim
    mask = alg.final_mask(student, target)
    assert encoder_sparsity_of(mask, hidden, head_dim) == pytest.approx(target, abs=params_per_neuron(hidden) / 2 / (
        12 * (12 * params_per_head(hidden, head_dim) + 1536 * params_per_neuron(hidden))))
    assert int((~mask.kept_heads).sum()) == round(target * 144)
    scores = alg.score(student)
    # kept units are the ones with the highest log-alpha (heads and neurons ranked separately)
    assert scores.heads[mask.kept_heads].min() >= scores.heads[~mask.kept_heads].max()
    assert scores.neurons[mask.kept_neurons].min() >= scores.neurons[~mask.kept_neurons].max()
