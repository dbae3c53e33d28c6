"""Stacks of blocks: `Encoder` and `Decoder`, on already-embedded inputs.

Layers are named `layer_0 ... layer_{L-1}` so per-layer statistics (gradient
norms in the LN-stability experiment) can be read off the parameter tree. With
`config.scan_layers` the stack is one `nn.scan` over a block whose parameters
are stacked along a leading `[L]` axis under `layers/block/...`; `stack_layers`
and `unstack_layers` convert between the two trees.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.blocks import DecoderBlock, EncoderBlock
from transformer_jax.config import TransformerConfig
from transformer_jax.normalization import deepnorm_constants, has_final_norm, make_norm


# Where `scan_layers` puts the stacked layers: `.../layers/block/...` (read by
# `training.metrics.grouped_norms` to report them per layer).
SCAN_NAME, SCAN_BLOCK = "layers", "block"


def _remat_policy(cfg: TransformerConfig):
    return None if cfg.remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def _block_class(cls, cfg: TransformerConfig, static_argnums: tuple[int, ...]):
    """The block class, wrapped in `nn.remat` when `cfg.remat` asks for it. The
    parameter tree is unchanged; Python flags are static (argnums count `self` as 0)."""
    if cfg.remat == "none":
        return cls
    return nn.remat(cls, static_argnums=static_argnums, policy=_remat_policy(cfg))


class _EncoderStep(nn.Module):
    """One scan step: (x, broadcast args) -> (x, None); Python flags are attributes."""
    config: TransformerConfig
    alpha: float
    beta: float
    deterministic: bool
    sow_weights: bool

    @nn.compact
    def __call__(self, x, mask, kernel_kwargs):
        block = EncoderBlock(self.config, alpha=self.alpha, beta=self.beta, name=SCAN_BLOCK)
        return block(x, mask, self.deterministic, self.sow_weights, **kernel_kwargs), None


class _DecoderStep(nn.Module):
    config: TransformerConfig
    alpha: float
    beta: float
    cross_attention: bool
    deterministic: bool
    decode: bool
    sow_weights: bool

    @nn.compact
    def __call__(self, x, memory, mask, memory_mask):
        block = DecoderBlock(self.config, alpha=self.alpha, beta=self.beta,
                             cross_attention=self.cross_attention, name=SCAN_BLOCK)
        return block(x, memory, mask, memory_mask, self.deterministic, self.decode,
                     self.sow_weights), None


def _scanned(step_cls, cfg: TransformerConfig, num_broadcast: int, **attrs):
    """`nn.scan` of a step over cfg.num_layers; parameters, caches and sown values get
    a leading layer axis (logical name "layers"), dropout keys differ per layer."""
    body = step_cls
    if cfg.remat != "none":  # prevent_cse=False: scan already stops the CSE remat guards against
        body = nn.remat(step_cls, prevent_cse=False, policy=_remat_policy(cfg))
    scan = nn.scan(body, variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                   split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast,) * num_broadcast, length=cfg.num_layers,
                   metadata_params={nn.PARTITION_NAME: SCAN_NAME})
    return scan(cfg, name=SCAN_NAME, **attrs)


def stack_layers(params: Any, num_layers: int) -> Any:
    """A parameter tree with `layer_0 ... layer_{L-1}` -> the `scan_layers` tree
    (`layers/block/...` with a leading `[L]` axis), wherever the layers sit."""
    if not isinstance(params, dict):
        return params
    if "layer_0" in params:
        rest = {k: v for k, v in params.items() if not k.startswith("layer_")}
        layers = [params[f"layer_{i}"] for i in range(num_layers)]
        return {**rest, SCAN_NAME: {SCAN_BLOCK: jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}}
    return {k: stack_layers(v, num_layers) for k, v in params.items()}


def unstack_layers(params: Any) -> Any:
    """The inverse of `stack_layers`."""
    if not isinstance(params, dict):
        return params
    if SCAN_BLOCK in params.get(SCAN_NAME, {}):
        block = params[SCAN_NAME][SCAN_BLOCK]
        n = jax.tree.leaves(block)[0].shape[0]
        rest = {k: v for k, v in params.items() if k != SCAN_NAME}
        return {**rest, **{f"layer_{i}": jax.tree.map(lambda x: x[i], block) for i in range(n)}}
    return {k: unstack_layers(v) for k, v in params.items()}


def _final_norm(cfg: TransformerConfig, x):
    """The stack's last norm, for placements that end with one (pre, sandwich)."""
    if not has_final_norm(cfg.norm_placement):
        return x
    return make_norm(cfg.norm_type, cfg.layer_norm_eps, cfg.compute_dtype, cfg.params_dtype,
                     "final_norm")(x)


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
        if cfg.scan_layers:
            x, _ = _scanned(_EncoderStep, cfg, 2, alpha=alpha, beta=beta,
                            deterministic=deterministic, sow_weights=sow_weights)(x, mask, kernel_kwargs)
        else:
            block = _block_class(EncoderBlock, cfg, static_argnums=(3, 4))
            for i in range(cfg.num_layers):
                x = block(cfg, alpha=alpha, beta=beta, name=f"layer_{i}")(
                    x, mask, deterministic, sow_weights, **kernel_kwargs)
        return _final_norm(cfg, x)


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
        if cfg.scan_layers:
            x, _ = _scanned(_DecoderStep, cfg, 3, alpha=alpha, beta=beta,
                            cross_attention=self.cross_attention, deterministic=deterministic,
                            decode=decode, sow_weights=sow_weights)(x, memory, mask, memory_mask)
        else:
            block = _block_class(DecoderBlock, cfg, static_argnums=(5, 6, 7))
            for i in range(cfg.num_layers):
                x = block(cfg, alpha=alpha, beta=beta, cross_attention=self.cross_attention,
                          name=f"layer_{i}")(x, memory, mask, memory_mask, deterministic, decode,
                                             sow_weights)
        return _final_norm(cfg, x)
