"""Latency harness: warm-up, repeats, configurations interleaved, median and spread.

Masks do not make anything faster, so only physically shrunk models are timed. On
CPU the thread count is fixed for the whole measurement; on GPU each forward is timed
with CUDA events after a synchronise. Interleaving (A, B, A, B, ...) spreads drift of
the machine (frequency, other load) evenly over the configurations being compared; the
times of one round are paired, so a ratio of two configurations gets a bootstrap interval
over rounds (:func:`ratio_interval`).
"""

from __future__ import annotations

import functools
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
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


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str = "cpu") -> dict:
    """What every latency figure must be reported beside."""
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device,
           "machine": platform.machine(), "processor": cpu_model(), "python": platform.python_version()}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _time_once(call: Callable[[], object], device: str) -> float:
    """Milliseconds of one ``call()``: CUDA events after a synchronise on a GPU, the wall clock on CPU."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    began = time.perf_counter()
    call()
    return (time.perf_counter() - began) * 1000.0


def random_batch(vocab_size: int, batch_size: int, sequence_length: int, device: str, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, max(6, vocab_size), (batch_size, sequence_length), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


@contextmanager
def fixed_threads(threads: int | None) -> Iterator[int]:
    """Intra-op threads fixed to ``threads`` (None: as they are) inside, restored after; yields the count."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


@torch.inference_mode()
def time_calls(calls: dict[str, Callable[[], object]], rounds: int = 20, warmup: int = 3,
               device: str = "cpu") -> dict[str, list[float]]:
    """Latency in ms of every call in every round, interleaved.

    ``warmup`` untimed rounds first; then each round times each call once, the order rotated by
    one call per round (A B C, B C A, C A B, ...), so drift of the machine falls evenly on all
    and round i of one call is comparable with round i of another. Threads are the caller's
    (:func:`fixed_threads`).
    """
    expect(bool(calls), "bench: no models to time")
    expect(rounds >= 1 and warmup >= 0, "bench: repeats must be >= 1 and warmup >= 0")
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = _time_once(calls[name], device)
            if index >= warmup:
                times[name].append(elapsed)
    return times


def time_rounds(models: dict[str, nn.Module], batch_size: int, sequence_length: int = 128, rounds: int = 20,
                warmup: int = 3, device: str = "cpu") -> dict[str, list[float]]:
    """Forward latency in ms of every model in every round, interleaved (:func:`time_calls`) on a
    random batch. The models must already be on ``device`` in eval mode; threads are the caller's."""
    expect(bool(models), "bench: no models to time")
    batches = {name: random_batch(model.get_input_embeddings().num_embeddings, batch_size, sequence_length, device)
               for name, model in models.items()}
    return time_calls({name: functools.partial(model, **batches[name]) for name, model in models.items()},
                      rounds, warmup, device)


def measure_latency(models: dict[str, nn.Module], batch_sizes=(1, 8), sequence_length: int = 128, warmup: int = 3,
                    repeats: int = 20, threads: int | None = None, device: str = "cpu") -> list[LatencyResult]:
    """Median forward latency of each model at each batch size, the models interleaved (:func:`time_rounds`)."""
    expect(bool(models), "bench: no models to time")
    expect(repeats >= 1 and warmup >= 0, "bench: repeats must be >= 1 and warmup >= 0")
    with fixed_threads(threads) as used:
        for model in models.values():
            model.eval().to(device)
        results = []
        for batch_size in batch_sizes:
            times = time_rounds(models, batch_size, sequence_length, repeats, warmup, device)
            for name, values in times.items():
                dtype = str(next(models[name].parameters()).dtype).replace("torch.", "")
                results.append(LatencyResult(name, batch_size, sequence_length, statistics.median(values),
                                             _quantile(values, 0.1), _quantile(values, 0.9), repeats, device,
                                             used, dtype))
        return results


def ratio_interval(numerator: list[float], denominator: list[float], level: float = 0.95, resamples: int = 2000,
                   seed: int = 0) -> tuple[float, float, float]:
    """``median(numerator) / median(denominator)`` and its percentile-bootstrap interval at ``level``.

    The two lists are paired by round (:func:`time_rounds`): a resample draws rounds with
    replacement and keeps both models' times of each drawn round, so what drifted between rounds
    stays paired. Returns ``(ratio, low, high)``.
    """
    num, den = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    expect(num.ndim == 1 and num.shape == den.shape and len(num) >= 2,
           f"bench: expected two equally long lists of >= 2 paired times, got {len(num)} and {len(den)}")
    expect(0 < level < 1, f"bench: interval level must lie in (0, 1), got {level}")
    draws = np.random.default_rng(seed).integers(0, len(num), size=(resamples, len(num)))
    ratios = np.median(num[draws], axis=1) / np.median(den[draws], axis=1)
    low, high = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(np.median(num) / np.median(den)), float(low), float(high)


def median_speedups(results: list[LatencyResult], baseline: str) -> dict[tuple[str, int], float]:
    """Speedup of every configuration over ``baseline`` at the same batch size."""
    base = {r.batch_size: r.median_ms for r in results if r.name == baseline}
    return {(r.name, r.batch_size): base[r.batch_size] / r.median_ms for r in results if r.batch_size in base}
