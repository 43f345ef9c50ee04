"""Sub-network search without retraining: Optuna over the per-layer widths of one DS checkpoint.

A Dynamic Sparsification checkpoint (rewired: every layer's heads and neurons in importance order)
holds a sub-network for every choice of heads and neurons kept per layer, and of layers kept
(:class:`~raysparse.structure.Subnetwork`). This search asks Optuna (NSGA-II by default, TPE or random
on request) for such choices and scores each one in seconds, without training and without a copy of
the model: the candidate runs through views of the checkpoint's own weights
(:func:`~raysparse.structure.subnetwork_slices`) while :func:`raysparse.training.evaluate.evaluate`
scores every language on held-out rows. Objectives (any of): the task's primary metric averaged over
languages and on the worst language (max), latency (min; predicted by the per-layer latency table,
:class:`~raysparse.efficiency.LatencyTable`, or timed directly with ``latency: measured``), and
parameters, bytes or FLOPs (min; counted exactly from the widths).

The loop runs in one process (Optuna's ask and tell): a candidate costs one evaluation, seconds, so
Ray Tune trials would spend more on starting actors, loading the checkpoint once per worker and
reporting than on the work. Every candidate is one row of a table: ``subnetworks.json`` (with each
configuration, what ``raysparse shrink MODEL_DIR --config subnetworks.json --trial N`` reads),
``candidates.csv``, the Pareto front (``pareto.txt``, one point file per front member under
``points/``) and a plot; with tracking on, one MLflow run (tag ``raysparse.kind=subnetwork-search``)
holds them as artifacts under ``search/``, beside each objective as a metric over the trial number.

Two additions serve a user with a latency budget: ``refine`` spends more candidates at each budget (an
evolutionary search under a latency constraint from the best point within it: :func:`refine_candidate`),
because the multi-objective search leaves the sparse budgets thinly covered; and
:meth:`SubnetworkSearchResult.best_within` picks a budget's point, keeping the uniform level unless a
candidate beats it for sure on the search rows (paired bootstrap over ``examples.json``), because the best of
hundreds of noisy averages is biased upwards.
"""

from __future__ import annotations

import copy
import csv
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

from pydantic import Field

from raysparse.config import Strict, parse
from raysparse.errors import RaysparseError
from raysparse.metric_keys import avg_key, worst_key
from raysparse.search.pareto import format_table, pareto_front

OBJECTIVE_MODES = {"avg": "max", "worst": "max", "latency": "min", "params": "min", "bytes": "min", "flops": "min"}
LATENCY, PARAMS, BYTES, FLOPS = "latency_ms", "params", "bytes", "flops"
SEARCH_FILE, EXAMPLES_FILE = "subnetworks.json", "examples.json"
KIND = "subnetwork-search"


class SubnetworkSearchSpec(Strict):
    """What a sub-network search scores and how (``raysparse search-subnetworks MODEL_DIR``'s flags)."""

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
    out: str | None = None                      # default: outputs/subnetworks/<name>
    tracking: bool = True                       # log to MLflow (one run; the table and front as artifacts)
    tracking_uri: str | None = None             # default: MLFLOW_TRACKING_URI or the local server
    experiment: str = "raysparse"


