"""The execution layer: every registered algorithm through the one pipeline, training at the kept
size, per-language masks inside their union, and exact resume across the change of shape.

All in-process on the tiny encoder (``LocalSession``): the same stages Ray Train workers run."""

import copy

import pytest
import torch

import raysparse
from raysparse.errors import RaysparseError
from raysparse.pruning import ALGORITHMS
from raysparse.runner import as_spec, preflight, run_in_process
from raysparse.structure import apply_mask, encoder_sparsity_of, params_per_neuron, shrink, structure_of
from raysparse.training.loop import Callback
from raysparse.training.pipeline import build_pipeline
from raysparse.training.session import LocalSession
from raysparse.training.worker import union_of

HIDDEN, HEAD_DIM, LAYERS, HEADS, FFN = 32, 8, 2, 4, 64
TOTAL = LAYERS * (HEADS * (4 * HIDDEN * HEAD_DIM + 3 * HEAD_DIM) + FFN * params_per_neuron(HIDDEN))


def tiny_spec(model_dir, name="pipeline", **pruning):
    return {"name": name, "model": {"source": str(model_dir)},
            "data": {"task": "xnli", "languages": ["en", "de"], "max_train_examples": 32, "max_eval_examples": 16,
                     "max_length": 32},
            "finetune": {"steps": 4, "batch_size": 8, "learning_rate": 1e-3},
            "pruning": {"algorithm": "gradient", "sparsity": 0.4, "scoring_examples": 16, **pruning},
            "recovery": {"steps": 4, "learning_rate": 1e-3},
            "efficiency": {"latency": False},
            "resources": {"checkpoint_every": 1},
            "tracking": {"log_models": "none"}}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,options", [*[(name, {}) for name in sorted(ALGORITHMS)],
                                          ("layerdrop", {"by": "gradient"})])
def test_every_registered_algorithm_runs_the_pipeline(name, options, tiny_model_dir):
    """Finite scores for what is kept, the exact target sparsity, the model trained and left at the
    kept size, and the shrunk model computing what the mask computes on the dense one."""
    target = 0.4
    pipeline = run_in_process(tiny_spec(tiny_model_dir, f"contract-{name}", algorithm=name, sparsity=target,
                                        options=options))
    mask, scores = pipeline.state.masks["shared"], pipeline.state.scores["shared"]
    assert torch.isfinite(scores.heads[mask.effective_heads()]).all()
    assert torch.isfinite(scores.neurons[mask.effective_neurons()]).all()
    sparsity = encoder_sparsity_of(mask, HIDDEN, HEAD_DIM)
    if name == "layerdrop":   # whole layers: the nearest multiple of 1/LAYERS
        assert sparsity == pytest.approx(round(target * LAYERS) / LAYERS, abs=1e-12)
    else:
        assert sparsity == pytest.approx(target, abs=params_per_neuron(HIDDEN) / 2 / TOTAL)
    assert pipeline.state.metrics["encoder_sparsity"] == pytest.approx(sparsity)
    kept = structure_of(pipeline.model.encoder).to_mask()   # recovery trained (and left) the kept size
    assert kept.kept_heads.equal(mask.effective_heads()) and kept.kept_neurons.equal(mask.effective_neurons())
    assert kept.kept_layers.equal(mask.kept_layers)
    assert pipeline.state.metrics["cost/recover/wall_s"] > 0

    dense = raysparse.load_model(str(tiny_model_dir)).eval()
    tokenizer = raysparse.load_tokenizer(str(tiny_model_dir))
    batch = tokenizer(["The quick brown fox.", "Der schnelle braune Fuchs springt."], padding=True, return_tensors="pt")
    with torch.no_grad(), apply_mask(dense, mask):
        masked = dense(**batch).last_hidden_state
    with torch.no_grad():
        shrunk = shrink(copy.deepcopy(dense), mask)(**batch).last_hidden_state
    torch.testing.assert_close(shrunk, masked, atol=1e-5, rtol=0)


