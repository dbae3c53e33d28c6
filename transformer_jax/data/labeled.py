"""Labeled data for fine-tuning BERT: sequence classification and token tagging.

Files are JSON Lines (``.jsonl`` / ``.json``, one object a line) or CSV with a
header (``.csv``). Fields by task:

* ``classify``: ``text`` [, ``text_pair``], ``label`` (a string or an int);
* ``tag``: ``tokens`` (the words) and ``tags`` (one BIO tag per word: ``O``,
  ``B-TYPE``, ``I-TYPE``); in CSV both are whitespace-separated strings.

Encoding follows Devlin et al. 2018 (arXiv 1810.04805, sec. 4 and fig. 4):
``[CLS] text [SEP]`` or ``[CLS] text [SEP] text_pair [SEP]`` with token_type_ids
0 up to the first [SEP] and 1 after it; a tagged word's label sits on its FIRST
word piece, the other pieces and the specials are ignored (``tag_ids`` =
``IGNORE_INDEX`` and ``tag_weights`` 0, the convention of HF's ``run_ner.py``).

The label set comes from the training file only (`LabelSet.from_examples`), so
an eval label the model has no output for is an error, not a silent miss.
Datasets are `ExampleDataset`s: example g is a pure function of (seed, g), so
batches are deterministic in (step, seed) and resume exactly.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from transformer_jax.data.batches import ExampleDataset
from transformer_jax.data.gpt import _epoch_order
from transformer_jax.data.tokenizer import Tokenizer

TASKS = ("classify", "tag")
CLASSIFY_FIELDS = ("input_ids", "token_type_ids", "attention_mask", "labels", "label_weights")
TAG_FIELDS = ("input_ids", "token_type_ids", "attention_mask", "tag_ids", "tag_weights")
IGNORE_INDEX = -100   # tag_ids where no label is predicted (HF / PyTorch CrossEntropyLoss)
OUTSIDE = "O"         # the BIO tag of words outside every entity
_JSON_SUFFIXES, _CSV_SUFFIXES = (".jsonl", ".json"), (".csv",)


@dataclasses.dataclass(frozen=True)
class ClassifyExample:
    text: str
    text_pair: str | None
    label: str
    line: int = 0          # 1-based line of the file it came from


@dataclasses.dataclass(frozen=True)
class TagExample:
    tokens: tuple[str, ...]
    tags: tuple[str, ...]
    line: int = 0


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task={task!r} has no labeled data format; valid: {', '.join(TASKS)}")


# -- reading -------------------------------------------------------------------

def read_rows(path: Path, name: str | None = None):
    """(line, record) pairs of a UTF-8 JSON Lines or CSV file; ValueError naming the
    file and line of a row that is not a JSON object, or of a byte that is not UTF-8.
    Errors call the file `name` (default: its path), e.g. "--data 'train.jsonl'"."""
    path = Path(path)
    name = name or str(path)
    suffix = path.suffix.lower()
    if suffix not in _JSON_SUFFIXES + _CSV_SUFFIXES:
        raise ValueError(f"{name}: unknown file type {suffix!r}; valid: "
                         f"{', '.join(_JSON_SUFFIXES + _CSV_SUFFIXES)}")
    if not path.is_file():
        raise ValueError(f"{name}: no such file")
    with io.StringIO(_utf8_text(path, name), newline="") as f:
        if suffix in _CSV_SUFFIXES:
            reader = csv.DictReader(f)
            return [(reader.line_num, row) for row in reader]
        rows = []
        for line, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                hint = " (the file must hold one JSON object a line, not an array)" \
                    if raw.lstrip().startswith("[") else ""
                raise ValueError(f"{name}:{line}: not valid JSON: {e.msg}{hint}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{name}:{line}: expected a JSON object, got "
                                 f"{type(record).__name__}")
            rows.append((line, record))
        return rows


def _utf8_text(path: Path, name: str) -> str:
    """The file's text; ValueError naming the line and byte of the first byte that is
    not UTF-8 (the decoder's own message names neither the file nor the line)."""
    data = path.read_bytes()
    try:   # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the header
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{name}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); "
                         "save the file as UTF-8") from None


