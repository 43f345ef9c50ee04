"""The last stage of a run (rank 0): shrink physically, measure, save, log artifacts."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import yaml

from raysparse.metric_keys import AVG, avg_key, languages_in, metric_key
from raysparse.structure import measure, retrieval_prompt, save_pruned, shrink


def quality_plot(metrics: dict, task: str, metric: str):
    """Bar chart of the final per-language quality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = languages_in(metrics, task, metric)
    figure, axis = plt.subplots(figsize=(max(4, 0.45 * len(langs) + 1), 3))
    axis.bar(langs, [metrics[metric_key(task, lang, metric)] for lang in langs], color="#4c72b0")
    if avg_key(task, metric) in metrics:
        axis.axhline(metrics[avg_key(task, metric)], color="#c44e52", linestyle="--", label=AVG)
        axis.legend()
    axis.set_ylabel(metric)
    axis.set_title(f"{task}: {metric} per language")
    figure.tight_layout()
    return figure


def stage_costs(run) -> dict[str, float]:
    """Wall and CPU seconds per stage so far (``cost/<stage>/{wall,cpu}_s``), for the run's record."""
    return {k: v for k, v in run.state.metrics.items() if k.startswith("cost/")}


def vocabulary_languages(run) -> list[str]:
    """The languages whose text decides the kept vocabulary: every evaluation and training
    language plus English, as far as the local Tatoeba and XNLI text covers them."""
    from raysparse.data.vocabulary import languages_with_text

    present = set(languages_with_text(data_dir=run.spec.data.dir))
    wanted = {"en", *run.languages.get("evaluation", []), *run.languages.get("finetune", []),
              *run.languages.get("scoring", [])}
    return sorted(wanted & present)


def trim_shrunk_vocabulary(run, shrunk: dict) -> tuple[object, int]:
    """``efficiency.trim_vocabulary``: keep the embedding rows the run's languages use (in place).

    Quality was measured before trimming; on text whose pieces were all kept the trimmed
    model computes exactly what the untrimmed one does (raysparse.structure.vocab).
    Returns the trimmed tokenizer and the number of rows kept.
    """
    from raysparse.data.vocabulary import vocabulary_for_languages
    from raysparse.structure.vocab import trim_vocabulary

    kept = vocabulary_for_languages(run.tokenizer, vocabulary_languages(run), prefix=retrieval_prompt(run.model),
                                    data_dir=run.spec.data.dir)
    tokenizer = run.tokenizer
    for key, model in shrunk.items():
        _, tokenizer = trim_vocabulary(model, run.tokenizer, kept)
    return tokenizer, len(tokenizer)


def dense_encoder(run):
    """The encoder as the run received it, before pruning (the run's own model is shrunk by now):
    the distillation teacher's when there is one, else loaded again from the source (its shape
    is what sizes and latency compare against)."""
    if run.teacher is not None:
        return run.teacher.encoder
    from raysparse.models.sources import load_encoder

    return load_encoder(run.spec.model.source, trust_remote_code=run.spec.model.trust_remote_code)


def finalize(run) -> dict:
    """Shrink a copy per mask, measure size and latency, save the model(s) and log everything."""
    from raysparse.efficiency import measure_latency, median_speedups

    spec, log = run.spec, run.log
    length = spec.efficiency.sequence_length
    metrics: dict[str, float] = {}
    dense = dense_encoder(run).eval()
    dense_size = measure(dense, length)
    shrunk = {key: shrink(copy.deepcopy(run.model).eval(), mask) for key, mask in run.state.masks.items()}
    tokenizer = run.tokenizer
    if spec.efficiency.trim_vocabulary:
        tokenizer, vocab_rows = trim_shrunk_vocabulary(run, shrunk)
        metrics["vocab_rows"] = vocab_rows
    sizes = {key: measure(model.encoder, length) for key, model in shrunk.items()}
    run.sizes = {"dense": dense_size, **sizes}
    first = sorted(shrunk)[0]
    size = sizes[first]
    metrics.update({
        "encoder_sparsity": sum(s.encoder_sparsity for s in sizes.values()) / len(sizes),
        "params/total": size.total_params, "params/encoder": size.encoder_params,
        "params/embedding": size.embedding_params, "bytes": size.bytes, "flops": size.flops_per_sequence,
        "dense/params/total": dense_size.total_params, "dense/bytes": dense_size.bytes,
        "dense/flops": dense_size.flops_per_sequence,
    })
    if spec.efficiency.latency:
        results = measure_latency({"dense": dense, "pruned": shrunk[first].encoder},
                                  batch_sizes=tuple(spec.efficiency.batch_sizes), sequence_length=length,
                                  warmup=spec.efficiency.warmup, repeats=spec.efficiency.repeats,
                                  threads=spec.efficiency.threads)
        for result in results:
            metrics[f"latency/{result.name}/b{result.batch_size}_ms"] = result.median_ms
        for (name, batch), speedup in median_speedups(results, "dense").items():
            if name == "pruned":
                metrics[f"speedup/b{batch}"] = speedup
    log.metrics({**metrics, **stage_costs(run)})
    with tempfile.TemporaryDirectory(prefix="raysparse-final-") as folder:
        folder = Path(folder)
        (folder / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(), sort_keys=False))
        (folder / "sources.json").write_text(json.dumps(run.state.sources, indent=1))
        (folder / "sizes.json").write_text(json.dumps({"dense": dense_size.as_dict(),
                                                       **{k: s.as_dict() for k, s in sizes.items()}}, indent=1))
        for key, mask in run.state.masks.items():
            mask.save(folder / f"mask-{key}.json")
        for key, scores in run.state.scores.items():
            scores.save(folder / f"scores-{key}.safetensors")
        language_scores = {k: v for k, v in run.state.scores.items() if k != "shared"}
        if len(language_scores) > 1:   # per-language setting: overlap of masks and importance heat-map
            from raysparse.pruning.analysis import head_overlap, write_language_study
            from raysparse.structure import Encoder

            enc = Encoder(run.model)
            write_language_study(folder / "language_study", language_scores, spec.pruning.sparsity, enc.hidden_size,
                                 enc.head_dim, run.selection)
            overlap = head_overlap({k: m for k, m in run.state.masks.items() if k in language_scores})
            metrics["language_study/head_jaccard"] = overlap["heads"]["mean"]
            log.metrics({"language_study/head_jaccard": overlap["heads"]["mean"]})
        log.artifact(folder, "results")
        quality = {**run.state.metrics, **metrics}
        log.figure(quality_plot(quality, run.task.name, run.task.primary_metric), "results/per_language.png")
        keep = {"all": sorted(shrunk), "one": [first], "none": []}[spec.tracking.log_models]
        for key in keep:
            extra = {"mask": key, "task": run.task.name, "run": spec.name}
            if spec.tracking.lean_models:   # what the base model holds stays out (82% of e5-small)
                from raysparse.models.lean import save_lean
                from raysparse.models.sources import load_encoder

                model_dir = save_lean(shrunk[key], folder / "model" / key, spec.model.source, tokenizer, extra,
                                      load=load_encoder)
            else:
                model_dir = save_pruned(shrunk[key], folder / "model" / key, tokenizer=tokenizer, extra=extra)
            log.artifact(model_dir, f"model/{key}")
    return metrics
