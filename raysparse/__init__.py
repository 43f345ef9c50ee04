"""raysparse: Ray-distributed search for structured pruning of multilingual encoders.

The public Python API; the CLI and notebooks call these, never the reverse.
"""

__version__ = "0.1.0"


def load_model(source: str = "embedded", model_class=None):
    """An encoder from 'embedded', a local folder (shrunk ones included) or a hub id (opt-in)."""
    from raysparse.models.sources import load_encoder

    return load_encoder(source, model_class)


def load_tokenizer(source: str = "embedded"):
    from raysparse.models.sources import load_tokenizer as _load_tokenizer

    return _load_tokenizer(source)


def prune(*args, **kwargs):
    """Score, select, shrink, recover and evaluate; see :func:`raysparse.standalone.prune`."""
    from raysparse.standalone import prune as _prune

    return _prune(*args, **kwargs)
