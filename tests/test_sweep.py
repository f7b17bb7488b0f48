"""Sweeps: multirun grids, Optuna, the summary, failed jobs, re-runs that skip finished jobs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.sweep import aggregate, collect, summarize
from tests.conftest import ROOT, TINY, subprocess_env

FAST = [
    *[o for o in TINY if "epochs" not in o],
    "trainer.epochs=1",
    "data.max_train_samples=32",
    "data.max_eval_samples=24",
    "trainer.save_state=false",
]


def _multirun(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            *FAST,
            f"data.cache_dir={tmp_path}/cache",
            f"hydra.sweep.dir={tmp_path}/sweep",
            *overrides,
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=600,
        cwd=tmp_path,
    )


def _jobs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir())


@pytest.mark.slow
def test_grid_of_four_then_a_rerun_that_skips_them(tmp_path):
    result = _multirun(tmp_path, "optim.lr=1e-4,3e-4", "seed=1,2")
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    jobs = _jobs(sweep)
    assert len(jobs) == 4
    rows = {r["job"]: r for r in collect(sweep)}
    for job in jobs:
        info = json.loads((job / "best_acc_classify.json").read_text())
        assert rows[job.name]["status"] == "finished"
        assert rows[job.name]["value"] == info["metric_value"] and rows[job.name]["step"] == info["step"]
    with open(sweep / "sweep_summary.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 4 and {r["status"] for r in table} == {"finished"}
    for row in table:
        info = json.loads((sweep / row["job"] / "best_acc_classify.json").read_text())
        assert float(row["value"]) == pytest.approx(info["metric_value"])
    groups = list(csv.DictReader(open(sweep / "sweep_groups.csv")))
    assert len(groups) == 2 and all(g["n"] == "2" for g in groups)  # seeds aggregated per learning rate
    assert (sweep / "sweep_summary.md").read_text().startswith("# Sweep summary (4 jobs: 4 finished, 0 failed)")
    assert (sweep / "sweep_summary.png").stat().st_size > 10_000
    stamps = {job.name: (job / "best_acc_classify.pth").stat().st_mtime_ns for job in jobs}

    again = _multirun(tmp_path, "optim.lr=1e-4,3e-4", "seed=1,2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already finished") + again.stdout.count("already finished") == 4
    assert {job.name: (job / "best_acc_classify.pth").stat().st_mtime_ns for job in _jobs(sweep)} == stamps


@pytest.mark.slow
def test_failing_and_crashing_jobs_are_recorded_and_the_others_run(tmp_path):
    # lr=abc fails at validation (two jobs); metric_for_best=auc fails after training; one job finishes.
    result = _multirun(tmp_path, "optim.lr=1e-4,abc", "trainer.metric_for_best=accuracy,auc")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = collect(tmp_path / "sweep")
    assert sorted(r["status"] for r in rows) == ["failed", "failed", "failed", "finished"]
    errors = [r["error"] for r in rows if r["status"] == "failed"]
    assert sum("optim.lr" in e and "abc" in e for e in errors) == 2
    assert sum("trainer.metric_for_best='auc' is not computed" in e for e in errors) == 1
    markdown = (tmp_path / "sweep" / "sweep_summary.md").read_text()
    assert "1 finished, 3 failed" in markdown and "| failed |" in markdown


@pytest.mark.slow
def test_optuna_three_trials_report_the_best(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    result = _multirun(
        tmp_path,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.params={trainer.batch_size:'choice(4,8)'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    trials = [p for p in _jobs(sweep) if p.name.startswith("trial_")]
    assert len(trials) == 3
    best = json.loads(json.dumps(__import__("yaml").safe_load((sweep / "optimization_results.yaml").read_text())))
    values = [json.loads((t / "best_acc_classify.json").read_text())["metric_value"] for t in trials]
    assert best["best_value"] == pytest.approx(max(values))
    assert len(collect(sweep)) == 3


def _job(tmp_path: Path, name: str, overrides: list[str], value: float) -> None:
    job = tmp_path / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "summary.json").write_text(json.dumps({"wall_seconds": 1.0}))
    (job / "best_acc_classify.json").write_text(
        json.dumps(
            {
                "metric_name": "accuracy",
                "metric_value": value,
                "epoch": 0,
                "step": 3,
                "config": {"trainer": {"greater_is_better": True}},
            }
        )
    )


def test_seed_aggregation_on_constructed_data(tmp_path):
    for seed, value in zip((1, 2, 3), (0.80, 0.84, 0.82), strict=True):
        _job(tmp_path, f"a{seed}", ["optim.lr=2e-5", f"seed={seed}"], value)
    for seed, value in zip((1, 2), (0.70, 0.90), strict=True):
        _job(tmp_path, f"b{seed}", ["optim.lr=5e-5", f"seed={seed}"], value)
    groups = aggregate(collect(tmp_path))
    assert [g["overrides"] for g in groups] == [["optim.lr=2e-5"], ["optim.lr=5e-5"]]  # 0.82 ranks above 0.80
    assert groups[0]["mean"] == pytest.approx(0.82) and groups[0]["std"] == pytest.approx(0.02)
    assert groups[0]["n"] == 3 and groups[0]["seeds"] == ["1", "2", "3"]
    assert groups[1]["mean"] == pytest.approx(0.80) and groups[1]["std"] == pytest.approx(0.1414, abs=1e-4)
    summary = summarize(tmp_path)
    assert len(summary["jobs"]) == 5
    text = (tmp_path / "sweep_summary.md").read_text()
    assert "| 1 | `optim.lr=2e-5` | 0.8200 ± 0.0200 | 3 | 1, 2, 3 |" in text


def test_summary_command_over_a_directory(tmp_path):
    _job(tmp_path, "only", ["optim.lr=2e-5"], 0.5)
    result = subprocess.run(
        [sys.executable, "-m", "engine.sweep", str(tmp_path)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0 and "0.5000" in result.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "engine.sweep", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
        cwd=ROOT,
    )
    assert missing.returncode == 2 and "no such sweep directory" in missing.stderr
