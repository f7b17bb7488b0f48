"""The benchmark is not a test (no timings here); these check it still drives the current config."""

from __future__ import annotations

import importlib.util

import pytest

from engine.config import MixedPrecision, validate
from tests.conftest import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_lever_row_is_a_valid_config(make_cfg):
    bench = _bench()
    overrides: list[str] = []
    seen = []
    for _label, extra in bench.LEVERS:
        overrides = overrides + extra
        config = validate(make_cfg(*overrides))
        t = config.trainer
        levers = (
            t.fast_dropout is not False,
            t.native_masks is not False,
            t.native_softmax is not False,
            t.native_attention is not False,
            t.native_gelu is not False,
            t.sparse_embedding_grad is not False,
            t.fused_inference is not False,
            t.first_token_last_layer is not False,
            t.packed_inference is not False,
            t.clip_in_step is not False,
            t.native_embedding_adamw is not False,
            t.bf16_weights is not False,
            t.fused_layers is not False,
            t.compile,
        )
        seen.append((config.data.group_by_length, config.data.pad_to_multiple_of, t.mixed_precision, *levers))
    # The baseline switches every lever off; the last row has them all on.
    assert seen[0] == (False, 1, MixedPrecision.no, *[False] * 14)
    assert seen[-1] == (True, None, MixedPrecision.bf16, *[True] * 14)


def test_mean_and_sd_over_seeds():
    bench = _bench()
    assert bench.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert bench.cell([{"x": 2.0}, {"x": 4.0}], "x", "{:.1f}") == "3.0 ± 1.4"
    assert bench.cell([{"x": 2.0}], "x", "{:.1f}") == "2.0"


def test_flop_accounting_of_the_first_token_last_layer():
    """Model FLOPs count 6 x the non-embedding parameters a token; the first-token-only ones are
    the last layer's query, attention output and feed-forward (4 of its 6 matrices, by size)."""
    total, first_only = _bench().parameter_counts()
    hidden, ff, layers = 384, 1536, 6  # MiniLM-L6
    per_layer = 4 * (hidden * hidden + hidden) + 2 * hidden * ff + ff + hidden + 4 * hidden
    assert total == layers * per_layer + hidden * hidden + hidden + hidden * 2 + 2  # + pooler, classifier
    assert first_only == 2 * (hidden * hidden + hidden) + 2 * hidden * ff + ff + hidden


def test_flop_share_against_the_peaks_measured_next_to_each_run():
    """Each run's model FLOP rate over the mean of the bf16 peaks measured just before and after it,
    averaged over runs; performed FLOPs count first-token-only parameters once a sample."""
    runs = [
        {
            "tokens_per_s": 1000.0,
            "train_samples_per_s": 20.0,
            "adjacent_bf16_peak": 60.0,
            "first_token_last_layer": True,
        },
        {
            "tokens_per_s": 500.0,
            "train_samples_per_s": 10.0,
            "adjacent_bf16_peak": 30.0,
            "first_token_last_layer": True,
        },
    ]
    # 6 x 10M parameters x 1000 tokens/s = 60 GFLOP/s against 60: 100%; the second also 100%.
    # performed: (6 x (6M x 1000 + 4M x 20)) / 60e9 = 0.608
    text = _bench().adjacent_share(runs, 10_000_000, 4_000_000)
    assert text.endswith("(60, 30 GFLOP/s): 100% of it in model FLOPs (performed: 61%)")


def test_attention_flops_follow_palms_count_over_mrpc_train():
    """12 x layers x hidden x T a token, T the token-weighted mean length of MRPC train's pairs."""
    attention, mean_length = _bench().attention_flops_per_token()
    assert attention == pytest.approx(12 * 6 * 384 * mean_length)
    assert 45 < mean_length < 80  # MRPC pairs: ~53 tokens on average, the longer ones weigh more
