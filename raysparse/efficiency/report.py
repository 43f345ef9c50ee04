"""Latency and size side by side: one row per model, batch size and device.

``bench`` measures physically shrunk models (masks do not speed anything up) the way
docs/METHOD.md's efficiency protocol asks: interleaved, warmed up, threads fixed, median and
p10-p90 of repeats, on CPU and on GPU where present; beside every latency it puts total,
encoder and embedding parameters, bytes in memory and on disk, resident memory of a
fresh process, FLOPs and the environment. The first model is the baseline: speedups
and FLOP ratios are against it, and speedup / FLOP ratio says how much of the FLOPs a
model removed turned into time saved. A report prints as a table, round-trips through
CSV, plots, and logs to MLflow when a run is active.
"""

from __future__ import annotations

import csv
import dataclasses
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from raysparse.efficiency.latency import environment, measure_latency
from raysparse.efficiency.memory import ResidentMemory, folder_bytes, resident_memory
from raysparse.errors import RaysparseError, expect
from raysparse.models.sources import load_encoder
from raysparse.structure import Encoder, Size, measure, save_pruned

POSITION_OFFSET_TYPES = ("roberta", "xlm-roberta", "camembert")   # positions start after the padding id


@dataclass(frozen=True)
class BenchRow:
    """One model at one batch size on one device, with its size and the environment."""

    model: str
    device: str
    batch_size: int
    sequence_length: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    speedup: float                  # baseline median / this median, same batch size and device
    flop_ratio: float               # baseline encoder FLOPs / these
    speedup_per_flop_ratio: float
    total_params: int
    encoder_params: int
    embedding_params: int
    vocab_rows: int
    encoder_sparsity: float
    param_bytes: int
    disk_bytes: int | None
    flops_per_sequence: int
    rss_baseline_bytes: int | None
    rss_loaded_bytes: int | None
    rss_peak_load_bytes: int | None
    rss_peak_forward_bytes: int | None
    memory_method: str | None
    repeats: int
    warmup: int
    threads: int
    dtype: str
    torch: str

    @property
    def rss_model_bytes(self) -> int | None:
        """Resident memory that holding the model adds to a fresh process."""
        if self.rss_loaded_bytes is None or self.rss_baseline_bytes is None:
            return None
        return self.rss_loaded_bytes - self.rss_baseline_bytes

    @property
    def rss_forward_bytes(self) -> int | None:
        """Resident memory that running the model adds, at its peak."""
        if self.rss_peak_forward_bytes is None or self.rss_baseline_bytes is None:
            return None
        return self.rss_peak_forward_bytes - self.rss_baseline_bytes

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = [f.name for f in dataclasses.fields(BenchRow)]


def _parse(text: str, annotation: str):
    optional = "None" in annotation
    if optional and text == "":
        return None
    base = annotation.replace("| None", "").strip()
    return {"int": int, "float": float, "str": str}[base](text)


def _format(value) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def read_csv(path: str | Path) -> list[BenchRow]:
    """Rows written by :meth:`BenchReport.to_csv`, with their types."""
    path = Path(path)
    if not path.is_file():
        raise RaysparseError(f"bench: {path} does not exist (expected a CSV written by raysparse bench)")
    types = {f.name: f.type for f in dataclasses.fields(BenchRow)}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [name for name in FIELDS if name not in (reader.fieldnames or [])]
        expect(not missing, f"bench: {path} lacks the columns {missing[:3]} (not a raysparse bench CSV)")
        return [BenchRow(**{name: _parse(row[name], types[name]) for name in FIELDS}) for row in reader]


