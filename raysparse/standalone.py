"""`raysparse prune`: one-shot or iterative pruning of an encoder for retrieval, in this process.

It builds a run spec from its arguments (:func:`prune_spec`) and executes the run pipeline
without Ray or MLflow: score (any registered algorithm) -> select a mask -> shrink
physically -> optionally recover on XNLI translation pairs -> evaluate Tatoeba, dense and
pruned -> measure -> save. ``raysparse run`` executes the very same stages on Ray Train.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from raysparse.config import RunSpec, parse
from raysparse.metric_keys import avg_key, languages_in, metric_key, worst_key
from raysparse.models.sources import EMBEDDED
from raysparse.paths import check_output
from raysparse.pruning import UnitScores
from raysparse.structure import Mask, Size, save_pruned
from raysparse.training.retrieval import encode, top1_accuracy
from raysparse.training.worker import SHARED

TASK, METRIC = "tatoeba", "accuracy"   # what `raysparse prune` evaluates


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
        for key in (avg_key(TASK, METRIC), worst_key(TASK, METRIC)):
            if key in self.quality.get("dense", {}):
                rows.append((key, f"{self.quality['dense'][key]:.3f}", f"{self.quality['pruned'][key]:.3f}"))
        width = max(len(r[0]) for r in rows)
        lines = [f"{'':{width}}  {'dense':>12}  {'pruned':>12}"]
        lines += [f"{name:{width}}  {a:>12}  {b:>12}" for name, a, b in rows]
        return "\n".join(lines)

    def language_table(self) -> str:
        dense, pruned = self.quality.get("dense", {}), self.quality.get("pruned", {})
        lines = [f"{'lang':6}  {'dense':>7}  {'pruned':>7}"]
        lines += [f"{lang:6}  {dense[metric_key(TASK, lang, METRIC)]:7.3f}  {pruned[metric_key(TASK, lang, METRIC)]:7.3f}"
                  for lang in languages_in(dense, TASK, METRIC)]
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


def prune_spec(model: str = EMBEDDED, sparsity: float = 0.5, algorithm: str = "gradient", *,
               languages: list[str] | None = None, scoring_pairs: int = 256, batch_size: int = 16, steps: int = 1,
               scope: str = "global", normalize: str = "l2", round_to: int = 1, head_ratio: float = 1.0,
               recover_steps: int = 0,
               learning_rate: float = 3e-5, eval_pairs: int = 200, seed: int = 0, sequence_length: int = 128,
               data_dir: str | None = None, latency: bool = True, tune_masks: bool = False,
               latency_ms: float | None = None, speedup: float | None = None) -> RunSpec:
    """The run spec ``raysparse prune`` executes: Tatoeba, no fine-tuning, XNLI translation pairs
    for scoring and recovery, the dense model evaluated beside the pruned one, nothing tracked.
    ``head_ratio``: heads lose that multiple of the target share of their units, neurons the rest
    (``pruning.head_ratio``). ``tune_masks``: rescale the kept units by least squares after the shrink
    (``pruning.mask_tuning``).
    ``latency_ms`` or ``speedup``: prune to that predicted latency at batch 1 instead of ``sparsity``
    (``pruning.latency_target``; ``sparsity`` must then stay at its default)."""
    target = {name: value for name, value in (("ms", latency_ms), ("speedup", speedup)) if value is not None}
    return parse(RunSpec, {
        "name": "prune", "seed": seed, "model": {"source": model},
        "data": {"task": "tatoeba", "dir": data_dir, "languages": languages, "max_eval_examples": eval_pairs,
                 "evaluate_dense": True},
        "finetune": {"steps": 0, "batch_size": batch_size},
        "pruning": {"algorithm": algorithm, "sparsity": sparsity, "scope": scope, "normalize": normalize,
                    "round_to": round_to, "head_ratio": head_ratio, "scoring_examples": scoring_pairs,
                    "mask_tuning": {"enabled": tune_masks},
                    **({"schedule": "iterative", "iterations": steps} if steps > 1 else {}),
                    **({"latency_target": target} if target else {})},
        "recovery": {"steps": recover_steps, "learning_rate": learning_rate},
        "efficiency": {"sequence_length": sequence_length, "latency": latency},
        "tracking": {"log_models": "none"},
    })


def prune(model: str = EMBEDDED, sparsity: float = 0.5, algorithm: str = "gradient", *,
          languages: list[str] | None = None, scoring_pairs: int = 256, batch_size: int = 16, steps: int = 1,
          scope: str = "global", normalize: str = "l2", round_to: int = 1, head_ratio: float = 1.0,
          recover_steps: int = 0,
          learning_rate: float = 3e-5, eval_pairs: int = 200, seed: int = 0, sequence_length: int = 128,
          out: str | Path | None = None, data_dir: str | None = None, latency: bool = True,
          tune_masks: bool = False, latency_ms: float | None = None, speedup: float | None = None,
          verbose: bool = True) -> PruneResult:
    """Prune ``model`` to ``sparsity`` with ``algorithm`` and report size and Tatoeba quality.

    The pipeline of ``raysparse run`` executed in this process (:func:`prune_spec` says which
    spec): the same spec and seed through ``raysparse run`` give the same mask and metrics.
    """
    from raysparse.runner import run_in_process

    spec = prune_spec(model, sparsity, algorithm, languages=languages, scoring_pairs=scoring_pairs,
                      batch_size=batch_size, steps=steps, scope=scope, normalize=normalize, round_to=round_to,
                      head_ratio=head_ratio, recover_steps=recover_steps, learning_rate=learning_rate,
                      eval_pairs=eval_pairs, seed=seed,
                      sequence_length=sequence_length, data_dir=data_dir, latency=latency, tune_masks=tune_masks,
                      latency_ms=latency_ms, speedup=speedup)
    if out is not None:
        check_output(out, model)
    with contextlib.redirect_stdout(sys.stdout if verbose else io.StringIO()):
        pipeline = run_in_process(spec)
    metrics = pipeline.state.metrics
    task = f"{spec.data.task}/"
    quality = {"dense": {k.removeprefix("dense/"): v for k, v in metrics.items() if k.startswith(f"dense/{task}")},
               "pruned": {k: v for k, v in metrics.items() if k.startswith(task)}}
    seconds = {k.split("/")[1]: v for k, v in metrics.items() if k.startswith("cost/") and k.endswith("/wall_s")}
    mask, scores = pipeline.state.masks[SHARED], pipeline.state.scores[SHARED]
    dense_size, pruned_size = pipeline.sizes["dense"], pipeline.sizes[SHARED]
    encoder = pipeline.model.encoder.eval()
    out_dir = None
    if out is not None:
        out_dir = save_pruned(encoder, out, tokenizer=pipeline.tokenizer,
                              extra={"algorithm": algorithm, "sparsity": sparsity, "source": model})
        mask.save(out_dir / "mask.json")
        scores.save(out_dir / "scores.safetensors")
        (out_dir / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(), sort_keys=False))
        (out_dir / "result.json").write_text(json.dumps(
            {"dense": dense_size.as_dict(), "pruned": pruned_size.as_dict(), "quality": quality,
             "seconds": seconds, "speedup": {k: v for k, v in metrics.items() if k.startswith("speedup/")},
             "latency": {k: v for k, v in metrics.items() if k.startswith("latency/")},
             "settings": {"algorithm": algorithm, "sparsity": sparsity, "steps": steps, "scope": scope,
                          "normalize": normalize, "round_to": round_to, "head_ratio": head_ratio,
                          "recover_steps": recover_steps,
                          "seed": seed, "tune_masks": tune_masks,
                          "latency_target": spec.pruning.latency_target and spec.pruning.latency_target.model_dump(),
                          "languages": pipeline.languages["evaluation"]}}, indent=2))
    return PruneResult(out_dir, mask, scores, dense_size, pruned_size, quality, seconds)


__all__ = ["PruneResult", "prune", "prune_spec", "tatoeba_quality"]
