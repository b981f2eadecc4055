"""ptm: parallel train-then-merge for JAX language models."""

__version__ = "0.1.0"
