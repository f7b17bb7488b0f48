"""Reading data sources and checking them: local files or hub splits, columns, labels to ids,
the pre-flight report. Tokenizing and batching are :mod:`engine.data`'s."""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from engine.config import DataConfig, ProblemType
from engine.errors import EngineError

log = logging.getLogger(__name__)

HEADERLESS = (
    "; if that is its first data row, the file has no header: set data.column_names=[...] "
    "or data.header=false (columns by index)"
)
FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}


class DataError(EngineError, ValueError):
    """Bad or unreadable input data; the message names the file, line or column."""


# --- Reading ---------------------------------------------------------------


def _first_bad_utf8_line(path: Path) -> tuple[int, int]:
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return line_number, error.start + 1
    return 0, 0


# A quoted field spanning more lines than this, or this many times longer than every other value
# of its column, is taken for a stray quote that swallowed the rows after it.
MAX_FIELD_LINES = 10
MAX_FIELD_RATIO = 4.0


def file_format(path: Path, data: DataConfig) -> str:
    fmt = data.format or FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: cannot tell the format from the extension {path.suffix!r}; "
            "set data.format to one of csv, tsv, json, jsonl, parquet"
        )
    return fmt


def csv_options(fmt: str, data: DataConfig) -> dict[str, Any]:
    """``pandas.read_csv`` options for a csv/tsv file: separator, quoting (null: none for tsv,
    minimal for csv), every value a string, no header row when ``data.column_names`` or
    ``data.header=false`` say so. Training and prediction read files with these."""
    quoting = data.quoting or ("none" if fmt == "tsv" else "minimal")
    return {
        "sep": "\t" if fmt == "tsv" else ",",
        "quoting": csv.QUOTE_NONE if quoting == "none" else csv.QUOTE_MINIMAL,
        "encoding": "utf-8-sig",  # tolerate a byte-order mark (GLUE's TSVs carry one)
        "dtype": str,
        "keep_default_na": False,  # only a missing field is missing: the word "nan" is text
        "header": 0 if data.header and data.column_names is None else None,
    }


