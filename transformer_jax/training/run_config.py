"""`RunConfig`: everything one training run needs, validated up front.

The command line builds one from its flags; notebooks and scripts build one
directly. Every field is checked in `__post_init__`, so a bad value fails with a
message naming the flag before any data is read or any directory is touched.
"""
from __future__ import annotations

import dataclasses
import math

from transformer_jax.models.configs import PRESETS, BertConfig, EncoderDecoderConfig, GPTConfig
from transformer_jax.parallel.mesh import PARALLEL_MODES, MeshConfig
from transformer_jax.training.schedules import SCHEDULES

# CLI task -> (data pipeline task, config family it needs)
TASK_FAMILIES = {"mlm": ("bert", BertConfig), "lm": ("gpt", GPTConfig),
                 "seq2seq": ("seq2seq", EncoderDecoderConfig)}


# Settings that shape the optimisation path: on resume they must equal the saved run's,
# or the continuation is not the run that was started. Those in CHANGEABLE_ON_RESUME
# may differ when named in `allow_change` (the optimizer's hyperparameters: the state's
# shapes stay); the rest change the model, its data or the batches it has seen.
RESUME_LOCKED = ("model", "task", "data", "max_documents", "vocab_size", "seq_len", "batch_size",
                 "steps", "lr", "warmup", "schedule", "weight_decay", "clip_norm", "accumulation",
                 "norm_placement", "attention", "dtype", "seed", "overrides")
CHANGEABLE_ON_RESUME = ("steps", "lr", "warmup", "schedule", "weight_decay", "clip_norm")
# Settings of one invocation, never taken from the saved run.
PER_INVOCATION = ("resume", "stop_at", "allow_change")


