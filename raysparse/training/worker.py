"""The pipeline of a run: fine-tune -> prune (score, select) -> recover -> evaluate -> finalize.

:class:`Run` executes the stages of one spec wherever a :class:`~raysparse.training.session.Session`
puts it: on every Ray Train worker (:func:`raysparse.training.pipeline.train_loop_per_worker`) or in the calling process
(:func:`raysparse.runner.run_in_process`, behind ``raysparse prune``). Gradients are averaged
by DDP; unit scores are summed over workers so every rank selects the same masks; only
rank 0 evaluates, measures, saves and logs to MLflow. After each stage and every
``resources.checkpoint_every`` steps the run reports a checkpoint; a restarted worker
group (a killed worker) or a rerun of the same spec (a killed driver) resumes from it.

Every stage that trains calls the one loop (:mod:`raysparse.training.loop`); what a
schedule or a learning algorithm adds plugs in as a callback. Recovery trains the model
at the size it keeps: once a round of selection ends, the model is shrunk physically to
the union of its masks (the mask itself in the shared setting; per-language masks gate
only what their language drops inside that union), so a step costs what the kept
model costs. The dense fine-tuned copy stays as the distillation teacher.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
import zlib
from functools import reduce
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from raysparse.config import RunSpec
from raysparse.errors import RaysparseError
from raysparse.pruning import Selection, UnitScores, algorithm_for, cubic_sparsity, select_mask
from raysparse.structure import Encoder, Mask, UnitGates, attach_gates, retrieval_prompt, shrink
from raysparse.structure.shrink import mask_rows_for
from raysparse.training import mask_tuning
from raysparse.training.finetune import freeze_word_embeddings
from raysparse.training.loop import (Callback, Every, Forward, Progress, SeededSteps, WithoutDropout, make_optimizer,
                                     single, train)
from raysparse.training.session import RayTrainSession, Session
from raysparse.training.state import (STAGES, RunState, load_optimizer, load_weights, read_optimizer, save_optimizer,
                                      save_weights)
from raysparse.training.taskdata import TaskData

SHARED = "shared"


def all_reduce_scores(scores: UnitScores) -> UnitScores:
    """Sum scores over workers so every rank selects the same mask (-inf stays -inf)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return scores
    out = []
    for tensor in (scores.heads, scores.neurons, scores.layers):
        if tensor is None:
            out.append(None)
            continue
        finite = torch.isfinite(tensor)
        summed = torch.where(finite, tensor, torch.zeros_like(tensor)).contiguous()
        dist.all_reduce(summed)
        out.append(summed.masked_fill(~finite, float("-inf")))
    return UnitScores(*out)


