"""Fine-tuning runs (`--task classify | tag`): labeled files instead of a corpus,
a label set saved with the run, an encoder started from a pre-trained checkpoint
(`--init`), and `transformer-jax predict`.

The files: `--data train.jsonl --eval-data dev.jsonl` (or .csv), fields `text`
[, `text_pair`], `label` for classify and `tokens`, `tags` for tag
(`data/labeled.py`). The label set is read from the training file and saved as
`labels.json` beside the tokenizer; the whole eval file is scored at every
evaluation.
"""
from __future__ import annotations

import sys
from pathlib import Path

from transformer_jax.data import Corpus, Tokenizer, train_tokenizer
from transformer_jax.data.labeled import (LabelSet, labeled_datasets, read_labeled, read_rows,
                                         words_field)
from transformer_jax.run.files import input_lines
from transformer_jax.models import registry
from transformer_jax.training.tasks import TASKS, get_task

LABELS_FILE = "labels.json"


def is_finetune(task_name: str) -> bool:
    """Whether the task trains a head over a label set (classify, tag)."""
    return TASKS[task_name].with_labels is not None


def load_pretrained(path, task_name: str):
    """-> (config, params, tokenizer, what it is) of `--init`: one of our run
    directories, or a Hugging Face directory (config.json); its family must be the
    one the task fine-tunes."""
    from transformer_jax.run.loading import load_model_dir
    config, params, tokenizer, _, what = load_model_dir(path, "--init")
    want = TASKS[task_name].family
    if registry.family_of(config).name != want:
        raise ValueError(f"--init {str(path)!r} holds a {type(config).__name__}; task "
                         f"{task_name!r} fine-tunes a {want} model")
    return config, params, tokenizer, what


def _texts(examples) -> list[list[str]]:
    # One "document" per example, for training a tokenizer on the training file.
    return [[e.text] + ([e.text_pair] if e.text_pair else []) if hasattr(e, "text")
            else [" ".join(e.tokens)] for e in examples]


def datasets(run, out: Path, tokenizer: Tokenizer | None):
    """-> (tokenizer, train, eval, labels) of a fine-tuning run; nothing is written.
    The tokenizer: the run's own on resume, else the given one (--init's), else
    WordPiece trained on the training file."""
    labels = None
    if run.resume and (out / LABELS_FILE).is_file():
        labels = LabelSet.load(out / LABELS_FILE)
    names = f"--data {str(run.data)!r}", f"--eval-data {str(run.eval_data)!r}"
    examples = read_labeled(run.data, run.task, names[0])
    evals = read_labeled(run.eval_data, run.task, names[1])
    if tokenizer is None:
        corpus = Corpus(_texts(examples), source=str(run.data))
        tokenizer = train_tokenizer(corpus, "wordpiece", run.vocab_size)
    train, valid, labels = labeled_datasets(run.task, examples, evals, tokenizer, run.seq_len,
                                            labels=labels, sources=names)
    return tokenizer, train, valid, labels


def task_of(run_task: str, run_dir, metadata: dict | None = None) -> object:
    """The run's task, with its saved label set for a fine-tuning run (checked against
    the checkpoint's `metadata`, see `load_labels`)."""
    if not is_finetune(run_task):
        return get_task(run_task)
    return get_task(run_task, labels=load_labels(run_dir, metadata))


def load_labels(run_dir, metadata: dict | None = None) -> LabelSet:
    """labels.json of a fine-tuning run. Given a checkpoint's metadata, which holds the
    label set the head was trained with (checkpoints written before it was stored hold
    none), a labels.json that differs from it is refused: another count would fail as a
    checkpoint shape mismatch, another order would silently swap the predicted labels."""
    path = Path(run_dir) / LABELS_FILE
    if not path.is_file():
        raise ValueError(f"{str(run_dir)!r} has no {LABELS_FILE}: it is not a fine-tuning run")
    labels = LabelSet.load(path)
    check_labels(labels, metadata or {}, path)
    return labels


def check_labels(labels: LabelSet, metadata: dict, path) -> None:
    """ValueError unless `labels` (read from `path`) is the set a checkpoint's `metadata`
    says its head was trained with, in order (none stored: nothing to check)."""
    saved = metadata.get("labels")
    if saved is not None and saved != labels.to_dict():
        raise ValueError(f"label file {str(path)!r} holds {labels.to_dict()['labels']}, but the "
                         f"checkpoint was trained with {saved['labels']} (in that order): the "
                         "file was changed after training; restore it")


