"""Tests of the offline data pipeline (transformer_jax.data).

Most tests run on a synthetic corpus of random made-up words written to a temp
directory, so expected values come from what the test wrote, not from the code
under test. Tokenizers are trained with tiny vocabularies into temp caches.
"""

import gzip
import json
import os
import re
import sysconfig
import subprocess
import sys
import types
from pathlib import Path

import chex
import numpy as np
import pytest

from transformer_jax.data import (
    IS_NEXT, NOT_NEXT, BatchIterator, BertDataConfig, BertDataset, GPTDataConfig,
    GPTDataset, Seq2SeqDataConfig, Seq2SeqDataset, Tokenizer, TokenizedCorpus,
    load_hf_corpus, make_datasets, shard_batch, split_corpus, stdlib_corpus, text_corpus,
    tokenize_corpus, train_bpe, train_wordpiece, validate_token_ids)
from transformer_jax.data import corpus as corpus_module
from transformer_jax.data import load_corpus
from transformer_jax.data import tokenizer as tokenizer_module

LETTERS = list("abcdefghijklmnopqrstuvwxyz")


def _random_words(rng, n):
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(LETTERS, size=rng.integers(2, 10))))
    return sorted(words)


def _random_sentence(rng, words):
    chosen = rng.choice(words, size=rng.integers(4, 13))
    return " ".join([chosen[0].capitalize(), *chosen[1:]]) + "."


def _write_corpus(root: Path, seed: int, n_docs: int = 24):
    """Random documents, one per file; returns [[sentences of doc 0], ...] in file order."""
    rng = np.random.default_rng(seed)
    words = _random_words(rng, 300)
    root.mkdir(parents=True, exist_ok=True)
    docs = []
    for d in range(n_docs):
        paragraphs = [[_random_sentence(rng, words) for _ in range(rng.integers(3, 7))]
                      for _ in range(rng.integers(2, 4))]
        text = "\n\n".join("\n".join(p) for p in paragraphs)  # sentences wrap over lines
        (root / f"doc{d:03d}.txt").write_text(text + "\n", encoding="utf-8")
        docs.append([s for p in paragraphs for s in p])
    return docs


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    sentences = _write_corpus(root / "text", seed=1234)
    corpus = text_corpus(root / "text")
    cache = root / "cache"
    wordpiece = train_wordpiece(corpus, vocab_size=400, cache_dir=cache)
    bpe = train_bpe(corpus, vocab_size=400, cache_dir=cache)
    return types.SimpleNamespace(root=root, sentences=sentences, corpus=corpus,
                                 cache=cache, wordpiece=wordpiece, bpe=bpe)


@pytest.fixture(scope="module")
def bert_data(synthetic):
    return tokenize_corpus(synthetic.corpus, synthetic.wordpiece)


def _bert(synthetic, bert_data, **config):
    cfg = BertDataConfig(**{"max_len": 64, "short_seq_prob": 0.0, **config})
    return BertDataset(bert_data, synthetic.wordpiece.vocab_info(), cfg)


def _original_tokens(ex):
    """input_ids with the masked positions restored to their original ids."""
    tokens = ex["input_ids"].copy()
    real = ex["mlm_weights"] > 0
    tokens[ex["mlm_positions"][real]] = ex["mlm_ids"][real]
    return tokens


def _as_text(ids):
    return " " + " ".join(map(str, ids)) + " "


# -- corpus -------------------------------------------------------------------

def test_stdlib_corpus_is_deterministic_and_capped():
    a = stdlib_corpus(max_documents=6)
    b = stdlib_corpus(max_documents=6)
    assert a.documents == b.documents and a.fingerprint == b.fingerprint
    assert a.num_documents == 6 and a.num_chars > 1000
    capped = stdlib_corpus(max_chars=5000)
    assert 0 < capped.num_chars <= 5000
    # A fresh interpreter with a different hash seed must give the same text.
    root = Path(tokenizer_module.__file__).resolve().parents[2]
    code = ("from transformer_jax.data import stdlib_corpus;"
            "print(stdlib_corpus(max_documents=6).fingerprint)")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    assert out == a.fingerprint


@pytest.mark.skipif(sys.version.split()[0] != corpus_module.SNAPSHOT_PYTHON,
                    reason="the snapshot was built from another Python's stdlib")
