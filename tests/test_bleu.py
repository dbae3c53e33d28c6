"""BLEU of the translation leg (experiments/ln/bleu.py): sacrebleu's corpus BLEU
against an independent BLEU-4 written here from Papineni et al. 2002, and the
vmapped decoder against one-run-at-a-time greedy decoding."""
import collections
import math

import jax
import numpy as np
import pytest

from experiments.ln import bleu
from transformer_jax.models import build, generate_seq2seq, get_config

pytestmark = pytest.mark.skipif(not bleu.available(), reason=bleu.MISSING)


def _ngrams(tokens, n):
    return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _reference_bleu(hyps, refs):
    """Corpus BLEU-4: clipped n-gram matches and hypothesis n-grams summed over the
    corpus, geometric mean of the four precisions, brevity penalty exp(1 - r / c)."""
    matches, totals = np.zeros(4), np.zeros(4)
    for h, r in zip(hyps, refs):
        for n in range(1, 5):
            hc, rc = _ngrams(h, n), _ngrams(r, n)
            matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    assert (matches > 0).all()   # no smoothing involved (sacrebleu smooths zero counts)
    c, r = sum(map(len, hyps)), sum(map(len, refs))
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return 100 * bp * math.exp(np.mean(np.log(matches / totals)))


def test_corpus_bleu_matches_the_formula():
    rng = np.random.default_rng(0)
    for trial in range(5):
        refs = [list(rng.integers(3, 9, rng.integers(6, 14))) for _ in range(20)]
        # Hypotheses: the reference with some tokens replaced, dropped or added, so
        # precisions, clipping and (for some trials) the brevity penalty all matter.
        hyps = []
        for r in refs:
            h = [t if rng.random() > 0.3 else int(rng.integers(3, 9)) for t in r]
            cut = int(rng.integers(0, 4)) if trial % 2 else -int(rng.integers(0, 3))
            hyps.append(h[:len(h) - cut] if cut > 0 else h + list(rng.integers(3, 9, -cut)))
        got = bleu.corpus_bleu([bleu.words(h, set()) for h in hyps],
                               [bleu.words(r, set()) for r in refs])
        np.testing.assert_allclose(got, _reference_bleu(hyps, refs), rtol=1e-9)
    same = [bleu.words(r, set()) for r in refs]
    assert bleu.corpus_bleu(same, same) == pytest.approx(100.0)


def test_words_drop_special_tokens():
    assert bleu.words(np.array([1, 7, 0, 12, 2, 0]), {0, 1, 2}) == "7 12"


def test_vmapped_decoder_and_scorer_equal_each_run_decoded_alone():
    config = get_config("transformer-tiny", num_layers=1, num_decoder_layers=1, d_model=16,
                        num_heads=2, d_ff=32, vocab_size=40, max_len=9)
    model = build(config)
    rng = np.random.default_rng(1)
    src = rng.integers(4, 40, (2, 3, 6)).astype(np.int32)          # [E, batch, S]
    mask = np.ones_like(src, bool)
    mask[0, 1, 4:] = False                                           # one padded source
    flat_src, flat_mask = src.reshape(6, 6), mask.reshape(6, 6)
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    runs = [model.init(k, flat_src, flat_src, flat_mask)["params"] for k in keys]
    stacked = jax.tree.map(lambda *x: np.stack(x), *runs)
    ids = dict(bos_id=1, eos_id=2, pad_id=0)
    alone = [generate_seq2seq(model, p, flat_src, flat_mask, max_new_tokens=7, **ids) for p in runs]
    together = bleu.make_decoder(model, flat_src, flat_mask, 7, **ids)(stacked)
    for r, out in enumerate(alone):
        np.testing.assert_array_equal(np.asarray(together.tokens[r]), np.asarray(out.tokens))
        np.testing.assert_array_equal(np.asarray(together.lengths[r]), np.asarray(out.lengths))
    # References = run 0's own translations: run 0 scores 100, run 1 what the formula says.
    tgt = np.asarray(alone[0].tokens).reshape(2, 3, 7)
    valid = {"src_ids": src, "src_mask": mask, "tgt_out": tgt}
    got = bleu.make_scorer(model, valid, 2, **ids)(stacked)
    specials = {0, 1, 2}
    refs = [bleu.words(t, specials) for t in np.asarray(alone[0].tokens)]
    hyps = [bleu.words(np.asarray(t)[:n], specials) for t, n in zip(alone[1].tokens, alone[1].lengths)]
    assert refs != hyps
    np.testing.assert_allclose(got, [100.0, bleu.corpus_bleu(hyps, refs)], rtol=0, atol=1e-9)
