"""A verdict per claim of Xiong et al. 2020 (arXiv 2002.04745), with its numbers.

Each verdict is one of "supported", "partly supported", "not reproduced at this
scale" or "not enough data", followed by the evidence a reader can check against
the tables: means and standard deviations over seeds, counts of failed runs and
the steps at which they failed.
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import numpy as np

from experiments.ln.analysis import PLATEAU_MARGIN, steps_to_target

SUPPORTED, PARTLY, NOT_REPRODUCED, NO_DATA = (
    "supported", "partly supported", "not reproduced at this scale", "not enough data")
MIN_GAP = 0.02   # nats: a smaller difference in final loss is not called "measurable"


@dataclasses.dataclass
class Verdict:
    claim: str
    status: str
    evidence: list[str]


def fmt(values, digits: int = 3) -> str:
    """'m ± s' over finite values ('n/a' if none)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], float)
    if not v.size:
        return "n/a"
    return f"{v.mean():.{digits}g} ± {v.std():.1g}" if v.size > 1 else f"{v[0]:.{digits}g}"


def failed(run: dict) -> bool:
    """Diverged, or never left the unigram plateau."""
    return run["diverged"] or not run["escaped_plateau"]


# ---------------------------------------------------------------- claim 1

def top_layer_means(gn_rows: list[dict], group: str = "w2") -> dict:
    """{(placement, depth): [last-layer norm per seed]}."""
    out = defaultdict(list)
    for r in gn_rows:
        out[(r["placement"], r["depth"])].append(r[group][-1])
    return out


def _slope(depths, values) -> float:
    # Exponent of a power law fitted to mean norm vs depth (log-log least squares).
    return float(np.polyfit(np.log(depths), np.log(values), 1)[0])


def claim1(gn_rows: list[dict]) -> list[Verdict]:
    """1a: last layer vs depth (Theorem 1); 1b: the per-layer profile (Fig. 3)."""
    claim = ("1a. At initialization post-LN's last-layer FFN gradient is larger than pre-LN's, "
             "by a gap that grows with depth: post-LN's does not shrink with L, "
             "pre-LN's ~ 1/sqrt(L)")
    claim_b = ("1b. Per layer, post-LN's W2 gradient grows toward the top of the stack while "
               "pre-LN's stays flat (their Fig. 3)")
    tops = top_layer_means(gn_rows)
    depths = sorted({d for p, d in tops if p == "post"} & {d for p, d in tops if p == "pre"})
    if not depths:
        return [Verdict(c, NO_DATA, ["no post-LN and pre-LN records at a common depth"])
                for c in (claim, claim_b)]
    post = [float(np.mean(tops[("post", d)])) for d in depths]
    pre = [float(np.mean(tops[("pre", d)])) for d in depths]
    ratios = [a / b for a, b in zip(post, pre)]
    evidence = [f"last-layer |dL/dW2| at L = {', '.join(map(str, depths))}: post-LN "
                f"{', '.join(fmt(tops[('post', d)]) for d in depths)}; pre-LN "
                f"{', '.join(fmt(tops[('pre', d)]) for d in depths)} (mean ± std over seeds)",
                f"post/pre ratio: {', '.join(f'{r:.2f}' for r in ratios)}"]
    larger = all(r > 1 for r in ratios)
    grows = len(ratios) > 1 and ratios[-1] > ratios[0]
    if len(depths) > 1:
        sp, sq = _slope(depths, post), _slope(depths, pre)
        evidence.append(f"fitted exponent of the mean in L: post-LN {sp:+.2f}, pre-LN {sq:+.2f} "
                        "(theory: 0 and -0.5)")
    status = SUPPORTED if larger and grows else PARTLY if larger or grows else NOT_REPRODUCED
    return [Verdict(claim, status, evidence), _layer_profile(claim_b, gn_rows, max(depths))]


