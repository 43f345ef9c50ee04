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
# # A study's report: the paper's tables and plots
#
# One of the studies in `experiments/studies/` (settings, algorithms, efficiency, Dynamic
# Sparsification), read back either from MLflow (`name`) or from a stored run set (`runs`, the
# `runs.json` every report writes; no server and no network needed). The same tables and plots
# `raysparse report` writes: quality against sparsity per setting and algorithm (average and worst
# language), the per-language breakdown, size and speed against sparsity, DS against separate runs.

# %% tags=["parameters"]
runs = "../docs/results/settings/runs.json"   # a stored run set; None: read the search `name` from MLflow
name = "study-settings"
tracking_uri = None                           # None: the local MLflow server raysparse started
out_dir = None                                # a folder to write every table and plot to (None: nothing written)

# %%
from raysparse import study, study_plots
from raysparse import load_runs, load_search, write_report

report = load_runs(runs) if runs else load_search(name, tracking_uri)
items = report.points()
print(f"{report.name}: {len(report.rows)} finished trials, tasks {', '.join(study.tasks_of(items))}")
for line in study.findings(items, report.rows):
    print("-", line)

# %% [markdown]
# ## Quality against sparsity (solid: average over languages, dashed: the worst language)

# %%
for task in study.tasks_of(items):
    print(f"{task} ({study.primary_metric(task)})\n{study.quality_table(items, task)}\n")
study_plots.quality_vs_sparsity(items)

# %% [markdown]
# ## Per language

# %%
for task in study.tasks_of(items):
    print(f"{task}\n{study.language_table(items, task)}\n")
study_plots.per_language(items)

# %% [markdown]
# ## Size and speed: a fast model is not necessarily small

# %%
print(study.efficiency_table(items))
study_plots.efficiency(items)

# %% [markdown]
# ## Dynamic Sparsification against separate runs (when the study has both)

# %%
if any(p.get("schedule") == "dynamic" for p in items) and any(p.get("schedule") != "dynamic" for p in items):
    print(study.dynamic_table(items, report.rows))
    study_plots.dynamic_vs_separate(items)

# %%
if out_dir:
    written = write_report(report, out_dir)
    print("\n".join(f"{k}: {v}" for k, v in written.items()))
