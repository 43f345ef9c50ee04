"""Gradient importance beats random pruning on real data at 50% encoder sparsity (finding 2's floor)."""

import pytest

from raysparse.data.parallel import parallel_pairs, tatoeba_pairs
from raysparse.pruning import Selection, get_algorithm, select_mask
from raysparse.standalone import tatoeba_quality
from raysparse.structure import Encoder, apply_mask
from raysparse.training.retrieval import contrastive_loss, pair_batches

pytestmark = pytest.mark.slow   # scores and evaluates e5 on real pairs

LANGUAGES = ["de", "ru", "zh", "ar"]


@pytest.mark.timeout(900)
def test_gradient_importance_beats_random_at_half_sparsity(embedded_model, embedded_tokenizer):
    """Scored on XNLI translation pairs, evaluated on Tatoeba (disjoint data), no recovery."""
    sources, targets = parallel_pairs("xnli", LANGUAGES, max_pairs=96, seed=0)
    batches = pair_batches(embedded_tokenizer, sources, targets, batch_size=16, max_length=64)
    evaluation = tatoeba_pairs(LANGUAGES, max_pairs=120)
    enc = Encoder(embedded_model)
    selection = Selection(scope="global", normalize="l2")

    def quality_with(mask):
        with apply_mask(embedded_model, mask):
            return tatoeba_quality(embedded_model, embedded_tokenizer, evaluation)["tatoeba/avg/accuracy"]

    gradient_scores = get_algorithm("gradient").score(embedded_model, batches, contrastive_loss)
    gradient = quality_with(select_mask(gradient_scores, 0.5, enc.hidden_size, enc.head_dim, selection))
    randoms = [quality_with(select_mask(get_algorithm("random", seed=seed).score(embedded_model), 0.5,
                                        enc.hidden_size, enc.head_dim, selection)) for seed in (0, 1, 2)]
    margin = gradient - max(randoms)
    print(f"\nTatoeba avg at 50% sparsity, no recovery: gradient {gradient:.3f}, random seeds "
          f"{', '.join(f'{r:.3f}' for r in randoms)}; margin over the best random seed {margin:+.3f}")
    assert gradient > max(randoms), "gradient importance must beat every random seed"
