"""The synthetic word-level translation task (`data/seq2seq.py`, kind "translate"):
batches checked against a reimplementation written here (window reversal by
slicing, the map read back from the batches), and a few EncoderDecoder steps.

The corpus is random made-up words written to a temp directory, so the expected
source spans come from what the test wrote."""
from __future__ import annotations

import numpy as np
import optax
import pytest

from transformer_jax.data import (Seq2SeqDataConfig, TranslationDataConfig, make_datasets,
                                  text_corpus, tokenize_corpus)
from transformer_jax.models import get_config
from transformer_jax.training import create_train_state, make_train_step

S = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("translation")
    rng = np.random.default_rng(7)
    words = ["".join(rng.choice(list("abcdefghijklmnop"), size=rng.integers(2, 8)))
             for _ in range(200)]
    (root / "text").mkdir()
    for d in range(12):
        lines = [" ".join(rng.choice(words, size=rng.integers(5, 12))) + "." for _ in range(30)]
        (root / "text" / f"doc{d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = text_corpus(root / "text")
    made = {w: make_datasets("translation", corpus, TranslationDataConfig(S, 3, reorder_window=w),
                             vocab_size=300, cache_dir=root / "cache") for w in (2, 3)}
    return corpus, made


def _reordered(src, window):
    """Reverse each consecutive window of `window` tokens (the last, shorter one too)."""
    return np.concatenate([src[i:i + window][::-1] for i in range(0, len(src), window)])


@pytest.mark.parametrize("window", [2, 3])
def test_targets_are_the_mapped_reordered_source(data, window):
    corpus, made = data
    tokenizer, train, valid = made[window]
    v = tokenizer.vocab_info()
    specials = {*v.special_ids, v.pad_id, v.bos_id, v.eos_id}
    stream = " ".join(map(str, tokenize_corpus(corpus, tokenizer).ids))
    mapping = {}
    for ds, seed in ((train, 3), (valid, 4)):
        batch = ds.batch(0, 48, seed=seed)
        assert batch["src_ids"].shape == (48, S) and batch["tgt_out"].shape == (48, S + 1)
        for row, n in enumerate(batch["src_mask"].sum(1)):
            src, tin, tout = (batch[k][row] for k in ("src_ids", "tgt_in", "tgt_out"))
            assert " ".join(map(str, src[:n])) in stream
            # Undo the reordering (window reversal is its own inverse), then read the map.
            unordered = _reordered(tout[:n], window)
            for a, b in zip(src[:n], unordered):
                assert mapping.setdefault(int(a), int(b)) == int(b), "map is not a function"
            assert tout[n] == v.eos_id and tin[0] == v.bos_id
            assert np.array_equal(tin[1:n + 1], tout[:n])
            assert np.array_equal(batch["tgt_mask"][row], np.arange(S + 1) < n + 1)
    ordinary = {a: b for a, b in mapping.items() if a not in specials}
    assert len(ordinary) > 50
    assert all(a != b for a, b in ordinary.items()), "a word is its own translation"
    assert len(set(ordinary.values())) == len(ordinary), "two words share a translation"
    assert not set(ordinary.values()) & specials
    assert all(mapping[a] == a for a in mapping if a in specials)
    # The map is a bijection of the non-special ids, fixed by map_seed.
    table = train.vocab_map
    free = np.array(sorted(set(range(v.size)) - specials))
    assert np.array_equal(np.sort(table[free]), free)
    assert all(table[a] == b for a, b in mapping.items())


def test_config_is_validated_and_tasks_do_not_mix(data):
    corpus, _ = data
    with pytest.raises(ValueError, match="kind='copy'"):
        Seq2SeqDataConfig(kind="copy")
    with pytest.raises(ValueError, match="reorder_window=0"):
        TranslationDataConfig(reorder_window=0)
    with pytest.raises(ValueError, match="TranslationDataConfig.*Seq2SeqDataConfig"):
        make_datasets("translation", corpus, Seq2SeqDataConfig(S), vocab_size=300)
    assert Seq2SeqDataConfig().kind == "reverse" and TranslationDataConfig().kind == "translate"


def test_encoder_decoder_learns_a_batch(data):
    tokenizer, train, _ = data[1][2]
    config = get_config("transformer-tiny", vocab_size=tokenizer.vocab_info().size, num_layers=1,
                        num_decoder_layers=1, d_model=32, num_heads=2, d_ff=64, max_len=S + 1,
                        dropout=0.0, attention_dropout=0.0, init="xavier")
    state = create_train_state(config, optax.adam(3e-3), np.array([0, 1], np.uint32))
    step = make_train_step("seq2seq")
    batch = train.batch(0, 8, seed=0)
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses
