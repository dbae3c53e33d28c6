"""Presets of the LN-stability benchmark (Xiong et al. 2020, arXiv 2002.04745).

A preset fixes the model shapes, the data, the gradient-norm study and the
training grid. `quick` is the README's command (2 CPU cores, offline, minutes),
`paper` is sized for an accelerator, `micro` runs in seconds for the tests.

Placements are named as in the report: the four residual placements of
`transformer_jax.normalization` plus "pre-rms" (pre-LN with RMSNorm, Zhang &
Sennrich 2019, arXiv 1910.07467).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math

from transformer_jax.models import get_config

# report name -> config fields
PLACEMENTS: dict[str, dict] = {
    "post": {"norm_placement": "post"},
    "pre": {"norm_placement": "pre"},
    "sandwich": {"norm_placement": "sandwich"},
    "deepnorm": {"norm_placement": "deepnorm"},
    "pre-rms": {"norm_placement": "pre", "norm_type": "rmsnorm"},
}
# task (training objective) -> (model preset, data pipeline)
TASKS = {"mlm": ("bert-tiny", "bert"), "lm": ("gpt-tiny", "gpt")}


@dataclasses.dataclass(frozen=True)
class ModelShape:
    d_model: int = 64
    num_heads: int = 4
    d_ff: int = 256
    seq_len: int = 64
    vocab_size: int = 1024
    # None = BERT's 0.02 rescaled to this width: 0.02 * sqrt(768 / d_model), so that
    # std * sqrt(d) (the scale of a layer's output at init) matches BERT-base's.
    init_std: float | None = None

    @property
    def std(self) -> float:
        return self.init_std if self.init_std is not None else 0.02 * math.sqrt(768 / self.d_model)


@dataclasses.dataclass(frozen=True)
class GradNormStudy:
    """Gradients at initialization (Xiong et al. 2020, sec. 3.3 and Fig. 3)."""
    task: str = "mlm"
    placements: tuple[str, ...] = tuple(PLACEMENTS)
    depths: tuple[int, ...] = (6, 12, 24)
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 8


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The training grid: every (task, placement) is one vmapped program over
    lrs x warmups x seeds."""
    tasks: tuple[str, ...] = ("mlm", "lm")
    placements: tuple[str, ...] = ("post", "pre")
    num_layers: int = 6
    peak_lrs: tuple[float, ...] = (5e-4, 1e-3, 2e-3)
    warmups: tuple[int, ...] = (0, 50)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 200
    batch_size: int = 16
    eval_every: int = 20
    eval_batches: int = 4
    decay: str = "linear"         # after warm-up: "linear" (to 0 at `steps`) or "constant"
    # Adam as Xiong et al. 2020 (sec. 4): beta2 = 0.98; no gradient clipping, so
    # that the optimizer alone decides whether a run survives.
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.01
    # Runs re-done one by one with the same seeds: the vmap equality check and the
    # speed-up baseline. A few, spread over the grid of the first (task, placement).
    check_runs: int = 3

    @property
    def runs_per_group(self) -> int:
        return len(self.peak_lrs) * len(self.warmups) * len(self.seeds)


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    model: ModelShape
    gradnorm: GradNormStudy
    sweep: Sweep
    corpus_chars: int | None = 400_000   # stdlib docstrings; None = all (~1.5M)

    def fingerprint(self) -> str:
        """Hash of every setting: records from another preset are never reused."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


PRESETS: dict[str, Preset] = {
    "micro": Preset(
        "micro", ModelShape(d_model=32, num_heads=2, d_ff=64, seq_len=16, vocab_size=320),
        GradNormStudy(placements=("post", "pre"), depths=(2, 4), seeds=(0,), batch_size=2),
        Sweep(num_layers=2, peak_lrs=(1e-3, 1e-2), warmups=(0, 4), seeds=(0, 1), steps=8,
              batch_size=4, eval_every=4, eval_batches=1, check_runs=2),
        corpus_chars=60_000),
    "quick": Preset("quick", ModelShape(), GradNormStudy(), Sweep()),
    # BERT-base / GPT-2-small shapes (Devlin et al. 2018; Radford et al. 2019) with
    # Xiong et al.'s learning rates for BERT (1e-4 post-LN with warm-up, up to 3e-4).
    "paper": Preset(
        "paper",
        ModelShape(d_model=768, num_heads=12, d_ff=3072, seq_len=128, vocab_size=30522,
                   init_std=0.02),
        GradNormStudy(depths=(6, 12, 24, 48), seeds=(0, 1, 2, 3, 4), batch_size=32),
        Sweep(num_layers=12, peak_lrs=(1e-4, 3e-4, 5e-4, 1e-3), warmups=(0, 500, 4000),
              seeds=(0, 1, 2), steps=20_000, batch_size=128, eval_every=500, eval_batches=20,
              b2=0.999, check_runs=2),
        corpus_chars=None),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown; valid: {', '.join(PRESETS)}")
    return PRESETS[name]


def model_config(preset: Preset, task: str, placement: str, num_layers: int):
    """The model of `task` ("mlm" = BERT, "lm" = GPT) with `placement`, dropout off
    (Xiong et al.'s effect does not need it, and it would cost CPU time)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown; valid: {', '.join(TASKS)}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r} is unknown; valid: {', '.join(PLACEMENTS)}")
    m = preset.model
    return get_config(TASKS[task][0], num_layers=num_layers, d_model=m.d_model,
                      num_heads=m.num_heads, d_ff=m.d_ff, max_len=m.seq_len,
                      vocab_size=m.vocab_size, dropout=0.0, attention_dropout=0.0,
                      init_std=m.std, **PLACEMENTS[placement])