def _layer_profile(claim, gn_rows, depth) -> Verdict:
    """Top-quarter / bottom-quarter mean of the per-layer W2 norm at `depth`."""
    ratio = {}
    for placement in ("post", "pre"):
        rows = [r["w2"] for r in gn_rows if r["placement"] == placement and r["depth"] == depth]
        mean = np.mean(rows, axis=0)
        q = max(1, depth // 4)
        ratio[placement] = float(mean[-q:].mean() / mean[:q].mean())
    post, pre = ratio["post"], ratio["pre"]
    evidence = [f"L={depth}, mean |dL/dW2| of the top quarter of layers / bottom quarter: "
                f"post-LN {post:.2f}, pre-LN {pre:.2f} (Fig. 3: > 1 for post-LN, ~ 1 for pre-LN)",
                "Fig. 3 is an encoder-decoder for translation with Xavier init; here the model "
                "and the single init std of every matrix are those of the Settings below"]
    flatter = abs(math.log(pre)) < abs(math.log(post))
    status = (SUPPORTED if post > 1 and flatter else PARTLY if post > 1 else NOT_REPRODUCED)
    return Verdict(claim, status, evidence)


# ---------------------------------------------------------------- claims 2 and 3

def cell(runs, task, placement, lr, warmup) -> list[dict]:
    return [r for r in runs if (r["task"], r["placement"], r["warmup"]) == (task, placement, warmup)
            and math.isclose(r["peak_lr"], lr)]


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
    return text + f", final val loss {fmt([r['final_val_loss'] for r in cell_runs])}"


def _mostly_failed(cell_runs) -> bool:
    return bool(cell_runs) and 2 * sum(map(failed, cell_runs)) > len(cell_runs)


def _worse(a: list[dict], b: list[dict]) -> bool:
    """Final loss of cell a measurably above cell b's: by MIN_GAP and 2 standard errors."""
    x = np.array([r["final_val_loss"] for r in a if r["final_val_loss"] is not None])
    y = np.array([r["final_val_loss"] for r in b if r["final_val_loss"] is not None])
    if not x.size or not y.size:
        return bool(x.size < len(a))          # a non-finite final loss is worse
    se = math.sqrt(x.var() / x.size + y.var() / y.size)
    return bool(x.mean() - y.mean() > max(MIN_GAP, 2 * se))


def claim2(runs: list[dict], tasks: list[str]) -> list[Verdict]:
    """2a: warm-up (per task and lr); 2b: pre-LN without warm-up converges faster."""
    claim = ("2a. Without warm-up (or at high learning rates) post-LN diverges or ends far worse "
             "than with warm-up; pre-LN trains well without warm-up")
    evidence, holds, post_hurt = [], [], []
    for task in tasks:
        t_runs = [r for r in runs if r["task"] == task]
        warmups = sorted({r["warmup"] for r in t_runs})
        if len(warmups) < 2:
            continue
        wu = warmups[-1]
        for lr in sorted({r["peak_lr"] for r in t_runs}):
            pn, pw = cell(t_runs, task, "post", lr, 0), cell(t_runs, task, "post", lr, wu)
            rn, rw = cell(t_runs, task, "pre", lr, 0), cell(t_runs, task, "pre", lr, wu)
            if not (pn and pw and rn and rw):
                continue
            bad = (_mostly_failed(pn) and not _mostly_failed(pw)) or _worse(pn, pw)
            ok = not _mostly_failed(rn)   # "trains well": no divergence, leaves the plateau
            post_hurt.append(bad)
            holds.append(bad and ok)
            tag = ("holds" if bad and ok else "post-LN hurt, but pre-LN fails too" if bad
                   else "no run trains here" if all(map(_mostly_failed, (pn, pw, rn, rw)))
                   else "post-LN fails with and without warm-up" if _mostly_failed(pw)
                   else "post-LN not hurt")
            if ok and _worse(rn, rw):
                tag += " (warm-up helps pre-LN's final loss too)"
            evidence.append(f"{task}, lr {lr:g}: post-LN no warm-up: {describe(pn)}; post-LN "
                            f"warm-up {wu}: {describe(pw)}; pre-LN no warm-up: {describe(rn)}; "
                            f"pre-LN warm-up {wu}: {describe(rw)} -> {tag}")
    if not evidence:
        evidence = ["no task with post-LN and pre-LN runs at two warm-ups"]
    status = (NO_DATA if not holds else SUPPORTED if any(holds)
              else PARTLY if any(post_hurt) else NOT_REPRODUCED)
    return [Verdict(claim, status, evidence), _claim2b(runs, tasks)]


def _claim2b(runs, tasks) -> Verdict:
    claim = ("2b. Pre-LN without warm-up converges faster than post-LN with warm-up (reaches "
             "post-LN's final validation loss in fewer updates; BERT is claim 3)")
    results = [speed(runs, task) for task in tasks if task != "mlm"]
    if not results:
        return Verdict(claim, NO_DATA, ["no task other than mlm"])
    statuses = [status for status, _ in results]
    status = next((s for s in (SUPPORTED, PARTLY, NOT_REPRODUCED) if s in statuses), NO_DATA)
    return Verdict(claim, status, [line for _, lines in results for line in lines])


def _best_lr(t_runs, task, placement, warmup):
    lrs = sorted({r["peak_lr"] for r in t_runs})
    scored = [(np.mean([r["final_val_loss"] if r["final_val_loss"] is not None else np.inf
                        for r in c]), lr)
              for lr in lrs if (c := cell(t_runs, task, placement, lr, warmup))]
    return min(scored)[1] if scored else None


def speed(runs: list[dict], task: str) -> tuple[str, list[str]]:
    """Updates pre-LN without warm-up needs to reach the loss that post-LN with warm-up
    ends at (both at their best learning rate): Xiong et al. Fig. 4, ~40% fewer for BERT."""
    t_runs = [r for r in runs if r["task"] == task]
    warmups = sorted({r["warmup"] for r in t_runs})
    if len(warmups) < 2:
        return NO_DATA, [f"{task}: no warm-up / no-warm-up pair"]
    wu = warmups[-1]
    lr_post, lr_pre = _best_lr(t_runs, task, "post", wu), _best_lr(t_runs, task, "pre", 0)
    if lr_post is None or lr_pre is None:
        return NO_DATA, [f"{task}: post-LN or pre-LN runs missing"]
    post, pre = cell(t_runs, task, "post", lr_post, wu), cell(t_runs, task, "pre", lr_pre, 0)
    if any(failed(r) for r in post):
        return NOT_REPRODUCED, [f"{task}: post-LN with warm-up {wu} at its best lr {lr_post:g}: "
                                f"{describe(post)}; no target loss worth reaching"]
    target = max(r["val_loss"][-1] for r in post)   # the stored curve's last point
    s_post = [steps_to_target(r, target) for r in post]
    s_pre = [steps_to_target(r, target) for r in pre]
    reached = [s for s in s_pre if s is not None]
    text = (f"{task}: target = worst final val loss of post-LN, warm-up {wu}, lr {lr_post:g} = "
            f"{target:.3f}; post-LN reaches it at steps {s_post}; pre-LN without warm-up "
            f"(lr {lr_pre:g}) at steps {[s if s is not None else 'never' for s in s_pre]}")
    if not reached:
        return NOT_REPRODUCED, [text]
    ratio = np.mean(reached) / np.mean(s_post)
    text += f" -> {100 * (1 - ratio):.0f}% fewer updates (paper, BERT: ~40%)"
    ok = ratio < 1
    status = SUPPORTED if ok and len(reached) == len(s_pre) else PARTLY if ok else NOT_REPRODUCED
    return status, [text]


def claim3(runs: list[dict]) -> Verdict:
    claim = ("3. BERT: pre-LN without warm-up reaches a given validation loss in fewer updates "
             "than post-LN with warm-up; post-LN at the higher learning rate diverges")
    status, evidence = speed(runs, "mlm")
    m_runs = [r for r in runs if r["task"] == "mlm"]
    if m_runs:
        lr = max(r["peak_lr"] for r in m_runs)
        for placement in ("post", "pre"):
            c = [r for r in m_runs
                 if r["placement"] == placement and math.isclose(r["peak_lr"], lr)]
            evidence.append(f"mlm, {placement}-LN at the highest lr {lr:g}, all warm-ups: "
                            f"{describe(c)}")
        escaped = sum(r["escaped_plateau"] for r in m_runs)
        evidence.append(f"mlm: {escaped}/{len(m_runs)} runs got {PLATEAU_MARGIN} nats below the "
                        f"unigram baseline ({m_runs[0]['unigram_loss']:.3f}) within "
                        f"{m_runs[0]['steps']} steps")
    return Verdict(claim, status, evidence)
