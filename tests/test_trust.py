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


# --- Runs: resume, run directory, saves -------------------------------------------------------

from engine import checkpoint, resume, tracking  # noqa: E402
from engine.checkpoint import CheckpointError  # noqa: E402
from engine.errors import EngineError  # noqa: E402
from engine.loop import train  # noqa: E402
from tests.conftest import TINY  # noqa: E402


def small_csv(tmp_path: Path, rows: int = 48) -> Path:
    words = ["good", "bad", "fine", "awful", "nice", "poor"]
    lines = [f"{words[i % 6]} film number {i},{(i % 6) % 2}" for i in range(rows)]
    path = tmp_path / "train.csv"
    path.write_text("text,label\n" + "\n".join(lines) + "\n")
    return path


def csv_run(tmp_path: Path, *more: str) -> tuple[str, ...]:
    path = small_csv(tmp_path) if not (tmp_path / "train.csv").exists() else tmp_path / "train.csv"
    return (
        *TINY,
        "data=local",
        f"data.train_file={path}",
        f"data.validation_file={path}",
        "data.text_column=text",
        *more,
    )


def test_a_resume_with_another_metric_optimizer_loss_or_data_is_refused(make_cfg, tmp_path):
    train(make_cfg(*csv_run(tmp_path)))
    changed = ("trainer.metric_for_best=loss", "optim.weight_decay=0.1", "loss.class_weights=balanced", "resume=auto")
    with pytest.raises(CheckpointError) as refused:
        train(make_cfg(*csv_run(tmp_path, *changed)))
    text = str(refused.value)
    assert "trainer.metric_for_best: saved 'accuracy', now 'loss'" in text
    assert "trainer.greater_is_better: saved True, now False" in text
    assert (
        "optim.weight_decay: saved 0.01, now 0.1" in text and "loss.class_weights: saved None, now 'balanced'" in text
    )
    (tmp_path / "train.csv").write_text((tmp_path / "train.csv").read_text().replace("good", "great"))
    with pytest.raises(CheckpointError, match=r"data.train_file: the file's contents changed \(SHA-256"):
        train(make_cfg(*csv_run(tmp_path, "resume=auto")))