def test_default_corpus_is_the_snapshot_of_its_python():
    # Parsed afresh from this interpreter's stdlib, the text must equal what
    # is shipped, so the snapshot is what its docstring says it is.
    local = load_corpus("stdlib:local")
    shipped = stdlib_corpus()
    assert local.source.startswith("stdlib:") and shipped.source.startswith("stdlib-snapshot")
    assert local.documents == shipped.documents
    assert stdlib_corpus(max_chars=150_000).documents == load_corpus(
        "stdlib:local", max_chars=150_000).documents


def test_default_corpus_is_the_same_on_every_python():
    # The load checks the content hash, so a pass here means the text is the
    # fixed snapshot whatever Python runs the test (CI runs 3.11 and 3.13).
    full = stdlib_corpus()
    assert full.fingerprint == corpus_module.SNAPSHOT_FINGERPRINT
    # The presets' caps (micro 150k chars, quick 400k) leave enough documents
    # for a validation split with NotNext pairs (>= 2 documents each side).
    for cap in (150_000, 400_000):
        train, valid = split_corpus(stdlib_corpus(max_chars=cap))
        assert train.num_documents >= 2 and valid.num_documents >= 2, cap
    if sys.version_info[:2] != (3, 11):
        local = stdlib_corpus(max_chars=150_000,
                              stdlib_dir=sysconfig.get_paths()["stdlib"])
        assert local.documents != stdlib_corpus(max_chars=150_000).documents


def _write_snapshot(path, documents):
    path.write_bytes(gzip.compress(json.dumps({"documents": documents}).encode()))


def test_damaged_snapshot_is_refused(tmp_path, monkeypatch):
    documents = [list(d) for d in stdlib_corpus(max_documents=3).documents]
    monkeypatch.setattr(corpus_module, "_snapshot_path", lambda: tmp_path / "snap.json.gz")
    corpus_module._snapshot_documents.cache_clear()
    try:
        documents[1][0] = documents[1][0].replace("e", "a", 1)
        _write_snapshot(tmp_path / "snap.json.gz", documents)
        with pytest.raises(ValueError, match="snap.json.gz.*fingerprint.*damaged"):
            stdlib_corpus()
        (tmp_path / "snap.json.gz").write_text("not gzip")
        with pytest.raises(ValueError, match="snap.json.gz.*cannot be read"):
            stdlib_corpus()
    finally:
        corpus_module._snapshot_documents.cache_clear()


def test_text_dir_corpus_reads_documents_and_sentences(synthetic):
    corpus = synthetic.corpus
    assert corpus.num_documents == len(synthetic.sentences)
    assert [list(d) for d in corpus.documents] == synthetic.sentences
    single = text_corpus(synthetic.root / "text" / "doc003.txt")   # a document per paragraph
    assert [s for d in single.documents for s in d] == synthetic.sentences[3]
    assert text_corpus(synthetic.root / "text", max_documents=5).num_documents == 5


def test_a_single_text_file_is_split_into_documents(synthetic, tmp_path):
    """One file would be one document, and a train/validation split needs 2: its
    blank-line paragraphs are its documents; without blank lines, groups of
    LINES_PER_DOCUMENT lines. Too small to split either way: an error saying so."""
    from transformer_jax.data.corpus import LINES_PER_DOCUMENT
    path = synthetic.root / "text" / "doc003.txt"
    paragraphs = path.read_text().strip().split("\n\n")
    corpus = text_corpus(path)
    assert [list(d) for d in corpus.documents] == [p.split("\n") for p in paragraphs]
    assert text_corpus(path).documents == corpus.documents   # deterministic
    train, valid = split_corpus(corpus)
    assert train.num_documents + valid.num_documents == len(paragraphs) and valid.num_documents
    lines = tmp_path / "lines.txt"   # a sentence a line, no blank line
    sentences = synthetic.sentences[0] * 4
    lines.write_text("\n".join(sentences[:2 * LINES_PER_DOCUMENT + 3]) + "\n")
    docs = text_corpus(lines).documents
    assert [len(d) for d in docs] == [LINES_PER_DOCUMENT, LINES_PER_DOCUMENT, 3]
    assert [s for d in docs for s in d] == sentences[:2 * LINES_PER_DOCUMENT + 3]
    small = tmp_path / "small.txt"
    small.write_text("Just one short paragraph.\nOf two lines.\n")
    with pytest.raises(ValueError, match=r"small.txt' is too small to split .* at least 2 "
                                         r"paragraphs .* or more than 10 non-blank lines"):
        text_corpus(small)


