"""Plots a person reads: training curves, the confusion matrix, per-label F1.

Written at the end of a run; for a finished run: ``python -m engine.plots <run dir>``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.tracking import EVAL_METRICS, TRAIN_METRICS, read_jsonl

CURVES = "curves.png"
CONFUSION = "confusion_matrix.png"
PER_LABEL_F1 = "per_label_f1.png"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(run_dir: str | Path, metric: str | None = None) -> Path | None:
    """Train and dev loss and the dev metric against step (top), the learning rate (bottom)."""
    run_dir = Path(run_dir)
    steps = [r for r in read_jsonl(run_dir / TRAIN_METRICS) if isinstance(r.get("loss"), (int, float))]
    evals = [r for r in read_jsonl(run_dir / EVAL_METRICS) if "split" not in r]
    if not steps and not evals:
        return None
    if metric is None:
        metric = "accuracy" if evals and "accuracy" in evals[0] else "micro_f1"
    plt = pyplot()
    # Fixed margins: a layout engine would cost more than the drawing (~0.3 s a run).
    grid = {"height_ratios": [3, 1.3], "left": 0.09, "right": 0.91, "top": 0.86, "bottom": 0.08, "hspace": 0.12}
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, gridspec_kw=grid)
    lines = []
    if steps:
        lines += top.plot(
            [r["step"] for r in steps], [r["loss"] for r in steps], color="tab:blue", alpha=0.8, label="train loss"
        )
    if evals:
        lines += top.plot(
            [r["step"] for r in evals], [r["loss"] for r in evals], "o-", color="tab:orange", label="dev loss"
        )
    top.set_ylabel("loss")
    top.grid(alpha=0.3)
    if evals and metric in evals[0]:
        right = top.twinx()
        lines += right.plot(
            [r["step"] for r in evals], [r[metric] for r in evals], "s--", color="tab:green", label=f"dev {metric}"
        )
        right.set_ylabel(f"dev {metric}")
    # Above the axes, in one row: never on top of the curves.
    labels = [line.get_label() for line in lines]
    top.legend(lines, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(lines), frameon=False)
    figure.suptitle(f"Training curves: {run_dir}", fontsize=11)
    if steps:
        bottom.plot([r["step"] for r in steps], [r["lr"] for r in steps], color="tab:purple")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("optimizer step")
    bottom.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    bottom.grid(alpha=0.3)
    path = run_dir / CURVES
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_confusion(matrix: np.ndarray, names: Sequence[str], path: str | Path, title: str = "") -> Path:
    plt = pyplot()
    size = max(4.5, 0.45 * len(names) + 3)
    figure, axis = plt.subplots(figsize=(size + 1.2, size), constrained_layout=True)
    image = axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
    axis.set_yticks(range(len(names)), labels=names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    figure.suptitle(title or "Confusion matrix (dev, best checkpoint)", fontsize=11)
    high = matrix.max() if matrix.size else 0
    for (row, col), value in np.ndenumerate(matrix):
        color = "white" if value > high / 2 else "black"
        axis.text(col, row, str(int(value)), ha="center", va="center", color=color, fontsize=9)
    figure.colorbar(image, ax=axis, shrink=0.8)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


def plot_per_label_f1(
    f1: Sequence[float], support: Sequence[int], names: Sequence[str], path: str | Path, title: str | None = None
) -> Path:
    plt = pyplot()
    order = np.argsort(f1)
    figure, axis = plt.subplots(figsize=(8, max(3.5, 0.3 * len(names) + 1.5)), constrained_layout=True)
    axis.barh(range(len(names)), np.asarray(f1)[order], color="tab:blue")
    axis.set_yticks(range(len(names)), labels=[f"{names[i]} (n={support[i]})" for i in order])
    axis.set_xlim(0, 1)
    axis.set_xlabel("F1")
    axis.set_title(title or "Per-label F1 (dev, best checkpoint)")
    axis.grid(axis="x", alpha=0.3)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


if __name__ == "__main__":  # python -m engine.plots <run dir>
    for folder in sys.argv[1:] or ["."]:
        written = plot_curves(folder)
        print(written if written else f"{folder}: no metrics to plot")
