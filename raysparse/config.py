"""The experiment spec: typed config objects, validated at the edge.

A spec is YAML (or the same objects built in Python). Every field is checked before any
cluster work starts; a bad field fails with one line naming its dotted path and what was
expected, e.g. ``pruning.sparsity: expected a number in [0, 1), got 1.5``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)

from raysparse.errors import RaysparseError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    source: str = "embedded"
    trust_remote_code: bool = False


class DataConfig(Strict):
    task: str = "xnli"
    dir: str | None = None                     # default: $RAYSPARSE_DATA
    languages: list[str] | None = Field(None, min_length=1)   # evaluation languages; None (left out) = all present
    regime: Literal["zero-shot", "translate-train", "in-language"] = "zero-shot"
    train_fraction: float = Field(0.5, gt=0, lt=1)
    max_train_examples: int | None = Field(512, ge=1)
    max_eval_examples: int | None = Field(200, ge=1)
    skip_eval_examples: int = Field(0, ge=0)    # evaluate from this row on (tune on rows a report never uses)
    evaluate_dense: bool = False                # also score the model before pruning (dense/<task>/<lang>/<metric>)
    max_length: int = Field(128, ge=8, le=4096)
    doc_stride: int = Field(64, ge=1)
    # Training batches of rows of similar length (sorted within each run of 64 batches, those batches
    # shuffled; every row still once per epoch): padding was 45% of a contrastive step on XNLI pairs
    group_by_length: bool = False
    # fine-tune on another task of the same kind, from English (e.g. TyDiQA-GoldP's training set for XQuAD
    # or MLQA, which have none); scoring, recovery and evaluation stay on `task`
    train_task: str | None = None

    @field_validator("languages", mode="before")
    @classmethod
    def _languages_from_a_string(cls, value: Any) -> Any:
        """``"de,zh"`` is ``[de, zh]``: a grid entry or ``--set`` can name languages in one string."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


class FinetuneConfig(Strict):
    steps: int = Field(100, ge=0)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(3e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    # The word-embedding table is most of a multilingual encoder (82% of e5-small): freezing it
    # (fine-tuning, recovery and DS alike) makes steps and checkpoints several times cheaper.
    freeze_word_embeddings: bool = True
    # The fine-tuned dense model is stored once per (model, data, these settings, seed) in <storage>/cache
    # and reused by every run and trial that needs the same (one-worker runs; not while L0/movement learn).
    cache: bool = True
    # Evaluate the dense model every N fine-tuning steps (0: never): its learning curve in MLflow, as the
    # history of dev/<task>/<lang>/<metric>, on `curve_examples` development rows per language: those after
    # the reported ones (data.skip_eval_examples + data.max_eval_examples on), so a budget chosen on the
    # curve is not chosen on the reported figure
    evaluate_every: int = Field(0, ge=0)
    curve_examples: int = Field(100, ge=1)


class DistillationConfig(Strict):
    enabled: bool = False
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)       # weight of the distillation loss
    hidden: bool = False                        # also match hidden states (MSE)
    hidden_weight: float = Field(1.0, ge=0)
    # keep the teacher's soft targets on the recovery batches in the stage cache (needs hidden: false,
    # one worker and local storage): every later trial with the same teacher and batches skips the teacher
    cache_targets: bool = True
    # the teacher's forward passes in bfloat16 (autocast): about half their time on CPUs with AMX
    # and on recent GPUs; its outputs are read as float32
    teacher_dtype: Literal["float32", "bfloat16"] = "float32"
    # the teacher's outputs for recovery rows that recur (XNLI's English side in every language, a small
    # training set every epoch), kept in memory up to this many MiB (0: off): the teacher then runs on a
    # batch's other rows only; hidden states are kept in teacher_dtype, on the teacher's device
    row_cache_mb: int = Field(2048, ge=0)


class MaskTuningConfig(Strict):
    """Kwon et al. 2022's mask tuning, after every shrink: each kept head and FFN neuron gets one scale,
    fitted by least squares so every layer's sub-blocks reproduce the dense model's outputs on
    ``examples`` unlabelled scoring rows, and folded into the output projections (no training).
    One scale per unit fits one network: shared masks, a model shrunk to them, no dynamic schedule."""

    enabled: bool = False
    examples: int = Field(128, ge=1)            # calibration rows of the scoring pool (a translation pair: 2 sentences)
    damping: float = Field(0.01, ge=0)          # ridge toward scale 1, relative to the mean diagonal of the Gram
    max_scale: float = Field(10.0, gt=0)        # a sub-block whose scales leave [-max, max] keeps scale 1