def _record_lines(path: Path, options: dict[str, Any]) -> list[tuple[int, int]]:
    """(first line, last line) of each record after the header, as the csv module reads the file."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=options["sep"], quoting=options["quoting"])
        spans, end = [], 0
        for _ in reader:
            spans.append((end + 1, reader.line_num))
            end = reader.line_num
    return spans[1:] if options["header"] == 0 else spans


def _header_names(path: Path, options: dict[str, Any]) -> list[str]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        return next(csv.reader(handle, delimiter=options["sep"], quoting=options["quoting"]), [])


def _check_fields_spanning_lines(path: Path, frame: pd.DataFrame, options: dict[str, Any]) -> None:
    """A quoted field may legally span lines; report each one, and stop on one that looks like a
    stray quote (many lines, or far longer than the rest of its column)."""
    text = frame.astype(str)  # read with dtype=str: every column is text
    spanning = text.apply(lambda column: column.str.contains("\n|\r", regex=True, na=False)).any(axis=1)
    if not spanning.any():
        return
    spans = _record_lines(path, options)
    if len(spans) != len(frame):
        return  # the csv module reads the file otherwise than pandas: no line numbers to give
    rows = list(np.flatnonzero(spanning.to_numpy()))
    lengths = text.apply(lambda column: column.str.len()).fillna(0).to_numpy()
    for row in rows:
        first, last = spans[row]
        others = np.delete(lengths, row, axis=0).max(axis=0) if len(frame) > 1 else lengths[row]
        too_long = (lengths[row] > MAX_FIELD_RATIO * np.maximum(others, 250)).any()
        if last - first + 1 > MAX_FIELD_LINES or too_long:
            raise DataError(
                f"{path}:{first}: a quoted field opened on this line runs to line {last} "
                f"({last - first + 1} lines, {int(lengths[row].max())} characters): a stray or unclosed quote? "
                "Fix the quoting, or read quotes as text with data.quoting=none"
            )
    where = ", ".join(f"{spans[r][0]}-{spans[r][1]}" for r in rows[:10])
    log.warning(
        "%s: %d row(s) have a quoted field that spans lines (lines %s%s); check the quoting if that is not meant",
        *(path, len(rows), where, " ..." if len(rows) > 10 else ""),
    )


def _unclosed_quote_line(path: Path, options: dict[str, Any]) -> int:
    """The line where the last record starts: where an unclosed quote ran to the end of the file."""
    try:
        spans = _record_lines(path, options)
    except csv.Error:
        return 0
    return spans[-1][0] if spans else 0


def name_columns(path: Path, frame: pd.DataFrame, options: dict[str, Any], data: DataConfig) -> pd.DataFrame:
    if data.column_names is not None:
        if frame.shape[1] != len(data.column_names):
            raise DataError(
                f"{path}: data.column_names has {len(data.column_names)} names but the rows have "
                f"{frame.shape[1]} fields"
            )
        frame.columns = list(data.column_names)
    elif not data.header:
        frame.columns = [str(i) for i in range(frame.shape[1])]
    else:
        names = _header_names(path, options)
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise DataError(f"{path}:1: the header repeats the column name(s) {repeated}; rename them")
    return frame


def read_table(path: str | os.PathLike, data: DataConfig) -> pd.DataFrame:
    """Read one local file into a DataFrame of strings (csv/tsv) or JSON values."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    fmt = file_format(path, data)
    options = csv_options(fmt, data) if fmt in ("csv", "tsv") else {}
    try:
        if fmt in ("csv", "tsv"):
            frame = pd.read_csv(path, engine="c", **options)
            frame = name_columns(path, frame, options, data)
            if options["quoting"] != csv.QUOTE_NONE:
                _check_fields_spanning_lines(path, frame, options)
        elif fmt in ("json", "jsonl"):
            lines = fmt == "jsonl" or _looks_like_jsonl(path)
            frame = pd.read_json(path, lines=lines, dtype=False, encoding="utf-8")
        else:
            frame = pd.read_parquet(path)
    except UnicodeDecodeError as error:
        line, column = _first_bad_utf8_line(path)
        raise DataError(f"{path}:{line}:{column}: not valid UTF-8 ({error.reason})") from None
    except pd.errors.ParserError as error:
        if "EOF inside string" in str(error):
            line = _unclosed_quote_line(path, options)
            raise DataError(
                f"{path}:{line}: a quote opened on this line is never closed; fix the quoting, "
                "or read quotes as text with data.quoting=none"
            ) from None
        raise DataError(f"{path}: cannot parse as {fmt}: {error}") from None
    except ValueError as error:
        raise DataError(f"{path}: cannot parse as {fmt}: {error}") from None
    frame.columns = [str(c) for c in frame.columns]
    repeated = sorted({c for c in frame.columns if list(frame.columns).count(c) > 1})
    if repeated:
        raise DataError(f"{path}: the column name(s) {repeated} appear more than once; rename them")
    return frame


def _looks_like_jsonl(path: Path) -> bool:
    with open(path, encoding="utf-8-sig") as handle:
        head = handle.read(1).strip()
    return head == "{"


def _hub_splits(data: DataConfig) -> dict[str, pd.DataFrame]:
    import datasets

    try:
        loaded = datasets.load_dataset(data.name, data.subset)
    except Exception as error:  # the hub raises many types: connection, not found, offline
        raise DataError(
            f"cannot load the hub data set {data.name!r} (subset {data.subset!r}): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}\n"
            "This machine may be offline. Use local files instead: data=mrpc (bundled) or "
            "data=csv data.train_file=... data.validation_file=... data.text_column=..."
        ) from None
    return {split: loaded[split].to_pandas() for split in loaded}