@pytest.mark.timeout(300)
def test_per_language_masks_train_inside_their_union(tiny_model_dir):
    pipeline = run_in_process(tiny_spec(tiny_model_dir, "per-language", setting="per-language"))
    masks = pipeline.state.masks
    assert sorted(masks) == ["de", "en"]
    kept = structure_of(pipeline.model.encoder).to_mask()
    union = union_of(masks.values())
    assert kept.kept_heads.equal(union.effective_heads()) and kept.kept_neurons.equal(union.effective_neurons())
    for language in ("en", "de"):
        assert f"xnli/{language}/accuracy" in pipeline.state.metrics


def assert_same_weights(model, other, atol):
    """The same tensor names (a missing or extra tensor fails), each equal within ``atol``."""
    ours, theirs = model.state_dict(), other.state_dict()
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        torch.testing.assert_close(theirs[name], tensor, atol=atol, rtol=0, msg=name)


class Interrupt(Callback):
    """Kills the stage it observes after ``after`` steps (as a killed worker would stop)."""

    class Killed(Exception):
        pass

    def __init__(self, after: int):
        self.after = after

    def on_step_end(self, step, loss):
        if step == self.after:
            raise self.Killed


@pytest.mark.timeout(300)
@pytest.mark.parametrize("setting", ["shared", "per-language"])
def test_resume_mid_recovery_rebuilds_the_shrunk_shape(setting, tiny_model_dir, tmp_path):
    """A run stopped in the middle of recovery resumes from its checkpoint (a shrunk model) and ends
    exactly where an uninterrupted run ends."""
    spec = as_spec(tiny_spec(tiny_model_dir, f"resume-{setting}", setting=setting))
    languages = preflight(spec)
    straight = build_pipeline(spec, languages, LocalSession())
    straight.execute()

    first = build_pipeline(spec, languages, LocalSession(tmp_path / "ckpt"))
    first.finetune(), first.prune()
    first.observers.append(Interrupt(after=2))
    with pytest.raises(Interrupt.Killed):
        first.recover()
    resumed = build_pipeline(spec, languages, LocalSession(tmp_path / "ckpt"))
    assert (resumed.state.stage, resumed.state.step, resumed.state.metrics["resumes"]) == ("recover", 2, 1)
    assert structure_of(resumed.model.encoder) == structure_of(first.model.encoder)
    resumed.execute()
    for key, value in straight.state.metrics.items():
        if key.startswith("xnli/"):
            assert resumed.state.metrics[key] == pytest.approx(value, abs=1e-6), key
    assert_same_weights(straight.model, resumed.model, atol=1e-6)


def test_a_non_finite_loss_stops_any_stage_in_one_line(tiny_model_dir):
    spec = tiny_spec(tiny_model_dir, "nan")
    spec["finetune"]["learning_rate"] = 1e30
    with pytest.raises(RaysparseError, match="training: the loss became"):
        run_in_process(spec)


# --- fine-tune once, prune many ------------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_the_fine_tuned_model_is_computed_once_and_reused(tiny_model_dir, tmp_path):
    """Runs that differ only in pruning choices share one fine-tuning; a hit gives the metrics a fresh
    fine-tuning gives, and a corrupt entry is recomputed, never used."""
    def spec(name, cache=True, **pruning):
        data = tiny_spec(tiny_model_dir, name, **pruning)
        data["storage"] = str(tmp_path / "runs")
        data["finetune"]["cache"] = cache
        return data

    first = run_in_process(spec("first", sparsity=0.3))
    second = run_in_process(spec("second", sparsity=0.3, algorithm="magnitude"))
    fresh = run_in_process(spec("fresh", cache=False, sparsity=0.3, algorithm="magnitude"))
    assert (first.state.metrics["cache/finetune/hit"], second.state.metrics["cache/finetune/hit"]) == (0.0, 1.0)
    assert "cache/finetune/hit" not in fresh.state.metrics
    for key, value in fresh.state.metrics.items():
        if key.startswith("xnli/"):
            assert second.state.metrics[key] == pytest.approx(value, abs=1e-6), key

    entries = list((tmp_path / "runs" / "cache" / "finetune").glob("*/model.safetensors"))
    assert len(entries) == 1
    entries[0].write_bytes(entries[0].read_bytes()[:-16])   # truncated: the digest no longer matches
    third = run_in_process(spec("third", sparsity=0.5))
    assert third.state.metrics["cache/finetune/hit"] == 0.0
    other = run_in_process({**spec("other-seed", sparsity=0.3), "seed": 1})
    assert other.state.metrics["cache/finetune/hit"] == 0.0   # the seed is part of the key