class LatencyTarget(Strict):
    """Prune to a latency budget instead of a sparsity (``pruning.latency_target``): exactly one of ``ms``
    (at ``efficiency.sequence_length`` and ``batch_size``) or ``speedup`` over the dense model's predicted
    latency. A latency table of the run's model, measured on its device with ``efficiency.threads`` (or
    read from the cache), predicts the latency of a mask; selection keeps the most important heads and
    neurons per predicted millisecond whose prediction fits (docs/efficiency.md). One-shot, shared
    setting, global scope, ``round_to`` 1, an algorithm that scores units; ``pruning.sparsity`` stays at
    its default (the budget decides how much is removed)."""

    ms: float | None = Field(None, gt=0)            # predicted forward latency of the encoder, milliseconds
    speedup: float | None = Field(None, ge=1)       # dense predicted latency / pruned predicted latency
    batch_size: int | None = Field(None, ge=1)      # default: the first of efficiency.batch_sizes
    # where the table is cached: a folder (one JSON file per environment) or a JSON file;
    # default: <user cache>/raysparse/latency (RAYSPARSE_CACHE)
    table: str | None = None

    @model_validator(mode="after")
    def _one_target(self) -> "LatencyTarget":
        if (self.ms is None) == (self.speedup is None):
            raise ValueError("expected exactly one of ms or speedup (e.g. {speedup: 1.5} or {ms: 40, batch_size: 1})")
        return self


class PruningConfig(Strict):
    """What every schedule shares; the schedule's own fields live in its variant below."""

    algorithm: str = "gradient"
    sparsity: float = 0.5
    setting: Literal["shared", "per-language"] = "shared"
    scope: Literal["global", "per-layer"] = "global"
    normalize: Literal["l2", "none"] = "l2"
    round_to: int = Field(1, ge=1)
    # heads lose head_ratio x the target share of their units and the FFN neurons make up the rest of the
    # target (1: both types the same share; 0.6 at sparsity 0.5: 30% of the heads, 60% of the neurons)
    head_ratio: float = Field(1.0, ge=0)
    scoring_examples: int = Field(256, ge=1)
    scoring_languages: list[str] | None = Field(None, min_length=1)   # default: the evaluation languages
    drop_layers: int = Field(0, ge=0)
    options: dict[str, Any] = Field(default_factory=dict)   # the algorithm's own (typed by it, e.g. L0's lr)
    # Methods that learn their scores while training (L0, movement): learn for this many steps after the
    # dense fine-tuning (which the stage cache then shares with every other trial) instead of during it
    learning_steps: int | None = Field(None, ge=1)
    mask_tuning: MaskTuningConfig = Field(default_factory=MaskTuningConfig)   # rescale kept units, no training

    @field_validator("sparsity")
    @classmethod
    def _sparsity_in_unit_interval(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"expected a number in [0, 1), got {value}")
        return value

    # A latency budget instead of a sparsity: select to the table's prediction (see LatencyTarget)
    latency_target: LatencyTarget | None = None

    @model_validator(mode="after")
    def _latency_target_fits(self) -> "PruningConfig":
        """What selection to a latency budget supports, each refusal one line naming its field."""
        if self.latency_target is None:
            return self
        from raysparse.pruning import ALGORITHMS, Importance

        default = type(self).model_fields["sparsity"].default
        schedule = getattr(self, "schedule", "one-shot")
        algorithm = ALGORITHMS.get(self.algorithm)
        refusals = [
            (self.sparsity != default, f"pruning.sparsity: a latency target decides how much is removed (expected "
                                       f"sparsity left at its default {default}, or no pruning.latency_target)"),
            (schedule != "one-shot", f"pruning.latency_target: selection to a latency budget is one-shot (expected "
                                     f"schedule one-shot, got {schedule!r})"),
            (self.setting != "shared", "pruning.latency_target: per-language masks shrink to their union, which the "
                                       "budget does not bound (expected pruning.setting 'shared')"),
            (self.scope != "global", "pruning.scope: a latency target ranks all heads and neurons together "
                                     "(expected 'global')"),
            (self.round_to != 1, f"pruning.round_to: a latency target keeps exact counts (expected 1, got "
                                 f"{self.round_to})"),
            (self.head_ratio != 1, f"pruning.head_ratio: a latency target ranks heads and neurons together "
                                   f"(expected 1, got {self.head_ratio:g})"),
            (algorithm is not None and algorithm.final_mask is not Importance.final_mask,
             f"pruning.latency_target: '{self.algorithm}' decides its mask itself (expected an algorithm that "
             "scores heads and neurons, e.g. gradient)"),
        ]
        for refused, message in refusals:
            if refused:
                raise ValueError(message)
        return self