def test_empty_corpus_errors_name_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        text_corpus(empty)
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match="missing"):
        text_corpus(missing)
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("\n \n\n")
    with pytest.raises(ValueError, match="blank"):
        text_corpus(blank)


def test_hf_corpus_errors_point_at_offline_default(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import raises ImportError
    with pytest.raises(ImportError, match="stdlib_corpus"):
        load_hf_corpus("wikitext")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(RuntimeError, match="offline.*stdlib_corpus"):
        load_hf_corpus("wikitext")

    class FakeDataset(list):
        column_names = ["text"]

    rows = FakeDataset([{"text": "First doc. It has two sentences."}, {"text": " "},
                        {"text": "Second doc.\n\nNew paragraph here."}, {"text": "Third."}])
    monkeypatch.setitem(sys.modules, "datasets",
                        types.SimpleNamespace(load_dataset=lambda *a, **k: rows))
    corpus = load_hf_corpus("fake", max_documents=2)
    assert corpus.documents == (("First doc.", "It has two sentences."),
                                ("Second doc.", "New paragraph here."))


def test_split_is_by_document_and_deterministic(synthetic):
    train, valid = split_corpus(synthetic.corpus, 0.25, seed=3)
    again = split_corpus(synthetic.corpus, 0.25, seed=3)
    other = split_corpus(synthetic.corpus, 0.25, seed=4)
    assert (train.documents, valid.documents) == (again[0].documents, again[1].documents)
    assert valid.documents != other[1].documents
    assert valid.num_documents == 6
    assert sorted(train.documents + valid.documents) == sorted(synthetic.corpus.documents)
    assert not set(train.documents) & set(valid.documents)


# -- tokenizers ---------------------------------------------------------------

def test_tokenizer_cache_reuses_trained_file(synthetic, monkeypatch):
    text = " ".join(synthetic.sentences[5])
    first = synthetic.wordpiece

    def no_training(*args, **kwargs):
        raise AssertionError("tokenizer was retrained instead of loaded from cache")

    monkeypatch.setattr(tokenizer_module, "_train_hf", no_training)
    second = train_wordpiece(synthetic.corpus, vocab_size=400, cache_dir=synthetic.cache)
    assert second.path == first.path and second.encode(text) == first.encode(text)
    # Another setting is another cache entry, so it must train.
    with pytest.raises(AssertionError, match="retrained"):
        train_wordpiece(synthetic.corpus, vocab_size=401, cache_dir=synthetic.cache)


def test_damaged_tokenizer_and_label_files_are_named_and_a_damaged_cache_entry_retrains(
        synthetic, tmp_path):
    """tokenizers raises a bare Exception with its Rust message; the library names the
    file. A damaged entry of the cache is trained again, as a missing one is, and the
    files written get the umask's permissions (not mkstemp's 0600)."""
    from transformer_jax.data.labeled import LabelSet
    bad = tmp_path / "tokenizer.json"
    for damage in (b"", b"{}", b'{"version": "1.0", "mod', b"\xff\xfe{"):
        bad.write_bytes(damage)
        with pytest.raises(ValueError, match=f"tokenizer file '{re.escape(str(bad))}' is "
                                             "damaged or not a tokenizer"):
            Tokenizer.from_file(bad)
    labels = tmp_path / "labels.json"
    for damage in (b"", b"[1, 2]", b'{"task": "classify"}', b"\xff"):
        labels.write_bytes(damage)
        with pytest.raises(ValueError, match=f"label file '{re.escape(str(labels))}' is damaged"):
            LabelSet.load(labels)
    text = " ".join(synthetic.sentences[5])
    first = train_wordpiece(synthetic.corpus, vocab_size=400, cache_dir=tmp_path / "cache")
    Path(first.path).write_text('{"trunc')
    again = train_wordpiece(synthetic.corpus, vocab_size=400, cache_dir=tmp_path / "cache")
    assert again.path == first.path and again.encode(text) == first.encode(text)
    umask = os.umask(0o022)
    os.umask(umask)
    assert Path(again.path).stat().st_mode & 0o777 == 0o666 & ~umask
    assert not list(Path(again.path).parent.glob("*.tmp"))


def test_a_byte_order_mark_is_not_text(tmp_path):
    """Files saved by Windows tools (Notepad, Excel's "CSV UTF-8") start with U+FEFF:
    read as utf-8-sig, the mark is neither part of a CSV header, a JSON line, an
    input line nor a corpus document."""
    from transformer_jax.data.labeled import read_labeled
    from transformer_jax.run.files import input_lines
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.csv").write_bytes(bom + b"text,label\nhello there,pos\nbad day,neg\n")
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"text": "hello there", "label": "pos"}\n')
    assert [e.text for e in read_labeled(tmp_path / "a.csv", "classify")] == ["hello there", "bad day"]
    assert [e.text for e in read_labeled(tmp_path / "a.jsonl", "classify")] == ["hello there"]
    (tmp_path / "in.txt").write_bytes(bom + b"good day\n\nbad day\n")
    assert input_lines(tmp_path / "in.txt") == ["good day", "bad day"]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "one.txt").write_bytes(bom + b"First sentence here. Second one there.\n")
    (tmp_path / "docs" / "two.txt").write_bytes(bom + b"Another document. With two sentences.\n")
    corpus = text_corpus(tmp_path / "docs")
    assert not any("\ufeff" in s for doc in corpus.documents for s in doc), corpus.documents


