"""The run directory's loss plot, `loss.png`, from its metrics.jsonl records."""
from __future__ import annotations

from pathlib import Path


def loss_points(records: list[dict], kinds: tuple[str, ...]) -> list[tuple[int, float]]:
    """(step, loss) of the records of `kinds` whose loss is a number."""
    return [(r["step"], r["loss"]) for r in records
            if r.get("kind") in kinds and isinstance(r.get("loss"), (int, float))]


def plot_losses(records: list[dict], path: Path, title: str = "") -> None:
    """`loss.png`: train and validation loss against step, from metrics.jsonl records;
    validation includes the final evaluation, so a run shorter than --eval-every shows
    its end point too."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for kinds, style, label in ((("train",), "-", "train loss"),
                                (("eval", "final_eval"), "o-", "validation loss")):
        pts = sorted(set(loss_points(records, kinds)))
        if pts:
            ax.plot(*zip(*pts), style, label=label, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
