"""One-shot or iterative pruning of an encoder on retrieval data, without Ray.

score (any registered algorithm) -> select a mask -> shrink physically -> optionally
recover with a contrastive loss on translation pairs -> evaluate Tatoeba -> save.
This is the foundation's end-to-end path (`raysparse prune`); Ray Train runs build
the same steps into trials.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raysparse.errors import RaysparseError, expect
from raysparse.models.sources import EMBEDDED, load_encoder, load_tokenizer
from raysparse.pruning import Selection, UnitScores, check_sparsity, get_algorithm, prune_schedule
from raysparse.structure import Mask, Size, measure, save_pruned, shrink
from raysparse.training.retrieval import contrastive_loss, encode, pair_batches, top1_accuracy

SCORING_SOURCES = ("xnli", "tatoeba")


@dataclass
class PruneResult:
    """What a prune produced; ``quality`` maps ``tatoeba/<lang>/accuracy`` (and avg/worst) per model."""

    out_dir: Path | None
    mask: Mask
    scores: UnitScores
    dense: Size
    pruned: Size
    quality: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        rows = [
            ("encoder sparsity", f"{self.dense.encoder_sparsity:.3f}", f"{self.pruned.encoder_sparsity:.3f}"),
            ("parameters", _millions(self.dense.total_params), _millions(self.pruned.total_params)),
            ("  encoder", _millions(self.dense.encoder_params), _millions(self.pruned.encoder_params)),
            ("  embeddings", _millions(self.dense.embedding_params), _millions(self.pruned.embedding_params)),
            ("heads / neurons", f"{self.dense.heads} / {self.dense.neurons}", f"{self.pruned.heads} / {self.pruned.neurons}"),
            ("bytes", f"{self.dense.bytes / 1e6:.1f} MB", f"{self.pruned.bytes / 1e6:.1f} MB"),
            (f"GFLOPs/seq@{self.dense.sequence_length}", f"{self.dense.flops_per_sequence / 1e9:.2f}",
             f"{self.pruned.flops_per_sequence / 1e9:.2f}"),
        ]
        for key in ("tatoeba/avg/accuracy", "tatoeba/worst/accuracy"):
            if key in self.quality.get("dense", {}):
                rows.append((key, f"{self.quality['dense'][key]:.3f}", f"{self.quality['pruned'][key]:.3f}"))
        width = max(len(r[0]) for r in rows)
        lines = [f"{'':{width}}  {'dense':>12}  {'pruned':>12}"]
        lines += [f"{name:{width}}  {a:>12}  {b:>12}" for name, a, b in rows]
        return "\n".join(lines)

    def language_table(self) -> str:
        dense, pruned = self.quality.get("dense", {}), self.quality.get("pruned", {})
        langs = sorted(k.split("/")[1] for k in dense if k.endswith("/accuracy") and k.split("/")[1] not in ("avg", "worst"))
        lines = [f"{'lang':6}  {'dense':>7}  {'pruned':>7}"]
        lines += [f"{lang:6}  {dense[f'tatoeba/{lang}/accuracy']:7.3f}  {pruned[f'tatoeba/{lang}/accuracy']:7.3f}"
                  for lang in langs]
        return "\n".join(lines)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def tatoeba_quality(model, tokenizer, pairs: dict[str, tuple[list[str], list[str]]], batch_size: int = 64) -> dict[str, float]:
    """Top-1 accuracy of finding each sentence's English translation, per language, plus avg and worst."""
    from raysparse.data.metrics import aggregate

    per_language = {}
    for lang, (source, target) in pairs.items():
        per_language[lang] = {"accuracy": top1_accuracy(encode(model, tokenizer, source, batch_size),
                                                        encode(model, tokenizer, target, batch_size))}
    return aggregate(per_language, "tatoeba")