def test_cache_dir_env_var(synthetic, tmp_path, monkeypatch):
    small, _ = split_corpus(synthetic.corpus, 0.5, seed=0)
    monkeypatch.setenv("TRANSFORMER_JAX_CACHE", str(tmp_path))
    tok = train_bpe(small, vocab_size=320)
    assert Path(tok.path).is_relative_to(tmp_path / "tokenizers")


def test_wordpiece_training_is_deterministic_and_bert_shaped(synthetic, tmp_path):
    tok = synthetic.wordpiece
    retrained = train_wordpiece(synthetic.corpus, vocab_size=400, cache_dir=tmp_path)
    assert retrained.path != tok.path
    assert [retrained.id_to_token(i) for i in range(tok.vocab_size)] == \
        [tok.id_to_token(i) for i in range(tok.vocab_size)]
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.vocab_size == 400
    assert any(tok.id_to_token(i).startswith("##") for i in range(tok.vocab_size))
    for sentence in synthetic.sentences[7]:
        assert tok.decode(tok.encode(sentence)) == sentence.lower()


def test_bpe_round_trips_any_text(synthetic):
    tok = synthetic.bpe
    assert tok.eos_id == 0 and tok.pad_id == tok.eos_id and tok.mask_id is None
    rng = np.random.default_rng(0)
    text = "".join(chr(c) for c in rng.integers(32, 0x3000, size=200))
    assert tok.decode(tok.encode(text)) == text


def test_load_vocab_txt(synthetic, tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s",
             "un", "##able", ","]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = Tokenizer.from_file(tmp_path / "vocab.txt")
    assert tok.encode("Hello, worlds UNABLE zzz") == [5, 10, 6, 7, 8, 9, 1]
    assert tok.mask_id == 4 and tok.vocab_size == len(vocab)
    # A trained tokenizer saved as vocab.txt must encode like its tokenizer.json.
    synthetic.wordpiece.save(tmp_path / "saved")
    from_vocab = Tokenizer.from_file(tmp_path / "saved" / "vocab.txt")
    for sentence in synthetic.sentences[11]:
        assert from_vocab.encode(sentence) == synthetic.wordpiece.encode(sentence)
    with pytest.raises(ValueError, match="nowhere"):
        Tokenizer.from_file(tmp_path / "nowhere")


# -- BERT -----------------------------------------------------------------------

