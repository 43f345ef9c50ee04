"""Importance per language: how much do the sub-networks chosen for different languages overlap?

Given unit scores per language (each scored on that language's data), this selects a
mask per language at one sparsity, measures the Jaccard overlap of the kept heads
(per layer and overall; neurons overall too) between every pair of languages, draws
head importance per language x layer, and writes everything to a folder that the
tracking layer logs as artifacts::

    scores/<lang>.safetensors   masks/<lang>.json   overlap.json
    head_importance.png         head_overlap.png
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from raysparse.errors import expect
from raysparse.pruning.scores import UnitScores
from raysparse.pruning.selection import Selection, select_mask
from raysparse.structure import Mask


def masks_per_language(scores: Mapping[str, UnitScores], sparsity: float, hidden_size: int, head_dim: int,
                       selection: Selection = Selection()) -> dict[str, Mask]:
    """One mask per language at ``sparsity`` (exact, as :func:`select_mask` makes it)."""
    return {lang: select_mask(s, sparsity, hidden_size, head_dim, selection) for lang, s in scores.items()}


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A and B| / |A or B| of two boolean kept-sets (two empty sets are identical: 1.0)."""
    a, b = a.bool(), b.bool()
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def head_overlap(masks: Mapping[str, Mask]) -> dict:
    """Jaccard of kept heads (per layer and overall) and kept neurons (overall) for every pair of languages."""
    languages = list(masks)
    expect(len(languages) >= 1, "analysis: no languages given")
    n = len(languages)
    heads = [[1.0] * n for _ in range(n)]
    neurons = [[1.0] * n for _ in range(n)]
    pairs = []
    for (i, a), (j, b) in itertools.combinations(enumerate(languages), 2):
        ha, hb = masks[a].effective_heads(), masks[b].effective_heads()
        per_layer = [jaccard(ha[k], hb[k]) for k in range(ha.shape[0])]
        overall = jaccard(ha, hb)
        neuron = jaccard(masks[a].effective_neurons(), masks[b].effective_neurons())
        heads[i][j] = heads[j][i] = overall
        neurons[i][j] = neurons[j][i] = neuron
        pairs.append({"a": a, "b": b, "heads": overall, "heads_per_layer": per_layer, "neurons": neuron})
    mean = lambda xs: sum(xs) / len(xs) if xs else 1.0  # noqa: E731
    num_layers = next(iter(masks.values())).num_layers
    return {
        "languages": languages,
        "heads": {"matrix": heads, "mean": mean([p["heads"] for p in pairs]),
                  "per_layer_mean": [mean([p["heads_per_layer"][k] for p in pairs]) for k in range(num_layers)]},
        "neurons": {"matrix": neurons, "mean": mean([p["neurons"] for p in pairs])},
        "pairs": pairs,
    }


def layer_importance(scores: UnitScores) -> torch.Tensor:
    """Mean head score per layer, divided by the mean over layers (layer-mean normalised; 1 = average layer).

    Units scoring -inf (already removed) are ignored; a layer without any scores gives NaN.
    """
    heads = scores.heads.float()
    finite = torch.isfinite(heads)
    per_layer = torch.where(finite, heads, torch.zeros_like(heads)).sum(1) / finite.sum(1).clamp_min(1)
    per_layer = per_layer.masked_fill(finite.sum(1) == 0, float("nan"))
    overall = per_layer[~per_layer.isnan()].abs().mean()
    return per_layer / overall.clamp_min(1e-12) if torch.isfinite(overall) else per_layer


def importance_heatmap(scores: Mapping[str, UnitScores], path: str | Path, masks: Mapping[str, Mask] | None = None,
                       title: str = "Head importance per language and layer") -> Path:
    """PNG: layer-mean normalised head importance (language x layer); with ``masks``, kept heads per layer beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    languages = list(scores)
    grid = torch.stack([layer_importance(scores[lang]) for lang in languages]).numpy()
    panels = 2 if masks else 1
    height = 1.2 + 0.3 * len(languages)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, height), squeeze=False)
    ax = axes[0][0]
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_title("importance / mean over layers", fontsize=9)
    fig.colorbar(image, ax=ax)
    if masks:
        kept = torch.stack([masks[lang].effective_heads().sum(1) for lang in languages]).numpy()
        ax2 = axes[0][1]
        image2 = ax2.imshow(kept, aspect="auto", cmap="magma", vmin=0, vmax=next(iter(masks.values())).kept_heads.shape[1])
        ax2.set_title("kept heads per layer", fontsize=9)
        fig.colorbar(image2, ax=ax2)
    for axis in axes[0]:
        axis.set_yticks(range(len(languages)), languages, fontsize=7)
        axis.set_xticks(range(grid.shape[1]), range(grid.shape[1]), fontsize=7)
        axis.set_xlabel("layer")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def overlap_heatmap(overlap: dict, path: str | Path) -> Path:
    """PNG: the language x language Jaccard matrix of kept heads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    languages = overlap["languages"]
    size = 1.5 + 0.35 * len(languages)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(overlap["heads"]["matrix"], vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(languages)), languages, fontsize=7, rotation=90)
    ax.set_yticks(range(len(languages)), languages, fontsize=7)
    ax.set_title(f"Jaccard of kept heads (mean {overlap['heads']['mean']:.2f})", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def write_language_study(folder: str | Path, scores: Mapping[str, UnitScores], sparsity: float, hidden_size: int,
                         head_dim: int, selection: Selection = Selection()) -> dict[str, Path]:
    """Write per-language scores and masks, the overlap JSON and the figures into ``folder``; returns the paths."""
    folder = Path(folder)
    (folder / "scores").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    masks = masks_per_language(scores, sparsity, hidden_size, head_dim, selection)
    paths: dict[str, Path] = {}
    for lang in scores:
        scores[lang].save(folder / "scores" / f"{_safe(lang)}.safetensors")
        masks[lang].save(folder / "masks" / f"{_safe(lang)}.json")
    overlap = {"sparsity": sparsity, "selection": {"scope": selection.scope, "normalize": selection.normalize},
               **head_overlap(masks)}
    paths["overlap"] = folder / "overlap.json"
    paths["overlap"].write_text(json.dumps(overlap, indent=1))
    paths["importance_png"] = importance_heatmap(scores, folder / "head_importance.png", masks)
    paths["overlap_png"] = overlap_heatmap(overlap, folder / "head_overlap.png")
    paths["scores"], paths["masks"] = folder / "scores", folder / "masks"
    return paths
