"""GPT language-modelling examples: documents packed into fixed-length blocks.

Every document is followed by EOS (``<|endoftext|>``, as in GPT-2, Radford et
al., 2019) and all documents are concatenated into one token stream. Block k
covers stream[k*L : k*L + L + 1]: inputs are its first L tokens, targets its
last L (next-token prediction). Blocks are visited in a fresh random order
each epoch, drawn from (seed, epoch), so example g is a pure function of
(seed, g). Only the final block can be short; it is padded and its padded
targets get loss_mask 0.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from transformer_jax.data.batches import pad_to
from transformer_jax.data.tokenized import TokenizedCorpus, TokenizedDataset
from transformer_jax.data.tokenizer import VocabInfo

GPT_FIELDS = ("input_ids", "targets", "loss_mask")


@dataclasses.dataclass(frozen=True)
class GPTDataConfig:
    """Rows of ``seq_len`` tokens: batches are `[B, seq_len]`."""
    seq_len: int = 128  # L: tokens per example; a block holds L + 1

    def __post_init__(self):
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"seq_len={self.seq_len!r} must be an int >= 1")


@functools.lru_cache(maxsize=8)
def _epoch_order(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
    # Salted with 1 so the block order is independent of example_rng(seed, .) streams.
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, 1])).permutation(num_blocks)


class GPTDataset(TokenizedDataset):
    """Batches: input_ids [B, L] int32, targets [B, L] int32 (inputs shifted left by
    one), loss_mask [B, L] float32 (1 = real target, 0 = padding)."""

    config_class = GPTDataConfig
    fields = GPT_FIELDS
    id_fields = ("input_ids", "targets")

    def __init__(self, data: TokenizedCorpus, vocab: VocabInfo,
                 config: GPTDataConfig = GPTDataConfig(),
                 model_vocab_size: int | None = None):
        if vocab.eos_id is None:
            raise ValueError("vocab.eos_id is None; GPT packing needs an EOS token "
                             "to separate documents")
        self.vocab, self.config = vocab, config
        self.model_vocab_size = vocab.size if model_vocab_size is None else model_vocab_size
        data.validate(self.model_vocab_size)
        docs = [data.document_tokens(d) for d in range(data.num_documents)]
        eos = np.array([vocab.eos_id], np.int32)
        self.stream = np.concatenate([x for doc in docs for x in (doc, eos)])
        # ceil((N - 1) / L) blocks; every stream token except the first is a target once.
        self.num_blocks = max(1, -(-(len(self.stream) - 1) // config.seq_len))

    def example(self, index: int, seed: int = 0) -> dict[str, np.ndarray]:
        """input_ids, targets `[L]` int32 and loss_mask `[L]` float32 of block ``index``
        of the (seed, epoch) block order."""
        seq_len = self.config.seq_len
        epoch, within = divmod(index, self.num_blocks)
        block = int(_epoch_order(self.num_blocks, seed, epoch)[within])
        chunk = self.stream[block * seq_len: block * seq_len + seq_len + 1]
        n_targets = len(chunk) - 1
        return {
            "input_ids": pad_to(chunk[:-1], seq_len, self.vocab.pad_id),
            "targets": pad_to(chunk[1:], seq_len, self.vocab.pad_id),
            "loss_mask": (np.arange(seq_len) < n_targets).astype(np.float32),
        }
