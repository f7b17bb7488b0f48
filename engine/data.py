"""Data: read a source, map labels to ids, tokenize (cached), build the loaders.

Knows nothing about devices: loaders yield CPU tensors and the backend moves them.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler, SequentialSampler

from engine.config import DataConfig, ProblemType
from engine.errors import EngineError

log = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}


class DataError(EngineError, ValueError):
    """Bad or unreadable input data; the message names the file, line or column."""


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def _first_bad_utf8_line(path: Path) -> tuple[int, int]:
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return line_number, error.start + 1
    return 0, 0


def read_table(path: str | os.PathLike, data: DataConfig) -> pd.DataFrame:
    """Read one local file into a DataFrame of strings (csv/tsv) or JSON values."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    fmt = data.format or FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: cannot tell the format from the extension {path.suffix!r}; "
            "set data.format to one of csv, tsv, json, jsonl, parquet"
        )
    try:
        if fmt in ("csv", "tsv"):
            frame = pd.read_csv(
                path,
                sep="\t" if fmt == "tsv" else ",",
                quoting=csv.QUOTE_NONE if data.quoting == "none" else csv.QUOTE_MINIMAL,
                encoding="utf-8-sig",  # tolerate a byte-order mark (GLUE's TSVs carry one)
                dtype=str,
                keep_default_na=False,
                engine="c",
            )
        elif fmt in ("json", "jsonl"):
            lines = fmt == "jsonl" or _looks_like_jsonl(path)
            frame = pd.read_json(path, lines=lines, dtype=False, encoding="utf-8")
        else:
            frame = pd.read_parquet(path)
    except UnicodeDecodeError as error:
        line, column = _first_bad_utf8_line(path)
        raise DataError(f"{path}:{line}:{column}: not valid UTF-8 ({error.reason})") from None
    except pd.errors.ParserError as error:
        raise DataError(f"{path}: cannot parse as {fmt}: {error}") from None
    except ValueError as error:
        raise DataError(f"{path}: cannot parse as {fmt}: {error}") from None
    frame.columns = [str(c) for c in frame.columns]
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


# ---------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------


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


def build_label_space(train_labels: Sequence[Any], data: DataConfig) -> LabelSpace:
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
            ids = [i for i in (_as_int(v) for v in values) if i is not None and i >= 0]
            count = data.num_labels or (max(ids) + 1 if ids else 0)
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


# ---------------------------------------------------------------------------
# Splits: read, check, encode, tokenize
# ---------------------------------------------------------------------------


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
                f"the file has columns {list(frame.columns)}"
            )
        if len(frame) == 0:
            raise DataError(f"{source}: the {split} split is empty (no data rows)")
        limit = data.max_train_samples if split == "train" else data.max_eval_samples
        if limit is not None:
            frame = frame.iloc[:limit]
        texts = frame[data.text_column].astype(str).tolist()
        pairs = frame[data.text_pair_column].astype(str).tolist() if data.text_pair_column else None
        for column, values in ((data.text_column, texts), (data.text_pair_column, pairs)):
            empty = [row for row, text in enumerate(values or []) if not text.strip() or text == "nan"]
            if empty:
                rows = ", ".join(str(r + 1) for r in empty[:10])
                raise DataError(
                    f"{source}: {len(empty)} rows with empty text in column {column!r} "
                    f"(data rows {rows}{' ...' if len(empty) > 10 else ''})"
                )
        splits[split] = RawSplit(split, source, texts, pairs, frame[data.label_column].tolist())
    return splits


def tokenize_split(
    raw: RawSplit,
    label_ids: list[Any],
    tokenizer: Any,
    data: DataConfig,
):
    """Tokenize with ``datasets.map(batched=True)``; the result is cached on disk by content."""
    import datasets

    columns: dict[str, list[Any]] = {"text": raw.texts, "labels": label_ids}
    if raw.pairs is not None:
        columns["text_pair"] = raw.pairs
    table = datasets.Dataset.from_dict(columns)

    key = hashlib.sha256()
    for part in (
        "tokenize-v2",  # bump when the cached columns change
        type(tokenizer).__name__,
        str(getattr(tokenizer, "name_or_path", "")),
        str(len(tokenizer)),
        str(data.max_length),
        repr(label_ids[:1]),
    ):
        key.update(part.encode())
    for name in sorted(columns):
        key.update(name.encode())
        key.update("\x1f".join(map(str, columns[name])).encode())
    cache_dir = Path(data.cache_dir or Path.home() / ".cache" / "engine" / "tokenized").expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_file = cache_dir / f"{raw.name}-{key.hexdigest()[:24]}.arrow"

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        encoded = tokenizer(batch["text"], batch.get("text_pair"), truncation=True, max_length=data.max_length)
        # Untruncated lengths, for the pre-flight report (how much max_length cuts).
        full = tokenizer(batch["text"], batch.get("text_pair"), truncation=False, verbose=False)
        encoded["n_tokens"] = [len(ids) for ids in full["input_ids"]]
        return encoded

    remove = [c for c in table.column_names if c != "labels"]
    return table.map(
        encode,
        batched=True,
        batch_size=1000,
        remove_columns=remove,
        cache_file_name=str(cache_file),
        load_from_cache_file=True,
        desc=f"tokenize {raw.name}",
    )


