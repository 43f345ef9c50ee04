"""Evaluate a model on every language of a task: per-language metrics, avg and worst.

Each language is scored on its held-out rows (``raysparse.data.evaluation_data``: the
same rows in every regime, given seed and train fraction) with the task's metrics:
accuracy (XNLI, PAWS-X), entity F1 (PAN-X), token accuracy and macro F1 (UD-POS), SQuAD
F1/EM after post-processing (XQuAD, MLQA, TyDiQA), top-1 accuracy of mean-pooled
sentence embeddings (Tatoeba, xx -> en) and mined-pair F1 (BUCC).

Every task but BUCC also keeps the per-example statistics of its primary metric, from which
each language's, the average's and the worst language's bootstrap 95% interval is computed
(:mod:`raysparse.data.bootstrap`, 1000 resamples, seed 0) and added to the metrics as
``ci95_low/<task>/<lang>/<metric>`` and ``ci95_high/...``.

Retrieval needs no head: a bare encoder works. Every other kind needs a ``TaskModel``
with the task's head (see ``raysparse.training.batches.build_task_model``). With
``masks`` (language -> Mask), each language is evaluated under its own mask: the
per-language pruning setting.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from datasets import Dataset
from torch import nn

from raysparse.data.bootstrap import compact, example_form, examples_record, interval_metrics
from raysparse.data.kinds import Scores, kind_of
from raysparse.data.load import available_splits, load_bucc_corpus
from raysparse.data.load import languages as available_languages
from raysparse.data.metrics import aggregate, bucc_scores
from raysparse.data.regimes import LanguageData, evaluation_data
from raysparse.data.tasks import Task, get_task
from raysparse.errors import RaysparseError
from raysparse.metric_keys import AGGREGATES, avg_key, interval_of, metric_key, worst_key
from raysparse.models.heads import HEADS, TaskModel
from raysparse.models.sources import load_encoder, load_tokenizer
from raysparse.paths import data_dir as resolve_data_dir
from raysparse.structure import Mask, apply_mask, retrieval_prompt
from raysparse.structure.adapters import E5_PROMPT
from raysparse.training.batches import (
    default_max_length,
    feature_loader,
    model_device,
    num_labels_of,
    task_features,
    to_device,
)
from raysparse.training.retrieval import embed, tokenize

RETRIEVAL_PREFIX = E5_PROMPT  # e5's prompt; evaluate() asks the model (raysparse.structure.retrieval_prompt)


@dataclass
class EvaluationResult:
    """Scores of one task, per language and flattened for MLflow/Tune.

    ``per_language``: language -> metric -> value; ``metrics``: ``<task>/<lang>/<metric>``
    plus ``<task>/avg/<metric>`` and ``<task>/worst/<metric>``, and the primary metric's 95%
    intervals as ``ci95_low/<key>`` and ``ci95_high/<key>``; ``sources``: where each
    language's rows came from (file, whole or which part of a seeded split);
    ``examples``: rows scored per language (after ``max_examples``) and ``available``:
    the held-out rows there were; ``masked_languages``: those scored under their own mask;
    ``example_stats``: language -> the primary metric's per-example statistics, a compact list
    (one number per example, or one row of numbers; form :attr:`example_form`; empty for BUCC);
    ``skip_examples``: the rows skipped before the scored ones.
    """

    task: str
    per_language: dict[str, dict[str, float]]
    metrics: dict[str, float]
    sources: dict[str, str]
    examples: dict[str, int]
    available: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)
    masked_languages: list[str] = field(default_factory=list)
    example_stats: dict[str, list] = field(default_factory=dict)
    skip_examples: int = 0

    @property
    def languages(self) -> list[str]:
        return list(self.per_language)

    @property
    def masked(self) -> bool:
        return bool(self.masked_languages)

    @property
    def primary_metric(self) -> str:
        return get_task(self.task).primary_metric

    @property
    def average(self) -> float:
        """The task's primary metric averaged over languages."""
        return self.metrics[avg_key(self.task, self.primary_metric)]

    @property
    def worst(self) -> float:
        return self.metrics[worst_key(self.task, self.primary_metric)]

    @property
    def example_form(self) -> str | None:
        """How the per-example statistics make the primary metric (:mod:`raysparse.data.bootstrap`)."""
        return example_form(self.task)

    def interval(self, language: str) -> tuple[float, float] | None:
        """The primary metric's 95% interval for ``language`` (or ``avg``, ``worst``); None without statistics."""
        return interval_of(self.metrics, metric_key(self.task, language, self.primary_metric))

    def examples_record(self) -> dict | None:
        """The per-example statistics as a JSON-ready record (``results/examples.json``); None without them."""
        if not self.example_stats:
            return None
        return examples_record(self.task, self.example_stats, self.sources, self.skip_examples)

    def to_dict(self) -> dict:
        """Plain JSON-ready form (for a results artifact)."""
        return asdict(self)

    def table(self) -> str:
        """Per-language text table: metrics, examples scored, data file and part, and the primary metric's
        95% interval when there are per-example statistics; avg and worst last."""
        names = list(dict.fromkeys(m for scores in self.per_language.values() for m in scores))
        bounds = {language: self.interval(language) for language in [*self.per_language, *AGGREGATES]}
        shown = any(bounds.values())
        header = ["lang", *names, "examples", "data", *([f"95% interval ({self.primary_metric})"] if shown else [])]
        rows = []
        for language, scores in self.per_language.items():
            scored, held = self.examples[language], self.available[language]
            rows.append([language, *(f"{scores[m]:.3f}" if m in scores else "-" for m in names),
                         str(scored) if scored == held else f"{scored} of {held}",
                         _short_source(self.sources[language])])
        for summary in AGGREGATES:
            rows.append([summary, *(f"{self.metrics[metric_key(self.task, summary, m)]:.3f}" for m in names), "", ""])
        if shown:
            for row in rows:
                found = bounds[row[0]]
                row.append("" if found is None else f"[{found[0]:.3f}, {found[1]:.3f}]")
        widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) if i in (0, len(names) + 2) else cell.rjust(w)
                           for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                 for row in [header, *rows]]
        title = f"{self.task}: {len(self.per_language)} language{'s' if len(self.per_language) != 1 else ''}"
        if self.masked:
            unmasked = [language for language in self.per_language if language not in self.masked_languages]
            title += ", each under its own mask" + (f" (unmasked: {', '.join(unmasked)})" if unmasked else "")
        return "\n".join([title, *lines])


