"""Reliability: exact resume, interruption, crash-safe saves, the non-finite guard, safe loading, bad input."""

from __future__ import annotations

import errno
import json
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import checkpoint, resume
from engine.checkpoint import CheckpointError
from engine.errors import EngineError
from engine.loop import train
from engine.sources import DataError
from tests.conftest import ROOT, TINY, PicklePayload, accelerate_launch, subprocess_env

# Shuffling, dropout (the tiny model keeps BERT's 0.1) and a state every 3 steps.
RUN = (*TINY, "trainer.epochs=2", "trainer.save_every=3", "data.max_train_samples=80", "trainer.batch_size=8")
HELPER = str(ROOT / "tests" / "helpers" / "fault_train.py")


def _steps(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_steps.jsonl").read_text().splitlines()]


def _final_model(run: Path) -> dict[str, torch.Tensor]:
    folder, _ = checkpoint.latest_state(run)
    return torch.load(folder / checkpoint.MODEL_KEY, weights_only=True)


def _assert_same_run(a: Path, b: Path) -> None:
    steps_a, steps_b = _steps(a), _steps(b)
    assert [s["step"] for s in steps_a] == [s["step"] for s in steps_b]
    assert [s["loss"] for s in steps_a] == [s["loss"] for s in steps_b]  # bit-exact
    assert [s["lr"] for s in steps_a] == [s["lr"] for s in steps_b]
    for name, tensor in _final_model(a).items():
        assert torch.equal(tensor, _final_model(b)[name]), name
    best_a = torch.load(a / "best_acc_classify.pth", weights_only=True)
    best_b = torch.load(b / "best_acc_classify.pth", weights_only=True)
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    info_a, info_b = (json.loads((r / "best_acc_classify.json").read_text()) for r in (a, b))
    assert (info_a["metric_value"], info_a["step"]) == (info_b["metric_value"], info_b["step"])
    evals_a = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    evals_b = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], e["loss"], e["accuracy"]) for e in evals_a] == [
        (e["step"], e["loss"], e["accuracy"]) for e in evals_b
    ]