def test_mlm_selection_and_replacement_statistics(synthetic, bert_data):
    tok = synthetic.wordpiece
    ds = _bert(synthetic, bert_data, max_predictions_per_seq=64)
    specials = set(tok.special_ids)
    selected = maskable = n_mask = n_same = n_random = 0
    for i in range(600):
        ex = ds.example(i, seed=5)
        n_real = int(ex["mlm_weights"].sum())
        n_candidates = int(ex["attention_mask"].sum()) - 3  # minus [CLS] and 2x [SEP]
        assert abs(n_real - 0.15 * n_candidates) <= 0.5  # 15%, rounded
        pos, orig = ex["mlm_positions"][:n_real], ex["mlm_ids"][:n_real]
        assert np.all(ex["mlm_weights"][n_real:] == 0) and np.all(np.diff(pos) > 0)
        assert not specials & set(orig.tolist())
        now = ex["input_ids"][pos]
        n_mask += int((now == tok.mask_id).sum())
        n_same += int((now == orig).sum())
        replaced = now[(now != tok.mask_id) & (now != orig)]
        assert not specials & set(replaced.tolist())
        n_random += len(replaced)
        selected, maskable = selected + n_real, maskable + n_candidates
    assert abs(selected / maskable - 0.15) < 0.01
    assert abs(n_mask / selected - 0.8) < 0.025
    assert abs(n_same / selected - 0.1) < 0.02
    assert abs(n_random / selected - 0.1) < 0.02


def test_max_predictions_cap(synthetic, bert_data):
    ds = _bert(synthetic, bert_data, max_predictions_per_seq=3)
    batch = ds.batch(0, 16, seed=1)
    chex.assert_shape(batch["mlm_positions"], (16, 3))
    assert np.all(batch["mlm_weights"].sum(1) == 3)


def test_nsp_pairs_and_label_ratio(synthetic, bert_data):
    ds = _bert(synthetic, bert_data, max_len=48)
    docs = [_as_text(bert_data.document_tokens(d)) for d in range(bert_data.num_documents)]
    sep = synthetic.wordpiece.sep_id
    labels, checked = [], 0
    for i in range(800):
        ex = ds.example(i, seed=9)
        labels.append(int(ex["nsp_labels"]))
        tokens = _original_tokens(ex)[:int(ex["attention_mask"].sum())]
        first_sep = int(np.flatnonzero(tokens == sep)[0])
        a, b = _as_text(tokens[1:first_sep]), _as_text(tokens[first_sep + 1:-1])
        if min(len(a), len(b)) < 40 or i % 4:  # long spans are unique in random text
            continue
        checked += 1
        where_a = {d for d, text in enumerate(docs) if a in text}
        where_b = {d for d, text in enumerate(docs) if b in text}
        assert len(where_a) == 1 and len(where_b) == 1
        if labels[-1] == IS_NEXT:
            d = where_a.pop()
            assert d in where_b and docs[d].index(b) > docs[d].index(a)
        else:
            assert labels[-1] == NOT_NEXT and where_a != where_b
    assert checked > 100
    assert abs(np.mean(labels) - 0.5) < 0.07  # 4 sigma for 800 draws


def test_whole_word_masking_never_splits_words(synthetic, bert_data):
    tok = synthetic.wordpiece
    ds = _bert(synthetic, bert_data, whole_word_masking=True, max_predictions_per_seq=12)
    selected = maskable = masked_pieces = 0
    for i in range(300):
        ex = ds.example(i, seed=2)
        n = int(ex["attention_mask"].sum())
        masked = np.zeros(n, bool)
        masked[ex["mlm_positions"][ex["mlm_weights"] > 0]] = True
        pieces = [tok.id_to_token(t) for t in _original_tokens(ex)[:n]]
        is_special = np.isin(_original_tokens(ex)[:n], tok.special_ids)
        word_ids = ex["word_ids"][:n]
        assert np.array_equal(word_ids < 0, is_special)
        for p in range(1, n):
            if is_special[p]:
                continue
            # Reference: a "##" piece continues the word of the piece before it.
            continues = pieces[p].startswith("##") and not is_special[p - 1]
            assert continues == (word_ids[p] == word_ids[p - 1]), (i, p, pieces[p - 1:p + 1])
            if continues:
                assert masked[p] == masked[p - 1], (i, p, pieces[p - 2:p + 1])
                masked_pieces += int(masked[p])
        selected += int(masked.sum())
        maskable += n - 3
    assert masked_pieces > 50
    assert 0.11 < selected / maskable <= 0.15 + 1e-9


