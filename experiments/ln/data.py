"""Batches for the benchmark, built once on the host and shared by every run.

Runs with the same seed see the same batches whatever their placement, learning
rate or warm-up, so comparisons between them are paired: only the optimizer
settings differ. Validation batches are the same for all runs.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from experiments.ln.presets import TASKS, Preset
from transformer_jax.data import (BertDataConfig, ExampleDataset, GPTDataConfig,
                                  TranslationDataConfig, VocabInfo, make_datasets,
                                  stdlib_corpus)


@dataclasses.dataclass
class TaskData:
    vocab_size: int
    train: ExampleDataset
    valid: ExampleDataset
    vocab: VocabInfo   # the tokenizer's special ids (BOS/EOS/pad)

    def train_batches(self, seeds, steps: int, batch_size: int) -> dict[str, np.ndarray]:
        """{field: [num_seeds, steps, batch, ...]}: the stream of each data seed."""
        per_seed = [_stack([self.train.batch(s, batch_size, seed=seed) for s in range(steps)])
                    for seed in seeds]
        return _stack(per_seed)

    def valid_batches(self, count: int, batch_size: int) -> dict[str, np.ndarray]:
        """{field: [count, batch, ...]} of held-out text (documents unseen in training)."""
        return _stack([self.valid.batch(s, batch_size, seed=0) for s in range(count)])


def _stack(batches: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


@functools.lru_cache(maxsize=4)
def _corpus(max_chars):
    return stdlib_corpus(max_chars=max_chars)


def _data_config(kind: str, seq: int):
    if kind == "mlm":
        # BERT masks 15% of the tokens (Devlin et al. 2018): room for seq / 6 predictions.
        return BertDataConfig(max_len=seq, max_predictions_per_seq=max(2, seq // 6))
    if kind == "lm":
        return GPTDataConfig(seq_len=seq)
    # Word-level "translation" (`transformer_jax.data.seq2seq`): a fixed vocabulary map
    # with local reordering, so the decoder needs cross-attention to every source word.
    return TranslationDataConfig(max_source_len=seq, min_source_len=max(1, seq // 2))


def load_task_data(preset: Preset, task: str, cache_dir: str | os.PathLike,
                   seq_len: int | None = None) -> TaskData:
    """Tokenizer trained offline on the default corpus (cached in `cache_dir`), datasets
    at `seq_len` (default: the preset's); the model vocabulary is the preset's."""
    kind, seq, vocab = TASKS[task][1], seq_len or preset.seq_len, preset.vocab_size
    tokenizer, train, valid = make_datasets(kind, _corpus(preset.corpus_chars),
                                            _data_config(kind, seq), vocab_size=vocab,
                                            model_vocab_size=vocab, cache_dir=cache_dir)
    info = tokenizer.vocab_info()
    if info.size > vocab:
        raise ValueError(f"tokenizer vocabulary {info.size} exceeds the preset's vocab_size={vocab}")
    return TaskData(vocab, train, valid, info)