def test_a_loss_metric_keeps_the_lowest_loss(make_cfg, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        train(make_cfg(*csv_run(tmp_path, "trainer.metric_for_best=loss", "trainer.eval_every=1")))
    assert "best checkpoint: the lowest loss (trainer.greater_is_better=False, from the metric's name)" in caplog.text
    losses = [r["loss"] for r in tracking.read_jsonl(tmp_path / "run" / tracking.EVAL_METRICS)]
    assert len(losses) >= 5 and len(set(losses)) > 1
    info = json.loads((tmp_path / "run" / checkpoint.BEST_INFO).read_text())
    assert info["metric_value"] == min(losses)


def test_a_second_run_in_a_held_run_dir_fails_at_once_naming_the_holder(make_cfg, tmp_path):
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    with checkpoint.RunDirLock(run):
        with pytest.raises(
            CheckpointError, match=rf"the run directory {run} is in use by another run \(pid {os.getpid()}"
        ):
            train(make_cfg(*csv_run(tmp_path)))
    assert not (run / checkpoint.BEST_WEIGHTS).exists()
    # A holder killed with -9 leaves no stale lock.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from engine.checkpoint import RunDirLock; RunDirLock({str(run)!r}).__enter__(); "
            "print('held', flush=True); import time; time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(CheckpointError, match="is in use by another run"):
        checkpoint.RunDirLock(run).__enter__()
    holder.kill()
    holder.wait()
    train(make_cfg(*csv_run(tmp_path)))
    assert (run / checkpoint.BEST_WEIGHTS).is_file() and not (run / checkpoint.LOCK_FILE).exists()


def test_a_resume_never_ends_without_the_best_checkpoint_it_reports(make_cfg, tmp_path, caplog):
    run = tmp_path / "run"
    train(make_cfg(*csv_run(tmp_path)))
    saved = json.loads((run / checkpoint.BEST_INFO).read_text())
    # The state's weights are the best (evaluated at its step): the best is written again from it.
    (run / checkpoint.BEST_WEIGHTS).unlink()
    with caplog.at_level(logging.WARNING):
        value = train(make_cfg(*csv_run(tmp_path, "resume=auto")))
    assert "written again from the resumed state" in caplog.text
    again = json.loads((run / checkpoint.BEST_INFO).read_text())
    assert (again["step"], again["metric_value"]) == (saved["step"], saved["metric_value"]) == (saved["step"], value)
    # The state says the best came earlier: it cannot be rebuilt, so the resume is refused.
    state, _ = checkpoint.latest_state(run)
    progress = json.loads((state / checkpoint.PROGRESS_FILE).read_text())
    progress["progress"]["best_step"] = 1
    (state / checkpoint.PROGRESS_FILE).write_text(json.dumps(progress))
    (run / checkpoint.BEST_WEIGHTS).unlink()
    with pytest.raises(
        CheckpointError, match=r"cannot resume: .*best_acc_classify.pth is missing \(the best was at step 1\)"
    ):
        train(make_cfg(*csv_run(tmp_path, "resume=auto")))


def test_saving_a_step_again_keeps_the_complete_state_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    import os

    def save(step: int, value: float) -> None:
        folder = checkpoint.begin_state(tmp_path, step)
        checkpoint.write_state_part(folder, checkpoint.MODEL_KEY, {"w": torch.tensor([value])})
        checkpoint.commit_state(folder, step, {"value": value})

    import torch

    save(4, 1.0)
    real_replace, calls = os.replace, []

    def killed_at_the_move_in(source, target):
        calls.append(Path(source).name)
        if Path(source).name.startswith(".tmp_step_"):
            raise KeyboardInterrupt("killed")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", killed_at_the_move_in)
    with pytest.raises(KeyboardInterrupt):
        save(4, 2.0)
    monkeypatch.setattr(os, "replace", real_replace)
    folder, _ = checkpoint.latest_state(tmp_path)
    assert folder is not None and checkpoint.load_info(folder / checkpoint.PROGRESS_FILE) == {"value": 1.0}
    save(4, 3.0)
    folder, _ = checkpoint.latest_state(tmp_path)
    assert folder.name == "step_00000004" and checkpoint.load_info(folder / checkpoint.PROGRESS_FILE) == {"value": 3.0}
    assert sorted(p.name for p in (tmp_path / checkpoint.STATE_DIR).iterdir()) == ["step_00000004"]


def test_a_torn_last_metrics_line_is_dropped_and_the_resume_goes_on(make_cfg, tmp_path, caplog):
    run = tmp_path / "run"
    train(make_cfg(*csv_run(tmp_path)))
    with open(run / tracking.TRAIN_METRICS, "a") as handle:
        handle.write('{"step": 9, "loss": 0.6')
    with caplog.at_level(logging.WARNING):
        train(make_cfg(*csv_run(tmp_path, "resume=auto")))
    assert "dropping a torn last line" in caplog.text
    (run / tracking.EVAL_METRICS).write_text('{"step": 1}\n{"step": \n{"step": 3}\n')
    with pytest.raises(EngineError, match=r"metrics.jsonl:2:\d+: not a JSON line"):
        tracking.read_jsonl(run / tracking.EVAL_METRICS)


def test_a_full_disk_during_a_state_save_names_the_path_and_keeps_the_last_state(make_cfg, tmp_path, monkeypatch):
    import os

    import torch

    run, real_save, saves = tmp_path / "run", torch.save, []

    def disk_full_on_the_second_state(payload, handle, *args, **kwargs):
        name = Path(os.readlink(f"/proc/self/fd/{handle.fileno()}")).name if hasattr(handle, "fileno") else ""
        if name.startswith(f".{checkpoint.MODEL_KEY}."):
            saves.append(name)
            if len(saves) == 2:
                real_save(payload, handle, *args, **kwargs)
                raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4288 vs 4176")
        return real_save(payload, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_on_the_second_state)
    with pytest.raises(CheckpointError, match=r"cannot write .*step_00000004/model \(disk full\?\): \[enforce fail"):
        train(make_cfg(*csv_run(tmp_path, "trainer.save_every=2")))
    folder, _ = checkpoint.latest_state(run)
    assert folder.name == "step_00000002" and checkpoint.is_complete(folder)
    assert not list((run / checkpoint.STATE_DIR).glob(".tmp_step_*/.model.*.tmp"))


def test_max_length_above_the_models_positions_is_refused_before_training(make_cfg, tmp_path):
    with pytest.raises(
        EngineError, match=r"data.max_length=100000 is above the 128 positions of .*; set data.max_length<=128"
    ):
        train(make_cfg(*csv_run(tmp_path, "data.max_length=100000")))
    assert not (tmp_path / "run" / tracking.TRAIN_METRICS).exists()


def test_a_stop_without_a_saved_state_does_not_offer_a_resume(make_cfg, tmp_path, monkeypatch, caplog):
    import signal

    def received_at_once(self):
        self.received = signal.SIGTERM
        return self

    monkeypatch.setattr(resume.StopSignal, "__enter__", received_at_once)
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit) as stopped:
        train(make_cfg(*csv_run(tmp_path, "trainer.save_state=false")))
    assert stopped.value.code == 143
    assert "stopped at step 1; no state saved (trainer.save_state=false)" in caplog.text
    assert "continue with resume" not in caplog.text


def test_an_unusable_state_under_resume_auto_is_said_loudly_and_metrics_start_anew(make_cfg, tmp_path, caplog):
    run = tmp_path / "run"
    train(make_cfg(*csv_run(tmp_path)))
    lines = len(tracking.read_jsonl(run / tracking.EVAL_METRICS))
    state, _ = checkpoint.latest_state(run)
    (state / checkpoint.PROGRESS_FILE).write_text('{"progress": ')
    with caplog.at_level(logging.WARNING):
        train(make_cfg(*csv_run(tmp_path, "resume=auto")))
    assert "no usable saved state" in caplog.text and "training starts from step 0" in caplog.text
    assert len(tracking.read_jsonl(run / tracking.EVAL_METRICS)) == lines


def test_a_cut_token_cache_is_rebuilt(make_cfg, tmp_path, caplog):
    cache = tmp_path / "cache"
    train(make_cfg(*csv_run(tmp_path, f"data.cache_dir={cache}")))
    for arrow in cache.glob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        train(make_cfg(*csv_run(tmp_path, f"data.cache_dir={cache}"), output_dir=tmp_path / "again"))
    assert "unreadable token cache" in caplog.text


def test_temp_files_of_a_killed_writer_go_and_an_unwritable_run_dir_is_one_line(make_cfg, tmp_path):
    run = tmp_path / "run"
    (run / checkpoint.STATE_DIR / ".tmp_step_00000003").mkdir(parents=True)
    (run / ".summary.json.x1y2.tmp").write_text("{")
    train(make_cfg(*csv_run(tmp_path)))
    assert not (run / ".summary.json.x1y2.tmp").exists()
    assert not (run / checkpoint.STATE_DIR / ".tmp_step_00000003").exists()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(EngineError, match=r"cannot make the run directory .*a_file/run: Not a directory"):
        train(make_cfg(*csv_run(tmp_path), output_dir=tmp_path / "a_file" / "run"))


def test_a_received_run_naming_a_model_folder_with_its_own_code_is_refused(custom_code_folder, tmp_path):
    import torch

    from engine.predict import load_classifier

    run = tmp_path / "received_run"
    run.mkdir()
    torch.save({}, run / checkpoint.BEST_WEIGHTS)
    info = {"model_source": str(custom_code_folder), "num_labels": 2, "id2label": {"0": "a", "1": "b"}}
    (run / checkpoint.BEST_INFO).write_text(json.dumps({**info, "problem_type": "single_label_classification"}))
    with pytest.raises(ModelLoadError, match=r"config.json: refusing a model that ships its own code"):
        load_classifier(run, device="cpu")
    assert not (tmp_path / "ran").exists()
