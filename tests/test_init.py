"""Initialisation schemes (`TransformerConfig.init`) against their formulas.

Every parameter of a model built through `models.build` is checked: the sample
std of each matrix against the scheme's formula, computed here from the
parameter's name and shape (Glorot & Bengio 2010; Nguyen & Salazar 2019, arXiv
1910.05895; fairseq's N(0, d^-1/2) tables), biases 0, norm scales 1. The sample
std of n draws from N(0, s^2) has std s / sqrt(2n), so 5 of those is the tolerance.
"""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from flax import traverse_util

from transformer_jax import initializers
from transformer_jax.models import build, get_config

SCHEMES = ("normal", "xavier", "small_init", "gpt2")
STD = 0.05  # init_std: far from every other scheme's value at these widths


def _check_std(values, want, where):
    values = np.asarray(values, np.float64).ravel()
    n = values.size
    got = values.std()
    assert abs(got / want - 1) < 5 / math.sqrt(2 * n), f"{where}: std {got:.5f}, formula {want:.5f}"
    assert abs(values.mean()) < 5 * want / math.sqrt(n), f"{where}: mean {values.mean():.5f}"


def _fans(path, shape):
    """(fan_in, fan_out) of a kernel as the multi-head layout defines them."""
    if len(shape) == 3 and path[-2] == "out":          # [heads, head_dim, d]
        return shape[0] * shape[1], shape[2]
    return shape[0], math.prod(shape[1:])               # [d, heads, head_dim] or [in, out]


def _expected(scheme, path, shape, d, gain=1.0):
    table = path[-1] == "embedding" or path[-2] == "lm_head"
    if scheme in ("normal", "gpt2"):
        return STD if table else gain * STD
    if scheme == "small_init":
        return math.sqrt(2 / (5 * d))
    if table:
        return d ** -0.5
    fan_in, fan_out = _fans(path, shape)
    return gain * math.sqrt(2 / (fan_in + fan_out))


def _check_params(params, scheme, d, gain_of=lambda path: 1.0):
    checked = 0
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value)
        where = "/".join(path)
        if "layers" in path:          # scan_layers: a leading [num_layers] axis
            value = value[0]
        if path[-1] == "bias":
            assert not value.any(), f"{where}: bias not zero"
        elif path[-1] == "scale":
            assert (value == 1).all(), f"{where}: norm scale not one"
        else:
            assert path[-1] in ("kernel", "embedding"), where
            _check_std(value, _expected(scheme, path, value.shape, d, gain_of(path)), where)
            checked += 1
    return checked


def _configs(scheme):
    common = dict(init=scheme, init_std=STD, d_model=64, num_heads=4, vocab_size=300, max_len=32,
                  num_layers=1)
    return {
        "bert": get_config("bert-tiny", d_ff=192, embed_combine="concat", **common),
        "gpt": get_config("gpt-tiny", d_ff=256, num_kv_heads=2, tie_embeddings=False,
                          activation="swiglu", scan_layers=True, **common),
        "encoder_decoder": get_config("transformer-tiny", d_ff=96, num_decoder_layers=1,
                                      **common),
    }


def _init(config):
    ids = np.arange(24, dtype=np.int32).reshape(2, 12) % config.vocab_size
    args = (ids, ids) if type(config).__name__ == "EncoderDecoderConfig" else (ids,)
    return build(config).init(jax.random.PRNGKey(0), *args)["params"]


def _gpt2_gain(family, num_layers):
    """GPT-2's 1/sqrt(N) (Radford et al. 2019, sec. 2.3) on the matrices that write into
    the residual stream, N = residual sub-layers of the stack: 2 per layer, 3 in a
    decoder with cross-attention (HF's GPT2 and nanoGPT: 0.02 / sqrt(2 L))."""
    def gain(path):
        in_block = "layers" in path or any(p.startswith("layer_") for p in path)
        if not (in_block and path[-2] in ("out", "down")):
            return 1.0
        sublayers = 3 if family == "encoder_decoder" and path[0] == "decoder" else 2
        return (sublayers * num_layers) ** -0.5
    return gain


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", ["bert", "gpt", "encoder_decoder"])
def test_every_parameter_follows_its_scheme(scheme, family):
    config = _configs(scheme)[family]
    if scheme == "gpt2":   # 2 layers per stack: N counts layers, not only sub-layers
        config = config.replace(num_layers=2, **(
            {"num_decoder_layers": 2} if family == "encoder_decoder" else {}))
    gain = _gpt2_gain(family, 2) if scheme == "gpt2" else (lambda path: 1.0)
    params = _init(config)
    assert _check_params(params, scheme, config.d_model, gain) >= 8


@pytest.mark.parametrize("scheme", ["normal", "xavier"])
def test_deepnorm_keeps_xavier_with_gain_beta(scheme):
    # DeepNet (Wang et al. 2022, arXiv 2203.00555, Alg. 1 and Table 1, encoder-only):
    # Xavier everywhere, W_v, W_o and the FFN scaled by beta = (8N)^(-1/4).
    config = _configs(scheme)["bert"].replace(norm_placement="deepnorm", embed_combine="add")
    beta = (8 * config.num_layers) ** -0.25

    def gain(path):
        in_block = any(p.startswith("layer_") for p in path)
        return beta if in_block and (path[-2] in ("value", "out", "up", "down")) else 1.0

    def expected(path, shape, d, g):  # blocks: Xavier; tables and heads: the scheme
        in_block = any(p.startswith("layer_") for p in path)
        return _expected("xavier" if in_block else scheme, path, shape, d, g)

    checked = 0
    for path, value in traverse_util.flatten_dict(_init(config)).items():
        if path[-1] in ("kernel", "embedding"):
            _check_std(value, expected(path, value.shape, config.d_model, gain(path)), path)
            checked += 1
    assert checked >= 8


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape", [(256, 64), (64, 1024), (96, 96), (512, 8)])
def test_kernel_initializer_matches_formula(scheme, shape):
    d = 96
    value = initializers.kernel_init(scheme, STD, d, gain=0.7)(jax.random.PRNGKey(1), shape)
    want = {"normal": 0.7 * STD, "gpt2": 0.7 * STD, "small_init": 0.7 * math.sqrt(2 / (5 * d)),
            "xavier": 0.7 * math.sqrt(2 / sum(shape))}[scheme]
    _check_std(value, want, f"{scheme} {shape}")


def test_init_is_validated():
    base = get_config("bert-tiny")
    with pytest.raises(ValueError, match="init='glorot'.*'xavier'"):
        base.replace(init="glorot")
    with pytest.raises(ValueError, match="small_init.*deepnorm"):
        base.replace(init="small_init", norm_placement="deepnorm")
    with pytest.raises(ValueError, match="init_std=0"):
        base.replace(init_std=0)
    assert base.init == "normal"
    # GPT presets are GPT-2's, init included; DeepNorm replaces it inside the blocks.
    assert get_config("gpt2-small").init == "gpt2"
    assert get_config("gpt-tiny", norm_placement="deepnorm").init == "gpt2"
