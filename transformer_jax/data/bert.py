"""BERT pretraining examples: next-sentence pairs and masked-LM targets.

Follows Devlin et al., 2018 (arXiv 1810.04805, sec. 3.1 and appendix A.1) and
Google's ``create_pretraining_data.py``, reorganised so that example ``g`` is a
pure function of (seed, g) (see ``batches.py``):

* NSP: with probability 1/2 segment B is the text that follows A in the same
  document (label 0 = IsNext), otherwise text from a different, random
  document (label 1 = NotNext). The label is drawn *first* and IsNext starts
  are drawn only where a next segment exists, so the ratio is exactly
  Bernoulli(1/2) (the reference code forces NotNext for one-segment chunks).
* Layout ``[CLS] A [SEP] B [SEP]``; token_type 0 on [CLS], A and the first
  [SEP], 1 on B and the last [SEP], 0 on padding.
* MLM: 15% of the non-special tokens are selected (the reference counts the
  3 specials too), each replaced by [MASK] 80% / a random non-special token
  10% / itself 10%; at most ``max_predictions_per_seq`` per sequence. With
  ``whole_word_masking`` all wordpieces of a word are selected together and a
  word that would overflow the budget is skipped, never split.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from transformer_jax.data.batches import example_rng, pad_to
from transformer_jax.data.tokenized import TokenizedCorpus, TokenizedDataset
from transformer_jax.data.tokenizer import VocabInfo

IS_NEXT, NOT_NEXT = 0, 1
BERT_FIELDS = ("input_ids", "token_type_ids", "attention_mask", "mlm_positions",
               "mlm_ids", "mlm_weights", "nsp_labels")


@dataclasses.dataclass(frozen=True)
class BertDataConfig:
    """Sizes and probabilities of BERT pretraining examples (see the module doc);
    batches are `[B, max_len]` and `[B, max_predictions_per_seq]`."""
    max_len: int = 128                # L: [CLS] A [SEP] B [SEP] incl. padding
    mask_prob: float = 0.15           # Devlin et al. 2018, sec. 3.1
    max_predictions_per_seq: int = 20  # P; reference value for L=128
    whole_word_masking: bool = False  # BERT release of May 2019
    short_seq_prob: float = 0.1       # shorter targets so fine-tuning lengths are seen
    random_next_prob: float = 0.5     # P(NotNext)
    mask_token_prob: float = 0.8      # 80% [MASK]
    random_token_prob: float = 0.1    # 10% random token; the remaining 10% unchanged

    def __post_init__(self):
        if not isinstance(self.max_len, int) or self.max_len < 5:
            raise ValueError(f"max_len={self.max_len!r} must be an int >= 5 "
                             "(3 special tokens plus one token each for A and B)")
        if not isinstance(self.max_predictions_per_seq, int) or self.max_predictions_per_seq < 1:
            raise ValueError(f"max_predictions_per_seq={self.max_predictions_per_seq!r} "
                             "must be an int >= 1")
        for name in ("mask_prob", "short_seq_prob", "random_next_prob",
                     "mask_token_prob", "random_token_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r} must lie in [0, 1]")
        if self.mask_token_prob + self.random_token_prob > 1.0:
            raise ValueError(f"mask_token_prob + random_token_prob = "
                             f"{self.mask_token_prob + self.random_token_prob} must be <= 1")


class BertDataset(TokenizedDataset):
    """Batches of BERT pretraining examples; see the module docstring.

    Batch arrays (B = batch size, L = max_len, P = max_predictions_per_seq):
      input_ids [B, L] int32, token_type_ids [B, L] int32,
      attention_mask [B, L] bool (True = real token), mlm_positions [B, P] int32,
      mlm_ids [B, P] int32 (original ids), mlm_weights [B, P] float32 (1 = real
      prediction, 0 = padding), nsp_labels [B] int32 (0 = IsNext, 1 = NotNext).
    """

    config_class = BertDataConfig
    fields = BERT_FIELDS
    id_fields = ("input_ids", "mlm_ids")

    def __init__(self, data: TokenizedCorpus, vocab: VocabInfo,
                 config: BertDataConfig = BertDataConfig(),
                 model_vocab_size: int | None = None):
        for name in ("cls_id", "sep_id", "mask_id"):
            if getattr(vocab, name) is None:
                raise ValueError(f"vocab.{name} is None; BERT examples need a tokenizer "
                                 "with [CLS], [SEP] and [MASK] (kind='wordpiece')")
        self.data, self.vocab, self.config = data, vocab, config
        self.model_vocab_size = vocab.size if model_vocab_size is None else model_vocab_size
        data.validate(self.model_vocab_size)
        if data.num_documents < 2:
            raise ValueError(f"corpus has {data.num_documents} document(s); NotNext pairs "
                             "need segments from at least 2 documents")
        seg_doc = np.repeat(np.arange(data.num_documents), np.diff(data.document_offsets))
        self._seg_doc = seg_doc  # [num_segments] document of each segment
        last_of_doc = data.document_offsets[1:][seg_doc] - 1
        self._next_starts = np.flatnonzero(np.arange(data.num_segments) < last_of_doc)
        if self._next_starts.size == 0:
            raise ValueError("no document has 2 or more segments; IsNext pairs need "
                             "consecutive segments")
        specials = {vocab.pad_id, vocab.cls_id, vocab.sep_id, vocab.mask_id,
                    *vocab.special_ids}
        # Random replacements come from ids both the tokenizer and model know,
        # never specials.
        n_ids = min(vocab.size, self.model_vocab_size)
        self._replacement_ids = np.setdiff1d(np.arange(n_ids), list(specials))

    # -- segment pairs --------------------------------------------------------
    def _chunk_end(self, start: int, target: int, min_segments: int) -> int:
        """End segment (exclusive) of the chunk from ``start`` reaching ``target``
        tokens, with at least ``min_segments`` segments, within the document."""
        off = self.data.segment_offsets
        doc_end = int(self.data.document_offsets[self._seg_doc[start] + 1])
        end = int(np.searchsorted(off, off[start] + target, side="left"))
        return min(max(end, start + min_segments), doc_end)

    def _tokens(self, seg_start: int, seg_end: int) -> tuple[np.ndarray, np.ndarray]:
        off = self.data.segment_offsets
        sl = slice(off[seg_start], off[seg_end])
        return self.data.ids[sl], self.data.word_starts[sl]

    def _pair(self, rng: np.random.Generator, target: int):
        """((A ids, A word starts), (B ids, B word starts), nsp label)."""
        not_next = rng.random() < self.config.random_next_prob
        if not_next:
            start = int(rng.integers(self.data.num_segments))
            end = self._chunk_end(start, target, 1)
            a_end = start + int(rng.integers(1, end - start + 1))
            a = self._tokens(start, a_end)
            doc = self._seg_doc[start]
            other = int(rng.integers(self.data.num_documents - 1))
            other += other >= doc  # uniform over the other documents
            d0, d1 = self.data.document_offsets[other:other + 2]
            b_start = int(rng.integers(d0, d1))
            b_target = max(1, target - len(a[0]))
            b = self._tokens(b_start, self._chunk_end(b_start, b_target, 1))
        else:
            start = int(self._next_starts[rng.integers(self._next_starts.size)])
            end = self._chunk_end(start, target, 2)
            a_end = start + int(rng.integers(1, end - start))
            a, b = self._tokens(start, a_end), self._tokens(a_end, end)
        return a, b, int(not_next)

    @staticmethod
    def _truncate(rng, a, b, max_tokens: int):
        """Trim the longer of A, B one token at a time, each from a random end, until
        they fit (reference ``truncate_seq_pair``), done in closed form."""
        la, lb = len(a[0]), len(b[0])
        if la + lb <= max_tokens:
            return a, b
        short = min(la, lb)
        if 2 * short <= max_tokens:
            new_a, new_b = (la, max_tokens - la) if la <= lb else (max_tokens - lb, lb)
        else:  # both end up about half; ties trim B first, so A keeps the odd token
            new_a, new_b = (max_tokens + 1) // 2, max_tokens // 2
        out = []
        for (ids, starts), n_keep in ((a, new_a), (b, new_b)):
            cut = len(ids) - n_keep
            front = int(rng.binomial(cut, 0.5)) if cut else 0
            out.append((ids[front:front + n_keep], starts[front:front + n_keep]))
        return out[0], out[1]

    # -- masked LM ------------------------------------------------------------
    def _select(self, rng, candidates: np.ndarray, word_ids: np.ndarray) -> np.ndarray:
        """Sorted positions to predict, chosen among ``candidates``."""
        cfg = self.config
        n_predict = min(cfg.max_predictions_per_seq,
                        max(1, int(np.floor(len(candidates) * cfg.mask_prob + 0.5))))
        if not cfg.whole_word_masking:
            return np.sort(rng.permutation(candidates)[:n_predict])
        # Word groups: candidates sharing a word id are adjacent.
        cuts = np.flatnonzero(np.diff(word_ids[candidates])) + 1
        groups = np.split(candidates, cuts)
        chosen, count = [], 0
        for g in rng.permutation(len(groups)):
            if count >= n_predict:
                break
            if count + len(groups[g]) > n_predict:
                continue  # skip, never split, a word that would overflow the budget
            chosen.append(groups[g])
            count += len(groups[g])
        return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)

    def _mask(self, rng, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        cfg = self.config
        out = tokens.copy()
        u = rng.random(len(positions))
        to_mask = u < cfg.mask_token_prob
        to_random = (u >= cfg.mask_token_prob) & (u < cfg.mask_token_prob + cfg.random_token_prob)
        out[positions[to_mask]] = self.vocab.mask_id
        n_random = int(to_random.sum())
        out[positions[to_random]] = self._replacement_ids[
            rng.integers(self._replacement_ids.size, size=n_random)]
        return out

    def example(self, index: int, seed: int = 0) -> dict[str, np.ndarray]:
        """One example; beyond ``fields`` it holds ``word_ids`` [L] int32 (-1 on
        specials and padding), the word grouping used by whole-word masking."""
        cfg, v = self.config, self.vocab
        rng = example_rng(seed, index)
        max_tokens = cfg.max_len - 3
        target = max_tokens
        if rng.random() < cfg.short_seq_prob:
            target = int(rng.integers(2, max_tokens + 1))
        a, b, label = self._pair(rng, target)
        (a_ids, a_starts), (b_ids, b_starts) = self._truncate(rng, a, b, max_tokens)
        la, lb = len(a_ids), len(b_ids)
        tokens = np.concatenate([[v.cls_id], a_ids, [v.sep_id], b_ids, [v.sep_id]])
        starts = np.concatenate([[False], a_starts, [False], b_starts, [False]])
        starts[[1, la + 2]] = True  # truncation may leave a word's tail at the front
        word_ids = np.cumsum(starts) - 1
        candidates = np.concatenate([np.arange(1, la + 1), np.arange(la + 2, la + lb + 2)])
        word_ids[np.setdiff1d(np.arange(len(tokens)), candidates)] = -1

        positions = self._select(rng, candidates, word_ids)
        masked = self._mask(rng, tokens, positions)
        n, length, p = len(tokens), cfg.max_len, cfg.max_predictions_per_seq
        token_type = np.concatenate([np.zeros(la + 2), np.ones(lb + 1)])
        return {
            "input_ids": pad_to(masked, length, v.pad_id),
            "token_type_ids": pad_to(token_type, length, 0),
            "attention_mask": np.arange(length) < n,
            "mlm_positions": pad_to(positions, p, 0),
            "mlm_ids": pad_to(tokens[positions], p, 0),
            "mlm_weights": pad_to(np.ones(len(positions)), p, 0, np.float32),
            "nsp_labels": np.int32(label),
            "word_ids": pad_to(word_ids, length, -1),
        }