def _run(args: list[str], tmp_path: Path, launcher: list[str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    command = [*(launcher or [sys.executable]), *args]
    return subprocess.run(
        command, capture_output=True, text=True, env=subprocess_env(), timeout=600, cwd=tmp_path, **kwargs
    )


def test_resume_after_a_hard_kill_is_bit_exact(tmp_path, make_cfg):
    common = [*RUN, f"data.cache_dir={tmp_path}/cache"]
    train(make_cfg(*common, output_dir=tmp_path / "clean"))  # the reference run, in this process
    killed = _run([HELPER, "--exit-after-step", "14", *common, f"hydra.run.dir={tmp_path}/killed"], tmp_path)
    assert killed.returncode == 1  # os._exit: no clean-up ran
    assert [s["step"] for s in _steps(tmp_path / "killed")][-1] == 13  # killed inside step 14
    # Step 10 ended epoch 0 (80 rows / 8), 12 is the last save every 3 steps; 13-14 are lost, not more.
    folder, _ = checkpoint.latest_state(tmp_path / "killed")
    assert folder.name == "step_00000012"
    train(make_cfg(*common, "resume=auto", output_dir=tmp_path / "killed"))
    assert "resuming from" in (tmp_path / "killed" / "train.log").read_text()
    _assert_same_run(tmp_path / "clean", tmp_path / "killed")


@pytest.mark.slow
def test_two_gloo_processes_share_one_run_dir_see_every_dev_sample_once_and_resume_bit_exact(tmp_path):
    """Three 2-process launches: a clean run in Hydra's own run dir (rank 1 must follow rank 0's), one
    killed after step 8, and its resume; the resumed run must equal the clean one bit for bit."""
    launcher = accelerate_launch(29611)
    # 80 rows, batch 4, 2 processes: 10 steps an epoch, 20 in all; 9 dev rows (odd, under one batch a
    # rank): the gather must drop what Accelerate pads.
    common = [*RUN, "trainer.batch_size=4", "data.max_eval_samples=9", f"data.cache_dir={tmp_path}/cache"]
    clean = _run([str(ROOT / "train.py"), *common, "trainer.progress=true"], tmp_path, launcher)
    assert clean.returncode == 0, clean.stderr[-3000:]
    runs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs  # rank 1 followed rank 0's run dir
    run = runs[0]
    assert len(list(run.glob("*.pth"))) == 1
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["samples"] for e in evals] == [9, 9]
    assert len(_steps(run)) == 20
    log = (run / "train.log").read_text()
    assert "2 process(es)" in log and log.count("eval epoch 0 step 10") == 1  # only rank 0 logs
    # one progress report (rank 0's); stderr is a pipe, so it is a plain line, not a redrawn bar
    assert re.findall(r"^train: \d+/20 steps .*$", clean.stderr, re.M) == [
        re.search(r"^train: 20/20 steps .*$", clean.stderr, re.M)[0]
    ]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    best = torch.load(run / "best_acc_classify.pth", weights_only=True)
    assert not any(k.startswith("module.") for k in best)
    info = json.loads((run / "best_acc_classify.json").read_text())
    assert info["metric_value"] == max(e["accuracy"] for e in evals)

    killed = _run([HELPER, "--exit-after-step", "8", *common, f"hydra.run.dir={tmp_path}/killed"], tmp_path, launcher)
    assert killed.returncode != 0
    assert checkpoint.latest_state(tmp_path / "killed")[0].name == "step_00000006"
    resumed = _run(
        [str(ROOT / "train.py"), *common, f"hydra.run.dir={tmp_path}/resumed", f"resume={tmp_path}/killed"],
        tmp_path,
        launcher,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(run, tmp_path / "killed")


def test_sigterm_saves_a_complete_state_and_exits_143_then_resumes_exactly(tmp_path, make_cfg):
    common = [
        *TINY,
        "trainer.epochs=3",
        "data.max_train_samples=400",
        "trainer.batch_size=8",
        f"data.cache_dir={tmp_path}/cache",
    ]
    train(make_cfg(*common, output_dir=tmp_path / "clean"))  # the reference run, in this process
    run = tmp_path / "term"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *common, f"hydra.run.dir={run}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=subprocess_env(),
        cwd=tmp_path,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "train_steps.jsonl").exists() and len((run / "train_steps.jsonl").read_text().splitlines()) >= 60:
            break
        time.sleep(0.05)
    sent = time.time()
    process.send_signal(signal.SIGTERM)
    time.sleep(0.02)
    process.send_signal(signal.SIGINT)  # a second signal, during the save, must not corrupt it
    process.wait(timeout=60)
    assert process.returncode == 143
    assert time.time() - sent < 10
    folder, warnings = checkpoint.latest_state(run)
    assert folder is not None and not warnings
    stopped_at = json.loads((folder / checkpoint.PROGRESS_FILE).read_text())["progress"]["global_step"]
    assert 60 <= stopped_at < 150  # mid-run: 50 steps an epoch, 3 epochs
    train(make_cfg(*common, f"resume={run}"))
    _assert_same_run(tmp_path / "clean", run)


def test_resume_refuses_a_run_that_differs(make_cfg, tmp_path):
    train(make_cfg(*TINY, "trainer.save_every=4"))
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(CheckpointError) as info:
        train(
            make_cfg(
                *TINY,
                "trainer.batch_size=4",
                "data.max_length=64",
                f"resume={tmp_path / 'run'}",
                output_dir=tmp_path / "other",
            )
        )
    text = str(info.value)
    assert "trainer.batch_size: saved 8, now 4" in text and "data.max_length: saved 128, now 64" in text
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if k != "train.log"} == {k: v for k, v in before.items() if k != "train.log"}


