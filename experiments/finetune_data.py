"""Small offline example files for BERT fine-tuning (`--task classify` and `--task tag`).

Run:  python -m experiments.finetune_data [--out runs/finetune_data]

Writes four JSON Lines files, the same bytes on every run (fixed seed, no download):

* ``classify_train.jsonl`` / ``classify_dev.jsonl``: which standard-library package
  (asyncio, email, unittest, xml) a docstring sentence comes from. Fields ``text``
  (one sentence, cut to 40 words), ``label`` and ``doc`` (the module file; the
  readers ignore it). The split is by module file: a dev sentence's file is never
  seen in training, so the model must learn the package's vocabulary, not a file's.
* ``tag_train.jsonl`` / ``tag_dev.jsonl``: keywords vs identifiers in Python-like
  token lines. ``B-KW`` marks a keyword; a dotted name ``a . b . c`` is one NAME
  entity tagged ``B-NAME I-NAME I-NAME I-NAME I-NAME`` (the dots inside it too, the
  convention of tests/test_finetune.py's tagger test); punctuation and literals are
  ``O``. Names are lowercase words of the corpus docstrings; dev lines use only words
  that no training line uses, so a dev name must be recognised as "not a keyword".

The sentences come from the shipped corpus snapshot (`stdlib_corpus()`), whose
documents are the stdlib's module files in sorted walk order, checked by content
hash on load. Its documents carry no file names, so `PACKAGES` records where each
package's files sit in it; tests/test_finetune_data.py re-derives that table from
the interpreter's own stdlib when it is the snapshot's CPython (3.11.7).
"""
from __future__ import annotations

import argparse
import collections
import json
import keyword
import random
import re
from pathlib import Path

from transformer_jax.data import stdlib_corpus
from transformer_jax.run.files import check_output_dir

SEED = 0
# package -> (index of its first document in the snapshot, its module files in
# walk order). Package directories are walked one after the other, so each
# package's documents are contiguous.
PACKAGES = {
    "asyncio": (156, (
        "__init__", "base_events", "base_futures", "base_subprocess", "coroutines", "events",
        "exceptions", "format_helpers", "futures", "locks", "proactor_events", "protocols",
        "queues", "runners", "selector_events", "sslproto", "staggered", "streams",
        "subprocess", "taskgroups", "tasks", "threads", "timeouts", "transports", "trsock",
        "unix_events", "windows_events", "windows_utils")),
    "email": (253, (
        "__init__", "_encoded_words", "_header_value_parser", "_parseaddr", "_policybase",
        "base64mime", "charset", "encoders", "errors", "feedparser", "generator", "header",
        "headerregistry", "iterators", "message", "parser", "policy", "quoprimime", "utils",
        "mime/application", "mime/audio", "mime/base", "mime/image", "mime/message",
        "mime/multipart", "mime/nonmultipart", "mime/text")),
    "unittest": (497, (
        "__init__", "_log", "async_case", "case", "loader", "main", "mock", "result", "runner",
        "suite", "util")),
    "xml": (521, (
        "__init__", "dom/NodeFilter", "dom/__init__", "dom/domreg", "dom/expatbuilder",
        "dom/minicompat", "dom/minidom", "dom/pulldom", "dom/xmlbuilder", "etree/ElementTree",
        "parsers/__init__", "parsers/expat", "sax/__init__", "sax/_exceptions",
        "sax/expatreader", "sax/handler", "sax/saxutils", "sax/xmlreader")),
}
TRAIN_PER_LABEL, DEV_PER_LABEL = 100, 25   # sentences sampled per package
MIN_WORDS, MAX_WORDS = 5, 40               # shorter sentences are mostly fragments
PROSE_FRACTION = 0.7     # of a sentence's words that are plain words, not code
DEV_MIN_SENTENCES = 40   # files go to dev until their package has this many sentences there
DEV_MAX_FILE = 70        # a file with more sentences stays in training (it is the bulk)

TAG_TRAIN, TAG_DEV = 400, 100     # lines
DEV_NAME_FRACTION = 0.25          # of the identifier words, used only in dev lines
KEYWORDS = tuple(k for k in keyword.kwlist if k.isalpha())
PUNCTUATION = tuple("(),:=+-*[]{}<>")   # no ".": it only ever joins a dotted name
NUMBERS = ("0", "1", "2", "10", "42", "255", "1024")
_WORD = re.compile(r"[a-z]{2,12}")


# -- classify: which package a docstring sentence comes from -------------------------

def package_documents() -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """package -> [(module file, its sentences)] from the shipped snapshot."""
    docs = stdlib_corpus().documents
    return {pkg: [(f"{pkg}/{name}.py", docs[first + i]) for i, name in enumerate(names)]
            for pkg, (first, names) in PACKAGES.items()}


def _is_prose(words: list[str]) -> bool:
    # Docstrings also hold code examples and licence blocks in capitals.
    plain = sum(w.strip(".,;:!?'\"()").isalpha() for w in words)
    return len(words) >= MIN_WORDS and plain >= PROSE_FRACTION * len(words) \
        and not " ".join(words).isupper()


def _sentences(segments) -> list[str]:
    return [" ".join(words[:MAX_WORDS]) for words in map(str.split, segments)
            if _is_prose(words)]


