"""The example fine-tuning files of experiments/finetune_data.py: written the same way
every run, readable by the fine-tuning reader, split without leaks, and not trivial.

The references are independent of the generator: labels and baselines are counted
here from the files, tags are re-derived from the tokens by the rule the files
document, and the package table is re-derived from the interpreter's own stdlib.
"""
import collections
import json
import keyword
import sys
import sysconfig
from pathlib import Path

import pytest

from experiments import finetune_data as fd
from transformer_jax.data import stdlib_corpus
from transformer_jax.data.corpus import SNAPSHOT_PYTHON, _module_docstrings, text_to_segments
from transformer_jax.data.labeled import LabelSet, read_labeled

FILES = {"classify_train": "classify", "classify_dev": "classify", "tag_train": "tag", "tag_dev": "tag"}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    path = tmp_path_factory.mktemp("finetune_data")
    paths = fd.write_all(path)
    assert {k: p.name for k, p in paths.items()} == {k: f"{k}.jsonl" for k in FILES}
    return path


@pytest.fixture(scope="module")
def examples(out):
    return {name: read_labeled(out / f"{name}.jsonl", task) for name, task in FILES.items()}


def test_files_are_deterministic(out, tmp_path, capsys):
    fd.main(["--out", str(tmp_path)])
    for name in FILES:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (out / f"{name}.jsonl").read_bytes(), name
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(f"{n}.jsonl: " in line for n, line in zip(FILES, lines))


def test_readable_with_dev_labels_from_training(examples):
    for task in ("classify", "tag"):
        train, dev = examples[f"{task}_train"], examples[f"{task}_dev"]
        assert 300 <= len(train) <= 600 and 80 <= len(dev) <= 150, (task, len(train), len(dev))
        labels = LabelSet.from_examples(task, train)
        labels.check(dev, f"{task}_dev")           # raises on a dev label it has no output for
        seen = lambda rows: {t for e in rows for t in ((e.label,) if task == "classify" else e.tags)}
        assert seen(dev) <= seen(train)
    assert {e.label for e in examples["classify_train"]} == {"asyncio", "email", "unittest", "xml"}
    assert set(LabelSet.from_examples("tag", examples["tag_train"]).names) == {"O", "B-KW", "I-KW",
                                                                                 "B-NAME", "I-NAME"}


def test_classify_dev_files_and_sentences_unseen_in_training(out):
    rows = {s: [json.loads(line) for line in (out / f"classify_{s}.jsonl").open()] for s in ("train", "dev")}
    docs = {s: {r["doc"] for r in rs} for s, rs in rows.items()}
    assert docs["train"].isdisjoint(docs["dev"]) and len(docs["dev"]) >= 4
    assert not {r["text"] for r in rows["train"]} & {r["text"] for r in rows["dev"]}
    for r in rows["train"] + rows["dev"]:
        assert r["doc"].startswith(r["label"] + "/") and 5 <= len(r["text"].split()) <= 40, r


def majority(train_labels, dev_labels):
    top = collections.Counter(train_labels).most_common(1)[0][0]
    return sum(d == top for d in dev_labels) / len(dev_labels)


def test_majority_baselines_are_far_from_perfect(examples):
    c = majority([e.label for e in examples["classify_train"]], [e.label for e in examples["classify_dev"]])
    t = majority([t for e in examples["tag_train"] for t in e.tags],
                 [t for e in examples["tag_dev"] for t in e.tags])
    assert c < 0.35 and t < 0.5, (c, t)


def reference_tags(tokens):
    # the documented rule: keywords B-KW; a name B-NAME, or I-NAME after a "."
    # that joins it to the name before; the dots I-NAME; anything else O.
    tags = []
    for i, tok in enumerate(tokens):
        if keyword.iskeyword(tok):
            tags.append("B-KW")
        elif tok == ".":
            assert 0 < i < len(tokens) - 1 and tokens[i - 1].isalpha() and tokens[i + 1].isalpha()
            tags.append("I-NAME")
        elif tok.isalpha() and tok.islower():
            tags.append("I-NAME" if i and tokens[i - 1] == "." else "B-NAME")
        else:
            tags.append("O")
    return tuple(tags)


def test_tags_follow_the_rule_and_dev_names_are_new(examples):
    names = {}
    for split in ("train", "dev"):
        rows = examples[f"tag_{split}"]
        for e in rows:
            assert e.tags == reference_tags(e.tokens), e
        names[split] = {t for e in rows for t, g in zip(e.tokens, e.tags) if g.endswith("NAME") and t != "."}
        dotted = sum("I-NAME" in e.tags for e in rows)
        assert dotted > len(rows) / 3, (split, dotted)   # enough dotted names to learn I-NAME
    assert names["train"].isdisjoint(names["dev"]) and len(names["dev"]) > 100


@pytest.mark.skipif(sys.version.split()[0] != SNAPSHOT_PYTHON,
                    reason=f"the snapshot was built from CPython {SNAPSHOT_PYTHON}'s stdlib")
def test_package_table_matches_this_stdlib():
    root = Path(sysconfig.get_paths()["stdlib"])
    snapshot = stdlib_corpus().documents
    for pkg, (first, modules) in fd.PACKAGES.items():
        local = stdlib_corpus(stdlib_dir=root / pkg).documents
        assert local == snapshot[first:first + len(modules)], pkg
        for module, doc in zip(modules, local):
            segments = [s for d in _module_docstrings(root / pkg / f"{module}.py")
                        for s in text_to_segments(d, prose_only=True)]
            assert tuple(segments) == doc, (pkg, module)
