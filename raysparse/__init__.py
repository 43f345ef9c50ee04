"""raysparse: Ray-distributed search for structured pruning of multilingual encoders.

The public Python API; the CLI and notebooks call these, never the reverse.
"""

__version__ = "0.1.0"


def load_model(source: str = "embedded", model_class=None, trust_remote_code: bool = False):
    """An encoder from 'embedded', a local folder (shrunk ones included) or a hub id (opt-in)."""
    from raysparse.models.sources import load_encoder

    return load_encoder(source, model_class, trust_remote_code=trust_remote_code)


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
