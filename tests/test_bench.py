"""The benchmark is not a test (no timings here); these check that it drives the current config
and compares against the peer as configured."""

from __future__ import annotations

import argparse
import importlib.util

from tests.conftest import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_peer_at_its_best_turns_on_its_own_speed_switches(tmp_path):
    from transformers import TrainingArguments

    bench = _bench()
    args = argparse.Namespace(batch_size=16, lr=5e-5, epochs=3, max_steps=None, seed=42)
    default = TrainingArguments(**bench.trainer_arguments(args, str(tmp_path), best=False))
    best = TrainingArguments(**bench.trainer_arguments(args, str(tmp_path), best=True, bf16=True))
    assert not default.bf16 and best.bf16
    # where the CPU has no native bf16 the peer's best is fp32, as ours is there
    assert not bench.trainer_arguments(args, str(tmp_path), best=True, bf16=False)["bf16"]
    assert str(best.train_sampling_strategy) == "group_by_length" != str(default.train_sampling_strategy)
    assert best.per_device_train_batch_size == default.per_device_train_batch_size == 16


def test_mean_and_sd_over_seeds():
    bench = _bench()
    assert bench.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert bench.cell([{"x": 2.0}, {"x": 4.0}], "x", "{:.1f}") == "3.0 ± 1.4"
    assert bench.cell([{"x": 2.0}], "x", "{:.1f}") == "2.0"


def test_the_table_gives_ratios_against_both_peer_configurations():
    bench = _bench()
    run = {key: 1.0 for _, key, _ in bench.ROWS}
    results = {
        "trainer": [{**run, "train_samples_per_s": 25.0}],
        "trainer_best": [{**run, "train_samples_per_s": 50.0}],
        "ours": [{**run, "train_samples_per_s": 100.0}],
    }
    table = bench.comparison_table(results)
    assert "| ours / Trainer defaults | ours / Trainer at its best |" in table
    assert "| train samples/s | 25.0 | 50.0 | 100.0 | 4.00 | 2.00 |" in table
