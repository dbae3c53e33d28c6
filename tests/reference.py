"""Naive float64 numpy references, written from the formulas, independent of the
library code under test."""
from __future__ import annotations

import math

import numpy as np


def softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def attention(q, k, v, mask=None, bias=None, causal=False):
    """q [B, Tq, H, D], k/v [B, Tk, Hkv, D]; mask broadcastable to [B, H, Tq, Tk]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    out = np.zeros((b, tq, h, d))
    full_mask = np.ones((b, h, tq, tk), bool)
    if mask is not None:
        full_mask &= np.broadcast_to(np.asarray(mask), (b, h, tq, tk))
    if causal:
        full_mask &= np.tril(np.ones((tq, tk), bool))
    for bi in range(b):
        for hi in range(h):
            kv = hi // (h // hkv)
            s = q[bi, :, hi] @ k[bi, :, kv].T / math.sqrt(d)
            if bias is not None:
                s = s + np.broadcast_to(np.asarray(bias, np.float64), (b, h, tq, tk))[bi, hi]
            m = full_mask[bi, hi]
            for t in range(tq):
                if not m[t].any():
                    continue  # a row with nothing to attend to gives zeros
                p = softmax(np.where(m[t], s[t], -np.inf))
                out[bi, t, hi] = p @ v[bi, :, kv]
    return out


def layer_norm(x, scale, bias, eps):
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def gelu(x):
    from math import erf
    return 0.5 * x * (1 + np.vectorize(erf)(x / math.sqrt(2)))


def mha_from_params(p, x, causal=False):
    """Self-attention from a MultiHeadAttention parameter dict (DenseGeneral layout:
    query kernel [d, H, Dh], out kernel [H, Dh, d])."""
    g = lambda a: np.asarray(a, np.float64)
    q = np.einsum("btd,dhk->bthk", x, g(p["query"]["kernel"])) + g(p["query"]["bias"])
    k = np.einsum("btd,dhk->bthk", x, g(p["key"]["kernel"])) + g(p["key"]["bias"])
    v = np.einsum("btd,dhk->bthk", x, g(p["value"]["kernel"])) + g(p["value"]["bias"])
    o = attention(q, k, v, causal=causal)
    return np.einsum("bthk,hkd->btd", o, g(p["out"]["kernel"])) + g(p["out"]["bias"])


def ffn_from_params(p, x):
    g = lambda a: np.asarray(a, np.float64)
    h = gelu(x @ g(p["up"]["kernel"]) + g(p["up"]["bias"]))
    return h @ g(p["down"]["kernel"]) + g(p["down"]["bias"])
