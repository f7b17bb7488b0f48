"""What a run shows: JSONL and TensorBoard logs, plots, the pre-flight report, the summary."""

from __future__ import annotations

import json
import struct

import pytest
from transformers import AutoTokenizer

from engine.config import DataConfig, bundled_minilm_path
from engine.data import load_data
from engine.loop import train
from engine.tracking import Tracker
from tests.conftest import TINY, compose_cfg


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seen")
    cfg = compose_cfg(
        out,
        out / "cache",
        *TINY,
        "trainer.epochs=2",
        "trainer.log_every=3",
        "trainer.evaluate_test=true",
        "data.max_eval_samples=30",
    )
    train(cfg)
    return out


def test_jsonl_has_one_line_per_logging_step_with_the_named_keys(run):
    lines = [json.loads(line) for line in (run / "train_steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [3, 6, 9, 12, 15, 16]  # every 3 steps and the last
    for record in lines:
        assert {"loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "epoch"} <= set(record)
        assert record["samples_per_s"] > 0 and record["tokens_per_s"] > record["samples_per_s"]
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e.get("split", "eval") for e in evals] == ["eval", "eval", "test"]
    assert all("best" in e for e in evals[:2])


def test_tensorboard_events_are_readable(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/samples_per_s",
        "eval/accuracy",
        "eval/loss",
        "eval/best",
        "test/accuracy",
    } <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [3, 6, 9, 12, 15, 16]
    assert [e.step for e in events.Scalars("eval/accuracy")] == [8, 16]


def test_plots_are_valid_pngs_of_sensible_size(run):
    for name in ("curves.png", "confusion_matrix.png"):
        width, height = png_size(run / name)
        assert 400 <= width <= 2000 and 300 <= height <= 2000, (name, width, height)


def test_per_class_csv_has_a_block_per_evaluation(run):
    rows = (run / "per_class.csv").read_text().splitlines()
    assert rows[0] == "step,label,precision,recall,f1,support"
    assert len(rows) == 1 + 2 * 2  # two labels, two evaluations
    assert sum(int(r.split(",")[-1]) for r in rows[1:3]) == 30


def test_summary_names_best_step_and_files(run):
    summary = json.loads((run / "summary.json").read_text())
    info = json.loads((run / "best_acc_classify.json").read_text())
    assert summary["best_value"] == info["metric_value"] and summary["best_step"] == info["step"]
    assert summary["test"]["samples"] == 30  # max_eval_samples caps the test split too
    assert {"best_acc_classify.pth", "curves.png", "train.log", "tensorboard"} <= set(summary["files"])
    assert "run summary:" in (run / "train.log").read_text()


def test_preflight_numbers_match_a_hand_count(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(bundled_minilm_path())
    train_rows = ["a b c", "a b c d e f g h i j k l", "x", "same text", "same text"]
    dev_rows = ["same text", "new one"]
    (tmp_path / "train.csv").write_text(
        "text,label\n" + "".join(f"{t},{label}\n" for t, label in zip(train_rows, [0, 0, 0, 1, 0], strict=True))
    )
    (tmp_path / "dev.csv").write_text("text,label\n" + "".join(f"{t},1\n" for t in dev_rows))
    data = DataConfig(
        train_file=str(tmp_path / "train.csv"),
        validation_file=str(tmp_path / "dev.csv"),
        text_column="text",
        max_length=8,
        cache_dir=str(tmp_path / "cache"),
    )
    report = load_data(data, tokenizer).preflight
    lengths = sorted(len(tokenizer(t)["input_ids"]) for t in train_rows)  # [3, 4, 4, 5, 14] with CLS/SEP
    train = report["splits"]["train"]
    assert train["rows"] == 5 and train["label_counts"] == {"0": 4, "1": 1}
    assert train["imbalance_ratio"] == 4.0
    assert train["tokens"]["max"] == lengths[-1] == 14
    assert train["tokens"]["p50"] == lengths[2]
    assert train["truncated_share"] == pytest.approx(1 / 5)  # only the 14-token text exceeds 8
    assert report["duplicates_train_dev"] == 1  # "same text"
    assert report["suggested_max_length"] == 16
    assert report["splits"]["validation"]["rows"] == 2


def test_tracker_off_the_main_process_writes_nothing(tmp_path):
    tracker = Tracker(tmp_path, ["jsonl", "tensorboard"], enabled=False, config={})
    tracker.log("train", {"loss": 1.0}, 1)
    tracker.close()
    assert list(tmp_path.iterdir()) == []


def test_wandb_missing_package_is_a_clear_error_only_when_asked(make_cfg, monkeypatch):
    import builtins

    from engine.errors import EngineError

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(EngineError, match="wandb package is not installed"):
        train(make_cfg(*TINY, "trainer.max_steps=1", "logger=[jsonl,wandb]"))
    train(make_cfg(*TINY, "trainer.max_steps=1"))  # not asked for: no error


def test_progress_without_a_terminal_is_a_line_every_interval(capsys, monkeypatch):
    """Output to a file or pipe: no carriage-return redraws, one plain line per interval and one at the end."""
    from engine.tracking import LineProgress, progress_bar

    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    assert isinstance(progress_bar(10, 0, enabled=True), LineProgress)
    now = [0.0]
    bar = LineProgress(10, interval=30.0, clock=lambda: now[0])
    for _ in range(5):
        now[0] += 10.0  # 10 s a step: a line at 30 s only
        bar.update(1)
    bar.set_postfix(loss="0.5")
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["train: 3/10 steps (30%) 30 s", "train: 5/10 steps (50%) 50 s | loss=0.5"]
    assert "\r" not in "".join(lines)
