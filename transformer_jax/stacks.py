"""Stacks of blocks: `Encoder` and `Decoder`, on already-embedded inputs.

Layers are named `layer_0 ... layer_{L-1}` so per-layer statistics (gradient
norms in the LN-stability experiment) can be read off the parameter tree.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from transformer_jax.blocks import DecoderBlock, EncoderBlock
from transformer_jax.config import TransformerConfig
from transformer_jax.normalization import deepnorm_constants, has_final_norm, make_norm


def _block_class(cls, cfg: TransformerConfig, static_argnums: tuple[int, ...]):
    """The block class, wrapped in `nn.remat` when `cfg.remat` asks for it. The
    parameter tree is unchanged; Python flags are static (argnums count `self` as 0)."""
    if cfg.remat == "none":
        return cls
    policy = None if cfg.remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return nn.remat(cls, static_argnums=static_argnums, policy=policy)


def _final_norm(cfg: TransformerConfig):
    return make_norm(cfg.norm_type, cfg.layer_norm_eps, cfg.compute_dtype, cfg.params_dtype,
                     "final_norm")


class Encoder(nn.Module):
    """`[..., seq, d_model]` -> `[..., seq, d_model]`; `num_layers` encoder blocks."""
    config: TransformerConfig
    # DeepNorm constants depend on the whole architecture: "encoder" (BERT) or
    # "encoder_decoder" (with `num_decoder_layers`).
    arch: str = "encoder"
    num_decoder_layers: int = 0

    @nn.compact
    def __call__(self, x, mask=None, *, deterministic=True, sow_weights=False, **kernel_kwargs):
        cfg = self.config
        alpha, beta = 1.0, 1.0
        if cfg.norm_placement == "deepnorm":
            alpha, beta = deepnorm_constants(self.arch, cfg.num_layers, self.num_decoder_layers)["encoder"]
        block = _block_class(EncoderBlock, cfg, static_argnums=(3, 4))
        for i in range(cfg.num_layers):
            x = block(cfg, alpha=alpha, beta=beta, name=f"layer_{i}")(
                x, mask, deterministic, sow_weights, **kernel_kwargs)
        return _final_norm(cfg)(x) if has_final_norm(cfg.norm_placement) else x


class Decoder(nn.Module):
    """`[..., tgt, d_model]` (+ optional `memory [..., src, d_model]`) -> `[..., tgt, d_model]`."""
    config: TransformerConfig
    arch: str = "decoder"
    num_encoder_layers: int = 0
    cross_attention: bool = False

    @nn.compact
    def __call__(self, x, memory=None, *, mask=None, memory_mask=None, deterministic=True,
                 decode=False, sow_weights=False):
        cfg = self.config
        alpha, beta = 1.0, 1.0
        if cfg.norm_placement == "deepnorm":
            alpha, beta = deepnorm_constants(self.arch, self.num_encoder_layers, cfg.num_layers)["decoder"]
        block = _block_class(DecoderBlock, cfg, static_argnums=(5, 6, 7))
        for i in range(cfg.num_layers):
            x = block(cfg, alpha=alpha, beta=beta, cross_attention=self.cross_attention,
                      name=f"layer_{i}")(x, memory, mask, memory_mask, deterministic, decode, sow_weights)
        return _final_norm(cfg)(x) if has_final_norm(cfg.norm_placement) else x
