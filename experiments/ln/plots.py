"""PNG figures of the benchmark (matplotlib, Agg backend: no display needed).

    gradnorm_layers.png    per-layer gradient norm at init, one panel per placement
                           (rows: W2 = mlp/down, attention), one line per depth
    gradnorm_depth.png     last layer's W2 gradient norm vs depth (log-log)
    loss_<task>.png        validation loss vs step, one panel per peak lr
    heatmap_<task>.png     final validation loss (and failed runs) over lr x schedule
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.ln import verdicts  # noqa: E402

COLORS = {"post": "tab:red", "pre": "tab:blue", "sandwich": "tab:green",
          "deepnorm": "tab:purple", "pre-rms": "tab:cyan"}


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


def gradnorm_layers(rows: list[dict], path: Path) -> str:
    """One panel per (stack, placement): |mean dL/dW2| per layer, one line per depth."""
    placements = list(dict.fromkeys(r["placement"] for r in rows))
    depths = sorted({r["depth"] for r in rows})
    stacks = rows[0].get("stacks", ["stack"])
    fig, axes = plt.subplots(len(stacks), len(placements), squeeze=False, sharey=True,
                             figsize=(3.2 * len(placements), 3.0 * len(stacks)))
    cmap = plt.get_cmap("viridis")
    for col, placement in enumerate(placements):
        for row, stack in enumerate(stacks):
            ax = axes[row][col]
            for k, depth in enumerate(depths):
                norms = np.array([r["w2"][row * depth:(row + 1) * depth] for r in rows
                                  if r["placement"] == placement and r["depth"] == depth])
                if not norms.size:
                    continue
                x = np.arange(1, depth + 1) / depth
                color = cmap(k / max(1, len(depths) - 1))
                ax.plot(x, norms.mean(0), color=color, marker="." if depth <= 12 else None,
                        label=f"L={depth}")
                ax.fill_between(x, norms.min(0), norms.max(0), color=color, alpha=0.15)
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            if row == 0:
                ax.set_title(f"{placement}-LN" if placement in ("post", "pre") else placement)
            if row == len(stacks) - 1:
                ax.set_xlabel("layer / L (bottom -> top)")
            if col == 0:
                ax.set_ylabel(f"{stack}: |mean dL/dW2|")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("FFN W2 gradient per layer at initialization (gradient averaged over "
                 "mini-batches, then norm; mean, min-max over seeds)", y=1.02)
    return _save(fig, path)


def gradnorm_depth(rows: list[dict], path: Path) -> str:
    tops = verdicts.top_layer_means(rows)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for placement in dict.fromkeys(r["placement"] for r in rows):
        depths = sorted(d for p, d in tops if p == placement)
        mean = [np.mean(tops[(placement, d)]) for d in depths]
        std = [verdicts.spread(tops[(placement, d)]) for d in depths]
        ax.errorbar(depths, mean, yerr=std, marker="o", capsize=3, label=placement,
                    color=COLORS.get(placement))
    depths = sorted({d for _, d in tops})
    if depths:
        ref = np.mean(tops.get(("pre", depths[0]), [1.0]))
        x = np.array(depths, float)
        ax.plot(x, ref * (x / x[0]) ** -0.5, "k:", label="~ L^-1/2 (pre-LN theory)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("number of layers L")
    ax.set_ylabel("last layer |mean dL/dW2| at init")
    ax.set_title("Last-layer FFN gradient norm vs depth\n(bars: sample std over seeds)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(fig, path)


def loss_curves(runs: list[dict], task: str, path: Path) -> str:
    t_runs = [r for r in runs if r["task"] == task]
    lrs = sorted({r["peak_lr"] for r in t_runs})
    arms = verdicts.arms(t_runs)
    styles = ["--", "-", "-.", ":"]
    fig, axes = plt.subplots(1, len(lrs), squeeze=False, sharey=True,
                             figsize=(4.2 * len(lrs), 3.6))
    for ax, lr in zip(axes[0], lrs):
        for placement in dict.fromkeys(r["placement"] for r in t_runs):
            for k, (wu, decay) in enumerate(arms):
                c = verdicts.cell(t_runs, task, placement, lr, wu, decay)
                if not c:
                    continue
                steps = c[0]["val_steps"]
                curves = np.array([[np.nan if v is None else v for v in r["val_loss"]] for r in c])
                style = dict(color=COLORS.get(placement), linestyle=styles[k % len(styles)])
                for curve in curves:
                    ax.plot(steps, curve, alpha=0.25, linewidth=0.8, **style)
                ax.plot(steps, np.nanmean(curves, 0), linewidth=1.8,
                        label=f"{placement}-LN, {verdicts.arm_label(wu, decay)}", **style)
        ax.axhline(t_runs[0]["unigram_loss"], color="black", linewidth=1.0, linestyle=":",
                   label="unigram baseline")
        ax.set_title(f"{task}: peak lr {lr:g}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    finals = [v for r in t_runs for v in r["val_loss"][1:] if v is not None]
    if finals:   # the initial loss and the baseline in view; blow-ups clipped
        low = min(min(finals), t_runs[0]["unigram_loss"])
        axes[0][0].set_ylim(low - 0.1, t_runs[0]["initial_val_loss"] + 0.3)
    axes[0][0].set_ylabel("validation MLM loss" if task == "mlm" else "validation loss")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{task}: validation loss (thick: mean over seeds, thin: each seed)", y=1.03)
    return _save(fig, path)


def heatmap(runs: list[dict], task: str, path: Path) -> str:
    t_runs = [r for r in runs if r["task"] == task]
    placements = list(dict.fromkeys(r["placement"] for r in t_runs))
    lrs = sorted({r["peak_lr"] for r in t_runs})
    arms = verdicts.arms(t_runs)
    grid = np.full((len(placements), len(arms), len(lrs)), np.nan)
    notes = {}
    for p, placement in enumerate(placements):
        for i, (wu, decay) in enumerate(arms):
            for j, lr in enumerate(lrs):
                c = verdicts.cell(t_runs, task, placement, lr, wu, decay)
                finals = [r["final_val_loss"] for r in c if r["final_val_loss"] is not None]
                grid[p, i, j] = np.mean(finals) if finals else np.nan
                fails = sum(map(verdicts.failed, c))
                notes[p, i, j] = f"{grid[p, i, j]:.2f}\n{fails}/{len(c)} failed"
    size = (1.6 * len(lrs) * len(placements) + 2.0, 1.0 * len(arms) + 1.6)
    fig, axes = plt.subplots(1, len(placements), squeeze=False, figsize=size)
    vmin, vmax = np.nanmin(grid), np.nanmax(grid)
    for p, ax in enumerate(axes[0]):
        image = ax.imshow(grid[p], cmap="viridis_r", vmin=vmin, vmax=vmax, aspect="auto")
        for (q, i, j), text in notes.items():
            if q == p:
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white",
                        bbox=dict(facecolor="black", alpha=0.3, linewidth=0))
        ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        # Row labels once, on the first panel: long ones would run into its neighbour.
        ax.set_yticks(range(len(arms)), [f"{w}, {d}" for w, d in arms] if p == 0 else [])
        ax.set_xlabel("peak learning rate")
        ax.set_title(f"{task}: {placements[p]}-LN")
    axes[0][0].set_ylabel("warm-up steps, decay")
    fig.colorbar(image, ax=list(axes[0]), label="final validation loss (mean over seeds)")
    return _save(fig, path)


def write_all(results, out: Path) -> list[str]:
    """Every figure the records allow; returns the file names written."""
    names = []
    if results.gradnorm:
        names.append(gradnorm_layers(results.gradnorm, out / "gradnorm_layers.png"))
        names.append(gradnorm_depth(results.gradnorm, out / "gradnorm_depth.png"))
    for task in dict.fromkeys(r["task"] for r in results.runs):
        names.append(loss_curves(results.runs, task, out / f"loss_{task}.png"))
        names.append(heatmap(results.runs, task, out / f"heatmap_{task}.png"))
    return names