@pytest.mark.timeout(300)
def test_teacher_targets_are_computed_once_and_give_what_the_live_teacher_gives(tiny_model_dir, tmp_path):
    """Distillation's soft targets depend on the teacher and the batches alone: a second run with other
    pruning choices reads them from the cache and ends where a run with the teacher beside it ends."""
    def spec(name, cache_targets=True, **pruning):
        data = tiny_spec(tiny_model_dir, name, **pruning)
        data["storage"] = str(tmp_path / "runs")
        data["recovery"]["distillation"] = {"enabled": True, "alpha": 0.8, "cache_targets": cache_targets}
        return data

    first = run_in_process(spec("first"))
    second = run_in_process(spec("second", algorithm="magnitude"))
    live = run_in_process(spec("live", cache_targets=False, algorithm="magnitude"))
    hit = "cache/teacher-targets/hit"
    assert (first.state.metrics[hit], second.state.metrics[hit]) == (0.0, 1.0)
    assert hit not in live.state.metrics
    assert len(list((tmp_path / "runs" / "cache" / "teacher-targets").glob("*/targets.safetensors"))) == 1
    compared = [key for key in live.state.metrics if key.startswith("xnli/")]
    assert compared
    for key in compared:
        assert second.state.metrics[key] == pytest.approx(live.state.metrics[key], abs=1e-6), key
    assert_same_weights(second.model, live.model, atol=1e-5)


@pytest.mark.timeout(300)
def test_recovery_keeps_the_teachers_outputs_for_rows_met_again(tiny_model_dir):
    """Recovery meets its rows again every epoch: the frozen teacher's outputs for a row met again (hidden
    states included) are kept in memory, so the teacher runs on the first two epochs' batches only, and
    the run ends where a run with the teacher beside every step ends."""
    def spec(name, row_cache_mb):
        data = tiny_spec(tiny_model_dir, name)
        data["data"]["max_train_examples"] = 16
        data["recovery"] = {"steps": 16, "learning_rate": 1e-3,
                            "distillation": {"enabled": True, "hidden": True, "row_cache_mb": row_cache_mb}}
        return data

    cached, live = run_in_process(spec("rows", 64)), run_in_process(spec("live", 0))
    passes = "cost/recover/teacher_passes"
    assert live.state.metrics[passes] == 16
    # 16 rows per language, two languages: epochs of 4 batches of 8; a row is kept when met again
    assert cached.state.metrics[passes] == 8
    assert (cached.state.metrics["cost/recover/teacher_rows"], cached.state.metrics["cost/recover/distilled_rows"],
            live.state.metrics["cost/recover/teacher_rows"]) == (64, 128, 128)
    compared = [key for key in live.state.metrics if key.startswith("xnli/")]
    assert compared
    for key in compared:
        assert cached.state.metrics[key] == pytest.approx(live.state.metrics[key], abs=1e-4), key
    assert_same_weights(cached.model, live.model, atol=1e-4)


