"""Presets of the LN-stability benchmark (Xiong et al. 2020, arXiv 2002.04745).

A preset fixes the data, the gradient-norm study and one training grid per task.
`quick` is the README's command (2 CPU cores, offline, minutes), `gpu` fills
about ten minutes of one H100/H200 or a TPU v5e, `paper` is the paper's scale
(defined, not run here), `micro` runs in seconds for the tests.

Placements are named as in the report: the four residual placements of
`transformer_jax.normalization` plus "pre-rms" (pre-LN with RMSNorm, Zhang &
Sennrich 2019, arXiv 1910.07467).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

from transformer_jax import validation
from transformer_jax.initializers import INIT_SCHEMES
from transformer_jax.models import get_config
from transformer_jax.training.schedules import SCHEDULES

# report name -> config fields
PLACEMENTS: dict[str, dict] = {
    "post": {"norm_placement": "post"},
    "pre": {"norm_placement": "pre"},
    "sandwich": {"norm_placement": "sandwich"},
    "deepnorm": {"norm_placement": "deepnorm"},
    "pre-rms": {"norm_placement": "pre", "norm_type": "rmsnorm"},
}
# task (training objective, `transformer_jax.training.TASKS`) -> (model preset, data:
# a `transformer_jax.data.pipeline.DATASETS` name)
TASKS = {"mlm": ("bert-tiny", "mlm"), "lm": ("gpt-tiny", "lm"),
         "seq2seq": ("transformer-tiny", "translation")}


@dataclasses.dataclass(frozen=True)
class Width:
    d_model: int = 32
    num_heads: int = 2
    d_ff: int = 128
    # `TransformerConfig.init`: "normal" = N(0, init_std^2) for every matrix (BERT's
    # 0.02, Devlin et al. 2018); "xavier" = per matrix N(0, 2 / (fan_in + fan_out)),
    # the initialisation Xiong et al. analyse and train with (their sec. 3.2).
    init_std: float = 0.02
    init: str = "normal"

    def __post_init__(self):
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"Width.init={self.init!r} is not valid; choose one of "
                             f"{', '.join(INIT_SCHEMES)}")


def _check_names(owner: str, task: str, placements) -> None:
    if task not in TASKS:
        raise ValueError(f"{owner}.task={task!r} is unknown; valid: {', '.join(TASKS)}")
    for p in placements:
        if p not in PLACEMENTS:
            raise ValueError(f"{owner}.placements has {p!r}; valid: {', '.join(PLACEMENTS)}")


@dataclasses.dataclass(frozen=True)
class GradNormStudy:
    """Gradients at initialization as Xiong et al. 2020's Fig. 3 measures them: per
    layer, the FFN W2 gradient averaged over `batches` mini-batches, then its
    Frobenius norm; per seed a fresh model. Their Fig. 3 is an encoder-decoder
    (IWSLT14 De-En, 6-6 layers, d 512, FFN 1024, 4 heads) with Xavier init."""
    width: Width = Width(d_model=64, num_heads=4, d_ff=128, init="xavier")
    task: str = "seq2seq"
    placements: tuple[str, ...] = tuple(PLACEMENTS)
    depths: tuple[int, ...] = (6, 12, 24)   # per stack: 6 = 6-6 layers for seq2seq
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 16
    batches: int = 8      # mini-batches whose gradients are averaged (per seed)
    eager: bool = False   # unused since layers are scanned (kept for old notebooks)

    def __post_init__(self):
        _check_names("GradNormStudy", self.task, self.placements)
        if self.batches < 1 or self.batch_size < 1:
            raise ValueError(f"GradNormStudy.batches={self.batches!r} and batch_size="
                             f"{self.batch_size!r} must be >= 1")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The training grid of one task: every placement is one vmapped program over
    peak_lrs x warmups x seeds (see docs/ln_experiment.md for how each preset's
    grid was chosen)."""
    task: str
    width: Width = Width()
    placements: tuple[str, ...] = ("post", "pre")
    num_layers: int = 6           # per stack (encoder and decoder for seq2seq)
    peak_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    warmups: tuple[int, ...] = (0, 120)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 300
    batch_size: int = 16
    eval_every: int = 30
    eval_batches: int = 4
    # After warm-up (`transformer_jax.training.schedules`): "linear" (to 0 at `steps`,
    # BERT, Devlin et al. 2018), "constant", "cosine" or "rsqrt" (inverse square root,
    # Vaswani et al. 2017, the schedule of Xiong et al.'s translation runs).
    decay: str = "linear"
    # (warm-up, decay) arms run beside warmups x decay, at every peak lr and seed:
    # ((0, "drop"),) is Xiong et al. 2020's schedule for pre-LN without warm-up (sec.
    # 4.1: constant, x0.1 at `drop_step`), run for both placements so that the two can
    # also be compared on one schedule. Each run's decay is a per-run array (as its lr
    # and warm-up are): the arms add runs to a group, not compilations.
    extra_arms: tuple[tuple[int, str], ...] = ()
    drop_step: int | None = None   # the "drop" schedule's update of the x0.1 drop
    # Adam as in Xiong et al. 2020's translation runs (and Vaswani et al. 2017):
    # beta2 = 0.98; no gradient clipping, so the optimizer alone decides whether a
    # run survives.
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.01
    seq_len: int | None = None    # None = the preset's
    # Layers as one `nn.scan` (`TransformerConfig.scan_layers`): one compiled layer, so
    # deep models compile in seconds (the accelerator presets); same function.
    scan_layers: bool = False
    # Runs re-done one by one with the same seeds, re-synchronised to the vmapped run
    # at every evaluation (the vmap equality check and the speed-up baseline), from
    # the first placement's grid; 0 = no check.
    check_runs: int = 0
    # At most this many runs per vmapped program (None = the whole grid): large
    # models' states do not all fit in one accelerator's memory.
    max_vmap: int | None = None
    # Translation only: the first `bleu_batches` validation batches are translated
    # greedily after training and scored with BLEU (`experiments/ln/bleu.py`); 0 = none.
    bleu_batches: int = 0

    def __post_init__(self):
        _check_names("Sweep", self.task, self.placements)
        if not 0 <= self.bleu_batches <= self.eval_batches or (
                self.bleu_batches and self.task != "seq2seq"):
            raise ValueError(f"Sweep.bleu_batches={self.bleu_batches!r} must be in [0, "
                             f"eval_batches={self.eval_batches}], and 0 unless task is "
                             f"'seq2seq' (task={self.task!r})")
        if self.check_runs < 0 or (self.max_vmap is not None and self.max_vmap < 1):
            raise ValueError(f"Sweep.check_runs={self.check_runs!r} must be >= 0 and "
                             f"max_vmap={self.max_vmap!r} None or >= 1")
        if self.decay not in SCHEDULES:
            raise ValueError(f"Sweep.decay={self.decay!r} is not valid; "
                             f"choose one of {', '.join(SCHEDULES)}")
        if self.steps % self.eval_every:
            raise ValueError(f"Sweep.steps={self.steps} must be a multiple of "
                             f"eval_every={self.eval_every}")
        if any(w >= self.steps for w in self.warmups):
            raise ValueError(f"Sweep.warmups={self.warmups} must be shorter than "
                             f"steps={self.steps}")
        for arm in self.extra_arms:
            if not (isinstance(arm, tuple) and len(arm) == 2 and arm[1] in SCHEDULES
                    and validation.is_int(arm[0]) and 0 <= arm[0] < self.steps):
                raise ValueError(f"Sweep.extra_arms has {arm!r}; each must be (warm-up in "
                                 f"[0, steps={self.steps}), decay in {', '.join(SCHEDULES)})")
        if "drop" in self.decays and not (
                validation.is_int(self.drop_step)
                and max(w for w, d in self.arms if d == "drop") < self.drop_step <= self.steps):
            raise ValueError(f"Sweep.drop_step={self.drop_step!r} must be an integer after the "
                             f"warm-ups of the 'drop' arms and at most steps={self.steps}")

    @property
    def arms(self) -> tuple[tuple[int, str], ...]:
        """Every (warm-up, decay) of the grid: warmups x decay, then extra_arms."""
        return tuple(dict.fromkeys([(w, self.decay) for w in self.warmups]
                                   + list(self.extra_arms)))

    @property
    def decays(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(d for _, d in self.arms))

    @property
    def runs_per_group(self) -> int:
        return len(self.peak_lrs) * len(self.arms) * len(self.seeds)


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    gradnorm: GradNormStudy
    sweeps: tuple[Sweep, ...]
    seq_len: int = 32
    vocab_size: int = 512
    corpus_chars: int | None = 400_000   # of the default corpus; None = all
    # The intended device and its assumed sustained FLOP/s on these small models, for
    # the time estimate printed at start (`bench.estimate`).
    device: str = "2 CPU cores"
    # 2 cores x ~25-30 GFLOP/s each, measured on the quick preset's programs.
    device_flops: float = 50e9
    compile_s: float = 15.0       # assumed seconds per XLA compilation there

    def fingerprint(self, part) -> str:
        """Hash of the settings a record depends on (the data and `part`, a study or
        a sweep): records from other settings are never reused."""
        blob = json.dumps([self.seq_len, self.vocab_size, self.corpus_chars,
                           dataclasses.asdict(part)], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def with_seeds(self, seeds: tuple[int, ...]) -> "Preset":
        """The same preset with another seed set (the check that verdicts do not depend
        on the seeds they were tuned on): a study or sweep of n seeds takes the first
        n of `seeds`, so every grid keeps its size."""
        seeds = tuple(seeds)
        need = max(len(p.seeds) for p in (self.gradnorm, *self.sweeps))
        if len(seeds) < need or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
            raise ValueError(f"seeds={seeds!r} must be at least {need} distinct non-negative "
                             f"integers for preset {self.name!r}")
        first = lambda part: dataclasses.replace(part, seeds=seeds[:len(part.seeds)])
        return dataclasses.replace(self, gradnorm=first(self.gradnorm),
                                   sweeps=tuple(map(first, self.sweeps)))


def model_config(preset: Preset, task: str, placement: str, num_layers: int, width: Width,
                 seq_len: int | None = None):
    """The model of `task` ("mlm" = BERT, "lm" = GPT, "seq2seq" = encoder-decoder with
    `num_layers` layers per stack) with `placement`, dropout off (Xiong et al.'s
    effect does not need it, and it would cost CPU time)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown; valid: {', '.join(TASKS)}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r} is unknown; valid: {', '.join(PLACEMENTS)}")
    extra = {"num_decoder_layers": num_layers} if task == "seq2seq" else {}
    # A seq2seq target is one token longer than its source (BOS / EOS).
    max_len = (seq_len or preset.seq_len) + (1 if task == "seq2seq" else 0)
    return get_config(TASKS[task][0], num_layers=num_layers, d_model=width.d_model,
                      num_heads=width.num_heads, d_ff=width.d_ff, max_len=max_len,
                      vocab_size=preset.vocab_size, dropout=0.0, attention_dropout=0.0,
                      init_std=width.init_std, init=width.init, **extra,
                      **PLACEMENTS[placement])



def sweep_config(preset: Preset, sweep: Sweep, placement: str):
    """The model every run of `sweep` with `placement` trains."""
    return model_config(preset, sweep.task, placement, sweep.num_layers, sweep.width,
                        sweep.seq_len).replace(scan_layers=sweep.scan_layers)


_MICRO_WIDTH = Width(d_model=16, num_heads=2, d_ff=32)
# Xiong et al.'s translation model (their sec. 4.1, Fig. 3: IWSLT14 De-En, d 512, FFN
# 1024, 4 heads) with Xavier init, and their optimizer: Adam (0.9, 0.98), inverse
# square root decay after warm-up, lr_max 5e-4 or 1e-3, warm-up T in {1, 500, 4000}.
_PAPER_MT = Width(d_model=512, num_heads=4, d_ff=1024, init="xavier")
# Their pre-LN translation schedule (sec. 4.1): no warm-up, lr constant, x0.1 at the
# 8th epoch of IWSLT14. The paper gives no updates per epoch; 153K pairs of ~25 tokens
# in 4,096-token batches make ~1,000 (our estimate), so the drop comes near update
# 8,000, twice the post-LN warm-up of 4,000: each preset's `drop_step` is twice its
# longest warm-up. Both placements run it (the same-schedule control of claim 2a).
_PAPER_PRE_LN = ((0, "drop"),)
# BERT-base / GPT-2-small widths (Devlin et al. 2018; Radford et al. 2019) with
# BERT's init; Xiong et al.'s BERT learning rates: post-LN 1e-4 with warm-up (3e-4
# diverged), pre-LN 3e-4 without; BERT's Adam b2 0.999 and linear decay.
_BASE_WIDTH = Width(d_model=768, num_heads=12, d_ff=3072, init_std=0.02)
_PAPER_SWEEP = dict(width=_BASE_WIDTH, num_layers=12, peak_lrs=(1e-4, 3e-4, 1e-3),
                    warmups=(0, 2000), steps=20_000, batch_size=128, eval_every=500,
                    eval_batches=20, b2=0.999, check_runs=2, max_vmap=3)

PRESETS: dict[str, Preset] = {
    "micro": Preset(
        "micro",
        # Every task, every program as small as it gets: XLA compilations (seconds
        # each on a CPU) are most of the time here.
        GradNormStudy(width=Width(d_model=16, num_heads=2, d_ff=32, init="xavier"),
                      placements=("post", "pre"), depths=(1, 2), seeds=(0, 1),
                      batch_size=2, batches=2),
        (Sweep("lm", width=_MICRO_WIDTH, placements=("post",), num_layers=1,
               peak_lrs=(1e-3, 1e-2), warmups=(0, 4), seeds=(0, 1), steps=8, batch_size=4,
               eval_every=4, eval_batches=1, check_runs=2),
         Sweep("mlm", width=_MICRO_WIDTH, placements=("post",), num_layers=1,
               peak_lrs=(1e-3,), warmups=(0, 4), seeds=(0,), steps=8, batch_size=4,
               eval_every=4, eval_batches=1),
         Sweep("seq2seq", width=_MICRO_WIDTH, placements=("post",), num_layers=1,
               peak_lrs=(1e-3,), warmups=(0, 4), seeds=(0,), steps=8, batch_size=4,
               eval_every=4, eval_batches=1, decay="rsqrt", extra_arms=_PAPER_PRE_LN,
               drop_step=6, bleu_batches=1)),
        seq_len=16, vocab_size=320, corpus_chars=150_000),
    # The README's command: 2 CPU cores, offline, 5-15 minutes (see docs/ln_experiment.md
    # for how each grid was found). Translation decides claims 2a/2b, BERT claim 3.
    "quick": Preset(
        "quick",
        GradNormStudy(placements=("post", "pre")),
        # Evaluated every 10 steps: the vmap check re-synchronises there, and over 30
        # steps chaotic phases of training grew 1-ulp differences to 8e-4 (measured).
        (Sweep("seq2seq", width=Width(d_model=64, num_heads=4, d_ff=128, init="xavier"),
               num_layers=3, peak_lrs=(5e-4, 1e-3), warmups=(0, 30, 120), seeds=(0, 1),
               steps=300, batch_size=32, eval_every=10, eval_batches=4, decay="rsqrt",
               extra_arms=_PAPER_PRE_LN, drop_step=240, seq_len=12, check_runs=2,
               bleu_batches=4),
         # BERT's init and b2 0.98 as the other legs; one seed (the cost of a run that
         # leaves the unigram plateau is ~40 CPU-s).
         Sweep("mlm", width=Width(d_model=128, num_heads=2, d_ff=512), num_layers=2,
               peak_lrs=(2e-3, 6e-3), warmups=(0, 100), seeds=(0,), steps=600,
               batch_size=32, eval_every=60, eval_batches=4)),
        seq_len=32, vocab_size=512, corpus_chars=400_000),
    # About ten minutes of one H100/H200 or TPU v5e: the paper's translation model,
    # 12-layer BERT and GPT at width 256, seq 128, thousands of steps, every task.
    "gpu": Preset(
        "gpu",
        GradNormStudy(width=_PAPER_MT, depths=(6, 24), seeds=tuple(range(10)),
                      batch_size=16, batches=8),
        # Evaluated every 10 steps on 4 batches, for the vmap check as in `quick` (10
        # steps is the re-synchronisation interval measured to hold there; 100 steps on 8
        # batches cost 2% less); GPT (no claim of the paper) trains 800 steps to pay for it.
        (Sweep("seq2seq", width=_PAPER_MT, num_layers=6, peak_lrs=(5e-4, 1e-3),
               warmups=(0, 100, 400), seeds=(0, 1), steps=1200, batch_size=32,
               eval_every=10, eval_batches=4, decay="rsqrt", extra_arms=_PAPER_PRE_LN,
               drop_step=800, seq_len=24, check_runs=1,
               scan_layers=True, bleu_batches=4),
         Sweep("mlm", width=Width(d_model=256, num_heads=4, d_ff=1024), num_layers=12,
               peak_lrs=(5e-4, 1e-3, 2e-3), warmups=(0, 300), seeds=(0,), steps=1200,
               batch_size=32, eval_every=100, eval_batches=8, scan_layers=True),
         Sweep("lm", width=Width(d_model=256, num_heads=4, d_ff=1024), num_layers=12,
               peak_lrs=(1e-3, 3e-3), warmups=(0, 300), seeds=(0,), steps=800,
               batch_size=32, eval_every=100, eval_batches=8, scan_layers=True)),
        seq_len=128, vocab_size=8192, corpus_chars=None,
        # A third of the rate measured for bf16 BERT-base on an H100 (120 TFLOP/s,
        # experiments/results/throughput): these programs are float32 and narrower.
        device="one H100/H200 or TPU v5e", device_flops=40e12, compile_s=15.0),
    # The paper's scale: about a day of one H100 (defined, not run here).
    "paper": Preset(
        "paper",
        GradNormStudy(width=_PAPER_MT, depths=(6, 8, 10, 12, 14, 24), seeds=tuple(range(10)),
                      batch_size=64, batches=32),
        (Sweep("seq2seq", width=_PAPER_MT, num_layers=6, peak_lrs=(5e-4, 1e-3),
               warmups=(0, 500, 4000), seeds=(0, 1, 2), steps=50_000, batch_size=128,
               eval_every=1000, eval_batches=20, decay="rsqrt", extra_arms=_PAPER_PRE_LN,
               drop_step=8000, seq_len=64, max_vmap=6,
               bleu_batches=20),
         Sweep("mlm", **_PAPER_SWEEP), Sweep("lm", **_PAPER_SWEEP)),
        seq_len=128, vocab_size=30522, corpus_chars=None,
        device="one H100", device_flops=100e12, compile_s=60.0),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown; valid: {', '.join(PRESETS)}")
    return PRESETS[name]
