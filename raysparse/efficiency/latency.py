"""Latency harness: warm-up, repeats, configurations interleaved, median and spread.

Masks do not make anything faster, so only physically shrunk models are timed. On
CPU the thread count is fixed for the whole measurement; on GPU each forward is timed
with CUDA events after a synchronise. Interleaving (A, B, A, B, ...) spreads drift of
the machine (frequency, other load) evenly over the configurations being compared.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from raysparse.errors import expect


@dataclass(frozen=True)
class LatencyResult:
    name: str
    batch_size: int
    sequence_length: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    device: str
    threads: int
    dtype: str

    def as_dict(self) -> dict:
        return asdict(self)


def environment(device: str = "cpu") -> dict:
    """What every latency figure must be reported beside."""
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device,
           "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
           "python": platform.python_version()}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _time_once(model: nn.Module, batch: dict, device: str) -> float:
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        model(**batch)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    began = time.perf_counter()
    model(**batch)
    return (time.perf_counter() - began) * 1000.0


def random_batch(vocab_size: int, batch_size: int, sequence_length: int, device: str, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, max(6, vocab_size), (batch_size, sequence_length), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


@torch.inference_mode()
def measure_latency(models: dict[str, nn.Module], batch_sizes=(1, 8), sequence_length: int = 128, warmup: int = 3,
                    repeats: int = 20, threads: int | None = None, device: str = "cpu") -> list[LatencyResult]:
    """Median forward latency of each model at each batch size, the models interleaved."""
    expect(bool(models), "bench: no models to time")
    expect(repeats >= 1 and warmup >= 0, "bench: repeats must be >= 1 and warmup >= 0")
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for model in models.values():
            model.eval().to(device)
        results = []
        for batch_size in batch_sizes:
            batches = {name: random_batch(model.get_input_embeddings().num_embeddings, batch_size, sequence_length,
                                          device) for name, model in models.items()}
            for _ in range(warmup):
                for name, model in models.items():
                    _time_once(model, batches[name], device)
            times = {name: [] for name in models}
            names = list(models)
            for rep in range(repeats):
                order = names[rep % len(names):] + names[: rep % len(names)]
                for name in order:
                    times[name].append(_time_once(models[name], batches[name], device))
            for name, values in times.items():
                dtype = str(next(models[name].parameters()).dtype).replace("torch.", "")
                results.append(LatencyResult(name, batch_size, sequence_length, statistics.median(values),
                                             _quantile(values, 0.1), _quantile(values, 0.9), repeats, device,
                                             torch.get_num_threads(), dtype))
        return results
    finally:
        torch.set_num_threads(previous_threads)


def median_speedups(results: list[LatencyResult], baseline: str) -> dict[tuple[str, int], float]:
    """Speedup of every configuration over ``baseline`` at the same batch size."""
    base = {r.batch_size: r.median_ms for r in results if r.name == baseline}
    return {(r.name, r.batch_size): base[r.batch_size] / r.median_ms for r in results if r.batch_size in base}