class OneShotPruning(PruningConfig):
    """Score once after fine-tuning, select, recover."""

    schedule: Literal["one-shot"] = "one-shot"


class IterativePruning(PruningConfig):
    """``iterations`` rounds of score -> select, sparsity rising in equal steps, a share of the
    recovery steps between rounds."""

    schedule: Literal["iterative"] = "iterative"
    iterations: int = Field(3, ge=1)            # rounds of prune-rescore


class GradualPruning(PruningConfig):
    """Prune while fine-tuning (Zhu & Gupta's cubic ramp): every ``prune_every`` steps re-score and
    tighten the mask, reaching ``sparsity`` after ``ramp_fraction`` of the fine-tuning steps."""

    schedule: Literal["gradual"] = "gradual"
    prune_every: int = Field(10, ge=1)
    ramp_fraction: float = Field(0.8, gt=0, le=1)


class DynamicPruning(PruningConfig):
    """Dynamic Sparsification: train once, evaluate every level (its settings: the ``dynamic`` section)."""

    schedule: Literal["dynamic"] = "dynamic"


SCHEDULES: dict[str, type[PruningConfig]] = {"one-shot": OneShotPruning, "iterative": IterativePruning,
                                             "gradual": GradualPruning, "dynamic": DynamicPruning}


def with_schedule(pruning: dict, schedule: str) -> dict:
    """A pruning section (as a dict) switched to ``schedule``: the old schedule's own fields dropped."""
    fields = SCHEDULES[schedule].model_fields
    return {**{k: v for k, v in pruning.items() if k in fields}, "schedule": schedule}


def _schedule_of(value: Any) -> str | None:
    """The tag of a pruning section: its ``schedule`` (one-shot when it names none)."""
    if isinstance(value, dict):
        return value.get("schedule", "one-shot")
    return getattr(value, "schedule", None)


PruningSpec = Annotated[
    Annotated[OneShotPruning, Tag("one-shot")] | Annotated[IterativePruning, Tag("iterative")]
    | Annotated[GradualPruning, Tag("gradual")] | Annotated[DynamicPruning, Tag("dynamic")],
    Discriminator(_schedule_of, custom_error_type="schedule",
                  custom_error_message=f"pruning.schedule: expected one of {', '.join(SCHEDULES)}"),
]


class RecoveryConfig(Strict):
    steps: int = Field(50, ge=0)
    learning_rate: float = Field(3e-5, gt=0)
    # Train the physically shrunk model (a step costs what the kept model costs); false keeps the
    # full-size model under gates, as before (1.6x a dense step at 50% sparsity), for comparison.
    shrink: bool = True
    # Evaluate every N recovery steps (0: only at the end): quality curves over recovery in MLflow,
    # and the resource ASHA stops weak search trials on (`scheduler.type: asha` sets it).
    evaluate_every: int = Field(0, ge=0)
    # Keep the model's dropout while recovering. Off by default: on a CPU drawing dropout's random
    # masks is about a fifth of a step and does not shrink with the model, and a short recovery
    # distilled from the dense teacher loses nothing without it (docs/benchmarks.md).
    dropout: bool = False
    distillation: DistillationConfig = Field(default_factory=DistillationConfig)