def split_files(files, rng: random.Random) -> set[str]:
    """The module files of one package that go to dev, chosen in seeded order."""
    order = sorted(files)
    rng.shuffle(order)
    dev, count = set(), 0
    for name in order:
        n = len(files[name])
        if count >= DEV_MIN_SENTENCES:
            break
        if n <= DEV_MAX_FILE:
            dev.add(name)
            count += n
    return dev


def classify_rows(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    files = {pkg: {name: _sentences(segs) for name, segs in docs}
             for pkg, docs in package_documents().items()}
    # A sentence found in two packages or files (boilerplate such as "Return the
    # value.") would be a label conflict or a train/dev leak: drop it everywhere.
    where = collections.defaultdict(set)
    for pkg, by_file in files.items():
        for name, sentences in by_file.items():
            for s in sentences:
                where[s].add(name)
    train, dev = [], []
    for pkg in sorted(files):
        by_file = {n: sorted({s for s in ss if len(where[s]) == 1})
                   for n, ss in files[pkg].items()}
        dev_files = split_files(by_file, rng)
        pools = {False: [], True: []}
        for name in sorted(by_file):
            pools[name in dev_files] += [(s, name) for s in by_file[name]]
        for rows, pool, n in ((train, pools[False], TRAIN_PER_LABEL),
                              (dev, pools[True], DEV_PER_LABEL)):
            rows += [{"text": s, "label": pkg, "doc": name}
                     for s, name in rng.sample(pool, min(n, len(pool)))]
    rng.shuffle(train)
    rng.shuffle(dev)
    return train, dev


# -- tag: keywords vs dotted names in code-like lines ---------------------------------

def identifier_words(seed: int = SEED) -> tuple[list[str], list[str]]:
    """(train words, dev-only words): lowercase alphabetic docstring words that are
    not Python keywords or soft keywords, seen at least twice (fewer typos)."""
    reserved = {k.lower() for k in keyword.kwlist + keyword.softkwlist}
    counts = collections.Counter(w for s in stdlib_corpus().segments() for w in s.split()
                                 if _WORD.fullmatch(w) and w not in reserved)
    words = sorted(w for w, c in counts.items() if c >= 2)
    random.Random(seed).shuffle(words)
    n_dev = int(len(words) * DEV_NAME_FRACTION)
    return sorted(words[n_dev:]), sorted(words[:n_dev])


def code_line(rng: random.Random, names: list[str]) -> dict:
    tokens, tags = [], []
    for _ in range(rng.randint(4, 9)):
        r = rng.random()
        if r < 0.3:
            tokens.append(rng.choice(KEYWORDS)), tags.append("B-KW")
        elif r < 0.7:
            parts = rng.sample(names, rng.choice((1, 1, 2, 3)))
            for i, part in enumerate(parts):
                tokens += [part] if i == 0 else [".", part]
                tags += ["B-NAME"] if i == 0 else ["I-NAME", "I-NAME"]
        elif r < 0.9:
            tokens.append(rng.choice(PUNCTUATION)), tags.append("O")
        elif r < 0.95:
            tokens.append(rng.choice(NUMBERS)), tags.append("O")
        else:   # a string literal: a quoted word is not a name
            tokens.append(f"'{rng.choice(names)}'"), tags.append("O")
    return {"tokens": tokens, "tags": tags}


def tag_rows(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train_words, dev_words = identifier_words(seed)
    return ([code_line(rng, train_words) for _ in range(TAG_TRAIN)],
            [code_line(rng, dev_words) for _ in range(TAG_DEV)])


# -- files ------------------------------------------------------------------------------

def label_counts(rows: list[dict]) -> collections.Counter:
    """Examples per label (classify) or words per tag (tag)."""
    return collections.Counter(t for r in rows for t in ([r["label"]] if "label" in r else r["tags"]))


def majority_baseline(train: list[dict], dev: list[dict]) -> float:
    """Dev accuracy of always predicting the most common training label (per word for tags)."""
    top = label_counts(train).most_common(1)[0][0]
    dev_counts = label_counts(dev)
    return dev_counts[top] / sum(dev_counts.values())


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def write_all(out: str | Path, seed: int = SEED) -> dict[str, Path]:
    """Write the four files into `out`; prints one summary line per file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for task, (train, dev) in (("classify", classify_rows(seed)), ("tag", tag_rows(seed))):
        base = majority_baseline(train, dev)
        for split, rows in (("train", train), ("dev", dev)):
            path = paths[f"{task}_{split}"] = write_jsonl(out / f"{task}_{split}.jsonl", rows)
            counts = " ".join(f"{k}={v}" for k, v in sorted(label_counts(rows).items()))
            extra = f", majority baseline {base:.3f}" if split == "dev" else ""
            print(f"{path}: {len(rows)} examples, {path.stat().st_size} bytes, "
                  f"{'labels' if task == 'classify' else 'tags'} {counts}{extra}")
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/finetune_data", help="output directory")
    parser.add_argument("--seed", type=int, default=SEED,
                        help=f"draws the sentences and the train/dev split (default {SEED})")
    args = parser.parse_args(argv)
    check_output_dir(args.out, parser=parser)
    write_all(args.out, args.seed)


if __name__ == "__main__":
    main()
