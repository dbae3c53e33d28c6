"""Tokenizers of imported checkpoints, loaded with HF `tokenizers` so that ids
match upstream exactly.

Sources, in order: `tokenizer.json` (the full pipeline, as saved by transformers);
BERT's `vocab.txt` (+ `tokenizer_config.json` for casing), rebuilt the way
transformers' `BertTokenizerFast` builds it; GPT-2's `vocab.json` + `merges.txt`.

transformers ignores the padding and truncation stored in `tokenizer.json` and
sets them per call; `load_tokenizer` does the same: no padding (`tokenize` pads),
truncation at `max_length` (sentence-transformers' `max_seq_length`, else the
model's positions) so no input can overrun the position table.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _from_vocab_txt(directory: Path) -> Tokenizer:
    """WordPiece as in Devlin et al. 2018 (arXiv 1810.04805) and `BertTokenizerFast`."""
    cfg = _read_json(directory / "tokenizer_config.json")
    lowercase = cfg.get("do_lower_case", True)
    special = {k: cfg.get(f"{k}_token", f"[{k.upper()}]") for k in ("unk", "sep", "cls")}
    tok = Tokenizer(models.WordPiece.from_file(str(directory / "vocab.txt"), unk_token=special["unk"]))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=cfg.get("tokenize_chinese_chars", True),
        strip_accents=cfg.get("strip_accents"), lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = special["cls"], special["sep"]
    for token in (cls, sep):
        if tok.token_to_id(token) is None:
            raise ValueError(f"{directory / 'vocab.txt'} has no special token {token!r}")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _from_bpe_files(directory: Path) -> Tokenizer:
    """Byte-level BPE of GPT-2 (Radford et al. 2019), as `GPT2TokenizerFast` builds it."""
    tok = Tokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def load_tokenizer(directory, max_length: int | None = None) -> Tokenizer | None:
    """The checkpoint's tokenizer (tokenizer.json, a BERT vocab.txt or GPT-2's
    vocab.json + merges.txt), truncating to `max_length` tokens if given; None when
    the directory has none."""
    directory = Path(directory)
    if (directory / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    elif (directory / "vocab.txt").exists():
        tok = _from_vocab_txt(directory)
    elif (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
        tok = _from_bpe_files(directory)
    else:
        return None
    tok.no_padding()
    tok.no_truncation()
    if max_length is not None:
        tok.enable_truncation(max_length)
    return tok


def pad_id(tokenizer: Tokenizer) -> int:
    """The id `tokenize` pads with: [PAD], <pad> or <|endoftext|>, else 0."""
    for token in ("[PAD]", "<pad>", "<|endoftext|>"):
        if tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
    return 0


def tokenize(tokenizer: Tokenizer, texts, pairs=None, *, pad: int | None = None) -> dict[str, np.ndarray]:
    """Right-padded batch: {"input_ids", "attention_mask", "token_type_ids"}, each
    int32 `[batch, longest]`. `pairs` gives BERT's second segments."""
    if isinstance(texts, str):
        raise ValueError(f"texts must be a list of strings, got the single string {texts!r}")
    if pairs is not None and len(pairs) != len(texts):
        raise ValueError(f"pairs has {len(pairs)} entries but texts has {len(texts)}")
    inputs = list(texts) if pairs is None else list(zip(texts, pairs))
    encodings = tokenizer.encode_batch(inputs)
    longest = max(len(e.ids) for e in encodings)
    pad = pad_id(tokenizer) if pad is None else pad
    out = {"input_ids": np.full((len(inputs), longest), pad, np.int32),
           "attention_mask": np.zeros((len(inputs), longest), np.int32),
           "token_type_ids": np.zeros((len(inputs), longest), np.int32)}
    for row, e in enumerate(encodings):
        n = len(e.ids)
        out["input_ids"][row, :n] = e.ids
        out["attention_mask"][row, :n] = 1
        out["token_type_ids"][row, :n] = e.type_ids
    return out
