"""A one-worker search trial runs its pipeline inside the Tune trial's own process, and gives the
metrics the same spec gives on a Ray Train TorchTrainer."""

import pytest

from raysparse.runner import run
from raysparse.search import search
from tests.tiny_search import metrics_of, tags_of, tiny_base, tiny_search_spec, trial_runs


@pytest.mark.timeout(900)
def test_one_process_trial_equals_the_torchtrainer_run(ray_local, tracking_server, tmp_path, tiny_model_dir):
    spec = tiny_search_spec("one-process", tiny_model_dir, tracking_server, tmp_path / "search", num_samples=1,
                            max_concurrent=1, finetune_steps=3)
    spec["space"] = {"pruning.sparsity": {"choice": [0.4]}}
    spec["trials"] = [{"pruning.sparsity": 0.4}]
    search(spec, verbose=False)
    _, trials = trial_runs(tracking_server, "one-process")
    assert len(trials) == 1 and trials[0]["info"]["status"] == "FINISHED"
    assert tags_of(trials[0])["raysparse.executor"] == "TuneSession"

    base = tiny_base(tiny_model_dir, finetune_steps=3)
    base["pruning"]["sparsity"] = 0.4
    base.update({"name": "one-process-reference", "storage": str(tmp_path / "runs"),
                 "tracking": {"uri": tracking_server, "experiment": "one-process-reference", "log_models": "none"}})
    reference = run(base, verbose=False)
    trial = metrics_of(trials[0])
    for key in ("xnli/en/accuracy", "xnli/de/accuracy", "xnli/avg/accuracy", "encoder_sparsity", "params/total"):
        assert trial[key] == pytest.approx(reference.metrics[key], abs=1e-6), key
