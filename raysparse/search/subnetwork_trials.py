"""A sub-network search's candidates as Ray Tune trials (``workers`` > 0).

Each trial scores one candidate; ``workers`` actors run at a time and Tune reuses them
(``reuse_actors``), so each loads the checkpoint once (:class:`CandidateScorer`) and scores many
candidates. Optuna's sampler runs in the driver through ``OptunaSearch`` (the same fixed first
generation as the in-process loop), then refine's candidates through :class:`Refiner` as a Tune
searcher. No trial writes a model, a file or an MLflow run: every row comes back to the driver,
which writes and logs the search as the in-process loop does.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from raysparse.errors import RaysparseError
from raysparse.search.subnetwork_candidates import CandidateScorer, Refiner, SearchSpace, SubnetworkSearchSpec

def on_ray(plan, verbose: bool) -> tuple[list[dict], dict]:
    """The same search with every candidate a Ray Tune trial, in one Tune run: ``workers`` actors at a time,
    each loading the checkpoint once (``reuse_actors``) and scoring one candidate per trial. Optuna's sampler
    proposes through ``OptunaSearch``, then (once its candidates are scored) refine's through
    :class:`Refiner`: one searcher of two phases (:func:`_two_phases`). No trial writes a model or an MLflow
    run: their rows come back to this driver. Returns (rows, examples by configuration)."""
    import ray
    from ray.tune.search.optuna import OptunaSearch

    from raysparse.runner import connect_checked
    from raysparse.search.samplers import suggested_by
    from raysparse.structure import Subnetwork

    spec, scorer = plan.spec, plan.scorer
    connect_checked(spec.address, spec.cpus_per_worker, 0, "search-subnetworks.cpus_per_worker",
                    f"a candidate's actor ({spec.cpus_per_worker:g} CPUs)")
    folder = Path(spec.model_dir).resolve()
    # with several nodes the checkpoint travels through the object store: an actor on another node
    # reads its own copy (its machine need not see this one's files)
    several = sum(bool(node.get("Alive")) for node in ray.nodes()) > 1
    shipped = (ray.get_runtime_context().get_node_id(), ray.put(_folder_files(folder))) if several else None
    trainable = _trainable(spec.model_copy(update={"model_dir": str(folder)}), scorer.table, [shipped])

    keys, modes = [key for key, _ in plan.objectives], [mode for _, mode in plan.objectives]
    multi = len(keys) > 1
    optuna = OptunaSearch(space=SearchSpace(scorer.shape, *scorer.bounds[:3]),
                          metric=keys if multi else keys[0], mode=modes if multi else modes[0],
                          sampler=plan.sampler(), points_to_evaluate=plan.fixed() or None, seed=spec.seed)
    refine = len(plan.budgets) * spec.refine
    searcher = _two_phases(optuna, spec.candidates, plan.refiner if refine else None, keys[0], modes[0])
    total = spec.candidates + refine
    examples: dict[str, dict] = {}   # by configuration: the first trial of each (later ones repeat it)
    rows: list[dict] = []
    for metrics in _fit(trainable, searcher, total, spec):
        sub = Subnetwork.from_dict(json.loads(metrics["candidate"]))
        repeat = sub.key() in examples
        if not repeat:
            examples[sub.key()] = json.loads(metrics["examples"])
        mark = "refine" if "budget_ms" in metrics else plan.mark(sub, suggested_by(optuna, metrics["trial_id"]))
        values = {**json.loads(metrics["values"]), "actor": metrics["actor"]}
        rows.append(plan.row(len(rows), mark, sub, values, repeat, metrics.get("budget_ms")))
        if verbose:
            plan.show(rows[-1], total)
    return rows, examples


def _fit(trainable, searcher, count: int, spec: SubnetworkSearchSpec) -> list[dict]:
    """Run ``count`` Tune trials from ``searcher``; each one's metrics, in the order it suggested them. Tune's
    experiment folder is temporary: the rows come back here, no trial has anything else to keep."""
    from ray import tune

    from raysparse.errors import last_line

    storage = tempfile.mkdtemp(prefix="raysparse-subnetwork-trials-")
    try:
        tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(search_alg=searcher, num_samples=count,
                                                                  max_concurrent_trials=spec.workers,
                                                                  reuse_actors=True),
                           run_config=tune.RunConfig(name=spec.name, storage_path=storage, verbose=0,
                                                     checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False)))
        grid = tuner.fit()
        failed = [r for r in grid if r.error is not None]
        if failed:
            raise RaysparseError(f"search-subnetworks: a candidate's trial failed: {last_line(failed[0].error)}")
        made = {trial_id: k for k, trial_id in enumerate(searcher.order)}
        return [dict(m) for m in sorted((r.metrics for r in grid), key=lambda m: made[m["trial_id"]])]
    finally:
        shutil.rmtree(storage, ignore_errors=True)


def _two_phases(first, count: int, make_refiner, metric: str, mode: str):
    """A Tune searcher: ``first`` (OptunaSearch) suggests ``count`` trials; once all of them are scored,
    ``make_refiner(their rows)`` (a :class:`Refiner`, or None for no refining) proposes the rest, each result
    told back. ``order`` lists the trial ids as suggested."""
    from ray.tune.search import Searcher

    class TwoPhases(Searcher):
        def __init__(self):
            super().__init__(metric=metric, mode=mode)
            self.order: list[str] = []
            self.first_rows: dict[str, dict | None] = {}   # None: the trial failed (the search then fails)
            self.refiner: Refiner | None = None
            self.repeats: dict[str, bool] = {}

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return first.set_search_properties(metric, mode, config, **spec)

        def suggest(self, trial_id: str):
            if len(self.order) < count:
                config = first.suggest(trial_id)
                if isinstance(config, dict):
                    self.order.append(trial_id)
                return config
            if make_refiner is None:
                return Searcher.FINISHED
            if len(self.first_rows) < count:
                return None   # refining starts from every scored candidate: wait for the last ones
            if self.refiner is None:
                self.refiner = make_refiner([row for row in self.first_rows.values() if row is not None])
            proposal = self.refiner.propose()
            if proposal is None:
                return Searcher.FINISHED
            budget, sub, self.repeats[trial_id] = proposal
            self.order.append(trial_id)
            return {"subnetwork": sub.to_dict(), "budget_ms": budget}

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if trial_id not in self.repeats:
                first.on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            row = {**json.loads(result["values"]), "subnetwork": json.loads(result["candidate"])} \
                if result and not error else None
            if trial_id in self.repeats:
                if row is not None:
                    self.refiner.tell({**row, "budget_ms": result["budget_ms"], "repeat": self.repeats[trial_id]})
                return
            first.on_trial_complete(trial_id, result, error)
            self.first_rows[trial_id] = row

        def save(self, checkpoint_path: str) -> None:
            """Nothing to save: a search's rows come back to its driver, which does not resume."""

    return TwoPhases()


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _trainable(spec: SubnetworkSearchSpec, table, shipped: list):
    """The Tune trainable that scores one candidate per trial; its actor builds a :class:`CandidateScorer`
    once (``setup``) and keeps it across trials (``reset_config``)."""
    from ray import tune

    class CandidateTrial(tune.Trainable):
        def setup(self, config, spec: dict, table, shipped: list):
            import ray
            import torch

            spec, self.copy = SubnetworkSearchSpec(**spec), None
            if shipped[0] is not None and ray.get_runtime_context().get_node_id() != shipped[0][0]:
                self.copy = Path(tempfile.mkdtemp(prefix="raysparse-checkpoint-"))   # another node: its own copy
                for name, content in ray.get(shipped[0][1]).items():
                    (self.copy / name).parent.mkdir(parents=True, exist_ok=True)
                    (self.copy / name).write_bytes(content)
                spec = spec.model_copy(update={"model_dir": str(self.copy)})
            torch.set_num_threads(max(1, int(self.trial_resources.required_resources.get("CPU", 1))))
            self.scorer = CandidateScorer(spec, table)
            self.scored: dict[str, tuple[dict, dict]] = {}
            self.actor = ray.get_runtime_context().get_actor_id()

        def cleanup(self) -> None:
            if self.copy is not None:
                shutil.rmtree(self.copy, ignore_errors=True)

        def reset_config(self, new_config) -> bool:
            return True   # the checkpoint stays loaded: a new trial is a new candidate, nothing else

        def save_checkpoint(self, checkpoint_dir: str) -> None:
            return None   # a candidate is scored in one step: nothing to resume

        def load_checkpoint(self, checkpoint) -> None:
            return None

        def step(self):
            from raysparse.structure import Subnetwork

            config = self.config
            sub = Subnetwork.from_dict(config["subnetwork"]) if "subnetwork" in config \
                else self.scorer.candidate(config)
            if sub.key() not in self.scored:
                self.scored[sub.key()] = self.scorer.score(sub)
            values, stats = self.scored[sub.key()]
            extra = {"budget_ms": config["budget_ms"]} if "budget_ms" in config else {}
            objectives = {k: v for k, v in values.items() if isinstance(v, (int, float))}
            return {**objectives, **extra, "values": json.dumps(values), "candidate": json.dumps(sub.to_dict()),
                    "examples": json.dumps(stats), "actor": self.actor, "done": True}

    return tune.with_resources(tune.with_parameters(CandidateTrial, spec=spec.model_dump(), table=table,
                                                    shipped=shipped), {"cpu": spec.cpus_per_worker})


__all__ = ["on_ray"]
