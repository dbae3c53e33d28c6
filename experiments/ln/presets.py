"""Presets of the LN-stability benchmark (Xiong et al. 2020, arXiv 2002.04745).

A preset fixes the data, the gradient-norm study and one training grid per task.
`quick` is the README's command (2 CPU cores, offline, minutes), `paper` is sized
for an accelerator (defined, not run here), `micro` runs in seconds for the tests.

Placements are named as in the report: the four residual placements of
`transformer_jax.normalization` plus "pre-rms" (pre-LN with RMSNorm, Zhang &
Sennrich 2019, arXiv 1910.07467).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

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
class Width:
    d_model: int = 32
    num_heads: int = 2
    d_ff: int = 128
    # BERT's N(0, 0.02^2) (Devlin et al. 2018) by default. Xiong et al.'s analysis
    # assumes Xavier-scale weights, std ~ 1/sqrt(d) (their sec. 3.3).
    init_std: float = 0.02


def _check_names(owner: str, task: str, placements) -> None:
    if task not in TASKS:
        raise ValueError(f"{owner}.task={task!r} is unknown; valid: {', '.join(TASKS)}")
    for p in placements:
        if p not in PLACEMENTS:
            raise ValueError(f"{owner}.placements has {p!r}; valid: {', '.join(PLACEMENTS)}")


@dataclasses.dataclass(frozen=True)
class GradNormStudy:
    """Gradients at initialization (Xiong et al. 2020, sec. 3.3 and Fig. 3)."""
    # Xavier scale, std = 1/sqrt(d) (one std for every matrix: the library's init),
    # as their analysis assumes; BERT's 0.02 at this width gives near-identical
    # post-LN and pre-LN gradients (the residual branches are too small to matter).
    width: Width = Width(d_model=64, num_heads=4, d_ff=256, init_std=0.125)
    task: str = "mlm"
    placements: tuple[str, ...] = tuple(PLACEMENTS)
    depths: tuple[int, ...] = (6, 12, 24)
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 8
    eager: bool = True    # op by op (deep models) or jitted per (placement, depth)

    def __post_init__(self):
        _check_names("GradNormStudy", self.task, self.placements)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The training grid of one task: every placement is one vmapped program over
    peak_lrs x warmups x seeds.

    The defaults are the quick preset's, found by trial on 2 CPU cores: 6 layers of
    width 32 keep a (task, placement) near a minute. With BERT's init std 0.02 (with
    0.1, 12-layer post-LN stayed on the unigram plateau at every lr in 3e-3..3e-2,
    with and without warm-up), lr 1e-3 trains every run, 3e-3 separates post-LN
    without warm-up from the rest, 1e-2 breaks post-LN even with warm-up."""
    task: str
    width: Width = Width()
    placements: tuple[str, ...] = ("post", "pre")
    num_layers: int = 6
    peak_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    # 0 and a nominal warm-up, here 40% of the run: with 20% (60 of 300 steps) post-LN
    # at lr 3e-3 still stayed on the unigram plateau for 1 seed in 3 (quick preset).
    warmups: tuple[int, ...] = (0, 120)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 300
    batch_size: int = 16
    eval_every: int = 30
    eval_batches: int = 4
    decay: str = "linear"         # after warm-up: "linear" (to 0 at `steps`) or "constant"
    # Adam as in Xiong et al. 2020's translation runs (and Vaswani et al. 2017):
    # beta2 = 0.98; no gradient clipping, so the optimizer alone decides whether a
    # run survives.
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.01
    # Runs re-done one by one with the same seeds (the vmap equality check and the
    # speed-up baseline), from the first placement's grid; 0 = no check.
    check_runs: int = 0
    # At most this many runs per vmapped program (None = the whole grid): large
    # models' states do not all fit in one accelerator's memory.
    max_vmap: int | None = None

    def __post_init__(self):
        _check_names("Sweep", self.task, self.placements)
        if self.check_runs < 0 or (self.max_vmap is not None and self.max_vmap < 1):
            raise ValueError(f"Sweep.check_runs={self.check_runs!r} must be >= 0 and "
                             f"max_vmap={self.max_vmap!r} None or >= 1")
        if self.decay not in ("linear", "constant"):
            raise ValueError(f"Sweep.decay={self.decay!r} is not valid; "
                             "choose 'linear' or 'constant'")
        if self.steps % self.eval_every:
            raise ValueError(f"Sweep.steps={self.steps} must be a multiple of "
                             f"eval_every={self.eval_every}")

    @property
    def runs_per_group(self) -> int:
        return len(self.peak_lrs) * len(self.warmups) * len(self.seeds)


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    gradnorm: GradNormStudy
    sweeps: tuple[Sweep, ...]
    seq_len: int = 32
    vocab_size: int = 512
    corpus_chars: int | None = 400_000   # stdlib docstrings; None = all (~1.5M)

    def fingerprint(self, part) -> str:
        """Hash of the settings a record depends on (the data and `part`, a study or
        a sweep): records from other settings are never reused."""
        blob = json.dumps([self.seq_len, self.vocab_size, self.corpus_chars,
                           dataclasses.asdict(part)], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


_MICRO_WIDTH = Width(d_model=16, num_heads=2, d_ff=32)
# BERT-base / GPT-2-small widths (Devlin et al. 2018; Radford et al. 2019) with
# Xiong et al.'s BERT learning rates (post-LN 1e-4 with warm-up; 3e-4 diverged).
_BASE_WIDTH = Width(d_model=768, num_heads=12, d_ff=3072, init_std=0.02)
# 2 tasks x 2 placements x 18 runs of 20k steps: about a day of one H100 (a
# BERT-base step of 128 x 128 tokens takes ~0.05-0.1 s there), 3 runs per program;
# Adam b2 0.999 as BERT (Devlin et al. 2018), which Xiong et al.'s BERT runs follow.
_PAPER_SWEEP = dict(width=_BASE_WIDTH, num_layers=12, peak_lrs=(1e-4, 3e-4, 1e-3),
                    warmups=(0, 2000), steps=20_000, batch_size=128, eval_every=500,
                    eval_batches=20, b2=0.999, check_runs=2, max_vmap=3)

PRESETS: dict[str, Preset] = {
    "micro": Preset(
        "micro",
        # GPT only, every program as small as it gets, one placement in the sweep: XLA
        # compilations (seconds each on a CPU) are most of the time here.
        GradNormStudy(width=_MICRO_WIDTH, task="lm", placements=("post", "pre"), depths=(1, 2),
                      seeds=(0, 1), batch_size=2, eager=False),
        (Sweep("lm", width=_MICRO_WIDTH, placements=("post",), num_layers=1,
               peak_lrs=(1e-3, 1e-2), warmups=(0, 4), seeds=(0, 1), steps=8, batch_size=4,
               eval_every=4, eval_batches=1, check_runs=2),),
        seq_len=16, vocab_size=320, corpus_chars=150_000),
    "quick": Preset(
        "quick", GradNormStudy(),
        (Sweep("lm", check_runs=3),
         # MLM sees ~6x fewer targets per step than LM and must learn attention to
         # beat the unigram baseline: within a CPU budget no run leaves that plateau
         # (tried: 300 steps at lr <= 1e-2, 100 steps at lr <= 0.1), so its grid is shorter.
         Sweep("mlm", steps=100, eval_every=20, warmups=(0, 40)))),
    "paper": Preset(
        "paper",
        GradNormStudy(width=Width(d_model=512, num_heads=8, d_ff=2048, init_std=512 ** -0.5),
                      depths=(6, 12, 24, 48), seeds=(0, 1, 2, 3, 4), batch_size=32),
        (Sweep("mlm", **_PAPER_SWEEP), Sweep("lm", **_PAPER_SWEEP)),
        seq_len=128, vocab_size=30522, corpus_chars=None),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown; valid: {', '.join(PRESETS)}")
    return PRESETS[name]


def model_config(preset: Preset, task: str, placement: str, num_layers: int, width: Width):
    """The model of `task` ("mlm" = BERT, "lm" = GPT) with `placement`, dropout off
    (Xiong et al.'s effect does not need it, and it would cost CPU time)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown; valid: {', '.join(TASKS)}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r} is unknown; valid: {', '.join(PLACEMENTS)}")
    return get_config(TASKS[task][0], num_layers=num_layers, d_model=width.d_model,
                      num_heads=width.num_heads, d_ff=width.d_ff, max_len=preset.seq_len,
                      vocab_size=preset.vocab_size, dropout=0.0, attention_dropout=0.0,
                      init_std=width.init_std, **PLACEMENTS[placement])
