"""Stacks of blocks: `Encoder` and `Decoder`, on already-embedded inputs.

Layers are named `layer_0 ... layer_{L-1}` so per-layer statistics (gradient
norms in the LN-stability experiment) can be read off the parameter tree. With
`config.scan_layers` the stack is one `nn.scan` over a block whose parameters
are stacked along a leading `[L]` axis under `layers/block/...` (the names in
`scan_names`); `stack_layers` and `unstack_layers` convert between the two trees.
Both layouts run the same layer modules, whose Python flags are attributes.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.blocks import DecoderBlock, EncoderBlock
from transformer_jax.config import TransformerConfig
from transformer_jax.initializers import residual_out_gain
from transformer_jax.normalization import deepnorm_constants, has_final_norm, make_norm
from transformer_jax.scan_names import SCAN_BLOCK, SCAN_NAME
from transformer_jax.validation import choice


class _EncoderLayer(EncoderBlock):
    """An `EncoderBlock` whose call-time Python flags are attributes, so that one
    signature `(x, mask, kernel_kwargs)` serves the unrolled loop, `nn.remat` (no
    static argnums to keep in step with the block) and `nn.scan` (all broadcast)."""
    deterministic: bool = True
    sow_weights: bool = False

    @nn.compact
    def __call__(self, x, mask, kernel_kwargs):
        return super().__call__(x, mask, self.deterministic, self.sow_weights, **kernel_kwargs)


class _DecoderLayer(DecoderBlock):
    """A `DecoderBlock` with its flags as attributes: `(x, memory, mask, memory_mask,
    kernel_kwargs)`, as `_EncoderLayer`."""
    deterministic: bool = True
    decode: bool = False
    sow_weights: bool = False

    @nn.compact
    def __call__(self, x, memory, mask, memory_mask, kernel_kwargs):
        return super().__call__(x, memory, mask, memory_mask, self.deterministic, self.decode,
                                self.sow_weights, **kernel_kwargs)


class _ScanStep(nn.Module):
    """One `nn.scan` step: `(x, *broadcast) -> (x, None)` through the layer
    `make_layer(name=SCAN_BLOCK)`."""
    make_layer: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x, *broadcast):
        return self.make_layer(name=SCAN_BLOCK)(x, *broadcast), None


def _remat(cls, cfg: TransformerConfig, **kwargs):
    """`cls` wrapped in `nn.remat` when `cfg.remat` asks for it; the parameter tree is
    unchanged. Python flags are module attributes, so nothing needs to be static."""
    if cfg.remat == "none":
        return cls
    policy = None if cfg.remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return nn.remat(cls, policy=policy, **kwargs)


def _run_layers(layer_cls, cfg: TransformerConfig, x, args: tuple, **attrs):
    """x through cfg.num_layers layers `layer_cls(cfg, **attrs)(x, *args)`: unrolled as
    `layer_0 ... layer_{L-1}`, or with `cfg.scan_layers` one `nn.scan` (`layers/block`)
    whose parameters, caches and sown values get a leading layer axis (logical name
    "layers"), dropout keys differing per layer."""
    if not cfg.scan_layers:
        layer = _remat(layer_cls, cfg)
        for i in range(cfg.num_layers):
            x = layer(cfg, name=f"layer_{i}", **attrs)(x, *args)
        return x
    # prevent_cse=False: scan already stops the CSE that remat guards against.
    scan = nn.scan(_remat(_ScanStep, cfg, prevent_cse=False),
                   variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                   split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast,) * len(args), length=cfg.num_layers,
                   metadata_params={nn.PARTITION_NAME: SCAN_NAME})
    x, _ = scan(functools.partial(layer_cls, cfg, **attrs), name=SCAN_NAME)(x, *args)
    return x


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
        choice("Encoder.arch", self.arch, ("encoder", "encoder_decoder"))
        alpha, beta = 1.0, 1.0
        if cfg.norm_placement == "deepnorm":
            alpha, beta = deepnorm_constants(self.arch, cfg.num_layers, self.num_decoder_layers)["encoder"]
        out_gain = residual_out_gain(cfg.init, 2 * cfg.num_layers)
        x = _run_layers(_EncoderLayer, cfg, x, (mask, kernel_kwargs), alpha=alpha, beta=beta,
                        out_gain=out_gain, deterministic=deterministic, sow_weights=sow_weights)
        return _final_norm(cfg, x)


class Decoder(nn.Module):
    """`[..., tgt, d_model]` (+ optional `memory [..., src, d_model]`) -> `[..., tgt, d_model]`."""
    config: TransformerConfig
    arch: str = "decoder"
    num_encoder_layers: int = 0
    cross_attention: bool = False

    @nn.compact
    def __call__(self, x, memory=None, *, mask=None, memory_mask=None, deterministic=True,
                 decode=False, sow_weights=False, **kernel_kwargs):
        cfg = self.config
        choice("Decoder.arch", self.arch, ("decoder", "encoder_decoder"))
        alpha, beta = 1.0, 1.0
        if cfg.norm_placement == "deepnorm":
            alpha, beta = deepnorm_constants(self.arch, self.num_encoder_layers, cfg.num_layers)["decoder"]
        # Residual sub-layers: self-attention, feed-forward and cross-attention if any.
        sublayers = 3 if self.cross_attention else 2
        out_gain = residual_out_gain(cfg.init, sublayers * cfg.num_layers)
        x = _run_layers(_DecoderLayer, cfg, x, (memory, mask, memory_mask, kernel_kwargs),
                        alpha=alpha, beta=beta, out_gain=out_gain,
                        cross_attention=self.cross_attention, deterministic=deterministic,
                        decode=decode, sow_weights=sow_weights)
        return _final_norm(cfg, x)
