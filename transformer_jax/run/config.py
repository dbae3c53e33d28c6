"""`RunConfig`: everything one training run needs, validated up front.

The command line is generated from it: each field's metadata holds its flag's
help text (and type, where the default does not say it), so `transformer-jax
train --help` lists every setting with its default, and a new field is a new
flag. Notebooks and scripts build one directly. Every field is checked in
`__post_init__`, so a bad value fails with a message naming the flag before any
data is read or any directory is touched.
"""
from __future__ import annotations

import dataclasses
import math

from transformer_jax import validation
from transformer_jax.models import registry as families
from transformer_jax.models.configs import PRESETS
from transformer_jax.parallel.mesh import PARALLEL_MODES, MeshConfig
from transformer_jax.training.schedules import DROPPING, SCHEDULES
from transformer_jax.training.tasks import TASKS, trains


# Settings that shape the optimisation path: on resume they must equal the saved run's,
# or the continuation is not the run that was started. Those in CHANGEABLE_ON_RESUME
# may differ when named in `allow_change` (the optimizer's hyperparameters: the state's
# shapes stay); the rest change the model, its data or the batches it has seen.
RESUME_LOCKED = ("model", "task", "data", "eval_data", "init", "max_documents", "vocab_size", "seq_len", "batch_size",
                 "steps", "lr", "warmup", "schedule", "drop_step", "weight_decay", "clip_norm", "accumulation",
                 "norm_placement", "attention", "dtype", "seed", "overrides")
CHANGEABLE_ON_RESUME = ("steps", "lr", "warmup", "schedule", "drop_step", "weight_decay",
                        "clip_norm")
# Settings of one invocation, never taken from the saved run.
PER_INVOCATION = ("resume", "stop_at", "allow_change")


_check = validation.require   # "{name}={value!r} is not valid: {valid}"


def _pos_int(name, value) -> None:
    _check(name, validation.is_int(value) and value > 0, value, "must be a positive integer")


