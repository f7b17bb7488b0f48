"""Multi-label classification metrics as an `evaluate` module, computed by scikit-learn.

Shipped with the engine so that `evaluate.load(<this folder>)` works offline.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

_DESCRIPTION = "Micro and macro F1 at a threshold, micro ROC-AUC, subset accuracy."
_KWARGS = """
Args:
    predictions: per-label probabilities, one row per example.
    references: multi-hot true labels, one row per example.
    threshold: a float, or one float per label.
Returns:
    micro_f1, macro_f1, roc_auc_micro, subset_accuracy.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class MultiLabel(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references, threshold=0.5):
        probabilities = np.asarray(predictions, dtype=np.float64)
        truth = np.asarray(references, dtype=np.int64)
        predicted = (probabilities >= np.asarray(threshold)).astype(np.int64)
        try:
            auc = float(roc_auc_score(truth, probabilities, average="micro"))
        except ValueError:  # one class only in the references
            auc = float("nan")
        return {
            "micro_f1": float(f1_score(truth, predicted, average="micro", zero_division=0)),
            "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
            "roc_auc_micro": auc,
            "subset_accuracy": float((predicted == truth).all(axis=1).mean()),
        }
