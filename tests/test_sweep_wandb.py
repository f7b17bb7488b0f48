"""The W&B sweep recipe (conf/wandb_sweep.yaml): its search space is the Optuna one, train.py takes
the arguments an agent passes, and an offline W&B run logs the sweep's target metric under its name."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from tests.conftest import ROOT, TINY, subprocess_env

SWEEP = yaml.safe_load((ROOT / "conf" / "wandb_sweep.yaml").read_text())
OPTUNA = yaml.safe_load((ROOT / "conf" / "hparams_search" / "optuna.yaml").read_text())
# The tiny run, before the agent's arguments so that theirs (batch size, ...) are the ones used.
QUICK = [o for o in TINY if not o.startswith("trainer.batch_size")] + [
    "data.max_train_samples=48",
    "data.max_eval_samples=24",
    "trainer.eval_every=3",
    "trainer.save_state=false",
]


def _agent_values(seed: int) -> dict[str, object]:
    """One draw from the sweep's parameters, as W&B's random search makes it."""
    rng = np.random.default_rng(seed)
    values: dict[str, object] = {}
    for key, spec in SWEEP["parameters"].items():
        if "value" in spec:
            values[key] = spec["value"]
        elif "values" in spec:
            values[key] = spec["values"][int(rng.integers(len(spec["values"])))]
        elif spec["distribution"] == "log_uniform_values":
            values[key] = float(math.exp(rng.uniform(math.log(spec["min"]), math.log(spec["max"]))))
        else:
            values[key] = float(rng.uniform(spec["min"], spec["max"]))
    return values


def _agent_arguments(values: dict[str, object]) -> list[str]:
    """``${args_no_hyphens}``: wandb's own formatting where wandb is installed, else its rule, key=value."""
    try:
        from wandb.sdk.launch.sweeps.utils import create_sweep_command_args
    except ImportError:
        return [f"{key}={value}" for key, value in values.items()]
    return create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})["args_no_hyphens"]


def test_the_recipe_runs_train_py_with_the_optuna_search_space():
    assert SWEEP["program"] == "train.py" and SWEEP["method"] == "random"
    assert SWEEP["command"] == ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]
    assert SWEEP["metric"] == {"name": "eval/best", "goal": "maximize"}
    space = {key: spec for key, spec in SWEEP["parameters"].items() if "value" not in spec}
    optuna_space = OPTUNA["hydra"]["sweeper"]["params"]
    assert space.keys() == optuna_space.keys()
    parser = OverridesParser.create()
    for key, text in optuna_space.items():
        sweep = parser.parse_override(f"{key}={text}").value()
        if hasattr(sweep, "list"):  # choice(...)
            assert space[key] == {"values": sweep.list}, key
        else:  # interval(...), tag(log, ...)
            kind = "log_uniform_values" if "log" in sweep.tags else "uniform"
            assert space[key] == {"distribution": kind, "min": sweep.start, "max": sweep.end}, key


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_train_py_takes_the_arguments_an_agent_passes(make_cfg, seed):
    values = _agent_values(seed)
    cfg = make_cfg(*QUICK, *_agent_arguments(values))
    for key, value in values.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        expected = ["jsonl", "tensorboard", "wandb"] if key == "logger" else value
        assert node == expected, key


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a ``.wandb`` file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose
    records (crc32, length, type; then data) may be split as FIRST, MIDDLE.., LAST."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, pending, position, block = [], b"", 7, 32768
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL, LAST
            records.append(pending)
            pending = b""
    return records


@pytest.mark.slow
def test_an_agent_run_logs_the_target_metric_in_its_offline_wandb_files(tmp_path):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    values = _agent_values(0)
    # What the agent runs: ${env} ${interpreter} ${program} ${args_no_hyphens} (the tiny run's overrides in between).
    parts = {"${env}": [], "${interpreter}": [sys.executable], "${program}": [str(ROOT / SWEEP["program"])]}
    parts["${args_no_hyphens}"] = [
        *QUICK,
        f"output_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        *_agent_arguments(values),
    ]
    command = [word for chunk in SWEEP["command"] for word in parts[chunk]]
    env = {**subprocess_env(), "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    run = tmp_path / "run"
    (log_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    target = SWEEP["metric"]["name"]
    history, summary = [], {}
    for raw in _wandb_records(log_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if target in row:
                history.append(row)
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})

    evaluations = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(evaluations) >= 2 and len(history) == len(evaluations)  # once per evaluation
    running_best = np.maximum.accumulate([e["accuracy"] for e in evaluations])
    assert [row[target] for row in history] == pytest.approx(list(running_best))
    assert [row["_step"] for row in history] == [e["step"] for e in evaluations]
    best = json.loads((run / "best_acc_classify.json").read_text())
    assert summary[target] == pytest.approx(best["metric_value"])  # what the sweep ranks the run by
    assert best["config"]["optim"]["lr"] == pytest.approx(values["optim.lr"])