@dataclass
class BenchReport:
    rows: list[BenchRow]
    environment: dict

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(r.model for r in self.rows))

    def row(self, model: str, batch_size: int, device: str | None = None) -> BenchRow:
        for r in self.rows:
            if r.model == model and r.batch_size == batch_size and (device is None or r.device == device):
                return r
        raise KeyError((model, batch_size, device))

    def table(self) -> str:
        env = self.environment
        lines = [f"environment: torch {env.get('torch')}, threads {env.get('threads')}, devices "
                 f"{', '.join(env.get('devices', []))}{', ' + env['gpu'] if env.get('gpu') else ''}, "
                 f"dtypes {', '.join(env.get('dtypes', []))}, {env.get('processor')}, python {env.get('python')}"]
        first = {}
        for r in self.rows:
            first.setdefault(r.model, r)
        size_rows = [("model", "params", "encoder", "embedding", "vocab", "bytes", "disk", "size ratio",
                      f"GFLOPs/seq@{self.rows[0].sequence_length}", "RSS model", "RSS fwd")]
        base = next(iter(first.values()))
        for name, r in first.items():
            size_rows.append((name, _millions(r.total_params), _millions(r.encoder_params),
                              _millions(r.embedding_params), str(r.vocab_rows), _mb(r.param_bytes), _mb(r.disk_bytes),
                              f"{r.param_bytes / base.param_bytes:.3f}", f"{r.flops_per_sequence / 1e9:.2f}",
                              _mb(r.rss_model_bytes), _mb(r.rss_forward_bytes)))
        lines += ["", *_columns(size_rows)]
        latency_rows = [("model", "device", "batch", "median ms", "p10-p90 ms", "speedup", "FLOP ratio",
                         "speedup/FLOP ratio")]
        for r in self.rows:
            latency_rows.append((r.model, r.device, str(r.batch_size), f"{r.median_ms:.2f}",
                                 f"{r.p10_ms:.1f}-{r.p90_ms:.1f}", f"{r.speedup:.2f}", f"{r.flop_ratio:.2f}",
                                 f"{r.speedup_per_flop_ratio:.2f}"))
        lines += ["", *_columns(latency_rows)]
        if base.memory_method:
            lines += ["", "RSS: resident memory a fresh process adds by holding the model / at its peak in one "
                          f"forward pass at batch {max(r.batch_size for r in self.rows)} ({base.memory_method})"]
        return "\n".join(lines)

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=FIELDS)
            writer.writeheader()
            for r in self.rows:
                writer.writerow({k: _format(v) for k, v in r.as_dict().items()})
        return path

    def plot(self, path: str | Path) -> Path:
        """Latency per batch size (median, p10-p90) and size against speedup: fast is not necessarily small."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        models = self.models
        groups = list(dict.fromkeys((r.device, r.batch_size) for r in self.rows))
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        width = 0.8 / len(models)
        for k, name in enumerate(models):
            rows = [self.row(name, b, d) for d, b in groups]
            xs = [g + (k - (len(models) - 1) / 2) * width for g in range(len(groups))]
            medians = [r.median_ms for r in rows]
            spread = [[r.median_ms - r.p10_ms for r in rows], [r.p90_ms - r.median_ms for r in rows]]
            left.bar(xs, medians, width, yerr=spread, capsize=3, label=name)
        left.set_xticks(range(len(groups)), [f"{d}\nbatch {b}" for d, b in groups])
        left.set_ylabel(f"median latency, ms (p10-p90), length {self.rows[0].sequence_length}")
        left.set_yscale("log")
        left.legend(fontsize=8)
        device, batch = groups[-1]
        for name in models:
            r = self.row(name, batch, device)
            size = r.disk_bytes if r.disk_bytes is not None else r.param_bytes
            right.scatter(size / 1e6, r.speedup)
            right.annotate(name, (size / 1e6, r.speedup), fontsize=8, xytext=(4, 4), textcoords="offset points")
        right.set_xlabel("bytes on disk, MB" if self.rows[0].disk_bytes is not None else "parameter bytes, MB")
        right.set_ylabel(f"speedup vs {models[0]} ({device}, batch {batch})")
        right.grid(alpha=0.3)
        fig.suptitle(f"torch {self.environment.get('torch')}, {self.environment.get('threads')} threads")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def log_to_mlflow(self) -> bool:
        """Params, metrics and artifacts into the active MLflow run; nothing (False) without one."""
        mlflow = sys.modules.get("mlflow")       # no run can be active if nobody imported mlflow
        if mlflow is None or mlflow.active_run() is None:
            return False
        r0 = self.rows[0]
        params = {"bench/models": ",".join(self.models),
                  "bench/batch_sizes": ",".join(str(b) for b in self.batch_sizes),
                  "bench/sequence_length": r0.sequence_length, "bench/repeats": r0.repeats, "bench/warmup": r0.warmup,
                  "bench/threads": r0.threads, "bench/devices": ",".join(self.environment.get("devices", [])),
                  "bench/torch": r0.torch, "bench/dtypes": ",".join(self.environment.get("dtypes", []))}
        try:
            mlflow.log_params(params)
        except Exception as exc:  # a param logged before with another value; metrics still go in
            print(f"warning: bench params not logged to MLflow ({type(exc).__name__})", file=sys.stderr)
        metrics = {}
        for r in self.rows:
            key = f"bench/{_metric_name(r.model)}"
            metrics.update({f"{key}/total_params": r.total_params, f"{key}/encoder_params": r.encoder_params,
                            f"{key}/embedding_params": r.embedding_params, f"{key}/param_bytes": r.param_bytes,
                            f"{key}/flops_per_sequence": r.flops_per_sequence,
                            f"{key}/encoder_sparsity": r.encoder_sparsity})
            if r.disk_bytes is not None:
                metrics[f"{key}/disk_bytes"] = r.disk_bytes
            if r.rss_model_bytes is not None:
                metrics[f"{key}/rss_model_bytes"] = r.rss_model_bytes
                metrics[f"{key}/rss_forward_bytes"] = r.rss_forward_bytes
            at = f"{key}/{r.device}/b{r.batch_size}"
            metrics.update({f"{at}/median_ms": r.median_ms, f"{at}/p10_ms": r.p10_ms, f"{at}/p90_ms": r.p90_ms,
                            f"{at}/speedup": r.speedup, f"{at}/speedup_per_flop_ratio": r.speedup_per_flop_ratio})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        with tempfile.TemporaryDirectory(prefix="raysparse-bench-") as tmp:
            mlflow.log_artifact(str(self.to_csv(Path(tmp) / "bench.csv")), artifact_path="bench")
            mlflow.log_artifact(str(self.plot(Path(tmp) / "bench.png")), artifact_path="bench")
            mlflow.log_dict(self.environment, "bench/environment.json")
        return True

    @property
    def batch_sizes(self) -> list[int]:
        return list(dict.fromkeys(r.batch_size for r in self.rows))


def _metric_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\- ]", "_", name).strip("_") or "model"


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}MB"


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows]


def model_labels(sources: list[str]) -> list[str]:
    """Short, distinct names for models given as sources: a folder's name, or the source itself."""
    labels = []
    for source in sources:
        label = Path(source).name if ("/" in source or source.startswith((".", "~"))) else source
        label = label or source
        candidate, n = label, 2
        while candidate in labels:
            candidate, n = f"{label}#{n}", n + 1
        labels.append(candidate)
    return labels