@pytest.mark.timeout(300)
def test_importance_scores_of_the_dense_model_are_computed_once(tiny_model_dir, tmp_path):
    """Runs that differ only in sparsity read the first one's gradient scores and select from them what
    fresh scores give; another algorithm scores anew."""
    def spec(name, algorithm="gradient", sparsity=0.3, cache=True):
        data = tiny_spec(tiny_model_dir, name, algorithm=algorithm, sparsity=sparsity)
        data["storage"] = str(tmp_path / "runs")
        data["finetune"]["cache"] = cache
        return data

    first = run_in_process(spec("first"))
    second = run_in_process(spec("second", sparsity=0.5))
    fresh = run_in_process(spec("fresh", sparsity=0.5, cache=False))
    other = run_in_process(spec("other", algorithm="magnitude"))
    hit = "cache/scores/hit"
    assert (first.state.metrics[hit], second.state.metrics[hit], other.state.metrics[hit]) == (0.0, 1.0, 0.0)
    assert hit not in fresh.state.metrics
    cached, computed = second.state.scores["shared"], fresh.state.scores["shared"]
    torch.testing.assert_close(cached.heads, computed.heads, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cached.neurons, computed.neurons, atol=1e-6, rtol=1e-5)
    assert torch.equal(second.state.masks["shared"].kept_heads, fresh.state.masks["shared"].kept_heads)
    assert torch.equal(second.state.masks["shared"].kept_neurons, fresh.state.masks["shared"].kept_neurons)


@pytest.mark.timeout(300)
def test_the_dense_models_scores_are_computed_once(tiny_model_dir, tmp_path):
    """``data.evaluate_dense``: a second run of the same dense model on the same rows reads the first one's
    dense and trivial scores from the cache and logs what a fresh evaluation gives; other rows, a miss."""
    def spec(name, cache=True, **data):
        spec = tiny_spec(tiny_model_dir, name, algorithm="magnitude")
        spec["storage"] = str(tmp_path / "runs")
        spec["finetune"]["cache"] = cache
        spec["data"].update({"evaluate_dense": True, **data})
        return spec

    first = run_in_process(spec("first"))
    second = run_in_process(spec("second", cache=True))
    fresh = run_in_process(spec("fresh", cache=False))
    other = run_in_process(spec("other-rows", skip_eval_examples=16))
    hit = "cache/dense-eval/hit"
    assert (first.state.metrics[hit], second.state.metrics[hit], other.state.metrics[hit]) == (0.0, 1.0, 0.0)
    assert hit not in fresh.state.metrics
    dense = {k: v for k, v in fresh.state.metrics.items() if k.startswith(("dense/", "trivial/"))}
    assert any(k.startswith("dense/xnli/") for k in dense) and any(k.startswith("trivial/xnli/") for k in dense)
    assert {k: second.state.metrics[k] for k in dense} == pytest.approx(dense, abs=1e-9)
    assert len(list((tmp_path / "runs" / "cache" / "dense-eval").glob("*/dense.json"))) == 2   # the rows are in the key


def _compute_once(root, counter, results):
    import time

    from raysparse.training.stage_cache import StageCache

    cache = StageCache(root, poll=0.05)
    record = cache.acquire("finetune", "k")
    if record is None:
        with open(counter, "a") as handle:
            handle.write("x")
        time.sleep(1.0)

        def write(folder):
            (folder / "model.safetensors").write_bytes(b"weights")

        record = cache.put("finetune", "k", write, {"run_id": "me"})
        cache.release("finetune", "k")
    results.put(record["sha256"])


@pytest.mark.timeout(120)
def test_concurrent_runs_needing_one_missing_key_compute_it_once(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_compute_once, args=(tmp_path / "cache", tmp_path / "count", results))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert (tmp_path / "count").read_text() == "x"
    assert len({results.get(timeout=5) for _ in workers}) == 1
    assert not (tmp_path / "cache" / "finetune" / "k.lock").exists()