def test_token_type_and_padding_layout(synthetic, bert_data):
    tok = synthetic.wordpiece
    ds = _bert(synthetic, bert_data, short_seq_prob=0.5)
    batch = ds.batch(3, 64, seed=4)
    assert {k: v.dtype for k, v in batch.items()} == {
        "input_ids": np.int32, "token_type_ids": np.int32, "attention_mask": bool,
        "mlm_positions": np.int32, "mlm_ids": np.int32, "mlm_weights": np.float32,
        "nsp_labels": np.int32}
    lengths = set()
    for row in range(64):
        ids, types_, attn = (batch[k][row] for k in
                             ("input_ids", "token_type_ids", "attention_mask"))
        n = int(attn.sum())
        lengths.add(n)
        assert np.all(attn[:n]) and not np.any(attn[n:])
        assert ids[0] == tok.cls_id and ids[n - 1] == tok.sep_id
        seps = np.flatnonzero(ids[:n] == tok.sep_id)
        assert len(seps) == 2 and 1 < seps[0] < n - 2
        assert np.all(types_[:seps[0] + 1] == 0) and np.all(types_[seps[0] + 1:n] == 1)
        assert np.all(types_[n:] == 0) and np.all(ids[n:] == tok.pad_id)
    assert max(lengths) == 64 and min(lengths) < 64


# -- GPT and seq2seq -------------------------------------------------------------

def test_gpt_blocks_are_the_packed_stream_shifted(synthetic):
    tok = synthetic.bpe
    seq_len = 50
    ds = GPTDataset.from_tokenizer(synthetic.corpus, tok, GPTDataConfig(seq_len=seq_len))
    # Reference stream: each document's text, joined, encoded in one go, then EOS.
    stream = [i for doc in synthetic.sentences for i in tok.encode(" ".join(doc)) + [tok.eos_id]]
    blocks = {tuple(stream[k:k + seq_len + 1]) for k in range(0, len(stream) - 1, seq_len)}
    assert len(blocks) == ds.num_blocks
    seen = set()
    for step in range(ds.num_blocks // 8 + 1):
        batch = ds.batch(step, 8, seed=6)
        assert np.array_equal(batch["targets"][:, :-1], batch["input_ids"][:, 1:])
        for ids, tgt, m in zip(batch["input_ids"], batch["targets"], batch["loss_mask"]):
            n = int(m.sum())
            assert np.all(m[:n] == 1) and np.all(m[n:] == 0)
            block = tuple(ids[:n].tolist()) + (int(tgt[n - 1]),)
            assert block in blocks
            if len(seen) < ds.num_blocks:
                seen.add(block)
    assert seen == blocks  # one epoch visits every block once
    # The next epoch visits the blocks again, in another order.
    epoch0 = [ds.example(i, seed=6)["input_ids"] for i in range(ds.num_blocks)]
    epoch1 = [ds.example(i + ds.num_blocks, seed=6)["input_ids"] for i in range(ds.num_blocks)]
    assert sorted(map(tuple, epoch0)) == sorted(map(tuple, epoch1))
    assert not all(np.array_equal(a, b) for a, b in zip(epoch0, epoch1))


def test_seq2seq_targets_reverse_the_source(synthetic):
    tok = synthetic.bpe
    cfg = Seq2SeqDataConfig(max_source_len=20, min_source_len=3)
    ds = Seq2SeqDataset.from_tokenizer(synthetic.corpus, tok, cfg)
    stream = _as_text(tokenize_corpus(synthetic.corpus, tok).ids)
    batch = ds.batch(0, 64, seed=8)
    chex.assert_shape(batch["src_ids"], (64, 20))
    chex.assert_shape([batch["tgt_in"], batch["tgt_out"], batch["tgt_mask"]], (64, 21))
    lengths = batch["src_mask"].sum(1)
    assert lengths.min() >= 3 and lengths.max() <= 20 and len(set(lengths)) > 5
    for row, n in enumerate(lengths):
        src, tin, tout = (batch[k][row] for k in ("src_ids", "tgt_in", "tgt_out"))
        assert _as_text(src[:n]) in stream
        assert np.array_equal(tout[:n], src[:n][::-1]) and tout[n] == tok.eos_id
        assert tin[0] == tok.bos_id and np.array_equal(tin[1:n + 1], tout[:n])
        assert np.array_equal(batch["tgt_mask"][row], np.arange(21) < n + 1)
        assert np.array_equal(batch["src_mask"][row], np.arange(20) < n)


# -- determinism, resume, sharding, validation ------------------------------------

@pytest.fixture(params=["bert", "gpt", "seq2seq"])
def any_dataset(request, synthetic, bert_data):
    if request.param == "bert":
        return _bert(synthetic, bert_data, max_len=32, max_predictions_per_seq=5)
    if request.param == "gpt":
        return GPTDataset.from_tokenizer(synthetic.corpus, synthetic.bpe, GPTDataConfig(32))
    return Seq2SeqDataset.from_tokenizer(synthetic.corpus, synthetic.bpe, Seq2SeqDataConfig(16))


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_same_seed_same_batch_and_different_seed_differs(any_dataset):
    a = any_dataset.batch(7, 8, seed=11)
    chex.assert_trees_all_equal(a, any_dataset.batch(7, 8, seed=11))
    assert not _equal(a, any_dataset.batch(7, 8, seed=12))
    assert not _equal(a, any_dataset.batch(8, 8, seed=11))


def test_iterator_resume_matches_uninterrupted_run(any_dataset):
    straight = BatchIterator(any_dataset, batch_size=4, seed=21)
    expected = [next(straight) for _ in range(6)]
    first = BatchIterator(any_dataset, batch_size=4, seed=21)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.state()))  # as stored in a checkpoint
    resumed = BatchIterator(any_dataset, batch_size=4, seed=0).restore(state)
    assert state["step"] == 3 and not _equal(expected[2], expected[3])
    for want in expected[3:]:
        chex.assert_trees_all_equal(next(resumed), want)
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(any_dataset, batch_size=8).restore(state)


