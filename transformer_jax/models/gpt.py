"""GPT: a decoder-only causal language model (Radford et al. 2018/2019).

Parameter tree `{embeddings, decoder, [lm_head]}`; with tied embeddings the
gpt2-small preset has GPT-2's 124,439,808 parameters. Cached decoding lives in
the "cache" collection: see `models/generate.py`.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from transformer_jax import cross_entropy, initializers, partitioning as logical
from transformer_jax.embeddings import Embeddings
from transformer_jax.models.common import check_length, key_padding_mask
from transformer_jax.models.configs import GPTConfig
from transformer_jax.stacks import Decoder


class GPT(nn.Module):
    """input_ids `[..., seq]` -> logits `[..., seq, vocab]` (compute dtype).

    One output per method, all on the same parameters (`model.apply(variables,
    ..., method="hidden" | "logits" | "token_stats")`); calling the model is
    `logits`. attention_mask `[..., seq]` (optional): True/1 on real tokens;
    padded keys are never attended. `decode=True` appends to the key/value cache
    instead of attending only within `input_ids` (prefill with many tokens, then
    step with one).
    """
    config: GPTConfig

    def __call__(self, input_ids, *, attention_mask=None, deterministic=True, decode=False,
                 sow_weights=False, return_hidden=False, targets=None):
        """`logits`. `return_hidden=True` / `targets=` are deprecated spellings of
        `hidden` / `token_stats` (kept for one release)."""
        if return_hidden or targets is not None:
            method = "hidden" if return_hidden else "token_stats"
            warnings.warn(f"GPT(..., {'return_hidden=True' if return_hidden else 'targets='}) is "
                          f"deprecated; use model.apply(..., method={method!r})",
                          DeprecationWarning, stacklevel=2)
        x, project = self._trunk(input_ids, attention_mask, deterministic, decode, sow_weights,
                                 head=not return_hidden)
        if return_hidden:
            return x
        if targets is not None:
            return _token_stats(self.config, x, project, targets)
        return project(x)[..., :self.config.vocab_size]

    def hidden(self, input_ids, *, attention_mask=None, deterministic=True, decode=False,
               sow_weights=False):
        """The final hidden states `[..., seq, d_model]` (after the last norm, if any)."""
        return self._trunk(input_ids, attention_mask, deterministic, decode, sow_weights,
                           head=False)[0]

    def logits(self, input_ids, *, attention_mask=None, deterministic=True, decode=False,
               sow_weights=False):
        """Logits `[..., seq, vocab]` (compute dtype); what calling the model returns."""
        x, project = self._trunk(input_ids, attention_mask, deterministic, decode, sow_weights)
        return project(x)[..., :self.config.vocab_size]

    def token_stats(self, input_ids, targets, *, attention_mask=None, deterministic=True):
        """Per-token {"nll", "loss", "correct"} `[..., seq]` (fp32,
        `cross_entropy.token_stats`) of predicting targets `[..., seq]`, computed
        `config.loss_chunk` tokens at a time when that is set, so that the training
        path never holds whole fp32 logits."""
        x, project = self._trunk(input_ids, attention_mask, deterministic, False, False)
        return _token_stats(self.config, x, project, targets)

    @nn.compact
    def _trunk(self, input_ids, attention_mask, deterministic, decode, sow_weights, head=True):
        """(hidden states `[..., seq, d]`, project: `[..., d]` -> `[..., padded vocab]`).
        Every method goes through here, so each initialises the same parameters;
        `head=False` (hidden states only) does not read an untied `lm_head` when
        applied, so it also runs on parameters without one."""
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
        # The output matrix as an array `[vocab_padded, d]` (fp32 master weights).
        weight = None
        if cfg.tie_embeddings:
            weight = embeddings.token.embedding
        elif head or self.is_initializing():
            weight = _Param((cfg.d_model, cfg.vocab_size), _head_init(cfg), cfg.params_dtype,
                            name="lm_head")().T

        def project(h):  # `[..., d]` -> logits `[..., padded vocab]`, as nn.Embed.attend / nn.Dense
            dtype = cfg.compute_dtype
            return jnp.dot(h.astype(dtype), weight.astype(dtype).T)

        return x, project


def _token_stats(cfg: GPTConfig, x, project, targets) -> dict:
    if cfg.loss_chunk:
        return cross_entropy.chunked_token_stats(x, project, targets, cfg.loss_chunk,
                                                 cfg.vocab_size)
    return cross_entropy.token_stats(project(x), targets, cfg.vocab_size)


class _Param(nn.Module):
    """One "kernel" parameter returned as an array (the layout of an `nn.Dense`
    without bias), so that the loss can apply it chunk by chunk."""
    shape: tuple[int, ...]
    init_fn: Callable
    param_dtype: Any

    @nn.compact
    def __call__(self):
        return self.param("kernel", self.init_fn, self.shape, self.param_dtype)


def _head_init(cfg: GPTConfig):
    # An untied output matrix is initialised like an embedding table (fairseq's
    # `output_projection`, std d^-1/2 under "xavier": see `initializers.py`).
    init = initializers.embedding_init(cfg.init, cfg.init_std, cfg.d_model)
    return logical.param_init(init, (logical.EMBED, logical.VOCAB), cfg.logical_partitioning)