class DynamicConfig(Strict):
    """Dynamic Sparsification (``pruning.schedule: dynamic``): train once, evaluate every level of ``grid``.

    After fine-tuning and scoring, heads and neurons are rewired by importance; then every
    step trains the sub-networks of the largest and the smallest level of the grid plus
    ``samples_per_step`` random others (sandwich rule), gradients accumulated, one
    optimizer step. ``pruning.sparsity`` picks the level reported as the run's headline.
    """

    grid: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(10)])
    samples_per_step: int = Field(2, ge=0)      # random levels per step besides the largest and smallest
    steps: int = Field(100, ge=0)               # training steps after rewiring
    learning_rate: float = Field(3e-5, gt=0)
    distill: bool = True                        # sub-networks learn from the full one (same step, detached)
    dropout: bool = False                       # the model's dropout while DS trains (off, as in recovery)
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)       # weight of the distillation loss against the task loss
    match_sparsity: bool = False                # neurons absorb the head rounding (exact encoder sparsity)
    # what the samples_per_step random sub-networks of a step are: uniform levels of the grid (the same
    # width in every layer), or per-layer (heads and neurons kept drawn in each layer on its own, between
    # what the grid's sparsest level keeps and all; see docs/dynamic.md)
    sampling: Literal["uniform", "per-layer"] = "uniform"
    # per-layer sampling: drop up to this many whole layers from each random sub-network (0: never)
    drop_layers_max: int = Field(0, ge=0)
    # per-layer sampling: the fewest units a layer keeps, as a sparsity (default: the grid's sparsest
    # level). Above the grid's top, a searched sub-network may keep fewer units than the sparsest
    # uniform level in some layers and more in others, at that level's latency (docs/dynamic.md)
    per_layer_max_sparsity: float | None = Field(None, ge=0, lt=1)
    # per-layer sampling: each random sub-network draws one width over the whole range and every layer a
    # width near it (a normal deviation of this fraction of the range, clipped), so sub-networks at
    # every cost are trained; null: every layer draws on its own (the widths average out, and nearly
    # every sub-network costs about the middle of the range)
    per_layer_spread: float | None = Field(0.25, gt=0)

    @field_validator("drop_layers_max")
    @classmethod
    def _drop_layers_needs_per_layer_sampling(cls, value: int, info) -> int:
        if value and info.data.get("sampling") != "per-layer":
            raise ValueError("layers are dropped only with dynamic.sampling: per-layer")
        return value

    @field_validator("per_layer_max_sparsity")
    @classmethod
    def _floor_needs_per_layer_sampling(cls, value: float | None, info) -> float | None:
        if value is not None and info.data.get("sampling") != "per-layer":
            raise ValueError("a per-layer floor applies only with dynamic.sampling: per-layer")
        grid = info.data.get("grid") or []
        if value is not None and grid and value < grid[-1]:
            raise ValueError(f"expected at least the grid's sparsest level {grid[-1]}, got {value}")
        return value

    @field_validator("grid")
    @classmethod
    def _grid_is_increasing_from_zero(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("expected at least one sparsity level")
        for level in value:
            if not 0.0 <= level < 1.0:
                raise ValueError(f"expected numbers in [0, 1), got {level}")
        if any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"expected increasing levels without repeats, got {value}")
        if value[0] != 0.0:
            raise ValueError(f"expected the full model (0) as the first level, got {value}")
        return value


class EfficiencyConfig(Strict):
    latency: bool = True
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 8], min_length=1)
    sequence_length: int = Field(128, ge=1)
    repeats: int = Field(5, ge=1)
    warmup: int = Field(2, ge=0)
    threads: int | None = Field(None, ge=1)
    trim_vocabulary: bool = False


