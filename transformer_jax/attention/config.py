"""Configuration of the attention kernel, shared by every attention variant.

One frozen dataclass, hashable so that it can be a Flax module attribute and a
`jax.jit` static argument. Fields that only one variant reads say which.
"""
from __future__ import annotations

import dataclasses

from transformer_jax import validation


# The least value of each size field (0: a window of 0 is the token alone, no global
# or random blocks are valid counts).
_MINIMUMS = {"query_chunk": 1, "key_chunk": 1, "window": 0, "longformer_max_global": 0,
             "block_size": 1, "num_window_blocks": 1, "num_global_blocks": 0,
             "num_random_blocks": 0, "linformer_k": 1, "linformer_max_len": 1,
             "num_features": 1, "linear_chunk": 1}


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Which attention kernel `MultiHeadAttention` calls and the knobs of each
    (`kind` picks one; fields a kind does not read are ignored by it)."""
    # Which kernel computes softmax(QK^T/sqrt(d))V (or its approximation). A name
    # registered in `transformer_jax.attention.registry`; "xla" is the reference,
    # "auto" (the default) is cuDNN flash attention on a GPU or splash attention on
    # a TPU where they apply (`registry.auto_kind`), else "xla".
    kind: str = "auto"
    # chunked (Rabe & Staats 2021, arXiv 2112.05682): query / key chunk lengths.
    query_chunk: int = 128
    key_chunk: int = 128
    # local / longformer: one-sided window w; a token sees positions within +-w
    # (or [t-w, t] when causal). Beltagy et al. 2020, arXiv 2004.05150.
    window: int = 128
    # longformer: positions that attend everywhere and are attended by everyone,
    # e.g. (0,) for [CLS]. A per-token global mask may also be passed at call time.
    global_positions: tuple[int, ...] = (0,)
    # longformer with a call-time per-token `global_mask`: the global tokens are
    # gathered into a static-size set (XLA needs static shapes); flagged tokens
    # past the first `longformer_max_global` are treated as ordinary tokens.
    longformer_max_global: int = 16
    # bigbird (Zaheer et al. 2020, arXiv 2007.14062, ITC variant): block size and
    # counts of window / global / random blocks. `random_seed` draws bigbird's
    # random blocks and performer's random features.
    block_size: int = 64
    num_window_blocks: int = 3
    num_global_blocks: int = 2
    num_random_blocks: int = 3
    random_seed: int = 0
    # linformer (Wang et al. 2020, arXiv 2006.04768): projected length k, the
    # sequence length the projections were built for, and head sharing.
    linformer_k: int = 64
    linformer_max_len: int = 512
    linformer_share_heads: bool = True
    # performer (Choromanski et al. 2020, arXiv 2009.14794): random feature count.
    num_features: int = 256
    # linear / performer causal mode: prefix sums of phi(k) v^T are taken between
    # chunks of this length and the masked quadratic form inside a chunk, so the
    # state tensor is [n / linear_chunk, features, head_dim] instead of [n, ...]
    # (the chunkwise form of Katharopoulos et al. 2020, arXiv 2006.16236, eq. 9).
    linear_chunk: int = 64

    def __post_init__(self):
        # Checks every kind needs; each kind checks the fields it reads
        # (`registry.validate`). A list of global positions is kept as a tuple, so
        # the config stays hashable (a jit static argument, a module attribute).
        validation.plain_scalars(self)
        if isinstance(self.global_positions, list):
            object.__setattr__(self, "global_positions", tuple(self.global_positions))
        if not isinstance(self.global_positions, tuple) or \
                not all(validation.is_int(p) for p in self.global_positions):
            raise ValueError(f"attention.global_positions={self.global_positions!r} must be a "
                             "tuple of ints, e.g. (0,)")
        validation.int_at_least("attention.random_seed", self.random_seed, 0)
        validation.boolean("attention.linformer_share_heads", self.linformer_share_heads)
        from transformer_jax.attention import registry   # lazy: the registry imports no config
        registry.get(self.kind)   # the valid kinds, custom ones once registered
        # Sizes no kind can use, refused whichever kind reads them (a window of -1 gave
        # zeros, a block size of 0 a ZeroDivisionError in kernels called directly).
        for name, minimum in _MINIMUMS.items():
            validation.int_at_least(f"attention.{name}", getattr(self, name), minimum,
                                    where=f" for kind={self.kind!r}")

    def replace(self, **kwargs) -> "AttentionConfig":
        """A copy with `kwargs` fields changed."""
        validation.known_fields(AttentionConfig, kwargs, "AttentionConfig.replace")
        return dataclasses.replace(self, **kwargs)
