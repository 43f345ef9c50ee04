"""raysparse: Ray-distributed search for structured pruning of multilingual encoders.

The public Python API; the CLI and notebooks call these and nothing below them, never the reverse
(``.importlinter`` holds the CLI to it). Besides the functions defined here, the names in ``_LAZY``
(specs, runs, evaluation, benchmarks, search, reports, studies, Dynamic Sparsification, jobs, the
cluster and the MLflow server) are imported from their modules when first used.
"""

__version__ = "0.1.0"


def load_model(source: str = "embedded", model_class=None, trust_remote_code: bool = False):
    """An encoder from 'embedded', a local folder (shrunk ones included) or a hub id (opt-in)."""
    from raysparse.models.sources import load_encoder

    return load_encoder(source, model_class, trust_remote_code=trust_remote_code)


def export_model(folder: str, out: str):
    """Write ``folder`` (a model folder raysparse wrote, lean ones included) self-contained to ``out``."""
    from raysparse.models.lean import export
    from raysparse.models.sources import load_tokenizer as _load_tokenizer
    from raysparse.paths import check_output

    check_output(out, folder)
    return export(folder, out, tokenizer=_load_tokenizer(folder), load=load_model)


def load_tokenizer(source: str = "embedded", trust_remote_code: bool = False):
    from raysparse.models.sources import load_tokenizer as _load_tokenizer

    return _load_tokenizer(source, trust_remote_code=trust_remote_code)


def prune(*args, **kwargs):
    """Score, select, shrink, recover and evaluate; see :func:`raysparse.standalone.prune`."""
    from raysparse.standalone import prune as _prune

    return _prune(*args, **kwargs)


def run(spec, address: str | None = None, verbose: bool = True):
    """One experiment on Ray Train, tracked in MLflow; see :func:`raysparse.runner.run`."""
    from raysparse.runner import run as _run

    return _run(spec, address=address, verbose=verbose)


# The rest of the public API, imported when first used (``raysparse.run_search(...)``, ...), so that
# ``import raysparse`` stays cheap. The CLI's commands and the notebooks call these and nothing else.
_LAZY = {
    "RaysparseError": "raysparse.errors",
    # models, specs and runs
    "embedded_model_dir": "raysparse.models.embedded",
    "RunSpec": "raysparse.config", "load_spec": "raysparse.config",
    "run_in_process": "raysparse.runner", "prune_spec": "raysparse.standalone",
    "evaluate": "raysparse.training.evaluate", "evaluate_model": "raysparse.training.evaluate",
    "bench_models": "raysparse.efficiency.report",
    # search, reports and studies
    "SearchSpec": "raysparse.search.spec", "run_search": "raysparse.search.driver:search",
    "load_search": "raysparse.search.report", "load_runs": "raysparse.search.report",
    "write_report": "raysparse.search.report", "per_language_plot": "raysparse.search.report",
    "pareto_plot": "raysparse.search.pareto", "quality_vs_sparsity_plot": "raysparse.search.pareto",
    "format_table": "raysparse.search.pareto",
    "study": "raysparse.search.study", "study_plots": "raysparse.search.study_plots",
    # Dynamic Sparsification
    "shrink_checkpoint": "raysparse.dynamic", "compare_with_separate_runs": "raysparse.dynamic",
    "search_subnetworks": "raysparse.search.subnetworks", "SubnetworkSearchSpec": "raysparse.search.subnetworks",
    "SubnetworkSearchResult": "raysparse.search.subnetworks",
    # clusters, Ray jobs and the MLflow server
    "serve_cluster": "raysparse.cluster:serve", "submit_job": "raysparse.jobs:submit", "check_spec": "raysparse.jobs",
    "tracking_server": "raysparse.tracking.server:ensure_server",
    "tracking_root": "raysparse.tracking.server:default_root",
}
_MODULES = {"study", "study_plots"}


def __getattr__(name: str):
    import importlib

    if name not in _LAZY:
        raise AttributeError(f"module 'raysparse' has no attribute {name!r}")
    module_name, _, attribute = _LAZY[name].partition(":")
    module = importlib.import_module(module_name)
    return module if name in _MODULES else getattr(module, attribute or name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
