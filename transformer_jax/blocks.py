"""Transformer blocks: feed-forward, encoder block and decoder block.

Every block takes `[..., seq, d_model]` and returns the same shape. The residual
placement (post / pre / sandwich / deepnorm) is `config.norm_placement`; see
`normalization.py` for the formulas.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax

from transformer_jax import initializers, partitioning as logical
from transformer_jax.attention import AttentionConfig, MultiHeadAttention, registry
from transformer_jax.config import TransformerConfig
from transformer_jax.normalization import make_norm

ACTIVATION_FNS: dict[str, Callable] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),   # BERT: exact erf GELU
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # GPT-2 "gelu_new"
    "relu": jax.nn.relu,                                     # Vaswani et al. 2017
}


def _inits(config: TransformerConfig, beta: float, out_gain: float):
    """{role: init} under `config.init` for the roles "default", "value", "out" (the
    attention output), "up" and "down" (the feed-forward's). DeepNorm uses Xavier
    normal with gain beta on W_v, W_o and the feed-forward (Wang et al. 2022, arXiv
    2203.00555, Alg. 1), whatever `config.init` says; otherwise the two matrices
    that write into the residual stream (W_o, down) get `out_gain` (GPT-2's
    1/sqrt(N), `initializers.residual_out_gain`)."""
    deepnorm = config.norm_placement == "deepnorm"
    scheme = "xavier" if deepnorm else config.init
    init = lambda gain: initializers.kernel_init(scheme, config.init_std, config.d_model, gain)
    if deepnorm:
        gains = {"value": beta, "out": beta, "up": beta, "down": beta}
    else:
        gains = {"out": out_gain, "down": out_gain}
    return {role: init(gains.get(role, 1.0)) for role in ("default", "value", "out", "up", "down")}


def cross_attention_config(attention: AttentionConfig) -> AttentionConfig:
    """Cross-attention stays dense, as in the Longformer (LED) and BigBird
    encoder-decoders (Beltagy et al. 2020; Zaheer et al. 2020): the sparse pattern
    applies to self-attention, and queries see the whole encoder output. Kernels
    registered with `cross_attention=True` (the dense ones) are kept."""
    if registry.get(attention.kind).cross_attention:
        return attention
    return attention.replace(kind="xla")


class FeedForward(nn.Module):
    """Position-wise two-layer MLP `[..., d_model] -> [..., d_ff] -> [..., d_model]`, or
    SwiGLU (Shazeer 2020, arXiv 2002.05202): down(silu(gate(x)) * up(x))."""
    config: TransformerConfig
    kernel_init: Callable = nn.initializers.normal(0.02)
    down_init: Callable | None = None   # of `down`; None = kernel_init

    @nn.compact
    def __call__(self, x):
        cfg = self.config

        def dense(n, name, names):  # names: the kernel's logical axes
            init = self.down_init if name == "down" and self.down_init else self.kernel_init
            return nn.Dense(n, use_bias=cfg.use_bias, dtype=cfg.compute_dtype,
                            param_dtype=cfg.params_dtype, name=name,
                            kernel_init=logical.param_init(init, names,
                                                           cfg.logical_partitioning),
                            bias_init=logical.param_init(nn.initializers.zeros, names[-1:],
                                                         cfg.logical_partitioning))
        up = lambda name: dense(cfg.d_ff, name, logical.UP_KERNEL)(x)
        if cfg.activation == "swiglu":
            h = jax.nn.silu(up("gate")) * up("up")
        else:
            h = ACTIVATION_FNS[cfg.activation](up("up"))
        h = logical.constrain(h, logical.MLP_HIDDEN)
        return dense(cfg.d_model, "down", logical.DOWN_KERNEL)(h)


class _ResidualBlock(nn.Module):
    """Shared residual wiring; subclasses call `self.residual(name, x, f)` from
    their compact `__call__`."""
    config: TransformerConfig
    alpha: float = 1.0   # DeepNorm residual scale
    beta: float = 1.0    # DeepNorm init gain
    out_gain: float = 1.0  # init gain of W_o and down (init="gpt2"; set by the stack)

    def norm(self, name):
        cfg = self.config
        return make_norm(cfg.norm_type, cfg.layer_norm_eps, cfg.compute_dtype, cfg.params_dtype, name)

    def residual(self, name, x, f, deterministic):
        placement = self.config.norm_placement
        drop = nn.Dropout(self.config.dropout, name=f"{name}_dropout")
        if placement == "pre":
            return x + drop(f(self.norm(f"{name}_norm")(x)), deterministic=deterministic)
        if placement == "sandwich":
            h = self.norm(f"{name}_out_norm")(f(self.norm(f"{name}_norm")(x)))
            return x + drop(h, deterministic=deterministic)
        scale = self.alpha if placement == "deepnorm" else 1.0
        return self.norm(f"{name}_norm")(scale * x + drop(f(x), deterministic=deterministic))

    def attention(self, name, attention=None, **kwargs):
        cfg = self.config
        inits = _inits(cfg, self.beta, self.out_gain)
        return MultiHeadAttention(
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
            attention=attention or cfg.attention,
            dropout_rate=cfg.attention_dropout, use_bias=cfg.use_bias, rope_base=cfg.rope_base,
            dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
            kernel_init=inits["default"], value_init=inits["value"], out_init=inits["out"],
            logical_partitioning=cfg.logical_partitioning,
            fused_qkv=cfg.fused_qkv, name=name, **kwargs)

    def mlp(self):
        inits = _inits(self.config, self.beta, self.out_gain)
        return FeedForward(self.config, kernel_init=inits["up"], down_init=inits["down"],
                           name="mlp")


class EncoderBlock(_ResidualBlock):
    """Bidirectional self-attention + feed-forward. mask: bool broadcastable to
    `[..., heads, seq, seq]` (usually a key padding mask `[..., 1, 1, seq]`)."""

    @nn.compact
    def __call__(self, x, mask=None, deterministic=True, sow_weights=False, **kernel_kwargs):
        attn = self.attention("attention", position=self.config.position)
        x = self.residual("attention", x, lambda h: attn(
            h, mask=mask, deterministic=deterministic, sow_weights=sow_weights, **kernel_kwargs),
            deterministic)
        x = self.residual("mlp", x, self.mlp(), deterministic)
        return logical.constrain(x, logical.HIDDEN)


class DecoderBlock(_ResidualBlock):
    """Masked (causal) self-attention, optional cross-attention (queries from the
    decoder, keys/values from the encoder output `memory [..., src, d_model]`), and
    feed-forward."""
    cross_attention: bool = False

    @nn.compact
    def __call__(self, x, memory=None, mask=None, memory_mask=None, deterministic=True,
                 decode=False, sow_weights=False, **kernel_kwargs):
        # kernel_kwargs (e.g. Longformer's global_mask) reach the self-attention kernel,
        # as in EncoderBlock; cross-attention is dense (`cross_attention_config`).
        cfg = self.config
        self_attn = self.attention("self_attention", position=cfg.position)
        x = self.residual("self_attention", x, lambda h: self_attn(
            h, mask=mask, causal=True, deterministic=deterministic, decode=decode,
            sow_weights=sow_weights, **kernel_kwargs), deterministic)
        if self.cross_attention:
            if memory is None:
                raise ValueError("DecoderBlock(cross_attention=True) needs the encoder output `memory`")
            if memory.shape[-1] != cfg.d_model:
                raise ValueError(f"cross-attention memory has width {memory.shape[-1]} "
                                 f"(shape {tuple(memory.shape)}) but d_model={cfg.d_model}")
            cross = self.attention("cross_attention", cross_attention_config(cfg.attention))
            # decode: the memory's keys/values are projected once and cached.
            x = self.residual("cross_attention", x, lambda h: cross(
                h, memory, mask=memory_mask, deterministic=deterministic, decode=decode,
                sow_weights=sow_weights), deterministic)
        x = self.residual("mlp", x, self.mlp(), deterministic)
        return logical.constrain(x, logical.HIDDEN)

