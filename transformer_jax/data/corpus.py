"""Text corpora: an embedded offline default, user text files, optional HF datasets.

A corpus is a tuple of documents; a document is a tuple of segments (sentences).
BERT's next-sentence task (Devlin et al., 2018, arXiv 1810.04805, sec. 3.1)
needs that two-level structure, GPT packing only needs document boundaries.

The default corpus is the docstrings of the Python standard library, a few MB
of English prose with no download. Each Python release edits its docstrings,
so reading the running interpreter's stdlib would give a different corpus (and
different presets, tests and reference outputs) on 3.11, 3.12 and 3.13. The
default is therefore a fixed snapshot shipped as package data,
``stdlib_docstrings.json.gz``: the corpus that ``stdlib_corpus(stdlib_dir=...)``
built from CPython 3.11.7's stdlib, checked against a content hash
(``SNAPSHOT_FINGERPRINT``) every time it is loaded. CPython's docstrings are
under the PSF License Agreement; its text ships beside the snapshot as
``stdlib_docstrings.LICENSE.txt``. To rebuild the snapshot (on Python 3.11.7):

    python -c "from transformer_jax.data.corpus import write_stdlib_snapshot as w; print(w())"

and put the printed fingerprint into ``SNAPSHOT_FINGERPRINT``. The local
stdlib (``load_corpus("stdlib:local")``) or any directory of text files
(``text_corpus``) remain available for other data. Files are visited in sorted
order, and nothing depends on hash iteration order, so the same source always
gives the same corpus.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import gzip
import hashlib
import importlib.resources
import json
import os
import re
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

Document = tuple[str, ...]

# Directories of the stdlib that hold tests, vendored third-party code or demos
# rather than documentation prose.
_SKIP_DIRS = frozenset({
    "test", "tests", "idle_test", "site-packages", "dist-packages",
    "__pycache__", "lib2to3", "turtledemo", "ensurepip", "config-3",
})
# A sentence ends at . ! or ? followed by whitespace and a capital, digit or
# opening quote/bracket; this keeps "e.g. foo" and "os.path" in one piece.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
# Doctest lines are code, not prose.
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.\s)")
_MIN_WORDS = 4           # shorter paragraphs are mostly headings like "Args:"
_MIN_LETTER_FRACTION = 0.6  # below this a paragraph is mostly code or a table
# A single text file without blank lines (one sentence a line, say) is cut into
# documents of this many lines, so that it can be split into train and validation.
LINES_PER_DOCUMENT = 10

SNAPSHOT_FILE = "stdlib_docstrings.json.gz"  # package data of transformer_jax.data
SNAPSHOT_PYTHON = "3.11.7"  # the CPython whose stdlib the snapshot was built from
# Corpus.fingerprint of the whole snapshot: its 544 documents, 1,568,966 chars.
SNAPSHOT_FINGERPRINT = "86ead9895dad25b95c7708bcea81d4a0e6e7a9ba938fc3fb1cc5ffce9fb364b5"


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Documents of segments plus a human-readable description of the source.

    Attributes:
      documents: one tuple of segments (sentences) per document, all non-empty.
      source: where the text came from, used in error messages and reprs.
    """

    documents: tuple[Document, ...]
    source: str

    def __post_init__(self):
        # Tuples make a corpus hashable and safe to share; accept any sequences.
        object.__setattr__(self, "documents",
                           tuple(tuple(str(s) for s in doc) for doc in self.documents))
        if not any(any(s.strip() for s in doc) for doc in self.documents):
            raise ValueError(
                f"corpus from {self.source!r} contains no text; give a file or a "
                "directory of non-empty .txt files, or use stdlib_corpus()")

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the content, so caches keyed by it follow the text itself."""
        h = hashlib.sha256()
        for doc in self.documents:
            h.update("\x1f".join(doc).encode("utf-8"))
            h.update(b"\x1e")
        return h.hexdigest()

    @property
    def num_documents(self) -> int:
        """Number of documents."""
        return len(self.documents)

    @property
    def num_chars(self) -> int:
        """Characters in all segments."""
        return sum(len(s) for doc in self.documents for s in doc)

    def segments(self) -> Iterable[str]:
        """All segments in document order (for tokenizer training)."""
        for doc in self.documents:
            yield from doc

    def __repr__(self) -> str:
        return (f"Corpus(source={self.source!r}, documents={self.num_documents}, "
                f"chars={self.num_chars}, fingerprint={self.fingerprint[:12]})")


def split_sentences(paragraph: str) -> list[str]:
    """Whitespace-normalise a paragraph and split it into sentences."""
    text = " ".join(paragraph.split())
    return [s for s in _SENTENCE_END.split(text) if s]


def _is_prose(paragraph: str) -> bool:
    words = paragraph.split()
    if len(words) < _MIN_WORDS:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    return letters >= _MIN_LETTER_FRACTION * len(paragraph)


def text_to_segments(text: str, prose_only: bool = False) -> list[str]:
    """Blank-line separated paragraphs -> flat list of sentences."""
    segments = []
    for paragraph in _PARAGRAPH_BREAK.split(text):
        lines = [ln for ln in paragraph.splitlines() if not _CODE_LINE.match(ln)]
        paragraph = "\n".join(lines)
        if prose_only and not _is_prose(paragraph):
            continue
        segments.extend(split_sentences(paragraph))
    return segments


def _module_docstrings(path: Path) -> list[str]:
    """Module, class and function docstrings of one source file, in source order."""
    try:
        with warnings.catch_warnings():
            # Old escape sequences in stdlib sources warn on newer Pythons.
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return []
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = [n for n in ast.walk(tree) if isinstance(n, nodes)]
    # ast.walk is breadth-first; sort by line so a module reads top to bottom.
    found.sort(key=lambda n: getattr(n, "lineno", 0))
    return [d for d in (ast.get_docstring(n) for n in found) if d]


def _stdlib_files(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place fixes the walk order on every filesystem.
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _SKIP_DIRS and not d.startswith((".", "config-")))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def _capped(documents: Iterable[list[str]], max_documents: int | None,
            max_chars: int | None) -> tuple[Document, ...]:
    """Take documents in order until either cap is reached.

    The document that crosses ``max_chars`` is cut at a segment boundary, so the
    cap is honoured without splitting a sentence (only a first sentence longer
    than the whole cap is cut, so that the result is never empty).
    """
    _check_cap("max_documents", max_documents)
    _check_cap("max_chars", max_chars)
    out: list[Document] = []
    chars, full = 0, False
    for doc in documents:
        if full or (max_documents is not None and len(out) >= max_documents):
            break
        kept = []
        for seg in doc:
            if max_chars is not None and chars + len(seg) > max_chars:
                full = True
                if chars == 0:
                    kept.append(seg[:max_chars])
                break
            kept.append(seg)
            chars += len(seg)
        if kept:
            out.append(tuple(kept))
    return tuple(out)


def _check_cap(field: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{field}={value!r} must be None (no cap) or an int >= 1")


def stdlib_corpus(max_documents: int | None = None, max_chars: int | None = None,
                  stdlib_dir: str | os.PathLike | None = None) -> Corpus:
    """The embedded default corpus: docstrings of the Python standard library.

    One module = one document; its docstrings are split into paragraphs, code
    and doctest lines are dropped, and paragraphs are split into sentences.

    Args:
      max_documents: keep at most this many modules (None = all, 544).
      max_chars: keep at most this many characters (None = all, ~1.57M).
      stdlib_dir: None reads the shipped snapshot of CPython 3.11.7's stdlib,
        identical on every Python; a directory (e.g.
        ``sysconfig.get_paths()["stdlib"]``, or one package of it) is parsed
        here instead, so its text depends on that Python's version.
    """
    if stdlib_dir is None:
        return Corpus(_capped(_snapshot_documents(), max_documents, max_chars),
                      source=f"stdlib-snapshot:python{SNAPSHOT_PYTHON}")
    root = Path(stdlib_dir)
    if not root.is_dir():
        raise ValueError(f"stdlib_dir={str(root)!r} is not a directory")
    return Corpus(_capped(_stdlib_documents(root), max_documents, max_chars),
                  source=f"stdlib:{root}")


def _stdlib_documents(root: Path) -> Iterable[list[str]]:
    for path in _stdlib_files(root):
        segments = []
        for doc in _module_docstrings(path):
            segments.extend(text_to_segments(doc, prose_only=True))
        if segments:
            yield segments


def _snapshot_path():
    return importlib.resources.files("transformer_jax.data") / SNAPSHOT_FILE


@functools.lru_cache(maxsize=1)
def _snapshot_documents() -> tuple[Document, ...]:
    """The shipped snapshot, read once per process and checked by content hash."""
    path = _snapshot_path()
    try:
        documents = json.loads(gzip.decompress(path.read_bytes()))["documents"]
        corpus = Corpus(documents, source=str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"the default corpus snapshot {str(path)!r} cannot be read "
                         f"({e}); reinstall transformer-jax, or pass a text directory "
                         "with --data / text_corpus(path)") from e
    if corpus.fingerprint != SNAPSHOT_FINGERPRINT:
        raise ValueError(
            f"the default corpus snapshot {str(path)!r} has fingerprint "
            f"{corpus.fingerprint[:12]}, expected {SNAPSHOT_FINGERPRINT[:12]}: the file "
            "is damaged or was rebuilt without updating SNAPSHOT_FINGERPRINT; "
            "reinstall transformer-jax or see the transformer_jax.data.corpus docstring")
    return corpus.documents


def write_stdlib_snapshot(path: str | os.PathLike | None = None,
                          stdlib_dir: str | os.PathLike | None = None) -> str:
    """Rebuild the snapshot from a stdlib tree; returns its fingerprint.

    Args:
      path: output file; defaults to the package's own ``SNAPSHOT_FILE``.
      stdlib_dir: defaults to this interpreter's stdlib. The shipped snapshot
        was built on Python ``SNAPSHOT_PYTHON``.
    """
    root = stdlib_dir or sysconfig.get_paths()["stdlib"]
    corpus = stdlib_corpus(stdlib_dir=root)
    blob = json.dumps({
        "about": ("Docstrings of the CPython standard library, split into sentences "
                  "by transformer_jax.data.corpus; Copyright (c) 2001-2023 Python "
                  "Software Foundation, under the PSF License Agreement "
                  "(stdlib_docstrings.LICENSE.txt)."),
        "python": sys.version.split()[0],
        "fingerprint": corpus.fingerprint,
        "documents": [list(doc) for doc in corpus.documents],
    }, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    # mtime=0 so that rebuilding the same text gives the same bytes.
    Path(path or str(_snapshot_path())).write_bytes(gzip.compress(blob, 9, mtime=0))
    return corpus.fingerprint


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*.txt") if p.is_file())
    raise ValueError(f"corpus path {str(path)!r} does not exist; give a .txt file "
                     "or a directory of .txt files, or use stdlib_corpus()")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")   # a byte-order mark is not text
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus file {str(path)!r} is not UTF-8 text ({e.reason} at byte "
                         f"{e.start}); give text files") from e


def _single_file_documents(text: str, source: str = "text") -> list[list[str]]:
    """The documents of a corpus that is one file: its blank-line separated
    paragraphs, or, in a file without blank lines, groups of LINES_PER_DOCUMENT
    lines. A train/validation split is by whole documents, so one document per
    file would leave a single file nothing to split; ValueError if fewer than 2
    documents come out."""
    paragraphs = [p for p in (text_to_segments(p) for p in _PARAGRAPH_BREAK.split(text)) if p]
    if len(paragraphs) >= 2:
        return paragraphs
    lines = [ln for ln in text.splitlines() if ln.strip()]
    groups = [text_to_segments("\n".join(lines[i:i + LINES_PER_DOCUMENT]))
              for i in range(0, len(lines), LINES_PER_DOCUMENT)]
    groups = [g for g in groups if g]
    if len(groups) < 2:
        raise ValueError(
            f"corpus file {source!r} is too small to split into training and validation "
            f"text: a single file needs at least 2 paragraphs (separated by a blank line) or "
            f"more than {LINES_PER_DOCUMENT} non-blank lines; it has {len(lines)} line(s) in "
            f"{len(paragraphs)} paragraph(s)")
    return groups


def text_corpus(paths: str | os.PathLike | Sequence[str | os.PathLike],
                max_documents: int | None = None,
                max_chars: int | None = None) -> Corpus:
    """A corpus from user text: one document per file, or, when there is only one
    file, one per paragraph (`_single_file_documents`).

    Args:
      paths: a ``.txt`` file, a directory (searched recursively for ``*.txt``,
        in sorted order), or a list of those. Paragraphs are separated by blank
        lines and split into sentences.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = [f for p in paths for f in _text_files(Path(p))]
    where = ", ".join(str(p) for p in paths)
    if not files:
        raise ValueError(f"corpus path {where!r} contains no .txt files")
    if len(files) == 1:
        text = _read_text(files[0])
        if not text.strip():   # the empty-corpus error of Corpus, naming the path
            return Corpus((), source=where)
        documents = _single_file_documents(text, str(files[0]))
        return Corpus(_capped(documents, max_documents, max_chars), source=where)
    documents = (text_to_segments(_read_text(f)) for f in files)
    return Corpus(_capped(documents, max_documents, max_chars), source=where)


