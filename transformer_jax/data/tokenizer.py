"""Tokenizers trained locally with HF ``tokenizers``, cached on disk, wrapped.

* WordPiece for BERT (Devlin et al., 2018, arXiv 1810.04805; Wu et al., 2016,
  arXiv 1609.08144): BertNormalizer (lowercase), BertPreTokenizer, ``##``
  continuation prefix, special tokens [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4.
* Byte-level BPE for GPT (Radford et al., 2019, "Language Models are
  Unsupervised Multitask Learners"; Sennrich et al., 2016, arXiv 1508.07909):
  ByteLevel pre-tokenizer/decoder, ``<|endoftext|>``=0 as EOS.

Trained tokenizers are cached under ``cache_dir`` (default
``$TRANSFORMER_JAX_CACHE/tokenizers`` or ``~/.cache/transformer_jax/tokenizers``)
keyed by a hash of the corpus content and every training setting.

The rest of the package talks only to :class:`Tokenizer`, never to HF objects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Sequence

import tokenizers as hf
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from transformer_jax.data.corpus import Corpus
from transformer_jax.data.wordpiece import train_wordpiece_vocab

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
BERT_SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)  # order fixes [PAD]=0 ... [MASK]=4
EOS = "<|endoftext|>"
KINDS = ("wordpiece", "bpe")
# Bump when training code changes in a way that changes the vocabulary.
_CACHE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class VocabInfo:
    """What batch builders need to know about a vocabulary, without HF types.

    Attributes:
      size: every id the tokenizer produces lies in [0, size).
      pad_id: id used for padding (BPE has no [PAD]; it pads with EOS and relies
        on masks).
      cls_id, sep_id, mask_id: BERT specials, None for tokenizers without them.
      eos_id, bos_id: end/start of sequence; BOS is [CLS] for WordPiece and
        ``<|endoftext|>`` for BPE (GPT-2 uses one token for both).
      special_ids: ids never used as random MLM replacements.
    """

    size: int
    pad_id: int
    cls_id: int | None = None
    sep_id: int | None = None
    mask_id: int | None = None
    eos_id: int | None = None
    bos_id: int | None = None
    special_ids: tuple[int, ...] = ()


class Tokenizer:
    """Thin wrapper around ``tokenizers.Tokenizer``; ``kind`` is "wordpiece" or "bpe"."""

    def __init__(self, hf_tokenizer: hf.Tokenizer, path: str | None = None):
        self._tok = hf_tokenizer
        self.kind = type(hf_tokenizer.model).__name__.lower()
        self.path = path  # file it was loaded from; None when built in memory

    # -- special tokens -------------------------------------------------------
    @property
    def backend(self) -> hf.Tokenizer:
        """The wrapped Hugging Face `tokenizers.Tokenizer` (e.g. to save as tokenizer.json)."""
        return self._tok

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def unk_id(self) -> int | None:
        return self.token_to_id(UNK)

    @property
    def cls_id(self) -> int | None:
        return self.token_to_id(CLS)

    @property
    def sep_id(self) -> int | None:
        return self.token_to_id(SEP)

    @property
    def mask_id(self) -> int | None:
        return self.token_to_id(MASK)

    @property
    def eos_id(self) -> int | None:
        eos = self.token_to_id(EOS)
        return self.sep_id if eos is None else eos

    @property
    def bos_id(self) -> int | None:
        return self.cls_id if self.cls_id is not None else self.token_to_id(EOS)

    @property
    def pad_id(self) -> int:
        pad = self.token_to_id(PAD)
        pad = self.eos_id if pad is None else pad
        if pad is None:
            raise ValueError(f"tokenizer {self.path!r} has neither {PAD} nor {EOS}; "
                             "one of them is needed for padding")
        return pad

    @property
    def special_ids(self) -> tuple[int, ...]:
        names = BERT_SPECIAL_TOKENS + (EOS,)
        return tuple(sorted({i for i in map(self.token_to_id, names) if i is not None}))

    def vocab_info(self) -> VocabInfo:
        """Size and special ids, all that the batch builders need."""
        return VocabInfo(size=self.vocab_size, pad_id=self.pad_id, cls_id=self.cls_id,
                         sep_id=self.sep_id, mask_id=self.mask_id, eos_id=self.eos_id,
                         bos_id=self.bos_id, special_ids=self.special_ids)

    # -- encoding -------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (a list of n ints) without any special tokens added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_word_ids(self, text: str) -> tuple[list[int], list[int]]:
        """(ids, word_ids): tokens with equal word id come from one pre-token word;
        whole-word masking groups by it (Devlin et al., 2019 update of 1810.04805)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, [-1 if w is None else w for w in enc.word_ids]

    def encode_batch_with_word_ids(self, texts: Sequence[str]
                                   ) -> list[tuple[list[int], list[int]]]:
        """Like :meth:`encode_with_word_ids` for many texts, encoded in parallel."""
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [(e.ids, [-1 if w is None else w for w in e.word_ids]) for e in encs]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Like :meth:`encode` for many texts, encoded in parallel."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_words_batch(self, sentences: Sequence[Sequence[str]]
                           ) -> list[tuple[list[int], list[int]]]:
        """(ids, word_ids) of sentences already split into words (token
        classification): token k comes from word ``word_ids[k]``, an index into its
        sentence, and the words' tokens are in order. The pre-tokenizer may still
        split a word ("os.path" -> os . path: one word id). A word the normalizer
        erases (a zero-width space, a control character) becomes [UNK], so that every
        word has a first sub-token to carry its label."""
        encs = self._tok.encode_batch([list(s) for s in sentences], is_pretokenized=True,
                                      add_special_tokens=False)
        return [self._every_word(words, enc) for words, enc in zip(sentences, encs)]

    def _every_word(self, words: Sequence[str], enc) -> tuple[list[int], list[int]]:
        pieces: dict[int, list[int]] = {}
        for token_id, w in zip(enc.ids, enc.word_ids):
            pieces.setdefault(w, []).append(token_id)
        ids, word_ids = [], []
        for w, word in enumerate(words):
            if w not in pieces and self.unk_id is None:
                raise ValueError(f"word {word!r} encodes to no token and the tokenizer has "
                                 f"no {UNK} to stand for it")
            got = pieces.get(w, [self.unk_id])
            ids += got
            word_ids += [w] * len(got)
        return ids, word_ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids (a sequence or 1-D array `[n]`)."""
        return self._tok.decode([int(i) for i in ids],
                                skip_special_tokens=skip_special_tokens)

    # -- persistence ----------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (and ``vocab.txt`` for WordPiece); returns the json path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "tokenizer.json"
        _atomic_write(path, self._tok.to_str(pretty=True))
        if self.kind == "wordpiece":
            vocab = sorted(self._tok.get_vocab().items(), key=lambda kv: kv[1])
            _atomic_write(directory / "vocab.txt", "".join(t + "\n" for t, _ in vocab))
        return path

    @classmethod
    def from_file(cls, path: str | os.PathLike, lowercase: bool = True) -> "Tokenizer":
        """Load ``tokenizer.json``, a BERT ``vocab.txt``, or a directory with either.

        ``lowercase`` only applies to ``vocab.txt`` (False for cased BERT vocabs).
        """
        path = Path(path)
        if path.is_dir():
            for name in ("tokenizer.json", "vocab.txt"):
                if (path / name).is_file():
                    return cls.from_file(path / name, lowercase=lowercase)
            raise ValueError(f"tokenizer directory {str(path)!r} has neither "
                             "tokenizer.json nor vocab.txt")
        if not path.is_file():
            raise ValueError(f"tokenizer path {str(path)!r} does not exist")
        try:
            return cls._from_file(path, lowercase)
        except ValueError:
            raise
        except Exception as e:   # tokenizers raises a bare Exception (its Rust error text)
            raise ValueError(f"tokenizer file {str(path)!r} is damaged or not a tokenizer "
                             f"({type(e).__name__}: {e})") from None

    @classmethod
    def _from_file(cls, path: Path, lowercase: bool) -> "Tokenizer":
        if path.suffix == ".txt":
            vocab = models.WordPiece.read_file(str(path))
            if UNK not in vocab:
                raise ValueError(f"vocab file {str(path)!r} has no {UNK} token; "
                                 "a WordPiece vocab needs one")
            return cls(_bert_pipeline(models.WordPiece(vocab, unk_token=UNK), lowercase),
                       path=str(path))
        return cls(hf.Tokenizer.from_file(str(path)), path=str(path))

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, path={self.path!r})"


def _bert_pipeline(model, lowercase: bool) -> hf.Tokenizer:
    tok = hf.Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _atomic_write(path: Path, text: str) -> None:
    # Write-then-rename so concurrent processes never read a half-written file. The
    # temporary name is unique and opened with open(), not mkstemp (mode 0600): the
    # file gets the umask's permissions, as every other file of a run directory does.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "x", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def default_cache_dir() -> Path:
    """``$TRANSFORMER_JAX_CACHE/tokenizers``, else ``~/.cache/transformer_jax/tokenizers``."""
    root = os.environ.get("TRANSFORMER_JAX_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "transformer_jax"
    return base / "tokenizers"


def _train_hf(corpus: Corpus, kind: str, vocab_size: int, min_frequency: int,
              lowercase: bool) -> hf.Tokenizer:
    if kind == "wordpiece":
        vocab = train_wordpiece_vocab(corpus.segments(), vocab_size, min_frequency,
                                      BERT_SPECIAL_TOKENS, lowercase)
        return _bert_pipeline(models.WordPiece(vocab, unk_token=UNK), lowercase)
    tok = hf.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus.segments(), trainer)
    return tok


def train_tokenizer(corpus: Corpus, kind: str = "wordpiece", vocab_size: int = 4000,
                    min_frequency: int = 2, lowercase: bool = True,
                    cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """Train (or load from cache) a tokenizer on ``corpus``.

    Args:
      kind: "wordpiece" (BERT) or "bpe" (byte-level, GPT).
      vocab_size: target size including specials; small (2k-8k) trains in seconds.
      min_frequency: a merge must occur this often to enter the vocabulary.
      lowercase: WordPiece only (uncased BERT).
      cache_dir: overrides the env/default cache location.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not a tokenizer kind; valid: {KINDS}")
    floor = 300 if kind == "bpe" else len(BERT_SPECIAL_TOKENS) + 1
    if not isinstance(vocab_size, int) or vocab_size < floor:
        # Byte-level BPE starts from 256 byte symbols plus EOS.
        raise ValueError(f"vocab_size={vocab_size!r} for kind={kind!r} must be an int >= {floor}")
    settings = {"format": _CACHE_FORMAT, "kind": kind, "vocab_size": vocab_size,
                "min_frequency": min_frequency, "lowercase": lowercase and kind == "wordpiece",
                "corpus": corpus.fingerprint, "tokenizers": hf.__version__}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directory = directory / f"{kind}-{vocab_size}-{key}"
    path = directory / "tokenizer.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(path)
        except ValueError:   # a damaged cache entry is retrained, as a missing one is
            pass
    tok = Tokenizer(_train_hf(corpus, kind, vocab_size, min_frequency, lowercase))
    tok.save(directory)
    _atomic_write(directory / "settings.json", json.dumps(settings, indent=1, sort_keys=True))
    tok.path = str(path)
    return tok


def train_wordpiece(corpus: Corpus, vocab_size: int = 4000, **kwargs) -> Tokenizer:
    """WordPiece tokenizer for BERT; see :func:`train_tokenizer`."""
    return train_tokenizer(corpus, "wordpiece", vocab_size, **kwargs)


def train_bpe(corpus: Corpus, vocab_size: int = 4000, **kwargs) -> Tokenizer:
    """Byte-level BPE tokenizer for GPT; see :func:`train_tokenizer`."""
    return train_tokenizer(corpus, "bpe", vocab_size, **kwargs)