def _setting(default, help: str = "", *, flag: str | None = None, type=None, choices=None,
             parse=None, cli: bool = True):
    """A RunConfig field and its `train` flag: `flag` (default --field-name), argparse
    `type` (default: the default's type), and `parse`, applied to the typed value."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, flag=flag, type=type, choices=choices, parse=parse, cli=cli))


def _clip(value: float):
    return None if value <= 0 else value   # --clip-norm 0 disables clipping


def _names(value: str) -> tuple[str, ...]:
    return tuple(k.strip().replace("-", "_") for k in value.split(",") if k.strip())


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs besides the model architecture: data, sizes,
    optimisation, checkpoints, parallelism. Frozen; validated on construction."""
    model: str = _setting("gpt-tiny", "preset name (see `info`)")
    task: str = _setting("lm", "what to train: {tasks}")
    data: str | None = _setting(None, "a .txt file (a document per paragraph), a directory of "
                                ".txt files (a document per file), hf:NAME (needs the datasets "
                                "package), or stdlib:local (this Python's stdlib); none: the "
                                "embedded stdlib snapshot", type=str)
    max_documents: int | None = _setting(None, "cap the corpus (quick runs)", type=int)
    # Fine-tuning (classify, tag): --data is the labeled training file.
    eval_data: str | None = _setting(None, "classify/tag: the labeled evaluation file (.jsonl or "
                                     ".csv), scored whole at every evaluation", type=str)
    init: str | None = _setting(None, "classify/tag: start the encoder (and take the tokenizer "
                                "and architecture) from this run directory or Hugging Face "
                                "directory; the head starts fresh", type=str)
    vocab_size: int = _setting(4000, "tokenizer vocabulary trained on the corpus")
    seq_len: int = _setting(128, "tokens per example; at most the preset's max_len")
    batch_size: int = _setting(16)
    steps: int = _setting(200, "optimizer updates")
    lr: float = _setting(1e-3, "peak learning rate")
    warmup: int = _setting(20, "linear warm-up updates (0 = none); must be < --steps")
    schedule: str = _setting("cosine", " | ".join(SCHEDULES))
    drop_step: int | None = _setting(None, "--schedule drop: the update from which the rate is "
                                     "x0.1 (Xiong et al. 2020's pre-LN schedule)", type=int)
    weight_decay: float = _setting(0.01)
    clip_norm: float | None = _setting(1.0, "global gradient norm clip; <= 0 disables",
                                       type=float, parse=_clip)
    accumulation: int = _setting(1, "micro-batches per update (optax.MultiSteps)")
    norm_placement: str | None = _setting(None, "post | pre | sandwich | deepnorm; none: the "
                                          "preset's", type=str)
    attention: str | None = _setting(None, "attention kernel name, e.g. xla, chunked; none: the "
                                     "preset's", type=str)
    dtype: str = _setting("float32", "compute dtype (parameters stay float32): float32 | "
                          "bfloat16 | float16")
    seed: int = _setting(0)
    out_dir: str = _setting("runs/default", "run directory", flag="--out")
    resume: bool = _setting(False, "continue the run in --out with its saved settings; flags "
                            "given with it override them (see --allow-change)")
    eval_every: int = _setting(50, "updates between evaluations")
    eval_batches: int = _setting(4, "validation batches per evaluation")
    save_every: int = _setting(100, "updates between checkpoints")
    keep: int = _setting(3, "checkpoints kept")
    log_every: int = _setting(10, "updates per metrics flush (and divergence check)")
    # Also log gradient and update norms per layer ("grad_norm/decoder/layer_3", ...):
    # the depth profile Xiong et al. 2020 compare, at the price of extra passes over
    # the gradients and updates every step.
    layer_norms: bool = _setting(False, "also log per-layer gradient and update norms")
    peak_tflops: float | None = _setting(None, "for MFU; none: measured by a matmul", type=float)
    # Save and stop after this many updates, as a pre-empted job would; resuming
    # continues to `steps`. For time-sliced clusters and the exact-resume test.
    stop_at: int | None = _setting(None, "save and stop after this many updates, as a pre-empted "
                                   "job would; --resume continues", type=int)
    # On resume: settings of RESUME_LOCKED that may differ from the saved run's.
    allow_change: tuple[str, ...] = _setting(
        (), "with --resume: comma-separated settings that may differ from the saved run, from "
        f"{', '.join(CHANGEABLE_ON_RESUME)} (the run then no longer equals an uninterrupted one)",
        type=str, parse=_names)
    # Extra model-config fields, e.g. (("max_len", 512),): Python only.
    overrides: tuple[tuple[str, object], ...] = _setting((), cli=False)
    # auto: shard over every device when there are several, else none; none: one
    # device; pmap: replicas on every local device; shard: jit over a data x fsdp x
    # tensor mesh (transformer_jax.parallel).
    parallel: str = _setting("auto", "auto: shard over all devices when there are several, else "
                             "none; none: one device; pmap: replicate over local devices; "
                             "shard: jit over a device mesh (see --mesh)", choices=PARALLEL_MODES)
    mesh: str | None = _setting(None, "with --parallel shard or auto: axis sizes, e.g. "
                                "data=2,fsdp=2,tensor=2 (product = device count; none: "
                                "data=<all devices>)", type=str)

    def __post_init__(self):
        validation.plain_scalars(self)   # stored as JSON in the run directory
        _check("model", self.model in PRESETS, self.model, f"one of {', '.join(PRESETS)}")
        _check("task", self.task in TASKS, self.task, f"one of {', '.join(TASKS)}")
        preset_family = families.family_of(PRESETS[self.model][0])
        if not trains(self.task, preset_family.name):
            able = [f for f in families.families() if trains(self.task, f.name)]
            _check("model", False, self.model,
                   f"task {self.task!r} needs a {' or '.join(f.config_cls.__name__ for f in able)} "
                   f"preset ({', '.join(n for f in able for n in families.presets_of(f.config_cls))})")
        _check_hf_data(self.data)
        if TASKS[self.task].with_labels is not None:   # fine-tuning: labeled files
            for name in ("data", "eval_data"):
                _check(name, isinstance(getattr(self, name), str), getattr(self, name),
                       f"task {self.task!r} needs --{name.replace('_', '-')} FILE (.jsonl or .csv "
                       "with its fields: see docs/training.md)")
        else:
            for name in ("eval_data", "init"):
                _check(name, getattr(self, name) is None, getattr(self, name),
                       f"--{name.replace('_', '-')} is for the fine-tuning tasks "
                       f"({', '.join(n for n, t in TASKS.items() if t.with_labels)})")
        for name in ("vocab_size", "seq_len", "batch_size", "steps", "accumulation", "eval_every",
                     "eval_batches", "save_every", "keep", "log_every"):
            _pos_int(name, getattr(self, name))
        for name in ("max_documents", "stop_at"):
            if getattr(self, name) is not None:
                _pos_int(name, getattr(self, name))
        _check("seq_len", self.seq_len >= 8, self.seq_len, "must be at least 8")
        _check("stop_at", self.stop_at is None or self.stop_at <= self.steps, self.stop_at,
               f"--stop-at must be at most --steps {self.steps}: the run stops there anyway "
               "(--stop-at ends it early, and --resume continues to --steps)")
        _check("lr", _positive_finite(self.lr), self.lr, "must be a positive finite number")
        _check("warmup", isinstance(self.warmup, int) and 0 <= self.warmup < self.steps,
               self.warmup, f"must be an integer in [0, steps={self.steps}): the schedule warms up "
               "for --warmup updates, then decays until --steps; lower --warmup or raise --steps")
        max_len = dict(self.overrides).get("max_len", _preset_max_len(self.model))
        _check("seq_len", self.seq_len <= max_len, self.seq_len,
               f"{self.model} has max_len={max_len} positions; use --seq-len <= {max_len} (a "
               "RunConfig can raise it with overrides=(('max_len', N),))")
        _check("schedule", self.schedule in SCHEDULES, self.schedule, f"one of {', '.join(SCHEDULES)}")
        _check("drop_step", self.drop_step is None or self.schedule in DROPPING, self.drop_step,
               f"only --schedule drop uses --drop-step (got --schedule {self.schedule})")
        _check("drop_step", self.schedule not in DROPPING or (
            validation.is_int(self.drop_step) and self.warmup < self.drop_step <= self.steps),
            self.drop_step, f"--schedule drop needs --drop-step in ({self.warmup}, {self.steps}]: "
            "after --warmup, at most --steps")
        _check("dtype", self.dtype in ("float32", "bfloat16", "float16"), self.dtype,
               "one of float32, bfloat16, float16")
        _check("weight_decay", self.weight_decay >= 0, self.weight_decay, "must be >= 0")
        _check("clip_norm", self.clip_norm is None or self.clip_norm > 0, self.clip_norm,
               "must be > 0 (or None for no clipping)")
        _check("seed", isinstance(self.seed, int) and self.seed >= 0, self.seed, "must be an integer >= 0")
        _check("peak_tflops", self.peak_tflops is None or _positive_finite(self.peak_tflops),
               self.peak_tflops, "must be a positive finite number (TFLOP/s), or none to measure it")
        _check("parallel", self.parallel in PARALLEL_MODES, self.parallel,
               f"one of {', '.join(PARALLEL_MODES)}")
        _check("mesh", self.mesh is None or self.parallel in ("shard", "auto"), self.mesh,
               f"--mesh is only used with --parallel shard or auto (got --parallel {self.parallel})")
        if self.mesh is not None:
            MeshConfig.parse(self.mesh)   # ValueError naming the bad part
        bad = [k for k in self.allow_change if k not in CHANGEABLE_ON_RESUME]
        _check("allow_change", not bad, ",".join(bad),
               f"settings that may change on resume are {', '.join(CHANGEABLE_ON_RESUME)}")

    @property
    def micro_steps(self) -> int:
        """The steps the loop, its logs and checkpoints count: --steps updates of
        --accumulation micro-batches each."""
        return self.steps * self.accumulation

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


def _positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and value > 0


def _check_hf_data(data) -> None:
    """--data hf:NAME needs a name and the optional `datasets` package, checked here
    rather than as an ImportError once the run has started."""
    if not (isinstance(data, str) and data.startswith("hf:")):
        return
    _check("data", data[3:].strip() != "", data, "--data hf:NAME needs a dataset name, e.g. "
           "hf:wikitext")
    import importlib.util
    _check("data", importlib.util.find_spec("datasets") is not None, data,
           "--data hf:NAME needs the optional 'datasets' package, which is not installed (pip "
           "install 'transformer-jax[datasets]'); or give a .txt file or directory, or leave "
           "--data out for the embedded corpus")


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
