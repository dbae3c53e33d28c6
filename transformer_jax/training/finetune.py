"""BERT fine-tuning tasks: sequence classification ("classify") and BIO tagging ("tag").

Devlin et al. 2018 (arXiv 1810.04805, sec. 4): a pre-trained encoder plus one
fresh linear head, all trained with cross-entropy. Batches (`data.labeled`):
    classify  input_ids, token_type_ids, attention_mask [B, L]; labels,
              label_weights [B]                  -> BertForSequenceClassification
    tag       input_ids, token_type_ids, attention_mask, tag_ids, tag_weights [B, L]
                                                 -> BertForTokenClassification

A head's size is its label set's: `finetune_task(name, labels)` returns the
registered task with a model of `len(labels)` outputs (and, for tag, the BIO
reading of each output). The registered entries are the defaults: 2 classes,
and CoNLL-2003's 9 tags (Tjong Kim Sang & De Meulder 2003).

F1 is not an average of per-batch F1s, so the losses return sufficient
statistics, per-class tp / fp / fn (classify) and entity tp / predicted / gold
counts (tag), each divided by the batch's `weight`. `step.mean_metrics` weights
every batch's metrics by `weight`, which turns those rates back into
sum(counts) / sum(weights) over all batches, whatever their sizes; F1 is a ratio
of counts, invariant to the common scale, so `finalize_metrics` computes it
exactly from the means.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from transformer_jax.cross_entropy import token_stats
from transformer_jax.data.labeled import (CLASSIFY_FIELDS, OUTSIDE, TAG_FIELDS, LabelSet,
                                          encode_pairs, encode_words)
from transformer_jax.models.bert import BertForSequenceClassification, BertForTokenClassification
from transformer_jax.training.losses import loss_from_token_stats
from transformer_jax.training.tasks import Task, register_task

CLASSIFY, TAG = "classify", "tag"
CONLL_TAGS = ("O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER")


# -- losses and metrics ----------------------------------------------------------

def _rate(count, weight):
    return count / jnp.maximum(weight, 1e-8)


def classify_loss(logits, batch, task, *, num_labels: int) -> dict:
    """Mean cross-entropy over the examples of logits `[B, C]`, accuracy, and per
    class c the rates "tp/c", "fp/c", "fn/c" (counts / weight) for macro-F1."""
    weights = batch["label_weights"].astype(jnp.float32)
    labels = batch["labels"]
    out = loss_from_token_stats(token_stats(logits, labels), weights)
    pred = jnp.argmax(logits, -1)
    classes = jnp.arange(num_labels)
    is_pred = (pred[:, None] == classes) * weights[:, None]      # [B, C]
    is_gold = (labels[:, None] == classes) * weights[:, None]
    tp = (is_pred * (labels[:, None] == classes)).sum(0)
    for c in range(num_labels):
        out[f"tp/{c}"] = _rate(tp[c], out["weight"])
        out[f"fp/{c}"] = _rate(is_pred[:, c].sum() - tp[c], out["weight"])
        out[f"fn/{c}"] = _rate(is_gold[:, c].sum() - tp[c], out["weight"])
    return out


def bio_table(names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(kind, type) int32 `[C]` of BIO tag names: kind 0 = O, 1 = B, 2 = I; type
    an index of the entity type (-1 for O)."""
    types = sorted({n[2:] for n in names if n != OUTSIDE})
    kind = [0 if n == OUTSIDE else (1 if n.startswith("B-") else 2) for n in names]
    etype = [-1 if n == OUTSIDE else types.index(n[2:]) for n in names]
    return np.array(kind, np.int32), np.array(etype, np.int32)


