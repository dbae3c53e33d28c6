"""BLEU of greedy translations: the translation leg's second metric.

Xiong et al. 2020 report BLEU (IWSLT14 De-En, WMT14 En-De; e.g. post-LN without
warm-up 8.45 against ~34 with it). After training, every run of a translation
group decodes the first `Sweep.bleu_batches` validation batches greedily (the
library's cached decoder, `models.generate_seq2seq`, vmapped over the runs), and
sacrebleu scores that corpus against its one reference per source: corpus BLEU-4
with the brevity penalty (Papineni et al. 2002), on the target token ids
(`tokenize="none"`: a token of the synthetic language is one of its words).
Decoding stops at EOS or after as many tokens as the longest target (EOS included).
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from transformer_jax.models import generate_seq2seq

try:  # a core dependency; without it the report says BLEU was not computed
    import sacrebleu
except ImportError:  # pragma: no cover - exercised only where it is missing
    sacrebleu = None

MISSING = "BLEU not computed: sacrebleu is not installed (pip install sacrebleu)"


def available() -> bool:
    return sacrebleu is not None


def words(ids, specials) -> str:
    """Token ids -> the "sentence" sacrebleu scores: ids joined by spaces, the special
    tokens (BOS, EOS, pad) left out."""
    return " ".join(str(int(i)) for i in ids if int(i) not in specials)


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU (0..100) of space-separated tokens, one reference each."""
    if sacrebleu is None:
        raise RuntimeError(MISSING)
    return float(sacrebleu.corpus_bleu(hypotheses, [references], tokenize="none",
                                       force=True).score)


def sources(valid: dict, batches: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src_ids, src_mask, tgt_out) of the first `batches` validation batches, flat
    `[batches * batch, ...]` (valid: {field: [E, batch, ...]})."""
    flat = lambda x: np.asarray(x[:batches]).reshape(-1, *x.shape[2:])
    return flat(valid["src_ids"]), flat(valid["src_mask"]), flat(valid["tgt_out"])


def make_decoder(model, src_ids, src_mask, max_new_tokens: int, *, bos_id: int, eos_id: int,
                 pad_id: int):
    """-> decode(params): stacked parameters of R runs ([R, ...] leaves) -> greedy
    `Seq2SeqOutput` with tokens `[R, batch, max_new_tokens]`, lengths `[R, batch]`;
    one compiled program for every run."""
    return jax.jit(jax.vmap(functools.partial(
        generate_seq2seq, model, src_ids=src_ids, src_mask=src_mask,
        max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)))


def make_scorer(model, valid: dict, batches: int, *, bos_id: int, eos_id: int, pad_id: int):
    """-> bleu(params): stacked parameters of R runs -> corpus BLEU of each run `[R]`
    on the first `batches` validation batches."""
    src, mask, tgt = sources(valid, batches)
    specials = {bos_id, eos_id, pad_id}
    references = [words(row, specials) for row in tgt]
    decode = make_decoder(model, src, mask, tgt.shape[1], bos_id=bos_id, eos_id=eos_id,
                          pad_id=pad_id)

    def bleu(params) -> np.ndarray:
        out = jax.device_get(decode(params))
        return np.array([corpus_bleu([words(row[:n], specials) for row, n in zip(toks, lens)],
                                     references)
                         for toks, lens in zip(out.tokens, out.lengths)])
    return bleu