class SourceUnavailableError(OSError, RuntimeError):
    """An optional online corpus could not be loaded (offline, unknown name). An
    OSError, as a missing file is, so that the CLI reports it in one line; still the
    RuntimeError `load_hf_corpus` has always raised."""


def load_hf_corpus(name: str, config: str | None = None, split: str = "train",
                   text_field: str = "text", max_documents: int | None = None,
                   max_chars: int | None = None, **load_kwargs) -> Corpus:
    """A corpus from a Hugging Face dataset (optional extra; needs network or cache).

    Each record's ``text_field`` is one document. Raises ImportError when the
    ``datasets`` package is missing and SourceUnavailableError (an OSError and a
    RuntimeError) when loading fails (offline, unknown name), both pointing at the
    offline default.
    """
    fallback = ("the offline default corpus needs no download: leave out --data, or give "
                "a .txt file (Python: stdlib_corpus() or text_corpus(path))")
    try:
        import datasets  # noqa: PLC0415 - optional extra, imported only on use
    except ImportError as e:
        raise ImportError(
            "load_hf_corpus needs the optional 'datasets' package, which is not "
            "installed (pip install 'transformer-jax[datasets]'); " + fallback) from e
    try:
        ds = datasets.load_dataset(name, config, split=split, **load_kwargs)
    except Exception as e:  # datasets raises many types for offline/missing data
        raise SourceUnavailableError(
            f"could not load Hugging Face dataset {name!r} (config={config!r}, "
            f"split={split!r}): {e}. If this machine is offline, {fallback}") from e
    if text_field not in ds.column_names:
        raise ValueError(f"text_field={text_field!r} is not a column of {name!r}; "
                         f"valid columns: {ds.column_names}")
    # Iterate rows lazily so the caps stop reading early on large datasets.
    docs = (text_to_segments(row[text_field]) for row in ds
            if row[text_field] and row[text_field].strip())
    return Corpus(_capped(docs, max_documents, max_chars), source=f"hf:{name}")


