"""The per-worker function of a run: fine-tune -> prune -> recover -> evaluate -> finalize.

Every Ray Train worker runs :func:`train_loop_per_worker`. Gradients are averaged by DDP;
unit scores are summed over workers so every rank selects the same masks; only rank 0
evaluates, measures, saves and logs to MLflow. After each stage and every
``resources.checkpoint_every`` steps the run reports a checkpoint; a restarted worker
group (a killed worker) or a rerun of the same spec (a killed driver) resumes from it.
"""

from __future__ import annotations

import copy
import tempfile
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from raysparse.config import RunSpec
from raysparse.errors import RaysparseError
from raysparse.pruning import Selection, UnitScores, cubic_sparsity, get_algorithm, select_mask
from raysparse.structure import Encoder, Mask, UnitGates, attach_gates
from raysparse.structure.shrink import mask_rows_for
from raysparse.training.finetune import freeze_word_embeddings
from raysparse.training.state import (STAGES, RunState, load_optimizer, load_weights, read_optimizer, save_optimizer,
                                      save_weights)
from raysparse.training.taskdata import TaskData

SHARED = "shared"


class Progress:
    """Console lines with step counts, loss and ETA (rank 0 only)."""

    def __init__(self, stage: str, total: int, enabled: bool, every: int = 10):
        self.stage, self.total, self.enabled, self.every = stage, total, enabled, every
        self.started, self.first = time.time(), None

    def step(self, step: int, loss: float, extra: str = "") -> None:
        if self.first is None:
            self.first = step
        if not self.enabled or ((step + 1) % self.every and step + 1 != self.total):
            return
        done = step + 1 - self.first
        eta = (time.time() - self.started) / max(done, 1) * (self.total - step - 1)
        print(f"[{self.stage}] step {step + 1}/{self.total}  loss {loss:.4f}  eta {eta:.0f}s {extra}", flush=True)


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


