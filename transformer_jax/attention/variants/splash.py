"""`splash`, `splash_local`, `splash_longformer`: the TPU block-sparse flash
attention kernel of `jax.experimental.pallas.ops.tpu.splash_attention` (the one
MaxText and levanter use on TPU) behind the registry.

Each kind is a static splash mask, so blocks the mask rules out are skipped:
  splash             full (bidirectional) or causal, self- or cross-attention;
  splash_local       the sliding window of `local` (|i - j| <= w, or i - w <= j <= i
                     when causal) as a `LocalMask` (Beltagy et al. 2020, arXiv 2004.05150);
  splash_longformer  that window OR the rows/columns of the static
                     `config.global_positions` (Longformer's global tokens, ibid. Sec. 3.1),
                     a `LogicalOr` of masks that is exactly `longformer`'s dense pattern.
                     A per-token `global_mask` given at call time varies per example and
                     cannot be a static mask: it is refused.
Key padding `[..., 1, 1, kv_len]` goes in as segment ids: every query gets id 1 and
each key 1 (real) or 0 (padding), so queries never see padded keys. A query left
with no visible key (its whole window is padding) would get an arbitrary average
from the kernel; its output is set to zero, as `functional.attention_weights` does.
GQA is native: the kernel takes k/v with fewer heads that divide the query heads.

The kernel's softmax is unscaled, so q is multiplied by 1/sqrt(head_dim) here
(Vaswani et al. 2017, arXiv 1706.03762, eq. 1). Sequence lengths must be multiples
of 128 (the TPU lane width; the kernel's blocks are multiples of it). There is no
attention dropout, additive bias (ALiBi) or cached decoding. Off a TPU the kernel
runs in Pallas interpret mode: exact but slow, meant for tests.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.attention import functional, masks as masks_lib
from transformer_jax.attention.registry import AttentionVariant, register, register_auto
from transformer_jax.attention.variants import common

LANES = 128            # TPU vector lane width: splash blocks are multiples of it
BLOCKS = (512, 256, 128)  # block sizes tried, largest first (MaxText's default is 512)


def pick_block(length: int) -> int:
    """The largest block in BLOCKS that divides `length`."""
    return next(b for b in BLOCKS if length % b == 0)


def shape_problem(q_len: int, kv_len: int) -> str | None:
    """Why splash cannot take these lengths, or None."""
    bad = [f"{name}={n}" for name, n in (("q_len", q_len), ("kv_len", kv_len)) if n % LANES]
    if bad:
        return f"{', '.join(bad)} must be a multiple of {LANES}"
    return None


def _lib():
    """jax's splash attention package, imported on first use (it costs ~0.5 s)."""
    import jax.experimental.pallas.ops.tpu.splash_attention as lib
    return lib


@functools.lru_cache(maxsize=None)
def _global_tokens_class():
    """A lazy splash `Mask` subclass (defined on first use, like the import)."""

    class GlobalTokens(_lib().Mask):
        """`[q_len, kv_len]` mask, True on the rows and columns of the global
        positions: global queries see every key, every query sees global keys."""

        def __init__(self, shape: tuple[int, int], positions: tuple[int, ...]):
            self._shape, self.positions = shape, tuple(sorted(set(positions)))

        @property
        def shape(self):
            return self._shape

        def __getitem__(self, idx):
            rows, cols = (np.arange(self._shape[i])[s] for i, s in enumerate(idx))
            glob = np.asarray(self.positions, np.int64)
            return np.isin(rows, glob)[:, None] | np.isin(cols, glob)[None, :]

        def __eq__(self, other):
            return isinstance(other, GlobalTokens) and (self._shape, self.positions) == (
                other._shape, other.positions)

        def __hash__(self):
            return hash((type(self), self._shape, self.positions))

    return GlobalTokens


def static_mask(pattern: str, q_len: int, kv_len: int, causal: bool, window: int,
                positions: tuple[int, ...]):
    """The splash mask object `[q_len, kv_len]` of one pattern ("full", "local", "longformer")."""
    m = _lib()
    shape = (q_len, kv_len)
    if pattern == "full":
        return m.CausalMask(shape) if causal else m.FullMask(shape)
    band = m.LocalMask(shape, (window, 0 if causal else window), 0)
    if pattern == "local":
        return band
    mask = band | _global_tokens_class()(shape, positions)
    return mask & m.CausalMask(shape) if causal else mask