def load_corpus(source: str | os.PathLike | None = None, **caps) -> Corpus:
    """``None`` or ``"stdlib"`` -> stdlib_corpus (the shipped snapshot);
    ``"stdlib:local"`` -> this interpreter's own stdlib; ``"hf:NAME"`` ->
    load_hf_corpus; anything else is a path for text_corpus. ``caps`` are
    max_documents/max_chars."""
    if source is None or source == "stdlib":
        return stdlib_corpus(**caps)
    if source == "stdlib:local":
        return stdlib_corpus(stdlib_dir=sysconfig.get_paths()["stdlib"], **caps)
    if isinstance(source, str) and source.startswith("hf:"):
        return load_hf_corpus(source[3:], **caps)
    return text_corpus(source, **caps)


def split_corpus(corpus: Corpus, validation_fraction: float = 0.05,
                 seed: int = 0) -> tuple[Corpus, Corpus]:
    """Deterministic train/validation split by whole documents.

    Splitting by document (not by segment) keeps validation text unseen in
    training. Both parts keep the corpus order. Returns (train, validation).
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction!r} must lie in (0, 1)")
    n = corpus.num_documents
    if n < 2:
        raise ValueError(f"corpus {corpus.source!r} has {n} document(s); a "
                         "train/validation split needs at least 2")
    n_val = min(n - 1, max(1, int(round(n * validation_fraction))))
    order = np.random.default_rng(seed).permutation(n)
    is_val = np.zeros(n, dtype=bool)
    is_val[order[:n_val]] = True
    train = tuple(d for d, v in zip(corpus.documents, is_val) if not v)
    val = tuple(d for d, v in zip(corpus.documents, is_val) if v)
    return (Corpus(train, source=f"{corpus.source}[train]"),
            Corpus(val, source=f"{corpus.source}[validation]"))
