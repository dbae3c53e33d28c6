"""Small deterministic sequence-to-sequence tasks built from the corpus.

Source = a random span of the corpus token stream (min..max_source_len tokens;
spans may cross document boundaries). `Seq2SeqDataConfig.kind` picks the target:

  reverse    the same tokens in reverse order. Reversal needs attention over the
             whole source (Sutskever et al., 2014, arXiv 1409.3215, reversed source
             order to shorten dependencies), so it exercises cross-attention while
             staying trivially checkable; but every target token is a source token.
  translate  a word-level "translation" into a synthetic language (the task of the
             LN-stability benchmark, Xiong et al. 2020, arXiv 2002.04745, whose main
             setting is IWSLT14 De-En): each token (a "word" of this language) is
             replaced through a fixed pseudo-random bijection of the vocabulary, and
             the order is changed locally, by reversing each window of
             `reorder_window` consecutive tokens (2 = swap adjacent pairs; the last,
             shorter window is reversed too):
                 target[j] = vocab_map[source[order[j]]],
                 order[j]  = start + end - 1 - j,  start = j - j % w,  end = min(start + w, n).
             vocab_map is a derangement (no token maps to itself) of the non-special
             ids [0, vocab.size) drawn from `map_seed`; special ids (BOS/EOS/pad/...)
             map to themselves. So no target token equals the source token at any
             position: the decoder must read the source through cross-attention, learn
             a vocabulary-sized dictionary and the reordering, which is harder than
             reversal. Train and validation sets built with one config share the map.

Teacher forcing (Vaswani et al., 2017, arXiv 1706.03762): the decoder reads
``tgt_in = [BOS] + target`` and predicts ``tgt_out = target + [EOS]``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from transformer_jax.data.batches import example_rng, pad_to
from transformer_jax.data.tokenized import TokenizedCorpus, TokenizedDataset
from transformer_jax.data.tokenizer import VocabInfo

SEQ2SEQ_FIELDS = ("src_ids", "src_mask", "tgt_in", "tgt_out", "tgt_mask")


def window_order(n: int, window: int) -> np.ndarray:
    """Source position of each of n target positions when every window of `window`
    consecutive tokens is reversed (the last, shorter one too): `[n]` int."""
    j = np.arange(n)
    start = j - j % window
    return start + np.minimum(start + window, n) - 1 - j


def vocab_derangement(size: int, special_ids, seed: int) -> np.ndarray:
    """`[size]` int32 map: a seeded random derangement of the non-special ids (no id
    maps to itself), special ids fixed. Drawn by rejection: a uniform permutation is
    a derangement with probability ~1/e, so a few draws suffice."""
    table = np.arange(size, dtype=np.int32)
    free = np.setdiff1d(table, np.asarray(list(special_ids), np.int32))
    if len(free) < 2:
        raise ValueError(f"vocabulary of size {size} has {len(free)} non-special ids; "
                         "translation needs at least 2")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(free)
        if not np.any(perm == free):
            table[free] = perm
            return table


# kind -> target of a source span `[n]`, given the dataset (its vocab map and config).
TARGETS = {
    "reverse": lambda src, ds: src[::-1],
    "translate": lambda src, ds: ds.vocab_map[src[window_order(len(src), ds.config.reorder_window)]],
}


@dataclasses.dataclass(frozen=True)
class Seq2SeqDataConfig:
    """Source spans of min..max_source_len tokens: sources `[B, S]`, targets `[B, S + 1]`."""
    max_source_len: int = 32  # S; the target has at most S tokens, so T = S + 1
    min_source_len: int = 4   # spans are uniform in [min_source_len, max_source_len]
    kind: str = "reverse"     # the target: a key of TARGETS (module docstring)
    reorder_window: int = 2   # translate: reverse each window of this many tokens
    map_seed: int = 0         # translate: seed of the vocabulary map

    def __post_init__(self):
        if not isinstance(self.min_source_len, int) or self.min_source_len < 1:
            raise ValueError(f"min_source_len={self.min_source_len!r} must be an int >= 1")
        if not isinstance(self.max_source_len, int) or self.max_source_len < self.min_source_len:
            raise ValueError(f"max_source_len={self.max_source_len!r} must be an int >= "
                             f"min_source_len={self.min_source_len}")
        if self.kind not in TARGETS:
            raise ValueError(f"kind={self.kind!r} is not valid; choose one of "
                             f"{', '.join(map(repr, TARGETS))}")
        for name in ("reorder_window", "map_seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) \
                    or value < (1 if name == "reorder_window" else 0):
                raise ValueError(f"{name}={value!r} must be an int >= "
                                 f"{1 if name == 'reorder_window' else 0}")


@dataclasses.dataclass(frozen=True)
class TranslationDataConfig(Seq2SeqDataConfig):
    """Seq2SeqDataConfig of the "translation" task (`pipeline.make_datasets`)."""
    kind: str = "translate"


class Seq2SeqDataset(TokenizedDataset):
    """Batches: src_ids [B, S] int32, src_mask [B, S] bool, tgt_in [B, T] int32,
    tgt_out [B, T] int32, tgt_mask [B, T] bool, with T = S + 1; masks are True on
    real tokens (tgt_mask covers the EOS)."""

    config_class = Seq2SeqDataConfig
    fields = SEQ2SEQ_FIELDS
    id_fields = ("src_ids", "tgt_in", "tgt_out")

    def __init__(self, data: TokenizedCorpus, vocab: VocabInfo,
                 config: Seq2SeqDataConfig = Seq2SeqDataConfig(),
                 model_vocab_size: int | None = None):
        if vocab.bos_id is None or vocab.eos_id is None:
            raise ValueError(f"vocab has bos_id={vocab.bos_id}, eos_id={vocab.eos_id}; "
                             "seq2seq targets need both")
        self.vocab, self.config = vocab, config
        self.model_vocab_size = vocab.size if model_vocab_size is None else model_vocab_size
        data.validate(self.model_vocab_size)
        if data.num_tokens < config.max_source_len:
            raise ValueError(f"corpus has {data.num_tokens} tokens, fewer than "
                             f"max_source_len={config.max_source_len}")
        self.stream = data.ids
        special = {*vocab.special_ids, vocab.pad_id, vocab.bos_id, vocab.eos_id}
        self.vocab_map = (vocab_derangement(vocab.size, special, config.map_seed)
                          if config.kind == "translate" else None)

    def example(self, index: int, seed: int = 0) -> dict[str, np.ndarray]:
        """src_ids `[S]`, src_mask `[S]`, tgt_in, tgt_out, tgt_mask `[S + 1]` of one
        random span and its target (S = max_source_len; padded, masks True on real tokens)."""
        cfg, v = self.config, self.vocab
        rng = example_rng(seed, index)
        n = int(rng.integers(cfg.min_source_len, cfg.max_source_len + 1))
        start = int(rng.integers(len(self.stream) - n + 1))
        src = self.stream[start:start + n]
        tgt = TARGETS[cfg.kind](src, self)
        s, t = cfg.max_source_len, cfg.max_source_len + 1
        return {
            "src_ids": pad_to(src, s, v.pad_id),
            "src_mask": np.arange(s) < n,
            "tgt_in": pad_to(np.concatenate([[v.bos_id], tgt]), t, v.pad_id),
            "tgt_out": pad_to(np.concatenate([tgt, [v.eos_id]]), t, v.pad_id),
            "tgt_mask": np.arange(t) < n + 1,
        }
