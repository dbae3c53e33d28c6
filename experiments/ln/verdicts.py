"""A verdict per claim of Xiong et al. 2020 (arXiv 2002.04745), with its numbers.

Each verdict is "supported", "refuted" or "inconclusive", followed by the
evidence a reader can check against the tables. *Inconclusive* is used only when
the runs that would decide a claim did not learn (diverged, or never left the
unigram plateau), and the evidence then names those runs.

Claims 2b and 3 are framed as the paper frames them (sec. 4, Fig. 2 and 4): each
placement at its own best setting of the grid, pre-LN without warm-up against
post-LN with warm-up, and the updates each needs to reach the loss that
post-LN-with-warm-up ends at (steps-to-target). A setting is (peak lr, warm-up,
decay): the paper trains pre-LN on its own schedule (sec. 4.1: no warm-up, constant,
x0.1 at the 8th epoch; the "drop" arm), and the report names post-LN on that same
setting beside it (the control the paper does not run). Warm-up claims are decided on
the paper's own setting, translation (`seq2seq`), where the preset has it; other
tasks are reported beside it. The equal-learning-rate comparison is a secondary
table of the report (`equal_lr_rows`).
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import numpy as np

from experiments.ln.analysis import PLATEAU_MARGIN

SUPPORTED, REFUTED, INCONCLUSIVE = "supported", "refuted", "inconclusive"
MIN_GAP = 0.02   # nats: a smaller difference in final loss is not called "measurable"
# The task that decides the warm-up claims when a preset has it: the paper's setting.
PAPER_TASK = "seq2seq"
TASK_NAMES = {"seq2seq": "translation", "mlm": "BERT (MLM)", "lm": "GPT (LM)"}
SPREAD_TEXT = "mean ± sample std over seeds"   # how fmt's 'm ± s' reads, in tables and plots


@dataclasses.dataclass
class Verdict:
    claim: str
    status: str
    evidence: list[str]


def spread(values) -> float:
    """The sample standard deviation over seeds (ddof=1, the root of the unbiased
    variance; with the 2-3 seeds of a preset the ddof=0 one is 29% / 18% smaller),
    0 for one value. The same estimate as `_worse`'s standard error."""
    v = np.asarray(values, float)
    return float(v.std(ddof=1)) if v.size > 1 else 0.0