def test_named_incomplete_state_is_an_error_and_auto_skips_it(make_cfg, tmp_path, caplog):
    train(make_cfg(*TINY, "trainer.save_every=3"))
    run = tmp_path / "run"
    newest, _ = checkpoint.latest_state(run)
    broken = newest.parent / "step_99999999"
    shutil.copytree(newest, broken)
    (broken / checkpoint.COMPLETE).unlink()
    with pytest.raises(CheckpointError, match="the state is incomplete"):
        resume.find_state(str(broken), run)
    assert resume.find_state("auto", run) == newest
    truncated = newest.parent / "step_99999998"
    shutil.copytree(newest, truncated)
    (truncated / checkpoint.MODEL_KEY).write_bytes((truncated / checkpoint.MODEL_KEY).read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a safe, complete state file"):
        resume.load(truncated, _OneProcess(), json.loads((newest / checkpoint.PROGRESS_FILE).read_text())["config"])


class _OneProcess:
    num_processes, process_index, is_main_process, sharded = 1, 0, True, False

    def state_dict(self, model):
        from engine.model import plain_state_dict

        return plain_state_dict(model)

    def broadcast_object(self, obj):
        return obj

    def wait_for_everyone(self):
        pass


class _Crash(BaseException):
    pass


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_crash_at_any_file_operation_of_a_save_never_leaves_a_bad_state(make_cfg, tmp_path, monkeypatch, when):
    """Crash before/after every write, fsync and rename of a save: the newest complete state still loads."""
    from engine.model import build_model
    from tests.test_model import TINY as TINY_MODEL

    train(make_cfg(*TINY, "trainer.save_every=3", "trainer.max_steps=3"))
    run = tmp_path / "run"
    previous, _ = checkpoint.latest_state(run)
    config = json.loads((previous / checkpoint.PROGRESS_FILE).read_text())["config"]
    model = build_model(TINY_MODEL, 2, {0: "a", 1: "b"}, "single_label_classification")
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    operations = [("os", "fsync"), ("os", "replace"), ("torch", "save"), ("checkpoint", "_fsync_dir")]

    def attempt(crash_at: int | None) -> int:
        calls = {"n": 0}
        patches = []
        for module_name, attribute in operations:
            owner = {"os": checkpoint.os, "torch": checkpoint.torch, "checkpoint": checkpoint}[module_name]
            real = getattr(owner, attribute)

            def wrapped(*args, _real=real, **kwargs):
                calls["n"] += 1
                if when == "before" and calls["n"] == crash_at:
                    raise _Crash
                result = _real(*args, **kwargs)
                if when == "after" and calls["n"] == crash_at:
                    raise _Crash
                return result

            patches.append((owner, attribute, real))
            monkeypatch.setattr(owner, attribute, wrapped)
        try:
            resume.save(
                run,
                _OneProcess(),
                resume.Progress(global_step=7, epoch=0, step_in_epoch=7),
                model,
                optimizer,
                scheduler,
                {},
                config,
            )
        except _Crash:
            pass
        finally:
            for owner, attribute, real in patches:
                monkeypatch.setattr(owner, attribute, real)
        return calls["n"]

    snapshot = tmp_path / "snapshot"
    shutil.copytree(run / "state", snapshot)
    total = attempt(None)  # a clean save: count its operations
    assert total >= 12
    for crash_at in range(1, total + 1):
        shutil.rmtree(run / "state")
        shutil.copytree(snapshot, run / "state")
        attempt(crash_at)
        folder, _ = checkpoint.latest_state(run)
        assert folder is not None, crash_at
        assert folder.name in {previous.name, "step_00000007"}, (crash_at, folder)  # at most one interval lost
        progress, parts = resume.load(folder, _OneProcess(), config)
        expected = 7 if folder.name == "step_00000007" else 3
        assert progress.global_step == expected
        if expected == 7:
            assert all(torch.equal(parts["model"][k], v) for k, v in model.hf_model.state_dict().items())


@pytest.mark.parametrize("fused", ["null", "false"])  # skipped on the device (fused AdamW), or by the loop
def test_nan_at_step_k_is_skipped_and_never_reaches_disk(make_cfg, tmp_path, monkeypatch, caplog, fused):
    from engine.model import ClassifierWithLoss

    real = ClassifierWithLoss.loss_from_logits
    calls = {"n": 0}

    def poisoned(self, logits, labels, loss_denominator=None):
        loss = real(self, logits, labels, loss_denominator)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 3:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(ClassifierWithLoss, "loss_from_logits", poisoned)
    train(make_cfg(*TINY, "trainer.save_every=2", f"optim.fused={fused}"))
    run = tmp_path / "run"
    assert "non-finite gradients at step 3: update skipped (1 so far)" in (run / "train.log").read_text()
    steps = _steps(run)
    assert len(steps) == 8  # 8 steps: the third's update skipped, so its window has no loss
    assert steps[2]["loss"] is None
    assert all(isinstance(s["loss"], float) and s["loss"] == s["loss"] for s in steps[:2] + steps[3:])
    for tensor in torch.load(run / "best_acc_classify.pth", weights_only=True).values():
        assert torch.isfinite(tensor).all()
    assert all(torch.isfinite(t).all() for t in _final_model(run).values() if t.is_floating_point())


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (("trainer.on_nonfinite=stop",), "stopping (trainer.on_nonfinite=stop"),
        (("trainer.max_nonfinite=1",), "2 non-finite steps, trainer.max_nonfinite=1"),
    ],
)
def test_nonfinite_stop_and_limit(make_cfg, monkeypatch, setting, message):
    from engine.model import ClassifierWithLoss

    real = ClassifierWithLoss.loss_from_logits
    monkeypatch.setattr(
        ClassifierWithLoss,
        "loss_from_logits",
        lambda self, *a, **k: real(self, *a, **k) * (float("nan") if torch.is_grad_enabled() else 1),
    )
    with pytest.raises(EngineError, match=message.replace("(", r"\(")):
        train(make_cfg(*TINY, *setting))


