"""Predicted latency: a per-layer table of attention by heads and FFN by neurons, measured once.

A :class:`LatencyTable` holds, for one model architecture at one batch size, sequence length,
dtype, device and thread count (the environment recorded beside it):

- ``attention_ms[h]``: what ``h`` heads add to one encoder layer, for every ``h`` in 0..H;
- ``ffn_ms``: what ``n`` FFN neurons add, on a coarse grid of ``n`` (0, N/16, ..., N), linear between;
- ``layer_ms``: a layer that keeps no head and no neuron (its norms, residuals and biases);
- ``fixed_ms``: the model without its layers (embeddings, attention-mask preparation, pooler);
- ``layer_scale``: one factor on every layer cost, so that the table predicts the dense model as it
  is timed on its own. One layer timed over and over keeps its weights in the processor's caches;
  twelve distinct layers in a row do not, and ran 5-17% slower per layer at batch 1 on this CPU (at
  batch 8 the factor comes out near 1). The factor is a one-point calibration on the dense model;
  :func:`check_predictions` reports the error on shrunk models, which the calibration never saw.

All are measured on copies of one real, full encoder layer, sliced by the one function that slices
weights (:func:`raysparse.structure.select_units`) and called with the very inputs the model passes
it (captured by a hook), in interleaved rounds (:func:`~raysparse.efficiency.latency.time_calls`);
a unit's cost is the median over rounds of its paired difference from the empty layer, made
non-decreasing in the count by an isotonic fit. A mask's predicted latency is
``fixed_ms + layer_scale * sum over kept layers (layer_ms + attention_ms[h] + ffn(n))``; a dropped
layer costs nothing. :func:`check_predictions` times shrunk models directly to say how good that sum is.

Tables are cached per environment as JSON (:meth:`LatencyTable.cached`): under
``<user cache>/raysparse/latency/<key>.json``, the key a hash of the environment, the architecture
and the settings, so a run on the same machine measures once.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from raysparse.efficiency.latency import environment, fixed_threads, random_batch, time_calls, time_rounds
from raysparse.errors import RaysparseError, expect
from raysparse.structure import Encoder, Mask, select_units, shrink
from raysparse.structure.shrink import source_config

FORMAT = 2   # bump when what a table means changes: older cached tables are then measured again


def increasing(values: Sequence[float]) -> list[float]:
    """The least-squares non-decreasing fit of ``values`` (pool adjacent violators)."""
    blocks: list[tuple[float, int]] = []   # (mean, count)
    for value in values:
        mean, count = float(value), 1
        while blocks and blocks[-1][0] > mean:
            previous, size = blocks.pop()
            mean, count = (previous * size + mean * count) / (size + count), size + count
        blocks.append((mean, count))
    return [mean for mean, count in blocks for _ in range(count)]


class _OneLayer(nn.Module):
    """A stand-in encoder holding one layer, so :func:`select_units` slices it as it slices a model."""

    def __init__(self, layer: nn.Module, config):
        super().__init__()
        self.config = config
        self.embeddings = nn.Identity()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([layer])


def sliced_layer(layer: nn.Module, config, heads: int, neurons: int) -> nn.Module:
    """A copy of the full ``layer`` (of a model whose original config is ``config``) that keeps its
    first ``heads`` heads and ``neurons`` FFN neurons (0 allowed)."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = 1
    holder = _OneLayer(copy.deepcopy(layer), config)
    select_units(holder, [0], [list(range(heads))], [list(range(neurons))])
    return holder.encoder.layer[0]


def _layer_inputs(model: nn.Module, layer: nn.Module, batch: dict) -> tuple[tuple, dict]:
    """The arguments ``model``'s forward pass on ``batch`` gives ``layer``."""
    captured: dict = {}

    def hook(module, args, kwargs):
        captured.setdefault("inputs", (args, kwargs))

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(**batch)
    finally:
        handle.remove()
    expect("inputs" in captured, "latency table: the model's forward pass never called its encoder layer")
    return captured["inputs"]