def fmt(values, digits: int = 3) -> str:
    """'m ± s' over finite values: s the sample std (`spread`) to one significant digit,
    m to `digits` significant digits but at least to s's decimal place and at most one
    digit past it (4.801 ± 0.006, not 4.8 ± 0.006; 0.50 ± 0.3; 2.0 ± 1); one value, or
    no spread, to `digits` significant digits; 'n/a' if none."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], float)
    if not v.size:
        return "n/a"
    if v.size == 1:
        return f"{v[0]:.{digits}g}"
    s = float(f"{spread(v):.1g}")
    if s == 0:
        return f"{v.mean():.{digits}g} ± 0"
    decimals = max(0, -math.floor(math.log10(s)))
    m = float(v.mean())
    significant = digits - 1 - math.floor(math.log10(abs(m))) if m else 0
    return f"{m:.{min(max(decimals, significant), decimals + 1)}f} ± {s:.{decimals}f}"


def failed(run: dict) -> bool:
    """Did not learn: diverged, or never left the unigram plateau."""
    return run["diverged"] or not run["escaped_plateau"]


# ---------------------------------------------------------------- claim 1

def top_layer_means(gn_rows: list[dict], group: str = "w2") -> dict:
    """{(placement, depth): [last-layer norm per seed]} (the layer next to the output)."""
    out = defaultdict(list)
    for r in gn_rows:
        out[(r["placement"], r["depth"])].append(r[group][-1])
    return out


def _slope(depths, values) -> float:
    # Exponent of a power law fitted to mean norm vs depth (log-log least squares).
    return float(np.polyfit(np.log(depths), np.log(values), 1)[0])


def claim1(gn_rows: list[dict]) -> list[Verdict]:
    """1a: last layer vs depth (Theorem 1, Fig. 3c-d); 1b: the per-layer profile (Fig. 3a-b)."""
    claim = ("1a. At initialization post-LN's last-layer FFN W2 gradient is larger than "
             "pre-LN's, by a gap that grows with depth (post-LN's does not shrink with L, "
             "pre-LN's ~ 1/sqrt(L); Theorem 1, Fig. 3c-d)")
    claim_b = ("1b. Per layer, post-LN's W2 gradient grows toward the output while pre-LN's "
               "stays flat (Fig. 3a-b)")
    tops = top_layer_means(gn_rows)
    depths = sorted({d for p, d in tops if p == "post"} & {d for p, d in tops if p == "pre"})
    if not depths:
        return [Verdict(c, INCONCLUSIVE, ["no post-LN and pre-LN records at a common depth"])
                for c in (claim, claim_b)]
    post = [float(np.mean(tops[("post", d)])) for d in depths]
    pre = [float(np.mean(tops[("pre", d)])) for d in depths]
    ratios = [a / b for a, b in zip(post, pre)]
    evidence = [f"last-layer |mean dL/dW2| at L = {', '.join(map(str, depths))}: post-LN "
                f"{', '.join(fmt(tops[('post', d)]) for d in depths)}; pre-LN "
                f"{', '.join(fmt(tops[('pre', d)]) for d in depths)} ({SPREAD_TEXT})",
                f"post/pre ratio: {', '.join(f'{r:.2f}' for r in ratios)}"]
    grows = len(ratios) > 1 and ratios[-1] > ratios[0]
    if len(depths) > 1:
        sp, sq = _slope(depths, post), _slope(depths, pre)
        evidence.append(f"fitted exponent of the mean in L: post-LN {sp:+.2f}, pre-LN {sq:+.2f} "
                        "(theory: 0 and -0.5)")
    status = SUPPORTED if all(r > 1 for r in ratios) and grows else REFUTED
    if len(depths) < 2:   # the claim is about growth with depth
        status = INCONCLUSIVE
        evidence.append("one depth only: how the ratio changes with depth is not measured")
    # A 1-layer stack's top and bottom quarter are one layer: the profile needs >= 2.
    deep = [d for d in depths if d >= 2]
    profile = (_layer_profile(claim_b, gn_rows, min(deep)) if deep else Verdict(
        claim_b, INCONCLUSIVE, [f"only {depths[0]}-layer stacks were measured: a stack needs "
                                "2 or more layers to have a top and a bottom to compare"]))
    return [Verdict(claim, status, evidence), profile]


def profile_ratio(gn_rows, placement, depth, stack_index) -> float | None:
    """Top-quarter / bottom-quarter mean of the per-layer W2 norm in one stack."""
    rows = [r["w2"] for r in gn_rows if r["placement"] == placement and r["depth"] == depth]
    if not rows:
        return None
    mean = np.mean(rows, axis=0)[stack_index * depth:(stack_index + 1) * depth]
    q = max(1, depth // 4)
    return float(mean[-q:].mean() / mean[:q].mean())


def _layer_profile(claim, gn_rows, depth) -> Verdict:
    """Decided on the stack that ends at the output (the decoder of an encoder-decoder,
    the only stack otherwise): Theorem 1's gradient is the one flowing down from the
    loss. The encoder's profile is reported beside it."""
    stacks = next(r.get("stacks", ["stack"]) for r in gn_rows)
    ratio = {(p, s): profile_ratio(gn_rows, p, depth, i) for p in ("post", "pre")
             for i, s in enumerate(stacks)}
    top = stacks[-1]
    post, pre = ratio[("post", top)], ratio[("pre", top)]
    q = max(1, depth // 4)
    evidence = [f"{depth}-layer {s}: mean |dL/dW2| of the top {q} layer(s) / the bottom {q}: "
                f"post-LN {ratio[('post', s)]:.2f}, pre-LN {ratio[('pre', s)]:.2f}"
                for s in stacks]
    evidence.append(f"decided on the {top}, the stack that ends at the output: supported if "
                    "post-LN's ratio is > 1 and pre-LN's is closer to 1 (in log) than post-LN's")
    flatter = abs(math.log(pre)) < abs(math.log(post))
    return Verdict(claim, SUPPORTED if post > 1 and flatter else REFUTED, evidence)


# ---------------------------------------------------------------- claims 2 and 3

def cell(runs, task, placement, lr, warmup, decay) -> list[dict]:
    return [r for r in runs if (r["task"], r["placement"], r["warmup"], r["decay"])
            == (task, placement, warmup, decay) and math.isclose(r["peak_lr"], lr)]


def arms(runs) -> list[tuple[int, str]]:
    """The (warm-up, decay) pairs of `runs`, warm-up first, the drop arm after rsqrt's."""
    return sorted({(r["warmup"], r["decay"]) for r in runs}, key=lambda a: (a[1] == "drop", a))


def arm_label(warmup: int, decay: str) -> str:
    return f"warm-up {warmup}, {decay}"


def _cells(runs, task, placement, warmups=None) -> dict:
    """{(lr, warmup, decay): runs} of one (task, placement), optionally only some warm-ups."""
    out = defaultdict(list)
    for r in runs:
        if (r["task"], r["placement"]) == (task, placement) and (
                warmups is None or r["warmup"] in warmups):
            out[(r["peak_lr"], r["warmup"], r["decay"])].append(r)
    return dict(out)


def _final(c) -> float:
    v = [r["final_val_loss"] for r in c]
    return math.inf if any(x is None for x in v) else float(np.mean(v))


def best_cell(runs, task, placement, warmups=None):
    """((lr, warmup, decay), runs) of the cell with the lowest mean final validation loss."""
    cells = _cells(runs, task, placement, warmups)
    if not cells:
        return None, []
    key = min(cells, key=lambda k: (_final(cells[k]), k))
    return key, cells[key]


def mean_curve(c: list[dict]) -> tuple[list[int], np.ndarray]:
    curves = np.array([[np.nan if v is None else v for v in r["val_loss"]] for r in c])
    return c[0]["val_steps"], curves.mean(0)


def steps_to(c: list[dict], target: float) -> int | None:
    """First evaluated step at which the cell's mean validation curve is <= target."""
    steps, curve = mean_curve(c)
    hit = np.flatnonzero(curve <= target + 1e-9)
    return int(steps[hit[0]]) if hit.size else None


def bleus(runs: list[dict]) -> list[float]:
    """The runs' BLEU scores, where they were scored (translation)."""
    return [r["bleu"] for r in runs if r.get("bleu") is not None]


def describe(cell_runs: list[dict]) -> str:
    """'diverged 2/3 (steps 41, 57), plateau 1/3, final val loss 5.1 ± 0.1'."""
    if not cell_runs:
        return "no runs"
    n, div = len(cell_runs), [r for r in cell_runs if r["diverged"]]
    stuck = sum(not r["escaped_plateau"] and not r["diverged"] for r in cell_runs)
    text = f"diverged {len(div)}/{n}"
    if div:
        text += f" (steps {', '.join(str(r['diverged_at']) for r in div)})"
    if stuck:
        text += f", stayed on the unigram plateau {stuck}/{n}"
    text += f", final val loss {fmt([r['final_val_loss'] for r in cell_runs])}"
    scores = bleus(cell_runs)
    return text + (f", BLEU {fmt(scores)}" if scores else "")


def _name(task, placement, key) -> str:
    lr, wu, decay = key
    return f"{task}/{placement}/lr{lr:g}/wu{wu}-{decay}"


def _not_learned(c) -> list[str]:
    return [r["run_id"] for r in c if failed(r)]


def _mostly_failed(c) -> bool:
    return bool(c) and 2 * sum(map(failed, c)) > len(c)


def _worse(a: list[dict], b: list[dict]) -> bool:
    """Final loss of cell a measurably above cell b's: by MIN_GAP and 2 standard errors
    of the difference of the means (Welch's; each variance the unbiased, ddof=1,
    estimate: with 2-3 seeds the ddof=0 one is a third to a half too small)."""
    x = np.array([r["final_val_loss"] for r in a if r["final_val_loss"] is not None])
    y = np.array([r["final_val_loss"] for r in b if r["final_val_loss"] is not None])
    if not x.size or not y.size:
        return bool(x.size < len(a))          # a non-finite final loss is worse
    var = lambda v: v.var(ddof=1) / v.size if v.size > 1 else 0.0   # 1 seed: MIN_GAP alone
    se = math.sqrt(var(x) + var(y))
    return bool(x.mean() - y.mean() > max(MIN_GAP, 2 * se))


def _tasks(runs) -> list[str]:
    present = list(dict.fromkeys(r["task"] for r in runs))
    return sorted(present, key=lambda t: (t != PAPER_TASK, t))


def _no_warmup_pairs(t_runs, task, lr) -> list[tuple[str, list, list]]:
    """[(decay, post-LN cell, pre-LN cell)] without warm-up at `lr`, for every decay
    both placements ran without warm-up: the same-schedule comparisons."""
    decays = [d for w, d in arms(t_runs) if w == 0]
    pairs = [(d, cell(t_runs, task, "post", lr, 0, d), cell(t_runs, task, "pre", lr, 0, d))
             for d in decays]
    return [(d, pn, rn) for d, pn, rn in pairs if pn and rn]


def _penalties(t_runs, task, lr, decay) -> str:
    """' (removing warm-up costs post-LN +0.46, pre-LN +0.47 nats)': each placement's
    final loss without warm-up minus with its best warm-up, on `decay` at `lr`."""
    at = [r for r in t_runs if math.isclose(r["peak_lr"], lr) and r["decay"] == decay]
    parts = []
    for placement in ("post", "pre"):
        _, warm = best_cell(at, task, placement, sorted({r["warmup"] for r in at if r["warmup"]}))
        cold = cell(at, task, placement, lr, 0, decay)
        if warm and cold and math.isfinite(_final(warm)) and math.isfinite(_final(cold)):
            parts.append(f"{placement}-LN {_final(cold) - _final(warm):+.2f}")
    return f" (removing warm-up costs {', '.join(parts)} nats)" if parts else ""


def warmup_verdict(runs, task) -> tuple[str, list[str]]:
    """2a on one task: at some peak lr, post-LN without warm-up fails or ends measurably
    worse than post-LN with its best warm-up there, on the same decay (the paper's sec.
    3.2: rsqrt after warm-up T in {1, 500, 4000}); and pre-LN without warm-up learns
    and ends measurably better than post-LN without warm-up on one schedule (or post-LN
    failed there). The second half compares the placements on one schedule: a schedule
    that hurts both alike is not the claim, and neither is one that helps both."""
    t_runs = [r for r in runs if r["task"] == task]
    warmups = sorted({r["warmup"] for r in t_runs})
    if 0 not in warmups or len(warmups) < 2:
        return INCONCLUSIVE, [f"{task}: no run pair with and without warm-up"]
    lines, holds, undecided = [], False, []
    for lr in sorted({r["peak_lr"] for r in t_runs}):
        key, pw = best_cell([r for r in t_runs if math.isclose(r["peak_lr"], lr)], task,
                            "post", [w for w in warmups if w])
        pairs = _no_warmup_pairs(t_runs, task, lr)
        if not (pw and pairs):
            continue
        pn = cell(t_runs, task, "post", lr, 0, key[2])
        bad = bool(pn) and ((_mostly_failed(pn) and not _mostly_failed(pw)) or _worse(pn, pw))
        if _mostly_failed(pw) and (not pn or _mostly_failed(pn)):
            undecided += _not_learned(pw)
        lines.append(f"{task}, lr {lr:g}, {key[2]}: post-LN without warm-up: {describe(pn)}; "
                     f"post-LN warm-up {key[1]}: {describe(pw)} -> "
                     + ("post-LN hurt without warm-up" if bad else
                        "post-LN fails with warm-up too" if _mostly_failed(pw) else
                        "post-LN not hurt") + _penalties(t_runs, task, lr, key[2]))
        for decay, post0, pre0 in pairs:
            # Pre-LN "trains well without it": it learns, and better than post-LN does
            # without warm-up on the same schedule.
            ok = not _mostly_failed(pre0) and (_mostly_failed(post0) or _worse(post0, pre0))
            holds |= bad and ok
            lines.append(f"{task}, lr {lr:g}, no warm-up, {decay}: post-LN {describe(post0)}; "
                         f"pre-LN {describe(pre0)} -> " + (
                             "pre-LN better" if ok else "pre-LN fails too"
                             if _mostly_failed(pre0) else "pre-LN not better"))
    if holds:
        return SUPPORTED, lines
    if not lines:
        return INCONCLUSIVE, [f"{task}: post-LN with and without warm-up or pre-LN without "
                              "warm-up missing"]
    if undecided:
        return INCONCLUSIVE, lines + [f"{task}: did not learn with warm-up either: "
                                      f"{', '.join(undecided)}"]
    return REFUTED, lines


def speed(runs: list[dict], task: str) -> tuple[str, list[str], dict]:
    """Steps-to-target (Xiong et al. Fig. 2 and 4): the updates pre-LN without warm-up
    (its best lr) needs to reach the best final validation loss of post-LN with
    warm-up (its best lr and warm-up), against the updates post-LN needs itself."""
    t_runs = [r for r in runs if r["task"] == task]
    warm = sorted({r["warmup"] for r in t_runs if r["warmup"]})
    key_post, post = best_cell(t_runs, task, "post", warm)
    key_pre, pre = best_cell(t_runs, task, "pre", [0])
    if not post or not pre:
        return INCONCLUSIVE, [f"{task}: post-LN with warm-up or pre-LN without warm-up missing"], {}
    if _not_learned(post) or _not_learned(pre):
        names = _not_learned(post) + _not_learned(pre)
        return INCONCLUSIVE, [f"{task}: the deciding runs did not learn: {', '.join(names)}"], {}
    target = _final(post)
    s_post, s_pre = steps_to(post, target), steps_to(pre, target)
    info = {"target": target, "post": (key_post, s_post), "pre": (key_pre, s_pre)}
    text = (f"{task}: target = best final val loss of post-LN with warm-up "
            f"({_name(task, 'post', key_post)}, "
            f"{f'mean of {len(post)} seeds' if len(post) > 1 else 'one seed'}) = {target:.3f}, "
            f"reached at step {s_post}; pre-LN without warm-up at its best setting "
            f"({_name(task, 'pre', key_pre)}, final {_final(pre):.3f}) reaches it at step "
            f"{_when(s_pre)}")
    # The same-schedule control: post-LN on pre-LN's best setting.
    same = cell(t_runs, task, "post", *key_pre)
    control = ([f"{task}, control: post-LN on that setting ({_name(task, 'post', key_pre)}): "
                f"{describe(same)}, reaches the target at step "
                f"{_when(steps_to(same, target)) if not _not_learned(same) else 'n/a'}"]
               if same else [])
    if s_pre is None or s_pre >= s_post:
        return REFUTED, [text, *control], info
    return SUPPORTED, [text + f": {100 * (1 - s_pre / s_post):.0f}% fewer updates "
                       "(paper, BERT: ~30-40%)", *control], info


def _when(step) -> str:
    return str(step) if step is not None else "never (within the run)"


def _speed_and_equal_lr(runs, task) -> tuple[str, list[str]]:
    """2b's verdict (`speed`), with the equal-lr comparison (secondary) as evidence."""
    status, lines, _ = speed(runs, task)
    for lr, post_arm, post, pre_decay, pre, s_post, s_pre in equal_lr_rows(runs, task):
        lines.append(f"{task}, secondary, the same lr_max {lr} (the paper's sec. 4.2 sentence): "
                     f"post-LN ({post_arm}) ends at {post}, step {s_post}; pre-LN without "
                     f"warm-up ({pre_decay}) ends at {pre}, reaches that at step {s_pre}")
    return status, lines


def claim2(runs: list[dict]) -> list[Verdict]:
    """2a: warm-up; 2b: pre-LN without warm-up converges faster. Decided on the paper's
    setting (translation) when present, other tasks reported as further evidence."""
    claim_a = ("2a. Without warm-up post-LN diverges or ends far worse than with warm-up, "
               "while pre-LN trains well without it (sec. 3.2, Fig. 2; pre-LN: sec. 4)")
    claim_b = ("2b. Pre-LN without warm-up reaches post-LN-with-warm-up's best validation "
               "loss in fewer updates (each at its best setting; sec. 4.1, Fig. 2)")
    tasks = [t for t in _tasks(runs) if t != "mlm"]
    if not tasks:
        return [Verdict(c, INCONCLUSIVE, ["no translation or LM sweep in this preset"])
                for c in (claim_a, claim_b)]
    out = []
    for claim, decide in ((claim_a, warmup_verdict), (claim_b, _speed_and_equal_lr)):
        results = {t: decide(runs, t) for t in tasks}
        status = results[tasks[0]][0]
        evidence = [f"decided on {TASK_NAMES[tasks[0]]}" + (
            f"; also {', '.join(f'{TASK_NAMES[t]}: {results[t][0]}' for t in tasks[1:])}"
            if len(tasks) > 1 else "")]
        evidence += [line for t in tasks for line in results[t][1]]
        out.append(Verdict(claim, status, evidence))
    return out


def claim3(runs: list[dict]) -> Verdict:
    claim = ("3. BERT: pre-LN without warm-up reaches post-LN-with-warm-up's best MLM "
             "validation loss in fewer updates (sec. 4.2, Fig. 4: ~40% fewer)")
    m_runs = [r for r in runs if r["task"] == "mlm"]
    if not m_runs:
        return Verdict(claim, INCONCLUSIVE, ["no BERT sweep in this preset"])
    status, evidence, _ = speed(runs, "mlm")
    unigram = m_runs[0]["unigram_loss"]
    for placement in ("post", "pre"):
        key, c = best_cell(m_runs, "mlm", placement)
        if c:
            evidence.append(f"mlm, best {placement}-LN setting {_name('mlm', placement, key)}: "
                            f"final MLM loss {fmt([r['final_val_loss'] for r in c])}: "
                            f"unigram baseline {unigram:.3f} - final = {unigram - _final(c):+.2f}"
                            " nats (the quick preset aims at >= 0.3)")
    lr = max(r["peak_lr"] for r in m_runs)
    c = [r for r in m_runs if r["placement"] == "post" and math.isclose(r["peak_lr"], lr)]
    evidence.append(f"mlm, post-LN at the highest lr {lr:g}, all schedules: {describe(c)}")
    escaped = sum(r["escaped_plateau"] for r in m_runs)
    evidence.append(f"mlm: {escaped}/{len(m_runs)} runs got {PLATEAU_MARGIN} nats below the "
                    f"unigram baseline within {m_runs[0]['steps']} steps")
    return Verdict(claim, status, evidence)


def all_verdicts(gn_rows, runs) -> list[Verdict]:
    return [*claim1(gn_rows), *claim2(runs), claim3(runs)]


def equal_lr_rows(runs, task) -> list[list]:
    """The secondary comparison (the paper's "using the same lr_max", sec. 4.2): at each
    peak lr, post-LN with its best warm-up vs pre-LN without warm-up at its best
    schedule, final loss and steps to post-LN's final loss there."""
    t_runs = [r for r in runs if r["task"] == task]
    warm = sorted({r["warmup"] for r in t_runs if r["warmup"]})
    rows = []
    for lr in sorted({r["peak_lr"] for r in t_runs}):
        at = [r for r in t_runs if math.isclose(r["peak_lr"], lr)]
        key, post = best_cell(at, task, "post", warm)
        pre_key, pre = best_cell(at, task, "pre", [0])
        if not post or not pre:
            continue
        target = _final(post)
        rows.append([f"{lr:g}", arm_label(*key[1:]), fmt([r["final_val_loss"] for r in post]),
                     pre_key[2], fmt([r["final_val_loss"] for r in pre]),
                     steps_to(post, target) if math.isfinite(target) else "n/a",
                     (steps_to(pre, target) if math.isfinite(target) else None) or "never"])
    return rows
