"""Reading, label mapping and tokenization, on the bundled MRPC and small local files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

from engine.config import DataConfig, ProblemType, bundled_minilm_path
from engine.data import (
    EpochShuffleSampler,
    LengthGroupedBatchSampler,
    eval_loader,
    load_data,
    make_collator,
    restore_order,
    row_order,
)
from engine.sources import DataError, build_label_space, encode_labels, read_raw_splits

ROOT = Path(__file__).resolve().parent.parent
MRPC = ROOT / "data" / "mrpc"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(bundled_minilm_path())


def mrpc_config(**changes) -> DataConfig:
    base = dict(
        train_file=str(MRPC / "train.tsv"),
        validation_file=str(MRPC / "dev.tsv"),
        test_file=str(MRPC / "test.tsv"),
        format="tsv",
        quoting="none",
        text_column="#1 String",
        text_pair_column="#2 String",
        label_column="Quality",
        label_names=["not_equivalent", "equivalent"],
    )
    base.update(changes)
    return DataConfig(**base)


def test_mrpc_row_and_label_counts():
    raw = read_raw_splits(mrpc_config(), ["train", "validation", "test"])
    assert len(raw["train"].texts) == 3667
    assert len(raw["validation"].texts) == 408
    assert len(raw["test"].texts) == 1725
    space = build_label_space(raw["train"].labels, mrpc_config())
    ids = encode_labels(raw["train"].labels, space, "train")
    assert ids.count(1) == 2473 and ids.count(0) == 1194
    # Quoting off: a sentence with quotes stays whole (first row of train carries " the witness ").
    assert raw["train"].texts[0].startswith('Amrozi accused his brother , whom he called " the witness "')


def test_tokenized_pairs_and_cache(tokenizer, tmp_path):
    config = mrpc_config(max_train_samples=50, max_eval_samples=20, cache_dir=str(tmp_path))
    bundle = load_data(config, tokenizer)
    assert len(bundle.train) == 50 and len(bundle.eval) == 20
    row = bundle.train[0]
    assert set(row) >= {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert 1 in row["token_type_ids"]  # the pair's second sentence
    assert bundle.train_label_counts == [
        sum(1 for r in bundle.train["labels"] if r == 0),
        sum(1 for r in bundle.train["labels"] if r == 1),
    ]
    cached = sorted(p.name for p in tmp_path.glob("*.arrow"))
    assert len(cached) == 2
    load_data(config, tokenizer)  # second time: read back from the cache, nothing new written
    assert sorted(p.name for p in tmp_path.glob("*.arrow")) == cached


def test_truncation_at_max_length(tokenizer, tmp_path):
    bundle = load_data(
        mrpc_config(max_length=16, max_train_samples=30, max_eval_samples=5, cache_dir=str(tmp_path)), tokenizer
    )
    assert max(len(ids) for ids in bundle.train["input_ids"]) == 16


def _write(path: Path, rows: list[dict], fmt: str) -> Path:
    frame = pd.DataFrame(rows)
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        frame.to_parquet(path)
    return path


ROWS = [
    {"text": "great film", "label": "pos"},
    {"text": "awful, boring", "label": "neg"},
    {"text": "loved it", "label": "pos"},
    {"text": "meh", "label": "neutral"},
]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_each_local_format_with_string_labels(fmt, tokenizer, tmp_path):
    train = _write(tmp_path / f"train.{fmt}", ROWS, fmt)
    dev = _write(tmp_path / f"dev.{fmt}", ROWS[:2], fmt)
    config = DataConfig(
        train_file=str(train), validation_file=str(dev), text_column="text", cache_dir=str(tmp_path / "cache")
    )
    bundle = load_data(config, tokenizer)
    assert bundle.labels.names == ["neg", "neutral", "pos"]  # sorted, ids saved as id2label
    assert list(bundle.train["labels"]) == [2, 0, 2, 1]
    assert bundle.labels.label2id == {"neg": 0, "neutral": 1, "pos": 2}
    assert bundle.labels.id2label[2] == "pos"


def test_missing_column_names_column_file_and_columns(tokenizer, tmp_path):
    train = _write(tmp_path / "train.csv", ROWS, "csv")
    config = DataConfig(train_file=str(train), validation_file=str(train), text_column="sentence")
    with pytest.raises(DataError) as info:
        load_data(config, tokenizer)
    message = str(info.value)
    assert "'sentence'" in message and str(train) in message and "['text', 'label']" in message


def test_empty_split_is_an_error(tokenizer, tmp_path):
    train = _write(tmp_path / "train.csv", ROWS, "csv")
    empty = tmp_path / "dev.csv"
    empty.write_text("text,label\n")
    config = DataConfig(train_file=str(train), validation_file=str(empty), text_column="text")
    with pytest.raises(DataError, match=r"dev.csv: the validation split is empty"):
        load_data(config, tokenizer)


def test_unknown_label_in_dev_is_named(tokenizer, tmp_path):
    train = _write(tmp_path / "train.csv", ROWS, "csv")
    dev = _write(tmp_path / "dev.csv", [{"text": "x", "label": "angry"}], "csv")
    config = DataConfig(train_file=str(train), validation_file=str(dev), text_column="text")
    with pytest.raises(
        DataError, match=r"(?s)dev.csv: 1 bad labels in column 'label'; the 3 labels are.*unknown label names: 'angry'"
    ):
        load_data(config, tokenizer)


def test_integer_label_out_of_range(tokenizer, tmp_path):
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 5}]
    train = _write(tmp_path / "train.csv", rows, "csv")
    config = DataConfig(train_file=str(train), validation_file=str(train), text_column="text", num_labels=2)
    with pytest.raises(DataError, match="'5'"):
        load_data(config, tokenizer)


def test_non_utf8_file_names_line(tmp_path, tokenizer):
    bad = tmp_path / "train.csv"
    bad.write_bytes(b"text,label\nfine,0\nbad \xff byte,1\n")
    config = DataConfig(train_file=str(bad), validation_file=str(bad), text_column="text")
    with pytest.raises(DataError, match=r"train.csv:3:5: not valid UTF-8"):
        load_data(config, tokenizer)


def test_multi_label_strings_become_multi_hot():
    config = DataConfig(text_column="t", problem_type=ProblemType.multi_label_classification, num_labels=4)
    space = build_label_space(["0,2", "3", "1,3"], config)
    assert encode_labels(["0,2", "3"], space, "x") == [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]


def test_epoch_sampler_is_a_permutation_that_changes_with_epoch():
    sampler = EpochShuffleSampler(50, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second
    sampler.set_epoch(0)
    assert list(sampler) == first  # a function of (seed, epoch) only


def test_eval_loader_sees_every_row_once(tokenizer, tmp_path):
    bundle = load_data(mrpc_config(max_train_samples=10, max_eval_samples=37, cache_dir=str(tmp_path)), tokenizer)
    loader = eval_loader(bundle.eval, 8, make_collator(tokenizer, mrpc_config()))
    seen = sum(batch["labels"].shape[0] for batch in loader)
    assert seen == 37
    assert sorted(loader.sampler) == list(range(37))


def test_length_grouped_batches_cover_every_index_once_and_change_with_epoch():
    lengths = [(i * 37) % 101 + 5 for i in range(1000)]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=16, seed=3, group_batches=10)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 63  # ceil(1000 / 16)
        flat = [i for batch in batches for i in batch]
        assert sorted(flat) == list(range(1000))  # every index exactly once
        epochs.append(batches)
    assert epochs[0] != epochs[1] != epochs[2]
    assert {tuple(b) for b in epochs[0]} != {tuple(b) for b in epochs[1]}  # other batch members, not just order
    sampler.set_epoch(1)
    assert list(sampler) == epochs[1]  # a function of (seed, epoch)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    random_batches = [list(range(k, min(k + 16, 1000))) for k in range(0, 1000, 16)]
    assert padding(epochs[0]) < padding(random_batches) / 5
    # Still shuffled: consecutive batches are not sorted by length across the epoch.
    heads = [max(lengths[i] for i in b) for b in epochs[0]]
    assert heads != sorted(heads) and heads != sorted(heads, reverse=True)


def test_eval_loader_sorted_or_in_file_order(tokenizer, tmp_path):
    bundle = load_data(mrpc_config(max_train_samples=10, max_eval_samples=37, cache_dir=str(tmp_path)), tokenizer)
    collator = make_collator(tokenizer, mrpc_config())
    lengths = [len(ids) for ids in bundle.eval["input_ids"]]
    sorted_order = row_order(eval_loader(bundle.eval, 8, collator))
    assert [lengths[i] for i in sorted_order] == sorted(lengths, reverse=True)
    assert row_order(eval_loader(bundle.eval, 8, collator, sort_by_length=False)).tolist() == list(range(37))
    labels = np.asarray(bundle.eval["labels"])
    in_loader_order = np.concatenate([b["labels"].numpy() for b in eval_loader(bundle.eval, 8, collator)])
    (restored,) = restore_order(sorted_order, in_loader_order)
    assert restored.tolist() == labels.tolist()


def test_collator_pads_to_the_bucket(tokenizer, tmp_path):
    bundle = load_data(mrpc_config(max_train_samples=10, max_eval_samples=37, cache_dir=str(tmp_path)), tokenizer)
    bucket = make_collator(tokenizer, mrpc_config(pad_to_multiple_of=32))
    widths = {b["input_ids"].shape[1] for b in eval_loader(bundle.eval, 8, bucket)}
    assert widths <= {32, 64, 96, 128} and widths
    eight = make_collator(tokenizer, mrpc_config(pad_to_multiple_of=8))
    assert all(b["input_ids"].shape[1] % 8 == 0 for b in eval_loader(bundle.eval, 8, eight))
    # null rounds to 8 too (fewer shapes for oneDNN's per-shape kernels); 1 is the longest row itself
    default = eval_loader(bundle.eval, 8, make_collator(tokenizer, mrpc_config()))
    assert all(b["input_ids"].shape[1] % 8 == 0 for b in default)
    exact = eval_loader(bundle.eval, 8, make_collator(tokenizer, mrpc_config(pad_to_multiple_of=1)))
    assert all(b["input_ids"].shape[1] == int(b["attention_mask"].sum(1).max()) for b in exact)