def test_process_slices_concatenate_to_the_global_batch(any_dataset):
    full = any_dataset.batch(5, 12, seed=3)
    parts = [any_dataset.batch(5, 12, seed=3, process_index=p, process_count=3)
             for p in range(3)]
    chex.assert_trees_all_equal(full, {k: np.concatenate([p[k] for p in parts]) for k in full})
    with pytest.raises(ValueError, match="process_count"):
        any_dataset.batch(0, 10, process_index=0, process_count=3)


def test_shard_batch_reshapes_and_rejects_indivisible():
    rng = np.random.default_rng(0)
    batch = {"x": rng.integers(1, 100, size=(12, 5)), "y": rng.random(12)}
    sharded = shard_batch(batch, 4)
    chex.assert_shape(sharded["x"], (4, 3, 5))
    chex.assert_shape(sharded["y"], (4, 3))
    assert np.array_equal(sharded["x"][2, 1], batch["x"][7])
    with pytest.raises(ValueError, match="num_devices=5"):
        shard_batch(batch, 5)


def test_validate_token_ids_names_field_value_position():
    rng = np.random.default_rng(7)
    for _ in range(5):
        vocab = int(rng.integers(10, 1000))
        ids = rng.integers(0, vocab, size=(4, 16))
        validate_token_ids(ids, vocab)
        r, c = int(rng.integers(4)), int(rng.integers(16))
        bad = int(rng.choice([vocab, vocab + int(rng.integers(1, 50)), -int(rng.integers(1, 9))]))
        ids[r, c] = bad
        with pytest.raises(ValueError) as err:
            validate_token_ids(ids, vocab, field="tgt_in")
        msg = str(err.value)
        assert "tgt_in" in msg and str(bad) in msg and f"({r}, {c})" in msg
        assert f"[0, {vocab})" in msg
    with pytest.raises(ValueError, match="integer"):
        validate_token_ids(np.ones(3) * 0.5, 10)


