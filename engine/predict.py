"""Loading a saved run and predicting texts or files; export to the Hugging Face format.

Loading is safe (``torch.load(..., weights_only=True)`` only) and strict: missing or
unexpected keys and shape mismatches are listed. Never imports the training loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.checkpoint import CheckpointError, load_info, locate
from engine.config import ProblemType
from engine.metrics import sigmoid, softmax
from engine.model import load_hf_model


@dataclass
class Prediction:
    label: str | list[str]  # the top label, or for multi-label the labels over their thresholds
    probabilities: dict[str, float] = field(default_factory=dict)


class TextClassifier:
    """A loaded checkpoint: ``predict(texts)`` gives label names and probabilities."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, info: dict[str, Any], device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.info = info
        self.device = device
        data_cfg = info.get("config", {}).get("data", {})
        self.max_length = int(data_cfg.get("max_length", 512))
        self.problem_type = ProblemType(info["problem_type"])
        self.id2label = {int(k): v for k, v in info["id2label"].items()}
        thresholds = info.get("thresholds", {})
        self.thresholds = np.asarray(thresholds.get("per_label", [0.5] * len(self.id2label)), dtype=np.float64)

    @property
    def labels(self) -> list[str]:
        return [self.id2label[i] for i in range(len(self.id2label))]

    @torch.inference_mode()
    def logits(
        self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """Raw logits in input order; batches are sorted by length so padding stays small."""
        from tqdm.auto import tqdm

        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} pair texts")
        encoded = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length)
        lengths = [len(ids) for ids in encoded["input_ids"]]
        order = np.argsort(-np.asarray(lengths), kind="stable")
        out = np.zeros((len(texts), len(self.id2label)), dtype=np.float32)
        for start in tqdm(range(0, len(order), batch_size), desc="predict", disable=not progress):
            rows = order[start : start + batch_size]
            features = [{k: encoded[k][i] for k in encoded.keys()} for i in rows]
            batch = self.tokenizer.pad(features, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            out[rows] = self.model(**batch).logits.float().cpu().numpy()
        return out

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        if self.problem_type == ProblemType.multi_label_classification:
            return sigmoid(logits)
        return softmax(logits)

    def decide(self, row: np.ndarray) -> str | list[str]:
        """One row of probabilities as its label, or for multi-label its labels over their thresholds."""
        names = self.labels
        if self.problem_type == ProblemType.multi_label_classification:
            return [names[i] for i in np.flatnonzero(row >= self.thresholds)]
        return names[int(row.argmax())]

    def predict(
        self,
        texts: list[str] | list[tuple[str, str]] | str,
        batch_size: int = 64,
        progress: bool = False,
    ) -> list[Prediction]:
        """Predict single texts or ``(text, pair)`` tuples."""
        if isinstance(texts, str):
            texts = [texts]
        pairs = None
        if texts and isinstance(texts[0], (tuple, list)):
            texts, pairs = [t[0] for t in texts], [t[1] for t in texts]  # type: ignore[index]
        probs = self.probabilities(self.logits(list(texts), pairs, batch_size, progress))  # type: ignore[arg-type]
        names = self.labels
        return [Prediction(self.decide(row), {n: float(p) for n, p in zip(names, row, strict=True)}) for row in probs]

    def export(self, folder: str | os.PathLike) -> Path:
        """A Hugging Face folder (safetensors, tokenizer, id2label/label2id in config.json)."""
        folder = Path(folder)
        self.model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        return folder


def load_classifier(path: str | os.PathLike, device: str | torch.device | None = None) -> TextClassifier:
    """Load ``best_acc_classify.pth`` (or its run directory) for inference; CUDA when present."""
    from transformers import AutoTokenizer

    weights_path, info_path = locate(path)
    info = load_info(info_path)
    for key in ("model_source", "num_labels", "id2label", "problem_type"):
        if key not in info:
            raise CheckpointError(f"{info_path}: missing key {key!r}")
    model = load_hf_model(weights_path, info)
    tokenizer = AutoTokenizer.from_pretrained(info.get("tokenizer") or info["model_source"])
    resolved = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    return TextClassifier(model, tokenizer, info, resolved)


def predict_file(
    classifier: TextClassifier,
    input_file: str | os.PathLike,
    output_file: str | os.PathLike | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> Path:
    """Predict every row of a csv/tsv/jsonl/json/parquet file; the output keeps row order and count."""
    import pandas as pd

    from engine.checkpoint import atomic_write
    from engine.config import DataConfig
    from engine.sources import DataError, read_table

    trained = classifier.info.get("config", {}).get("data", {})
    text_column = text_column or trained.get("text_column")
    text_pair_column = text_pair_column if text_pair_column is not None else trained.get("text_pair_column")
    input_file = Path(input_file)
    frame = read_table(
        input_file, DataConfig(text_column=text_column or "text", quoting=trained.get("quoting", "minimal"))
    )
    wanted = [c for c in (text_column, text_pair_column) if c]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise DataError(
            f"{input_file}: no column {', '.join(map(repr, missing))}; it has {list(frame.columns)} "
            "(set text_column= / text_pair_column=)"
        )
    texts = frame[text_column].astype(str).tolist()
    pairs = frame[text_pair_column].astype(str).tolist() if text_pair_column else None
    probs = classifier.probabilities(classifier.logits(texts, pairs, batch_size, progress))
    names = classifier.labels
    out = pd.DataFrame({f"prob_{name}": probs[:, i] for i, name in enumerate(names)})
    decided = [classifier.decide(row) for row in probs]
    if classifier.problem_type == ProblemType.multi_label_classification:
        out.insert(0, "labels", [",".join(labels) for labels in decided])
    else:
        out.insert(0, "label", decided)
    suffix = input_file.suffix.lower() if input_file.suffix.lower() in (".csv", ".tsv", ".jsonl") else ".csv"
    output = Path(output_file) if output_file else input_file.with_name(f"{input_file.stem}.predictions{suffix}")
    fmt = output.suffix.lower()
    if fmt == ".jsonl":
        text = out.to_json(orient="records", lines=True)
    else:
        text = out.to_csv(index=False, sep="\t" if fmt == ".tsv" else ",")
    atomic_write(output, lambda handle: handle.write(text.encode()))
    return output


def predict_cli(cfg: Any) -> None:
    from omegaconf import OmegaConf

    from engine.errors import EngineError

    config = OmegaConf.to_object(cfg)
    classifier = load_classifier(config.checkpoint, config.device)
    did = False
    if config.export_dir:
        print(f"exported to {classifier.export(config.export_dir)}")
        did = True
    if config.text is not None:
        text: Any = (config.text, config.text_pair) if config.text_pair is not None else config.text
        prediction = classifier.predict([text])[0]
        print(f"label: {prediction.label if isinstance(prediction.label, str) else ', '.join(prediction.label)}")
        for name, p in sorted(prediction.probabilities.items(), key=lambda kv: -kv[1]):
            print(f"  {name}: {p:.4f}")
        did = True
    if config.input_file is not None:
        output = predict_file(
            classifier,
            config.input_file,
            config.output_file,
            config.text_column,
            config.text_pair_column,
            config.batch_size,
            config.progress,
        )
        print(f"predictions written to {output}")
        did = True
    if not did:
        raise EngineError('nothing to do: give text="...", input_file=<file> or export_dir=<folder>')