@pytest.mark.timeout(300)
def test_every_stage_charges_its_cost_and_unfrozen_word_embeddings_train(tiny_model_dir):
    """``cost/<stage>/{wall_s,cpu_s}`` are positive for every stage; ``finetune.freeze_word_embeddings:
    false`` trains the word-embedding table, the default leaves it as loaded."""
    from raysparse.structure import Encoder

    loaded = Encoder(raysparse.load_model(str(tiny_model_dir))).embeddings.word_embeddings.weight.detach().clone()
    frozen = run_in_process(tiny_spec(tiny_model_dir, "frozen"))
    spec = tiny_spec(tiny_model_dir, "unfrozen")
    spec["finetune"]["freeze_word_embeddings"] = False
    trained = run_in_process(spec)
    for stage in ("finetune", "prune", "recover", "evaluate", "finalize"):
        for kind in ("wall_s", "cpu_s"):
            assert frozen.state.metrics[f"cost/{stage}/{kind}"] > 0, (stage, kind)
    table = lambda run: Encoder(run.model).embeddings.word_embeddings.weight.detach()  # noqa: E731
    assert torch.equal(table(frozen), loaded)
    assert not torch.equal(table(trained), loaded)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("algorithm", ["l0", "movement"])
def test_learning_methods_learn_on_top_of_the_cached_fine_tuned_model(algorithm, tiny_model_dir, tmp_path):
    """With ``pruning.learning_steps``, L0 and movement read the dense fine-tuned model from the stage
    cache (a gradient run stored it) and learn their scores in a stage of their own, which resumes
    exactly; the mask has the target sparsity."""
    def spec(name, **pruning):
        data = tiny_spec(tiny_model_dir, name, **pruning)
        data["storage"] = str(tmp_path / "runs")
        return data

    run_in_process(spec("dense-producer"))
    learner = as_spec(spec(f"{algorithm}-after", algorithm=algorithm, learning_steps=4, sparsity=0.5))
    languages = preflight(learner)
    straight = build_pipeline(learner, languages, LocalSession(), storage=learner.storage)
    straight.execute()
    assert straight.state.metrics["cache/finetune/hit"] == 1.0
    assert straight.state.metrics["cost/learn/cpu_s"] > 0
    mask = straight.state.masks["shared"]
    assert encoder_sparsity_of(mask, HIDDEN, HEAD_DIM) == pytest.approx(0.5, abs=0.05)

    first = build_pipeline(learner, languages, LocalSession(tmp_path / "ckpt"), storage=learner.storage)
    first.finetune()
    assert first.state.stage == "learn"
    first.observers.append(Interrupt(after=2))
    with pytest.raises(Interrupt.Killed):
        first.learn()
    resumed = build_pipeline(learner, languages, LocalSession(tmp_path / "ckpt"), storage=learner.storage)
    assert (resumed.state.stage, resumed.state.step) == ("learn", 2)
    resumed.execute()
    assert resumed.state.masks["shared"].to_dict() == mask.to_dict()
    for key, value in straight.state.metrics.items():
        if key.startswith("xnli/"):
            assert resumed.state.metrics[key] == pytest.approx(value, abs=1e-6), key


def test_learning_steps_are_refused_for_methods_that_do_not_learn(tiny_model_dir):
    with pytest.raises(RaysparseError, match="pruning.learning_steps: 'gradient' scores without training"):
        as_spec(tiny_spec(tiny_model_dir, algorithm="gradient", learning_steps=4))


@pytest.mark.timeout(300)
def test_the_learning_curve_of_fine_tuning_is_logged_on_development_rows(tiny_model_dir, tracking_server):
    """Every ``evaluate_every`` steps and at the end, on rows after the reported ones (dev/...), beside the
    reported dense score (dense/..., at the last step)."""
    import mlflow

    data = tiny_spec(tiny_model_dir, "curve")
    data["finetune"]["evaluate_every"] = 2
    data["data"]["evaluate_dense"] = True
    spec = as_spec(data)
    client = mlflow.MlflowClient(tracking_server)
    experiment = client.get_experiment_by_name("test-curve") or client.get_experiment(
        client.create_experiment("test-curve"))
    run = client.create_run(experiment.experiment_id)
    build_pipeline(spec, preflight(spec), LocalSession(), tracking_uri=tracking_server,
                   run_id=run.info.run_id).execute()
    history = client.get_metric_history(run.info.run_id, "dev/xnli/avg/accuracy")
    assert sorted(m.step for m in history) == [2, 4]
    assert all(0.0 <= m.value <= 1.0 for m in history)
    [reported] = client.get_metric_history(run.info.run_id, "dense/xnli/avg/accuracy")
    assert reported.step == 4