@functools.lru_cache(maxsize=64)
def _kernel(pattern, heads, q_len, kv_len, causal, window, positions, interpret):
    """A splash kernel for one static configuration; building it processes the mask
    on the host block by block, so it is cached."""
    mask = static_mask(pattern, q_len, kv_len, causal, window, positions)
    bq, bkv = pick_block(q_len), pick_block(kv_len)
    lib = _lib()
    sizes = lib.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                           block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                           block_q_dq=bq, block_kv_dq=bkv)
    return lib.make_splash_mha(lib.MultiHeadMask([mask] * heads), block_sizes=sizes,
                               head_shards=1, q_seq_shards=1, interpret=interpret)


def _visible_count(valid, causal: bool, window: int | None):
    """valid `[B, n]` bool -> `[B, n]` number of real keys query i sees inside its
    band: keys j with i - w <= j <= i + w (i when causal; no bound where w is None)."""
    n = valid.shape[-1]
    c = jnp.pad(jnp.cumsum(valid, axis=-1, dtype=jnp.int32), ((0, 0), (1, 0)))  # sum(valid[:j])
    i = jnp.arange(n)
    if causal:
        hi = i + 1
    else:
        hi = jnp.full((n,), n) if window is None else jnp.minimum(i + window + 1, n)
    lo = jnp.zeros((n,), jnp.int32) if window is None else jnp.maximum(i - window, 0)
    return c[:, hi] - c[:, lo]


def rows_with_keys(valid, pattern: str, causal: bool, window: int, positions):
    """valid `[B, kv_len]` -> `[B, q_len]`: whether each query sees at least one real
    key under the pattern (q_len == kv_len unless pattern == "full" and not causal)."""
    if pattern == "full":
        if not causal:
            return jnp.any(valid, axis=-1, keepdims=True)
        return _visible_count(valid, True, None) > 0
    seen = _visible_count(valid, causal, window) > 0
    if pattern == "longformer" and positions:
        glob = jnp.asarray(positions)
        n = valid.shape[-1]
        # any real global key (at or before i when causal)
        first = jnp.min(jnp.where(valid[:, glob], glob, n), axis=-1, keepdims=True)
        seen = seen | (jnp.arange(n) >= first if causal else first < n)
        # a global query sees every key (before it when causal)
        every = _visible_count(valid, True, None) if causal else valid.sum(-1, keepdims=True)
        seen = seen | (jnp.isin(jnp.arange(n), glob) & (every > 0))
    return seen


def splash_attention(q, k, v, *, mask=None, causal: bool = False, pattern: str = "full",
                     window: int = 128, global_positions=(), interpret: bool | None = None,
                     name: str = "splash"):
    """q `[..., q_len, heads, d]`, k/v `[..., kv_len, kv_heads, d]`, mask key-only
    `[..., 1|..., 1, kv_len]` (one pattern for every head) -> `[..., q_len, heads, d]`.
    `interpret=None` runs Pallas interpret mode unless the backend is a TPU."""
    functional.check_mask_and_bias(q, k, mask, kind=name, key_only=True)
    batch = common.batch_shape(q, k)
    q_len, heads, d = q.shape[-3:]
    kv_len, kv_heads = k.shape[-3:-1]
    problem = shape_problem(q_len, kv_len)
    if problem:
        raise ValueError(f"attention.kind={name!r}: {problem} (splash blocks are multiples of "
                         f"{LANES}); pad the sequence or use kind='xla'")
    if pattern != "full" or causal:
        common.check_self_attention(name, q_len, kv_len)
    positions = tuple(sorted(set(int(p) for p in global_positions)))
    if any(not 0 <= p < q_len for p in positions):
        raise ValueError(f"attention.global_positions={positions} has positions outside the "
                         f"sequence of length {q_len}; valid positions are 0..{q_len - 1}")
    valid = _key_valid(mask, batch, kv_len, name)                      # [B, kv_len] | None
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    kernel = _kernel(pattern, heads, q_len, kv_len, causal, window, positions, interpret)

    def heads_first(x, length, h):  # [..., len, h, d] -> [B, h, len, d]
        x = jnp.broadcast_to(x, (*batch, length, h, d)).reshape(-1, length, h, d)
        return jnp.swapaxes(x, 1, 2)

    qh = heads_first(q * jnp.asarray(1.0 / math.sqrt(d), q.dtype), q_len, heads)
    kh, vh = heads_first(k, kv_len, kv_heads), heads_first(v, kv_len, kv_heads)
    if valid is None:
        out = jax.vmap(kernel)(qh, kh, vh)
    else:
        valid = jnp.broadcast_to(valid, (qh.shape[0], kv_len))
        seg = _lib().SegmentIds(q=jnp.ones((qh.shape[0], q_len), jnp.int32),
                                kv=valid.astype(jnp.int32))
        out = jax.vmap(kernel)(qh, kh, vh, seg)
        seen = rows_with_keys(valid, pattern, causal, window, positions)
        out = jnp.where(seen[:, None, :, None], out, 0)
    return jnp.swapaxes(out, 1, 2).reshape(*batch, q_len, heads, d).astype(q.dtype)


