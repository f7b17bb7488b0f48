"""Tokenizing (cached) and batching: samplers, the collator, the loaders.

Reads through :mod:`engine.sources`; knows nothing about devices: loaders yield CPU tensors
and the backend moves them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler, SequentialSampler

from engine.config import DataConfig
from engine.sources import (
    DataError,
    LabelSpace,
    RawSplit,
    build_label_space,
    encode_labels,
    label_counts,
    preflight,
    read_raw_splits,
    warn_labels_missing_from_train,
)

log = logging.getLogger(__name__)


def tokenize_split(raw: RawSplit, label_ids: list[Any], tokenizer: Any, data: DataConfig):
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
    # The content key is the fingerprint: else datasets hashes ``encode`` with the tokenizer it holds (~0.5 s a split).
    fingerprint = key.hexdigest()[:32]

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        encoded = tokenizer(batch["text"], batch.get("text_pair"), truncation=True, max_length=data.max_length)
        # Untruncated lengths, for the pre-flight report (how much max_length cuts).
        full = tokenizer(batch["text"], batch.get("text_pair"), truncation=False, verbose=False)
        encoded["n_tokens"] = [len(ids) for ids in full["input_ids"]]
        return encoded

    remove = [c for c in table.column_names if c != "labels"]
    options = dict(
        batched=True, batch_size=1000, remove_columns=remove, desc=f"tokenize {raw.name}", new_fingerprint=fingerprint
    )
    try:
        return table.map(encode, cache_file_name=str(cache_file), load_from_cache_file=True, **options)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid: a cache file cut short by a kill
        if not cache_file.exists():
            raise
        log.warning("%s: unreadable token cache (%s); tokenizing again", cache_file, str(error).splitlines()[0])
        cache_file.unlink()
        return table.map(encode, cache_file_name=str(cache_file), load_from_cache_file=False, **options)


# --- Samplers and loaders ---------------------------------------------------


class EpochSeeded:
    """Draws from a generator that depends only on (seed, epoch): reproducible and resumable; the
    loop calls ``set_epoch`` before each epoch."""

    seed: int
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + 7919 * self.epoch)


class EpochShuffleSampler(EpochSeeded, Sampler[int]):
    """A fresh random permutation of the rows each epoch."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.size, generator=self.generator()).tolist()

    def __len__(self) -> int:
        return self.size


class LengthGroupedBatchSampler(EpochSeeded, Sampler[list[int]]):
    """Batches of similar length in random order: little padding, still a fresh order each epoch.

    Each epoch: a (seed, epoch) permutation is cut into mega-batches of ``group_batches``
    batches; each mega-batch is sorted by length and cut into batches; the batches are
    shuffled. Every index appears exactly once per epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group_batches: int = 50) -> None:
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.group = batch_size * group_batches

    def batches(self) -> list[list[int]]:
        generator = self.generator()
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


def skip_first_batches(loader: DataLoader, skip: int) -> DataLoader:
    """A loader over the same data that starts after ``skip`` batches, without loading the skipped ones
    (Accelerate's ``skip_first_batches`` for a loader it did not prepare)."""
    from accelerate.data_loader import SkipBatchSampler

    return DataLoader(
        loader.dataset,
        batch_sampler=SkipBatchSampler(loader.batch_sampler, skip),
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
        labelled = raw["train"] if with_train else raw["validation"]
        space = build_label_space(labelled.labels, data, f"{labelled.source}: column {data.label_column!r}")
    if space.num_labels < 1:
        raise DataError(f"{raw[next(iter(raw))].source}: no labels found in column {data.label_column!r}")
    encoded = {
        name: encode_labels(split.labels, space, split.source, data.label_column, data.label_delimiter)
        for name, split in raw.items()
    }
    if "train" in encoded:
        warn_labels_missing_from_train(encoded, space)
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


# Batch lengths rounded up to a multiple of this when data.pad_to_multiple_of is null. With every
# length distinct (MRPC: ~90), oneDNN keeps a compiled kernel per bf16 matmul shape and a 3-epoch
# run's peak RSS grows by ~0.5 GB; multiples of 8 keep the shapes few at the same training speed.
DEFAULT_PAD_MULTIPLE = 8


def make_collator(tokenizer: Any, data: DataConfig) -> Any:
    """Dynamic padding to the longest row of each batch, rounded up to ``data.pad_to_multiple_of``
    (:data:`DEFAULT_PAD_MULTIPLE` when null)."""
    from transformers import DataCollatorWithPadding

    multiple = data.pad_to_multiple_of or DEFAULT_PAD_MULTIPLE
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple, return_tensors="pt")


def token_lengths(dataset: Any) -> Sequence[int]:
    """Each row's token count."""
    return [len(ids) for ids in dataset["input_ids"]]


def loader_workers(data: DataConfig, device: torch.device) -> dict[str, Any]:
    """``num_workers`` (``data.num_workers``; null: 2 on CUDA, where collating overlaps the GPU's work,
    0 on the CPU, whose cores train) and ``pin_memory`` (CUDA: page-locked batches, so that the
    ``non_blocking`` copies really overlap)."""
    cuda = device.type == "cuda"
    workers = data.num_workers if data.num_workers is not None else (2 if cuda else 0)
    if workers:  # the workers pad with the fast tokenizer the main process already used
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return {"num_workers": workers, "pin_memory": cuda}


def train_loader(
    dataset: Any,
    batch_size: int,
    seed: int,
    collator: Any,
    num_workers: int = 0,
    group_by_length: bool = True,
    pin_memory: bool = False,
) -> tuple[DataLoader, Any]:
    """Shuffled training batches and the object whose ``set_epoch`` reshuffles them (the loop calls it).

    ``group_by_length`` batches similar lengths together (less padding, same randomness across epochs).
    """
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
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, shuffler


def eval_loader(
    dataset: Any,
    batch_size: int,
    collator: Any,
    num_workers: int = 0,
    sort_by_length: bool = True,
    pin_memory: bool = False,
):
    """Evaluation batches, longest rows first when ``sort_by_length`` (see :func:`row_order`)."""
    sampler: Sampler[int]
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
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),  # iterating never draws from the global RNG
    )


def run_eval_loader(dataset: Any, config: Any, collator: Any, device: torch.device) -> DataLoader:
    """:func:`eval_loader` with a run's settings (``trainer.eval_batch_size``, ``data.*``) on ``device``."""
    workers = loader_workers(config.data, device)
    return eval_loader(
        dataset, config.trainer.eval_batch_size, collator, sort_by_length=config.data.sort_eval_by_length, **workers
    )
