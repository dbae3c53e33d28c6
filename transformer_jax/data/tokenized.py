"""A corpus as flat token arrays: the common input of every example builder.

Storing all tokens in one int32 array with offsets (rather than nested lists)
keeps the whole default corpus in a few MB and lets builders slice segments by
index arithmetic.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Self, Sequence

import numpy as np

from transformer_jax.data.batches import ExampleDataset, validate_token_ids
from transformer_jax.data.corpus import Corpus
from transformer_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedCorpus:
    """Token ids of every segment of every document, flattened.

    Attributes:
      ids: [num_tokens] int32, all segments back to back in document order.
      word_starts: [num_tokens] bool, True where a token begins a new word
        (always True at a segment start); whole-word masking groups by it.
      segment_offsets: [num_segments + 1] int64; segment s is
        ``ids[segment_offsets[s]:segment_offsets[s+1]]``.
      document_offsets: [num_documents + 1] int64 in *segment* units.
    """

    ids: np.ndarray
    word_starts: np.ndarray
    segment_offsets: np.ndarray
    document_offsets: np.ndarray

    @classmethod
    def from_documents(cls, documents: Sequence[Sequence[Sequence[int]]],
                       word_starts: Sequence[Sequence[Sequence[bool]]] | None = None
                       ) -> "TokenizedCorpus":
        """From pre-tokenized ids ``documents[d][s] = [ids...]``.

        Without ``word_starts`` every token is its own word. Empty segments and
        documents are dropped.
        """
        ids, starts, seg_offsets, doc_offsets = [], [], [0], [0]
        for d, doc in enumerate(documents):
            for s, seg in enumerate(doc):
                if len(seg) == 0:
                    continue
                seg_starts = (np.ones(len(seg), bool) if word_starts is None
                              else np.asarray(word_starts[d][s], bool).copy())
                if seg_starts.shape != (len(seg),):
                    raise ValueError(f"word_starts[{d}][{s}] has shape {seg_starts.shape}, "
                                     f"expected ({len(seg)},) like its segment")
                seg_starts[0] = True
                ids.append(np.asarray(seg))
                starts.append(seg_starts)
                seg_offsets.append(seg_offsets[-1] + len(seg))
            if len(seg_offsets) - 1 > doc_offsets[-1]:
                doc_offsets.append(len(seg_offsets) - 1)
        if not ids:
            raise ValueError("documents contain no tokens; give at least one "
                             "non-empty segment")
        flat = np.concatenate(ids)
        if not np.issubdtype(flat.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got dtype {flat.dtype}")
        validate_token_ids(flat, np.iinfo(np.int32).max, field="token ids")
        return cls(flat.astype(np.int32), np.concatenate(starts),
                   np.asarray(seg_offsets, np.int64), np.asarray(doc_offsets, np.int64))

    @property
    def num_tokens(self) -> int:
        """Length of ``ids``."""
        return int(self.ids.shape[0])

    @property
    def num_segments(self) -> int:
        """Number of segments (sentences)."""
        return int(self.segment_offsets.shape[0] - 1)

    @property
    def num_documents(self) -> int:
        """Number of documents."""
        return int(self.document_offsets.shape[0] - 1)

    def document_tokens(self, d: int) -> np.ndarray:
        """All tokens of document ``d`` (its segments back to back): int32 `[n_d]`."""
        s0, s1 = self.document_offsets[d], self.document_offsets[d + 1]
        return self.ids[self.segment_offsets[s0]:self.segment_offsets[s1]]

    def validate(self, vocab_size: int, source: str = "corpus") -> None:
        """ValueError if any id lies outside [0, vocab_size)."""
        validate_token_ids(self.ids, vocab_size, field=f"{source} token ids")


def tokenize_corpus(corpus: Corpus, tokenizer: Tokenizer) -> TokenizedCorpus:
    """Encode every segment (in parallel) and record word boundaries.

    Segments after the first of a document get a leading space, so byte-level
    BPE tokenizes a document exactly as it would the text joined with spaces
    (WordPiece ignores the space).
    """
    texts = [(" " + seg if i else seg) for doc in corpus.documents
             for i, seg in enumerate(doc)]
    encoded = tokenizer.encode_batch_with_word_ids(texts)
    docs, starts, k = [], [], 0
    for doc in corpus.documents:
        doc_ids, doc_starts = [], []
        for ids, word_ids in encoded[k:k + len(doc)]:
            w = np.asarray(word_ids)
            doc_ids.append(ids)
            doc_starts.append(np.concatenate([[True], w[1:] != w[:-1]])[:len(ids)])
        k += len(doc)
        docs.append(doc_ids)
        starts.append(doc_starts)
    return TokenizedCorpus.from_documents(docs, starts)


class TokenizedDataset(ExampleDataset):
    """An ExampleDataset built from a TokenizedCorpus and its tokenizer's VocabInfo.

    Subclasses take ``(data, vocab, config, model_vocab_size)`` in ``__init__`` and
    name their config's class in ``config_class``; ``from_tokenizer`` is the one
    way from raw text (or tokens) and a tokenizer to any of them.
    """

    config_class: ClassVar[type]

    @classmethod
    def from_tokenizer(cls, source: Corpus | TokenizedCorpus, tokenizer: Tokenizer,
                       config=None, model_vocab_size: int | None = None) -> Self:
        """Tokenize ``source`` (unless already tokenized) and build the dataset;
        ``config`` None means ``config_class()``, the defaults."""
        data = tokenize_corpus(source, tokenizer) if isinstance(source, Corpus) else source
        config = cls.config_class() if config is None else config
        return cls(data, tokenizer.vocab_info(), config, model_vocab_size)