@pytest.mark.timeout(300)
def test_a_task_without_training_data_fine_tunes_on_another_of_its_kind(tiny_model_dir, tmp_path):
    """XQuAD has no training set: ``data.train_task: tydiqa`` fine-tunes on TyDiQA-GoldP's English rows and
    evaluates on XQuAD; the cached model is keyed by the task that trained it, so MLQA reuses it."""
    def spec(task, name):
        data = tiny_spec(tiny_model_dir, name)
        data["data"] = {"task": task, "train_task": "tydiqa", "languages": ["de"], "max_train_examples": 16,
                        "max_eval_examples": 4, "max_length": 64, "doc_stride": 32}
        data["pruning"]["scoring_examples"] = 4
        data["storage"] = str(tmp_path / "runs")
        return data

    xquad = run_in_process(spec("xquad", "xquad-from-tydiqa"))
    assert "tydiqa" in xquad.data.sources["tydiqa:en"] and "xquad" in xquad.data.sources["de"]
    assert xquad.state.metrics["cache/finetune/hit"] == 0.0 and "xquad/de/f1" in xquad.state.metrics
    mlqa = run_in_process(spec("mlqa", "mlqa-from-tydiqa"))
    assert mlqa.state.metrics["cache/finetune/hit"] == 1.0 and "mlqa/de/f1" in mlqa.state.metrics


@pytest.mark.parametrize("train_task,regime,error", [
    ("xnli", "zero-shot", "data.train_task: 'xnli' is pair_classification, 'xquad' qa"),
    ("tydiqa", "translate-train", "data.train_task: fine-tunes on the other task's English rows"),
    ("nope", "zero-shot", "data.train_task: unknown task 'nope'"),
])
def test_a_train_task_of_another_kind_is_refused_in_one_line(train_task, regime, error, tiny_model_dir):
    data = tiny_spec(tiny_model_dir)
    data["data"] = {"task": "xquad", "train_task": train_task, "regime": regime}
    with pytest.raises(RaysparseError, match=error):
        as_spec(data)


class DropoutSeen(Callback):
    """Records (stage, the largest dropout probability in the model) at every training step."""

    def __init__(self, pipeline):
        self.pipeline, self.seen = pipeline, []

    def on_step_start(self, step):
        probabilities = [m.p for m in self.pipeline.model.modules() if isinstance(m, torch.nn.Dropout)]
        self.seen.append((self.pipeline.state.stage, max(probabilities)))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule", ["one-shot", "dynamic"])
@pytest.mark.parametrize("dropout", [False, True])
def test_recovery_trains_without_dropout_unless_the_spec_keeps_it(dropout, schedule, tiny_model_dir):
    """Dropout's random masks cost the same at every model size, so recovery and Dynamic Sparsification's
    training turn them off (``recovery.dropout`` / ``dynamic.dropout``: false, the default); fine-tuning
    keeps them, and so does the model after."""
    data = {**tiny_spec(tiny_model_dir, f"dropout-{dropout}-{schedule}"),
            "recovery": {"steps": 3, "learning_rate": 1e-3, "dropout": dropout}}
    if schedule == "dynamic":
        data["pruning"] = {"algorithm": "gradient", "schedule": "dynamic", "sparsity": 0.5, "scoring_examples": 16}
        data["dynamic"] = {"grid": [0.0, 0.5], "samples_per_step": 0, "steps": 3, "dropout": dropout}
    spec = as_spec(data)
    pipeline = build_pipeline(spec, preflight(spec), LocalSession())
    watch = DropoutSeen(pipeline)
    pipeline.observers.append(watch)
    pipeline.execute()
    seen = {stage: {p for s, p in watch.seen if s == stage} for stage, _ in watch.seen}
    assert seen == {"finetune": {0.1}, "recover": {0.1 if dropout else 0.0}}, watch.seen   # DS trains in "recover"
    assert max(m.p for m in pipeline.model.modules() if isinstance(m, torch.nn.Dropout)) == 0.1


