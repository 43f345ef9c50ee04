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

Candidates run in this process (Optuna's ask and tell; ``workers: 0``, the default), or as Ray Tune
trials, ``workers`` at a time on a local Ray or a cluster (:mod:`raysparse.search.subnetwork_trials`):
a candidate costs one evaluation, seconds, so one process is the cheapest on one machine, and Tune
spreads the same candidates over a cluster's workers. Every candidate is one row of a table:
``subnetworks.json`` (with each configuration, what ``raysparse shrink MODEL_DIR --config
subnetworks.json --trial N`` reads), ``candidates.csv``, the Pareto front (``pareto.txt``, one point
file per front member under ``points/``) and a plot; with tracking on, one MLflow run (tag
``raysparse.kind=subnetwork-search``) holds them as artifacts under ``search/``, beside each objective
as a metric over the trial number. What a candidate is and how it is scored:
:mod:`raysparse.search.subnetwork_candidates`.

Two additions serve a user with a latency budget: ``refine`` spends more candidates at each budget (an
evolutionary search under a latency constraint from the best point within it: :func:`refine_candidate`),
because the multi-objective search leaves the sparse budgets thinly covered; and
:meth:`SubnetworkSearchResult.best_within` picks a budget's point, keeping the uniform level unless a
candidate beats it for sure on the search rows (paired bootstrap over ``examples.json``), because the best of
hundreds of noisy averages is biased upwards.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from raysparse.config import parse
from raysparse.errors import RaysparseError
from raysparse.metric_keys import avg_key, worst_key
from raysparse.search.pareto import format_table, pareto_front
from raysparse.search.subnetwork_candidates import (BYTES, EXAMPLES_FILE, FLOPS, KIND, LATENCY, OBJECTIVE_MODES, PARAMS,
                                                    SEARCH_FILE, CandidateScorer, Refiner, SubnetworkSearchSpec,
                                                    fixed_params, suggest, refine_candidate, spread_start, uniform_levels)
from raysparse.search.subnetwork_trials import on_ray


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


def search_subnetworks(spec: SubnetworkSearchSpec | dict | None = None, verbose: bool = True,
                       **fields) -> SubnetworkSearchResult:
    """Search the sub-networks of one DS checkpoint (module docstring); ``spec`` or its fields as keywords
    (``search_subnetworks(model_dir="ds", candidates=50)``). Returns every candidate and the Pareto front."""
    from raysparse.structure.subnetwork import Subnetwork

    data = spec.model_dump() if isinstance(spec, SubnetworkSearchSpec) else dict(spec or {})
    spec = parse(SubnetworkSearchSpec, {**data, **fields})
    started = time.time()
    if spec.refine and spec.latency != "predicted":
        raise RaysparseError("search-subnetworks.refine: fills each candidate up to its budget by the latency table "
                             "(expected latency: predicted)")
    if spec.workers > 1 and spec.latency == "measured":
        raise RaysparseError("search-subnetworks.workers: latency: measured times candidates one at a time, side by "
                             "side they would slow each other (expected workers 0 or 1, or latency: predicted)")
    if spec.address and not spec.workers:
        raise RaysparseError("search-subnetworks.address: a cluster runs the candidates as Tune trials (expected "
                             "workers >= 1 with an address; workers 0 scores them in this process)")
    if spec.workers:
        from raysparse.runner import check_cluster

        check_cluster(spec.address, spec.cpus_per_worker, 0, "search-subnetworks.cpus_per_worker",
                      f"a candidate's actor ({spec.cpus_per_worker:g} CPUs)")
    scorer = CandidateScorer(spec)
    info, task, metric, shape = scorer.info, scorer.task, scorer.metric, scorer.shape
    low_heads, low_neurons, drop, top = scorer.bounds
    if spec.refine and not spec.budgets_ms and not (spec.uniform_levels and info.get("grid")):
        raise RaysparseError("search-subnetworks.budgets_ms: refine needs budgets (expected budgets_ms, or the "
                             "checkpoint's uniform levels with uniform_levels on)")
    objectives = [(_objective_key(name, task.name, metric), OBJECTIVE_MODES[name]) for name in spec.objectives]
    out_dir = Path(spec.out or Path("outputs") / "subnetworks" / spec.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    levels = uniform_levels(scorer.model, info.get("grid") or [], low_heads, low_neurons) if spec.uniform_levels else []
    population = spec.population or max(10, min(50, spec.candidates // 8))
    starts = [sub for _, sub in levels]
    if spec.spread_start:
        starts += spread_start(shape, low_heads, low_neurons, max(0, population - len(levels)), spec.seed)
    plan = _Plan(spec, scorer, objectives, population, starts[:spec.candidates], {sub.key(): lv for lv, sub in levels},
                 spec.budgets_ms or [scorer.table.predict(sub.counts()) for _, sub in levels] if spec.refine else [])
    if verbose:
        print(f"search-subnetworks {spec.name}: {spec.candidates} candidates of {spec.model_dir} ({shape[0]} layers x "
              f"{shape[1]} heads x {shape[2]} neurons; per layer {low_heads}..{shape[1]} heads, {low_neurons}.."
              f"{shape[2]} neurons{f', up to {drop} layers dropped' if drop else ''}), {spec.sampler}; {task.name} "
              f"{metric} on {', '.join(scorer.languages or ['every language'])}, {scorer.evaluation['max_examples']} "
              f"rows each from row {scorer.evaluation['skip_examples']}; latency {spec.latency}; "
              f"{f'{spec.workers} Tune trials at a time' if spec.workers else 'in this process'}", flush=True)
    rows, examples = (on_ray if spec.workers else _in_process)(plan, verbose)

    keys, modes = [key for key, _ in objectives], [mode for _, mode in objectives]
    front = pareto_front([r for r in rows if not r["repeat"]], keys, modes)
    columns = ["trial", "suggested_by", "uniform_level", "layers", "heads", "neurons", "encoder_sparsity",
               *dict.fromkeys([*keys, avg_key(task.name, metric), worst_key(task.name, metric), LATENCY, PARAMS])]
    result = SubnetworkSearchResult(spec.name, spec.model_dir, task.name, metric, objectives, rows, front, out_dir,
                                    columns=columns,
                                    table_summary=scorer.table.summary() if scorer.table is not None else "",
                                    examples={r["trial"]: examples[Subnetwork.from_dict(r["subnetwork"]).key()]
                                              for r in rows if not r["repeat"]})
    result.seconds = time.time() - started
    _write(result, spec, shape, scorer.evaluation, scorer.languages, scorer.bounds)
    if spec.tracking:
        _track(result, spec)
    if verbose:
        print(f"\nPareto front ({len(front)} of {len(rows)} candidates, {result.seconds:.0f}s):\n{result.pareto_table()}")
        if front:
            print(f"\nslice and save a point: {result.shrink_command(front[0]['trial'])}")
        print(f"written: {out_dir}")
    return result


@dataclass
class _Plan:
    """What both executors run: the search's first candidates (fixed), the sampler, refine's budgets."""

    spec: SubnetworkSearchSpec
    scorer: CandidateScorer
    objectives: list[tuple[str, str]]
    population: int
    starts: list
    uniform: dict[str, float]   # configuration key -> its uniform level
    budgets: list[float]

    def sampler(self):
        from raysparse.search.samplers import make_sampler

        return make_sampler(SimpleNamespace(sampler=self.spec.sampler, seed=self.spec.seed,
                                            startup_trials=self.population, num_samples=self.spec.candidates),
                            multi=len(self.objectives) > 1)

    def fixed(self) -> list[dict]:
        return [fixed_params(sub, self.scorer.bounds[2]) for sub in self.starts]

    def mark(self, sub, mark: str) -> str:
        """Who suggested a trial (:func:`~raysparse.search.samplers.trial_mark`), a fixed one named for what it
        is: ``uniform`` or ``spread``."""
        if mark == "fixed":
            return "uniform" if sub.key() in self.uniform else "spread"
        return mark

    def row(self, number: int, suggested: str, sub, values: dict, repeat: bool, budget: float | None = None) -> dict:
        row = {"trial": number, "suggested_by": suggested, "uniform_level": self.uniform.get(sub.key()),
               "repeat": repeat, **values, "subnetwork": sub.to_dict()}
        if budget is not None:
            row["budget_ms"] = budget
        return row

    def refiner(self, rows: list[dict]) -> Refiner:
        scorer = self.scorer
        return Refiner(rows, self.budgets, self.spec.refine, scorer.shape, *scorer.bounds[:2], scorer.table.predict,
                       avg_key(scorer.task.name, scorer.metric), self.spec.seed)

    def show(self, row: dict, total: int) -> None:
        quality = avg_key(self.scorer.task.name, self.scorer.metric)
        if row.get("budget_ms") is not None:
            shown = f"refine {row['budget_ms']:.2f} ms  avg {_cell(row[quality])}  latency {_cell(row[LATENCY])}"
        else:
            shown = f"{row['suggested_by']:7} " + "  ".join(
                f"{key.split('/')[-2] if '/' in key else key} {_cell(row[key])}" for key, _ in self.objectives)
        print(f"[{row['trial'] + 1}/{total}] {shown}  ({row['eval_seconds']:.1f}s{', repeat' if row['repeat'] else ''})",
              flush=True)


def _in_process(plan: _Plan, verbose: bool) -> tuple[list[dict], dict]:
    """Optuna's ask and tell in this process, then refine's candidates: (rows, examples by configuration)."""
    import optuna

    from raysparse.search.samplers import trial_mark

    spec, scorer = plan.spec, plan.scorer
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize" if mode == "max" else "minimize" for _, mode in plan.objectives],
                                sampler=plan.sampler())
    for params in plan.fixed():
        study.enqueue_trial(params)
    seen: dict[str, dict] = {}
    examples: dict[str, dict] = {}
    rows: list[dict] = []
    total = spec.candidates + len(plan.budgets) * spec.refine

    def scored(sub) -> tuple[dict, bool]:
        repeat = sub.key() in seen
        if not repeat:
            seen[sub.key()], examples[sub.key()] = scorer.score(sub)
        return dict(seen[sub.key()]), repeat

    for number in range(spec.candidates):
        trial = study.ask()
        sub = suggest(trial, scorer.shape, *scorer.bounds[:3])
        values, repeat = scored(sub)
        study.tell(trial, [values[key] for key, _ in plan.objectives])
        rows.append(plan.row(number, plan.mark(sub, trial_mark(study, trial)), sub, values, repeat))
        if verbose:
            plan.show(rows[-1], total)
    refiner = plan.refiner(rows)
    while (proposal := refiner.propose()) is not None:
        budget, sub, _ = proposal
        values, repeat = scored(sub)
        rows.append(plan.row(len(rows), "refine", sub, values, repeat, budget))
        refiner.tell(rows[-1])
        if verbose:
            plan.show(rows[-1], total)
    return rows, examples


def _objective_key(name: str, task: str, metric: str) -> str:
    return {"avg": avg_key(task, metric), "worst": worst_key(task, metric), "latency": LATENCY, "params": PARAMS,
            "bytes": BYTES, "flops": FLOPS}[name]


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


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


__all__ = ["CandidateScorer", "Refiner", "SubnetworkSearchResult", "SubnetworkSearchSpec", "refine_candidate",
           "search_subnetworks", "spread_start", "subnetwork_plot", "uniform_levels"]
