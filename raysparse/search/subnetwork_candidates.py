"""What a candidate of a sub-network search is, and how one is scored.

The spec (:class:`SubnetworkSearchSpec`); the space of per-layer widths and dropped layers of a DS
checkpoint (:class:`SearchSpace`, Optuna's define-by-run); the first generation spread over the latency
range (:func:`spread_start`) and refine's mutations under a latency budget (:func:`refine_candidate`,
:class:`Refiner`); and :class:`CandidateScorer`, which loads the checkpoint once and scores a candidate
through views of its weights. The search (:mod:`raysparse.search.subnetworks`) and its Tune trials
(:mod:`raysparse.search.subnetwork_trials`) both build on these, so a candidate is the same either way.
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

from pydantic import Field

from raysparse.config import Strict
from raysparse.errors import RaysparseError

OBJECTIVE_MODES = {"avg": "max", "worst": "max", "latency": "min", "params": "min", "bytes": "min", "flops": "min"}
LATENCY, PARAMS, BYTES, FLOPS = "latency_ms", "params", "bytes", "flops"
SEARCH_FILE, EXAMPLES_FILE = "subnetworks.json", "examples.json"
KIND = "subnetwork-search"


class SubnetworkSearchSpec(Strict):
    """What a sub-network search scores and how (``raysparse search-subnetworks MODEL_DIR``'s flags)."""

    kind: Literal["subnetworks"] = "subnetworks"   # marks a spec file that `raysparse search` runs as this search
    name: str = "subnetworks"
    model_dir: str                              # a DS checkpoint folder (pruning.schedule: dynamic writes one)
    task: str | None = None                     # default: the task the checkpoint was trained on
    languages: list[str] | None = Field(None, min_length=1)   # default: the checkpoint's run's, else all present
    data_dir: str | None = None                 # default: $RAYSPARSE_DATA
    candidates: int = Field(200, ge=1)          # sub-networks scored (uniform levels included)
    sampler: Literal["nsga2", "tpe", "random"] = "nsga2"
    population: int | None = Field(None, ge=2)  # NSGA-II's population / TPE's random start (default n/8, 10..50)
    seed: int = 0
    objectives: list[Literal["avg", "worst", "latency", "params", "bytes", "flops"]] = Field(
        default_factory=lambda: ["avg", "worst", "latency"], min_length=1)
    uniform_levels: bool = True                 # score the checkpoint's grid levels first, as fixed trials
    spread_start: bool = True                   # the rest of the first generation spans the latency range (spread_start)
    # after the search, this many more candidates per latency budget, each a mutation of the best point within it
    # (units moved between layers, then filled up to the budget): an evolutionary search under a latency
    # constraint (as HAT's and Once-for-All's), where the multi-objective search leaves a budget thinly covered
    refine: int = Field(0, ge=0)
    budgets_ms: list[float] | None = Field(None, min_length=1)   # refine's budgets (default: the uniform levels')
    # fewest units per layer: ceil((1-s)N); default: the checkpoint's per-layer floor (dynamic.per_layer_max_sparsity,
    # else its grid's top)
    max_sparsity: float | None = Field(None, ge=0, lt=1)
    drop_layers: int | None = Field(None, ge=0)  # layers a candidate may drop (default: the checkpoint's drop_layers_max)
    # held-out rows scored per candidate; None: as the checkpoint's run evaluated (seed, split, rows; 100 rows
    # where it scored every row)
    max_examples: int | None = Field(None, ge=1)
    skip_examples: int | None = Field(None, ge=0)
    eval_seed: int | None = None
    train_fraction: float | None = Field(None, gt=0, lt=1)
    eval_batch_size: int = Field(32, ge=1)
    max_length: int | None = Field(None, ge=8)
    # latency: the per-layer table's prediction (fast), or each candidate timed directly (exact, slower)
    latency: Literal["predicted", "measured"] = "predicted"
    batch_size: int = Field(1, ge=1)
    sequence_length: int = Field(128, ge=1)
    threads: int | None = Field(None, ge=1)
    latency_table: str | None = None            # table cache: a folder or a JSON file (default: the user cache)
    rounds: int = Field(10, ge=1)               # timing rounds (table building, measured latency)
    # 0: every candidate scored in this process (no Ray); N: candidates run as Ray Tune trials, N at a time, each
    # actor loading the checkpoint once and scoring many candidates (reuse_actors)
    workers: int = Field(0, ge=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    address: str | None = None                  # a Ray cluster (default: RAY_ADDRESS, else a local Ray) with workers
    out: str | None = None                      # default: outputs/subnetworks/<name>
    tracking: bool = True                       # log to MLflow (one run; the table and front as artifacts)
    tracking_uri: str | None = None             # default: MLFLOW_TRACKING_URI or the local server
    experiment: str = "raysparse"


def _checkpoint(spec: SubnetworkSearchSpec) -> tuple[dict, dict]:
    """(the DS record, the sidecar extra) of the checkpoint, or one line saying why it is none."""
    from raysparse.structure.checkpoint import read_sidecar

    folder = Path(spec.model_dir)
    if not folder.is_dir():
        raise RaysparseError(f"search-subnetworks.model_dir: {folder} does not exist (expected a Dynamic "
                             "Sparsification checkpoint folder)")
    if not (folder / "raysparse.json").is_file():
        raise RaysparseError(f"search-subnetworks.model_dir: {folder / 'raysparse.json'} is missing (expected a "
                             "Dynamic Sparsification checkpoint: a run's model/dynamic artifact)")
    extra = read_sidecar(folder).get("extra", {}) or {}
    info = extra.get("dynamic")
    if not info or not info.get("rewired"):
        raise RaysparseError(f"search-subnetworks.model_dir: {folder} is not a Dynamic Sparsification checkpoint "
                             "(its raysparse.json records no rewiring; run a spec with pruning.schedule: dynamic)")
    if "subnetwork" in info or "sparsity" in info:
        raise RaysparseError(f"search-subnetworks.model_dir: {folder} is a sub-network already sliced from a "
                             "checkpoint (search the full checkpoint it came from)")
    return info, extra


def _bounds(model, info: dict, spec: SubnetworkSearchSpec) -> tuple[int, int, int, float]:
    """(fewest heads, fewest neurons per layer, layers a candidate may drop, the sparsity those counts stand for)."""
    from raysparse.structure import Encoder, structure_of
    from raysparse.structure.rewire import prefix_counts

    enc = Encoder(model)
    num_layers, num_heads, ffn = structure_of(model).shape
    # default: the fewest units per layer the super-network trained (its per-layer floor, else its grid's top)
    top = spec.max_sparsity if spec.max_sparsity is not None else \
        info.get("per_layer_max_sparsity") or max(info.get("grid") or [0.9])
    heads, neurons = prefix_counts(top, num_heads, ffn, enc.hidden_size, enc.head_dim,
                                   bool(info.get("match_sparsity", False)))
    drop = spec.drop_layers if spec.drop_layers is not None else int(info.get("drop_layers_max", 0))
    if drop >= num_layers:
        raise RaysparseError(f"search-subnetworks.drop_layers: {drop} would leave no layer of this {num_layers}-layer "
                             f"model (expected at most {num_layers - 1})")
    return max(1, heads), max(1, neurons), drop, top


def suggest(trial, shape: tuple[int, int, int], low_heads: int, low_neurons: int, drop: int):
    """A candidate from an Optuna trial: heads and neurons per layer, and the layers it drops (the first
    ``drop_count`` of the ``drop_<j>`` picks; the same pick twice drops one layer)."""
    from raysparse.structure import Subnetwork

    num_layers, num_heads, ffn = shape
    heads = [trial.suggest_int(f"heads_{i}", low_heads, num_heads) for i in range(num_layers)]
    neurons = [trial.suggest_int(f"neurons_{i}", low_neurons, ffn) for i in range(num_layers)]
    dropped: set[int] = set()
    if drop:
        count = trial.suggest_int("drop_count", 0, drop)
        picks = [trial.suggest_int(f"drop_{j}", 0, num_layers - 1) for j in range(drop)]
        dropped = set(picks[:count])
    return Subnetwork(heads, neurons, [i for i in range(num_layers) if i not in dropped])


SPREAD = 0.25   # how far a start candidate's layers stray from its width (a fraction of the range)


def spread_start(shape: tuple[int, int, int], low_heads: int, low_neurons: int, count: int, seed: int = 0) -> list:
    """``count`` sub-networks for the search's first generation, spread over the whole latency range.

    Independent per-layer draws average out: 24 uniform widths land near the middle of the range
    almost always, so a search started from them never sees the cheap end (nor the costly one) and
    its front cannot reach the sparse uniform levels. Candidate ``k`` here takes a width ``t``
    stratified over [0, 1] (0: the fewest units, 1: all of them) and every layer a width near it
    (``t`` plus a normal deviation of ``SPREAD``, clipped): non-uniform, at every cost.
    """
    import numpy as np

    from raysparse.structure import Subnetwork
    from raysparse.structure.subnetwork import widths_near

    num_layers, num_heads, ffn = shape
    rng = np.random.default_rng([seed, 17])
    subs = []
    for k in range(count):
        width = (k + rng.random()) / count
        subs.append(Subnetwork(widths_near(width, low_heads, num_heads, rng.normal(0.0, SPREAD, num_layers)),
                               widths_near(width, low_neurons, ffn, rng.normal(0.0, SPREAD, num_layers)),
                               list(range(num_layers))))
    return subs


def refine_candidate(parent, shape: tuple[int, int, int], low_heads: int, low_neurons: int, budget: float,
                     predict, rng) -> object:
    """A mutation of ``parent`` within ``budget`` (ms, as ``predict((heads, neurons))`` gives it): one to
    three moves of heads or neurons from one kept layer to another, then units taken from random layers
    while it costs more than the budget, and added to random layers while that still fits (a candidate
    that leaves budget unused wastes it). Kept layers stay as in the parent; without a parent, the
    uniform floor is filled up. Pure given ``rng`` (a ``random.Random``)."""
    from raysparse.structure import Subnetwork

    num_layers, num_heads, ffn = shape
    if parent is None:
        parent = Subnetwork([low_heads] * num_layers, [low_neurons] * num_layers)
    heads, neurons, kept = list(parent.heads), list(parent.neurons), list(parent.kept_layers)
    kinds = [(heads, low_heads, num_heads, 1), (neurons, low_neurons, ffn, max(1, ffn // 16))]

    def cost() -> float:
        return predict(([heads[i] for i in kept], [neurons[i] for i in kept]))

    for _ in range(rng.randint(1, 3) if len(kept) > 1 else 0):
        counts, low, high, chunk = rng.choice(kinds)
        give, take = rng.sample(kept, 2)
        move = min(rng.randint(1, 2 * chunk), counts[take] - low, high - counts[give])
        if move > 0:
            counts[give] += move
            counts[take] -= move
    for _ in range(4 * len(kept) * (num_heads + 16)):   # over budget: trim
        if cost() <= budget:
            break
        counts, low, high, chunk = rng.choice(kinds)
        layer = rng.choice([i for i in kept if counts[i] > low] or kept)
        counts[layer] = max(low, counts[layer] - chunk)
    misses = 0
    while misses < 8:                                  # under budget: fill
        counts, low, high, chunk = rng.choice(kinds)
        layer = rng.choice(kept)
        before = counts[layer]
        counts[layer] = min(high, before + chunk)
        if counts[layer] == before or cost() > budget:
            counts[layer] = before
            misses += 1
    return Subnetwork(heads, neurons, parent.layers)


class CandidateScorer:
    """What scoring a candidate takes, loaded once: in the driver for an in-process search, once per
    Tune actor otherwise. Building it checks the whole spec against the checkpoint (one line for a bad
    field), so the driver builds one before any cluster work starts."""

    def __init__(self, spec: SubnetworkSearchSpec, table=None):
        from raysparse.data.tasks import get_task
        from raysparse.models.sources import load_tokenizer
        from raysparse.paths import data_dir as resolve_data_dir
        from raysparse.structure import load_dynamic, structure_of
        from raysparse.structure.subnetwork import Costs
        from raysparse.training.evaluate import check_head

        self.spec = spec
        self.info, extra = _checkpoint(spec)
        self.recorded = extra.get("evaluation") or {}
        self.task = get_task(spec.task or extra.get("task") or _missing_task(spec))
        self.metric = self.task.primary_metric
        resolve_data_dir(spec.data_dir)
        self.languages = spec.languages or self.recorded.get("languages")
        recorded = self.recorded
        self.evaluation = {"max_examples": spec.max_examples or recorded.get("max_examples") or 100,
                           "skip_examples": spec.skip_examples if spec.skip_examples is not None
                           else int(recorded.get("skip_examples") or 0),
                           "seed": spec.eval_seed if spec.eval_seed is not None else int(recorded.get("seed", 0)),
                           "train_fraction": spec.train_fraction or float(recorded.get("train_fraction", 0.5))}
        folder = Path(spec.model_dir)
        if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            raise RaysparseError(f"search-subnetworks.model_dir: {folder} holds no tokenizer (expected the checkpoint "
                                 "folder a DS run logs, tokenizer included)")
        self.model = load_dynamic(folder).eval()
        check_head(self.model, self.task)
        self.tokenizer = load_tokenizer(str(folder))
        self.shape = structure_of(self.model).shape
        self.bounds = _bounds(self.model, self.info, spec)   # (fewest heads, fewest neurons, drop, top)
        self.costs = Costs.of(self.model)
        self.table, self.time_candidate = table, None
        if spec.latency == "measured":
            self.time_candidate = _timer(self.model, spec)
        elif table is None:
            from raysparse.efficiency import LatencyTable
            from raysparse.structure import Encoder

            self.table = LatencyTable.cached(Encoder(self.model).base, spec.batch_size, spec.sequence_length,
                                             threads=spec.threads, cache=spec.latency_table, rounds=spec.rounds)

    def score(self, sub) -> tuple[dict, dict]:
        """(the candidate's row values: quality per language, sizes, latency; per-example statistics)."""
        from raysparse.structure import subnetwork_slices
        from raysparse.training.evaluate import evaluate

        spec, costs, began = self.spec, self.costs, time.perf_counter()
        with subnetwork_slices(self.model, sub):
            result = evaluate(self.model, self.tokenizer, self.task, self.languages, data_dir=spec.data_dir,
                              max_examples=self.evaluation["max_examples"],
                              skip_examples=self.evaluation["skip_examples"], batch_size=spec.eval_batch_size,
                              seed=self.evaluation["seed"], train_fraction=self.evaluation["train_fraction"],
                              max_length=spec.max_length or self.recorded.get("max_length"),
                              stride=int(self.recorded.get("stride") or 128), verbose=False)
        row = {k: v for k, v in result.metrics.items() if k.startswith(f"{self.task.name}/")}
        heads, neurons = sub.counts()
        row.update({"layers": len(heads), "heads": sum(heads), "neurons": sum(neurons),
                    "encoder_sparsity": costs.encoder_sparsity(sub), PARAMS: costs.params(sub),
                    BYTES: costs.bytes(sub), FLOPS: costs.flops(sub, spec.sequence_length),
                    "eval_seconds": time.perf_counter() - began})
        row[LATENCY] = self.table.predict((heads, neurons)) if self.table is not None else self.time_candidate(sub)
        return row, result.example_stats

    def candidate(self, params: dict):
        """The sub-network of a trial's parameters (``heads_<i>``, ``neurons_<i>``, ``drop_count``, ``drop_<j>``)."""
        return suggest(SimpleNamespace(suggest_int=lambda name, low, high: params[name]), self.shape,
                        *self.bounds[:3])


class Refiner:
    """``refine``'s candidates: for each budget in turn, ``count`` mutations (:func:`refine_candidate`) of
    the best point within it so far. The in-process loop and the Tune searcher both draw from it, so
    the two propose alike; ``known`` holds every configuration scored or proposed (a fresh one is drawn
    up to ten times)."""

    def __init__(self, rows: list[dict], budgets: list[float], count: int, shape: tuple[int, int, int],
                 low_heads: int, low_neurons: int, predict, quality: str, seed: int):
        from raysparse.structure import Subnetwork

        self.queue = [budget for budget in budgets for _ in range(count)]
        self.shape, self.low, self.predict, self.quality = shape, (low_heads, low_neurons), predict, quality
        self.known = {Subnetwork.from_dict(r["subnetwork"]).key() for r in rows}
        self.best: dict[float, dict | None] = {}
        for budget in budgets:
            fitting = [r for r in rows if r[LATENCY] <= budget * (1 + 1e-9)]
            self.best[budget] = max(fitting, key=lambda r: r[quality]) if fitting else None
        self.rngs = {budget: random.Random(f"{seed}/{budget:.6f}") for budget in budgets}

    def propose(self):
        """(budget, Subnetwork, whether it repeats a known one), or None when every budget has had its
        candidates."""
        from raysparse.structure import Subnetwork

        if not self.queue:
            return None
        budget = self.queue.pop(0)
        best = self.best[budget]
        parent = Subnetwork.from_dict(best["subnetwork"]) if best else None
        sub = None
        for _attempt in range(10):   # a fresh configuration, if ten draws find one
            sub = refine_candidate(parent, self.shape, *self.low, budget, self.predict, self.rngs[budget])
            if sub.key() not in self.known:
                break
        repeat = sub.key() in self.known
        self.known.add(sub.key())
        return budget, sub, repeat

    def tell(self, row: dict) -> None:
        """A proposal's row (with its ``budget_ms``): the budget's next parent if it is the best fresh one."""
        budget, best = row["budget_ms"], self.best[row["budget_ms"]]
        if not row["repeat"] and row[LATENCY] <= budget * (1 + 1e-9) and \
                (best is None or row[self.quality] > best[self.quality]):
            self.best[budget] = row


class SearchSpace:
    """The search space as Optuna's define-by-run function (a class: OptunaSearch pickles its space)."""

    def __init__(self, shape: tuple[int, int, int], low_heads: int, low_neurons: int, drop: int):
        self.args = (tuple(shape), low_heads, low_neurons, drop)

    def __call__(self, trial) -> None:
        suggest(trial, *self.args)


def fixed_params(sub, drop: int) -> dict:
    params = {**{f"heads_{i}": h for i, h in enumerate(sub.heads)}, **{f"neurons_{i}": n for i, n in enumerate(sub.neurons)}}
    if drop:
        params.update({"drop_count": 0, **{f"drop_{j}": 0 for j in range(drop)}})
    return params


def uniform_levels(model, grid: list[float], low_heads: int = 1, low_neurons: int = 1) -> list[tuple[float, object]]:
    """(level, Subnetwork) of every level of ``grid`` on a DS model (the counts its prefix mask keeps),
    those inside the search's bounds."""
    from raysparse.structure import Encoder, Subnetwork, structure_of
    from raysparse.structure.rewire import dynamic_info, prefix_counts

    enc = Encoder(model)
    num_layers, num_heads, ffn = structure_of(model).shape
    match = bool((dynamic_info(model) or {}).get("match_sparsity", False))
    levels = []
    for level in grid:
        heads, neurons = prefix_counts(level, num_heads, ffn, enc.hidden_size, enc.head_dim, match)
        if heads >= low_heads and neurons >= low_neurons:
            levels.append((float(level), Subnetwork.uniform(num_layers, heads, neurons)))
    return levels


def _missing_task(spec: SubnetworkSearchSpec) -> str:
    raise RaysparseError(f"search-subnetworks.task: {spec.model_dir} records no task; name one (e.g. --task tatoeba)")


def _timer(model, spec: SubnetworkSearchSpec):
    """``latency: measured``: each candidate sliced physically (a copy whose embeddings are the
    checkpoint's) and timed directly at the search's batch size, sequence length and threads."""
    from raysparse.efficiency import fixed_threads
    from raysparse.efficiency.latency import time_rounds
    from raysparse.structure import Encoder, shrink_subnetwork

    base = Encoder(model).base
    embeddings = Encoder(base).embeddings

    def measure(sub) -> float:
        small = shrink_subnetwork(copy.deepcopy(base, {id(embeddings): embeddings}), sub).eval()
        with fixed_threads(spec.threads):
            times = time_rounds({"candidate": small}, spec.batch_size, spec.sequence_length, spec.rounds,
                                warmup=2)
        return statistics.median(times["candidate"])

    return measure


__all__ = ["BYTES", "EXAMPLES_FILE", "FLOPS", "KIND", "LATENCY", "OBJECTIVE_MODES", "PARAMS", "SEARCH_FILE",
           "CandidateScorer", "Refiner", "SearchSpace", "SubnetworkSearchSpec", "fixed_params", "refine_candidate",
           "spread_start", "suggest", "uniform_levels"]
