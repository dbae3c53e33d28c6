"""Parameter initialisation schemes; `TransformerConfig.init` names one.

    scheme      weight matrices                     embedding tables, untied output matrix
    normal      N(0, init_std^2)                    N(0, init_std^2)
    xavier      N(0, 2 / (fan_in + fan_out))        N(0, 1 / d_model)
    small_init  N(0, 2 / (5 d_model))               N(0, 2 / (5 d_model))
    gpt2        N(0, init_std^2), residual outputs  N(0, init_std^2)
                N(0, init_std^2 / N)

normal: BERT (Devlin et al. 2018, arXiv 1810.04805; init_std = 0.02).
gpt2: GPT-2 (Radford et al. 2019, sec. 2.3: "scale the weights of residual layers
  at initialization by a factor of 1/sqrt(N) where N is the number of residual
  layers"): as normal, but the matrices that write into the residual stream (the
  attention output projection and the feed-forward down projection) get
  std init_std / sqrt(N), N = the residual sub-layers of their stack (2 per
  layer, 3 with cross-attention), as HF's GPT2 and nanoGPT (0.02 / sqrt(2 L)).
  The stacks pass that gain (`residual_out_gain`); a block built alone gets 1.
xavier: Glorot & Bengio 2010, per matrix, the initialisation Xiong et al. 2020
  (arXiv 2002.04745, and their fairseq code) analyse and train with. A
  fan-based std would be ~sqrt(2 / vocab) for a `[vocab, d]` table, so tables
  follow that same code instead: fairseq's `Embedding` (token and learned
  position tables) and its untied `output_projection` draw normal values with
  std d^-1/2 (Ott et al. 2019, arXiv 1904.01038). fairseq also multiplies
  token embeddings by sqrt(d) in the forward pass; this library does not, so with
  tied embeddings the logits of a unit-variance hidden state have unit variance.
small_init: Nguyen & Salazar 2019 (arXiv 1910.05895): the Xavier std
  of a `[d, 4d]` matrix, sqrt(2 / (5d)), used for every matrix and table (as in
  GPT-NeoX's `small_init_init_method`).
Under every scheme biases start at 0 and LayerNorm / RMSNorm scales at 1 (the
layers' own initializers), and DeepNorm keeps Xavier with its gain beta
(Wang et al. 2022, arXiv 2203.00555, Alg. 1): `gain` multiplies the std.

Fans: each kernel is initialised in its 2-D `[fan_in, fan_out]` form and then
reshaped, as `nn.DenseGeneral` does: a Q/K/V kernel `[d, heads, head_dim]` has
fans (d, heads * head_dim), the output kernel `[heads, head_dim, d]` has
(heads * head_dim, d), so `variance_scaling`'s default axes (-2, -1) are right.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax.nn.initializers as jinit

Initializer = Callable[..., Any]


def _normal(std: float) -> Initializer:
    return jinit.normal(std)


def xavier_normal(gain: float = 1.0) -> Initializer:
    """Glorot & Bengio 2010 normal init of a `[fan_in, fan_out]` kernel with a gain:
    std = gain * sqrt(2 / (fan_in + fan_out)). DeepNorm uses gain = beta."""
    return jinit.variance_scaling(gain ** 2, "fan_avg", "normal")


def _small_std(d_model: int) -> float:
    return math.sqrt(2.0 / (5.0 * d_model))


# scheme -> (kernel init of (init_std, d_model, gain), table init of (init_std, d_model)).
SCHEMES: dict[str, tuple[Callable[..., Initializer], Callable[..., Initializer]]] = {
    "normal": (lambda std, d, gain: _normal(gain * std), lambda std, d: _normal(std)),
    "xavier": (lambda std, d, gain: xavier_normal(gain), lambda std, d: _normal(d ** -0.5)),
    "small_init": (lambda std, d, gain: _normal(gain * _small_std(d)),
                   lambda std, d: _normal(_small_std(d))),
    "gpt2": (lambda std, d, gain: _normal(gain * std), lambda std, d: _normal(std)),
}
INIT_SCHEMES = tuple(SCHEMES)


def _check(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"init={scheme!r} is not valid; choose one of "
                         f"{', '.join(map(repr, INIT_SCHEMES))}")


def residual_out_gain(scheme: str, num_residual: int) -> float:
    """The gain of the matrices writing into the residual stream of a stack with
    `num_residual` residual sub-layers: 1 / sqrt(num_residual) under "gpt2", else 1."""
    _check(scheme)
    return num_residual ** -0.5 if scheme == "gpt2" else 1.0


def kernel_init(scheme: str, init_std: float, d_model: int, gain: float = 1.0) -> Initializer:
    """The initializer of a weight matrix `[fan_in, fan_out]` under `scheme`, its std
    multiplied by `gain`."""
    _check(scheme)
    return SCHEMES[scheme][0](init_std, d_model, gain)


def embedding_init(scheme: str, init_std: float, d_model: int) -> Initializer:
    """The initializer of an embedding table `[rows, d_model]` (and of an untied output
    matrix `[d_model, vocab]`) under `scheme`."""
    _check(scheme)
    return SCHEMES[scheme][1](init_std, d_model)