@dataclass
class SubnetworkSearchResult:
    """Every candidate's row (its trial number, configuration, objectives, per-language quality) and the
    Pareto front over the search's objectives."""

    name: str
    model_dir: str
    task: str
    metric: str
    objectives: list[tuple[str, str]]          # (row key, "max" | "min")
    rows: list[dict]
    front: list[dict]
    out_dir: Path
    run_id: str | None = None
    tracking_uri: str | None = None
    seconds: float = 0.0
    table_summary: str = ""
    columns: list[str] = field(default_factory=list)
    # trial -> language -> the primary metric's per-example statistics on the search rows (a trial that
    # repeats an earlier configuration has none: its first trial's are the same); examples.json
    examples: dict[int, dict[str, list]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | Path) -> SubnetworkSearchResult:
        """A finished search from the folder it wrote, or its ``subnetworks.json`` (``examples.json`` beside it)."""
        from raysparse.structure.mask import read_json

        path = Path(path)
        search_file = path if path.suffix == ".json" else path / SEARCH_FILE
        out_dir = search_file.parent
        record = read_json(search_file, "search-subnetworks.out", "the subnetworks.json a search wrote")
        if not isinstance(record, dict) or not isinstance(record.get("candidates"), list):
            raise RaysparseError(f"search-subnetworks.out: {search_file} holds no candidates "
                                 "(expected the subnetworks.json a sub-network search wrote)")
        rows, front = record["candidates"], set(record.get("front") or [])
        examples_file = out_dir / EXAMPLES_FILE
        examples = {}
        if examples_file.is_file():
            stored = read_json(examples_file, "search-subnetworks.out", "the examples.json a search wrote")
            examples = {int(trial): stats for trial, stats in (stored.get("trials") or {}).items()}
        return cls(record.get("name", out_dir.name), record.get("checkpoint", ""), record["task"], record["metric"],
                   [tuple(o) for o in record["objectives"]], rows, [r for r in rows if r["trial"] in front], out_dir,
                   seconds=float(record.get("seconds") or 0.0), examples=examples)

    def best_within(self, latency_ms: float, level: float | None = 0.95) -> dict:
        """The candidate to keep at a latency budget: the highest average on the search rows among those whose
        latency fits, *if* it beats the best uniform level that fits with confidence, else that level.

        Why: the search's averages are noisy (a few hundred rows per language put about 1.5 points of noise
        on each), and the best of a few hundred noisy candidates is the one the noise favoured most; a
        non-uniform point that only ties the uniform level tends to lose to it on new rows. The check is
        the paired bootstrap interval of (candidate - level) on the search rows' per-example statistics
        (:func:`raysparse.data.bootstrap.paired_difference`): the candidate is kept when its lower end is
        above zero. Without statistics (BUCC, a search written before they were kept) or without a
        fitting uniform level, the highest average fits; ``level=None`` skips the check (the highest average,
        however narrow its margin). Returns the row, with ``"chosen_because"`` added.
        """
        from raysparse.data.bootstrap import example_form, paired_difference

        quality, worst = avg_key(self.task, self.metric), worst_key(self.task, self.metric)
        fitting = [r for r in self.rows if not r.get("repeat") and r[LATENCY] <= latency_ms * (1 + 1e-9)]
        if not fitting:
            cheapest = min(r[LATENCY] for r in self.rows)
            raise RaysparseError(f"best_within.latency_ms: no candidate within {latency_ms:g} ms (the cheapest: "
                                 f"{cheapest:.2f} ms)")
        rank = lambda r: (r[quality], r[worst], -r[LATENCY])   # noqa: E731
        best = max(fitting, key=rank)
        levels = [r for r in fitting if r.get("uniform_level") is not None]
        if level is None or not levels or best.get("uniform_level") is not None:
            return {**best, "chosen_because": "the highest average within the budget"}
        level_row = max(levels, key=rank)
        form = example_form(self.task)
        mine, theirs = self.examples.get(best["trial"]), self.examples.get(level_row["trial"])
        if form is None or not mine or not theirs:
            return {**best, "chosen_because": "the highest average within the budget (no per-example statistics)"}
        low, high = paired_difference(form, theirs, mine, level=level)["avg"]
        if low > 0:
            return {**best, "chosen_because": f"above uniform level {level_row['uniform_level']:g} by "
                                              f"{100 * low:+.1f}..{100 * high:+.1f} points ({level:.0%} paired)"}
        return {**level_row, "chosen_because": f"trial {best['trial']} is not surely better: "
                                               f"{100 * low:+.1f}..{100 * high:+.1f} points ({level:.0%} paired)"}

    def table(self) -> str:
        return format_table(self.rows, self.columns)

    def pareto_table(self) -> str:
        return format_table(self.front, self.columns)

    def row(self, trial: int) -> dict:
        found = [r for r in self.rows if r["trial"] == trial]
        if not found:
            raise RaysparseError(f"search-subnetworks.trial: no trial {trial} (trials 0..{len(self.rows) - 1})")
        return found[0]

    def subnetwork(self, trial: int):
        from raysparse.structure import Subnetwork

        return Subnetwork.from_dict(self.row(trial)["subnetwork"])

    def shrink_command(self, trial: int, out: str = "OUT_DIR") -> str:
        return (f"raysparse shrink {self.model_dir} --config {self.out_dir / 'subnetworks.json'} --trial {trial} "
                f"--out {out}")


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