class ResourcesConfig(Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(50, ge=1)     # steps between checkpoints (plus every stage boundary)
    max_failures: int = Field(2, ge=0)


class TrackingConfig(Strict):
    uri: str | None = None                      # None: start (or reuse) a local server on 127.0.0.1
    experiment: str = "raysparse"
    log_models: Literal["all", "one", "none"] = "one"   # shrunk models to log (per-language: one per language)
    # logged models leave out tensors and files identical to model.source's (its word embeddings, its
    # tokenizer) and record their hashes; raysparse.load_model / load_tokenizer fill them in,
    # `raysparse export` writes the self-contained form
    lean_models: bool = True


class RunSpec(Strict):
    """One experiment: fine-tune, score, select, recover, evaluate, shrink, measure."""

    name: str = "run"

    @field_validator("name")
    @classmethod
    def _name_is_a_name(cls, value: str) -> str:
        """Names become folder and run names: a path would write outside the storage folder."""
        if not value.strip() or "/" in value or "\\" in value or value.strip(".") == "":
            raise ValueError(f"expected a name without path separators (e.g. xnli-gradient-50), got {value!r}")
        return value
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    pruning: PruningSpec = Field(default_factory=OneShotPruning)
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)
    dynamic: DynamicConfig = Field(default_factory=DynamicConfig)   # used when pruning.schedule is dynamic
    efficiency: EfficiencyConfig = Field(default_factory=EfficiencyConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    storage: str | None = None                  # checkpoints and results; default ./runs

    @model_validator(mode="after")
    def _names_exist(self) -> "RunSpec":
        from raysparse.data.tasks import TASKS
        from raysparse.pruning import ALGORITHMS

        if self.data.task not in TASKS:
            raise ValueError(f"data.task: unknown task '{self.data.task}' (expected one of: {', '.join(TASKS)})")
        if self.data.train_task is not None:
            if self.data.train_task not in TASKS:
                raise ValueError(f"data.train_task: unknown task '{self.data.train_task}' "
                                 f"(expected one of: {', '.join(TASKS)})")
            train, task = TASKS[self.data.train_task], TASKS[self.data.task]
            if train.kind != task.kind or train.kind == "retrieval" or train.label_names != task.label_names:
                raise ValueError(f"data.train_task: '{train.name}' is {train.kind}, '{task.name}' {task.kind} "
                                 "(expected a task of the same kind and labels, with a head: e.g. tydiqa for xquad)")
            if self.data.regime != "zero-shot":
                raise ValueError("data.train_task: fine-tunes on the other task's English rows (expected regime "
                                 f"zero-shot, got {self.data.regime})")
        if self.pruning.algorithm not in ALGORITHMS:
            raise ValueError(f"pruning.algorithm: unknown algorithm '{self.pruning.algorithm}' "
                             f"(expected one of: {', '.join(sorted(ALGORITHMS))})")
        options = ALGORITHMS[self.pruning.algorithm].Options
        try:
            options.model_validate({k: v for k, v in self.pruning.options.items() if v is not None})
        except ValidationError as exc:
            raise ValueError(_format_error(exc, options, prefix="pruning.options")) from None
        if self.pruning.learning_steps is not None:
            if not ALGORITHMS[self.pruning.algorithm].learns_during_training:
                raise ValueError(f"pruning.learning_steps: '{self.pruning.algorithm}' scores without training "
                                 "(expected it only with a method that learns its scores, e.g. l0 or movement)")
            if self.pruning.schedule not in ("one-shot", "iterative"):
                raise ValueError(f"pruning.learning_steps: the {self.pruning.schedule} schedule trains while it "
                                 "prunes (expected schedule one-shot or iterative)")
        if self.pruning.schedule == "dynamic":
            if self.pruning.setting != "shared":
                raise ValueError("pruning.setting: the dynamic schedule trains one shared network (expected 'shared')")
            if self.pruning.algorithm == "layerdrop" or self.pruning.drop_layers:
                raise ValueError("pruning.algorithm: the dynamic schedule orders heads and neurons, not layers "
                                 "(expected a head/neuron algorithm and drop_layers 0)")
        return self

    @model_validator(mode="after")
    def _curve_has_rows(self) -> "RunSpec":
        if self.finetune.evaluate_every and self.data.max_eval_examples is None:
            raise ValueError("finetune.evaluate_every: the curve reads the rows after the reported ones, but "
                             "data.max_eval_examples is null (all rows reported; expected a number)")
        return self

    @model_validator(mode="after")
    def _head_ratio_applies(self) -> "RunSpec":
        """The share of heads is a choice of selection: refused where no selection by scores decides the mask."""
        pruning = self.pruning
        if pruning.head_ratio == 1:
            return self
        from raysparse.pruning import ALGORITHMS, Importance

        algorithm = ALGORITHMS.get(pruning.algorithm)
        if pruning.schedule == "dynamic":
            raise ValueError("pruning.head_ratio: the dynamic schedule's levels keep the same share of heads and "
                             "neurons in every layer (expected 1, or another schedule)")
        if algorithm is not None and algorithm.final_mask is not Importance.final_mask:
            raise ValueError(f"pruning.head_ratio: '{pruning.algorithm}' decides its mask itself (expected 1, or "
                             "an algorithm that scores heads and neurons, e.g. magnitude)")
        if pruning.head_ratio * pruning.sparsity > 1:
            raise ValueError(f"pruning.head_ratio: {pruning.head_ratio:g} at sparsity {pruning.sparsity:g} removes "
                             f"more than every head (expected at most {1 / pruning.sparsity:.2f})")
        return self

    @model_validator(mode="after")
    def _mask_tuning_fits(self) -> "RunSpec":
        """One scale per kept unit, folded into weights, serves one network at its kept size."""
        if not self.pruning.mask_tuning.enabled:
            return self
        if self.pruning.schedule == "dynamic":
            raise ValueError("pruning.mask_tuning: the dynamic schedule's levels share their weights, so no "
                             "per-level scale fits (expected enabled: false, or another schedule)")
        if self.pruning.setting != "shared":
            raise ValueError("pruning.mask_tuning: per-language masks share the weights of their union, so one "
                             "scale per unit cannot fit each language (expected pruning.setting 'shared')")
        if not self.recovery.shrink:
            raise ValueError("pruning.mask_tuning: rescales the physically shrunk model (expected recovery.shrink "
                             "true)")
        return self


def variants_of(annotation: Any) -> dict[str, type[BaseModel]]:
    """The config classes a field may hold, by tag (a discriminated union) or alone (``{"": cls}``)."""
    if hasattr(annotation, "model_fields"):
        return {"": annotation}
    variants = {}
    for arg in get_args(annotation):
        tags = [m.tag for m in getattr(arg, "__metadata__", ()) if isinstance(m, Tag)]
        inner = get_args(arg)[0] if get_origin(arg) is Annotated else arg
        for tag in tags or [""]:
            variants.update(variants_of(inner) if not tag else {tag: inner})
    return variants


def _walk(model_cls: type[BaseModel], loc: tuple) -> tuple[type[BaseModel] | None, list[str]]:
    """The config class that holds the key at ``loc``, and the path without union tags."""
    current: Any = model_cls
    path: list[str] = []
    parts = list(loc)
    while parts:
        part = str(parts.pop(0))
        path.append(part)
        if not parts:
            break
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return None, [*path, *map(str, parts)]
        variants = variants_of(field.annotation)
        if parts and str(parts[0]) in variants and "" not in variants:
            current = variants[str(parts.pop(0))]
        else:
            current = variants.get("", None)
    return current, path


def _allowed_keys(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the config object that holds the key at ``loc``."""
    holder, _ = _walk(model_cls, loc)
    return list(getattr(holder, "model_fields", {}))


def _format_error(error: ValidationError, model_cls: type[BaseModel], prefix: str = "") -> str:
    first = error.errors()[0]
    _, parts = _walk(model_cls, tuple(first["loc"]))
    path = ".".join([prefix, *parts] if prefix else parts)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(model_cls, first["loc"])
        owners = [tag for tag, cls in SCHEDULES.items() if parts[0] == "pruning" and parts[-1] in cls.model_fields]
        if len(parts) == 2 and owners:
            return f"{path}: only the {' and '.join(owners)} schedule takes it (set pruning.schedule)"
        message = "unknown key" + (f" (expected one of: {', '.join(allowed)})" if allowed else "")
    elif first["type"] == "schedule":
        return f"{message}, got {_schedule_of(first['input'])!r}"
    elif "input" in first and first["type"] not in ("value_error",) and not isinstance(first["input"], dict):
        message = f"{message}, got {first['input']!r}"
    if message.startswith(tuple(f"{name}." for name in model_cls.model_fields)) or not path:
        return message
    return f"{path}: {message}"


def parse(model_cls: type[BaseModel], data: Any, where: str = ""):
    """Validate ``data`` into ``model_cls``; a problem becomes one RaysparseError line."""
    try:
        return model_cls.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise RaysparseError(_format_error(exc, model_cls) + (f" (in {where})" if where else "")) from None


def load_spec(path: str | Path, model_cls: type[BaseModel] = RunSpec, budget: str | None = None,
              overrides: list[str] | tuple = ()):
    """Read and validate a YAML spec; its ``budgets:`` section is taken out, ``budget`` applied if named,
    then ``overrides`` (``path=value`` strings or pairs), see :mod:`raysparse.overrides`."""
    from raysparse.overrides import resolve_overrides

    path = Path(path)
    if not path.is_file():
        raise RaysparseError(f"spec: {path} does not exist (expected a YAML file)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RaysparseError(f"spec: {path}{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:   # an empty file is a mistake more often than a wish for every default
        raise RaysparseError(f"spec: {path} is empty (expected a mapping of spec fields; write {{}} to run every default)")
    if not isinstance(data, dict):
        raise RaysparseError(f"spec: {path} must hold a mapping of fields, got {type(data).__name__}")
    data = resolve_overrides(data, str(path), budget, overrides)
    return parse(model_cls, data, str(path))
