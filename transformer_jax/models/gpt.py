"""GPT: a decoder-only causal language model (Radford et al. 2018/2019).

Parameter tree `{embeddings, decoder, [lm_head]}`; with tied embeddings the
gpt2-small preset has GPT-2's 124,439,808 parameters. Cached decoding lives in
the "cache" collection: see `models/generate.py`.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from transformer_jax import partitioning as logical
from transformer_jax.embeddings import Embeddings
from transformer_jax.models.common import check_length, key_padding_mask
from transformer_jax.models.configs import GPTConfig
from transformer_jax.stacks import Decoder


class GPT(nn.Module):
    """input_ids `[..., seq]` -> logits `[..., seq, vocab]` (compute dtype).

    attention_mask `[..., seq]` (optional): True/1 on real tokens; padded keys are
    never attended. `decode=True` appends to the key/value cache instead of
    attending only within `input_ids` (prefill with many tokens, then step with one).
    """
    config: GPTConfig

    @nn.compact
    def __call__(self, input_ids, *, attention_mask=None, deterministic=True, decode=False,
                 sow_weights=False, return_hidden=False):
        cfg = self.config
        check_length(input_ids, cfg.max_len)
        seq = input_ids.shape[-1]
        positions = jnp.arange(seq)
        if decode:
            initialized = self.has_variable("cache", "position_index")
            index = self.variable("cache", "position_index", lambda: jnp.array(0, jnp.int32))
            if initialized:
                positions = index.value + positions
                index.value = index.value + seq
        embeddings = Embeddings(cfg, name="embeddings")
        x = embeddings(input_ids, positions=positions, deterministic=deterministic)
        mask = key_padding_mask(attention_mask, input_ids)
        x = Decoder(cfg, arch="decoder", name="decoder")(
            x, mask=mask, deterministic=deterministic, decode=decode, sow_weights=sow_weights)
        if return_hidden:
            return x
        if cfg.tie_embeddings:
            return embeddings.attend(x)
        return nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                        param_dtype=cfg.params_dtype,
                        kernel_init=logical.param_init(nn.initializers.normal(cfg.init_std),
                                                       (logical.EMBED, logical.VOCAB),
                                                       cfg.logical_partitioning),
                        name="lm_head")(x)