def _check(name, ok: bool, value, valid: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is not valid: {valid}")


def _pos_int(name, value) -> None:
    _check(name, isinstance(value, int) and not isinstance(value, bool) and value > 0, value,
           "must be a positive integer")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs besides the model architecture: data, sizes,
    optimisation, checkpoints, parallelism. Frozen; validated on construction."""
    model: str = "gpt-tiny"            # preset name (transformer_jax.models.PRESETS)
    task: str = "lm"                   # mlm (BERT MLM+NSP) | lm (GPT) | seq2seq
    data: str | None = None            # None = embedded stdlib corpus; a path; "hf:NAME"
    max_documents: int | None = None   # corpus cap, for quick runs
    vocab_size: int = 4000             # tokenizer vocabulary trained locally
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 200                   # optimizer updates
    lr: float = 1e-3                   # peak learning rate
    warmup: int = 20                   # linear warm-up steps (0 = none)
    schedule: str = "cosine"
    weight_decay: float = 0.01
    clip_norm: float | None = 1.0
    accumulation: int = 1              # micro-batches per update (optax.MultiSteps)
    norm_placement: str | None = None  # override the preset's placement
    attention: str | None = None       # override the attention kernel
    dtype: str = "float32"             # compute dtype; parameters stay float32
    seed: int = 0
    out_dir: str = "runs/default"
    resume: bool = False
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    keep: int = 3
    log_every: int = 10
    # Also log gradient and update norms per layer ("grad_norm/decoder/layer_3", ...):
    # the depth profile Xiong et al. 2020 compare, at the price of extra passes over
    # the gradients and updates every step.
    layer_norms: bool = False
    peak_tflops: float | None = None   # for MFU; None = measure a matmul at start-up
    # Save and stop after this many updates, as a pre-empted job would; resuming
    # continues to `steps`. For time-sliced clusters and the exact-resume test.
    stop_at: int | None = None
    # On resume: settings of RESUME_LOCKED that may differ from the saved run's.
    allow_change: tuple[str, ...] = ()
    overrides: tuple[tuple[str, object], ...] = ()  # extra model-config fields
    # none: one device; pmap: replicas on every local device; shard: jit over a
    # data x fsdp x tensor mesh (transformer_jax.parallel).
    parallel: str = "none"
    mesh: str | None = None            # shard only, e.g. "data=2,fsdp=2,tensor=2"; None = data=N

    def __post_init__(self):
        _check("model", self.model in PRESETS, self.model, f"one of {', '.join(PRESETS)}")
        _check("task", self.task in TASK_FAMILIES, self.task, f"one of {', '.join(TASK_FAMILIES)}")
        family = TASK_FAMILIES[self.task][1]
        _check("model", PRESETS[self.model][0] is family, self.model,
               f"task {self.task!r} needs a {family.__name__} preset "
               f"({', '.join(n for n, (c, _) in PRESETS.items() if c is family)})")
        for name in ("vocab_size", "seq_len", "batch_size", "steps", "accumulation", "eval_every",
                     "eval_batches", "save_every", "keep", "log_every"):
            _pos_int(name, getattr(self, name))
        for name in ("max_documents", "stop_at"):
            if getattr(self, name) is not None:
                _pos_int(name, getattr(self, name))
        _check("seq_len", self.seq_len >= 8, self.seq_len, "must be at least 8")
        _check("lr", isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0,
               self.lr, "must be a positive finite number")
        _check("warmup", isinstance(self.warmup, int) and 0 <= self.warmup < self.steps,
               self.warmup, f"must be an integer in [0, steps={self.steps}): the schedule warms up "
               "for --warmup updates, then decays until --steps; lower --warmup or raise --steps")
        max_len = dict(self.overrides).get("max_len", _preset_max_len(self.model))
        _check("seq_len", self.seq_len <= max_len, self.seq_len,
               f"{self.model} has max_len={max_len} positions; use --seq-len <= {max_len} (a "
               "RunConfig can raise it with overrides=(('max_len', N),))")
        _check("schedule", self.schedule in SCHEDULES, self.schedule, f"one of {', '.join(SCHEDULES)}")
        _check("dtype", self.dtype in ("float32", "bfloat16", "float16"), self.dtype,
               "one of float32, bfloat16, float16")
        _check("weight_decay", self.weight_decay >= 0, self.weight_decay, "must be >= 0")
        _check("clip_norm", self.clip_norm is None or self.clip_norm > 0, self.clip_norm,
               "must be > 0 (or None for no clipping)")
        _check("seed", isinstance(self.seed, int) and self.seed >= 0, self.seed, "must be an integer >= 0")
        _check("peak_tflops", self.peak_tflops is None or self.peak_tflops > 0, self.peak_tflops,
               "must be > 0")
        _check("parallel", self.parallel in PARALLEL_MODES, self.parallel,
               f"one of {', '.join(PARALLEL_MODES)}")
        _check("mesh", self.mesh is None or self.parallel == "shard", self.mesh,
               f"--mesh is only used with --parallel shard (got --parallel {self.parallel})")
        if self.mesh is not None:
            MeshConfig.parse(self.mesh)   # ValueError naming the bad part
        bad = [k for k in self.allow_change if k not in CHANGEABLE_ON_RESUME]
        _check("allow_change", not bad, ",".join(bad),
               f"settings that may change on resume are {', '.join(CHANGEABLE_ON_RESUME)}")

    @property
    def data_task(self) -> str:
        return TASK_FAMILIES[self.task][0]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["overrides"] = [list(kv) for kv in self.overrides]
        d["allow_change"] = list(self.allow_change)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        d = dict(d)
        d["overrides"] = tuple(tuple(kv) for kv in d.get("overrides", ()))
        d["allow_change"] = tuple(d.get("allow_change", ()))
        return cls(**d)

    def resume_changes(self, saved: "RunConfig") -> dict[str, tuple]:
        """{field: (saved, now)} for the RESUME_LOCKED settings that differ from `saved`;
        ValueError if any is not in `allow_change`."""
        changed = {k: (getattr(saved, k), getattr(self, k)) for k in RESUME_LOCKED
                   if getattr(saved, k) != getattr(self, k)}
        refused = {k: v for k, v in changed.items() if k not in self.allow_change}
        if refused:
            raise ValueError(_refusal(saved, refused, self.out_dir))
        return changed

    @classmethod
    def resumed(cls, saved: "RunConfig", given: dict) -> "RunConfig":
        """The saved run's settings with `given` (field -> value, what the user typed)
        on top, for --resume; the settings of one invocation (PER_INVOCATION) are not
        inherited. ValueError naming the flags if a locked setting would change."""
        d = {**saved.to_dict(), **{k: getattr(cls(), k) for k in PER_INVOCATION}, "resume": True}
        d.update(given)
        d["allow_change"] = tuple(d.get("allow_change") or ())
        probe = {k: d[k] for k in RESUME_LOCKED}
        refused = {k: (getattr(saved, k), probe[k]) for k in RESUME_LOCKED
                   if _comparable(probe[k]) != _comparable(getattr(saved, k))
                   and k not in d["allow_change"]}
        if refused:   # before building, so --task mlm on a GPT run is named as such
            raise ValueError(_refusal(saved, refused, d["out_dir"]))
        return cls.from_dict(d)


def _comparable(value):
    return tuple(map(tuple, value)) if isinstance(value, (list, tuple)) else value


def _preset_max_len(model: str) -> int:
    from transformer_jax.models.configs import get_config
    return get_config(model).max_len


def _refusal(saved: "RunConfig", refused: dict, out_dir: str) -> str:
    flags = ", ".join(f"--{k.replace('_', '-')} {now!r} (saved {was!r})"
                      for k, (was, now) in refused.items())
    what = f"this run is a {saved.model} {saved.task} run"
    fixable = [k for k in refused if k in CHANGEABLE_ON_RESUME]
    hint = (f"; to change it anyway, add --allow-change {','.join(fixable)}"
            if fixable and len(fixable) == len(refused) else
            "; leave these flags out (--resume takes the saved settings) or choose another --out")
    return f"cannot resume {out_dir}: {what}, and {flags} would change the run{hint}"