def _suggest(trial, shape: tuple[int, int, int], low_heads: int, low_neurons: int, drop: int):
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


def _fixed_params(sub, drop: int) -> dict:
    params = {**{f"heads_{i}": h for i, h in enumerate(sub.heads)}, **{f"neurons_{i}": n for i, n in enumerate(sub.neurons)}}
    if drop:
        params.update({"drop_count": 0, **{f"drop_{j}": 0 for j in range(drop)}})
    return params


def search_subnetworks(spec: SubnetworkSearchSpec | dict | None = None, verbose: bool = True,
                       **fields) -> SubnetworkSearchResult:
    """Search the sub-networks of one DS checkpoint (module docstring); ``spec`` or its fields as keywords
    (``search_subnetworks(model_dir="ds", candidates=50)``). Returns every candidate and the Pareto front."""
    import optuna

    from raysparse.data.tasks import get_task
    from raysparse.models.sources import load_tokenizer
    from raysparse.paths import data_dir as resolve_data_dir
    from raysparse.search.samplers import SUGGESTED_BY, make_sampler
    from raysparse.structure import load_dynamic, structure_of, subnetwork_slices
    from raysparse.structure.subnetwork import Costs, Subnetwork
    from raysparse.training.evaluate import check_head, evaluate

    data = spec.model_dump() if isinstance(spec, SubnetworkSearchSpec) else dict(spec or {})
    spec = parse(SubnetworkSearchSpec, {**data, **fields})
    started = time.time()
    info, extra = _checkpoint(spec)
    recorded = extra.get("evaluation") or {}
    task = get_task(spec.task or extra.get("task") or _missing_task(spec))
    metric = task.primary_metric
    resolve_data_dir(spec.data_dir)
    languages = spec.languages or recorded.get("languages")
    evaluation = {"max_examples": spec.max_examples or recorded.get("max_examples") or 100,
                  "skip_examples": spec.skip_examples if spec.skip_examples is not None
                  else int(recorded.get("skip_examples") or 0),
                  "seed": spec.eval_seed if spec.eval_seed is not None else int(recorded.get("seed", 0)),
                  "train_fraction": spec.train_fraction or float(recorded.get("train_fraction", 0.5))}
    folder = Path(spec.model_dir)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise RaysparseError(f"search-subnetworks.model_dir: {folder} holds no tokenizer (expected the checkpoint "
                             "folder a DS run logs, tokenizer included)")
    model = load_dynamic(folder).eval()
    check_head(model, task)
    tokenizer = load_tokenizer(str(folder))
    shape = structure_of(model).shape
    low_heads, low_neurons, drop, top = _bounds(model, info, spec)
    costs = Costs.of(model)
    objectives = [(_objective_key(name, task.name, metric), OBJECTIVE_MODES[name]) for name in spec.objectives]
    out_dir = Path(spec.out or Path("outputs") / "subnetworks" / spec.name)
    out_dir.mkdir(parents=True, exist_ok=True)

    if spec.refine and spec.latency != "predicted":
        raise RaysparseError("search-subnetworks.refine: fills each candidate up to its budget by the latency table "
                             "(expected latency: predicted)")
    if spec.refine and not spec.budgets_ms and not (spec.uniform_levels and info.get("grid")):
        raise RaysparseError("search-subnetworks.budgets_ms: refine needs budgets (expected budgets_ms, or the "
                             "checkpoint's uniform levels with uniform_levels on)")
    table = None
    time_candidate = None
    if spec.latency == "predicted":
        from raysparse.efficiency import LatencyTable
        from raysparse.structure import Encoder

        table = LatencyTable.cached(Encoder(model).base, spec.batch_size, spec.sequence_length, threads=spec.threads,
                                    cache=spec.latency_table, rounds=spec.rounds)
    else:
        time_candidate = _timer(model, spec)

    def score(sub: Subnetwork) -> dict:
        began = time.perf_counter()
        with subnetwork_slices(model, sub):
            result = evaluate(model, tokenizer, task, languages, data_dir=spec.data_dir,
                              max_examples=evaluation["max_examples"], skip_examples=evaluation["skip_examples"],
                              batch_size=spec.eval_batch_size, seed=evaluation["seed"],
                              train_fraction=evaluation["train_fraction"],
                              max_length=spec.max_length or recorded.get("max_length"),
                              stride=int(recorded.get("stride") or 128), verbose=False)
        row = {k: v for k, v in result.metrics.items() if k.startswith(f"{task.name}/")}
        examples[sub.key()] = result.example_stats
        heads, neurons = sub.counts()
        row.update({"layers": len(heads), "heads": sum(heads), "neurons": sum(neurons),
                    "encoder_sparsity": costs.encoder_sparsity(sub), PARAMS: costs.params(sub),
                    BYTES: costs.bytes(sub), FLOPS: costs.flops(sub, spec.sequence_length),
                    "eval_seconds": time.perf_counter() - began})
        row[LATENCY] = table.predict((heads, neurons)) if table is not None else time_candidate(sub)
        return row

    levels = uniform_levels(model, info.get("grid") or [], low_heads, low_neurons) if spec.uniform_levels else []

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    population = spec.population or max(10, min(50, spec.candidates // 8))
    sampler = make_sampler(SimpleNamespace(sampler=spec.sampler, seed=spec.seed, startup_trials=population,
                                           num_samples=spec.candidates), multi=len(objectives) > 1)
    study = optuna.create_study(directions=["maximize" if mode == "max" else "minimize" for _, mode in objectives],
                                sampler=sampler)
    starts = [sub for _, sub in levels]
    if spec.spread_start:
        starts += spread_start(shape, low_heads, low_neurons, max(0, population - len(levels)), spec.seed)
    for sub in starts[:spec.candidates]:
        study.enqueue_trial(_fixed_params(sub, drop))
    uniform = {sub.key(): level for level, sub in levels}
    seen: dict[str, dict] = {}
    examples: dict[str, dict] = {}
    rows: list[dict] = []
    if verbose:
        print(f"search-subnetworks {spec.name}: {spec.candidates} candidates of {folder} ({shape[0]} layers x "
              f"{shape[1]} heads x {shape[2]} neurons; per layer {low_heads}..{shape[1]} heads, {low_neurons}.."
              f"{shape[2]} neurons{f', up to {drop} layers dropped' if drop else ''}), {spec.sampler}; {task.name} "
              f"{metric} on {', '.join(languages or ['every language'])}, {evaluation['max_examples']} rows each "
              f"from row {evaluation['skip_examples']}; latency {spec.latency}", flush=True)
    for number in range(spec.candidates):
        trial = study.ask()
        sub = _suggest(trial, shape, low_heads, low_neurons, drop)
        repeat = sub.key() in seen
        values = dict(seen[sub.key()]) if repeat else score(sub)
        seen.setdefault(sub.key(), values)
        study.tell(trial, [values[key] for key, _ in objectives])
        attrs = study._storage.get_trial(trial._trial_id).system_attrs
        suggested = ("uniform" if sub.key() in uniform else "spread") if "fixed_params" in attrs \
            else attrs.get(SUGGESTED_BY, "random")
        row = {"trial": number, "suggested_by": suggested, "uniform_level": uniform.get(sub.key()),
               "repeat": repeat, **values, "subnetwork": sub.to_dict()}
        rows.append(row)
        if verbose:
            shown = "  ".join(f"{key.split('/')[-2] if '/' in key else key} {_cell(row[key])}" for key, _ in objectives)
            print(f"[{number + 1}/{spec.candidates}] {suggested:7} {shown}  "
                  f"({row['eval_seconds']:.1f}s{', repeat' if repeat else ''})", flush=True)

    if spec.refine:
        budgets = spec.budgets_ms or [table.predict(sub.counts()) for _, sub in levels]
        quality = avg_key(task.name, metric)
        for budget in budgets:
            fitting = [r for r in rows if r[LATENCY] <= budget * (1 + 1e-9)]
            best = max(fitting, key=lambda r: r[quality]) if fitting else None
            rng = random.Random(f"{spec.seed}/{budget:.6f}")
            for _ in range(spec.refine):
                parent = Subnetwork.from_dict(best["subnetwork"]) if best else None
                sub = None
                for _attempt in range(10):   # a fresh configuration, if ten draws find one
                    sub = refine_candidate(parent, shape, low_heads, low_neurons, budget, table.predict, rng)
                    if sub.key() not in seen:
                        break
                repeat = sub.key() in seen
                values = dict(seen[sub.key()]) if repeat else score(sub)
                seen.setdefault(sub.key(), values)
                row = {"trial": len(rows), "suggested_by": "refine", "uniform_level": uniform.get(sub.key()),
                       "repeat": repeat, **values, "subnetwork": sub.to_dict(), "budget_ms": budget}
                rows.append(row)
                if not repeat and row[LATENCY] <= budget * (1 + 1e-9) and (best is None or row[quality] > best[quality]):
                    best = row
                if verbose:
                    print(f"[refine {budget:.2f} ms] trial {row['trial']}  avg {_cell(row[quality])}  latency "
                          f"{_cell(row[LATENCY])}  (best {_cell(best[quality])}{', repeat' if repeat else ''})",
                          flush=True)

    keys, modes = [key for key, _ in objectives], [mode for _, mode in objectives]
    front = pareto_front([r for r in rows if not r["repeat"]], keys, modes)
    columns = ["trial", "suggested_by", "uniform_level", "layers", "heads", "neurons", "encoder_sparsity",
               *dict.fromkeys([*keys, avg_key(task.name, metric), worst_key(task.name, metric), LATENCY, PARAMS])]
    result = SubnetworkSearchResult(spec.name, str(folder), task.name, metric, objectives, rows, front, out_dir,
                                    columns=columns, table_summary=table.summary() if table is not None else "",
                                    examples={r["trial"]: examples[Subnetwork.from_dict(r["subnetwork"]).key()]
                                              for r in rows if not r["repeat"]})
    result.seconds = time.time() - started
    _write(result, spec, shape, evaluation, languages, (low_heads, low_neurons, drop, top))
    if spec.tracking:
        _track(result, spec)
    if verbose:
        print(f"\nPareto front ({len(front)} of {len(rows)} candidates, {result.seconds:.0f}s):\n{result.pareto_table()}")
        if front:
            print(f"\nslice and save a point: {result.shrink_command(front[0]['trial'])}")
        print(f"written: {out_dir}")
    return result


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


def _objective_key(name: str, task: str, metric: str) -> str:
    return {"avg": avg_key(task, metric), "worst": worst_key(task, metric), "latency": LATENCY, "params": PARAMS,
            "bytes": BYTES, "flops": FLOPS}[name]


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


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


def _write(result: SubnetworkSearchResult, spec: SubnetworkSearchSpec, shape, evaluation: dict, languages,
           space: tuple) -> None:
    """``subnetworks.json`` (every candidate with its configuration), ``candidates.csv``, the front as text
    and one point file per member, and the plot."""
    out = result.out_dir
    low_heads, low_neurons, drop, top = space
    record = {"name": result.name, "checkpoint": str(Path(result.model_dir).resolve()), "task": result.task,
              "metric": result.metric, "objectives": [list(o) for o in result.objectives],
              "space": {"shape": list(shape), "min_heads": low_heads, "min_neurons": low_neurons, "drop_layers": drop,
                        "max_sparsity": top},
              "evaluation": {**evaluation, "languages": languages}, "spec": spec.model_dump(),
              "seconds": result.seconds, "front": [r["trial"] for r in result.front], "candidates": result.rows}
    (out / SEARCH_FILE).write_text(json.dumps(record, indent=1, default=str))
    (out / EXAMPLES_FILE).write_text(json.dumps({"task": result.task, "metric": result.metric,
                                                 "trials": result.examples}))
    with (out / "candidates.csv").open("w", newline="") as stream:
        names = list(dict.fromkeys(k for r in result.rows for k in r if k != "subnetwork"))
        writer = csv.DictWriter(stream, [*names, "heads_per_layer", "neurons_per_layer", "kept_layers"])
        writer.writeheader()
        for row in result.rows:
            sub = row["subnetwork"]
            writer.writerow({**{k: v for k, v in row.items() if k != "subnetwork"},
                             "heads_per_layer": " ".join(map(str, sub["heads"])),
                             "neurons_per_layer": " ".join(map(str, sub["neurons"])),
                             "kept_layers": " ".join(map(str, sub["layers"]))})
    (out / "pareto.txt").write_text(result.pareto_table() + "\n")
    points = out / "points"
    points.mkdir(exist_ok=True)
    for row in result.front:
        (points / f"trial-{row['trial']}.json").write_text(json.dumps(row["subnetwork"]))
    figure = subnetwork_plot(result.rows, avg_key(result.task, result.metric), LATENCY,
                             worst_key(result.task, result.metric))
    figure.savefig(out / "pareto.png", dpi=120)
    import matplotlib.pyplot as plt

    plt.close(figure)


def subnetwork_plot(rows: list[dict], quality: str, latency: str = LATENCY, worst: str | None = None):
    """Quality against latency: every candidate (grey), the front of the two (red; dashed below it the
    worst language of its points) and the uniform levels (blue squares, labelled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4.2))
    done = [r for r in rows if isinstance(r.get(quality), (int, float)) and isinstance(r.get(latency), (int, float))]
    searched = [r for r in done if r.get("uniform_level") is None]
    axis.scatter([r[latency] for r in searched], [r[quality] for r in searched], s=10, color="#999999",
                 label="candidates")
    front = sorted(pareto_front(done, [quality, latency], ["max", "min"]), key=lambda r: r[latency])
    axis.plot([r[latency] for r in front], [r[quality] for r in front], "o-", color="#c44e52", ms=4,
              label="front (avg vs latency)")
    if worst:
        axis.plot([r[latency] for r in front], [r.get(worst, float("nan")) for r in front], "x--", color="#c44e52",
                  alpha=0.6, label="its worst language")
    levels = sorted((r for r in done if r.get("uniform_level") is not None), key=lambda r: r[latency])
    if levels:
        axis.plot([r[latency] for r in levels], [r[quality] for r in levels], "s-", color="#4c72b0", ms=5,
                  label="uniform levels")
    for r in levels:
        axis.annotate(f"{r['uniform_level']:g}", (r[latency], r[quality]), fontsize=7, xytext=(3, -9),
                      textcoords="offset points")
    axis.set_xlabel(f"{latency} (lower is better)")
    axis.set_ylabel(quality)
    axis.set_title("sub-networks of one DS checkpoint, no retraining")
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def _track(result: SubnetworkSearchResult, spec: SubnetworkSearchSpec) -> None:
    """One MLflow run: the search's settings as params, each objective over the trial number, the front's
    size and best values as metrics, everything written to ``out`` as artifacts under ``search/``."""
    from raysparse.tracking.runs import RunLogger, open_run, spec_key
    from raysparse.tracking.server import resolve_tracking_uri

    uri = resolve_tracking_uri(spec.tracking_uri)
    weights = Path(spec.model_dir) / "model.safetensors"
    stamp = [weights.stat().st_size, weights.stat().st_mtime_ns] if weights.is_file() else []
    key = spec_key({"kind": KIND, **spec.model_dump(exclude={"out", "tracking", "tracking_uri"}),
                    "checkpoint": [str(Path(spec.model_dir).resolve()), *stamp]})
    run_id, _ = open_run(uri, spec.experiment, key, spec.name,
                         params={"search": spec.model_dump(exclude={"tracking_uri"}), "task": result.task},
                         tags={"raysparse.kind": KIND, "raysparse.search": spec.name,
                               "raysparse.checkpoint": str(Path(spec.model_dir).resolve())})
    log = RunLogger(uri, run_id)
    try:
        for row in result.rows:
            log.metrics({f"candidate/{key}": row[key] for key, _ in result.objectives}, step=row["trial"])
        summary = {"candidates": len(result.rows), "pareto_size": len(result.front), "seconds": result.seconds,
                   "repeats": sum(bool(r["repeat"]) for r in result.rows)}
        for key, mode in result.objectives:
            values = [r[key] for r in result.rows]
            summary[f"best/{key}"] = max(values) if mode == "max" else min(values)
        log.metrics(summary)
        log.artifact(result.out_dir, "search")
        log.finish("FINISHED")
    except Exception:
        log.finish("FAILED")
        raise
    result.run_id, result.tracking_uri = run_id, uri


__all__ = ["SubnetworkSearchResult", "SubnetworkSearchSpec", "refine_candidate", "search_subnetworks",
           "subnetwork_plot", "uniform_levels"]
