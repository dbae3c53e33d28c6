"""Normalization layers, residual placements and DeepNorm constants.

A residual sub-layer f (attention or feed-forward) with input x is combined as
  post:      LN(x + f(x))                      Vaswani et al. 2017; BERT
  pre:       x + f(LN(x))                      GPT-2; Xiong et al. 2020 (2002.04745)
  sandwich:  x + LN_out(f(LN(x)))              Ding et al. 2021 (CogView, 2105.13290)
  deepnorm:  LN(alpha * x + f(x))              Wang et al. 2022 (DeepNet, 2203.00555)
pre and sandwich stacks end with one more LN; post and deepnorm do not need it.
"""
from __future__ import annotations

import flax.linen as nn

from transformer_jax.validation import choice, is_int, positive_number, require

NORM_PLACEMENTS = ("post", "pre", "sandwich", "deepnorm")
NORM_TYPES = ("layernorm", "rmsnorm")
DEEPNORM_ARCHS = ("encoder", "decoder", "encoder_decoder")


def make_norm(norm_type: str, eps: float, dtype, param_dtype, name: str) -> nn.Module:
    """LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467)
    over the last axis: `[..., d]` -> `[..., d]`, with scale (and LayerNorm's bias)
    `[d]`. Flax computes both norms' statistics in float32 for half-precision inputs.

    LayerNorm uses the two-pass variance E[(x - E[x])²], not Flax's default one-pass
    E[x²] - E[x]², which cancels catastrophically when the features share a large
    offset (float32 error ~ offset² · 2⁻²⁴: 4e-3 at offset 20), so imported checkpoints
    match PyTorch's LayerNorm, which is two-pass. The extra pass is one more read of x.
    RMSNorm divides by E[x²] itself, which has no cancellation, so the flag is moot there."""
    # Checked here too, not only by TransformerConfig: any other name would fall
    # through to LayerNorm, and eps <= 0 gives NaN on a constant row.
    choice("norm_type", norm_type, NORM_TYPES)
    positive_number("eps", eps)
    if norm_type == "rmsnorm":
        return nn.RMSNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
                        use_fast_variance=False)


def has_final_norm(placement: str) -> bool:
    """Whether a stack with this residual placement ends with one more norm (pre and
    sandwich leave the residual stream unnormalised; post and deepnorm do not)."""
    return placement in ("pre", "sandwich")


def deepnorm_constants(arch: str, num_encoder_layers: int = 0, num_decoder_layers: int = 0):
    """(alpha, beta) per stack from DeepNet Table 1 / Fig. 2 (Wang et al. 2022):
      encoder-only (N layers):  alpha = (2N)^(1/4),  beta = (8N)^(-1/4)
      decoder-only (M layers):  alpha = (2M)^(1/4),  beta = (8M)^(-1/4)
      encoder-decoder:          encoder alpha = 0.81 (N^4 M)^(1/16), beta = 0.87 (N^4 M)^(-1/16)
                                decoder alpha = (3M)^(1/4),          beta = (12M)^(-1/4)
    Returns {"encoder": (alpha, beta), "decoder": (alpha, beta)} for the stacks present."""
    choice("arch", arch, DEEPNORM_ARCHS)
    n, m = num_encoder_layers, num_decoder_layers
    # The formulas divide by the depths of the stacks present: 0 is no stack.
    for name, depth, needed in (("num_encoder_layers", n, arch != "decoder"),
                                ("num_decoder_layers", m, arch != "encoder")):
        require(name, not needed or (is_int(depth) and depth > 0), depth,
                f"DeepNorm's constants for arch={arch!r} need a positive number of layers")
    if arch == "encoder":
        return {"encoder": ((2 * n) ** 0.25, (8 * n) ** -0.25)}
    if arch == "decoder":
        return {"decoder": ((2 * m) ** 0.25, (8 * m) ** -0.25)}
    base = (n ** 4 * m) ** (1 / 16)
    return {"encoder": (0.81 * base, 0.87 / base),
            "decoder": ((3 * m) ** 0.25, (12 * m) ** -0.25)}
