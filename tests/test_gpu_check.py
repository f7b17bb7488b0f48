"""The GPU check's arithmetic, on the CPU: the peak by device name, model FLOPs utilisation, the
bert-base-sized encoder's parameter count, and how phase 3 times our logged windows."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.conftest import ROOT


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", (989.0, "H100 SXM")),
        ("NVIDIA H100 PCIe", (756.0, "H100 PCIe")),
        ("NVIDIA H100 NVL", (835.0, "H100 NVL")),
        ("NVIDIA H200", (989.0, "H200 SXM")),
        ("NVIDIA GH200 480GB", (989.0, "GH200")),
        ("NVIDIA A100-SXM4-80GB", (312.0, "A100")),
        ("NVIDIA A100-PCIE-40GB", (312.0, "A100")),
        ("NVIDIA L4", (121.0, "L4")),
        ("NVIDIA L40S", (362.0, "L40S")),  # not the L4's row
        ("NVIDIA A10G", (125.0, "A10G")),
        ("NVIDIA GeForce RTX 4090", (165.0, "RTX 4090")),
        ("Tesla V100-SXM2-16GB", None),  # no bf16 tensor cores
        ("NVIDIA L40", None),
    ],
)
def test_the_bf16_peak_is_found_by_the_device_name(name, peak):
    assert _gpu_check().bf16_peak(name) == peak


def test_model_flops_utilisation_is_six_flops_a_parameter_a_token_over_the_peak():
    check = _gpu_check()
    # 50M parameters at a million tokens/s: 6 * 5e7 * 1e6 = 3e14 FLOP/s = 300 TFLOP/s
    assert check.model_tflops(50_000_000, 1_000_000) == pytest.approx(300.0)
    assert check.model_flops_utilisation(50_000_000, 1_000_000, 600.0) == pytest.approx(0.5)
    assert check.model_flops_utilisation(85_646_594, 100_000, 989.0) == pytest.approx(6 * 85_646_594e5 / 989e12)


def test_the_bert_base_sized_encoder_has_bert_bases_non_embedding_parameters():
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from engine.config import bundled_minilm_path

    check = _gpu_check()
    config = AutoConfig.from_pretrained(bundled_minilm_path(), num_labels=2, **check.BERT_BASE)
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForSequenceClassification.from_config(config)
    # 12 layers of 7,087,872 (attention 4 x (768^2 + 768), FFN 2 x 768 x 3072 + 3072 + 768, 2 LayerNorms),
    # the pooler (768^2 + 768) and a 2-way head (2 x 768 + 2)
    assert check.non_embedding_parameters(model) == 12 * 7_087_872 + 590_592 + 1_538 == 85_646_594
    assert config.vocab_size == 30522  # bert-base-uncased's vocabulary, as the bundled tokenizer's


def test_timed_rows_are_whole_logging_windows():
    check = _gpu_check()
    assert check.timed_rows(3667, 32) == 3520  # MRPC's 3667 training rows: 11 windows of 10 batches of 32
    assert check.timed_rows(3667, 16) == 3520
    assert check.timed_rows(3667, 64) == 3200
    with pytest.raises(ValueError, match="fewer than one logging window"):
        check.timed_rows(300, 32)


def test_window_rates_skip_the_warm_up_epoch_and_weigh_windows_by_their_time():
    check = _gpu_check()
    records = [
        {"step": 10, "epoch": 0, "samples_per_s": 1.0, "tokens_per_s": 1.0},  # warm-up: not counted
        {"step": 20, "epoch": 0, "samples_per_s": 1.0, "tokens_per_s": 1.0},
        # epoch 1: 10 steps of 4 samples at 40/s (1 s, 400 tokens), then at 10/s (4 s, 800 tokens)
        {"step": 30, "epoch": 1, "samples_per_s": 40.0, "tokens_per_s": 400.0},
        {"step": 40, "epoch": 1, "samples_per_s": 10.0, "tokens_per_s": 200.0},
    ]
    samples_per_s, tokens_per_s = check.window_rates(records, batch_size=4)
    assert samples_per_s == pytest.approx(80 / 5)
    assert tokens_per_s == pytest.approx(1200 / 5)
    with pytest.raises(ValueError, match="no logged window"):
        check.window_rates(records[:2], batch_size=4)