def _short_source(source: str) -> str:
    """``xnli/dev-de.tsv, eval part: 1245 of 2490 rows (...)`` -> ``xnli/dev-de.tsv eval part``."""
    head = source.split(" (")[0]
    label, _, part = head.partition(", ")
    if part.startswith("all "):
        return f"{label} whole"
    return f"{label} {part.split(':')[0]}" if part else label


def evaluate(
    model: nn.Module,
    tokenizer,
    task: str | Task,
    languages: Sequence[str] | str | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    max_examples: int | None = None,
    skip_examples: int = 0,
    batch_size: int = 32,
    seed: int = 0,
    train_fraction: float = 0.5,
    masks: Mapping[str, Mask] | None = None,
    max_length: int | None = None,
    stride: int = 128,
    retrieval_prefix: str | None = None,
    verbose: bool = True,
) -> EvaluationResult:
    """Score ``model`` on the held-out rows of every language of ``task`` (default: all present).

    ``max_examples`` caps the rows scored per language (the first ones, so runs compare);
    ``skip_examples`` starts after that many rows, so settings can be chosen on rows that a
    reported figure (on the first rows) never sees.
    ``seed`` and ``train_fraction`` must be those training used, so that no training row
    is evaluated. ``masks`` maps languages to the Mask applied while that language is
    scored; a language without one is scored unmasked (the table says which), masks of
    languages not evaluated are ignored. Retrieval prepends ``retrieval_prefix`` to every
    sentence (default: the model's retrieval prompt, ``raysparse.structure.retrieval_prompt``).
    """
    task = get_task(task)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise RaysparseError(f"evaluate.max_examples: {max_examples!r} (expected a positive integer or None)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise RaysparseError(f"evaluate.batch_size: {batch_size!r} (expected a positive integer)")
    check_head(model, task)
    if retrieval_prefix is None and kind_of(task).embeds:
        retrieval_prefix = retrieval_prompt(model)
    if languages is None:
        languages = available_languages(task, data_dir)
    data = evaluation_data(task, languages, seed, train_fraction, data_dir)
    masks = dict(masks or {})
    say = print if verbose else (lambda *args, **kwargs: None)
    max_length = max_length or default_max_length(task)
    per_language: dict[str, dict[str, float]] = {}
    stats: dict = {}
    examples: dict[str, int] = {}
    available: dict[str, int] = {}
    seconds: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        for language, language_data in data.items():
            started = time.time()
            available[language] = len(language_data.rows)
            rows = evaluated_rows(language_data.rows, task, language, max_examples, skip_examples)
            examples[language] = len(rows)
            mask = masks.get(language)
            masked = apply_mask(model, mask) if mask is not None else contextlib.nullcontext()
            with masked, torch.inference_mode():
                scores = _score(model, tokenizer, task, rows, language_data, data_dir=data_dir,
                                max_examples=max_examples, batch_size=batch_size, max_length=max_length,
                                stride=stride, prefix=retrieval_prefix)
            per_language[language] = scores.metrics
            if scores.examples is not None:
                stats[language] = scores.examples
            seconds[language] = time.time() - started
            shown = "  ".join(f"{name} {value:.3f}" for name, value in per_language[language].items())
            say(f"  {task.name} {language}: {examples[language]} examples  {shown}  ({seconds[language]:.1f}s)",
                flush=True)
    finally:
        model.train(was_training)
    metrics = aggregate(per_language, task.name)
    form = example_form(task)
    if form is not None and stats:
        metrics.update(interval_metrics(task.name, task.primary_metric, form, stats))
    return EvaluationResult(task.name, per_language, metrics,
                            {language: d.source for language, d in data.items()}, examples, available, seconds,
                            [language for language in data if language in masks],
                            {language: compact(values, digits=None) for language, values in stats.items()},
                            skip_examples)


def evaluated_rows(rows: Dataset, task: Task, language: str, max_examples: int | None,
                   skip_examples: int) -> Dataset:
    """The rows of a language that are scored: ``skip_examples`` rows skipped, then at most ``max_examples``."""
    if skip_examples or (max_examples is not None and len(rows) > max_examples):
        end = len(rows) if max_examples is None else min(len(rows), skip_examples + max_examples)
        if skip_examples >= end:
            raise RaysparseError(f"evaluate.skip_examples: {skip_examples} leaves no rows of "
                                 f"{task.name} {language} (it has {len(rows)})")
        rows = rows.select(range(skip_examples, end))
    return rows


def evaluate_model(source: str, task: str | Task, languages: Sequence[str] | None = None, *,
                   tokenizer: str | None = None, data_dir: str | os.PathLike | None = None,
                   **options) -> EvaluationResult:
    """:func:`evaluate` the model at ``source`` ('embedded', a model folder, a hub id), with the tokenizer of
    ``tokenizer`` (default: ``source``'s); ``options`` are :func:`evaluate`'s.

    The task, languages and data folder are checked before the model loads, and the model's head before its
    tokenizer does, so that a bad input costs one line and no loading.
    """
    task = get_task(task)
    for language in languages or []:
        available_splits(task, language, data_dir)
    resolve_data_dir(data_dir)
    model = load_encoder(source)
    check_head(model, task)
    return evaluate(model, load_tokenizer(tokenizer or source), task, languages, data_dir=data_dir, **options)


def check_head(model: nn.Module, task: str | Task) -> None:
    """Raise one line unless ``model`` can be scored on ``task`` (retrieval: any encoder)."""
    task = get_task(task)
    if kind_of(task).embeds:
        return
    if not isinstance(model, TaskModel) or model.kind != task.kind or model.num_labels != num_labels_of(task):
        has = (f"a {model.kind} head with {model.num_labels} labels" if isinstance(model, TaskModel)
               else f"a bare {type(model).__name__} without a task head")
        raise RaysparseError(
            f"evaluate.model: task '{task.name}' needs a trained {task.kind} head"
            f"{f' with {num_labels_of(task)} labels' if num_labels_of(task) else ''}, but the model has {has} "
            "(expected a TaskModel fine-tuned on the task, e.g. a folder written by save_pruned after finetune)"
        )


# --- scoring one language ----------------------------------------------------------------------


def _score(model, tokenizer, task: Task, rows: Dataset, data: LanguageData, *, data_dir, max_examples, batch_size,
           max_length, stride, prefix) -> Scores:
    if task.name == "bucc":   # mined pairs: no per-example statistics
        return Scores(_score_bucc(model, tokenizer, data, data_dir, max_examples, batch_size, max_length, prefix))
    kind = kind_of(task)
    if kind.embeds:
        embeddings = {side: _embed_texts(model, tokenizer, list(rows[side]), batch_size, prefix, max_length).numpy()
                      for side in ("source", "target")}
        return kind.score(task, rows, None, embeddings)
    features = task_features(task, tokenizer, rows, train=False, max_length=max_length, stride=stride)
    return kind.score(task, rows, features, _forward(model, tokenizer, features, batch_size))


def _forward(model: nn.Module, tokenizer, features: Dataset, batch_size: int) -> dict[str, list[np.ndarray]]:
    """Each feature row's outputs, unpadded (tokens beyond its own length cut off).

    Rows are batched in order of length, so little compute goes to padding; outputs
    come back in the rows' own order.
    """
    lengths_of = [len(ids) for ids in features["input_ids"]]
    order = sorted(range(len(features)), key=lengths_of.__getitem__)
    loader = feature_loader(features, tokenizer, batch_size, shuffle=False, sampler=order)
    device = model_device(model)
    head = HEADS[model.kind]
    keys = head.output_keys
    outputs: dict[str, list] = {key: [None] * len(features) for key in keys}
    position = 0
    for batch in loader:
        lengths = batch["attention_mask"].sum(1).tolist()
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        result = model(**to_device(inputs, device))
        for key in keys:
            values = result[key].float().cpu().numpy()
            for offset, (row, length) in enumerate(zip(values, lengths)):
                index = order[position + offset]
                outputs[key][index] = row[: int(length)] if head.per_token else row
        position += len(lengths)
    return outputs


def _embed_texts(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int, prefix: str,
                 max_length: int) -> torch.Tensor:
    """Normalised mean-pooled embeddings (on the CPU) of ``texts``, batched by length.

    A TaskModel is embedded through its encoder, whatever its head.
    """
    encoder = model.encoder if isinstance(model, TaskModel) else model
    device = model_device(encoder)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: torch.Tensor | None = None
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        encoded = tokenize(tokenizer, [texts[i] for i in index], prefix, max_length)
        embeddings = embed(encoder, to_device(encoded, device)).float().cpu()
        if out is None:
            out = torch.empty(len(texts), embeddings.shape[1])
        out[index] = embeddings
    if out is None:
        raise RaysparseError("evaluate: no sentences to embed (expected at least one)")
    return out


def _score_bucc(model, tokenizer, data: LanguageData, data_dir, max_examples, batch_size, max_length,
                prefix) -> dict[str, float]:
    """Mine (source, English) pairs by cosine nearest neighbour; threshold = the best-F1 one.

    As XTREME does on BUCC dev, the similarity threshold is chosen where F1 against the
    gold pairs is highest (an oracle threshold); ``max_examples`` caps source sentences.
    """
    corpus = load_bucc_corpus(data.language, data.file_split, data_dir)
    source_ids = list(corpus.source)[:max_examples] if max_examples else list(corpus.source)
    target_ids = list(corpus.target)
    source = _embed_texts(model, tokenizer, [corpus.source[i] for i in source_ids], batch_size, prefix, max_length)
    target = _embed_texts(model, tokenizer, [corpus.target[i] for i in target_ids], batch_size, prefix, max_length)
    kept = set(source_ids)
    gold = [(s, t) for s, t in corpus.gold if s in kept]
    best_score, best_target = torch.zeros(len(source_ids)), torch.zeros(len(source_ids), dtype=torch.long)
    for start in range(0, len(source_ids), 1024):
        similarity = source[start : start + 1024] @ target.T
        best_score[start : start + 1024], best_target[start : start + 1024] = similarity.max(dim=1)
    order = best_score.argsort(descending=True).tolist()
    gold_set = set(gold)
    best = {"f1": 0.0, "precision": 0.0, "recall": 0.0}
    correct = 0
    for mined, index in enumerate(order, start=1):
        correct += (source_ids[index], target_ids[int(best_target[index])]) in gold_set
        if correct and gold:
            precision, recall = correct / mined, correct / len(gold)
            f1 = 2 * precision * recall / (precision + recall)
            if f1 > best["f1"]:
                best = {"f1": f1, "precision": precision, "recall": recall}
    if not gold:
        predicted = [(source_ids[i], target_ids[int(best_target[i])]) for i in order]
        return bucc_scores(predicted, gold)
    return best


__all__ = ["EvaluationResult", "RETRIEVAL_PREFIX", "check_head", "evaluate", "evaluate_model"]