def _field(path, line, record, name, kinds, optional=False):
    names = " or ".join(k.__name__ for k in kinds)
    if record.get(name) is None:
        if optional:
            return None
        if name in record:   # JSON null, or a CSV row with fewer cells than the header
            raise ValueError(f"{path}:{line}: field {name!r} is empty (null); give a {names}")
        raise ValueError(f"{path}:{line}: field {name!r} is missing; the record has "
                         f"{sorted(k for k in record if isinstance(k, str))}")
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"{path}:{line}: field {name!r} must be {names}, got "
                         f"{type(value).__name__} {value!r:.60}")
    return value


def words_field(path, line, record, name, csv_file: bool) -> tuple[str, ...]:
    """Field `name` of a tag record as its words: a list of non-empty strings (in a CSV
    file, one whitespace-separated string); ValueError naming `path`, `line` and the field."""
    value = _field(path, line, record, name, (str,) if csv_file else (list,))
    words = value.split() if csv_file else value
    for i, w in enumerate(words):
        if not isinstance(w, str) or not w.strip():
            raise ValueError(f"{path}:{line}: field {name!r} item {i} is {w!r}; "
                             "every item must be a non-empty string")
    if not words:
        raise ValueError(f"{path}:{line}: field {name!r} is empty; give at least one word")
    return tuple(words)


def _check_bio(path, line, tags) -> None:
    for i, tag in enumerate(tags):
        if tag != OUTSIDE and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
            raise ValueError(f"{path}:{line}: field 'tags' item {i} is {tag!r}; BIO tags are "
                             f"{OUTSIDE!r}, 'B-TYPE' or 'I-TYPE'")


def _classify_example(path, line, record, csv_file) -> ClassifyExample:
    text = _field(path, line, record, "text", (str,))
    pair = _field(path, line, record, "text_pair", (str,), optional=True)
    if csv_file and pair == "":
        pair = None   # an empty CSV cell: no second segment
    label = _field(path, line, record, "label", (str, int))
    if str(label).strip() == "":
        raise ValueError(f"{path}:{line}: field 'label' is empty")
    return ClassifyExample(text, pair, str(label), line)


def _tag_example(path, line, record, csv_file) -> TagExample:
    tokens = words_field(path, line, record, "tokens", csv_file)
    tags = words_field(path, line, record, "tags", csv_file)
    if len(tags) != len(tokens):
        raise ValueError(f"{path}:{line}: field 'tags' has {len(tags)} tags for "
                         f"{len(tokens)} tokens; give one tag per token")
    _check_bio(path, line, tags)
    return TagExample(tokens, tags, line)


def read_labeled(path: str | os.PathLike, task: str, name: str | None = None) -> list:
    """The examples of one file (`ClassifyExample`s or `TagExample`s, in file
    order); ValueError naming the file (as `name`, default its path), line and field
    of the first bad record."""
    _check_task(task)
    path = Path(path)
    name = name or str(path)
    csv_file = path.suffix.lower() in _CSV_SUFFIXES
    make = _classify_example if task == "classify" else _tag_example
    examples = [make(name, line, record, csv_file) for line, record in read_rows(path, name)]
    if not examples:
        raise ValueError(f"{name}: the file holds no examples")
    return examples


# -- label sets ----------------------------------------------------------------

def _label_of(example) -> tuple[str, ...]:
    return (example.label,) if isinstance(example, ClassifyExample) else example.tags