# ---------------------------------------------------------------------------
# Samplers and loaders
# ---------------------------------------------------------------------------


class EpochShuffleSampler(Sampler[int]):
    """A random permutation that depends only on (seed, epoch): reproducible and resumable."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + 7919 * self.epoch)
        yield from torch.randperm(self.size, generator=generator).tolist()

    def __len__(self) -> int:
        return self.size


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar length in random order: little padding, still a fresh order each epoch.

    Each epoch: a (seed, epoch) permutation is cut into mega-batches of ``group_batches``
    batches; each mega-batch is sorted by length and cut into batches; the batches are
    shuffled. Every index appears exactly once per epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group_batches: int = 50) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group = batch_size * group_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + 7919 * self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches: list[list[int]] = []
        for start in range(0, len(order), self.group):
            chunk = sorted(order[start : start + self.group], key=lambda i: -self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffle]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


class SkipBatches(Sampler[list[int]]):
    """The batches of ``batch_sampler`` after the first ``skip`` (resuming mid-epoch)."""

    def __init__(self, batch_sampler: Any, skip: int) -> None:
        self.batch_sampler = batch_sampler
        self.skip = skip

    def __iter__(self) -> Iterator[list[int]]:
        for index, batch in enumerate(self.batch_sampler):
            if index >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)


def skip_first_batches(loader: DataLoader, skip: int) -> DataLoader:
    """A loader over the same data that starts after ``skip`` batches, without loading the skipped ones."""
    return DataLoader(
        loader.dataset,
        batch_sampler=SkipBatches(loader.batch_sampler, skip),
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        generator=loader.generator,
    )


class LengthSortedSampler(Sampler[int]):
    """Indices longest first, so each evaluation batch holds similar lengths (little padding)."""

    def __init__(self, lengths: Sequence[int]) -> None:
        self.order = sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def row_order(loader: DataLoader) -> np.ndarray:
    """The data set row behind each position of the loader's (gathered) output.

    Take it before ``backend.prepare``: Accelerate shards batches round-robin and
    ``gather_for_metrics`` puts them back in this same order.
    """
    return np.fromiter(iter(loader.sampler), dtype=np.int64, count=len(loader.sampler))


def restore_order(order: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    """Put arrays that follow ``order`` back in data set row order."""
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return [array[inverse] for array in arrays]


@dataclass
class DataBundle:
    labels: LabelSpace
    train: Any | None  # datasets.Dataset
    eval: Any
    test: Any | None
    train_label_counts: list[int]
    sources: dict[str, str]
    preflight: dict[str, Any]


def label_counts(label_ids: Sequence[Any], space: LabelSpace) -> list[int]:
    if space.problem_type == ProblemType.multi_label_classification:
        return [int(x) for x in np.asarray(label_ids, dtype=np.float64).sum(axis=0)] if label_ids else []
    counts = Counter(label_ids)
    return [counts.get(i, 0) for i in range(space.num_labels)]


def load_data(
    data: DataConfig,
    tokenizer: Any,
    with_train: bool = True,
    with_test: bool = False,
    label_names: list[str] | None = None,
) -> DataBundle:
    """Read, check, encode and tokenize the splits; ``label_names`` (a checkpoint's) fix the label space."""
    want = (["train"] if with_train else []) + ["validation"] + (["test"] if with_test else [])
    raw = read_raw_splits(data, want)
    if with_train and "train" not in raw:
        raise DataError("no training split: set data.train_file (or data.name for a hub data set)")
    if "validation" not in raw:
        raise DataError(
            f"no evaluation split: data.eval_split={data.eval_split!r} names no file (set data.{data.eval_split}_file)"
            if data.name is None
            else f"no evaluation split {data.eval_split!r} in {data.name!r}"
        )
    if label_names is not None:
        space = LabelSpace(names=list(label_names), problem_type=data.problem_type)
    else:
        space = build_label_space(raw["train"].labels if with_train else raw["validation"].labels, data)
    if space.num_labels < 1:
        raise DataError(f"{raw[next(iter(raw))].source}: no labels found in column {data.label_column!r}")
    encoded = {
        name: encode_labels(split.labels, space, split.source, data.label_column, data.label_delimiter)
        for name, split in raw.items()
    }
    if "train" in encoded:
        _warn_labels_missing_from_train(encoded, space)
    tokenized = {name: tokenize_split(split, encoded[name], tokenizer, data) for name, split in raw.items()}
    report = preflight(raw, encoded, {n: list(d["n_tokens"]) for n, d in tokenized.items()}, space, data.max_length)
    tokenized = {name: d.remove_columns("n_tokens") for name, d in tokenized.items()}
    return DataBundle(
        labels=space,
        train=tokenized.get("train"),
        eval=tokenized["validation"],
        test=tokenized.get("test"),
        train_label_counts=label_counts(encoded["train"], space) if with_train else [],
        sources={name: split.source for name, split in raw.items()},
        preflight=report,
    )


def _warn_labels_missing_from_train(encoded: dict[str, list[Any]], space: LabelSpace) -> list[str]:
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


# Batch lengths rounded up to a multiple of this when data.pad_to_multiple_of is null. With every
# length distinct (MRPC: ~90), oneDNN keeps a compiled kernel per bf16 batched-matmul shape: the
# engine's attention grew a 3-epoch MRPC run's peak RSS from ~2.0 to 2.5 GB; multiples of 8 keep
# it at ~1.5 GB (200-step runs: 2136 -> 1473 MB) at the same training speed (62.4 / 62.0 samples/s).
DEFAULT_PAD_MULTIPLE = 8


def make_collator(tokenizer: Any, data: DataConfig, pad_to_multiple_of: int | None = None) -> PadCollator:
    """Dynamic padding to the longest row of each batch, rounded up to ``pad_to_multiple_of``
    (default ``data.pad_to_multiple_of``, :data:`DEFAULT_PAD_MULTIPLE` when that is null; a
    compiled model passes its bucket size)."""
    multiple = pad_to_multiple_of or data.pad_to_multiple_of or DEFAULT_PAD_MULTIPLE
    return PadCollator(tokenizer, multiple)


# The columns DataCollatorWithPadding (``tokenizer.pad``) pads; PadCollator.pad_values holds the values.
PADDED = ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask")


class PadCollator:
    """``DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple, return_tensors="pt")``,
    with a fast path for :class:`TokenColumns` rows.

    The loaders fetch a batch's rows from :class:`TokenColumns` as one :class:`Rows`; they are
    padded here from the flat columns with NumPy into the same tensors (same keys, dtypes and
    values) that the transformers collator builds from a list of per-row dicts: 0.04 ms for a
    batch of 16 MRPC rows, where fetching the rows from the ``datasets`` table and padding them
    with ``tokenizer.pad`` took 0.47 ms. Anything else (a list of dicts) goes
    to the transformers collator itself.
    """

    def __init__(self, tokenizer: Any, multiple: int) -> None:
        from transformers import DataCollatorWithPadding

        self.multiple = multiple
        self.collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple, return_tensors="pt")
        self.pad_values = {
            "input_ids": tokenizer.pad_token_id,
            "attention_mask": 0,
            "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0),
            "special_tokens_mask": 1,
        }
        self.left = tokenizer.padding_side == "left"

    @property
    def fast(self) -> bool:
        """Whether :class:`Rows` can be padded here (a tokenizer without a pad token: only through
        the transformers collator, which says so)."""
        return self.pad_values["input_ids"] is not None

    def __call__(self, features: Any) -> dict[str, torch.Tensor]:
        if isinstance(features, Rows):
            return features.padded(self)
        return dict(self.collator(features))


