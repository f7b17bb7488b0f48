"""The weighted loss inside forward, class weights, and the plain state_dict contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.backend import ManualBackend
from engine.config import BackendConfig, MixedPrecision, ModelConfig, ProblemType, bundled_minilm_path
from engine.model import (
    balanced_class_weights,
    build_model,
    plain_state_dict,
    resolve_class_weights,
)

TINY = ModelConfig(
    name="tiny",
    source=bundled_minilm_path(),
    pretrained=False,
    config_overrides={
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
    },
)


def tiny(num_labels=3, problem=ProblemType.single_label_classification, weights=None):
    torch.manual_seed(0)
    return build_model(TINY, num_labels, {i: f"l{i}" for i in range(num_labels)}, problem, weights)


def batch(n=6, length=10, num_labels=3, multi=False):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (n, length), generator=generator)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 7:] = 0
    if multi:
        labels = (torch.rand(n, num_labels, generator=generator) > 0.5).float()
    else:
        labels = torch.randint(0, num_labels, (n,), generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_balanced_weights_match_hand_computation():
    # 10 samples: 6 of class 0, 3 of class 1, 1 of class 2 -> n / (k * count)
    assert balanced_class_weights([6, 3, 1], ProblemType.single_label_classification, 10) == pytest.approx(
        [10 / 18, 10 / 9, 10 / 3]
    )
    # multi-label pos_weight: negatives / positives per label
    assert balanced_class_weights([2, 5], ProblemType.multi_label_classification, 10) == [4.0, 1.0]
    assert resolve_class_weights("balanced", [6, 3, 1], ProblemType.single_label_classification, 10)[2] == (
        pytest.approx(10 / 3)
    )
    assert resolve_class_weights(None, [1, 1], ProblemType.single_label_classification, 2) is None


def test_class_weights_follow_the_model_to_its_device():
    model = tiny(weights=[1.0, 2.0, 3.0])
    backend = ManualBackend(BackendConfig(), MixedPrecision.no)
    (model,) = backend.prepare(model)
    assert model.class_weights.device == next(model.parameters()).device == backend.device
    moved = model.to("meta")  # any device move carries the buffer along
    assert moved.class_weights.device.type == "meta"


def test_weighted_loss_equals_hand_computed_cross_entropy():
    weights = torch.tensor([0.5, 2.0, 1.5])
    model = tiny(weights=weights.tolist()).eval()
    data = batch()
    out = model(**data)
    logits, labels = out.logits.detach(), data["labels"]
    log_probs = torch.log_softmax(logits, dim=-1)
    per_example = -log_probs[torch.arange(len(labels)), labels] * weights[labels]
    expected = per_example.sum() / weights[labels].sum()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(F.cross_entropy(logits, labels, weight=weights).item(), rel=1e-5)


def test_unweighted_loss_is_plain_cross_entropy():
    model = tiny().eval()
    data = batch()
    out = model(**data)
    assert out.loss.item() == pytest.approx(F.cross_entropy(out.logits, data["labels"]).item(), rel=1e-5)


def test_bce_with_pos_weight_equals_hand_computation():
    pos_weight = torch.tensor([3.0, 1.0, 0.5])
    model = tiny(problem=ProblemType.multi_label_classification, weights=pos_weight.tolist()).eval()
    data = batch(multi=True)
    out = model(**data)
    x, y = out.logits.detach(), data["labels"]
    sig = torch.sigmoid(x)
    hand = -(pos_weight * y * torch.log(sig) + (1 - y) * torch.log(1 - sig)).mean()
    assert out.loss.item() == pytest.approx(hand.item(), rel=1e-5)


def test_saved_keys_equal_a_plain_hf_model():
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model = tiny(weights=[1.0, 1.0, 1.0])
    config = AutoConfig.from_pretrained(bundled_minilm_path(), num_labels=3)
    for key, value in TINY.config_overrides.items():
        setattr(config, key, value)
    plain = AutoModelForSequenceClassification.from_config(config)
    saved = plain_state_dict(model)
    assert list(saved) == list(plain.state_dict())
    assert not any(k.startswith(("module.", "_orig_mod.", "hf_model.")) or "class_weights" in k for k in saved)
    plain.load_state_dict(saved)  # strict


def test_state_dict_is_plain_through_ddp_and_compile_wrappers():
    model = tiny()
    wrapped = torch.nn.Module()
    wrapped.module = model  # what DistributedDataParallel looks like
    assert list(plain_state_dict(wrapped)) == list(plain_state_dict(model))


def test_bf16_autocast_on_cpu_gives_a_finite_loss():
    model = tiny(weights=[1.0, 2.0, 1.0])
    backend = ManualBackend(BackendConfig(use_cuda=False), MixedPrecision.bf16)
    with backend.autocast():
        out = model(**batch())
    assert out.logits.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32 and math.isfinite(out.loss.item())
    backend.backward(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_multi_label_bias_starts_at_the_prior_log_odds():
    from engine.model import init_bias_from_priors

    model = tiny(num_labels=3, problem=ProblemType.multi_label_classification)
    assert init_bias_from_priors(model, [10, 50, 1], 100)
    bias = model.hf_model.classifier.bias.detach()
    expected = torch.log(torch.tensor([0.1, 0.5, 0.01]) / (1 - torch.tensor([0.1, 0.5, 0.01])))
    torch.testing.assert_close(bias, expected)
    probabilities = torch.sigmoid(model.eval()(**batch(num_labels=3, multi=True)).logits)
    assert probabilities.mean(0).tolist() == pytest.approx([0.1, 0.5, 0.01], abs=0.08)
    weighted = tiny(num_labels=3, problem=ProblemType.multi_label_classification, weights=[9.0, 1.0, 99.0])
    assert not init_bias_from_priors(weighted, [10, 50, 1], 100)  # pos_weight moves the optimum: leave it
    assert not init_bias_from_priors(tiny(num_labels=3), [10, 50, 1], 100)  # single-label: untouched


def test_auto_mixed_precision_is_bf16_only_where_native():
    from engine.backend import resolve_mixed_precision

    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_mixed_precision(MixedPrecision.auto, "cpu") == (MixedPrecision.bf16 if native else MixedPrecision.no)
    assert resolve_mixed_precision(MixedPrecision.auto, "mps") == MixedPrecision.no
    for explicit in (MixedPrecision.no, MixedPrecision.bf16, MixedPrecision.fp16):
        assert resolve_mixed_precision(explicit, "cpu") == explicit
    backend = ManualBackend(BackendConfig(use_cuda=False), MixedPrecision.auto)
    assert backend.mixed_precision == resolve_mixed_precision(MixedPrecision.auto, "cpu")
