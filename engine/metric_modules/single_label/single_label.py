"""Single-label classification metrics as an `evaluate` module, computed by scikit-learn.

Shipped with the engine so that `evaluate.load(<this folder>)` works offline.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

_DESCRIPTION = "Accuracy, F1 (binary, for the positive label 1), macro-F1 and Matthews correlation."
_KWARGS = """
Args:
    predictions: predicted label ids.
    references: true label ids.
    num_labels: the number of labels (binary F1 is reported when it is 2).
Returns:
    accuracy, macro_f1, mcc, and f1 for two labels.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class SingleLabel(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, num_labels=2):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        labels = list(range(num_labels))
        result = {
            "accuracy": float(accuracy_score(references, predictions)),
            "macro_f1": float(f1_score(references, predictions, labels=labels, average="macro", zero_division=0)),
            "mcc": float(matthews_corrcoef(references, predictions)) if len(references) > 1 else 0.0,
        }
        if num_labels == 2:
            result["f1"] = float(f1_score(references, predictions, pos_label=1, average="binary", zero_division=0))
        return result
