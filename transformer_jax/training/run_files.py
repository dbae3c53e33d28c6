"""Deprecated path: moved to `transformer_jax.run.files` (the run layer, above training
and parallel). `transformer_jax.run.files` is the one to import."""
from transformer_jax._moved import forward

__getattr__ = forward(__name__, "transformer_jax.run.files")
