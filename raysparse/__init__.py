"""raysparse: Ray-distributed search for structured pruning of multilingual encoders."""

__version__ = "0.1.0"
