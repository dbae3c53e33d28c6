"""One call from corpus to (tokenizer, train dataset, validation dataset).

`DATASETS` is keyed by the training task a dataset feeds (`training.tasks`:
"mlm", "lm", "seq2seq"), plus "translation", a second seq2seq dataset: one
vocabulary of task names across the library.
"""

from __future__ import annotations

import os
import warnings

from transformer_jax.data.bert import BertDataConfig, BertDataset
from transformer_jax.data.corpus import Corpus, load_corpus, split_corpus
from transformer_jax.data.gpt import GPTDataConfig, GPTDataset
from transformer_jax.data.seq2seq import Seq2SeqDataConfig, Seq2SeqDataset, TranslationDataConfig
from transformer_jax.data.tokenizer import Tokenizer, train_tokenizer

# dataset name -> (dataset class, config class, tokenizer kind)
DATASETS = {
    "mlm": (BertDataset, BertDataConfig, "wordpiece"),
    "lm": (GPTDataset, GPTDataConfig, "bpe"),
    "seq2seq": (Seq2SeqDataset, Seq2SeqDataConfig, "bpe"),          # span reversal by default
    "translation": (Seq2SeqDataset, TranslationDataConfig, "bpe"),  # see data/seq2seq.py
}
TASKS = DATASETS   # deprecated name (it used the family names "bert" / "gpt")
_OLD_NAMES = {"bert": "mlm", "gpt": "lm"}


def dataset_name(task: str) -> str:
    """`task` as a DATASETS key; the old family names still work, with a warning."""
    if task in _OLD_NAMES:
        warnings.warn(f"make_datasets({task!r}) is deprecated; the dataset is named by the task "
                      f"it feeds: {_OLD_NAMES[task]!r}", DeprecationWarning, stacklevel=3)
        return _OLD_NAMES[task]
    if task not in DATASETS:
        raise ValueError(f"task={task!r} is not known; valid tasks: {sorted(DATASETS)}")
    return task


def make_datasets(task: str, corpus: Corpus | str | os.PathLike | None = None,
                  config=None, vocab_size: int = 4000,
                  tokenizer: Tokenizer | None = None, validation_fraction: float = 0.05,
                  split_seed: int = 0, model_vocab_size: int | None = None,
                  cache_dir: str | os.PathLike | None = None):
    """Returns (tokenizer, train_dataset, validation_dataset) for ``task`` (a DATASETS key).

    ``corpus`` is a Corpus or a ``load_corpus`` source (None = stdlib default).
    The tokenizer is trained (or loaded from cache) on the training split only,
    so validation text stays unseen.
    """
    task = dataset_name(task)
    dataset_cls, config_cls, kind = DATASETS[task]
    if not isinstance(corpus, Corpus):
        corpus = load_corpus(corpus)
    train, valid = split_corpus(corpus, validation_fraction, split_seed)
    if tokenizer is None:
        tokenizer = train_tokenizer(train, kind, vocab_size, cache_dir=cache_dir)
    config = config_cls() if config is None else config
    if not isinstance(config, config_cls):
        raise ValueError(f"config for task {task!r} must be a {config_cls.__name__}, "
                         f"got {type(config).__name__}")
    return (tokenizer,
            dataset_cls.from_tokenizer(train, tokenizer, config, model_vocab_size),
            dataset_cls.from_tokenizer(valid, tokenizer, config, model_vocab_size))
