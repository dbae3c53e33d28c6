"""transformer_jax: a JAX/Flax functional model zoo of transformers.

Layout (imports flow one way):
  attention, positional, embeddings, normalization -> blocks -> models
  -> training -> experiments.
"""
__version__ = "0.1.0"