class Rows:
    """Rows ``indices`` of a :class:`TokenColumns`: what its ``__getitems__`` hands the collator."""

    def __init__(self, columns: TokenColumns, indices: Sequence[int]) -> None:
        self.columns = columns
        self.indices = np.asarray(indices, dtype=np.int64)

    def padded(self, collator: PadCollator) -> dict[str, torch.Tensor]:
        if not collator.fast:
            return collator([self.columns[int(i)] for i in self.indices])
        batch: dict[str, torch.Tensor] = {}
        lengths = self.columns.lengths[self.indices]
        width = int(lengths.max()) if len(lengths) else 0
        width = -(-width // collator.multiple) * collator.multiple
        for name, column in self.columns.columns.items():
            if name in PADDED:
                values, offsets = column
                out = np.full((len(self.indices), width), collator.pad_values[name], dtype=np.int64)
                for row, (start, end) in enumerate(zip(offsets[self.indices], offsets[self.indices + 1], strict=True)):
                    if collator.left:
                        out[row, width - (end - start) :] = values[start:end]
                    else:
                        out[row, : end - start] = values[start:end]
                batch[name] = torch.from_numpy(out)
            else:
                batch[name] = torch.from_numpy(column[self.indices])
        return batch


class TokenColumns(torch.utils.data.Dataset):
    """A tokenized ``datasets.Dataset`` held as flat NumPy columns (each list column: its values
    and row offsets), for :class:`PadCollator`'s fast path. Indexing gives a row as the data set
    does (a dict of lists and scalars); ``__getitems__`` gives a batch's :class:`Rows`.

    Token columns are the ones ``tokenizer.pad`` pads (:data:`PADDED`); any other column must be a
    number or a fixed-width list per row (labels, multi-hot labels), stored as the dtype that
    ``torch.tensor`` gives its Python values (int64, float32, bool).
    """

    def __init__(self, dataset: Any) -> None:
        import pyarrow as pa

        table = dataset.with_format("arrow")[:]
        self.size = table.num_rows
        ids = table.schema.field("input_ids").type if "input_ids" in table.column_names else None
        if ids is None or not (pa.types.is_list(ids) or pa.types.is_large_list(ids)):
            raise DataError(f"a tokenized data set has token lists in 'input_ids'; its columns: {table.column_names}")
        self.columns: dict[str, Any] = {}
        for name in table.column_names:
            array = table.column(name).combine_chunks()
            listed = pa.types.is_list(array.type) or pa.types.is_large_list(array.type)
            if name in PADDED and listed:
                offsets = array.offsets.to_numpy().astype(np.int64)
                self.columns[name] = (array.values.to_numpy(zero_copy_only=False), offsets)
            else:
                if listed:
                    widths = np.unique(np.diff(array.offsets.to_numpy()))
                    if len(widths) > 1:
                        raise DataError(f"column {name!r}: rows of different lengths, which a batch cannot stack")
                    width = int(widths[0]) if len(widths) else 0
                    values = array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), width)
                else:
                    values = array.to_numpy(zero_copy_only=False)
                if values.dtype.kind not in _TORCH_DTYPE:
                    raise DataError(f"column {name!r}: {values.dtype} values, which a batch cannot stack into a tensor")
                self.columns[name] = values.astype(_TORCH_DTYPE.get(values.dtype.kind, values.dtype))
        self.lengths = np.diff(self.columns["input_ids"][1])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for name, column in self.columns.items():
            if isinstance(column, tuple):
                values, offsets = column
                row[name] = values[offsets[index] : offsets[index + 1]].tolist()
            else:
                row[name] = column[index].tolist()
        return row

    def __getitems__(self, indices: Sequence[int]) -> Rows:
        return Rows(self, indices)