def default_devices() -> list[str]:
    """CPU, and the GPU when one is present."""
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def check_settings(batch_sizes, sequence_length: int, repeats: int, warmup: int, threads: int | None,
                   devices) -> None:
    """One-line errors for settings that cannot be measured."""
    expect(len(batch_sizes) > 0 and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in batch_sizes),
           f"bench.batch_sizes: expected positive integers, got {list(batch_sizes)}")
    expect(isinstance(sequence_length, int) and sequence_length >= 1,
           f"bench.sequence_length: expected a positive integer, got {sequence_length!r}")
    expect(isinstance(repeats, int) and repeats >= 1, f"bench.repeats: expected an integer >= 1, got {repeats!r}")
    expect(isinstance(warmup, int) and warmup >= 0, f"bench.warmup: expected an integer >= 0, got {warmup!r}")
    expect(threads is None or (isinstance(threads, int) and threads >= 1),
           f"bench.threads: expected a positive integer, got {threads!r}")
    for device in devices:
        expect(device == "cpu" or (device.startswith("cuda") and torch.cuda.is_available()),
               f"bench.devices: {device!r} is not available here (expected one of {', '.join(default_devices())})")


def _check_model(name: str, model: nn.Module, sequence_length: int) -> None:
    hooked = [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    if hooked:
        raise RaysparseError(f"bench: model {name!r} has forward hooks (at {hooked[0]!r}); masks do not speed anything "
                             "up, so only physically shrunk models are timed (use raysparse.structure.shrink)")
    config = Encoder(model).config
    limit = config.max_position_embeddings
    if config.model_type in POSITION_OFFSET_TYPES and config.pad_token_id is not None:
        limit -= config.pad_token_id + 1
    expect(sequence_length <= limit, f"bench.sequence_length: {sequence_length} is longer than model {name!r} "
                                     f"accepts ({limit} positions)")


def _footprint(model: nn.Module, batch_size: int, sequence_length: int, threads: int | None,
               memory: bool) -> tuple[int, ResidentMemory | None]:
    """Bytes on disk of ``save_pruned``'s folder, and resident memory of a fresh process loading it."""
    with tempfile.TemporaryDirectory(prefix="raysparse-bench-") as tmp:
        save_pruned(model, tmp)
        disk = folder_bytes(tmp)
        resident = resident_memory(tmp, batch_size, sequence_length, threads) if memory else None
    return disk, resident


def bench(models: dict[str, nn.Module], batch_sizes=(1, 8), sequence_length: int = 128, *, warmup: int = 3,
          repeats: int = 20, threads: int | None = None, devices=None, disk: bool = True,
          memory: bool = True) -> BenchReport:
    """Measure ``models`` side by side; the first is the baseline (normally the dense model).

    ``devices`` defaults to CPU plus the GPU when present. ``disk`` saves each model to
    a temporary folder to count its bytes; ``memory`` (needs ``disk``) also measures the
    resident memory of a fresh process that loads that folder.
    """
    expect(bool(models), "bench: no models to measure")
    batch_sizes = list(batch_sizes)
    devices = list(devices) if devices else default_devices()
    check_settings(batch_sizes, sequence_length, repeats, warmup, threads, devices)
    for name, model in models.items():
        _check_model(name, model, sequence_length)
    sizes: dict[str, Size] = {name: measure(model, sequence_length) for name, model in models.items()}
    measured: dict[int, tuple] = {}          # one save (and one probe) per distinct module
    for model in models.values():
        if id(model) not in measured:
            measured[id(model)] = (_footprint(model, max(batch_sizes), sequence_length, threads, memory)
                                   if disk else (None, None))
    footprints = {name: measured[id(model)] for name, model in models.items()}
    results = []
    try:
        for device in devices:
            results += measure_latency(models, batch_sizes, sequence_length, warmup, repeats, threads, device)
    finally:
        for model in models.values():
            model.to("cpu")
    baseline = next(iter(models))
    base_ms = {(r.device, r.batch_size): r.median_ms for r in results if r.name == baseline}
    rows = []
    for r in results:
        size, (disk_size, resident) = sizes[r.name], footprints[r.name]
        speedup = base_ms[(r.device, r.batch_size)] / r.median_ms
        flop_ratio = sizes[baseline].flops_per_sequence / max(size.flops_per_sequence, 1)
        rows.append(BenchRow(
            model=r.name, device=r.device, batch_size=r.batch_size, sequence_length=r.sequence_length,
            median_ms=r.median_ms, p10_ms=r.p10_ms, p90_ms=r.p90_ms, speedup=speedup, flop_ratio=flop_ratio,
            speedup_per_flop_ratio=speedup / flop_ratio, total_params=size.total_params,
            encoder_params=size.encoder_params, embedding_params=size.embedding_params,
            vocab_rows=Encoder(models[r.name]).base.get_input_embeddings().num_embeddings,
            encoder_sparsity=size.encoder_sparsity, param_bytes=size.bytes, disk_bytes=disk_size,
            flops_per_sequence=size.flops_per_sequence,
            rss_baseline_bytes=resident.baseline if resident else None,
            rss_loaded_bytes=resident.loaded if resident else None,
            rss_peak_load_bytes=resident.peak_load if resident else None,
            rss_peak_forward_bytes=resident.peak_forward if resident else None,
            memory_method=resident.method if resident else None,
            repeats=r.repeats, warmup=warmup, threads=r.threads, dtype=r.dtype, torch=torch.__version__))
    env = environment(devices[-1])
    env.update(devices=devices, threads=rows[0].threads, dtypes=sorted({r.dtype for r in rows}))
    return BenchReport(rows, env)


def bench_models(sources: list[str], batch_sizes=(1, 8), sequence_length: int = 128, *, warmup: int = 3,
                 repeats: int = 20, threads: int | None = None, devices=None, memory: bool = True) -> BenchReport:
    """:func:`bench` the models at ``sources`` ('embedded' or model folders, the first the baseline), named by
    :func:`model_labels`. The settings are checked before any model loads, so a bad one costs no loading."""
    devices = list(devices) if devices else default_devices()
    check_settings(list(batch_sizes), sequence_length, repeats, warmup, threads, devices)
    models = {label: load_encoder(source) for label, source in zip(model_labels(sources), sources)}
    return bench(models, batch_sizes, sequence_length, warmup=warmup, repeats=repeats, threads=threads,
                 devices=devices, memory=memory)


__all__ = ["BenchReport", "BenchRow", "bench", "bench_models", "check_settings", "default_devices", "model_labels",
           "read_csv"]