def recover(model, batches: list, steps: int, learning_rate: float, seed: int = 0, log_every: int = 10) -> list[float]:
    """Fine-tune a (shrunk) model with the contrastive loss; returns the loss curve."""
    if steps <= 0:
        return []
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    model.train()
    losses, started = [], time.time()
    for step in range(steps):
        loss = contrastive_loss(model, batches[step % len(batches)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            elapsed = time.time() - started
            eta = elapsed / (step + 1) * (steps - step - 1)
            print(f"  recover step {step + 1}/{steps}  loss {loss:.4f}  eta {eta:.0f}s", flush=True)
    model.eval()
    return losses


def prune(model: str = EMBEDDED, sparsity: float = 0.5, algorithm: str = "gradient", *,
          languages: list[str] | None = None, scoring_data: str = "xnli", scoring_pairs: int = 256,
          batch_size: int = 16, steps: int = 1, scope: str = "global", normalize: str = "l2", round_to: int = 1,
          recover_steps: int = 0, learning_rate: float = 3e-5, eval_pairs: int = 200, seed: int = 0,
          sequence_length: int = 128, out: str | Path | None = None, data_dir: str | None = None,
          verbose: bool = True) -> PruneResult:
    """Prune ``model`` to ``sparsity`` with ``algorithm`` and report size and Tatoeba quality."""
    from raysparse.data.parallel import parallel_pairs, tatoeba_pairs

    check_sparsity(sparsity)
    expect(scoring_data in SCORING_SOURCES, f"scoring_data: expected one of {SCORING_SOURCES}, got {scoring_data!r}")
    selection = Selection(scope=scope, normalize=normalize, round_to=round_to)
    importance = get_algorithm(algorithm, **({"seed": seed} if algorithm == "random" else {}))
    say = print if verbose else (lambda *a, **k: None)
    seconds = {}

    started = time.time()
    evaluation = tatoeba_pairs(languages, max_pairs=eval_pairs, data_dir=data_dir) if eval_pairs else {}
    languages = sorted(evaluation) if evaluation else languages
    sources, targets = parallel_pairs(scoring_data, languages, max_pairs=scoring_pairs, seed=seed, data_dir=data_dir)
    if not sources:
        raise RaysparseError(f"scoring_data: no {scoring_data} pairs found for languages {languages}")
    encoder, tokenizer = load_encoder(model), load_tokenizer(model)
    batches = pair_batches(tokenizer, sources, targets, batch_size)
    seconds["load"] = time.time() - started
    say(f"loaded {model}: {len(sources)} {scoring_data} pairs for scoring ({len(batches)} batches), "
        f"{len(evaluation)} Tatoeba languages for evaluation")

    dense_size = measure(encoder, sequence_length)
    quality = {}
    if evaluation:
        started = time.time()
        quality["dense"] = tatoeba_quality(encoder, tokenizer, evaluation)
        seconds["evaluate_dense"] = time.time() - started
        say(f"dense Tatoeba avg {quality['dense']['tatoeba/avg/accuracy']:.3f} ({seconds['evaluate_dense']:.0f}s)")

    started = time.time()
    say(f"scoring with {algorithm} ({steps} round{'s' if steps > 1 else ''}) to encoder sparsity {sparsity}")

    def between(mask: Mask, round_index: int) -> None:
        say(f"  round {round_index + 1}/{steps}: {mask.summary()}")

    history = prune_schedule(encoder, importance, sparsity, steps=steps,
                             batches_for=lambda r: _shuffled(batches, seed + r), loss_fn=contrastive_loss,
                             selection=selection, between=between)
    mask, scores = history[-1].mask, history[-1].scores
    seconds["score"] = time.time() - started
    shrink(encoder, mask)
    say(f"shrunk: {mask.summary()} ({seconds['score']:.0f}s)")

    if recover_steps:
        started = time.time()
        say(f"recovering for {recover_steps} steps")
        recover(encoder, batches, recover_steps, learning_rate, seed)
        seconds["recover"] = time.time() - started

    pruned_size = measure(encoder, sequence_length)
    if evaluation:
        started = time.time()
        quality["pruned"] = tatoeba_quality(encoder, tokenizer, evaluation)
        seconds["evaluate_pruned"] = time.time() - started

    out_dir = None
    if out is not None:
        out_dir = save_pruned(encoder, out, tokenizer=tokenizer,
                              extra={"algorithm": algorithm, "sparsity": sparsity, "source": model})
        mask.save(out_dir / "mask.json")
        scores.save(out_dir / "scores.safetensors")
        (out_dir / "result.json").write_text(json.dumps(
            {"dense": dense_size.as_dict(), "pruned": pruned_size.as_dict(), "quality": quality,
             "seconds": seconds, "settings": {"algorithm": algorithm, "sparsity": sparsity, "steps": steps,
                                              "scope": scope, "normalize": normalize, "round_to": round_to,
                                              "scoring_data": scoring_data, "recover_steps": recover_steps,
                                              "seed": seed, "languages": languages}}, indent=2))
    return PruneResult(out_dir, mask, scores, dense_size, pruned_size, quality, seconds)


def _shuffled(items: list, seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


__all__ = ["PruneResult", "prune", "recover", "tatoeba_quality"]