def _predict_inputs(args) -> list[tuple[int | None, dict]]:
    """(line, record) pairs to label, read before the checkpoint is: --text (+
    --text-pair) or --input-file's plain lines (a text, or whitespace-separated words
    for tag), line None; or --input-file's .jsonl records with the training fields,
    their line numbers (`_records` checks the fields once the task is known)."""
    if args.input_file is not None and (args.text or args.text_pair is not None):
        given = "--text" if args.text else "--text-pair"
        raise ValueError(f"{given} and --input-file {args.input_file!r}: give texts one way "
                         "(a .jsonl --input-file takes text_pair fields)")
    if args.input_file is None:
        if not args.text:
            raise ValueError("predict needs --text (repeatable) or --input-file")
        return [(None, {"text": t, "text_pair": args.text_pair}) for t in args.text]
    path = Path(args.input_file)
    if path.suffix not in (".jsonl", ".json"):
        return [(None, {"text": line}) for line in input_lines(path)]
    return read_rows(path, f"--input-file {str(path)!r}")   # a JSON object a line


def _records(rows, task_name: str, path) -> list[dict]:
    field = "tokens" if task_name == "tag" else "text"
    for line, record in rows:
        if line is not None and field not in record:
            raise ValueError(f"--input-file {str(path)!r}:{line}: record has no field {field!r}")
        if line is not None and field == "tokens":
            # Training's check of the words: a string would be tagged character by character.
            words_field(f"--input-file {str(path)!r}", line, record, "tokens", csv_file=False)
    return [record for _, record in rows]


def _note_cut_words(tokenizer, sentences, seq_len: int) -> None:
    """Said, not silent: a sentence longer than the run's --seq-len word pieces has
    words the tagger never reads, and `predict_tags` tags them O."""
    pieces = tokenizer.encode_words_batch([list(s) for s in sentences]) if sentences else []
    long = [i + 1 for i, (ids, _) in enumerate(pieces) if len(ids) > seq_len - 2]
    if long:
        print(f"note: {len(long)} input(s) (first: number {long[0]}) have more than "
              f"{seq_len - 2} word pieces (the run's --seq-len {seq_len}, less [CLS] and "
              "[SEP]); words whose first piece falls past that are tagged O without being "
              "read", file=sys.stderr)


def predict(args) -> list[dict]:
    """`transformer-jax predict`: the label (and its probability) of each text, or
    the tag of each word, from a fine-tuned run directory."""
    from transformer_jax.run.loading import load_run
    from transformer_jax.training.finetune import predict_labels, predict_tags
    rows = _predict_inputs(args)
    config, params, tokenizer, run = load_run(args.model)
    if not is_finetune(run.task):
        raise ValueError(f"--model {args.model!r} is a {run.task} run; predict needs a "
                         f"fine-tuned run ({', '.join(n for n in TASKS if is_finetune(n))})")
    labels = load_labels(args.model)   # load_run checked it against the checkpoint
    records = _records(rows, run.task, args.input_file)
    if run.task == "tag" and args.text_pair is not None:
        raise ValueError(f"--text-pair {args.text_pair!r}: --model {args.model!r} is a tag run, "
                         "which labels the words of one text; pairs are for classify runs")
    if run.task == "tag":
        words = [r["tokens"] if "tokens" in r else r["text"].split() for r in records]
        _note_cut_words(tokenizer, words, run.seq_len)
        tags = predict_tags(params, config, tokenizer, labels, words, max_len=run.seq_len)
        return [{"tokens": list(w), "tags": t} for w, t in zip(words, tags)]
    texts = [r["text"] for r in records]
    pairs = [r.get("text_pair") for r in records]
    names, probs = predict_labels(params, config, tokenizer, labels, texts,
                                  pairs if any(pairs) else None, max_len=run.seq_len)
    return [{"text": t, **({"text_pair": p} if p else {}), "label": n, "probability": round(float(q), 4)}
            for t, p, n, q in zip(texts, pairs, names, probs)]
