"""Hugging Face interoperability: import and export BERT, GPT-2 and
sentence-transformers (BERT) checkpoints as config.json + model.safetensors.

Needs the `hf` extra (`safetensors`); torch is imported only to read a
`pytorch_model.bin` pickle, and only with `allow_pickle=True`.

    from transformer_jax.hf import load_pretrained, tokenize
    pre = load_pretrained("path/to/all-MiniLM-L6-v2")
    batch = tokenize(pre.tokenizer, ["A man is eating food."])
    vectors = pre.model.apply({"params": pre.params}, batch["input_ids"],
                              attention_mask=batch["attention_mask"])
"""
from transformer_jax.hf.config import (ACTIVATIONS_FROM_HF, BERT_ARCHITECTURES,
                                       GPT2_ARCHITECTURES, bert_from_hf, bert_to_hf,
                                       gpt2_from_hf, gpt2_to_hf)
from transformer_jax.hf.io import read_safetensors, write_safetensors
from transformer_jax.hf.pretrained import Pretrained, load_pretrained, save_pretrained
from transformer_jax.hf.sentence import SentencePooling
from transformer_jax.hf.tokenizer import load_tokenizer, tokenize

__all__ = [
    "ACTIVATIONS_FROM_HF", "BERT_ARCHITECTURES", "GPT2_ARCHITECTURES", "Pretrained",
    "SentencePooling", "bert_from_hf", "bert_to_hf", "gpt2_from_hf", "gpt2_to_hf",
    "load_pretrained", "load_tokenizer", "read_safetensors", "save_pretrained", "tokenize",
    "write_safetensors",
]