def test_both_id_boundaries_name_the_same_first_bad_id():
    """The data boundary (validate_token_ids) and the model boundary
    (embeddings.check_ids) share one range check: both name the first bad id in
    row-major order, found here by a plain loop, each in its own wording."""
    from transformer_jax.embeddings import check_ids
    rng = np.random.default_rng(11)
    for shape in [(7,), (3, 5), (2, 3, 4)]:
        vocab = int(rng.integers(5, 50))
        ids = rng.integers(0, vocab, size=shape)
        for _ in range(3):
            ids[tuple(int(rng.integers(n)) for n in shape)] = rng.choice([-1, vocab, vocab + 3])
        bad = [i for i in np.ndindex(shape) if not 0 <= ids[i] < vocab]
        first = bad[0]
        pos = first[0] if len(shape) == 1 else first
        with pytest.raises(ValueError, match=re.escape(
                f"token id {ids[first]} at position {pos} outside the valid range [0, {vocab}) "
                f"({len(bad)} bad id(s) in total)")):
            validate_token_ids(ids, vocab)
        with pytest.raises(ValueError, match=re.escape(
                f"input_ids must be in [0, {vocab}) (vocab_size={vocab}); got {ids[first]} at "
                f"index {first} (min {ids.min()}, max {ids.max()})")):
            check_ids("input_ids", ids, vocab, f"vocab_size={vocab}")
        check_ids("input_ids", np.clip(ids, 0, vocab - 1), vocab, "")  # in range: no error


def test_from_tokenizer_takes_text_or_tokens_and_defaults_the_config(synthetic, bert_data):
    """One `from_tokenizer` serves every dataset: raw text is tokenized, a
    TokenizedCorpus is used as it is, and config None means the class's defaults."""
    from_text = BertDataset.from_tokenizer(synthetic.corpus, synthetic.wordpiece)
    from_tokens = BertDataset.from_tokenizer(bert_data, synthetic.wordpiece, None, 500)
    assert from_tokens.data is bert_data and from_tokens.model_vocab_size == 500
    np.testing.assert_array_equal(from_text.data.ids, bert_data.ids)
    assert from_text.config == BertDataConfig() and from_text.model_vocab_size == 400
    chex.assert_trees_all_equal(from_text.batch(2, 4, seed=1), from_tokens.batch(2, 4, seed=1))
    for cls, config_cls in ((GPTDataset, GPTDataConfig), (Seq2SeqDataset, Seq2SeqDataConfig)):
        ds = cls.from_tokenizer(synthetic.corpus, synthetic.bpe)
        assert type(ds) is cls and ds.config == config_cls()


def test_datasets_reject_ids_beyond_model_vocab(synthetic, bert_data):
    too_small = int(bert_data.ids.max())  # the largest id in the data is then invalid
    with pytest.raises(ValueError, match=r"token ids.*\[0, %d\)" % too_small):
        BertDataset(bert_data, synthetic.wordpiece.vocab_info(), model_vocab_size=too_small)
    rng = np.random.default_rng(3)
    docs = [[list(rng.integers(1, 50, size=int(rng.integers(3, 9)))) for _ in range(4)]
            for _ in range(3)]
    docs[1][2][1] = 77
    data = TokenizedCorpus.from_documents(docs)
    vocab = synthetic.bpe.vocab_info()
    ok = GPTDataset(data, vocab, GPTDataConfig(8))  # fits the tokenizer's 400 ids
    assert ok.batch(0, 2)["input_ids"].shape == (2, 8)
    with pytest.raises(ValueError, match="77"):
        GPTDataset(data, vocab, GPTDataConfig(8), model_vocab_size=60)


def test_make_datasets_trains_on_the_training_split(synthetic, tmp_path):
    tok, train, valid = make_datasets("mlm", synthetic.corpus, BertDataConfig(max_len=32),
                                      vocab_size=300, validation_fraction=0.25,
                                      cache_dir=tmp_path)
    assert tok.kind == "wordpiece" and tok.vocab_size == 300
    assert (train.data.num_documents, valid.data.num_documents) == (18, 6)
    assert valid.batch(0, 4)["input_ids"].shape == (4, 32)
    with pytest.raises(ValueError, match="task='t5'"):
        make_datasets("t5", synthetic.corpus)


def test_make_datasets_old_family_names_warn_and_give_the_same_data(synthetic, tmp_path):
    # "bert"/"gpt" were the data pipeline's names before it was keyed by task.
    new = make_datasets("lm", synthetic.corpus, GPTDataConfig(16), vocab_size=300, cache_dir=tmp_path)
    with pytest.warns(DeprecationWarning, match="'gpt'.*'lm'"):
        old = make_datasets("gpt", synthetic.corpus, GPTDataConfig(16), vocab_size=300,
                            cache_dir=tmp_path)
    chex.assert_trees_all_equal(new[1].batch(3, 4, seed=1), old[1].batch(3, 4, seed=1))
