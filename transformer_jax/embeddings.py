"""Input embeddings: tokens, token types (segments) and absolute positions.

RoPE and ALiBi act inside attention (`positional.py`), so for those the
embedding is the token embedding alone.

Ids are where bad input enters every model, so they are checked here, once
(`check_ids`): eagerly (concrete ids) an out-of-range word id, token type or
position raises a ValueError naming the field, as Hugging Face does. Under `jit`
the values are unknown at trace time: there every lookup maps an id outside its
table to a NaN row (a zero vector for token types, a wrapped row for negative ids
before), so the output is NaN, never a plausible wrong answer; and
`jax.experimental.checkify.checkify(f, errors=checkify.index_checks)` reports the
offending id of a jitted `f` ("index 2 is out of bounds for axis 0 with size 2").
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax import initializers, partitioning as logical, positional
from transformer_jax.config import TransformerConfig
from transformer_jax.data.ids import first_out_of_range
from transformer_jax.normalization import make_norm


def check_ids(field: str, ids, size: int, limit: str) -> None:
    """ValueError naming `field` if concrete int ids fall outside [0, size); `limit`
    names the setting that bounds them (e.g. "type_vocab_size=2"). Traced ids (inside
    `jit`, `eval_shape`) cannot be read and are left to `lookup`'s NaN rows."""
    try:
        values = np.asarray(ids)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    bad = first_out_of_range(values, size)
    if bad is not None:
        raise ValueError(
            f"{field} must be in [0, {size}) ({limit}); got {bad.value} at index "
            f"{bad.index} (min {int(values.min())}, max {int(values.max())})")


def lookup(table, ids):
    """Rows `table[ids]` `[..., d]`; an id outside [0, rows) gives a NaN row (jnp.take
    alone would wrap negative ids), and `checkify.index_checks` flags it."""
    rows = table.shape[0]
    ids = jnp.where((ids >= 0) & (ids < rows), ids, rows)
    return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)


class Embed(nn.Embed):
    """`nn.Embed` (same parameter, same `attend`) with a lookup that suits the backward pass.

    Rows are gathered from the float32 master table and then cast to the compute
    dtype, where `nn.Embed` casts the whole table first: the values are the same,
    but the gradient, a scatter-add of one row per token, then sums a frequent
    token's many contributions in float32 instead of bfloat16.

    `one_hot=True` contracts a one-hot matrix with the table instead (Flaxformer's
    `Embed` has the same switch). For a tiny table, such as BERT's two segment
    rows, a gather's backward scatters every token's gradient onto the same few
    rows, which on a GPU serialises on atomic adds; the one-hot form's backward
    is a matmul. The lookup is exact either way (1 x row + 0 x the others).
    """
    one_hot: bool = False

    def __call__(self, inputs):
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"embedding ids must be integers, got dtype {inputs.dtype}")
        dtype = self.dtype or self.embedding.dtype
        if self.one_hot:
            # In the table's float32, like the gather below, so that the backward matmul
            # sums in float32 too; HIGHEST, as a float32 matmul may otherwise run in
            # TF32 (GPU) or bf16 passes (TPU). Its cost is tokens x rows x d: small.
            table = self.embedding
            rows = jnp.matmul(jax.nn.one_hot(inputs, self.num_embeddings, dtype=table.dtype), table,
                              precision=jax.lax.Precision.HIGHEST)
            # one_hot of an out-of-range id is all zeros: make that row NaN, as the gather's.
            nan_if_bad = lookup(jnp.zeros((self.num_embeddings, 1), table.dtype), inputs)
            return (rows + nan_if_bad).astype(dtype)
        return lookup(self.embedding, inputs).astype(dtype)


