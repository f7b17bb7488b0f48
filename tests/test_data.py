"""Reading, label mapping and tokenization, on the bundled MRPC and small local files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from engine.config import DataConfig, ProblemType, bundled_minilm_path
from engine.data import (
    DataError,
    EpochShuffleSampler,
    LengthGroupedBatchSampler,
    TokenColumns,
    build_label_space,
    encode_labels,
    eval_loader,
    load_data,
    make_collator,
    read_raw_splits,
    restore_order,
    row_order,
    train_loader,
)

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
    widths = {b["input_ids"].shape[1] for b in eval_loader(bundle.eval, 8, make_collator(tokenizer, mrpc_config(), 32))}
    assert widths <= {32, 64, 96, 128} and widths
    eight = make_collator(tokenizer, mrpc_config(pad_to_multiple_of=8))
    assert all(b["input_ids"].shape[1] % 8 == 0 for b in eval_loader(bundle.eval, 8, eight))
    # null rounds to 8 too (fewer shapes for oneDNN's per-shape kernels); 1 is the longest row itself
    default = eval_loader(bundle.eval, 8, make_collator(tokenizer, mrpc_config()))
    assert all(b["input_ids"].shape[1] % 8 == 0 for b in default)
    exact = eval_loader(bundle.eval, 8, make_collator(tokenizer, mrpc_config(pad_to_multiple_of=1)))
    assert all(b["input_ids"].shape[1] == int(b["attention_mask"].sum(1).max()) for b in exact)


def _transformers_batch(tokenizer, rows: list[dict], multiple: int) -> dict:
    from transformers import DataCollatorWithPadding

    return dict(DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple, return_tensors="pt")(rows))


def _assert_same_batches(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("multiple", [1, 8, 32])
@pytest.mark.parametrize("side", ["right", "left"])
def test_the_fast_collator_gives_the_transformers_collators_batches(tokenizer, tmp_path, multiple, side):
    """Rows fetched from the flat columns and padded with NumPy: the same keys, dtypes and values as
    DataCollatorWithPadding over the data set's own rows (sentence pairs: token_type_ids too)."""
    bundle = load_data(mrpc_config(max_train_samples=200, cache_dir=str(tmp_path)), tokenizer)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        collator = make_collator(tokenizer, mrpc_config(), multiple)
        columns = TokenColumns(bundle.train)
        generator = np.random.default_rng(0)
        for size in (1, 5, 16):
            indices = generator.choice(200, size, replace=False).tolist()
            theirs = _transformers_batch(tokenizer, [bundle.train[i] for i in indices], multiple)
            _assert_same_batches(collator(columns.__getitems__(indices)), theirs)
            assert [columns[i] for i in indices] == [bundle.train[i] for i in indices]
        # and the loaders use it: a training batch is the transformers collator's batch of its rows
        loader, _ = train_loader(bundle.train, 16, 0, collator)
        assert isinstance(loader.dataset, TokenColumns)
        indices = next(iter(loader.batch_sampler))
        theirs = _transformers_batch(tokenizer, [bundle.train[i] for i in indices], multiple)
        _assert_same_batches(next(iter(loader)), theirs)
    finally:
        tokenizer.padding_side = padding_side


def test_the_fast_collator_stacks_multi_hot_labels_as_the_transformers_one(tokenizer, tmp_path):
    (tmp_path / "train.jsonl").write_text(
        "\n".join(
            json.dumps({"text": f"text number {i} " * (1 + i % 4), "labels": ["a", "b", "c"][: 1 + i % 3]})
            for i in range(12)
        )
    )
    config = DataConfig(
        train_file=str(tmp_path / "train.jsonl"), validation_file=str(tmp_path / "train.jsonl"), format="jsonl",
        text_column="text", label_column="labels", problem_type=ProblemType.multi_label_classification, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    bundle = load_data(config, tokenizer)
    columns, collator = TokenColumns(bundle.train), make_collator(tokenizer, config)
    theirs = _transformers_batch(tokenizer, [bundle.train[i] for i in range(12)], 8)
    ours = collator(columns.__getitems__(list(range(12))))
    assert ours["labels"].dtype == torch.float32 and ours["labels"].shape == (12, 3)
    _assert_same_batches(ours, theirs)


def test_token_columns_refuse_a_column_a_batch_cannot_stack(tokenizer):
    import datasets

    ragged = datasets.Dataset.from_dict({"input_ids": [[101, 102], [101, 7, 102]], "labels": [[1], [0, 1]]})
    with pytest.raises(DataError, match="column 'labels'.*rows of different lengths"):
        TokenColumns(ragged)
    with pytest.raises(DataError, match="token lists in 'input_ids'"):
        TokenColumns(datasets.Dataset.from_dict({"text": ["a"], "labels": [1]}))