def test_nonfinite_weights_or_metric_never_become_best(tmp_path):
    state = {"w": torch.tensor([1.0, float("inf")])}
    with pytest.raises(CheckpointError, match="weight 'w' is not finite"):
        checkpoint.save_best(tmp_path, state, {"metric_value": 0.9})
    with pytest.raises(CheckpointError, match="metric value nan"):
        checkpoint.save_best(tmp_path, {"w": torch.ones(2)}, {"metric_value": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_save_keeps_the_old_files(tmp_path, monkeypatch):
    checkpoint.save_best(tmp_path, {"w": torch.ones(3)}, {"metric_value": 0.5})
    before = (tmp_path / "best_acc_classify.pth").read_bytes(), (tmp_path / "best_acc_classify.json").read_text()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(CheckpointError, match=r"cannot write .*best_acc_classify.pth: No space left on device"):
        checkpoint.save_best(tmp_path, {"w": torch.zeros(3)}, {"metric_value": 0.9})
    assert (
        (tmp_path / "best_acc_classify.pth").read_bytes(),
        (tmp_path / "best_acc_classify.json").read_text(),
    ) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_acc_classify.json", "best_acc_classify.pth"]


@pytest.mark.parametrize("force_unsafe", [False, True])
@pytest.mark.parametrize("planted", [checkpoint.MODEL_KEY, "rng_rank0"])
def test_a_pickle_planted_in_the_resume_state_is_refused(make_cfg, tmp_path, monkeypatch, planted, force_unsafe):
    train(make_cfg(*TINY, "trainer.save_every=4"))
    run = tmp_path / "run"
    folder, _ = checkpoint.latest_state(run)
    marker = tmp_path / "pwned"
    with open(folder / planted, "wb") as handle:
        pickle.dump({"x": PicklePayload(marker)}, handle)
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="not a safe, complete state file"):
        train(make_cfg(*TINY, "trainer.save_every=4", f"resume={run}", output_dir=tmp_path / "again"))
    assert not marker.exists()


BAD_FILES = {
    "quoting": (b'text,label\n"unclosed quote,1\nfine,0\n', "train.csv:2: a quote opened on this line is never closed"),
    "utf8": (b"text,label\nok,1\nbad \xfe,0\n", "train.csv:3:5: not valid UTF-8"),
    "empty_text": (b"text,label\nok,1\n  ,0\n", "1 rows with no text in column 'text' (data rows 2)"),
    "missing_column": (b"sentence,label\nok,1\n", "no column 'text'"),
    "header_only": (b"text,label\n", "the train split is empty"),
}


def _bad_data_overrides(tmp_path, case):
    content, message = BAD_FILES[case]
    (tmp_path / "train.csv").write_bytes(content)
    (tmp_path / "dev.csv").write_bytes(b"text,label\nok,1\n")
    files = [f"data.train_file={tmp_path}/train.csv", f"data.validation_file={tmp_path}/dev.csv"]
    return ["model=tiny", "data=local", *files, "data.text_column=text", f"data.cache_dir={tmp_path}/cache"], message


def test_bad_data_file_on_the_command_line_is_one_line_exit_2_before_work(tmp_path):
    overrides, message = _bad_data_overrides(tmp_path, "quoting")
    result = _run([str(ROOT / "train.py"), *overrides, f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert {p.name for p in (tmp_path / "run").iterdir()} <= {".hydra", "train.log"}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_data_files_fail_before_work_with_file_and_line(tmp_path, make_cfg, case):
    overrides, message = _bad_data_overrides(tmp_path, case)
    with pytest.raises(DataError) as raised:
        train(make_cfg(*overrides))
    assert message in str(raised.value)
    assert {p.name for p in (tmp_path / "run").iterdir()} <= {"train.log"}  # nothing trained, nothing saved


def test_a_byte_order_mark_is_read_cleanly(tmp_path, make_cfg):
    (tmp_path / "train.csv").write_bytes("\ufefftext,label\nhello there,1\nbye now,0\n".encode())
    best = train(
        make_cfg(
            "model=tiny",
            "data=local",
            f"data.train_file={tmp_path}/train.csv",
            f"data.validation_file={tmp_path}/train.csv",
            "data.text_column=text",
            "trainer.progress=false",
        )
    )
    assert 0.0 <= best <= 1.0


@pytest.mark.slow
def test_fewer_training_rows_than_processes(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\nonly one,0\n")
    launcher = accelerate_launch(29612)
    result = _run(
        [
            str(ROOT / "train.py"),
            "model=tiny",
            "data=local",
            f"data.train_file={tmp_path}/train.csv",
            f"data.validation_file={tmp_path}/train.csv",
            "data.text_column=text",
            f"hydra.run.dir={tmp_path}/run",
            f"data.cache_dir={tmp_path}/cache",
        ],
        tmp_path,
        launcher,
    )
    assert result.returncode != 0
    assert "1 training rows for 2 processes" in result.stderr
