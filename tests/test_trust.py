"""Trust: nothing received runs code, no data is silently misread, no different run is resumed.

Each test here failed on the code before the "Trust" issue (27) and names the case it covers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from engine.config import DataConfig, ModelConfig, ProblemType, greater_is_better
from engine.model import ModelLoadError, build_hf_model, load_tokenizer
from engine.sources import DataError, build_label_space, read_raw_splits, read_table

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "tests" / "assets" / "tiny-bert"


def local(tmp_path: Path, name: str, content: str | bytes, **changes) -> DataConfig:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    settings = dict(train_file=str(path), validation_file=str(path), text_column="text")
    settings.update(changes)
    return DataConfig(**settings)


# --- 1. A model folder that ships its own code -------------------------------------------


@pytest.fixture
def custom_code_folder(tmp_path) -> Path:
    import shutil

    from engine.config import bundled_minilm_path

    folder = tmp_path / "received_model"
    shutil.copytree(bundled_minilm_path(), folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('ran')\n")
    return folder


def test_a_model_folder_with_its_own_code_is_refused(custom_code_folder, tmp_path):
    model = ModelConfig(name="received", source=str(custom_code_folder), pretrained=False)
    with pytest.raises(ModelLoadError, match=r"config.json: refusing a model that ships its own code"):
        build_hf_model(model, 2, {0: "a", 1: "b"}, ProblemType.single_label_classification)
    config = json.loads((custom_code_folder / "config.json").read_text())
    del config["auto_map"]
    (custom_code_folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = custom_code_folder / "tokenizer_config.json"
    described = json.loads(tokenizer_config.read_text())
    described["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    tokenizer_config.write_text(json.dumps(described))
    with pytest.raises(ModelLoadError, match=r"tokenizer_config.json: refusing a model"):
        load_tokenizer(str(custom_code_folder))
    assert not (tmp_path / "ran").exists()


def test_a_missing_model_folder_is_named_as_a_folder(tmp_path):
    model = ModelConfig(name="x", source=str(tmp_path / "no_such_model"), pretrained=True)
    with pytest.raises(ModelLoadError, match=r"^model folder not found: .*no_such_model$"):
        build_hf_model(model, 2, {0: "a", 1: "b"}, ProblemType.single_label_classification)


# --- 2. Stray quotes ----------------------------------------------------------------------


def test_a_tsv_is_read_with_quotes_as_text_by_default(tmp_path):
    rows = ['"a quote that opens here\t1'] + [f"row {i}\t{i % 2}" for i in range(199)]
    data = local(tmp_path, "train.tsv", "text\tlabel\n" + "\n".join(rows) + "\n")
    frame = read_table(data.train_file, data)
    assert len(frame) == 200 and frame["text"][0] == '"a quote that opens here'


def test_a_csv_field_swallowing_many_lines_stops_the_run_at_its_line(tmp_path):
    rows = [f"row {i},{i % 2}" for i in range(200)]
    rows[99] = '"a stray quote,1'
    rows[150] = 'closes"" here",0'
    data = local(tmp_path, "train.csv", "text,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"train.csv:101: a quoted field opened on this line runs to line 152"):
        read_table(data.train_file, data)


def test_a_csv_field_spanning_two_lines_is_read_and_reported(tmp_path, caplog):
    data = local(tmp_path, "train.csv", 'text,label\nfirst,1\n"two\nlines",0\nlast,1\n')
    with caplog.at_level(logging.WARNING):
        frame = read_table(data.train_file, data)
    assert list(frame["text"]) == ["first", "two\nlines", "last"]
    assert "train.csv: 1 row(s) have a quoted field that spans lines (lines 3-4)" in caplog.text


def test_an_unclosed_quote_names_its_line(tmp_path):
    rows = [f"row {i},{i % 2}" for i in range(10)]
    rows[6] = '"never closed,1'
    data = local(tmp_path, "train.csv", "text,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"train.csv:8: a quote opened on this line is never closed"):
        read_table(data.train_file, data)


# --- 5. Label column and label space --------------------------------------------------------


def test_a_repeated_column_name_is_an_error(tmp_path):
    data = local(tmp_path, "train.csv", "text,label,label\nhello,0,1\nbye,0,0\n")
    with pytest.raises(DataError, match=r"train.csv:1: the header repeats the column name\(s\) \['label'\]"):
        read_table(data.train_file, data)


def test_label_ids_with_gaps_are_an_error_unless_declared(tmp_path):
    labels = ["0", "1"] * 50 + ["11", "7"]
    with pytest.raises(DataError, match=r"leave gaps: \[2, 3, 4, 5, 6, 8, 9, 10\] never occur.*data.num_labels=12"):
        build_label_space(labels, DataConfig(text_column="text"))
    assert build_label_space(labels, DataConfig(text_column="text", num_labels=12)).num_labels == 12


# --- 12. Missing values ----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_missing_labels_and_texts_are_named_by_row(tmp_path, suffix):
    import pandas as pd

    def write(frame: pd.DataFrame) -> str:
        path = tmp_path / f"train{suffix}"
        if suffix == ".jsonl":
            frame.to_json(path, orient="records", lines=True)
        else:
            frame.to_parquet(path)
        return str(path)

    texts = ["good", "fine", "ok", "nan", "yes"]
    path = write(pd.DataFrame({"text": texts, "label": [1, None, 0, 1, None]}))
    data = DataConfig(train_file=path, validation_file=path, text_column="text")
    with pytest.raises(DataError, match=r"2 rows without a label in column 'label' \(data rows 2, 5\)"):
        read_raw_splits(data, ["train"])
    path = write(pd.DataFrame({"text": ["good", None, "ok", "nan", None], "label": [1, 0, 0, 1, 1]}))
    with pytest.raises(DataError, match=r"2 rows with no text in column 'text' \(data rows 2, 5\)"):
        read_raw_splits(data, ["train"])
    path = write(pd.DataFrame({"text": texts, "label": [1, 0, 0, 1, 1]}))
    assert read_raw_splits(data, ["train"])["train"].texts[3] == "nan"  # the word is a text


# --- 13. Files without a header row ----------------------------------------------------------


def test_a_headerless_file_reads_with_column_names_or_by_index(tmp_path):
    content = "1\t11\t12\tThe cat sat.\n0\t21\t22\tA dog ran.\n"
    data = local(tmp_path, "train.tsv", content, text_column="sentence", column_names=["label", "a", "b", "sentence"])
    split = read_raw_splits(data, ["train"])["train"]
    assert split.texts == ["The cat sat.", "A dog ran."] and split.labels == ["1", "0"]
    data = local(tmp_path, "train.tsv", content, text_column="3", label_column="0", header=False)
    assert read_raw_splits(data, ["train"])["train"].texts == ["The cat sat.", "A dog ran."]
    data = local(tmp_path, "train.tsv", content, text_column="sentence", column_names=["label", "sentence"])
    with pytest.raises(DataError, match=r"data.column_names has 2 names but the rows have 4 fields"):
        read_raw_splits(data, ["train"])
    data = local(tmp_path, "train.tsv", content, text_column="sentence")
    with pytest.raises(DataError, match=r"the file has no header: set data.column_names"):
        read_raw_splits(data, ["train"])


# --- 4. The direction of the metric ----------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "greater"),
    [("accuracy", True), ("f1_macro", True), ("loss", False), ("hamming_loss", False), ("eval_error", False)],
)
def test_the_metric_decides_its_direction(metric, greater):
    assert greater_is_better(metric) is greater
