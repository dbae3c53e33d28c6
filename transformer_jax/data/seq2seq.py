"""A small deterministic sequence-to-sequence task built from the corpus: span reversal.

Source = a random span of the corpus token stream, target = the same tokens in
reverse order. Reversal needs attention over the whole source (Sutskever et
al., 2014, arXiv 1409.3215, reversed source order to shorten dependencies), so
it exercises encoder-decoder cross-attention while staying trivially checkable.
Spans may cross document boundaries; the task does not care.

Teacher forcing (Vaswani et al., 2017, arXiv 1706.03762): the decoder reads
``tgt_in = [BOS] + target`` and predicts ``tgt_out = target + [EOS]``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from transformer_jax.data.batches import ExampleDataset, example_rng, pad_to
from transformer_jax.data.corpus import Corpus
from transformer_jax.data.tokenized import TokenizedCorpus, tokenize_corpus
from transformer_jax.data.tokenizer import Tokenizer, VocabInfo

SEQ2SEQ_FIELDS = ("src_ids", "src_mask", "tgt_in", "tgt_out", "tgt_mask")


@dataclasses.dataclass(frozen=True)
class Seq2SeqDataConfig:
    """Source spans of min..max_source_len tokens: sources `[B, S]`, targets `[B, S + 1]`."""
    max_source_len: int = 32  # S; the target has at most S tokens, so T = S + 1
    min_source_len: int = 4   # spans are uniform in [min_source_len, max_source_len]

    def __post_init__(self):
        if not isinstance(self.min_source_len, int) or self.min_source_len < 1:
            raise ValueError(f"min_source_len={self.min_source_len!r} must be an int >= 1")
        if not isinstance(self.max_source_len, int) or self.max_source_len < self.min_source_len:
            raise ValueError(f"max_source_len={self.max_source_len!r} must be an int >= "
                             f"min_source_len={self.min_source_len}")


class Seq2SeqDataset(ExampleDataset):
    """Batches: src_ids [B, S] int32, src_mask [B, S] bool, tgt_in [B, T] int32,
    tgt_out [B, T] int32, tgt_mask [B, T] bool, with T = S + 1; masks are True on
    real tokens (tgt_mask covers the EOS)."""

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

    @classmethod
    def from_tokenizer(cls, source: Corpus | TokenizedCorpus, tokenizer: Tokenizer,
                       config: Seq2SeqDataConfig = Seq2SeqDataConfig(),
                       model_vocab_size: int | None = None) -> "Seq2SeqDataset":
        """Tokenize ``source`` (unless already tokenized) and build the dataset."""
        data = tokenize_corpus(source, tokenizer) if isinstance(source, Corpus) else source
        return cls(data, tokenizer.vocab_info(), config, model_vocab_size)

    def example(self, index: int, seed: int = 0) -> dict[str, np.ndarray]:
        """src_ids `[S]`, src_mask `[S]`, tgt_in, tgt_out, tgt_mask `[S + 1]` of one
        random span (S = max_source_len; padded, masks True on real tokens)."""
        cfg, v = self.config, self.vocab
        rng = example_rng(seed, index)
        n = int(rng.integers(cfg.min_source_len, cfg.max_source_len + 1))
        start = int(rng.integers(len(self.stream) - n + 1))
        src = self.stream[start:start + n]
        tgt = src[::-1]
        s, t = cfg.max_source_len, cfg.max_source_len + 1
        return {
            "src_ids": pad_to(src, s, v.pad_id),
            "src_mask": np.arange(s) < n,
            "tgt_in": pad_to(np.concatenate([[v.bos_id], tgt]), t, v.pad_id),
            "tgt_out": pad_to(np.concatenate([tgt, [v.eos_id]]), t, v.pad_id),
            "tgt_mask": np.arange(t) < n + 1,
        }