# numpy kind -> the dtype torch.tensor gives Python values of that kind
_TORCH_DTYPE = {"i": np.int64, "u": np.int64, "f": np.float32, "b": np.bool_}


def token_rows(dataset: Any, collator: Any) -> Any:
    """``dataset`` as :class:`TokenColumns` where ``collator`` pads those (a :class:`PadCollator`
    and a ``datasets.Dataset``); otherwise ``dataset`` itself."""
    import datasets

    if isinstance(collator, PadCollator) and collator.fast and isinstance(dataset, datasets.Dataset):
        return TokenColumns(dataset)
    return dataset


def token_lengths(dataset: Any) -> Sequence[int]:
    """Each row's token count."""
    if isinstance(dataset, TokenColumns):
        return dataset.lengths.tolist()
    return [len(ids) for ids in dataset["input_ids"]]


def train_loader(
    dataset: Any, batch_size: int, seed: int, collator: Any, num_workers: int = 0, group_by_length: bool = True
) -> tuple[DataLoader, Any]:
    """Shuffled training batches and the object whose ``set_epoch`` reshuffles them (the loop calls it).

    ``group_by_length`` batches similar lengths together (less padding, same randomness across epochs).
    """
    dataset = token_rows(dataset, collator)
    if group_by_length:
        batches: Any = LengthGroupedBatchSampler(token_lengths(dataset), batch_size, seed)
        shuffler = batches
    else:
        shuffler = EpochShuffleSampler(len(dataset), seed)
        batches = BatchSampler(shuffler, batch_size=batch_size, drop_last=False)
    # Its own generator: creating an iterator must not draw from the global RNG (exact resume).
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collator,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, shuffler


def eval_loader(dataset: Any, batch_size: int, collator: Any, num_workers: int = 0, sort_by_length: bool = True):
    """Evaluation batches, longest rows first when ``sort_by_length`` (see :func:`row_order`)."""
    sampler: Sampler[int]
    dataset = token_rows(dataset, collator)
    if sort_by_length:
        sampler = LengthSortedSampler(token_lengths(dataset))
    else:
        sampler = SequentialSampler(range(len(dataset)))
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=batch_size,
        collate_fn=collator,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),  # iterating never draws from the global RNG
    )