@dataclasses.dataclass(frozen=True)
class LabelSet:
    """The output classes of a fine-tuned head: `names[i]` is logit i's label.

    classify: the training labels, sorted (numerically when all are integers).
    tag: "O" first, then B-T and I-T of every entity type T seen in training,
    types sorted, so that a dev file may continue an entity the training file
    only ever began."""
    task: str
    names: tuple[str, ...]

    def __post_init__(self):
        _check_task(self.task)
        object.__setattr__(self, "names", tuple(self.names))
        if not all(isinstance(n, str) and n for n in self.names):
            raise ValueError(f"labels {self.names!r} must be non-empty strings")
        if len(set(self.names)) != len(self.names) or len(self.names) < 2:
            raise ValueError(f"labels {self.names!r} must be at least 2 distinct names")
        if self.task == "tag":
            if self.names[0] != OUTSIDE:
                raise ValueError(f"tag labels {self.names!r} must start with {OUTSIDE!r}")
            _check_bio("labels", 0, self.names)

    @classmethod
    def from_examples(cls, task: str, examples: Sequence, source: str = "training data"
                      ) -> "LabelSet":
        """The label set of training `examples`; ValueError if it has one class."""
        seen = {name for e in examples for name in _label_of(e)}
        if task == "classify":
            if len(seen) < 2:
                raise ValueError(f"{source}: field 'label' has a single class {sorted(seen)}; "
                                 "a classifier needs at least 2")
            numeric = all(n.lstrip("-").isdigit() for n in seen)
            return cls(task, tuple(sorted(seen, key=int if numeric else str)))
        types = sorted({name[2:] for name in seen if name != OUTSIDE})
        if not types:
            raise ValueError(f"{source}: field 'tags' is {OUTSIDE!r} everywhere; the "
                             "tagger needs at least one B-TYPE entity")
        return cls(task, (OUTSIDE,) + tuple(f"{p}-{t}" for t in types for p in "BI"))

    def __len__(self) -> int:
        return len(self.names)

    def ids(self, names: Sequence[str]) -> np.ndarray:
        """int32 indices of `names`."""
        index = {n: i for i, n in enumerate(self.names)}
        return np.array([index[n] for n in names], np.int32)

    def check(self, examples: Sequence, source: str) -> None:
        """ValueError naming the line of the first label outside this set."""
        known = set(self.names)
        for e in examples:
            unknown = [n for n in _label_of(e) if n not in known]
            if unknown:
                field = "label" if self.task == "classify" else "tags"
                raise ValueError(f"{source}:{e.line}: field {field!r} has {unknown[0]!r}, "
                                 f"which is not a training label; known: {list(self.names)}")

    def to_dict(self) -> dict:
        return {"task": self.task, "labels": list(self.names)}

    @classmethod
    def from_dict(cls, d: dict) -> "LabelSet":
        if not isinstance(d, dict) or "task" not in d or "labels" not in d:
            raise ValueError(f"label set {d!r:.100} must be a dict with 'task' and 'labels'")
        return cls(d["task"], tuple(d["labels"]))

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``{"task": ..., "labels": [...]}`` as JSON; returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LabelSet":
        """`save`'s file; ValueError naming it if it is damaged (not UTF-8 JSON, or not
        a label set)."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (UnicodeDecodeError, ValueError) as e:   # JSONDecodeError is a ValueError
            raise ValueError(f"label file {str(path)!r} is damaged ({e}); it holds "
                             '{"task": ..., "labels": [...]} as the run wrote it') from None


# -- encoding ------------------------------------------------------------------

def _check_tokenizer(tokenizer: Tokenizer, max_len: int) -> None:
    if tokenizer.cls_id is None or tokenizer.sep_id is None:
        raise ValueError(f"{tokenizer!r} has no [CLS]/[SEP]; BERT fine-tuning needs a "
                         "WordPiece tokenizer")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 3:
        raise ValueError(f"max_len={max_len!r} must be an int >= 3 ([CLS], a token, [SEP])")


def _truncate_pair(a: list, b: list, budget: int) -> tuple[list, list]:
    # HF tokenizers' "longest_first" (BERT's default): the shorter segment stays
    # whole if it fits in half the budget, else each gets half, the longer one
    # (text_pair on a tie) the odd token.
    if len(a) + len(b) <= budget:
        return list(a), list(b)
    swap = len(a) > len(b)
    short = len(b) if swap else len(a)
    if 2 * short > budget:
        keep_short, keep_long = budget // 2, budget - budget // 2
    else:
        keep_short, keep_long = short, budget - short
    keep_a, keep_b = (keep_long, keep_short) if swap else (keep_short, keep_long)
    return list(a[:keep_a]), list(b[:keep_b])


def encode_pairs(tokenizer: Tokenizer, texts: Sequence[str],
                 pairs: Sequence[str | None] | None, max_len: int
                 ) -> tuple[dict[str, np.ndarray], int]:
    """(arrays, number of examples truncated): input_ids, token_type_ids int32 and
    attention_mask bool, each `[N, max_len]`, of ``[CLS] text [SEP] (text_pair
    [SEP])``, right-padded, longest-first truncated."""
    _check_tokenizer(tokenizer, max_len)
    pairs = [None] * len(texts) if pairs is None else list(pairs)
    if len(pairs) != len(texts):
        raise ValueError(f"{len(pairs)} text pairs for {len(texts)} texts; give one each")
    ids_a = tokenizer.encode_batch(texts)
    ids_b = tokenizer.encode_batch([p or "" for p in pairs])
    n = len(texts)
    out = {"input_ids": np.full((n, max_len), tokenizer.pad_id, np.int32),
           "token_type_ids": np.zeros((n, max_len), np.int32),
           "attention_mask": np.zeros((n, max_len), bool)}
    cls, sep = tokenizer.cls_id, tokenizer.sep_id
    truncated = sum(len(a) + len(b) + (2 if p is None else 3) > max_len
                    for a, b, p in zip(ids_a, ids_b, pairs))
    for i, (a, b, pair) in enumerate(zip(ids_a, ids_b, pairs)):
        if pair is None:
            row, types = [cls] + a[:max_len - 2] + [sep], []
        else:
            a, b = _truncate_pair(a, b, max_len - 3)
            row, types = [cls] + a + [sep], [1] * (len(b) + 1)
            row = row + b + [sep]
        out["input_ids"][i, :len(row)] = row
        out["token_type_ids"][i, len(row) - len(types):len(row)] = types
        out["attention_mask"][i, :len(row)] = True
    return out, truncated


def encode_words(tokenizer: Tokenizer, sentences: Sequence[Sequence[str]], max_len: int
                 ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(arrays, word_index): input_ids, token_type_ids (0) int32 and attention_mask
    bool `[N, max_len]` of ``[CLS] pieces [SEP]``, and word_index int32 `[N, max_len]`:
    the word whose FIRST piece sits at a position, -1 elsewhere (later pieces,
    specials, padding). Pieces past max_len - 2 are cut, so a word whose first
    piece is cut appears nowhere in word_index."""
    _check_tokenizer(tokenizer, max_len)
    n = len(sentences)
    out = {"input_ids": np.full((n, max_len), tokenizer.pad_id, np.int32),
           "token_type_ids": np.zeros((n, max_len), np.int32),
           "attention_mask": np.zeros((n, max_len), bool)}
    word_index = np.full((n, max_len), -1, np.int32)
    for i, (ids, word_ids) in enumerate(tokenizer.encode_words_batch(sentences)):
        ids, word_ids = ids[:max_len - 2], np.asarray(word_ids[:max_len - 2], np.int64)
        row = [tokenizer.cls_id] + list(ids) + [tokenizer.sep_id]
        out["input_ids"][i, :len(row)] = row
        out["attention_mask"][i, :len(row)] = True
        first = np.concatenate([[True], word_ids[1:] != word_ids[:-1]]) if len(ids) else []
        word_index[i, 1:1 + len(ids)] = np.where(first, word_ids, -1)
    return out, word_index


