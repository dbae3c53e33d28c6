"""Tasks: how each training objective feeds a batch to its model and scores it.

A `Task` is a frozen (hashable) bundle of pure functions, so it can be a static
argument of `jax.jit`. `register_task` adds one to the registry `TASKS`;
`get_task(name, ...)` returns a copy with options set. A task names the model
family it trains (`models.registry`), the model it applies (the family's default
unless `model` is given), the method it calls, and the dataset that feeds it
(`data.pipeline.DATASETS`). Batches are dicts of arrays (see `transformer_jax.data`):
    mlm      input_ids, token_type_ids, attention_mask [B, L]; mlm_positions,
             mlm_ids, mlm_weights [B, P]; nsp_labels [B]       -> BertForPreTraining
    lm       input_ids, targets, loss_mask [B, L]               -> GPT.token_stats
    seq2seq  src_ids, src_mask [B, S]; tgt_in, tgt_out, tgt_mask [B, T] -> EncoderDecoder
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from transformer_jax.config import TransformerConfig
from transformer_jax.data import BertDataConfig, GPTDataConfig, Seq2SeqDataConfig
from transformer_jax.models import registry as families
from transformer_jax.training import losses

Batch = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Task:
    """How one training objective feeds a batch to its model and scores it; the
    field comments give each function's role, the module docstring the batch shapes."""
    name: str
    fields: tuple[str, ...]                       # keys a batch must have
    inputs: Callable[[Batch], tuple[tuple, dict]]  # batch -> model (args, kwargs)
    loss: Callable[..., dict]                      # (outputs, batch, task) -> {"loss", ...}
    example_batch: Callable[[TransformerConfig, int, int], dict]  # for init / FLOP counts
    num_tokens: Callable[[Batch], int]             # tokens the model reads per batch
    family: str = ""                               # the model family it trains (models.registry)
    dataset: str = ""                              # its data.pipeline.DATASETS entry
    data_config: Callable[[int], Any] | None = None  # seq_len -> that dataset's config
    method: str | None = None                      # model method applied (None: __call__)
    model: Callable[[Any], Any] | None = None      # config -> module; None: the family's build
    label_smoothing: float = 0.0                   # (Szegedy et al. 2016), if `smoothing`
    smoothing: bool = False                        # whether the loss takes label_smoothing
    # Fine-tuning tasks: labels (names or a LabelSet) -> this task with a head of that
    # many outputs (`get_task(name, labels=...)`); data comes from labeled files.
    with_labels: Callable[[Any], "Task"] | None = None
    # Mean evaluation metrics -> the reported ones (e.g. F1 from averaged counts).
    finalize: Callable[[dict], dict] | None = None

    def check_batch(self, batch: Batch) -> None:
        """ValueError naming the missing fields if `batch` lacks any of `self.fields`."""
        missing = [f for f in self.fields if f not in batch]
        if missing:
            raise ValueError(f"batch for task {self.name!r} lacks fields {missing}; it has "
                             f"{sorted(batch)} and needs {list(self.fields)}")

    def build_model(self, config):
        """The module this task trains for `config`."""
        return self.model(config) if self.model is not None else families.build(config)

    def apply(self, apply_fn, variables, batch: Batch, **kwargs):
        """The model's outputs on `batch`: `apply_fn(variables, *inputs, method=...)`."""
        args, inputs_kwargs = self.inputs(batch)
        method = {} if self.method is None else {"method": self.method}
        return apply_fn(variables, *args, **inputs_kwargs, **kwargs, **method)


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


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Makes `task` trainable by name (`get_task`, the trainer, the CLI's --task);
    ValueError on a taken name or an unknown family."""
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    families.get_family(task.family)   # ValueError naming the valid families
    TASKS[task.name] = task
    return task


def unregister_task(name: str) -> None:
    """Removes the task `name` (for tests and notebooks)."""
    del TASKS[name]


register_task(Task(
    name="mlm", family="bert", dataset="mlm", data_config=lambda seq_len: BertDataConfig(max_len=seq_len),
    fields=("input_ids", "token_type_ids", "attention_mask", "mlm_positions", "mlm_ids",
            "mlm_weights", "nsp_labels"),
    inputs=lambda b: ((b["input_ids"], b["token_type_ids"], b["attention_mask"],
                       b["mlm_positions"]), {}),
    loss=_mlm_loss,
    example_batch=_mlm_example,
    num_tokens=lambda b: int(np.size(b["input_ids"]))))
register_task(Task(
    name="lm", family="gpt", dataset="lm", data_config=lambda seq_len: GPTDataConfig(seq_len=seq_len),
    fields=("input_ids", "targets", "loss_mask"),
    # GPT is causal: right padding never reaches a real position, so no mask is needed.
    # `GPT.token_stats` returns per-token losses instead of logits, so that it can
    # compute them in chunks (`GPTConfig.loss_chunk`) without whole fp32 logits.
    method="token_stats",
    inputs=lambda b: ((b["input_ids"], b["targets"]), {"attention_mask": b.get("attention_mask")}),
    loss=lambda out, b, task: losses.loss_from_token_stats(out, b["loss_mask"]),
    example_batch=_lm_example,
    num_tokens=lambda b: int(np.size(b["input_ids"]))))
register_task(Task(
    name="seq2seq", family="seq2seq", dataset="seq2seq",
    # The target gains a BOS, so sources of seq_len - 1 tokens make [B, seq_len] batches.
    data_config=lambda seq_len: Seq2SeqDataConfig(max_source_len=seq_len - 1),
    fields=("src_ids", "src_mask", "tgt_in", "tgt_out", "tgt_mask"),
    inputs=lambda b: ((b["src_ids"], b["tgt_in"], b["src_mask"], b["tgt_mask"]), {}),
    loss=lambda out, b, task: losses.seq2seq_loss(out, b["tgt_out"], b["tgt_mask"],
                                                  task.label_smoothing),
    smoothing=True,
    example_batch=_seq2seq_example,
    # Target tokens, the unit MT throughput is quoted in; with source and target of
    # similar length the FLOPs per target token are those of `model_flops_per_token`.
    num_tokens=lambda b: int(np.size(b["tgt_in"]))))


def get_task(name: str, *, label_smoothing: float = 0.0, labels=None) -> Task:
    """The registered task `name` with options; ValueError names a bad one.
    `labels` (names, or a `data.LabelSet`): a fine-tuning task whose head has one
    output per label (`Task.with_labels`)."""
    if name not in TASKS:
        raise ValueError(f"task={name!r} is unknown; valid: {', '.join(TASKS)}")
    if labels is not None:
        if TASKS[name].with_labels is None:
            raise ValueError(f"task {name!r} has no label set; labels= is for "
                             f"{', '.join(n for n, t in TASKS.items() if t.with_labels)}")
        return TASKS[name].with_labels(labels)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 1)")
    if label_smoothing and not TASKS[name].smoothing:
        users = [t.name for t in TASKS.values() if t.smoothing]
        raise ValueError(f"label_smoothing={label_smoothing!r} is only used by task "
                         f"{' / '.join(repr(u) for u in users)}, not {name!r}")
    return dataclasses.replace(TASKS[name], label_smoothing=float(label_smoothing))


def resolve(task: Task | str | None, config: TransformerConfig | None = None) -> Task:
    """`task` as a Task: a registered name, the Task itself, or (None) the default
    task of `config`'s model family."""
    if isinstance(task, Task):
        return task
    return get_task(task if task is not None else task_for_config(config))


def task_for_config(config: TransformerConfig) -> str:
    """The default task of `models.build(config)`: its family's ("mlm", "lm", "seq2seq", ...)."""
    return families.family_of(config).default_task


def trains(task: str, family: str) -> bool:
    """Whether task `task` can train a model of `family`: the task was written for
    that family, or the family names it as its default task (a new family whose
    model has the task's `method` reuses the task without a new entry)."""
    return TASKS[task].family == family or families.get_family(family).default_task == task


def tasks_of(family: str) -> tuple[str, ...]:
    """The names of the registered tasks that can train `family`."""
    return tuple(name for name in TASKS if trains(name, family))


# The fine-tuning tasks (classify, tag) register themselves: one table of tasks.
import transformer_jax.training.finetune  # noqa: E402,F401