# --- Labels ----------------------------------------------------------------


@dataclass
class LabelSpace:
    names: list[str]
    problem_type: ProblemType

    @property
    def num_labels(self) -> int:
        return len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}


def _as_int(value: Any) -> int | None:
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return int(text)
    return None


def build_label_space(train_labels: Sequence[Any], data: DataConfig, where: str = "the training labels") -> LabelSpace:
    """Decide the label names from the config or the training labels."""
    if data.label_names is not None:
        names = [str(n) for n in data.label_names]
    else:
        values = list(train_labels)
        if data.problem_type == ProblemType.multi_label_classification:
            values = [v for row in values for v in split_multi(row, data.label_delimiter)]
        numeric = sum(_as_int(v) is not None or _is_float(v) for v in values)
        if values and numeric >= len(values) / 2:
            # Mostly numeric labels are ids; negative, -100, float and stray names are reported by encode_labels.
            ids = {i for i in (_as_int(v) for v in values) if i is not None and i >= 0}
            count = data.num_labels or (max(ids) + 1 if ids else 0)
            gaps = sorted(set(range(count)) - ids)
            if gaps and data.num_labels is None:
                raise DataError(
                    f"{where}: the label ids {sorted(ids)[:20]} leave gaps: {gaps[:20]}"
                    f"{' ...' if len(gaps) > 20 else ''} never occur. If that is meant, declare the label space "
                    f"(data.num_labels={count} or data.label_names=[...]); else fix the labels"
                )
            names = [str(i) for i in range(count)]
        else:
            names = sorted({str(v).strip() for v in values})
    if data.num_labels is not None and names and data.num_labels != len(names):
        raise DataError(
            f"data.num_labels={data.num_labels} but there are {len(names)} labels: {names[:10]}"
            + (" (from data.label_names)" if data.label_names is not None else " (found in the training labels)")
        )
    return LabelSpace(names=names, problem_type=data.problem_type)