def test_step_indices_visit_every_row_once_per_epoch_and_split_the_global_batch_over_ranks():
    import random

    from raysparse.training.taskdata import step_indices

    rows, batch, seed = 50, 8, 3
    epochs = [[], []]
    for step in range(2 * rows // batch + 1):
        positions = range(step * batch, (step + 1) * batch)
        for position, index in zip(positions, step_indices(step, batch, rows, seed)):
            if position < 2 * rows:
                epochs[position // rows].append(index)
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(rows)) and epochs[0] != epochs[1]
    order = list(range(rows))   # the seeded shuffle resumed runs depend on, unchanged
    random.Random(seed * 1_000_003 + 1).shuffle(order)
    assert epochs[1] == order
    # two ranks of 4 read the same rows as one rank of 8, split in rank order
    assert step_indices(5, 4, rows, seed, 0, 2) + step_indices(5, 4, rows, seed, 1, 2) == step_indices(5, 8, rows, seed)


def test_length_grouped_order_keeps_every_row_once_per_epoch_across_ranks_and_epoch_boundaries():
    import random

    from raysparse.training.taskdata import RowLengths, step_indices

    rows, batch, seed = 203, 4, 5   # 203 rows: later epochs start inside a global batch
    lengths = RowLengths(random.Random(0).randint(4, 64) for _ in range(rows))
    for ranks in (1, 2):
        read = [index for step in range(3 * rows // (batch * ranks) + 2) for rank in range(ranks)
                for index in step_indices(step, batch, rows, seed, rank, ranks, lengths)]
        for epoch in range(3):
            assert sorted(read[epoch * rows:(epoch + 1) * rows]) == list(range(rows)), (ranks, epoch)
        spans = [[lengths.values[i] for i in read[k:k + batch * ranks]]
                 for k in range(0, 3 * rows - batch * ranks, batch * ranks)]
        assert sum(max(s) - min(s) for s in spans) / len(spans) < 8, ranks   # 60 on average unsorted


@pytest.mark.timeout(120)
def test_grouping_by_length_cuts_the_padding_of_real_translation_pairs_and_resumes_exactly(tiny_model_dir):
    """XNLI de-en pairs through the contrastive batches: grouped, a batch is mostly real tokens; a fresh
    TaskData (a resumed run) builds the same batch for the same step."""
    from raysparse.models.sources import load_tokenizer
    from raysparse.training.taskdata import TaskData

    def task_data(group: bool) -> TaskData:
        spec = as_spec({**tiny_spec(tiny_model_dir, "grouped"),
                        "data": {"task": "tatoeba", "languages": ["de"], "max_train_examples": 256, "max_length": 64,
                                 "group_by_length": group}})
        return TaskData(spec, load_tokenizer(str(tiny_model_dir)), prompt="query: ")

    padding = {}
    for group in (False, True):
        data = task_data(group)
        rows = data.pool(["de"])
        masks = [data.batch(rows, step, 8)["attention_mask"] for step in range(len(rows) // 8)]
        padding[group] = 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert padding[False] > 0.3 and padding[True] < padding[False] / 3, padding
    again = task_data(True)
    assert torch.equal(again.batch(again.pool(["de"]), 13, 8)["input_ids"], data.batch(rows, 13, 8)["input_ids"])


def test_pairs_of_one_english_sentence_are_not_each_others_negatives(tiny_model_dir):
    """Real XNLI pairs of three languages, grouped by length: translations of one English sentence meet in a
    batch; the batch says which pairs share their sentence, and the contrastive loss does not count them as
    negatives (a model that embeds each sentence and its translations alike has no loss left)."""
    from raysparse.models.heads import TaskModel
    from raysparse.models.sources import load_tokenizer
    from raysparse.training.retrieval import info_nce
    from raysparse.training.taskdata import TaskData, step_indices

    languages = ["de", "es", "fr"]
    spec = as_spec({**tiny_spec(tiny_model_dir, "false-negatives"),
                    "data": {"task": "tatoeba", "languages": languages, "max_train_examples": 200, "max_length": 64,
                             "group_by_length": True}})
    data = TaskData(spec, load_tokenizer(str(tiny_model_dir)), prompt="query: ")
    rows = data.pool(languages)
    batches = [(data.batch(rows, step, 16), step) for step in range(len(rows) // 16)]
    shared = [(batch, step) for batch, step in batches if len(set(batch["labels"].tolist())) < 16]
    assert len(shared) >= 3, "grouped batches of three languages' pairs hold one English sentence twice"
    batch, step = shared[0]
    chosen = [rows[i] for i in step_indices(step, 16, len(rows), spec.seed, 0, 1, data.lengths(rows))]
    labels = batch["labels"].tolist()
    assert all((labels[i] == labels[j]) == (chosen[i][1] == chosen[j][1]) for i in range(16) for j in range(16))

    ideal = torch.nn.functional.one_hot(batch["labels"], 16).float()   # translations embedded alike
    assert info_nce(ideal, ideal, groups=batch["labels"]) < 1e-6
    sizes = torch.bincount(batch["labels"])[batch["labels"]].float()   # unmasked: log(group size) per row
    assert info_nce(ideal, ideal) == pytest.approx(float(sizes.log().mean()), rel=1e-3) and sizes.max() > 1
    model = TaskModel(raysparse.load_model(str(tiny_model_dir)), "retrieval").eval()
    with torch.no_grad():
        outputs = model(**batch)
        half = len(outputs["embeddings"]) // 2
        grouped = info_nce(outputs["embeddings"][:half], outputs["embeddings"][half:], groups=batch["labels"])
        assert data.loss(model, batch) == pytest.approx(float(grouped))
        assert float(grouped) != pytest.approx(float(info_nce(outputs["embeddings"][:half],
                                                              outputs["embeddings"][half:])))


@pytest.mark.timeout(300)
def test_head_ratio_runs_the_pipeline_and_preflight_refuses_a_ratio_the_shape_cannot_take(tiny_model_dir):
    """Heads lose half the target share (1 of 4 per layer at 0.5), neurons the rest: still exact, and
    recovery trains that shape; a ratio that needs more neurons than there are is one line before any work."""
    pipeline = run_in_process(tiny_spec(tiny_model_dir, "head-ratio", sparsity=0.5, head_ratio=0.5))
    mask = pipeline.state.masks["shared"]
    assert int((~mask.kept_heads).sum()) == round(0.25 * LAYERS * HEADS)
    assert encoder_sparsity_of(mask, HIDDEN, HEAD_DIM) == pytest.approx(0.5, abs=params_per_neuron(HIDDEN) / 2 / TOTAL)
    kept = structure_of(pipeline.model.encoder).to_mask()
    assert kept.kept_heads.equal(mask.effective_heads()) and kept.kept_neurons.equal(mask.effective_neurons())
    with pytest.raises(RaysparseError) as error:
        preflight(as_spec(tiny_spec(tiny_model_dir, "head-ratio", sparsity=0.7, head_ratio=0.1)))
    assert str(error.value).startswith("pruning.head_ratio: 0.1 at sparsity 0.7 needs 7% of the heads and ")
    assert "\n" not in str(error.value)