def broadcast_mask(mask: Mask | None, scores: UnitScores) -> Mask:
    """Rank 0's ``mask`` on every rank (the others pass None), shaped like ``scores``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mask
    device = scores.heads.device
    if mask is None:
        shapes = (scores.heads.shape, scores.neurons.shape, scores.heads.shape[:1])
        tensors = [torch.zeros(shape, dtype=torch.uint8, device=device) for shape in shapes]
    else:
        tensors = [t.to(device, torch.uint8) for t in (mask.kept_heads, mask.kept_neurons, mask.kept_layers)]
    for tensor in tensors:
        dist.broadcast(tensor, 0)
    return Mask(*(tensor.cpu().bool() for tensor in tensors))


def union_of(masks) -> Mask:
    """The units any of ``masks`` keeps: the shape recovery trains at."""
    return reduce(Mask.union, masks)


class LearnedImportance(Callback):
    """Movement and L0 learn their scores while the model trains: gates, a regulariser, gradients."""

    def __init__(self, algorithm, model: nn.Module, total: int):
        self.algorithm, self.model, self.total = algorithm, model, total
        algorithm.attach(model)

    def param_groups(self) -> list[dict]:
        return self.algorithm.extra_parameters()

    def extra_loss(self, step: int) -> torch.Tensor | None:
        return self.algorithm.regularization(step, self.total)

    def after_backward(self, step: int) -> None:
        self.algorithm.after_backward(self.model, step)

    def on_end(self) -> None:
        self.algorithm.detach(self.model)


class GradualPruning(Callback):
    """Cubic ramp (Zhu & Gupta): every ``prune_every`` steps, re-score and tighten the shared mask."""

    def __init__(self, run: "Run", rows: list, total: int):
        self.run, self.rows, self.total = run, rows, total
        schedule = run.spec.pruning
        self.every, self.end = schedule.prune_every, int(total * schedule.ramp_fraction)
        mask = run.state.masks.get(SHARED)
        self.handle = attach_gates(run.model, run.gates_for(mask)) if mask is not None else None

    def on_step_end(self, step: int, loss: float) -> None:
        if step % self.every:
            return
        run = self.run
        target = cubic_sparsity(step, self.total, run.spec.pruning.sparsity, end_step=self.end)
        base = run.state.masks.get(SHARED)
        if target <= (0.0 if base is None else _sparsity(run.model, base)) + 1e-9:
            return
        if self.handle is not None:
            self.handle.remove()
        scores = run.score(self.rows, base)
        run.state.masks[SHARED] = run.select(scores, target, base)
        if run.is_chief:
            print(f"[gradual] step {step}: sparsity {target:.3f}", flush=True)
        self.handle = attach_gates(run.model, run.gates_for(run.state.masks[SHARED]))

    def on_end(self) -> None:
        if self.handle is not None:
            self.handle.remove()


class Run:
    """State and stages of one run on one worker (or in one process)."""

    def __init__(self, config: dict, session: Session | None = None):
        from raysparse.data.tasks import get_task
        from raysparse.models.sources import load_encoder, load_tokenizer
        from raysparse.tracking.runs import RunLogger
        from raysparse.training.batches import build_task_model

        self.session = session or RayTrainSession()
        self.spec = RunSpec.model_validate(config["spec"])
        self.languages: dict[str, list[str]] = config["languages"]
        self.storage: str | None = config.get("storage")      # where the stage cache lives (<storage>/cache)
        self.run_id: str | None = config.get("run_id")
        self.rank, self.world_size = self.session.rank, self.session.world_size
        self.is_chief = self.session.is_chief
        self.log = RunLogger(config.get("tracking_uri"), config.get("run_id") if self.is_chief else None)
        # which node does the work (on a cluster, where to look for logs) and how: Ray Train workers,
        # a Tune trial's own process, or the calling process
        self.log.tags({"raysparse.executor": type(self.session).__name__,
                       **({"raysparse.node_id": self.session.node_id} if self.session.node_id else {})})
        torch.manual_seed(self.spec.seed)
        self.task = get_task(self.spec.data.task)
        trust = self.spec.model.trust_remote_code
        self.tokenizer = load_tokenizer(self.spec.model.source, trust_remote_code=trust)
        self.model = build_task_model(load_encoder(self.spec.model.source, trust_remote_code=trust), self.task,
                                      seed=self.spec.seed)
        if self.spec.finetune.freeze_word_embeddings:
            freeze_word_embeddings(self.model)
        # Weights no stage changes: checkpoints leave them out, a restart reloads them from the source.
        self.frozen = frozenset(name for name, p in self.model.named_parameters() if not p.requires_grad)
        self.data = TaskData(self.spec, self.tokenizer, self.rank, self.world_size, prompt=retrieval_prompt(self.model))
        self.algorithm = build_algorithm(self.spec)
        pruning = self.spec.pruning
        self.selection = Selection(pruning.scope, pruning.normalize, pruning.round_to, head_ratio=pruning.head_ratio)
        self.teacher: nn.Module | None = None
        self.sizes: dict = {}                      # finalize: "dense" and each mask's shrunk Size
        self.observers: list[Callback] = []        # callbacks every training stage runs too (timers, notebooks)
        self.state = RunState()
        self.optimizer_state: dict | None = None   # from the checkpoint a restarted run resumes
        self.reported = False
        with self.session.restore() as folder:
            if folder is not None:
                self._load_checkpoint(folder)
                self._resumed()
        self._clock = (self.state.stage, time.time(), time.process_time())
        self.ddp = self._wrap(self.model)

    # --- checkpoints --------------------------------------------------------------------
    def _resumed(self) -> None:
        self.state.metrics["resumes"] = resumes = self.state.metrics.get("resumes", 0) + 1
        if self.is_chief:
            print(f"[resume] continuing at stage {self.state.stage}, step {self.state.step}", flush=True)
            self.log.resumed()   # the steps it repeats are not logged twice
            self.log.metrics({"resumes": resumes}, step=resumes)

    def _load_checkpoint(self, folder: Path) -> None:
        self.state = RunState.load(folder)
        if (folder / "teacher.safetensors").is_file():   # the dense teacher, before the student is reshaped
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
            load_weights(self.teacher, folder / "teacher.safetensors", self.frozen)
        self._before_weights_load()
        load_weights(self.model, folder / "model.safetensors", self.frozen)
        if (folder / "algorithm.safetensors").is_file() and hasattr(self.algorithm, "load_state_dict"):
            self.algorithm.load_state_dict(load_file(str(folder / "algorithm.safetensors")))
        self.optimizer_state = read_optimizer(folder / "optimizer.pt")

    def _before_weights_load(self) -> None:
        """Give the model the shape the checkpoint holds: shrunk once a round of selection ended."""
        if self._selected():
            shrink(self.model, union_of(self.state.masks.values()))

    def _selected(self) -> bool:
        """Whether selection has fixed masks the model is shrunk to (not gradual's moving ones)."""
        stage = STAGES.index(self.state.stage)
        return bool(self.state.masks) and self.spec.recovery.shrink and (stage > STAGES.index("prune")
                                           or (stage == STAGES.index("prune") and self.state.prune_round > 0))

    def report(self, metrics: dict | None = None, optimizer=None, scheduler=None, checkpoint: bool = True) -> None:
        """Report progress (all ranks); rank 0 attaches a checkpoint of the full state."""
        self.reported = True
        self._charge_time()
        values = {"stage_index": float(STAGES.index(self.state.stage)), "stage_step": float(self.state.step)}
        values.update(self.state.metrics)
        values.update(metrics or {})

        def write(folder: Path) -> None:
            self.state.save(folder)
            save_weights(self.model, folder / "model.safetensors", self.frozen)
            if self.teacher is not None:
                save_weights(self.teacher, folder / "teacher.safetensors", self.frozen)
            state = algorithm_state(self.algorithm)
            if state:
                save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "algorithm.safetensors"))
            if optimizer is not None:
                save_optimizer(optimizer, scheduler, folder / "optimizer.pt")

        self.session.report(values, write if checkpoint else None)

    def _charge_time(self) -> None:
        """Add the wall and CPU seconds since the last report to the stage they were spent in.

        ``cost/<stage>/cpu_s`` counts every thread of this worker, so it is the CPU work a
        stage took whatever the machine's load; checkpoints carry it across restarts.
        """
        stage, wall, cpu = self._clock
        now, now_cpu = time.time(), time.process_time()
        metrics = self.state.metrics
        metrics[f"cost/{stage}/wall_s"] = metrics.get(f"cost/{stage}/wall_s", 0.0) + now - wall
        metrics[f"cost/{stage}/cpu_s"] = metrics.get(f"cost/{stage}/cpu_s", 0.0) + now_cpu - cpu
        self._clock = (self.state.stage, now, now_cpu)

    def _wrap(self, model: nn.Module) -> nn.Module:
        """Move to this worker's device; wrap in DDP when there are several workers."""
        wrapped = self.session.wrap(model)
        if self.teacher is not None:
            self.teacher.to(next(model.parameters()).device)
        return wrapped

    # --- building blocks -------------------------------------------------------------------
    def gates_for(self, mask: Mask) -> UnitGates:
        """``mask`` (original coordinates) as gate rows of the model's current (maybe shrunk) layers."""
        heads, neurons, layers = mask_rows_for(self.model, mask)
        return UnitGates(heads, neurons, layers)

    def score(self, rows: list, base: Mask | None, salt: int = 0) -> UnitScores:
        """The algorithm's unit scores on ``scoring_examples`` rows, summed over workers; scores of the
        dense model come from the stage cache when another run computed the same ones."""
        spec = self.spec
        count = max(1, spec.pruning.scoring_examples // (spec.finetune.batch_size * self.world_size))
        batches = self.data.batches(rows, 0, count, spec.finetune.batch_size, salt=1000 + salt)
        compute = lambda: all_reduce_scores(self._score(batches, base))  # noqa: E731
        store = self._stage_cache() if base is None and self._scores_cacheable() else None
        if store is None:
            return compute()
        from raysparse.training.stage_cache import tensors_digest

        fields = type(self.algorithm).Options.model_fields if hasattr(type(self.algorithm), "Options") else {}
        determinants = {"model": tensors_digest(self.model.state_dict()), "batches": tensors_digest(batches),
                        "algorithm": spec.pruning.algorithm, "options": spec.pruning.options,
                        **({"seed": spec.seed} if "seed" in fields else {}),
                        **({"target_sparsity": spec.pruning.sparsity} if "target_sparsity" in fields else {})}

        def tensors(alive) -> dict[str, torch.Tensor]:
            scores = compute()
            return {name: value for name, value in
                    (("heads", scores.heads), ("neurons", scores.neurons), ("layers", scores.layers))
                    if value is not None}

        found = self._cached_tensors(store, "scores", determinants, tensors, "scores.safetensors")
        return UnitScores(found["heads"], found["neurons"], found.get("layers"))

    def _score(self, batches: list, base: Mask | None) -> UnitScores:
        was_training = self.model.training
        scores = self.algorithm.score(self.model, batches, self.data.loss, base)
        self.model.train(was_training)
        return scores

    def _scores_cacheable(self) -> bool:
        """Scores a method computes from the model and data alone (not learned while training, and no
        mask the method decides itself from state it keeps), taken in the prune stage (not gradual's
        moving model), with ``finetune.cache`` on."""
        from raysparse.pruning.registry import Importance

        algorithm = type(self.algorithm)
        return (self.spec.finetune.cache and self.state.stage == "prune" and not algorithm.learns_during_training
                and algorithm.final_mask is Importance.final_mask)

    def select(self, scores: UnitScores, target: float, base: Mask | None) -> Mask:
        if self.spec.pruning.latency_target is not None:   # a latency budget instead of the sparsity
            return self._select_to_latency(scores, base)
        enc = Encoder(self.model)
        return select_mask(scores, target, enc.hidden_size, enc.head_dim, self.selection, base)

    def _select_to_latency(self, scores: UnitScores, base: Mask | None) -> Mask:
        """``pruning.latency_target``: rank 0 builds (or reads from the cache) the latency table of the run's
        model on its device and keeps the most important units per predicted ms that fit the budget
        (``latency/target_ms``, ``latency/predicted_ms``); every other rank receives that mask."""
        from raysparse.efficiency.latency_table import fit_latency_target

        mask = None
        if self.is_chief:
            fit = fit_latency_target(self.model, scores, self.spec.pruning.latency_target, self.spec.efficiency,
                                     self.selection, base)
            mask, table = fit.mask, fit.table
            values = {"latency/target_ms": fit.target_ms, "latency/predicted_ms": fit.predicted_ms,
                      "latency/dense_predicted_ms": fit.dense_ms}
            self.state.metrics.update(values)
            self.log.metrics(values)
            self.log.json(table.to_dict(), "results/latency_table.json")
            print(f"[prune] latency target {fit.target_ms:.3f} ms at batch {table.batch_size} (dense predicted "
                  f"{fit.dense_ms:.3f} ms; table {table.origin}): predicted {fit.predicted_ms:.3f} ms", flush=True)
        return broadcast_mask(mask, scores)

    def fit(self, stage: str, objective, optimizer, scheduler, steps: int, callbacks: list[Callback] = (),
            resumable: bool = True, progress: Progress | None = None) -> None:
        """The one loop, with what every stage wants: step counting for resume, progress, MLflow
        curves (``<stage>/loss`` every 10 steps) and checkpoints every ``resources.checkpoint_every``."""
        every = self.spec.resources.checkpoint_every
        extra_metrics = [c for c in callbacks if isinstance(c, LearnedImportance)]

        def count(step: int, loss: float) -> None:
            self.state.step = step

        def log(step: int, loss: float) -> None:
            values = {f"{stage}/loss": loss}
            for callback in extra_metrics:
                values.update({f"{stage}/{k}": v for k, v in callback.algorithm.metrics().items()})
            self.log.metrics(values, step=step)

        def checkpoint(step: int, loss: float) -> None:
            if step < steps:
                self.report({f"{stage}/loss": loss}, optimizer, scheduler)

        watchers = [Every(1, count), Every(10, log, steps), Every(every, checkpoint)] if resumable else []
        seeded = SeededSteps(self.spec.seed + zlib.crc32(stage.encode()))
        train(self.ddp, objective, optimizer, scheduler, steps, start=self.state.step if resumable else 0,
              callbacks=[seeded, *callbacks, progress or Progress(stage, steps, self.is_chief), *watchers, *self.observers],
              no_sync=self.session.no_sync(self.ddp))

    def optimizer(self, learning_rate: float, steps: int, warmup_ratio: float, callbacks: list[Callback] = (),
                  resume: bool = True):
        groups = [group for callback in callbacks for group in callback.param_groups()]
        optimizer, scheduler = make_optimizer(self.model, learning_rate, self.spec.finetune.weight_decay,
                                              max(steps, 1), int(warmup_ratio * steps), groups)
        if resume and self.state.step:
            load_optimizer(optimizer, scheduler, self.optimizer_state)
        return optimizer, scheduler

    # --- stages -----------------------------------------------------------------------------
    def finetune(self) -> None:
        spec, total = self.spec, self.spec.finetune.steps
        rows = self.data.pool(self.languages["finetune"], fine_tuning=True)
        callbacks: list[Callback] = []
        if self.algorithm.learns_during_training and spec.pruning.learning_steps is None:
            callbacks.append(LearnedImportance(self.algorithm, self.model, total))
        if spec.pruning.schedule == "gradual":
            callbacks.append(GradualPruning(self, rows, total))
        curve = self._learning_curve(total)   # evaluation changes no weight: the cache may still hold this
        cache = self._finetune_cache(callbacks)
        if cache is not None:
            self._finetune_through(cache, lambda extra: self._train_dense(rows, total, [*callbacks, *curve, *extra]))
        elif total > 0:
            self._train_dense(rows, total, [*callbacks, *curve])
        else:
            for callback in callbacks:
                callback.on_end()
        if spec.data.evaluate_dense and self.is_chief:
            self._evaluate_dense()
        if spec.recovery.distillation.enabled:
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        learns_after = self.algorithm.learns_during_training and spec.pruning.learning_steps is not None
        self.state.advance("learn" if learns_after else "prune")
        self.report()

    def _learning_curve(self, total: int) -> list[Callback]:
        """``finetune.evaluate_every``: the dense model's quality every N steps and at the end, on development
        rows (after the reported ones), logged as the history of ``dev/<task>/<lang>/<metric>``."""
        every = self.spec.finetune.evaluate_every
        if not every or not self.is_chief:
            return []

        def evaluate(step: int, loss: float) -> None:
            try:
                result = self._evaluate({}, development=True)
            finally:
                self.model.train()
            self.log.metrics({f"dev/{k}": v for k, v in result.metrics.items()}, step=step)

        return [Every(every, evaluate, total)]

    def learn(self) -> None:
        """L0 gates or movement scores learnt for ``pruning.learning_steps`` on top of the dense fine-tuned
        model (shared through the stage cache), on other batches of the same training rows."""
        spec, total = self.spec, self.spec.pruning.learning_steps or 0
        rows = self.data.pool(self.languages["finetune"], fine_tuning=True)
        callbacks: list[Callback] = [LearnedImportance(self.algorithm, self.model, total)]
        optimizer, scheduler = self.optimizer(spec.finetune.learning_rate, total, spec.finetune.warmup_ratio,
                                              callbacks)
        objective = single(lambda step: self.data.loss(self.ddp, self.data.batch(rows, step, spec.finetune.batch_size,
                                                                                 salt=1000)))
        self.fit("learn", objective, optimizer, scheduler, total, callbacks)
        self.state.advance("prune")
        self.report()

    def _train_dense(self, rows: list, total: int, callbacks: list[Callback]) -> None:
        spec = self.spec
        optimizer, scheduler = self.optimizer(spec.finetune.learning_rate, total, spec.finetune.warmup_ratio,
                                              callbacks)
        objective = single(lambda step: self.data.loss(self.ddp, self.data.batch(rows, step, spec.finetune.batch_size)))
        self.fit("train", objective, optimizer, scheduler, total, callbacks,
                 progress=Progress("finetune", total, self.is_chief))

    def _stage_cache(self):
        """The stage cache (``<storage>/cache``) when outputs may be shared with other runs: one worker
        (ranks see different batches) and a local storage folder; else None."""
        from raysparse.training.stage_cache import StageCache, stage_key

        if self.world_size > 1 or not self.storage or "://" in self.storage:
            return None
        owner = self.run_id or f"spec:{stage_key('finetune', {'spec': self.spec.model_dump()})}"
        return StageCache(Path(self.storage) / "cache", owner=owner)

    def _finetune_cache(self, callbacks: list[Callback]):
        """(cache, key) when this fine-tuning depends on no pruning choice and may be shared, else None:
        on, a fresh start, no algorithm learning or schedule pruning while it trains."""
        from raysparse.training.stage_cache import stage_key, weights_digest

        spec = self.spec
        store = self._stage_cache()
        if store is None or not spec.finetune.cache or spec.finetune.steps == 0 or callbacks or self.state.step:
            return None
        from raysparse.models.sources import resolve_model
        from raysparse.paths import data_dir

        location = resolve_model(spec.model.source)
        # the task whose rows train (a train_task's model serves every task of its kind: the head is the same)
        determinants = {"model": spec.model.source, "weights": weights_digest(location),
                        "task": spec.data.train_task or spec.data.task,
                        "data_dir": str(data_dir(spec.data.dir)), "languages": sorted(self.languages["finetune"]),
                        "data": spec.data.model_dump(include={"regime", "train_fraction", "max_train_examples",
                                                               "max_length", "doc_stride",
                                                               "group_by_length"}),
                        "finetune": spec.finetune.model_dump(exclude={"cache", "evaluate_every"}), "seed": spec.seed}
        return store, stage_key("finetune", determinants)

    def _finetune_through(self, cache, train) -> None:
        """Load the cached fine-tuned model, or train it (holding the key's lock) and store it."""
        store, key = cache
        weights = "model.safetensors"
        self._through_cache(store, "finetune", key,
                            compute=lambda alive: train([Every(5, lambda step, loss: alive())]),
                            write=lambda folder: save_weights(self.model, folder / weights, self.frozen),
                            load=lambda folder: load_weights(self.model, folder / weights, self.frozen))

    def _cached_tensors(self, store, stage: str, determinants: dict, compute, file: str) -> dict[str, torch.Tensor]:
        """A flat dict of tensors that ``determinants`` fix, from the stage cache, or ``compute(alive)``
        once and stored in ``file``."""
        from raysparse.training.stage_cache import stage_key

        found: dict[str, torch.Tensor] = {}
        self._through_cache(store, stage, stage_key(stage, determinants),
                            compute=lambda alive: found.update(compute(alive)),
                            write=lambda folder: save_file({k: v.contiguous() for k, v in found.items()},
                                                           str(folder / file)),
                            load=lambda folder: found.update(load_file(str(folder / file))))
        return found

    def _through_cache(self, store, stage: str, key: str, compute, write, load) -> None:
        """Load ``stage``'s entry under ``key``, or ``compute(alive)`` it while holding the key's lock
        (calling ``alive()`` now and then keeps waiters from breaking it) and store it with
        ``write(folder)``. MLflow records the hit or miss and the run that produced the entry."""
        record = store.acquire(stage, key)
        if record is None:
            try:
                compute(lambda: store.touch(stage, key))
                record = store.put(stage, key, write, {"run_id": self.run_id, "run": self.spec.name})
            finally:
                store.release(stage, key)
            hit = False
        else:
            load(Path(record["folder"]))
            hit = True
        if self.is_chief:
            print(f"[{stage}] cache {'hit' if hit else 'miss'}: {record['folder']}", flush=True)
        self.state.metrics[f"cache/{stage}/hit"] = float(hit)
        self.log.metrics({f"cache/{stage}/hit": float(hit)})
        self.log.tags({f"raysparse.cache.{stage}": "hit" if hit else "miss", f"raysparse.cache.{stage}.key": key,
                       f"raysparse.cache.{stage}.producer": record.get("run_id") or record.get("owner")})

    def _evaluate_dense(self) -> None:
        """The fine-tuned dense model's quality, as ``dense/<task>/<lang>/<metric>`` (the reference of a share),
        and the floor beneath it: the task's trivial predictor on the same rows, as ``trivial/...``."""
        from raysparse.training.baselines import trivial_baseline

        spec = self.spec

        def compute(alive=None) -> dict:
            result = self._evaluate({})
            floor = trivial_baseline(self.task, self.languages["evaluation"], data_dir=spec.data.dir, seed=spec.seed,
                                     train_fraction=spec.data.train_fraction, max_examples=spec.data.max_eval_examples,
                                     skip_examples=spec.data.skip_eval_examples, regime=spec.data.regime)
            return {"metrics": {**{f"dense/{k}": v for k, v in result.metrics.items()},
                                **{f"trivial/{k}": v for k, v in floor.metrics.items()}},
                    "predictor": floor.predictor[:5000] if floor.scored else None}

        store = self._stage_cache() if spec.finetune.cache else None
        if store is None:
            found = compute()
        else:   # every trial of a search scores the same dense model on the same rows: once is enough
            from raysparse.paths import data_dir
            from raysparse.training.stage_cache import stage_key, tensors_digest

            determinants = {"model": spec.model.source, "weights": tensors_digest(self.model.state_dict()),
                            "task": self.task.name, "languages": list(self.languages["evaluation"]),
                            "evaluation": {**evaluation_options(spec), "data_dir": str(data_dir(spec.data.dir))},
                            "regime": spec.data.regime}
            found = {}
            self._through_cache(store, "dense-eval", stage_key("dense-eval", determinants),
                                compute=lambda alive: found.update(compute()),
                                write=lambda folder: (folder / "dense.json").write_text(json.dumps(found)),
                                load=lambda folder: found.update(json.loads((folder / "dense.json").read_text())))
        self.state.metrics.update(found["metrics"])
        self.log.metrics(found["metrics"], step=spec.finetune.steps)
        if found["predictor"]:
            self.log.tags({"raysparse.trivial_baseline": found["predictor"]})

    def prune(self) -> None:
        """Score and select: one mask (shared) or one per language, exact target sparsity; then shrink."""
        spec = self.spec
        keys = [SHARED] if spec.pruning.setting == "shared" else list(self.languages["scoring"])
        rounds = spec.pruning.iterations if spec.pruning.schedule == "iterative" else 1
        between_steps = spec.recovery.steps // (rounds + 1) if rounds > 1 else 0
        mask_tuning.keep_dense_reference(self)
        for round_index in range(self.state.prune_round, rounds):
            target = spec.pruning.sparsity * (round_index + 1) / rounds
            for key in keys:
                rows = self.data.pool(self.languages["scoring"] if key == SHARED else [key])
                base = self.state.masks.get(key)
                # methods that score from data (layer dropping by gradient) decide their mask from those scores
                learned = self.algorithm.learns_during_training
                scores = None if learned else self.score(rows, base, salt=round_index)
                final = self.algorithm.final_mask(self.model, target)
                if final is not None:   # the method decided the mask itself (L0 gates, dropped layers)
                    mask = final
                    if scores is None:
                        scores = self.algorithm.score(self.model, None, None, base)
                else:
                    if scores is None:   # movement: its learned scores, read now
                        scores = self.score(rows, base, salt=round_index)
                    mask = self.select(scores, target, base)
                self.state.masks[key], self.state.scores[key] = mask, scores
                if self.is_chief:
                    reached = (f"sparsity {target:.3f}" if spec.pruning.latency_target is None
                               else f"latency budget, sparsity {_sparsity(self.model, mask):.3f}")
                    print(f"[prune] round {round_index + 1}/{rounds} {key}: {reached}, {mask.summary()}", flush=True)
            self._shrink_to_masks()
            mask_tuning.tune_after_shrink(self, round_index)   # pruning.mask_tuning: rescale kept units
            if round_index + 1 < rounds and between_steps:
                self._recover(between_steps, "recover-between", resumable=False)
            self.state.prune_round = round_index + 1
            self.report()
        self.state.advance("recover")
        self.report()

    def _shrink_to_masks(self) -> None:
        """Remove what every mask removes, physically: recovery then trains at the kept size."""
        if not self.spec.recovery.shrink:
            return
        shrink(self.model, union_of(self.state.masks.values()))
        self.ddp = self._wrap(self.model)

    def _recover(self, steps: int, stage: str, resumable: bool = True) -> None:
        """Train the shrunk model; with per-language masks, each batch's language gates what it drops.
        Distillation from the dense teacher plugs in as a callback on the task loss."""
        from raysparse.training.distill import Distillation, forward_outputs, layer_map_for

        spec, distill = self.spec, self.spec.recovery.distillation
        keys = sorted(self.state.masks)
        pools = {key: self.data.pool(self.languages["scoring"] if key == SHARED else [key]) for key in keys}
        gate_rows = {key: self.gates_for(self.state.masks[key]) for key in keys}
        # with one mask, the shrunk model is exactly the kept network and needs no gates
        partial = len(keys) > 1 or not spec.recovery.shrink
        gates = UnitGates()
        distilling = distill.enabled and self.teacher is not None
        hidden = distilling and distill.hidden

        def batch_at(step: int) -> tuple[str, object]:
            key = keys[step % len(keys)]
            return key, self.data.batch(pools[key], step, spec.finetune.batch_size,
                                        salt=2000 + zlib.crc32(key.encode()) % 997)

        def loss(step: int) -> Forward:
            key, batch = batch_at(step)
            if partial:
                gates.heads, gates.neurons, gates.layers = (gate_rows[key].heads, gate_rows[key].neurons,
                                                            gate_rows[key].layers)
            if not distilling:
                return Forward(self.data.loss(self.ddp, batch))
            # one student forward (DDP allows one per backward): the task loss and distillation share it
            outputs = forward_outputs(self.ddp, batch, hidden_states=hidden)
            return Forward(self.data.loss_of(outputs), batch, outputs, key)

        callbacks: list[Callback] = [] if spec.recovery.dropout else [WithoutDropout(self.model)]
        if distilling:
            layer_maps = ({key: layer_map_for(self.model, self.teacher, self.state.masks[key]) for key in keys}
                          if hidden else {})
            targets = self._teacher_targets(batch_at, steps, stage) if not hidden and distill.cache_targets else None
            distillation = Distillation(self.teacher, distill, layer_maps, targets)
            callbacks.append(distillation)
        optimizer, scheduler = self.optimizer(spec.recovery.learning_rate, steps, 0.0, resume=resumable)
        if resumable and spec.recovery.evaluate_every:
            def evaluate(step: int, loss: float) -> None:
                if step < steps:   # the evaluate stage measures the end
                    self._evaluate_during_recovery(step, gates, optimizer, scheduler)

            callbacks.append(Every(spec.recovery.evaluate_every, evaluate))
        with attach_gates(self.model, gates) if partial else contextlib.nullcontext():
            self.fit(stage, single(loss), optimizer, scheduler, steps, callbacks, resumable=resumable)
        if distilling and targets is None:   # the rows the teacher ran on, of those distilled (recurring rows: kept)
            cache, metrics = distillation.cache, self.state.metrics
            for name, count in (("teacher_passes", cache.passes), ("teacher_rows", cache.rows_run),
                                ("distilled_rows", cache.rows_read)):
                metrics[f"cost/{stage}/{name}"] = metrics.get(f"cost/{stage}/{name}", 0.0) + count

    def _evaluate_during_recovery(self, step: int, gates: UnitGates, optimizer, scheduler) -> None:
        """Quality after ``step`` recovery steps, as curves in MLflow and a report with ``recovery_step``
        (the resource ASHA compares trials on; Tune may stop the trial at this report). Per-language
        gates are lifted while each language's own mask is applied by the evaluation."""
        self.state.step = step   # the report's checkpoint resumes after this step
        held = gates.heads, gates.neurons, gates.layers
        gates.heads = gates.neurons = gates.layers = None
        metrics: dict = {}
        try:
            if self.is_chief:
                metrics = self._evaluate(self._masks_per_language()).metrics
                self.log.metrics(metrics, step=step)
        finally:
            gates.heads, gates.neurons, gates.layers = held
            self.model.train()
        self.report({**metrics, "recovery_step": float(step)}, optimizer, scheduler)

    def _teacher_targets(self, batch_at, steps: int, stage: str) -> dict | None:
        """The teacher's soft targets for every step of a recovery stage, from the stage cache (keyed by
        the teacher's weights and the batches themselves) or computed once and stored; None without
        a cache (the teacher then runs beside the student)."""
        from raysparse.training.distill import target_outputs
        from raysparse.training.stage_cache import tensors_digest

        store = self._stage_cache()
        if store is None:
            return None
        batches = [batch_at(step)[1] for step in range(steps)]
        dtype = self.spec.recovery.distillation.teacher_dtype
        determinants = {"teacher": tensors_digest(self.teacher.state_dict()), "batches": tensors_digest(batches),
                        "dtype": dtype}

        def compute(alive) -> dict[str, torch.Tensor]:
            flat = {}
            for step, batch in enumerate(batches):
                flat.update({f"{step}/{name}": value for name, value in
                             target_outputs(self.teacher, batch, dtype=dtype).items()})
                if step % 10 == 0:
                    alive()
            return flat

        targets: dict[int, dict] = {}
        for name, value in self._cached_tensors(store, "teacher-targets", determinants, compute,
                                                "targets.safetensors").items():
            step, _, output = name.partition("/")
            targets.setdefault(int(step), {})[output] = value
        return targets

    def recover(self) -> None:
        spec = self.spec
        steps = spec.recovery.steps - (spec.recovery.steps // (spec.pruning.iterations + 1)
                                       if spec.pruning.schedule == "iterative" and spec.pruning.iterations > 1 else 0)
        if steps > 0:
            self._recover(steps, "recover")
        self.state.advance("evaluate")
        self.report()

    def _evaluate(self, masks: dict, development: bool = False):
        """Scores on the reported rows, or (``development``) on the curve's rows after them."""
        from raysparse.training.evaluate import evaluate

        spec, options = self.spec, evaluation_options(self.spec)
        if development:
            options["skip_examples"] += spec.data.max_eval_examples or 0
            options["max_examples"] = spec.finetune.curve_examples
        self.model.eval()
        return evaluate(self.model, self.tokenizer, self.task.name, self.languages["evaluation"], masks=masks,
                        verbose=not development, **options)

    def _masks_per_language(self) -> dict:
        """Each evaluation language's mask (the shared one for all, or its own)."""
        masks, languages = self.state.masks, self.languages["evaluation"]
        if SHARED in masks:
            return {lang: masks[SHARED] for lang in languages}
        return {lang: masks[lang] for lang in languages if lang in masks}

    def evaluate(self) -> None:
        """Rank 0 evaluates every language, each with its own mask (or the shared one)."""
        if self.is_chief:
            result = self._evaluate(self._masks_per_language())
            self.state.metrics.update(result.metrics)
            self.state.sources.update({f"eval.{k}": v for k, v in result.sources.items()})
            self.state.sources.update({f"train.{k}": v for k, v in self.data.sources.items()})
            self.log.metrics(result.metrics)   # the 95% intervals (ci95_low/..., ci95_high/...) among them
            self.log.text(result.table(), "results/per_language.txt")
            record = result.examples_record()
            if record is not None:   # the per-example statistics, for paired comparisons in reports
                from raysparse.tracking.runs import EXAMPLES_ARTIFACT

                self.log.json(record, EXAMPLES_ARTIFACT, compact=True)
            print(result.table(), flush=True)
        self.state.advance("finalize")
        self.report()

    def finalize(self) -> None:
        """Rank 0: shrink physically, measure size and latency, save and log everything."""
        if self.is_chief:
            from raysparse.training.finalize import finalize

            metrics = finalize(self)
            self.state.metrics.update(metrics)
        self.state.advance("done")
        self.report(checkpoint=True)

    def execute(self) -> None:
        stages = {"finetune": self.finetune, "learn": self.learn, "prune": self.prune, "recover": self.recover,
                  "evaluate": self.evaluate, "finalize": self.finalize}
        while self.state.stage != "done":
            if self.is_chief:
                print(f"[stage] {self.state.stage}", flush=True)
            stages[self.state.stage]()
        if not self.reported:   # restored a finished run: report its result once more
            self.report(checkpoint=True)

def evaluation_options(spec: RunSpec) -> dict:
    """How a run scores its model (``evaluate``'s options): its held-out rows, at its sequence length."""
    return {"data_dir": spec.data.dir, "max_examples": spec.data.max_eval_examples,
            "skip_examples": spec.data.skip_eval_examples, "seed": spec.seed,
            "train_fraction": spec.data.train_fraction, "max_length": spec.data.max_length,
            "stride": spec.data.doc_stride}


def build_algorithm(spec: RunSpec):
    """The spec's algorithm with its typed options (the run's seed and target sparsity where it takes them)."""
    return algorithm_for(spec.pruning.algorithm, spec.pruning.options, spec.seed, spec.pruning.sparsity)


def algorithm_state(algorithm) -> dict:
    """Tensors a learning method needs after a restart (empty for stateless methods)."""
    if not hasattr(algorithm, "state_dict"):
        return {}
    try:
        return algorithm.state_dict()
    except RaysparseError:   # not attached yet: nothing learned
        return {}


def _sparsity(model: nn.Module, mask: Mask) -> float:
    from raysparse.structure import encoder_sparsity_of

    enc = Encoder(model)
    return encoder_sparsity_of(mask, enc.hidden_size, enc.head_dim)


__all__ = ["GradualPruning", "LearnedImportance", "Run", "SHARED", "all_reduce_scores", "union_of"]
