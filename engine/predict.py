"""Loading a saved run and predicting texts or files; export to the Hugging Face format.

Loading is safe (``torch.load(..., weights_only=True)`` only) and strict: missing or
unexpected keys and shape mismatches are listed. Prediction runs in bf16 (or fp16) autocast where
the device computes it natively, as training's ``mixed_precision=auto`` decides, and in fp32
elsewhere; probabilities come back in float32. Files are read in chunks, so memory is bounded by
the chunk, not the file. Never imports the training loop.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from engine.backend import autocast_dtype, native_bf16, native_fp16, resolve_mixed_precision
from engine.checkpoint import CheckpointError, load_info, locate
from engine.config import DataConfig, MixedPrecision, ProblemType
from engine.data import DEFAULT_PAD_MULTIPLE
from engine.errors import EngineError
from engine.metrics import sigmoid, softmax
from engine.model import load_hf_model
from engine.sources import DataError, check_texts, csv_options, file_format, name_columns, read_table

# Rows of a file read, tokenized and length-sorted at a time: predict_file's memory is bounded by
# this, not by the file. Large enough that sorting within it leaves little padding.
CHUNK_ROWS = 4096


@dataclass
class Prediction:
    label: str | list[str]  # the top label, or for multi-label the labels over their thresholds
    probabilities: dict[str, float] = field(default_factory=dict)


class TextClassifier:
    """A loaded checkpoint: ``predict(texts)`` gives label names and probabilities."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        info: dict[str, Any],
        device: torch.device,
        precision: MixedPrecision = MixedPrecision.no,
    ) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.info = info
        self.device = device
        self.precision = MixedPrecision(precision)  # resolved: no, bf16 or fp16
        data_cfg = info.get("config", {}).get("data", {})
        self.max_length = int(data_cfg.get("max_length", 512))
        self.pad_to_multiple_of = int(data_cfg.get("pad_to_multiple_of") or DEFAULT_PAD_MULTIPLE)
        self.problem_type = ProblemType(info["problem_type"])
        self.id2label = {int(k): v for k, v in info["id2label"].items()}
        thresholds = info.get("thresholds", {})
        self.thresholds = np.asarray(thresholds.get("per_label", [0.5] * len(self.id2label)), dtype=np.float64)

    @property
    def labels(self) -> list[str]:
        return [self.id2label[i] for i in range(len(self.id2label))]

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = autocast_dtype(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @torch.inference_mode()
    def logits(
        self,
        texts: list[str],
        pairs: list[str] | None = None,
        batch_size: int = 64,
        progress: bool = False,
        advance: Callable[[int], Any] | None = None,
    ) -> np.ndarray:
        """Raw float32 logits in input order; batches are sorted by length so padding stays small.
        ``advance(rows)`` is called after each batch (a progress bar's ``update``)."""
        from tqdm.auto import tqdm

        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} pair texts")
        out = np.zeros((len(texts), len(self.id2label)), dtype=np.float32)
        if not texts:
            return out
        encoded = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length)
        lengths = [len(ids) for ids in encoded["input_ids"]]
        order = np.argsort(-np.asarray(lengths), kind="stable")
        bar = tqdm(total=len(texts), desc="predict", unit="rows", disable=not progress)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            features = [{k: encoded[k][i] for k in encoded.keys()} for i in rows]
            batch = self.tokenizer.pad(features, pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.autocast():
                logits = self.model(**batch).logits
            out[rows] = logits.float().cpu().numpy()
            bar.update(len(rows))
            if advance is not None:
                advance(len(rows))
        bar.close()
        return out

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Softmax (single-label) or sigmoid (multi-label) probabilities, float32."""
        logits = np.asarray(logits, dtype=np.float32)
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
        self, texts: list[str] | list[tuple[str, str]] | str, batch_size: int = 64, progress: bool = False
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

    def table(self, probs: np.ndarray) -> pd.DataFrame:
        """One row per row of ``probs``: ``label`` (or ``labels``, comma-joined) and ``prob_<name>`` columns."""
        out = pd.DataFrame({f"prob_{name}": probs[:, i] for i, name in enumerate(self.labels)})
        decided = [self.decide(row) for row in probs]
        if self.problem_type == ProblemType.multi_label_classification:
            out.insert(0, "labels", [",".join(labels) for labels in decided])
        else:
            out.insert(0, "label", decided)
        return out

    def export(self, folder: str | os.PathLike) -> Path:
        """A Hugging Face folder (safetensors, tokenizer, id2label/label2id in config.json)."""
        folder = Path(folder)
        self.model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        return folder


def resolve_precision(precision: MixedPrecision | str, device: torch.device) -> MixedPrecision:
    """``auto``: bf16 where ``device`` computes it natively, else fp16 on GPUs with fp16 tensor cores,
    else fp32 (``no``), the decision training's ``mixed_precision=auto`` makes. An explicit bf16 or
    fp16 that the device only emulates runs, correctly but slower than fp32, with a warning."""
    try:
        precision = MixedPrecision(precision)
    except ValueError:
        choices = ", ".join(p.value for p in MixedPrecision)
        raise EngineError(f"precision={precision!r}: choose one of {choices}") from None
    resolved = resolve_mixed_precision(precision, device.type, inference=True)
    native = {MixedPrecision.bf16: native_bf16, MixedPrecision.fp16: native_fp16}.get(resolved)
    if native is not None and not native(device.type):
        warnings.warn(
            f"precision={resolved.value}: {device.type} has no native {resolved.value}, so it is emulated "
            "and slower than fp32 (precision=auto picks fp32 here)",
            stacklevel=3,
        )
    return resolved


def load_classifier(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    precision: MixedPrecision | str = MixedPrecision.auto,
) -> TextClassifier:
    """Load ``best_acc_classify.pth`` (or its run directory) for inference; CUDA when present.

    ``precision``: ``auto`` (bf16 or fp16 where the device computes it natively, else fp32),
    ``no`` (fp32), ``bf16`` or ``fp16``; see :func:`resolve_precision`.
    """
    from engine.model import load_tokenizer

    weights_path, info_path = locate(path)
    info = load_info(info_path)
    for key in ("model_source", "num_labels", "id2label", "problem_type"):
        if key not in info:
            raise CheckpointError(f"{info_path}: missing key {key!r}")
    resolved = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    chosen = resolve_precision(precision, resolved)
    model = load_hf_model(weights_path, info)
    tokenizer = load_tokenizer(info.get("tokenizer") or info["model_source"])  # never remote code
    return TextClassifier(model, tokenizer, info, resolved, chosen)


def read_chunks(path: Path, data: DataConfig, rows: int) -> Iterator[pd.DataFrame]:
    """The file in frames of at most ``rows`` rows, in file order, parsed as training parses it
    (``sources.csv_options``). A JSON array cannot be read in parts: it is read whole and sliced."""
    fmt = file_format(path, data)
    try:
        if fmt in ("csv", "tsv"):
            options = csv_options(fmt, data)
            with pd.read_csv(path, engine="c", chunksize=rows, **options) as reader:
                for frame in reader:
                    yield name_columns(path, frame, options, data)
        elif fmt == "jsonl":
            with pd.read_json(path, lines=True, chunksize=rows, dtype=False, encoding="utf-8") as reader:
                yield from reader
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches(batch_size=rows):
                yield batch.to_pandas()
        else:
            frame = read_table(path, data)
            for start in range(0, len(frame), rows):
                yield frame.iloc[start : start + rows]
    except DataError:
        raise
    except (UnicodeDecodeError, pd.errors.ParserError, ValueError):
        read_table(path, data)  # fails on the same bytes, with training's one-line message
        raise


def _count_rows(path: Path, fmt: str, header: bool) -> int | None:
    """Rows for the progress bar's total without reading the file into memory: lines for csv/tsv/jsonl
    (a quoted field spanning lines makes it an overestimate), the footer's count for parquet."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if fmt not in ("csv", "tsv", "jsonl"):
        return None
    lines, last = 0, b"\n"
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            lines, last = lines + block.count(b"\n"), block[-1:]
    if last != b"\n":
        lines += 1  # a last line without its newline
    return max(lines - 1, 0) if header and fmt != "jsonl" else lines


def _rows_text(table: pd.DataFrame, fmt: str, header: bool) -> str:
    if fmt == ".jsonl":
        return table.to_json(orient="records", lines=True, force_ascii=False) if len(table) else ""
    return table.to_csv(index=False, header=header, sep="\t" if fmt == ".tsv" else ",")


def predict_file(
    classifier: TextClassifier,
    input_file: str | os.PathLike,
    output_file: str | os.PathLike | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
    chunk_rows: int = CHUNK_ROWS,
) -> Path:
    """Predict every row of a csv/tsv/jsonl/json/parquet file; the output keeps row order and count.

    The file is read ``chunk_rows`` rows at a time (memory is bounded by the chunk, not the file);
    each chunk is tokenized, predicted in length-sorted batches and written in file order. The
    output (``label``/``labels`` and ``prob_<name>`` columns) appears only when complete.
    """
    from tqdm.auto import tqdm

    trained = classifier.info.get("config", {}).get("data", {})
    text_column = text_column or trained.get("text_column") or "text"
    text_pair_column = text_pair_column if text_pair_column is not None else trained.get("text_pair_column")
    input_file = Path(input_file)
    # Parsed as training parsed its files: quoting, and a header-less file's column names.
    layout = {"quoting": trained.get("quoting"), "column_names": trained.get("column_names")}
    data = DataConfig(text_column=text_column, header=trained.get("header", True), **layout)
    if not input_file.is_file():
        raise DataError(f"data file not found: {input_file}")
    suffix = input_file.suffix.lower() if input_file.suffix.lower() in (".csv", ".tsv", ".jsonl") else ".csv"
    output = Path(output_file) if output_file else input_file.with_name(f"{input_file.stem}.predictions{suffix}")
    fmt = output.suffix.lower()
    wanted = [c for c in (text_column, text_pair_column) if c]
    total = _count_rows(input_file, file_format(input_file, data), data.header)
    bar = tqdm(total=total, desc="predict", unit="rows", dynamic_ncols=True, mininterval=0.5, disable=not progress)

    def write(handle: Any) -> None:
        done, chunks = 0, 0
        for frame in read_chunks(input_file, data, chunk_rows):
            missing = [c for c in wanted if c not in frame.columns]
            if missing:
                raise DataError(
                    f"{input_file}: no column {', '.join(map(repr, missing))}; it has {list(frame.columns)} "
                    "(set text_column= / text_pair_column=)"
                )
            texts = check_texts(frame[text_column], str(input_file), text_column, done)
            pairs = (
                check_texts(frame[text_pair_column], str(input_file), text_pair_column, done)
                if text_pair_column
                else None
            )
            logits = classifier.logits(texts, pairs, batch_size, advance=bar.update)
            table = classifier.table(classifier.probabilities(logits))
            if len(table) != len(frame):
                raise EngineError(
                    f"{input_file}: data rows {done + 1}-{done + len(frame)} gave {len(table)} predictions "
                    f"for {len(frame)} rows; nothing written"
                )
            handle.write(_rows_text(table, fmt, header=chunks == 0).encode())
            done, chunks = done + len(frame), chunks + 1
        if chunks == 0:  # nothing to read: the header alone
            handle.write(_rows_text(classifier.table(np.zeros((0, len(classifier.labels)))), fmt, True).encode())

    # Through a temp file beside the output, renamed when every row is written: a failure part-way
    # (bad row, interrupt) leaves no half-written predictions.
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(partial, "wb") as handle:
            write(handle)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
        bar.close()
    return output


def predict_cli(cfg: Any) -> None:
    import sys

    from omegaconf import OmegaConf

    config = OmegaConf.to_object(cfg)
    if config.text is None and config.input_file is None and not config.export_dir:
        raise EngineError('nothing to do: give text="...", input_file=<file> or export_dir=<folder>')
    # Warnings of loading (an emulated precision) as one line each: Hydra's logging is off here.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        classifier = load_classifier(config.checkpoint, config.device, config.precision)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    if config.export_dir:
        print(f"exported to {classifier.export(config.export_dir)}")
    if config.text is not None:
        text: Any = (config.text, config.text_pair) if config.text_pair is not None else config.text
        prediction = classifier.predict([text])[0]
        print(f"label: {prediction.label if isinstance(prediction.label, str) else ', '.join(prediction.label)}")
        for name, p in sorted(prediction.probabilities.items(), key=lambda kv: -kv[1]):
            print(f"  {name}: {p:.4f}")
    if config.input_file is not None:
        columns = (config.text_column, config.text_pair_column)
        output = predict_file(
            classifier, config.input_file, config.output_file, *columns, config.batch_size, config.progress
        )
        print(f"predictions written to {output}")
