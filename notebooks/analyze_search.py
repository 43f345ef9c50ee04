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
# # Analyse a finished search from MLflow
#
# Everything here is read back from the tracking server: the trials of a search, its
# Pareto front, per-language quality, and efficiency against sparsity.

# %% tags=["parameters"]
name = "notebook-search"
tracking_uri = None     # None: the local MLflow server raysparse started
out_dir = "reports/notebook-search"

# %%
from raysparse import load_search, per_language_plot, write_report
from raysparse import pareto_plot, quality_vs_sparsity_plot

report = load_search(name, tracking_uri)
print(f"{len(report.rows)} finished trials; objectives: {report.objectives}")

# %%
from raysparse import format_table

print(format_table(report.front(), report.columns()))

# %% [markdown]
# ## Pareto front and quality against sparsity (dashed: the worst language)

# %%
metrics = [m for m, _ in report.objectives]
if len(metrics) >= 2:
    pareto_plot(report.rows, report.front(), metrics[-1], metrics[0])
quality = report.quality_metric()
quality_vs_sparsity_plot(report.rows, quality, quality.replace("/avg/", "/worst/"))

# %% [markdown]
# ## Per-language curves

# %%
print(report.per_language_table())
per_language_plot(report)

# %%
written = write_report(report, out_dir)
print("\n".join(f"{k}: {v}" for k, v in written.items()))
