"""Which swept parameters matter: importances in the sweep summary, on sweep tables built by hand."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from engine import importance
from engine.sweep import collect, summarize

OPTUNA_SWEEPER = {
    "_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
    "direction": "maximize",
    "params": {"optim.lr": "tag(log, interval(1e-5, 1e-4))", "model.dropout": "interval(0.0, 0.2)"},
}


def _job(sweep: Path, name: str, overrides: list[str], value: float, sweeper: dict | None = None) -> None:
    """A finished job as the engine leaves it: overrides, hydra config, summary, best checkpoint info."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    hydra = {"sweeper": sweeper or {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"}}
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {**hydra, "overrides": {"task": []}}}))
    (job / "summary.json").write_text(json.dumps({"wall_seconds": 1.0}))
    info = {"metric_name": "accuracy", "metric_value": value, "epoch": 0, "step": 3}
    info["config"] = {"trainer": {"greater_is_better": True}}
    (job / "best_acc_classify.json").write_text(json.dumps(info))


def _accuracy(lr: float, noise: float) -> float:
    """The learning rate drives the metric (+0.1 per decade); nothing else does but a little noise."""
    return 0.60 + 0.10 * math.log10(lr / 1e-5) + noise


def test_a_grid_ranks_the_parameter_that_drives_the_metric(tmp_path):
    rng = np.random.default_rng(0)
    grid = itertools.product(("1e-05", "3e-05", "1e-04"), ("0.0", "0.1", "0.2"), ("1", "2"))
    for i, (lr, dropout, seed) in enumerate(grid):
        overrides = [f"optim.lr={lr}", f"model.dropout={dropout}", f"seed={seed}", "trainer.max_steps=20"]
        _job(tmp_path, f"job{i:02d}", overrides, _accuracy(float(lr), rng.normal(0, 0.005)))

    result = summarize(tmp_path)["importance"]
    assert result.method == importance.FOREST and result.jobs == 18 and result.note is None
    first, second = result.rows  # seed is a replicate and trainer.max_steps a constant: neither is ranked
    assert first["parameter"] == "optim.lr" and second["parameter"] == "model.dropout"
    assert first["importance"] > 0.9 and second["importance"] < 0.1
    assert first["importance"] + second["importance"] == pytest.approx(1.0)
    assert first["scale"] == "log" and second["scale"] == "linear"  # 1e-5..1e-4 spans a decade
    assert first["correlation"] > 0.95 and first["values"] == 3

    text = (tmp_path / "sweep_summary.md").read_text()
    assert "## Which parameters matter (importance for best accuracy)" in text
    assert f"| `optim.lr` | {first['importance']:.3f} | +" in text
    with open(tmp_path / "sweep_importance.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [row["parameter"] for row in table] == ["optim.lr", "model.dropout"]
    assert float(table[0]["importance"]) == pytest.approx(first["importance"])
    assert (tmp_path / "sweep_importance.png").stat().st_size > 5_000


def test_an_optuna_sweep_uses_optunas_evaluator_on_the_rebuilt_study(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    rng = np.random.default_rng(1)
    for trial in range(12):
        lr, dropout = 10 ** rng.uniform(-5, -4), rng.uniform(0.0, 0.2)
        overrides = [f"optim.lr={lr}", f"model.dropout={dropout}"]
        _job(tmp_path, f"trial_{trial}", overrides, _accuracy(lr, rng.normal(0, 0.005)), OPTUNA_SWEEPER)

    result = importance.estimate(collect(tmp_path), importance.sweeper_config(tmp_path, collect(tmp_path)))
    # Optuna 2.10's fANOVA fails on this NumPy: then its mean-decrease-impurity evaluator answers, and the note says so.
    if result.method == importance.OPTUNA_MDI:
        assert result.note.startswith("Optuna's fANOVA evaluator failed here (ValueError")
    else:
        assert result.method == importance.OPTUNA and result.note is None
    assert [row["parameter"] for row in result.rows] == ["optim.lr", "model.dropout"]
    assert result.rows[0]["importance"] > 0.8 > 0.2 > result.rows[1]["importance"]
    assert result.rows[0]["scale"] == "log" and result.rows[1]["scale"] == "linear"  # from the sweeper's tags


def test_too_few_jobs_are_said_to_be_too_few(tmp_path):
    for i, (lr, dropout) in enumerate((("1e-5", "0.0"), ("3e-5", "0.1"), ("1e-4", "0.2"), ("1e-4", "0.0"))):
        _job(tmp_path, f"job{i}", [f"optim.lr={lr}", f"model.dropout={dropout}"], 0.6 + 0.01 * i)
    (tmp_path / "sweep_importance.csv").write_text("parameter,importance\nstale,1.0\n")  # from an earlier summary

    result = summarize(tmp_path)["importance"]
    assert result.rows == []
    expected = "4 over 2 swept parameter(s); it needs at least 6 (2 per parameter, 6 at the least)"
    assert expected in result.note
    text = (tmp_path / "sweep_summary.md").read_text()
    assert "No importance estimate: too few finished jobs for a sound estimate: " + expected in text
    assert not (tmp_path / "sweep_importance.csv").exists() and not (tmp_path / "sweep_importance.png").exists()


def test_a_sweep_of_seeds_only_has_nothing_to_rank(tmp_path):
    for seed in range(8):
        _job(tmp_path, f"seed{seed}", ["optim.lr=2e-5", f"seed={seed}"], 0.7 + 0.01 * seed)
    result = summarize(tmp_path)["importance"]
    assert result.rows == [] and "no swept parameter takes more than one value" in result.note
