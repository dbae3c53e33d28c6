"""Deterministic WordPiece vocabulary training.

HF's ``WordPieceTrainer`` (BPE training with a ``##`` continuation prefix) gives
a *different vocabulary on every run* in tokenizers 0.23: the ``##x`` symbols
get ids in hash-map order and merge ties are broken by id. Plain BPE without a
prefix is deterministic (its alphabet is sorted), so we run plain BPE on words
whose non-initial characters are mapped to a private "continuation" alphabet,
then map the learned tokens back: a token that starts with a continuation
character is ``##`` + its text. Merges never cross words, so every learned
token is either word-initial (first char plain, rest continuation) or a pure
continuation; the result is exactly the vocabulary a ``##``-prefix BPE trainer
learns (Wu et al., 2016, arXiv 1609.08144; Sennrich et al., 2016, arXiv 1508.07909),
with ties broken by character order instead of by chance.
"""

from __future__ import annotations

import collections
from typing import Iterable, Sequence

import tokenizers as hf
from tokenizers import models, normalizers, pre_tokenizers, trainers

# Unicode supplementary private-use planes 15-16; real text in them would
# collide with the continuation alphabet, so such words are skipped.
_PUA_START = 0xF0000
_PUA_SIZE = 0x10FFFE - _PUA_START


def _count_words(texts: Iterable[str], lowercase: bool) -> collections.Counter:
    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: collections.Counter = collections.Counter()
    for text in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    return counts


def train_wordpiece_vocab(texts: Iterable[str], vocab_size: int, min_frequency: int,
                          special_tokens: Sequence[str], lowercase: bool = True
                          ) -> dict[str, int]:
    """Learn a WordPiece vocab {token: id}; ``special_tokens`` get ids 0..n-1."""
    counts = _count_words(texts, lowercase)
    counts = collections.Counter({w: c for w, c in counts.items()
                                  if all(ord(ch) < _PUA_START for ch in w)})
    alphabet = sorted({ch for w in counts for ch in w[1:]})
    if len(alphabet) > _PUA_SIZE:  # not reachable for real text; be explicit anyway
        raise ValueError(f"corpus alphabet has {len(alphabet)} characters; at most "
                         f"{_PUA_SIZE} are supported")
    to_cont = {ord(ch): _PUA_START + i for i, ch in enumerate(alphabet)}
    from_cont = {v: k for k, v in to_cont.items()}

    def words():
        # Sorted so the trainer sees the same input order every run.
        for w in sorted(counts):
            mapped = w[0] + w[1:].translate(to_cont)
            yield " ".join([mapped] * counts[w])

    bpe = hf.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens), show_progress=False)
    bpe.train_from_iterator(words(), trainer)

    vocab: dict[str, int] = {}
    for token, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]):
        if token in special_tokens:
            piece = token
        elif ord(token[0]) >= _PUA_START:
            piece = "##" + token.translate(from_cont)
        else:
            piece = token.translate(from_cont)
        vocab.setdefault(piece, len(vocab))
    return vocab
