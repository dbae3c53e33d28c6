"""Encoder-decoder generation: the beam-search core against exhaustive search, cached
decoding against the full forward pass, source padding, and a trained reversal model."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.models import beam_search as bs

# --- the beam-search core on a toy step function -----------------------------------------
# The "model": a state hashed from the prefix picks a row of a random log-prob table, so
# the next-token distribution depends on the whole prefix and numpy can replay it exactly.
TOY_STATES, TOY_VOCAB, TOY_EOS = 101, 4, 1


def _toy_table(seed=0):
    logits = np.random.default_rng(seed).normal(size=(TOY_STATES, TOY_VOCAB)).astype(np.float32)
    return logits


def _next_state(state, token):
    return (state * 7 + token + 1) % TOY_STATES


def _toy_step(table):
    def step(tokens, state):
        state = _next_state(state, tokens)
        return jax.nn.log_softmax(jnp.asarray(table)[state], axis=-1), state
    return step


def _toy_beam(table, start_states, beam_size, max_len, alpha):
    start = np.repeat(np.asarray(start_states, np.int32), beam_size)   # [B*K], beams of a row together
    run = jax.jit(lambda s: bs.beam_search(
        _toy_step(table), s, batch_size=len(start_states), beam_size=beam_size, max_len=max_len,
        bos_id=0, eos_id=TOY_EOS, alpha=alpha))
    return jax.tree.map(np.asarray, run(start))


def _toy_score(table, start_state, tokens, alpha):
    """float64 log P(tokens) / lp(|tokens|) under the toy model, BOS = 0 fed first."""
    logp = table.astype(np.float64)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    state, total, prev = start_state, 0.0, 0
    for tok in tokens:
        state = _next_state(state, prev)
        total += logp[state, tok]
        prev = tok
    return total / ((5.0 + len(tokens)) / 6.0) ** alpha


def _exhaustive(table, start_state, max_len, alpha):
    """Every hypothesis (ends at its first EOS, or has max_len tokens), best first."""
    hyps = []
    for n in range(1, max_len + 1):
        for prefix in itertools.product([t for t in range(TOY_VOCAB) if t != TOY_EOS], repeat=n - 1):
            ends = [prefix + (TOY_EOS,)] + ([prefix + (t,) for t in range(TOY_VOCAB) if t != TOY_EOS]
                                            if n == max_len else [])
            hyps += [(_toy_score(table, start_state, y, alpha), y) for y in ends]
    return sorted(hyps, reverse=True)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_wide_beam_equals_exhaustive_search(alpha):
    # With K >= 3^(max_len-1) alive prefixes nothing is ever pruned, so the K finished
    # hypotheses must be exactly the K best of the exhaustive ranking.
    table, max_len, k, starts = _toy_table(), 4, 27, [3, 50]
    out = _toy_beam(table, starts, k, max_len, alpha)
    for row, start in enumerate(starts):
        ranking = _exhaustive(table, start, max_len, alpha)
        best_score, best = ranking[0]
        assert out.lengths[row, 0] == len(best)
        np.testing.assert_array_equal(out.tokens[row, 0, :len(best)], best)
        assert (out.tokens[row, 0, len(best):] == 0).all()
        np.testing.assert_allclose(out.scores[row], [s for s, _ in ranking[:k]], rtol=1e-5)


def test_narrow_beam_scores_its_own_hypotheses():
    table, max_len, starts, alpha = _toy_table(1), 6, [7, 8, 9], 0.6
    out = _toy_beam(table, starts, 2, max_len, alpha)
    for row, start in enumerate(starts):
        assert (np.diff(out.scores[row]) <= 0).all()
        for beam in range(2):
            n = out.lengths[row, beam]
            y = out.tokens[row, beam, :n]
            assert n == max_len or (y[-1] == TOY_EOS and TOY_EOS not in y[:-1])
            np.testing.assert_allclose(out.scores[row, beam], _toy_score(table, start, y, alpha),
                                       rtol=1e-5)
        assert out.scores[row, 0] <= _exhaustive(table, start, max_len, alpha)[0][0] + 1e-5


@pytest.mark.parametrize("kwargs, match", [
    (dict(beam_size=0), "beam_size=0"), (dict(max_len=0), "max_new_tokens=0"),
    (dict(alpha=-1.0), "length_penalty=-1.0"),
    (dict(alpha="x"), "length_penalty='x' must be a finite number >= 0"),
    (dict(alpha=True), "length_penalty=True must be a finite number >= 0")])
def test_beam_search_rejects_bad_arguments(kwargs, match):
    args = dict(batch_size=1, beam_size=2, max_len=3, bos_id=0, eos_id=1, alpha=0.6) | kwargs
    with pytest.raises(ValueError, match=match):
        bs.beam_search(_toy_step(_toy_table()), jnp.zeros((2,), jnp.int32), **args)


# --- EncoderDecoder generation ------------------------------------------------------------
from transformer_jax.models import EncoderDecoder, get_config  # noqa: E402
from transformer_jax.models import seq2seq_generate as sg  # noqa: E402

PAD, BOS, EOS = 0, 1, 2
V, S = 12, 5   # reversal task: ids 3..11 in sources of 2..5 tokens


def _init(model, seed, *args):
    """Parameters from one compiled init (not hundreds of eagerly dispatched ops)."""
    return jax.jit(model.init)(jax.random.PRNGKey(seed), *args)["params"]


def _reversal_batch(rng, n):
    """Right-padded sources `[n, S]` of random ids and their reversals + EOS `[n, S + 1]`."""
    lens = rng.integers(2, S + 1, n)
    mask = np.arange(S) < lens[:, None]
    src = np.where(mask, rng.integers(3, V, (n, S)), PAD).astype(np.int32)
    out = np.full((n, S + 1), PAD, np.int32)
    for row, (s, n_) in enumerate(zip(src, lens)):
        out[row, :n_ + 1] = np.concatenate([s[:n_][::-1], [EOS]])
    tgt_in = np.concatenate([np.full((n, 1), BOS, np.int32), np.where(out == EOS, PAD, out)[:, :-1]], 1)
    return dict(src_ids=src, src_mask=mask, tgt_in=tgt_in, tgt_out=out,
                tgt_mask=np.arange(S + 1) < lens[:, None] + 1)


@pytest.fixture(scope="module")
def trained():
    """A one-layer model trained 400 steps on span reversal (~15 s on a CPU)."""
    from transformer_jax.training import create_train_state, make_schedule, make_train_step
    from transformer_jax.training.optim import make_optimizer
    cfg = get_config("transformer-tiny", vocab_size=V, max_len=8, num_layers=1, num_decoder_layers=1,
                     d_model=64, num_heads=4, d_ff=128, position="learned", dropout=0.0,
                     attention_dropout=0.0)
    # Warm-up and cosine decay: at a constant 3e-3 the loss still spikes late, and a
    # run that stops on a spike (machine-dependent rounding decides) mis-decodes.
    lr = make_schedule("cosine", 3e-3, warmup_steps=40, total_steps=400)
    state = create_train_state(cfg, make_optimizer(lr, weight_decay=0.0), jax.random.PRNGKey(0),
                               task="seq2seq")
    step, rng = make_train_step("seq2seq"), np.random.default_rng(0)
    for _ in range(400):
        state, _ = step(state, _reversal_batch(rng, 64))
    return EncoderDecoder(cfg), state.params, _reversal_batch(np.random.default_rng(123), 16)


def test_trained_model_generates_the_reversal(trained):
    model, params, held_out = trained
    greedy = sg.generate_seq2seq(model, params, held_out["src_ids"], held_out["src_mask"],
                                 max_new_tokens=S + 1, bos_id=BOS, eos_id=EOS)
    beam = sg.beam_search_seq2seq(model, params, held_out["src_ids"], held_out["src_mask"],
                                  beam_size=3, max_new_tokens=S + 1, bos_id=BOS, eos_id=EOS)
    for out in (greedy, beam):
        tokens = np.asarray(out.tokens)
        exact = (tokens == held_out["tgt_out"]).all(1)
        assert exact.mean() >= 0.9, exact     # chance is ~(1/9)^length
        # `lengths` counts the tokens up to the first EOS, EOS included, on every row
        # (right or wrong); a row that never ends has them all.
        ended = (tokens == EOS).any(1)
        np.testing.assert_array_equal(out.lengths, np.where(ended, np.argmax(tokens == EOS, 1) + 1,
                                                            tokens.shape[1]))
        np.testing.assert_array_equal(np.asarray(out.lengths)[exact],
                                      held_out["tgt_mask"].sum(1)[exact])


def _full_forward_greedy(model, params, src, mask, steps):
    """Greedy decoding without a cache: the whole prefix through `__call__` every step."""
    forward = jax.jit(lambda tgt: model.apply({"params": params}, src, tgt, mask))
    tgt = np.full((src.shape[0], steps), PAD, np.int32)
    tgt[:, 0] = BOS
    tokens, done = np.full((src.shape[0], steps), PAD, np.int32), np.zeros(src.shape[0], bool)
    for t in range(steps):
        # Causal self-attention: position t sees tgt[:, :t + 1] only, so padding after it is inert.
        nxt = np.asarray(forward(tgt))[:, t].argmax(-1)
        tokens[:, t] = np.where(done, PAD, nxt)
        done |= nxt == EOS
        if t + 1 < steps:
            tgt[:, t + 1] = nxt
    return tokens


def test_cached_greedy_equals_full_forward_greedy(trained):
    model, params, held_out = trained
    # Sources the model has not seen: lengths 1..S and ids it may not reverse perfectly.
    src = np.random.default_rng(5).integers(3, V, (6, S)).astype(np.int32)
    mask = np.arange(S) < np.array([1, 2, 3, 4, 5, 3])[:, None]
    out = sg.generate_seq2seq(model, params, src, mask, max_new_tokens=S + 1, bos_id=BOS, eos_id=EOS)
    np.testing.assert_array_equal(out.tokens, _full_forward_greedy(model, params, src, mask, S + 1))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_steps_match_the_full_forward(scan_layers):
    # Teacher-forced random targets through the cache, one token a step, against one
    # forward pass: the self-attention cache, the memory keys/values and the positions.
    cfg = get_config("transformer-tiny", vocab_size=23, max_len=8, num_layers=1, num_decoder_layers=2,
                     d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, init_std=0.2,
                     scan_layers=scan_layers)
    model, rng = EncoderDecoder(cfg), np.random.default_rng(1)
    src, tgt = rng.integers(0, 23, (3, 6)).astype(np.int32), rng.integers(0, 23, (3, 5)).astype(np.int32)
    mask = np.arange(6) < np.array([6, 4, 1])[:, None]
    params = _init(model, 2, src, tgt, mask)
    expected = jax.jit(model.apply)({"params": params}, src, tgt, mask)

    @jax.jit
    def stepped(params):
        memory = model.apply({"params": params}, src, mask, method=EncoderDecoder.encode)
        step, cache = sg._step_fn(model, params, memory, mask), sg.init_decode_cache(model, 3, 6, 5)
        logits = []
        for t in range(5):
            out, cache = step(jnp.asarray(tgt[:, t]), cache)
            logits.append(out)
        return jnp.stack(logits, 1)
    np.testing.assert_allclose(stepped(params), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_memory_keys_values_are_projected_once(scan_layers):
    # After the first step the cross-attention keys/values come from the cache: another
    # memory on step 2 changes nothing and the key/value kernels get no gradient. With
    # the `memory_ready` flags cleared, step 2 projects the memory it is given again: the
    # other memory then changes the logits (so the comparison can fail), the same does not.
    from transformer_jax.attention.multihead import MEMORY_READY_KEY
    cfg = get_config("transformer-tiny", vocab_size=23, max_len=8, num_layers=1, num_decoder_layers=2,
                     d_model=32, num_heads=4, d_ff=64, init_std=0.2, scan_layers=scan_layers)
    model, rng = EncoderDecoder(cfg), np.random.default_rng(7)
    src, tgt = rng.integers(0, 23, (2, 6)).astype(np.int32), rng.integers(0, 23, (2, 2)).astype(np.int32)
    mask = np.arange(6) < np.array([6, 3])[:, None]
    params = _init(model, 3, src, tgt, mask)
    memory = jax.jit(lambda p: model.apply({"params": p}, src, mask, method=EncoderDecoder.encode))(params)
    other = jnp.asarray(rng.normal(size=memory.shape), memory.dtype)
    step = jax.jit(lambda p, mem, tokens, cache: sg._step_fn(model, p, mem, mask)(tokens, cache))
    _, cache = step(params, memory, jnp.asarray(tgt[:, 0]), sg.init_decode_cache(model, 2, 6, 2))
    same, _ = step(params, memory, jnp.asarray(tgt[:, 1]), cache)
    swapped, _ = step(params, other, jnp.asarray(tgt[:, 1]), cache)
    np.testing.assert_array_equal(swapped, same)

    grads = jax.jit(jax.grad(lambda p: step(p, other, jnp.asarray(tgt[:, 1]), cache)[0].sum()))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        names = [getattr(k, "key", None) for k in path]
        if "cross_attention" in names and names[-2] in ("key", "value", "query"):
            assert (np.abs(np.asarray(g)).max() > 0) == (names[-2] == "query"), names

    stale = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.zeros_like(a) if path[-1].key == MEMORY_READY_KEY else a, cache)
    redone, _ = step(params, other, jnp.asarray(tgt[:, 1]), stale)
    assert np.abs(np.asarray(redone - same)).max() > 1e-3
    again, _ = step(params, memory, jnp.asarray(tgt[:, 1]), stale)   # re-projecting `memory`
    np.testing.assert_allclose(again, same, atol=1e-6)


def test_beam_size_one_is_greedy(trained):
    model, params, held_out = trained
    src, mask = held_out["src_ids"], held_out["src_mask"]
    greedy = sg.generate_seq2seq(model, params, src, mask, max_new_tokens=S + 1, bos_id=BOS, eos_id=EOS)
    # Without a length penalty a finished hypothesis outscores every continuation of
    # the alive one, so one beam follows the argmax path.
    beam = sg.beam_search_seq2seq(model, params, src, mask, beam_size=1, length_penalty=0.0,
                                  max_new_tokens=S + 1, bos_id=BOS, eos_id=EOS)
    np.testing.assert_array_equal(beam.tokens, greedy.tokens)
    np.testing.assert_array_equal(beam.lengths, greedy.lengths)


def test_padded_row_equals_the_row_alone(trained):
    model, params, held_out = trained
    row = int(np.argmin(held_out["src_mask"].sum(1)))   # the most padded source
    n = int(held_out["src_mask"][row].sum())
    alone = held_out["src_ids"][row:row + 1, :n]
    for run in (lambda s, m: sg.generate_seq2seq(model, params, s, m, max_new_tokens=S + 1,
                                                 bos_id=BOS, eos_id=EOS),
                lambda s, m: sg.beam_search_seq2seq(model, params, s, m, beam_size=3,
                                                    max_new_tokens=S + 1, bos_id=BOS, eos_id=EOS)):
        batched, single = run(held_out["src_ids"], held_out["src_mask"]), run(alone, None)
        np.testing.assert_array_equal(batched.tokens[row], single.tokens[0])
        assert batched.lengths[row] == single.lengths[0]


def test_top_k_one_sampling_is_greedy(trained):
    model, params, held_out = trained
    src, mask = held_out["src_ids"], held_out["src_mask"]
    greedy = sg.generate_seq2seq(model, params, src, mask, max_new_tokens=S + 1, bos_id=BOS, eos_id=EOS)
    sampled = sg.generate_seq2seq(model, params, src, mask, max_new_tokens=S + 1, bos_id=BOS,
                                  eos_id=EOS, temperature=1.5, top_k=1, top_p=0.9,
                                  rng=jax.random.PRNGKey(3))
    np.testing.assert_array_equal(sampled.tokens, greedy.tokens)


def test_beam_search_equals_exhaustive_search_on_the_model():
    vocab, steps, k, alpha = 5, 3, 16, 0.6   # 16 = every non-EOS prefix of 2 tokens
    cfg = get_config("transformer-tiny", vocab_size=vocab, max_len=8, num_layers=1,
                     num_decoder_layers=1, d_model=32, num_heads=2, d_ff=64, init_std=0.5)
    model, rng = EncoderDecoder(cfg), np.random.default_rng(4)
    src = rng.integers(0, vocab, (2, 4)).astype(np.int32)
    mask = np.arange(4) < np.array([4, 2])[:, None]
    params = _init(model, 5, src, src[:, :steps], mask)
    out = sg.beam_search_seq2seq(model, params, src, mask, beam_size=k, length_penalty=alpha,
                                 max_new_tokens=steps, bos_id=BOS, eos_id=EOS)
    # Every y in vocab^steps, teacher-forced as [BOS, y1, y2]: float64 log-probs per position.
    ys = np.array(list(itertools.product(range(vocab), repeat=steps)), np.int32)
    tgt_in = np.concatenate([np.full((len(ys), 1), BOS, np.int32), ys[:, :-1]], 1)
    forward = jax.jit(model.apply)
    for row in range(2):
        logits = np.asarray(forward({"params": params}, np.repeat(src[row:row + 1], len(ys), 0),
                                    tgt_in, np.repeat(mask[row:row + 1], len(ys), 0)), np.float64)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        token_logp = np.take_along_axis(logp, ys[..., None], -1)[..., 0]   # [n, steps]
        hyps = {}
        for y, lp in zip(ys, token_logp):
            ends = np.flatnonzero(y == EOS)
            n = int(ends[0]) + 1 if len(ends) else steps   # a hypothesis ends at its first EOS
            hyps[tuple(y[:n])] = lp[:n].sum() / ((5.0 + n) / 6.0) ** alpha
        ranking = sorted(((s, y) for y, s in hyps.items()), reverse=True)
        best_score, best = ranking[0]
        assert out.lengths[row] == len(best)
        np.testing.assert_array_equal(out.tokens[row, :len(best)], best)
        np.testing.assert_allclose(out.beams.scores[row], [s for s, _ in ranking[:k]], rtol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(beam_size=0), "beam_size=0"), (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(max_new_tokens=9), "max_len=8"), (dict(length_penalty=-0.5), "length_penalty=-0.5"),
    (dict(eos_id=12), "eos_id must be in"), (dict(bos_id=-1), "bos_id must be in"),
    (dict(src_ids=np.full((2, 3), 12)), "src_ids must be in"),
    (dict(src_mask=np.zeros((2, 3), bool)), "have no real token"),
    (dict(src_mask=np.ones((2, 4), bool)), "src_mask has shape")])
def test_generation_rejects_bad_arguments(kwargs, match):
    cfg = get_config("transformer-tiny", vocab_size=V, max_len=8, num_layers=1, num_decoder_layers=1,
                     d_model=16, num_heads=2, d_ff=32)
    args = dict(src_ids=np.full((2, 3), 4), src_mask=None, beam_size=2, max_new_tokens=4,
                bos_id=BOS, eos_id=EOS) | kwargs
    with pytest.raises(ValueError, match=match):
        sg.beam_search_seq2seq(EncoderDecoder(cfg), {}, args.pop("src_ids"), args.pop("src_mask"), **args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature=-1.0"), (dict(top_k=0), "top_k=0"),
    (dict(top_p=0.0), "top_p=0.0")])
def test_sampling_rejects_bad_arguments(kwargs, match):
    cfg = get_config("transformer-tiny", vocab_size=V, max_len=8, num_layers=1, num_decoder_layers=1,
                     d_model=16, num_heads=2, d_ff=32)
    with pytest.raises(ValueError, match=match):
        sg.generate_seq2seq(EncoderDecoder(cfg), {}, np.full((2, 3), 4), max_new_tokens=4,
                            bos_id=BOS, eos_id=EOS, **kwargs)


# --- arguments: one set of checks for both generators -------------------------------------
from transformer_jax.models import GPT, generate  # noqa: E402


def _tiny(family):
    if family == "gpt":
        return GPT(get_config("gpt-tiny", vocab_size=V, max_len=16, num_layers=1, d_model=16,
                              num_heads=2, d_ff=32))
    return EncoderDecoder(get_config("transformer-tiny", vocab_size=V, max_len=8, num_layers=1,
                                     num_decoder_layers=1, d_model=16, num_heads=2, d_ff=32))


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=True), "max_new_tokens=True must be a positive integer"),
    (dict(max_new_tokens=np.float64(3.0)), "max_new_tokens=.*3.0.* must be a positive integer"),
    (dict(eos_id=V), r"eos_id must be in \[0, 12\)"),
    (dict(eos_id=2.0), "eos_id=2.0 must be an integer"),
    (dict(pad_id=True), "pad_id=True must be an integer token id"),
    (dict(top_k=2.5), "top_k=2.5 must be None or an integer"),
    (dict(top_k=np.bool_(True)), "top_k=.*True_? must be None or an integer"),
    (dict(top_p=1.5), r"top_p=1.5 must be None or a number in \(0, 1\]"),
    (dict(temperature=float("nan")), "temperature=nan must be a finite number")])
def test_both_generators_refuse_the_same_arguments(kwargs, match):
    # GPT's `generate` used to truncate, wrap or crash on these where seq2seq refused them.
    args = dict(max_new_tokens=4, eos_id=EOS, pad_id=PAD) | kwargs
    ids = np.full((2, 3), 4)
    with pytest.raises(ValueError, match=match) as gpt_err:
        generate(_tiny("gpt"), {}, ids, **args)
    with pytest.raises(ValueError, match=match) as seq2seq_err:
        sg.generate_seq2seq(_tiny("seq2seq"), {}, ids, bos_id=BOS, **args)
    assert str(gpt_err.value) == str(seq2seq_err.value)


def test_numpy_integers_are_accepted_as_ints():
    # Counts and ids read off numpy arrays are np.int64; each generator must treat them
    # exactly as the Python ints they equal.
    as_numpy = dict(max_new_tokens=np.int64(3), eos_id=np.int32(EOS), pad_id=np.int64(PAD))
    as_python = {k: int(v) for k, v in as_numpy.items()}
    src = np.array([[4, 5, 6], [7, 8, 0]], np.int32)
    gpt, seq2seq = _tiny("gpt"), _tiny("seq2seq")
    gpt_params = _init(gpt, 0, src)
    seq2seq_params = _init(seq2seq, 1, src, src, src > 0)
    runs = [lambda top_k, **a: generate(gpt, gpt_params, src, prompt_lengths=np.array([3, 2]),
                                        top_k=top_k, rng=jax.random.PRNGKey(2), **a),
            lambda top_k, **a: sg.generate_seq2seq(seq2seq, seq2seq_params, src, src > 0,
                                                   top_k=top_k, temperature=1.0,
                                                   bos_id=np.int64(BOS), **a),
            lambda top_k, **a: sg.beam_search_seq2seq(seq2seq, seq2seq_params, src, src > 0,
                                                      beam_size=top_k, bos_id=BOS, **a)]
    for run in runs:
        ours, reference = run(np.int64(2), **as_numpy), run(2, **as_python)
        np.testing.assert_array_equal(ours.tokens, reference.tokens)
        np.testing.assert_array_equal(ours.lengths, reference.lengths)