def _dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    found = getattr(torch, str(value).removeprefix("torch."), None)
    expect(isinstance(found, torch.dtype), f"latency table: unknown dtype {value!r} (expected e.g. float32, bfloat16)")
    return found


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _on(model: nn.Module, device: str, dtype: torch.dtype | None) -> nn.Module:
    """``model`` itself when it already lives on ``device`` in ``dtype``, else a copy moved there."""
    parameter = next(model.parameters())
    wanted = torch.device(device)
    same_device = parameter.device.type == wanted.type and wanted.index in (None, parameter.device.index)
    if same_device and (dtype is None or parameter.dtype == dtype):
        return model
    return copy.deepcopy(model).to(device=wanted, dtype=dtype)


def signature(model: nn.Module) -> dict:
    """What of a model's architecture its latency depends on (not its weights)."""
    enc = Encoder(model)
    config = source_config(enc.base)
    return {"model_type": config.model_type, "hidden_size": config.hidden_size,
            "num_attention_heads": config.num_attention_heads, "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers, "hidden_act": str(config.hidden_act),
            "vocab_rows": enc.base.get_input_embeddings().num_embeddings,
            "pooler": getattr(enc.base, "pooler", None) is not None,
            "attention": str(getattr(enc.config, "_attn_implementation", None))}