def split_multi(value: Any, delimiter: str = ",") -> list[Any]:
    """A multi-label cell as a list: a list stays a list, a string is split on ``delimiter``."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return list(value)
    if isinstance(value, str):
        return [part.strip() for part in value.split(delimiter) if part.strip() != ""]
    return [value]


def _is_float(value: Any) -> bool:
    if isinstance(value, (float, np.floating)):
        return True
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return False
        return _as_int(value) is None
    return False


def _what_is_wrong(value: Any, space: LabelSpace) -> str:
    number = _as_int(value)
    if number == -100:
        return "-100 (the loss's ignore index: drop these rows rather than label them -100)"
    if number is not None and number < 0:
        return "negative label ids"
    if number is not None:
        return f"label ids out of range [0, {space.num_labels})"
    if _is_float(value):
        kind = "multi-label" if space.problem_type == ProblemType.multi_label_classification else "single-label"
        return f"float labels in a {kind} task (labels must be integer ids or names)"
    return "unknown label names"


def encode_labels(
    values: Sequence[Any], space: LabelSpace, where: str, column: str = "label", delimiter: str = ","
) -> list[Any]:
    """Map raw label values to ids (or multi-hot rows); every bad value is reported, grouped by kind."""
    label2id = space.label2id
    bad: dict[str, dict[str, list[int]]] = {}

    def to_id(value: Any, row: int) -> int:
        text = str(value).strip()
        if text in label2id:
            return label2id[text]
        number = _as_int(value)
        if number is not None and 0 <= number < space.num_labels and not isinstance(value, float):
            return number
        bad.setdefault(_what_is_wrong(value, space), {}).setdefault(text, []).append(row)
        return -1

    encoded: list[Any] = []
    for row, value in enumerate(values):
        if space.problem_type == ProblemType.multi_label_classification:
            hot = [0.0] * space.num_labels
            for part in split_multi(value, delimiter):
                index = to_id(part, row)
                if index >= 0:
                    hot[index] = 1.0
            encoded.append(hot)
        else:
            encoded.append(to_id(value, row))
    if bad:
        total = sum(len(rows) for kinds in bad.values() for rows in kinds.values())
        parts = []
        for kind, examples in bad.items():
            count = sum(len(rows) for rows in examples.values())
            shown = ", ".join(
                f"{value!r} ({len(rows)}x, first at data row {rows[0] + 1})"
                for value, rows in list(examples.items())[:5]
            )
            parts.append(f"{count} with {kind}: {shown}")
        raise DataError(
            f"{where}: {total} bad labels in column {column!r}; the {space.num_labels} labels are "
            f"{space.names[:10]}{' ...' if space.num_labels > 10 else ''}\n  " + "\n  ".join(parts)
        )
    return encoded


# --- Splits: read, check, encode --------------------------------------------


@dataclass
class RawSplit:
    name: str
    source: str  # file path or hub id, for messages
    texts: list[str]
    pairs: list[str] | None
    labels: list[Any]


def _split_sources(data: DataConfig) -> dict[str, str | None]:
    return {"train": data.train_file, "validation": data.validation_file, "test": data.test_file}


def read_raw_splits(data: DataConfig, want: Sequence[str]) -> dict[str, RawSplit]:
    """Read the wanted splits (``train``, ``validation``, ``test``) with their columns checked."""
    hub_names = {"train": data.train_split, "validation": data.eval_split, "test": data.test_split}
    frames: dict[str, tuple[str, pd.DataFrame]] = {}
    if data.name is not None:
        hub = _hub_splits(data)
        for split in want:
            hub_split = hub_names[split]
            if hub_split is None or hub_split not in hub:
                if split == "test":
                    continue
                raise DataError(f"hub data set {data.name!r} has no split {hub_split!r}; it has {sorted(hub)}")
            frames[split] = (f"{data.name}/{data.subset or ''}:{hub_split}", hub[hub_split])
    else:
        files = _split_sources(data)
        for split in want:
            # The evaluation role reads the file that data.eval_split names (validation by default).
            path = files[data.eval_split] if split == "validation" else files[split]
            if path is None:
                continue
            frames[split] = (str(path), read_table(path, data))

    columns = [data.text_column] + ([data.text_pair_column] if data.text_pair_column else []) + [data.label_column]
    splits: dict[str, RawSplit] = {}
    for split, (source, frame) in frames.items():
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise DataError(
                f"{source}: no column {', '.join(repr(c) for c in missing)} "
                f"(set data.text_column / data.text_pair_column / data.label_column); "
                f"the file has columns {list(frame.columns)}{HEADERLESS if data.header and data.column_names is None else ''}"
            )
        if len(frame) == 0:
            raise DataError(f"{source}: the {split} split is empty (no data rows)")
        limit = data.max_train_samples if split == "train" else data.max_eval_samples
        if limit is not None:
            frame = frame.iloc[:limit]
        texts = check_texts(frame[data.text_column], source, data.text_column)
        pair_column = data.text_pair_column
        pairs = check_texts(frame[pair_column], source, pair_column) if pair_column else None
        labels = frame[data.label_column]
        null = np.flatnonzero(labels.isna().to_numpy())
        if len(null):
            raise DataError(
                f"{source}: {len(null)} rows without a label in column {data.label_column!r} ({_rows(null)})"
            )
        splits[split] = RawSplit(split, source, texts, pairs, labels.tolist())
    return splits


def _rows(rows: Sequence[int]) -> str:
    return f"data rows {', '.join(str(r + 1) for r in rows[:10])}{' ...' if len(rows) > 10 else ''}"


def check_texts(values: pd.Series, source: str, column: str, first_row: int = 0) -> list[str]:
    """The column's texts. Every row must have one: a missing value (null, an empty field) or only
    spaces is named by its data row (``first_row`` rows before this part of the file); the word
    "nan" is a text like any other."""
    empty = np.flatnonzero((values.isna() | values.astype(str).str.strip().eq("")).to_numpy())
    if len(empty):
        raise DataError(f"{source}: {len(empty)} rows with no text in column {column!r} ({_rows(empty + first_row)})")
    return values.astype(str).tolist()


def label_counts(label_ids: Sequence[Any], space: LabelSpace) -> list[int]:
    if space.problem_type == ProblemType.multi_label_classification:
        return [int(x) for x in np.asarray(label_ids, dtype=np.float64).sum(axis=0)] if label_ids else []
    counts = Counter(label_ids)
    return [counts.get(i, 0) for i in range(space.num_labels)]


def warn_labels_missing_from_train(encoded: dict[str, list[Any]], space: LabelSpace) -> list[str]:
    """A label with no training example that still appears in dev or test: a warning, not an error."""
    train = label_counts(encoded["train"], space)
    warnings = []
    for split in ("validation", "test"):
        if split not in encoded:
            continue
        counts = label_counts(encoded[split], space)
        for name, in_train, in_split in zip(space.names, train, counts, strict=True):
            if in_train == 0 and in_split > 0:
                warnings.append(f"label {name!r} has no training example but {in_split} in {split}")
    for message in warnings:
        log.warning("%s", message)
    return warnings


def preflight(
    raw: dict[str, RawSplit],
    encoded: dict[str, list[Any]],
    lengths: dict[str, list[int]],
    space: LabelSpace,
    max_length: int,
) -> dict[str, Any]:
    """What a practitioner checks before training: sizes, balance, lengths, truncation, leakage."""
    report: dict[str, Any] = {"max_length": max_length, "splits": {}}
    for name, split in raw.items():
        counts = label_counts(encoded[name], space)
        present = [c for c in counts if c > 0]
        n_tokens = np.asarray(lengths[name])
        p50, p90, p99 = (int(np.percentile(n_tokens, q, method="higher")) for q in (50, 90, 99))
        report["splits"][name] = {
            "rows": len(split.texts),
            "label_counts": dict(zip(space.names, counts, strict=True)),
            "imbalance_ratio": (max(present) / min(present)) if present else None,
            "tokens": {"p50": p50, "p90": p90, "p99": p99, "max": int(n_tokens.max())},
            "truncated_share": float((n_tokens > max_length).mean()),
        }
    reference = lengths.get("train") or lengths["validation"]
    p99 = int(np.percentile(reference, 99, method="higher"))
    report["suggested_max_length"] = int(min(512, 8 * math.ceil(p99 / 8)))

    def keys(split: RawSplit) -> set[str]:
        pairs = split.pairs or [""] * len(split.texts)
        return {f"{t}\x1f{p}" for t, p in zip(split.texts, pairs, strict=True)}

    if "train" in raw:
        report["duplicates_train_dev"] = len(keys(raw["train"]) & keys(raw["validation"]))
    return report


def format_preflight(report: dict[str, Any]) -> str:
    lines = ["data pre-flight:"]
    for name, split in report["splits"].items():
        tokens = split["tokens"]
        ratio = split["imbalance_ratio"]
        lines.append(
            f"  {name}: {split['rows']} rows | labels {split['label_counts']} | imbalance "
            f"{ratio:.2f} | tokens p50 {tokens['p50']} p90 {tokens['p90']} p99 {tokens['p99']} max {tokens['max']}"
            f" | truncated at {report['max_length']}: {100 * split['truncated_share']:.1f}%"
            if ratio is not None
            else f"  {name}: {split['rows']} rows"
        )
    lines.append(f"  suggested max_length (p99 of train, to a multiple of 8): {report['suggested_max_length']}")
    if "duplicates_train_dev" in report:
        lines.append(f"  texts in both train and dev: {report['duplicates_train_dev']}")
    return "\n".join(lines)
