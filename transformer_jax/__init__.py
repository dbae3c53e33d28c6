"""transformer_jax: a JAX/Flax functional model zoo of transformers.

Layout (imports flow one way, checked by tests/test_layering.py):
  building blocks   attention/, data/, config, embeddings, normalization, blocks, stacks, ...
  -> models/        BERT, GPT, the encoder-decoder, generation, the family registry
  -> training/      tasks (registry), losses, schedules, optimizer, state, steps, checkpoints
     hf/            Hugging Face import/export (beside training: models only)
  -> parallel/      pmap and jit + NamedSharding strategies over the steps
  -> run/           RunConfig, the run loop, run loading, the command line
  -> experiments/   benchmarks and the LN-stability study
"""
__version__ = "0.1.0"