def bio_chunks(kind, etype):
    """Entity chunks of BIO sequences kind, etype `[B, W]` (see `bio_table`) as
    (start `[B, W]` bool, stop `[B, W]` int: the first position after the chunk
    that starts there).

    conlleval's rules, seqeval's default mode: a chunk starts at B, at I after O,
    and at I whose type differs from the previous tag's; it goes on over I of its
    type. A row ends outside any chunk."""
    inside = kind != 0
    prev_inside = jnp.pad(inside[:, :-1], ((0, 0), (1, 0)))
    prev_type = jnp.pad(etype[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    start = inside & ((kind == 1) | ~prev_inside | (etype != prev_type))
    cont = inside & ~start
    width = kind.shape[1]
    breaks = jnp.where(cont, width, jnp.arange(width))             # non-continuations
    later = jnp.pad(breaks[:, 1:], ((0, 0), (0, 1)), constant_values=width)
    return start, jax.lax.cummin(later, axis=1, reverse=True)


def entity_counts(pred, gold, weights, kind_of, type_of) -> dict:
    """Entity tp / predicted / gold counts of tag indices pred, gold `[B, L]` read
    at the positions with weights > 0 (first word pieces), in order: a chunk
    spans words, the pieces between them do not break it. Exact match of type,
    first and last word, as conlleval."""
    first = weights > 0
    order = jnp.argsort(~first, axis=1, stable=True)    # first pieces to the front
    valid = jnp.take_along_axis(first, order, axis=1)

    def chunks(tags):
        tags = jnp.where(valid, jnp.take_along_axis(tags, order, axis=1), 0)
        kind = jnp.where(valid, kind_of[tags], 0)
        return kind, bio_chunks(kind, type_of[tags]), type_of[tags]
    _, (start_p, stop_p), type_p = chunks(pred)
    _, (start_g, stop_g), type_g = chunks(jnp.maximum(gold, 0))
    tp = start_p & start_g & (type_p == type_g) & (stop_p == stop_g)
    return {"tp": tp.sum(), "pred": start_p.sum(), "gold": start_g.sum()}


def tag_loss(logits, batch, task, *, kind_of: tuple, type_of: tuple) -> dict:
    """Cross-entropy over first word pieces (weighted mean) of logits `[B, L, C]`,
    token accuracy, and entity counts / weight: "entity_tp", "entity_pred",
    "entity_gold"."""
    weights = batch["tag_weights"].astype(jnp.float32)
    gold = jnp.where(weights > 0, batch["tag_ids"], 0)     # IGNORE_INDEX -> any class
    out = loss_from_token_stats(token_stats(logits, gold), weights)
    counts = entity_counts(jnp.argmax(logits, -1), gold, weights,
                           jnp.asarray(kind_of), jnp.asarray(type_of))
    out.update({f"entity_{k}": _rate(v, out["weight"]) for k, v in counts.items()})
    return out


def _f1(tp, fp, fn) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0


def finalize_metrics(task: str | Task, metrics: Mapping[str, float], *,
                     keep_counts: bool = False) -> dict:
    """Mean eval metrics (`step.mean_metrics`) with F1 added and, unless
    `keep_counts`, the count rates removed.

    classify: "macro_f1", the unweighted mean of per-class F1 over the classes
    that occur in the gold labels or the predictions (scikit-learn's
    `f1_score(average="macro")`). tag: "entity_precision", "entity_recall",
    "entity_f1", micro-averaged over entities (seqeval's default, conlleval's
    "FB1"); 0 where undefined."""
    name = task if isinstance(task, str) else task.name
    out = dict(metrics)
    if name == CLASSIFY:
        classes = sorted(int(k[3:]) for k in metrics if k.startswith("tp/"))
        stats = [(metrics[f"tp/{c}"], metrics[f"fp/{c}"], metrics[f"fn/{c}"]) for c in classes]
        f1s = [_f1(*s) for s in stats if sum(s) > 0]
        out["macro_f1"] = float(np.mean(f1s)) if f1s else 0.0
        drop = [k for k in metrics if k[:3] in ("tp/", "fp/", "fn/")]
    elif name == TAG:
        tp, pred, gold = (metrics[f"entity_{k}"] for k in ("tp", "pred", "gold"))
        out["entity_precision"] = tp / pred if pred > 0 else 0.0
        out["entity_recall"] = tp / gold if gold > 0 else 0.0
        out["entity_f1"] = _f1(tp, pred - tp, gold - tp)
        drop = ["entity_tp", "entity_pred", "entity_gold"]
    else:
        return out
    if not keep_counts:
        for k in drop:
            out.pop(k)
    return out


# -- the tasks -------------------------------------------------------------------

def _example(config, batch_size, seq_len, tag: bool) -> dict:
    ids = np.ones((batch_size, seq_len), np.int32)
    batch = {"input_ids": ids, "token_type_ids": 0 * ids,
             "attention_mask": np.ones((batch_size, seq_len), bool)}
    if tag:
        return {**batch, "tag_ids": 0 * ids, "tag_weights": np.ones((batch_size, seq_len), np.float32)}
    return {**batch, "labels": np.zeros((batch_size,), np.int32),
            "label_weights": np.ones((batch_size,), np.float32)}


def _inputs(b):
    return (b["input_ids"], b["token_type_ids"], b["attention_mask"]), {}


def _task(name, fields, model_cls, names, loss, tag) -> Task:
    return Task(name=name, family="bert", fields=fields, inputs=_inputs,
                model=functools.partial(model_cls, num_labels=len(names), labels=tuple(names)),
                loss=loss, example_batch=functools.partial(_example, tag=tag),
                num_tokens=lambda b: int(np.size(b["input_ids"])),
                with_labels=functools.partial(finetune_task, name),
                finalize=functools.partial(finalize_metrics, name))


def _classify_task(names) -> Task:
    return _task(CLASSIFY, CLASSIFY_FIELDS, BertForSequenceClassification, names,
                 functools.partial(classify_loss, num_labels=len(names)), tag=False)


def _tag_task(names) -> Task:
    kind, etype = bio_table(names)
    loss = functools.partial(tag_loss, kind_of=tuple(kind.tolist()), type_of=tuple(etype.tolist()))
    return _task(TAG, TAG_FIELDS, BertForTokenClassification, names, loss, tag=True)


_BUILDERS = {CLASSIFY: _classify_task, TAG: _tag_task}


@functools.lru_cache(maxsize=64)
def _finetune_task(name: str, names: tuple[str, ...]) -> Task:
    # Cached: one Task object per label set, so `make_train_step`'s cache (keyed
    # by the task) compiles once per label set.
    LabelSet(name, names)    # validates: >= 2 distinct names, BIO for tag
    return _BUILDERS[name](names)


def finetune_task(name: str, labels: LabelSet | Sequence[str]) -> Task:
    """The task `name` ("classify" / "tag") with a head of `len(labels)` outputs,
    output i meaning `labels[i]` (HF's id2label on export)."""
    if name not in _BUILDERS:
        raise ValueError(f"task={name!r} is not a fine-tuning task; valid: {', '.join(_BUILDERS)}")
    if isinstance(labels, LabelSet):
        if labels.task != name:
            raise ValueError(f"labels are for task {labels.task!r}, not {name!r}")
        labels = labels.names
    return _finetune_task(name, tuple(labels))


# -- initialisation from a pre-trained encoder ------------------------------------

@dataclasses.dataclass(frozen=True)
class PretrainedInit:
    """Which fine-tuning parameters came from the checkpoint ("bert/encoder/...")
    and which are fresh (the head; a pooler the checkpoint lacks), and which
    checkpoint parameters were not used (the MLM / NSP heads, ...)."""
    loaded: tuple[str, ...]
    fresh: tuple[str, ...]
    unused: tuple[str, ...]

    def summary(self) -> str:
        heads = sorted({p.split("/")[0] for p in self.fresh})
        return (f"loaded {len(self.loaded)} pre-trained tensors; {len(self.fresh)} fresh "
                f"({', '.join(heads)}); {len(self.unused)} checkpoint tensors unused")


def _encoder_of(pretrained) -> tuple[dict, str]:
    # Our BertForPreTraining / HF BertFor* trees hold the encoder under "bert";
    # a bare BertModel (hf.load_pretrained of "BertModel") is the encoder itself.
    if "bert" in pretrained:
        return pretrained["bert"], "bert/"
    if "embeddings" in pretrained and "encoder" in pretrained:
        return pretrained, ""
    raise ValueError(f"pretrained parameters have top-level keys {sorted(pretrained)}; expected "
                     "a 'bert' subtree (BertForPreTraining) or 'embeddings' + 'encoder' (BertModel)")


def init_from_pretrained(fresh, pretrained) -> tuple[dict, PretrainedInit]:
    """`fresh` fine-tuning parameters with `bert/...` replaced by the pre-trained
    encoder's (cast to the fresh dtypes); the head stays fresh, and so does the
    pooler when the checkpoint has none (BertForMaskedLM). ValueError naming the
    first parameter whose shape differs, or that the checkpoint lacks."""
    src, src_prefix = _encoder_of(pretrained)
    src_flat = traverse_util.flatten_dict(src, sep="/")
    flat = traverse_util.flatten_dict(fresh, sep="/")
    loaded, new = [], []
    for path, value in flat.items():
        inner = path[len("bert/"):]
        if not path.startswith("bert/") or (inner not in src_flat and inner.startswith("pooler/")):
            new.append(path)
            continue
        if inner not in src_flat:
            raise ValueError(f"pretrained parameters lack {src_prefix}{inner}, which the "
                             f"fine-tuning model's {path} needs (a different architecture or "
                             "layer layout, e.g. scan_layers?)")
        got = src_flat[inner]
        if np.shape(got) != np.shape(value):
            raise ValueError(f"pretrained {src_prefix}{inner} has shape {np.shape(got)} but the "
                             f"fine-tuning model's {path} is {np.shape(value)}; the configs differ")
        flat[path] = jnp.asarray(got, dtype=value.dtype)
        loaded.append(path)
    used = {p[len("bert/"):] for p in loaded}
    unused = [src_prefix + p for p in src_flat if p not in used]
    if src_prefix:
        unused += [p for p in traverse_util.flatten_dict(pretrained, sep="/") if not p.startswith("bert/")]
    params = traverse_util.unflatten_dict(flat, sep="/")
    return params, PretrainedInit(tuple(loaded), tuple(new), tuple(sorted(unused)))


# -- prediction --------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _predict_fn(task: Task, config):
    model = task.build_model(config)

    def predict(params, batch):
        logits = task.apply(model.apply, {"params": params}, batch, deterministic=True)
        probs = jax.nn.softmax(logits.astype(jnp.float32), -1)
        return jnp.argmax(logits, -1), probs.max(-1)
    return jax.jit(predict)


def _run_batches(task, config, params, arrays, batch_size):
    # Fixed [batch_size, L] chunks (the last one padded with row 0), so every
    # call of one size shares one compilation.
    n = len(arrays["input_ids"])
    fn, preds, scores = _predict_fn(task, config), [], []
    for lo in range(0, n, batch_size):
        rows = np.arange(lo, lo + batch_size)
        rows = np.where(rows < n, rows, 0)
        pred, score = jax.device_get(fn(params, {k: v[rows] for k, v in arrays.items()}))
        preds.append(pred[:min(batch_size, n - lo)])
        scores.append(score[:min(batch_size, n - lo)])
    return np.concatenate(preds), np.concatenate(scores)


def _check_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")


def predict_labels(params, config, tokenizer, labels: LabelSet, texts: Sequence[str],
                   text_pairs: Sequence[str | None] | None = None, *, max_len: int | None = None,
                   batch_size: int = 32) -> tuple[list[str], np.ndarray]:
    """(the label of each text (and pair), its softmax probability `[N]`) from a
    trained classifier's `params`."""
    _check_batch_size(batch_size)
    if not texts:
        return [], np.zeros((0,), np.float32)
    arrays, _ = encode_pairs(tokenizer, list(texts), text_pairs, max_len or config.max_len)
    pred, score = _run_batches(finetune_task(CLASSIFY, labels), config, params, arrays, batch_size)
    return [labels.names[i] for i in pred], score


def predict_tags(params, config, tokenizer, labels: LabelSet, sentences: Sequence[Sequence[str]],
                 *, max_len: int | None = None, batch_size: int = 32) -> list[list[str]]:
    """The BIO tag of every word of every sentence (lists of words) from a trained
    tagger's `params`: a word's tag is its first piece's prediction. Words past
    max_len word pieces get "O" (they were never seen)."""
    _check_batch_size(batch_size)
    if not sentences:
        return []
    arrays, word_index = encode_words(tokenizer, [list(s) for s in sentences],
                                      max_len or config.max_len)
    pred, _ = _run_batches(finetune_task(TAG, labels), config, params, arrays, batch_size)
    out = []
    for words, row, tags in zip(sentences, word_index, pred):
        sentence = [OUTSIDE] * len(words)
        for pos in np.flatnonzero(row >= 0):
            sentence[row[pos]] = labels.names[tags[pos]]
        out.append(sentence)
    return out


register_task(_classify_task(("0", "1")))
register_task(_tag_task(CONLL_TAGS))