@dataclass
class LatencyTable:
    """Per-layer latency of attention by heads and FFN by neurons, plus the fixed cost (module docstring)."""

    shape: tuple[int, int, int]           # (layers, heads, FFN neurons) of the original model
    batch_size: int
    sequence_length: int
    dtype: str
    device: str
    threads: int
    attention_ms: list[float]             # index h = 0..heads: what h heads add to a layer
    neurons: list[int]                    # the grid of FFN neuron counts, 0 first, all last
    ffn_ms: list[float]                   # what that many neurons add to a layer
    layer_ms: float                       # a layer with no head and no neuron
    fixed_ms: float                       # the model without its layers
    layer_scale: float = 1.0              # every layer cost times this: the dense model as timed (docstring)
    environment: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)       # signature(): the architecture it was measured for
    key: str = ""                                   # the cache key (environment, architecture, settings)
    rounds: int = 0
    warmup: int = 0
    build_seconds: float = 0.0
    measured_ms: dict = field(default_factory=dict)  # median of every timed configuration, for the record
    origin: str = field(default="measured", compare=False)   # "measured" or the file it was read from

    # --- building ---------------------------------------------------------------------------------
    @staticmethod
    def key_for(model: nn.Module, batch_size: int, sequence_length: int, dtype, device: str, threads: int | None,
                neuron_steps: int, rounds: int, warmup: int) -> str:
        """The cache key: a hash of everything a table's numbers depend on."""
        base = Encoder(model).base
        dtype = _dtype(dtype) or next(base.parameters()).dtype
        with fixed_threads(threads):
            env = environment(device)
        data = {"format": FORMAT, "environment": env, "model": signature(base), "batch_size": batch_size,
                "sequence_length": sequence_length, "dtype": _dtype_name(dtype), "device": device,
                "neuron_steps": neuron_steps, "rounds": rounds, "warmup": warmup}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:20]

    @classmethod
    def build(cls, model: nn.Module, batch_size: int = 1, sequence_length: int = 128, dtype=None,
              device: str = "cpu", threads: int | None = None, *, neuron_steps: int = 16, rounds: int = 10,
              warmup: int = 3) -> "LatencyTable":
        """Measure the table for ``model`` (an encoder or a task model around one; one of its layers must
        keep every head and neuron). ``dtype`` None: the model's own. The model is left as it was (moved
        copies are timed when ``device`` or ``dtype`` differ)."""
        expect(isinstance(batch_size, int) and batch_size >= 1,
               f"latency table: batch_size must be >= 1, got {batch_size!r}")
        expect(isinstance(sequence_length, int) and sequence_length >= 1,
               f"latency table: sequence_length must be >= 1, got {sequence_length!r}")
        expect(isinstance(neuron_steps, int) and neuron_steps >= 1,
               f"latency table: neuron_steps must be >= 1, got {neuron_steps!r}")
        expect(rounds >= 1 and warmup >= 0, "latency table: rounds must be >= 1 and warmup >= 0")
        began = time.perf_counter()
        base = Encoder(model).base
        config = source_config(base)
        heads, neurons, layers = config.num_attention_heads, config.intermediate_size, config.num_hidden_layers
        enc = Encoder(base)
        full = [i for i, (h, n) in enumerate(zip(enc.heads_per_layer(), enc.neurons_per_layer()))
                if h == heads and n == neurons]
        expect(bool(full), "latency table: the model has no layer with every head and neuron (expected a dense model)")
        dtype = _dtype(dtype) or next(base.parameters()).dtype
        key = cls.key_for(base, batch_size, sequence_length, dtype, device, threads, neuron_steps, rounds, warmup)
        work = _on(base, device, dtype)
        training = work.training
        work.eval()
        try:
            with fixed_threads(threads) as used:
                env = {**environment(device), "dtype": _dtype_name(dtype)}
                batch = random_batch(work.get_input_embeddings().num_embeddings, batch_size, sequence_length, device)
                layer = Encoder(work).layers[full[0]]
                args, kwargs = _layer_inputs(work, layer, batch)
                grid = sorted({round(neurons * k / neuron_steps) for k in range(neuron_steps + 1)})
                configurations = {**{f"h{h}": (h, 0) for h in range(heads + 1)}, **{f"n{n}": (0, n) for n in grid if n}}
                calls = {name: functools.partial(sliced_layer(layer, config, h, n).eval(), *args, **kwargs)
                         for name, (h, n) in configurations.items()}
                hollow = copy.deepcopy(work, {id(t): t for t in [*work.parameters(), *work.buffers()]})
                Encoder(hollow).base.encoder.layer = nn.ModuleList()   # the model minus its layers, same tensors
                calls["fixed"] = functools.partial(hollow, **batch)
                times = time_calls(calls, rounds, warmup, device)
                # the dense model on its own, as a run times it (beside 30 single layers its weights
                # and activations would share the caches with theirs)
                times["dense"] = time_calls({"dense": functools.partial(work, **batch)}, rounds, warmup, device)["dense"]
        finally:
            work.train(training)
        empty = times["h0"]

        def added(name: str) -> float:   # paired by round: drift shared by a round cancels
            return statistics.median(a - b for a, b in zip(times[name], empty))

        attention = [max(0.0, v) for v in increasing([0.0, *(added(f"h{h}") for h in range(1, heads + 1))])]
        ffn = [max(0.0, v) for v in increasing([0.0, *(added(f"n{n}") for n in grid[1:])])]
        layer_ms = statistics.median(empty)
        timed_layers = statistics.median(times["dense"]) - statistics.median(times["fixed"])
        summed = layers * (layer_ms + attention[-1] + ffn[-1])
        scale = timed_layers / summed if summed > 0 and timed_layers > 0 else 1.0
        return cls((layers, heads, neurons), batch_size, sequence_length, _dtype_name(dtype), device, used, attention,
                   grid, ffn, layer_ms, statistics.median(times["fixed"]), scale, env, signature(base), key,
                   rounds, warmup, time.perf_counter() - began,
                   {name: statistics.median(values) for name, values in times.items()})

    @classmethod
    def cached(cls, model: nn.Module, batch_size: int = 1, sequence_length: int = 128, dtype=None,
               device: str = "cpu", threads: int | None = None, *, cache: str | Path | None = None,
               neuron_steps: int = 16, rounds: int = 10, warmup: int = 3) -> "LatencyTable":
        """The table from the cache when one was measured for this environment, architecture and these
        settings; else :meth:`build` it and store it. ``cache``: a folder (``<key>.json`` inside) or a JSON
        file (read when its key matches, else measured again and overwritten); default
        ``<user cache>/raysparse/latency``."""
        key = cls.key_for(model, batch_size, sequence_length, dtype, device, threads, neuron_steps, rounds, warmup)
        path = cache_path(cache, key)
        if path.is_file():
            try:
                table = cls.load(path)
            except RaysparseError:
                table = None   # a damaged or foreign file: measured again
            if table is not None and table.key == key:
                return table
        table = cls.build(model, batch_size, sequence_length, dtype, device, threads, neuron_steps=neuron_steps,
                          rounds=rounds, warmup=warmup)
        table.save(path)
        return table

    # --- predicting -------------------------------------------------------------------------------
    def counts(self, what) -> tuple[list[int], list[int]]:
        """Heads and neurons of every layer that runs: of a ``Mask`` (original coordinates; dropped layers
        left out), of a live (shrunk) model, or given as a pair of sequences ``(heads, neurons)``."""
        layers, max_heads, max_neurons = self.shape
        if isinstance(what, Mask):
            what.check_fits(*self.shape, what="latency table")
            kept = what.kept_layers
            heads = what.effective_heads().sum(dim=1)[kept].tolist()
            neurons = what.effective_neurons().sum(dim=1)[kept].tolist()
        elif isinstance(what, nn.Module):
            enc = Encoder(what)
            expect(source_config(enc.base).hidden_size == self.model.get("hidden_size", enc.hidden_size),
                   f"latency table: measured for hidden size {self.model.get('hidden_size')}, the model has "
                   f"{enc.hidden_size}")
            heads, neurons = enc.heads_per_layer(), enc.neurons_per_layer()
        else:
            try:
                heads, neurons = ([int(x) for x in part] for part in what)
            except (TypeError, ValueError):
                raise RaysparseError("latency table: expected a Mask, a model or (heads per layer, neurons per layer), "
                                     f"got {type(what).__name__}") from None
        expect(len(heads) == len(neurons) <= layers,
               f"latency table: expected at most {layers} layers of equal head and neuron counts, got "
               f"{len(heads)} and {len(neurons)}")
        expect(all(0 <= h <= max_heads for h in heads) and all(0 <= n <= max_neurons for n in neurons),
               f"latency table: counts must lie in 0..{max_heads} heads and 0..{max_neurons} neurons")
        return heads, neurons

    def layer_latency(self, heads: int, neurons: int) -> float:
        """Predicted ms of one layer that keeps ``heads`` heads and ``neurons`` neurons."""
        return self.layer_scale * (self.layer_ms + self.attention_ms[heads]
                                   + float(np.interp(neurons, self.neurons, self.ffn_ms)))

    def predict(self, what) -> float:
        """Predicted forward latency in ms of a mask, a model or counts (:meth:`counts`)."""
        heads, neurons = self.counts(what)
        return self.fixed_ms + sum(self.layer_latency(h, n) for h, n in zip(heads, neurons))

    def dense_ms(self) -> float:
        """The prediction for the model with every layer, head and neuron."""
        return self.predict(Mask.full(*self.shape))

    def unit_ms(self) -> tuple[float, float]:
        """Milliseconds one head and one neuron save on average (all of them against none, per unit)."""
        _, heads, neurons = self.shape
        return self.layer_scale * self.attention_ms[-1] / heads, self.layer_scale * self.ffn_ms[-1] / neurons

    # --- storing ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("origin")
        data["shape"] = list(self.shape)
        return {"format": FORMAT, **data}

    @classmethod
    def from_dict(cls, data: dict, origin: str = "measured") -> "LatencyTable":
        names = {f.name for f in fields(cls)} - {"origin"}
        try:
            expect(data.get("format") == FORMAT, f"latency table: format {data.get('format')!r}, expected {FORMAT}")
            values = {name: data[name] for name in names if name in data}
            values["shape"] = tuple(int(x) for x in data["shape"])
            table = cls(**values, origin=origin)
            expect(len(table.attention_ms) == table.shape[1] + 1 and len(table.neurons) == len(table.ffn_ms) >= 2
                   and table.neurons[0] == 0 and table.neurons[-1] == table.shape[2],
                   "latency table: attention_ms, neurons and ffn_ms do not fit its shape")
        except (KeyError, TypeError, ValueError) as exc:
            raise RaysparseError(f"latency table: malformed description ({type(exc).__name__}: {exc})") from None
        return table

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON (atomically: a concurrent reader sees the old file or the new one)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(handle, "w") as stream:
            json.dump(self.to_dict(), stream, indent=1)
        os.replace(temporary, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        path = Path(path)
        if not path.is_file():
            raise RaysparseError(f"latency table: {path} does not exist (expected a JSON file LatencyTable.save wrote)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RaysparseError(f"latency table: {path} is not valid JSON ({exc})") from None
        expect(isinstance(data, dict), f"latency table: {path} does not hold a table")
        return cls.from_dict(data, origin=str(path))

    def summary(self) -> str:
        """The table in a few lines, with the settings and environment it holds for."""
        where = self.environment.get("gpu") or self.environment.get("processor", "?")
        lines = [f"latency table: batch {self.batch_size} x {self.sequence_length} tokens, {self.dtype}, {self.device} "
                 f"({where}), {self.threads} thread(s), torch {self.environment.get('torch', '?')}",
                 f"  fixed (model without layers) {self.fixed_ms:.3f} ms; empty layer {self.layer_ms:.3f} ms; "
                 f"layer costs x {self.layer_scale:.3f} (calibrated on the dense model); "
                 f"dense prediction {self.dense_ms():.3f} ms",
                 "  heads:        " + " ".join(f"{h:>6}" for h in range(len(self.attention_ms))),
                 "  attention ms: " + " ".join(f"{v:6.3f}" for v in self.attention_ms),
                 "  neurons:      " + " ".join(f"{n:>6}" for n in self.neurons),
                 "  ffn ms:       " + " ".join(f"{v:6.3f}" for v in self.ffn_ms)]
        return "\n".join(lines)


def cache_path(cache: str | Path | None, key: str) -> Path:
    """Where the table of ``key`` lives: ``cache`` if it names a JSON file, else ``<cache>/<key>.json``
    (default folder: ``<user cache>/raysparse/latency``)."""
    if cache is None:
        from raysparse.paths import cache_dir

        return cache_dir() / "latency" / f"{key}.json"
    cache = Path(cache).expanduser()
    return cache if cache.suffix == ".json" else cache / f"{key}.json"


# --- checking the prediction against direct timing ----------------------------------------------------

def standard_masks(shape: tuple[int, int, int]) -> dict[str, Mask]:
    """Masks to check a table on: 25, 50 and 75% of every layer's heads and neurons removed (uniform),
    and a non-uniform one (heads rising from none in the first layer to all in the last, neurons falling)."""
    layers, heads, neurons = shape

    def keep(head_counts: list[int], neuron_counts: list[int]) -> Mask:
        mask = Mask.full(*shape)
        for i, (h, n) in enumerate(zip(head_counts, neuron_counts)):
            mask.kept_heads[i, h:] = False
            mask.kept_neurons[i, n:] = False
        return mask

    masks = {f"uniform {int(s * 100)}%": keep([round(heads * (1 - s))] * layers, [round(neurons * (1 - s))] * layers)
             for s in (0.25, 0.5, 0.75)}
    steps = max(1, layers - 1)
    masks["non-uniform"] = keep([round(heads * i / steps) for i in range(layers)],
                                [round(neurons * (layers - 1 - i) / steps) for i in range(layers)])
    return masks


@dataclass
class PredictionCheck:
    """Predicted against directly timed latency of shrunk models (each a name -> ms)."""

    predicted: dict[str, float]
    times: dict[str, list[float]]    # ms per round, the models interleaved

    def measured(self, name: str) -> float:
        return statistics.median(self.times[name])

    def errors(self) -> dict[str, float]:
        """|predicted - measured| / measured of every model."""
        return {name: abs(self.predicted[name] - self.measured(name)) / self.measured(name) for name in self.predicted}

    def median_error(self) -> float:
        """Median absolute percentage error (as a fraction) of the shrunk models: the dense model is the
        point the table is calibrated on, so it is left out when there is anything else."""
        errors = self.errors()
        return statistics.median([e for name, e in errors.items() if name != "dense"] or errors.values())

    def table(self) -> str:
        rows = [("model", "predicted ms", "measured ms", "p10-p90 ms", "pred/meas", "abs error")]
        for name, predicted in self.predicted.items():
            values = sorted(self.times[name])
            low, high = values[int(0.1 * (len(values) - 1))], values[round(0.9 * (len(values) - 1))]
            measured = self.measured(name)
            rows.append((name, f"{predicted:.2f}", f"{measured:.2f}", f"{low:.2f}-{high:.2f}",
                         f"{predicted / measured:.3f}", f"{100 * self.errors()[name]:.1f}%"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        return "\n".join([*lines, f"median absolute percentage error of the shrunk models: {100 * self.median_error():.1f}%"
                                   " (the dense model is the calibration point)"])


def check_predictions(table: LatencyTable, model: nn.Module, masks: dict[str, Mask] | None = None, rounds: int = 10,
                      warmup: int = 2) -> PredictionCheck:
    """Time the dense ``model`` and a shrunk copy per mask (default :func:`standard_masks`) directly,
    interleaved, at the table's settings, beside the table's predictions. The copies share the
    model's embeddings (shrinking leaves them alone); ``model`` is not changed."""
    masks = {"dense": Mask.full(*table.shape), **(masks if masks is not None else standard_masks(table.shape))}
    base = _on(Encoder(model).base, table.device, _dtype(table.dtype))
    embeddings = Encoder(base).embeddings
    models = {name: shrink(copy.deepcopy(base, {id(embeddings): embeddings}), mask).eval()
              for name, mask in masks.items()}
    with fixed_threads(table.threads):
        times = time_rounds(models, table.batch_size, table.sequence_length, rounds, warmup, table.device)
    return PredictionCheck({name: table.predict(mask) for name, mask in masks.items()}, times)


# --- the latency budget of a run ---------------------------------------------------------------------

@dataclass
class LatencyFit:
    """A mask selected to a latency budget, with the table that predicted it."""

    mask: Mask
    table: LatencyTable
    target_ms: float
    predicted_ms: float
    dense_ms: float


def fit_latency_target(model: nn.Module, scores, target, efficiency, selection, base: Mask | None = None) -> LatencyFit:
    """``pruning.latency_target`` (``target``, a ``LatencyTarget``): the table of ``model`` on its device at
    ``efficiency.sequence_length`` and ``efficiency.threads`` (cached), the budget in ms, and the mask
    :func:`~raysparse.pruning.selection.select_to_latency` keeps within it."""
    from raysparse.pruning.selection import select_to_latency

    batch_size = target.batch_size or efficiency.batch_sizes[0]
    device = str(next(model.parameters()).device)
    table = LatencyTable.cached(model, batch_size, efficiency.sequence_length, device=device,
                                threads=efficiency.threads, cache=target.table)
    dense = table.dense_ms()
    target_ms = target.ms if target.ms is not None else dense / target.speedup
    mask = select_to_latency(scores, table, target_ms, selection, base)
    return LatencyFit(mask, table, target_ms, table.predict(mask), dense)


__all__ = ["LatencyFit", "LatencyTable", "PredictionCheck", "cache_path", "check_predictions", "fit_latency_target",
           "increasing", "signature", "sliced_layer", "standard_masks"]