class Embeddings(nn.Module):
    """token ids `[..., seq]` -> `[..., seq, d_model]`.

    The token table is exposed as `self.token` (an `nn.Embed`, see `Embed`) so that
    models can tie the output projection to it with `token.attend` (Press & Wolf 2017,
    arXiv 1608.05859).
    """
    config: TransformerConfig
    type_vocab_size: int = 0   # BERT segment embeddings; 0 = none
    use_norm: bool = False     # BERT normalises the summed embeddings

    def setup(self):
        cfg = self.config
        table = initializers.embedding_init(cfg.init, cfg.init_std, cfg.d_model)
        init = lambda names: logical.param_init(table, names, cfg.logical_partitioning)
        self.token = Embed(cfg.padded_vocab_size, cfg.d_model,
                           embedding_init=init((logical.VOCAB, logical.EMBED)),
                           dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        if cfg.position == "learned":
            pos_dim = cfg.d_model
            self.position = Embed(cfg.max_len, pos_dim, embedding_init=init((None, logical.EMBED)),
                                  dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        if self.type_vocab_size:
            self.token_type = Embed(self.type_vocab_size, cfg.d_model, one_hot=True,
                                    embedding_init=init((None, logical.EMBED)),
                                    dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        if cfg.embed_combine == "concat":
            # [token ; position] (2 d_model) -> d_model.
            self.combine = nn.Dense(
                cfg.d_model, dtype=cfg.compute_dtype,
                kernel_init=logical.param_init(
                    initializers.kernel_init(cfg.init, cfg.init_std, cfg.d_model),
                    (None, logical.EMBED), cfg.logical_partitioning),
                bias_init=logical.param_init(nn.initializers.zeros, (logical.EMBED,),
                                             cfg.logical_partitioning),
                param_dtype=cfg.params_dtype)
        if self.use_norm:
            self.norm = make_norm(cfg.norm_type, cfg.layer_norm_eps, cfg.compute_dtype,
                                  cfg.params_dtype, "norm")
        self.dropout = nn.Dropout(cfg.dropout)

    def position_vectors(self, positions):
        """int positions `[..., seq]` -> absolute position vectors `[..., seq, d_model]`
        (the learned table, or the sinusoidal one of Vaswani et al. 2017)."""
        cfg = self.config
        if cfg.position == "learned":
            return self.position(positions)
        table = positional.sinusoidal_table(cfg.max_len, cfg.d_model)
        return lookup(jnp.asarray(table), positions).astype(cfg.compute_dtype)

    def __call__(self, input_ids, token_type_ids=None, positions=None, *, deterministic=True):
        """input_ids `[..., seq]`, token_type_ids `[..., seq]` (None = all 0), positions
        `[..., seq]` (None = 0..seq-1; offset by the cache when decoding) ->
        `[..., seq, d_model]` in the compute dtype."""
        cfg = self.config
        seq = input_ids.shape[-1]
        if positions is None:
            positions = jnp.arange(seq)
        check_ids("input_ids", input_ids, cfg.vocab_size, f"vocab_size={cfg.vocab_size}")
        if cfg.position in ("learned", "sinusoidal"):
            check_ids("positions", positions, cfg.max_len, f"max_len={cfg.max_len}")
        if self.type_vocab_size and token_type_ids is not None:
            check_ids("token_type_ids", token_type_ids, self.type_vocab_size,
                      f"type_vocab_size={self.type_vocab_size}")
        x = self.token(input_ids)
        if cfg.position in ("learned", "sinusoidal"):
            pos = jnp.broadcast_to(self.position_vectors(positions), x.shape)
            x = self.combine(jnp.concatenate([x, pos], -1)) if cfg.embed_combine == "concat" else x + pos
        if self.type_vocab_size:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(input_ids)
            x = x + self.token_type(token_type_ids)
        if self.use_norm:
            x = self.norm(x)
        return logical.constrain(self.dropout(x, deterministic=deterministic), logical.HIDDEN)

    def attend(self, x):
        """Tied output projection: `[..., d_model]` -> logits `[..., vocab]`."""
        return self.token.attend(x)[..., : self.config.vocab_size]
