"""One search trial: a run (from the runs layer) inside a Ray Tune function trainable.

The trainable builds the trial's RunSpec from the base and the sampled values and opens a
child MLflow run under the search's parent run. A one-worker trial then executes the run
pipeline in this very process (:class:`~raysparse.training.session.TuneSession`: no Ray
Train controller or worker processes, Tune's checkpoints and restarts); a trial with several
workers fits a TorchTrainer whose reports reach Tune through ``TuneReportCallback`` (the
Ray Train V2 pattern). Its MLflow run and its storage are keyed by search and trial id, so
a trial resumed after a restored search continues its own checkpoint and its own MLflow run.
"""

from __future__ import annotations

from typing import Any

from raysparse.config import RunSpec


def trial_run_name(spec: RunSpec, trial_id: str) -> str:
    """What the trial is, readable in the MLflow UI: algorithm, setting, schedule, sparsity."""
    p = spec.pruning
    return f"{p.algorithm}-{p.setting}-{p.schedule}-s{p.sparsity:.2f}-{trial_id}"


def run_trial(config: dict[str, Any], base: dict, search: dict) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raysparse.runner import fit_tracked, preflight, run_params, run_tags, trainer_for
    from raysparse.search.space import trial_spec
    from raysparse.tracking.runs import finished_metrics, open_run, spec_key

    context = tune.get_context()
    trial_id = context.get_trial_id()
    params = {k: v for k, v in config.items() if not k.startswith("__")}
    spec = trial_spec(base, params)
    languages = preflight(spec)
    name = trial_run_name(spec, trial_id)
    key = spec_key({"search": search["name"], "search_key": search["key"], "trial": trial_id})
    uri = search["tracking_uri"]
    run_id, resumed = open_run(uri, search["experiment"], key, name, params=run_params(spec, languages),
                               tags=run_tags(spec, "trial", **{
                                   "raysparse.search": search["name"], "raysparse.search_run_id": search["parent_run_id"],
                                   "raysparse.trial_id": trial_id,
                                   "raysparse.sampled": ", ".join(f"{k}={v}" for k, v in params.items())}),
                               parent_run_id=search["parent_run_id"])
    recorded = finished_metrics(uri, run_id) if resumed else None
    if recorded is not None:
        # Finished before a killed driver's last saved state said so: its result is the one MLflow holds
        # (running it again from an earlier checkpoint would re-time it, and MLflow keeps one entry per step).
        recorded.pop("recovery_step", None)   # a finished trial was not stopped early
        tune.report(recorded)
        return
    if one_process(spec):
        run_in_trial(spec, languages, uri, run_id, f"trial {name}", search["storage"])
        return
    trainer = trainer_for(spec, languages, uri, run_id, search["storage"], f"{search['name']}-{trial_id}",
                          callbacks=[TuneReportCallback()])
    fit_tracked(trainer, uri, run_id, f"trial {name}", error=RuntimeError)


def one_process(spec: RunSpec) -> bool:
    """A one-worker trial runs its pipeline in the Tune trial's own process; several workers use a TorchTrainer."""
    return spec.resources.num_workers == 1


def run_in_trial(spec: RunSpec, languages: dict, uri: str, run_id: str, what: str, storage: str) -> None:
    """The trial's pipeline in this process, reporting (and checkpointing) through Tune; the MLflow run
    ends FINISHED or FAILED with it."""
    import torch

    from raysparse.errors import first_line
    from raysparse.tracking.runs import RunLogger
    from raysparse.training.pipeline import build_pipeline
    from raysparse.training.session import TuneSession

    torch.set_num_threads(max(1, round(spec.resources.cpus_per_worker)))
    logger = RunLogger(uri, run_id)
    try:
        build_pipeline(spec, languages, TuneSession(spec.resources.use_gpu), uri, run_id, storage).execute()
    except Exception as exc:
        logger.finish("FAILED")
        raise RuntimeError(f"{what} failed: {first_line(exc)}") from exc
    logger.finish("FINISHED")