class Run:
    """State and stages of one run on one worker."""

    def __init__(self, config: dict):
        import ray
        import ray.train

        import raysparse
        from raysparse.data.tasks import get_task
        from raysparse.training.batches import build_task_model
        from raysparse.tracking.runs import RunLogger

        self.spec = RunSpec.model_validate(config["spec"])
        self.languages: dict[str, list[str]] = config["languages"]
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.is_chief = self.rank == 0
        self.log = RunLogger(config.get("tracking_uri"), config.get("run_id") if self.is_chief else None)
        # Which node does the work (on a cluster, where to look for logs; a restart may move it).
        self.log.tags({"raysparse.node_id": ray.get_runtime_context().get_node_id()})
        torch.manual_seed(self.spec.seed)
        self.task = get_task(self.spec.data.task)
        trust = self.spec.model.trust_remote_code
        self.tokenizer = raysparse.load_tokenizer(self.spec.model.source, trust_remote_code=trust)
        encoder = raysparse.load_model(self.spec.model.source, trust_remote_code=trust)
        self.model = build_task_model(encoder, self.task, seed=self.spec.seed)
        if self.spec.finetune.freeze_word_embeddings:
            freeze_word_embeddings(self.model)
        # Weights no stage changes: checkpoints leave them out, a restart reloads them from the source.
        self.frozen = frozenset(name for name, p in self.model.named_parameters() if not p.requires_grad)
        self.data = TaskData(self.spec, self.tokenizer, self.rank, self.world_size)
        self.algorithm = build_algorithm(self.spec)
        self.selection = Selection(self.spec.pruning.scope, self.spec.pruning.normalize, self.spec.pruning.round_to)
        self.teacher: nn.Module | None = None
        self.state = RunState()
        self.optimizer_state: dict | None = None   # from the checkpoint a restarted run resumes
        self.reported = False
        self._restore()
        self._clock = (self.state.stage, time.time(), time.process_time())
        self.ddp = self._wrap(self.model)

    # --- checkpoints --------------------------------------------------------------------
    def _restore(self) -> None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with tempfile.TemporaryDirectory(prefix="raysparse-restore-") as folder:
            checkpoint.to_directory(folder)
            self._load_checkpoint(Path(folder))
        self.state.metrics["resumes"] = self.state.metrics.get("resumes", 0) + 1
        if self.is_chief:
            print(f"[resume] continuing at stage {self.state.stage}, step {self.state.step}", flush=True)
            self.log.metrics({"resumes": self.state.metrics["resumes"]})

    def _load_checkpoint(self, folder: Path) -> None:
        self.state = RunState.load(folder)
        self._before_weights_load()
        load_weights(self.model, folder / "model.safetensors", self.frozen)
        if (folder / "teacher.safetensors").is_file():
            self.teacher = copy.deepcopy(self.model)
            load_weights(self.teacher, folder / "teacher.safetensors", self.frozen)
        if (folder / "algorithm.safetensors").is_file() and hasattr(self.algorithm, "load_state_dict"):
            self.algorithm.load_state_dict(load_file(str(folder / "algorithm.safetensors")))
        self.optimizer_state = read_optimizer(folder / "optimizer.pt")

    def _before_weights_load(self) -> None:
        """Hook for subclasses: reshape the model to what the checkpoint holds (e.g. rewired) before loading it."""

    def report(self, metrics: dict | None = None, optimizer=None, scheduler=None, checkpoint: bool = True) -> None:
        """Report to Ray Train (all ranks); rank 0 attaches a checkpoint of the full state."""
        import ray.train

        self.reported = True
        self._charge_time()
        values = {"stage_index": float(STAGES.index(self.state.stage)), "stage_step": float(self.state.step)}
        values.update(self.state.metrics)
        values.update(metrics or {})
        if not (checkpoint and self.is_chief):
            ray.train.report(values, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="raysparse-ckpt-") as folder:
            folder = Path(folder)
            self.state.save(folder)
            save_weights(self.model, folder / "model.safetensors", self.frozen)
            if self.teacher is not None:
                save_weights(self.teacher, folder / "teacher.safetensors", self.frozen)
            state = algorithm_state(self.algorithm)
            if state:
                save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "algorithm.safetensors"))
            if optimizer is not None:
                save_optimizer(optimizer, scheduler, folder / "optimizer.pt")
            ray.train.report(values, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))

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
        import ray.train.torch

        wrapped = ray.train.torch.prepare_model(model, parallel_strategy="ddp" if self.world_size > 1 else None)
        if self.teacher is not None:
            self.teacher.to(ray.train.torch.get_device())
        return wrapped

    # --- optimisation ---------------------------------------------------------------------
    def _optimizer(self, learning_rate: float, steps: int, warmup_ratio: float, extra_groups: list | None = None):
        from transformers import get_linear_schedule_with_warmup

        decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.dim() > 1]
        no_decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.dim() <= 1]
        groups = [{"params": decay, "weight_decay": self.spec.finetune.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}, *(extra_groups or [])]
        optimizer = torch.optim.AdamW(groups, lr=learning_rate)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * steps), max(steps, 1))
        return optimizer, scheduler

    def _gates_for(self, mask: Mask) -> UnitGates:
        heads, neurons, layers = mask_rows_for(self.model, mask)
        return UnitGates(heads, neurons, layers)

    # --- stages -----------------------------------------------------------------------------
    def finetune(self) -> None:
        spec, total = self.spec, self.spec.finetune.steps
        rows = self.data.pool(self.languages["finetune"])
        learned = self.algorithm.learns_during_training
        gradual = spec.pruning.schedule == "gradual"
        if learned:
            self.algorithm.attach(self.model)
        optimizer, scheduler = self._optimizer(spec.finetune.learning_rate, total, spec.finetune.warmup_ratio,
                                               self.algorithm.extra_parameters() if learned else None)
        if self.state.step:
            load_optimizer(optimizer, scheduler, self.optimizer_state)
        mask_handle = None
        if gradual and SHARED in self.state.masks:
            mask_handle = attach_gates(self.model, self._gates_for(self.state.masks[SHARED]))
        progress = Progress("finetune", total, self.is_chief)
        self.model.train()
        for step in range(self.state.step, total):
            batch = self.data.batch(rows, step, spec.finetune.batch_size)
            loss = self.data.loss(self.ddp, batch)
            regularization = self.algorithm.regularization(step, total) if learned else None
            full = loss + regularization if regularization is not None else loss
            optimizer.zero_grad(set_to_none=True)
            full.backward()
            if learned:
                self.algorithm.after_backward(self.model, step)
            optimizer.step()
            scheduler.step()
            self.state.step = step + 1
            progress.step(step, loss.item())
            if self.is_chief and (step + 1) % 10 == 0:
                self.log.metrics({"train/loss": loss.item(), **({f"train/{k}": v for k, v in
                                                                 self.algorithm.metrics().items()} if learned else {})},
                                 step=step + 1)
            if gradual and (step + 1) % max(1, spec.pruning.options.get("prune_every", 10)) == 0:
                mask_handle = self._gradual_update(step + 1, total, rows, mask_handle)
            if (step + 1) % spec.resources.checkpoint_every == 0 and step + 1 < total:
                self.report({"train/loss": loss.item()}, optimizer, scheduler)
        if mask_handle is not None:
            mask_handle.remove()
        if learned:
            self.algorithm.detach(self.model)
        if spec.recovery.distillation.enabled:
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.state.advance("prune")
        self.report()

    def _gradual_update(self, step: int, total: int, rows: list, handle):
        """Cubic ramp: re-score and tighten the shared mask as fine-tuning proceeds."""
        target = cubic_sparsity(step, total, self.spec.pruning.sparsity,
                                end_step=int(total * self.spec.pruning.options.get("ramp_fraction", 0.8)))
        base = self.state.masks.get(SHARED)
        current = 0.0 if base is None else _sparsity(self.model, base)
        if target <= current + 1e-9:
            return handle
        if handle is not None:
            handle.remove()
        scores = self._score(rows, base)
        enc = Encoder(self.model)
        self.state.masks[SHARED] = select_mask(scores, target, enc.hidden_size, enc.head_dim, self.selection, base)
        if self.is_chief:
            print(f"[gradual] step {step}: sparsity {target:.3f}", flush=True)
        return attach_gates(self.model, self._gates_for(self.state.masks[SHARED]))

    def _score(self, rows: list, base: Mask | None, salt: int = 0) -> UnitScores:
        spec = self.spec
        count = max(1, spec.pruning.scoring_examples // (spec.finetune.batch_size * self.world_size))
        batches = self.data.batches(rows, 0, count, spec.finetune.batch_size, salt=1000 + salt)
        was_training = self.model.training
        scores = self.algorithm.score(self.model, batches, self.data.loss, base)
        self.model.train(was_training)
        return all_reduce_scores(scores)

    def prune(self) -> None:
        """Score and select: one mask (shared) or one per language, exact target sparsity."""
        spec = self.spec
        enc = Encoder(self.model)
        keys = [SHARED] if spec.pruning.setting == "shared" else list(self.languages["scoring"])
        rounds = spec.pruning.iterations if spec.pruning.schedule == "iterative" else 1
        if spec.pruning.schedule == "gradual":
            rounds = 1
        between_steps = spec.recovery.steps // (rounds + 1) if rounds > 1 else 0
        for round_index in range(self.state.prune_round, rounds):
            target = spec.pruning.sparsity * (round_index + 1) / rounds
            for key in keys:
                rows = self.data.pool(self.languages["scoring"] if key == SHARED else [key])
                base = self.state.masks.get(key)
                learned = self.algorithm.learns_during_training
                # methods that score from data (layer dropping by gradient) decide their own mask from those scores
                scores = None if learned else self._score(rows, base, salt=round_index)
                final = self.algorithm.final_mask(self.model, target)
                if final is not None:   # the method decided the mask itself (L0 gates, dropped layers)
                    mask = final
                    if scores is None:
                        scores = self.algorithm.score(self.model, None, None, base)
                else:
                    if scores is None:
                        scores = self._score(rows, base, salt=round_index)
                    mask = select_mask(scores, target, enc.hidden_size, enc.head_dim, self.selection, base)
                self.state.masks[key], self.state.scores[key] = mask, scores
                if self.is_chief:
                    print(f"[prune] round {round_index + 1}/{rounds} {key}: sparsity {target:.3f}, {mask.summary()}",
                          flush=True)
            if round_index + 1 < rounds and between_steps:
                self._train_under_masks(between_steps, spec.recovery.learning_rate, "recover-between", start=0)
            self.state.prune_round = round_index + 1
            self.report()
        self.state.advance("recover")
        self.report()

    def _train_under_masks(self, steps: int, learning_rate: float, stage: str, start: int = 0,
                           optimizer=None, scheduler=None) -> None:
        """Recovery: train the weights with each batch's language mask applied (gates)."""
        spec = self.spec
        keys = sorted(self.state.masks)
        pools = {key: self.data.pool(self.languages["scoring"] if key == SHARED else [key]) for key in keys}
        gates = self._gates_for(self.state.masks[keys[0]])
        gate_rows = {key: self._gates_for(self.state.masks[key]) for key in keys}
        if optimizer is None:
            optimizer, scheduler = self._optimizer(learning_rate, steps, 0.0)
        distill = spec.recovery.distillation
        layer_maps = {}
        if distill.enabled and distill.hidden and self.teacher is not None:
            from raysparse.training.distill import layer_map_for

            layer_maps = {key: layer_map_for(self.model, self.teacher, self.state.masks[key]) for key in keys}
        progress = Progress(stage, steps, self.is_chief)
        self.model.train()
        with attach_gates(self.model, gates):
            for step in range(start, steps):
                key = keys[step % len(keys)]
                gates.heads, gates.neurons, gates.layers = (gate_rows[key].heads, gate_rows[key].neurons,
                                                            gate_rows[key].layers)
                batch = self.data.batch(pools[key], step, spec.finetune.batch_size, salt=2000 + zlib.crc32(key.encode()) % 997)
                loss = self._recovery_loss(batch, distill, layer_maps.get(key))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                progress.step(step, loss.item(), f"({key})")
                if stage == "recover":
                    self.state.step = step + 1
                    if self.is_chief and (step + 1) % 10 == 0:
                        self.log.metrics({"recover/loss": loss.item()}, step=step + 1)
                    if (step + 1) % spec.resources.checkpoint_every == 0 and step + 1 < steps:
                        self.report({"recover/loss": loss.item()}, optimizer, scheduler)

    def _recovery_loss(self, batch, distill, layer_map) -> torch.Tensor:
        if not distill.enabled or self.teacher is None:
            return self.data.loss(self.ddp, batch)
        from raysparse.training import distill as distillation

        # one student forward (DDP allows one per backward): task loss and distillation share it
        outputs = distillation.forward_outputs(self.ddp, batch, hidden_states=distill.hidden)
        return distillation.recovery_loss(self.ddp, self.teacher, batch, self.data.loss_of(outputs), distill,
                                          student_out=outputs, layer_map=layer_map)

    def recover(self) -> None:
        spec = self.spec
        steps = spec.recovery.steps - (spec.recovery.steps // (spec.pruning.iterations + 1)
                                       if spec.pruning.schedule == "iterative" and spec.pruning.iterations > 1 else 0)
        if steps > 0:
            optimizer, scheduler = self._optimizer(spec.recovery.learning_rate, steps, 0.0)
            if self.state.step:
                load_optimizer(optimizer, scheduler, self.optimizer_state)
            self._train_under_masks(steps, spec.recovery.learning_rate, "recover", self.state.step, optimizer,
                                    scheduler)
        self.state.advance("evaluate")
        self.report()

    def evaluate(self) -> None:
        """Rank 0 evaluates every language, each with its own mask (or the shared one)."""
        if self.is_chief:
            from raysparse.training.evaluate import evaluate

            spec = self.spec
            masks = self.state.masks
            per_language = ({lang: masks[SHARED] for lang in self.languages["evaluation"]} if SHARED in masks
                            else {lang: masks[lang] for lang in self.languages["evaluation"] if lang in masks})
            self.model.eval()
            result = evaluate(self.model, self.tokenizer, self.task.name, self.languages["evaluation"],
                              data_dir=spec.data.dir, max_examples=spec.data.max_eval_examples, seed=spec.seed,
                              train_fraction=spec.data.train_fraction, masks=per_language)
            self.state.metrics.update(result.metrics)
            self.state.sources.update({f"eval.{k}": v for k, v in result.sources.items()})
            self.state.sources.update({f"train.{k}": v for k, v in self.data.sources.items()})
            self.log.metrics(result.metrics)
            self.log.text(result.table(), "results/per_language.txt")
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
        stages = {"finetune": self.finetune, "prune": self.prune, "recover": self.recover,
                  "evaluate": self.evaluate, "finalize": self.finalize}
        while self.state.stage != "done":
            if self.is_chief:
                print(f"[stage] {self.state.stage}", flush=True)
            stages[self.state.stage]()
        if not self.reported:   # restored a finished run: report its result once more
            self.report(checkpoint=True)


def build_algorithm(spec: RunSpec):
    """The spec's algorithm; the run's seed and target sparsity reach methods that take them."""
    import inspect

    from raysparse.pruning import ALGORITHMS

    options = {k: v for k, v in spec.pruning.options.items() if v is not None}   # null: the method's default
    accepted = inspect.signature(ALGORITHMS[spec.pruning.algorithm].__init__).parameters
    if "seed" in accepted:
        options.setdefault("seed", spec.seed)
    if "target_sparsity" in accepted:
        options.setdefault("target_sparsity", spec.pruning.sparsity)
    for key in ("prune_every", "ramp_fraction"):   # schedule options, not the algorithm's
        if key not in accepted:
            options.pop(key, None)
    return get_algorithm(spec.pruning.algorithm, **options)


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


def train_loop_per_worker(config: dict) -> None:
    """Entry point Ray Train calls on every worker."""
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    Run(config).execute()


__all__ = ["Run", "train_loop_per_worker"]
