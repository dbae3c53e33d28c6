"""Offline data pipeline: corpora, tokenizers and batch builders (numpy only).

Every batch is a pure function of (dataset, seed, step), so training can
resume exactly from ``BatchIterator.state()``.
"""

from transformer_jax.data.batches import (
    BatchIterator, ExampleDataset, example_rng, local_example_indices, shard_batch,
    validate_token_ids)
from transformer_jax.data.bert import (
    BERT_FIELDS, IS_NEXT, NOT_NEXT, BertDataConfig, BertDataset)
from transformer_jax.data.corpus import (
    Corpus, SourceUnavailableError, load_corpus, load_hf_corpus, split_corpus, stdlib_corpus,
    text_corpus)
from transformer_jax.data.gpt import GPT_FIELDS, GPTDataConfig, GPTDataset
from transformer_jax.data.labeled import (
    CLASSIFY_FIELDS, IGNORE_INDEX, TAG_FIELDS, ClassifyDataset, LabelSet, TagDataset,
    make_labeled_datasets, read_labeled)
from transformer_jax.data.pipeline import make_datasets
from transformer_jax.data.seq2seq import (
    SEQ2SEQ_FIELDS, Seq2SeqDataConfig, Seq2SeqDataset, TranslationDataConfig)
from transformer_jax.data.tokenized import TokenizedCorpus, TokenizedDataset, tokenize_corpus
from transformer_jax.data.tokenizer import (
    Tokenizer, VocabInfo, default_cache_dir, train_bpe, train_tokenizer, train_wordpiece)

__all__ = [
    "BERT_FIELDS", "CLASSIFY_FIELDS", "GPT_FIELDS", "IGNORE_INDEX", "IS_NEXT", "NOT_NEXT",
    "SEQ2SEQ_FIELDS", "TAG_FIELDS", "ClassifyDataset", "LabelSet", "TagDataset",
    "make_labeled_datasets", "read_labeled",
    "BatchIterator", "BertDataConfig", "BertDataset", "Corpus", "ExampleDataset",
    "GPTDataConfig", "GPTDataset", "Seq2SeqDataConfig", "Seq2SeqDataset", "Tokenizer",
    "TokenizedCorpus", "TokenizedDataset", "TranslationDataConfig", "VocabInfo",
    "default_cache_dir", "example_rng",
    "SourceUnavailableError", "load_corpus", "load_hf_corpus", "local_example_indices",
    "make_datasets",
    "shard_batch", "split_corpus", "stdlib_corpus", "text_corpus", "tokenize_corpus",
    "train_bpe", "train_tokenizer", "train_wordpiece", "validate_token_ids",
]
