"""Task coverage: multi-label GoEmotions, thresholds, label validation, string labels, imbalance."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from engine.config import DataConfig, ProblemType, bundled_minilm_path
from engine.data import load_data
from engine.loop import train
from engine.metrics import compute_metrics, tune_thresholds
from engine.predict import load_classifier
from engine.sources import DataError, read_raw_splits
from tests.conftest import ROOT, TINY

GOEMOTIONS = ROOT.parent / "shared" / "data" / "goemotions"
needs_goemotions = pytest.mark.skipif(not GOEMOTIONS.is_dir(), reason="../shared/data/goemotions is not here")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(bundled_minilm_path())


def _csv(path: Path, rows: list[tuple[str, object]]) -> Path:
    path.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    return path


def _load(tmp_path, tokenizer, train_rows, dev_rows, **config):
    data = DataConfig(
        train_file=str(_csv(tmp_path / "train.csv", train_rows)),
        validation_file=str(_csv(tmp_path / "dev.csv", dev_rows)),
        text_column="text",
        cache_dir=str(tmp_path / "cache"),
        **config,
    )
    return load_data(data, tokenizer)


GOOD = [("a", 0), ("b", 1), ("c", 2), ("d", 0)]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (7, r"1 with label ids out of range \[0, 3\): '7' \(1x, first at data row 5\)"),
        (-1, r"1 with negative label ids: '-1'"),
        (-100, r"1 with -100 \(the loss's ignore index"),
        ("1.5", r"1 with float labels in a single-label task"),
        ("cat", r"1 with unknown label names: 'cat'"),
    ],
)
def test_bad_training_labels_are_named_before_the_model_is_built(tmp_path, tokenizer, bad, message):
    with pytest.raises(DataError, match=message) as info:
        _load(tmp_path, tokenizer, [*GOOD, ("e", bad)], GOOD, num_labels=3)
    assert "train.csv: 1 bad labels in column 'label'" in str(info.value)


def test_counts_and_examples_of_many_bad_labels(tmp_path, tokenizer):
    rows = [*GOOD, ("e", 9), ("f", 9), ("g", -5)]
    with pytest.raises(DataError) as info:
        _load(tmp_path, tokenizer, rows, GOOD, num_labels=3)
    text = str(info.value)
    assert "3 bad labels" in text and "2 with label ids out of range [0, 3): '9' (2x, first at data row 5)" in text
    assert "1 with negative label ids: '-5' (1x, first at data row 7)" in text


def test_unknown_string_in_dev_is_an_error(tmp_path, tokenizer):
    rows = [("a", "pos"), ("b", "neg")]
    with pytest.raises(DataError, match=r"(?s)dev.csv: 1 bad labels.*'neutral'"):
        _load(tmp_path, tokenizer, rows, [("c", "neutral")])


def test_label_only_in_dev_is_a_warning(tmp_path, tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="engine"):
        bundle = _load(tmp_path, tokenizer, [("a", 0), ("b", 1)], [("c", 2), ("d", 2)], num_labels=3)
    assert bundle.train_label_counts == [1, 1, 0]
    assert "label '2' has no training example but 2 in validation" in caplog.text


def test_num_labels_mismatch(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"data.num_labels=2 but there are 3 labels.*found in the training labels"):
        _load(tmp_path, tokenizer, [("a", "x"), ("b", "y"), ("c", "z")], [("d", "x")], num_labels=2)


def test_threshold_tuning_picks_the_f1_maximising_threshold():
    # Label 0: positives score 0.30-0.40, negatives 0.10-0.20 -> any threshold in (0.20, 0.30] is perfect.
    # Label 1: positives 0.80, 0.90, negative 0.85 -> 0.80 gives F1 0.8, 0.86 gives 0.667, 0.90 gives 0.667.
    probs = np.array([[0.30, 0.80], [0.40, 0.90], [0.10, 0.85], [0.20, 0.05]])
    labels = np.array([[1, 1], [1, 1], [0, 0], [0, 0]])
    tuned = tune_thresholds(probs, labels)
    assert tuned["per_label"][0] == pytest.approx(0.21)  # the lowest threshold that separates label 0
    assert tuned["per_label"][1] <= 0.80
    metrics = compute_metrics(
        np.log(probs / (1 - probs)), labels, ProblemType.multi_label_classification, threshold=tuned["per_label"]
    )
    assert metrics["micro_f1"] == pytest.approx(2 * 4 / (2 * 4 + 1))  # one false positive left (0.85)
    default = compute_metrics(np.log(probs / (1 - probs)), labels, ProblemType.multi_label_classification)
    assert metrics["micro_f1"] > default["micro_f1"]


@needs_goemotions
def test_goemotions_loader_counts_and_multi_hot():
    from hydra import compose, initialize_config_dir

    from engine.config import CONFIG_DIR, validate

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        typed = validate(compose(config_name="config", overrides=["data=goemotions"]))
    assert typed.data.problem_type == ProblemType.multi_label_classification
    assert typed.trainer.metric_for_best == "macro_f1"
    assert len(typed.data.label_names) == 28 and typed.data.label_names[27] == "neutral"
    raw = read_raw_splits(typed.data, ["train", "validation", "test"])
    assert [len(raw[s].texts) for s in ("train", "validation", "test")] == [43410, 5426, 5427]
    from engine.sources import build_label_space, encode_labels, label_counts

    space = build_label_space(raw["train"].labels, typed.data)
    hot = encode_labels(raw["train"].labels, space, "train")
    counts = label_counts(hot, space)
    assert counts[27] == 14219 and counts[16] == 77  # neutral vs grief
    assert all(1 <= sum(row) <= 5 for row in hot)


@needs_goemotions
def test_tiny_multi_label_run_tunes_thresholds_and_reports(make_cfg, tmp_path):
    best = train(
        make_cfg(
            *TINY,
            "data=goemotions",
            "loss=balanced",
            "data.max_train_samples=96",
            "data.max_eval_samples=64",
            "trainer.evaluate_test=true",
        )
    )
    run = tmp_path / "run"
    info = json.loads((run / "best_acc_classify.json").read_text())
    assert info["problem_type"] == "multi_label_classification" and info["num_labels"] == 28
    assert info["metric_name"] == "macro_f1" and info["metric_value"] == best
    assert len(info["thresholds"]["per_label"]) == 28 and 0.05 <= info["thresholds"]["global"] <= 0.95
    assert {"micro_f1", "macro_f1", "roc_auc_micro", "subset_accuracy"} <= set(info["metrics"])
    test = json.loads((run / "test_metrics.json").read_text())
    assert {"macro_f1", "macro_f1_tuned", "roc_auc_micro"} <= set(test)
    assert (run / "per_label_f1.png").stat().st_size > 10_000
    rows = (run / "per_class.csv").read_text().splitlines()
    assert len(rows) == 1 + 28
    classifier = load_classifier(run)
    prediction = classifier.predict("I am so happy and grateful for this!")[0]
    assert isinstance(prediction.label, list) and len(prediction.probabilities) == 28


def test_string_labels_round_trip_to_predictions(make_cfg, tmp_path):
    rows = [("great film loved it", "pos"), ("awful boring mess", "neg"), ("it was fine", "meh")] * 12
    _csv(tmp_path / "train.csv", rows)
    _csv(tmp_path / "dev.csv", rows[:9])
    train(
        make_cfg(
            "model=tiny",
            "data=local",
            f"data.train_file={tmp_path}/train.csv",
            "trainer.progress=false",
            f"data.validation_file={tmp_path}/dev.csv",
            "data.text_column=text",
            "trainer.epochs=1",
        )
    )
    info = json.loads((tmp_path / "run" / "best_acc_classify.json").read_text())
    assert info["id2label"] == {"0": "meh", "1": "neg", "2": "pos"}
    classifier = load_classifier(tmp_path / "run")
    assert classifier.predict("it was fine")[0].label in {"meh", "neg", "pos"}
    assert set(classifier.predict("x")[0].probabilities) == {"meh", "neg", "pos"}


def test_imbalanced_run_keeps_best_by_macro_f1(make_cfg, tmp_path):
    best = train(make_cfg(*TINY, "loss=balanced", "trainer.metric_for_best=macro_f1"))
    info = json.loads((tmp_path / "run" / "best_acc_classify.json").read_text())
    assert info["metric_name"] == "macro_f1" and info["metric_value"] == best
    assert "mcc" in info["metrics"]
