"""Tasks: how each pre-training objective feeds a batch to its model and scores it.

A `Task` is a frozen (hashable) bundle of pure functions, so it can be a static
argument of `jax.jit`. `TASKS` is the registry; `get_task(name, ...)` returns a
copy with options set. Batches are dicts of arrays (see `transformer_jax.data`):
    mlm      input_ids, token_type_ids, attention_mask [B, L]; mlm_positions,
             mlm_ids, mlm_weights [B, P]; nsp_labels [B]       -> BertForPreTraining
    lm       input_ids, targets, loss_mask [B, L]               -> GPT
    seq2seq  src_ids, src_mask [B, S]; tgt_in, tgt_out, tgt_mask [B, T] -> EncoderDecoder
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from transformer_jax.config import TransformerConfig
from transformer_jax.models.configs import BertConfig, EncoderDecoderConfig, GPTConfig
from transformer_jax.training import losses

Batch = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Task:
    """How one pre-training objective feeds a batch to its model and scores it; the
    field comments give each function's role, the module docstring the batch shapes."""
    name: str
    fields: tuple[str, ...]                       # keys a batch must have
    inputs: Callable[[Batch], tuple[tuple, dict]]  # batch -> model (args, kwargs)
    loss: Callable[..., dict]                      # (outputs, batch, task) -> {"loss", ...}
    example_batch: Callable[[TransformerConfig, int, int], dict]  # for init / FLOP counts
    num_tokens: Callable[[Batch], int]             # tokens the model reads per batch
    label_smoothing: float = 0.0                   # seq2seq only (Szegedy et al. 2016)

    def check_batch(self, batch: Batch) -> None:
        """ValueError naming the missing fields if `batch` lacks any of `self.fields`."""
        missing = [f for f in self.fields if f not in batch]
        if missing:
            raise ValueError(f"batch for task {self.name!r} lacks fields {missing}; it has "
                             f"{sorted(batch)} and needs {list(self.fields)}")


def _mlm_loss(outputs, batch, task) -> dict:
    # BERT minimises the sum of the MLM and NSP losses (Devlin et al. 2018, A.2).
    mlm = losses.mlm_loss(outputs["mlm_logits"], batch["mlm_ids"], batch["mlm_weights"])
    nsp = losses.nsp_loss(outputs["nsp_logits"], batch["nsp_labels"])
    return {**mlm, "loss": mlm["loss"] + nsp["loss"], "mlm_loss": mlm["loss"],
            "nsp_loss": nsp["loss"], "nsp_accuracy": nsp["accuracy"]}


def _ids(rows: int, cols: int) -> np.ndarray:
    return np.ones((rows, cols), np.int32)


def _mlm_example(config, batch_size, seq_len):
    p = max(1, seq_len // 8)
    return {"input_ids": _ids(batch_size, seq_len), "token_type_ids": 0 * _ids(batch_size, seq_len),
            "attention_mask": np.ones((batch_size, seq_len), bool),
            "mlm_positions": 0 * _ids(batch_size, p), "mlm_ids": _ids(batch_size, p),
            "mlm_weights": np.ones((batch_size, p), np.float32),
            "nsp_labels": np.zeros((batch_size,), np.int32)}


def _lm_example(config, batch_size, seq_len):
    return {"input_ids": _ids(batch_size, seq_len), "targets": _ids(batch_size, seq_len),
            "loss_mask": np.ones((batch_size, seq_len), np.float32)}


def _seq2seq_example(config, batch_size, seq_len):
    mask = np.ones((batch_size, seq_len), bool)
    return {"src_ids": _ids(batch_size, seq_len), "src_mask": mask, "tgt_in": _ids(batch_size, seq_len),
            "tgt_out": _ids(batch_size, seq_len), "tgt_mask": mask}


TASKS: dict[str, Task] = {
    "mlm": Task(
        name="mlm",
        fields=("input_ids", "token_type_ids", "attention_mask", "mlm_positions", "mlm_ids",
                "mlm_weights", "nsp_labels"),
        inputs=lambda b: ((b["input_ids"], b["token_type_ids"], b["attention_mask"],
                           b["mlm_positions"]), {}),
        loss=_mlm_loss,
        example_batch=_mlm_example,
        num_tokens=lambda b: int(np.size(b["input_ids"]))),
    "lm": Task(
        name="lm",
        fields=("input_ids", "targets", "loss_mask"),
        # GPT is causal: right padding never reaches a real position, so no mask is needed.
        # Given targets, GPT returns per-token losses instead of logits, so that it can
        # compute them in chunks (`GPTConfig.loss_chunk`) without whole fp32 logits.
        inputs=lambda b: ((b["input_ids"],), {"attention_mask": b.get("attention_mask"),
                                              "targets": b["targets"]}),
        loss=lambda out, b, task: losses.loss_from_token_stats(out, b["loss_mask"]),
        example_batch=_lm_example,
        num_tokens=lambda b: int(np.size(b["input_ids"]))),
    "seq2seq": Task(
        name="seq2seq",
        fields=("src_ids", "src_mask", "tgt_in", "tgt_out", "tgt_mask"),
        inputs=lambda b: ((b["src_ids"], b["tgt_in"], b["src_mask"], b["tgt_mask"]), {}),
        loss=lambda out, b, task: losses.seq2seq_loss(out, b["tgt_out"], b["tgt_mask"],
                                                      task.label_smoothing),
        example_batch=_seq2seq_example,
        # Target tokens, the unit MT throughput is quoted in; with source and target of
        # similar length the FLOPs per target token are those of `model_flops_per_token`.
        num_tokens=lambda b: int(np.size(b["tgt_in"]))),
}

TASK_FOR_CONFIG = {BertConfig: "mlm", GPTConfig: "lm", EncoderDecoderConfig: "seq2seq"}


def get_task(name: str, *, label_smoothing: float = 0.0) -> Task:
    """The registered task `name` with options; ValueError names a bad one."""
    if name not in TASKS:
        raise ValueError(f"task={name!r} is unknown; valid: {', '.join(TASKS)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 1)")
    if label_smoothing and name != "seq2seq":
        raise ValueError(f"label_smoothing={label_smoothing!r} is only used by task 'seq2seq', "
                         f"not {name!r}")
    return dataclasses.replace(TASKS[name], label_smoothing=float(label_smoothing))


def task_for_config(config: TransformerConfig) -> str:
    """The default task of `models.build(config)`: "mlm", "lm" or "seq2seq"."""
    for cls, name in TASK_FOR_CONFIG.items():
        if isinstance(config, cls):
            return name
    raise ValueError(f"config of type {type(config).__name__} has no default task; expected "
                     f"one of {', '.join(c.__name__ for c in TASK_FOR_CONFIG)}")