def kept_words(word_index: np.ndarray) -> list[np.ndarray]:
    """Per row, the position of each word's first piece (in word order): the words
    that survived truncation are ``0 .. len(result[i]) - 1``."""
    return [np.flatnonzero(row >= 0) for row in word_index]


# -- datasets ------------------------------------------------------------------

class LabeledDataset(ExampleDataset):
    """Pre-encoded rows `[N, max_len]` served as examples.

    shuffle=True (training): example g is row ``order(seed, epoch)[g mod N]``, a
    fresh permutation every epoch. shuffle=False (evaluation): example g < N is row
    g and later ones are copies of row 0 with weight 0, so `num_batches(B)` batches
    cover every example exactly once whatever B, and the weighted metric means of
    `training.step.mean_metrics` count each example once."""

    weight_field: str

    def __init__(self, arrays: dict[str, np.ndarray], labels: LabelSet, *, shuffle: bool,
                 model_vocab_size: int, truncated: int = 0):
        self.arrays, self.labels, self.shuffle = arrays, labels, shuffle
        self.model_vocab_size = model_vocab_size
        self.truncated = truncated    # examples (classify) / words (tag) cut by max_len
        self.max_len = arrays["input_ids"].shape[1]

    def __len__(self) -> int:
        return int(self.arrays["input_ids"].shape[0])

    def num_batches(self, batch_size: int) -> int:
        """Batches of `batch_size` that hold every example once (shuffle=False)."""
        return -(-len(self) // batch_size)

    def example(self, index: int, seed: int = 0) -> dict[str, np.ndarray]:
        n = len(self)
        if self.shuffle:
            epoch, within = divmod(index, n)
            row = int(_epoch_order(n, seed, epoch)[within])
        else:
            row = index if index < n else 0
        out = {k: v[row] for k, v in self.arrays.items()}
        if not self.shuffle and index >= n:
            out[self.weight_field] = np.zeros_like(out[self.weight_field])
        return out


class ClassifyDataset(LabeledDataset):
    """Batches: input_ids, token_type_ids int32 `[B, L]`, attention_mask bool `[B, L]`,
    labels int32 `[B]` (index into the LabelSet), label_weights float32 `[B]`
    (1, or 0 on the padding examples of a final eval batch)."""
    fields = CLASSIFY_FIELDS
    id_fields = ("input_ids",)
    weight_field = "label_weights"

    @classmethod
    def from_examples(cls, examples: Sequence[ClassifyExample], tokenizer: Tokenizer,
                      labels: LabelSet, max_len: int, *, shuffle: bool = True,
                      model_vocab_size: int | None = None) -> "ClassifyDataset":
        arrays, cut = encode_pairs(tokenizer, [e.text for e in examples],
                                   [e.text_pair for e in examples], max_len)
        arrays["labels"] = labels.ids([e.label for e in examples])
        arrays["label_weights"] = np.ones(len(examples), np.float32)
        return cls(arrays, labels, shuffle=shuffle, truncated=cut,
                   model_vocab_size=model_vocab_size or tokenizer.vocab_size)


class TagDataset(LabeledDataset):
    """Batches: input_ids, token_type_ids (0) int32 `[B, L]`, attention_mask bool
    `[B, L]`, tag_ids int32 `[B, L]` (the word's tag index on its first piece,
    IGNORE_INDEX elsewhere), tag_weights float32 `[B, L]` (1 on first pieces)."""
    fields = TAG_FIELDS
    id_fields = ("input_ids",)
    weight_field = "tag_weights"

    @classmethod
    def from_examples(cls, examples: Sequence[TagExample], tokenizer: Tokenizer,
                      labels: LabelSet, max_len: int, *, shuffle: bool = True,
                      model_vocab_size: int | None = None) -> "TagDataset":
        arrays, word_index = encode_words(tokenizer, [e.tokens for e in examples], max_len)
        tag_ids = np.full(word_index.shape, IGNORE_INDEX, np.int32)
        for i, e in enumerate(examples):
            pos = np.flatnonzero(word_index[i] >= 0)
            tag_ids[i, pos] = labels.ids(e.tags)[word_index[i, pos]]
        arrays["tag_ids"] = tag_ids
        arrays["tag_weights"] = (word_index >= 0).astype(np.float32)
        cut = sum(len(e.tokens) for e in examples) - int((word_index >= 0).sum())
        return cls(arrays, labels, shuffle=shuffle, truncated=cut,
                   model_vocab_size=model_vocab_size or tokenizer.vocab_size)


DATASET_CLASSES = {"classify": ClassifyDataset, "tag": TagDataset}


def make_labeled_datasets(task: str, train_path: str | os.PathLike,
                          eval_path: str | os.PathLike | None, tokenizer: Tokenizer,
                          max_len: int, *, labels: LabelSet | None = None,
                          model_vocab_size: int | None = None):
    """-> (train dataset (shuffled), eval dataset (in file order, or None), LabelSet).

    The label set is read from the training file unless `labels` is given (a saved
    one, to continue a run); eval labels outside it are an error."""
    train = read_labeled(train_path, task)   # checks the task
    evals = None if eval_path is None else read_labeled(eval_path, task)
    return labeled_datasets(task, train, evals, tokenizer, max_len, labels=labels,
                            model_vocab_size=model_vocab_size,
                            sources=(str(train_path), str(eval_path)))


def labeled_datasets(task: str, train: Sequence, evals: Sequence | None, tokenizer: Tokenizer,
                     max_len: int, *, labels: LabelSet | None = None,
                     model_vocab_size: int | None = None,
                     sources: tuple[str, str] = ("training data", "eval data")):
    """`make_labeled_datasets` of examples already read (`read_labeled`); `sources`
    name the training and eval files in errors."""
    _check_task(task)
    if labels is None:
        labels = LabelSet.from_examples(task, train, sources[0])
    elif labels.task != task:
        raise ValueError(f"labels are for task {labels.task!r}, not {task!r}")
    else:
        labels.check(train, sources[0])
    if evals is not None:
        labels.check(evals, sources[1])
    cls = DATASET_CLASSES[task]
    kw = dict(model_vocab_size=model_vocab_size)
    train_ds = cls.from_examples(train, tokenizer, labels, max_len, shuffle=True, **kw)
    eval_ds = None if evals is None else cls.from_examples(evals, tokenizer, labels, max_len,
                                                           shuffle=False, **kw)
    return train_ds, eval_ds, labels