def _key_valid(mask, batch, kv_len: int, name: str):
    """Key padding mask -> `[B|1, kv_len]` bool; one pattern must serve all heads
    (segment ids have no head axis)."""
    if mask is None:
        return None
    valid = common.key_valid(mask, batch, name)                        # [B|1, H|1, kv]
    if valid.shape[1] != 1:
        raise ValueError(f"attention.kind={name!r} takes one key padding mask for all heads "
                         f"([..., 1, 1, kv_len]); got mask of shape {tuple(mask.shape)}")
    return jnp.broadcast_to(valid[:, 0], (valid.shape[0], kv_len))


def applies(q, k, *, mask, bias, causal, dropout_rate, deterministic) -> bool:
    """Whether `kind="auto"` hands this call to `splash`: a single-device TPU backend,
    lengths that are multiples of 128, no additive bias, no attention dropout, and no
    mask beyond one key padding pattern for all heads (so not cached decoding).
    One device, because a Pallas kernel is not partitioned automatically under a
    sharded `jit` (jax-ml/jax#19748: XLA replicates its inputs); kind="splash" still runs."""
    del causal  # both masks are static splash masks
    padding_only = masks_lib.is_key_padding(mask)
    return (jax.default_backend() == "tpu" and jax.device_count() == 1
            and shape_problem(q.shape[-3], k.shape[-3]) is None
            and bias is None and (deterministic or not dropout_rate) and padding_only)


def _make(name: str, pattern: str):
    def fn(q, k, v, *, mask, bias, causal, config, extra, dropout_rate, dropout_rng,
           deterministic):
        del bias, dropout_rng  # supports_bias=False; dropout refused by validate
        if dropout_rate and not deterministic:
            raise ValueError(f"attention.kind={name!r} has no attention dropout; "
                             "set attention_dropout=0.0")
        if pattern == "longformer" and extra.get("global_mask") is not None:
            raise ValueError(
                f"attention.kind={name!r} takes only the static attention.global_positions: a "
                "per-example global_mask is no static splash mask; use kind='longformer'")
        return splash_attention(
            q, k, v, mask=mask, causal=causal, pattern=pattern, window=config.window,
            global_positions=config.global_positions if pattern == "longformer" else (), name=name)

    def validate(config, *, causal, position, attention_dropout):
        del causal
        if pattern != "full":
            common.check_positive(name, "window", config.window, minimum=0)
        if pattern == "longformer" and any(not isinstance(p, int) or p < 0
                                           for p in config.global_positions):
            raise ValueError(f"attention.global_positions={config.global_positions!r} must be "
                             "non-negative int token positions, e.g. (0,) for [CLS]")
        common.reject(name, position=position, attention_dropout=attention_dropout,
                      why="the splash kernel takes no additive bias and has no dropout")

    # splash_longformer refuses a global_mask with a message of its own (above).
    return AttentionVariant(name, fn, validate=validate, full_mask=False, supports_bias=False,
                            supports_decode=False, supports_weights=False,
                            exact=pattern == "full",
                            call_args=("global_mask",) if pattern == "longformer" else ())


splash = register(_make("splash", "full"))
register(_make("splash_local", "local"))
register(_make("splash_longformer", "longformer"))
register_auto("splash", applies)
