"""Beam search over any autoregressive step function, traceable inside `jit`.

The model enters only through `step_fn(tokens [B*K], cache) -> (log_probs [B*K,
vocab], cache)`: batch rows and their K beams are flattened into one leading
axis (row b's beams are entries b*K .. b*K + K-1), so any cache whose arrays
carry that axis works, and `gather_cache(cache, indices [B*K])` reorders it when
beams are re-ranked (by default every array is gathered along its axis 0).

Each row keeps two sets of K hypotheses, as in the flax WMT example and T5X
(both after Tensor2Tensor's beam search):
  alive     prefixes without EOS, ranked by their summed log-probability;
  finished  hypotheses that emitted EOS (or reached `max_len` tokens without it),
            ranked by the length-penalised score of Wu et al. 2016 (arXiv
            1609.08144, eq. 14):  s(Y) = log P(Y) / lp(Y),  lp(Y) = ((5 + |Y|) / 6)^alpha,
            where |Y| counts the generated tokens, EOS included.
A step extends every alive beam by every token, keeps the best 2K candidates
(at most K of them end in EOS, one per parent beam, so at least K stay alive),
moves those ending in EOS into the finished set and the best K others into the
alive set. A finished hypothesis is never extended again. A row stops once its
K-th finished score beats the best score any alive beam could still reach:
log-probabilities only fall, and for alpha >= 0 lp grows with length, so
log P(alive) / lp(max_len) bounds every continuation.

Invalid hypotheses (the K-1 copies of the start token at step 0, empty
finished slots) carry the score `NEG` = finfo(float32).min, never -inf.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from transformer_jax.models.generation_args import finite_nonnegative, is_integer

NEG = jnp.finfo(jnp.float32).min
StepFn = Callable[[jnp.ndarray, Any], tuple[jnp.ndarray, Any]]


class BeamSearchOutput(NamedTuple):
    """Every row's K finished hypotheses, best first."""
    tokens: jnp.ndarray   # [batch, K, max_len] generated tokens (EOS included), pad_id after
    lengths: jnp.ndarray  # [batch, K] generated tokens, EOS included
    scores: jnp.ndarray   # [batch, K] log P(Y) / lp(Y); NEG for an empty slot


def length_penalty(length, alpha):
    """lp(Y) = ((5 + |Y|) / 6)^alpha (Wu et al. 2016, arXiv 1609.08144, eq. 14)."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def check_beam_args(beam_size, max_len, alpha) -> None:
    """ValueError naming the field for a bad beam size, length or length penalty."""
    if not is_integer(beam_size) or beam_size < 1:
        raise ValueError(f"beam_size={beam_size!r} must be an integer >= 1")
    if not is_integer(max_len) or max_len < 1:
        raise ValueError(f"max_new_tokens={max_len!r} must be an integer >= 1")
    # The early-stopping bound (module docstring) needs lp to grow with length.
    finite_nonnegative("length_penalty", alpha, " (0 ranks by log-probability alone)")


def gather_beams(x, parents):
    """x `[B, K, ...]`, parents int `[B, K']` -> `[B, K', ...]`: each row's chosen beams."""
    return jnp.take_along_axis(x, parents.reshape(parents.shape + (1,) * (x.ndim - 2)), axis=1)


def _gather_axis0(cache, indices):
    return jax.tree.map(lambda a: jnp.take(a, indices, axis=0) if a.ndim else a, cache)


class _State(NamedTuple):
    t: jnp.ndarray            # [] steps taken
    alive_seq: jnp.ndarray    # [B, K, 1 + max_len] start token, then tokens
    alive_logp: jnp.ndarray   # [B, K]
    fin_seq: jnp.ndarray      # [B, K, 1 + max_len]
    fin_score: jnp.ndarray    # [B, K]
    fin_len: jnp.ndarray      # [B, K]
    cache: Any


def beam_search(step_fn: StepFn, cache, *, batch_size: int, beam_size: int, max_len: int,
                bos_id: int, eos_id: int, alpha: float = 0.6, pad_id: int = 0,
                gather_cache: Callable[[Any, jnp.ndarray], Any] = _gather_axis0
                ) -> BeamSearchOutput:
    """Beam search for up to `max_len` new tokens; see the module docstring.

    cache: the step function's state with a leading `[batch * beam_size]` axis on
    its arrays (each row's state repeated beam_size times). Traceable: the loop is
    a `lax.while_loop`, so call it inside `jit` (sizes and ids are static)."""
    check_beam_args(beam_size, max_len, alpha)
    b, k = batch_size, beam_size
    seq = jnp.full((b, k, 1 + max_len), pad_id, jnp.int32).at[:, :, 0].set(bos_id)
    # Only beam 0 is real at the start, so the K identical prefixes do not fill the beam.
    alive_logp = jnp.where(jnp.arange(k) == 0, 0.0, NEG)[None].repeat(b, 0).astype(jnp.float32)
    best_bound = lambda logp: logp[:, 0] / length_penalty(max_len, alpha)

    def cond(s: _State):
        can_improve = best_bound(s.alive_logp) > s.fin_score[:, -1]
        return (s.t < max_len) & jnp.any(can_improve)

    def body(s: _State):
        logp, cache = step_fn(s.alive_seq[:, :, s.t].reshape(b * k), s.cache)
        vocab = logp.shape[-1]
        cand = (s.alive_logp[..., None] + logp.reshape(b, k, vocab).astype(jnp.float32))
        top_logp, top_idx = jax.lax.top_k(cand.reshape(b, k * vocab), 2 * k)   # [B, 2K]
        parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        top_seq = gather_beams(s.alive_seq, parent).at[:, :, s.t + 1].set(token)
        ends = token == eos_id
        last = s.t + 1 == max_len   # at the length limit every candidate is final

        alive_logp, j = jax.lax.top_k(jnp.where(ends, NEG, top_logp), k)
        alive_parent = jnp.take_along_axis(parent, j, axis=1)
        flat = (jnp.arange(b)[:, None] * k + alive_parent).reshape(b * k)
        cache = gather_cache(cache, flat)

        new_score = jnp.where(ends | last, top_logp / length_penalty(s.t + 1, alpha), NEG)
        new_score = jnp.where(top_logp > NEG, new_score, NEG)   # never promote an invalid beam
        scores = jnp.concatenate([s.fin_score, new_score], axis=1)             # [B, 3K]
        fin_score, i = jax.lax.top_k(scores, k)
        fin_seq = gather_beams(jnp.concatenate([s.fin_seq, top_seq], axis=1), i)
        lengths = jnp.concatenate([s.fin_len, jnp.full_like(new_score, s.t + 1, jnp.int32)], 1)
        fin_len = jnp.take_along_axis(lengths, i, axis=1)
        return _State(s.t + 1, gather_beams(top_seq, j), alive_logp, fin_seq, fin_score,
                      fin_len, cache)

    init = _State(jnp.int32(0), seq, alive_logp, seq, jnp.full((b, k), NEG, jnp.float32),
                  jnp.zeros((b, k), jnp.int32), cache)
    s = jax.lax.while_loop(cond, body, init)
    return BeamSearchOutput(s.fin_seq[:, :, 1:], s.fin_len, s.fin_score)
