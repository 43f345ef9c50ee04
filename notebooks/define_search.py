# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Define and launch a pruning search from Python
#
# The same search a YAML file describes, built from Python objects: a base run, a space over
# any spec field (conditional parameters with `when`), objectives, a budget. `raysparse.search`
# validates everything before a trial starts, runs it on Ray Tune with Optuna, tracks each trial
# as a child run in MLflow, and returns the Pareto front.

# %% tags=["parameters"]
name = "notebook-search"
num_samples = 4
max_concurrent = 1
finetune_steps = 20
recovery_steps = 10
languages = ["en", "de", "ru"]
tracking_uri = None      # None: the local MLflow server raysparse starts and reuses
storage = None           # None: ./runs

# %%
from raysparse import SearchSpec, run_search

spec = SearchSpec(
    name=name,
    num_samples=num_samples,
    max_concurrent=max_concurrent,
    objectives=[{"metric": "xnli/avg/accuracy", "mode": "max"},
                {"metric": "xnli/worst/accuracy", "mode": "max"},
                {"metric": "latency/pruned/b1_ms", "mode": "min"}],
    space={
        "pruning.algorithm": {"choice": ["gradient", "magnitude", "random"]},
        "pruning.setting": {"choice": ["shared", "per-language"]},
        "pruning.sparsity": {"choice": [0.3, 0.5]},
        "pruning.options.max_batches": {"int": [1, 4], "when": {"pruning.algorithm": "gradient"}},
    },
    base={
        "data": {"task": "xnli", "languages": languages, "max_train_examples": 64, "max_eval_examples": 48,
                 "max_length": 64},
        "finetune": {"steps": finetune_steps, "batch_size": 8},
        "pruning": {"scoring_examples": 16},
        "recovery": {"steps": recovery_steps},
        "efficiency": {"batch_sizes": [1], "repeats": 3, "sequence_length": 64},
        "tracking": {"log_models": "none"},
    },
    tracking={"uri": tracking_uri, "experiment": "notebooks"},
    storage=storage,
)

# %%
result = run_search(spec, verbose=False)
print(result.table())

# %% [markdown]
# ## The Pareto front
# Trials no other trial beats on every objective at once.

# %%
print(result.pareto_table())
assert result.front, "a finished search has a non-empty Pareto front"
print(f"MLflow parent run: {result.tracking_uri}/#/experiments  run {result.parent_run_id}")
print(f"Trials in the MLflow UI (objectives as columns): {result.ui_url()}")
