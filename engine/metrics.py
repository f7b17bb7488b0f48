"""Metrics through the `evaluate` library, offline.

The metric modules ship inside the package (``engine/metric_modules``), and
``evaluate.load`` is given their local folder, so no hub access is ever needed.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from engine.config import ProblemType

MODULES_DIR = Path(__file__).resolve().parent / "metric_modules"


@functools.cache
def load_metric(problem_type: ProblemType) -> Any:
    import evaluate

    name = "multi_label" if ProblemType(problem_type) == ProblemType.multi_label_classification else "single_label"
    # keep_in_memory: no cache file, so several processes never share one on disk.
    return evaluate.load(str(MODULES_DIR / name), keep_in_memory=True)


def sigmoid(values: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-values))


def softmax(values: np.ndarray) -> np.ndarray:
    shifted = values - values.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def compute_metrics(
    logits: np.ndarray, labels: np.ndarray, problem_type: ProblemType, threshold: float | list[float] = 0.5
) -> dict[str, float]:
    """Metrics over all gathered predictions: single-label from argmax, multi-label from sigmoid."""
    metric = load_metric(ProblemType(problem_type))
    if ProblemType(problem_type) == ProblemType.multi_label_classification:
        return metric.compute(
            predictions=sigmoid(logits).tolist(), references=labels.astype(np.int64).tolist(), threshold=threshold
        )
    return metric.compute(
        predictions=logits.argmax(axis=-1).tolist(), references=labels.tolist(), num_labels=logits.shape[-1]
    )


def predicted_labels(logits: np.ndarray, problem_type: ProblemType, threshold: float | list[float] = 0.5):
    if ProblemType(problem_type) == ProblemType.multi_label_classification:
        return (sigmoid(logits) >= np.asarray(threshold)).astype(np.int64)
    return logits.argmax(axis=-1)


def per_class_report(
    logits: np.ndarray,
    labels: np.ndarray,
    problem_type: ProblemType,
    names: list[str],
    threshold: float | list[float] = 0.5,
) -> list[dict[str, float | int | str]]:
    """Precision, recall, F1 and support for each label."""
    from sklearn.metrics import precision_recall_fscore_support

    predicted = predicted_labels(logits, problem_type, threshold)
    kwargs = (
        {}
        if ProblemType(problem_type) == ProblemType.multi_label_classification
        else {"labels": list(range(len(names)))}
    )
    precision, recall, f1, support = precision_recall_fscore_support(
        labels.astype(np.int64), predicted, average=None, zero_division=0, **kwargs
    )
    return [
        {"label": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(names, precision, recall, f1, support, strict=True)
    ]


def confusion(logits: np.ndarray, labels: np.ndarray, num_labels: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels, logits.argmax(axis=-1), labels=list(range(num_labels)))


THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.01), 2)


def tune_thresholds(
    probabilities: np.ndarray, labels: np.ndarray, grid: np.ndarray = THRESHOLD_GRID
) -> dict[str, float | list[float]]:
    """Decision thresholds for multi-label predictions, chosen on the dev split (never on test).

    ``global``: the one threshold that maximises micro-F1; ``per_label``: for each label the
    threshold that maximises that label's F1 (the global one where the label has no positives).
    Ties go to the lowest threshold.
    """
    truth = labels.astype(bool)
    predicted = probabilities[None, :, :] >= grid[:, None, None]  # (grid, rows, labels)
    tp = (predicted & truth[None]).sum(axis=1).astype(np.float64)
    fp = (predicted & ~truth[None]).sum(axis=1)
    fn = (~predicted & truth[None]).sum(axis=1)
    micro = 2 * tp.sum(axis=1) / np.maximum(2 * tp.sum(axis=1) + fp.sum(axis=1) + fn.sum(axis=1), 1)
    best_global = float(grid[int(np.argmax(micro))])
    per_label_f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    per_label = [
        float(grid[int(np.argmax(per_label_f1[:, j]))]) if truth[:, j].any() else best_global
        for j in range(truth.shape[1])
    ]
    return {"global": best_global, "per_label": per_label}
