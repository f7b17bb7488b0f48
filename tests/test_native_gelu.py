"""``trainer.native_gelu``: the feed-forward GELU from tables over the bf16 values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.activations import GELUActivation

from engine import native_gelu
from engine.errors import EngineError
from engine.fused_inference import _is_exact_gelu
from tests.conftest import assert_broken_build_refused, native_on_and_off, needs_cc


@pytest.fixture
def native():
    path = native_gelu.use_native_gelu(True)
    assert path is not None and native_gelu.active()
    return path


def every_bf16_value() -> torch.Tensor:
    """All 65536 bf16 bit patterns (NaNs and infinities included), shuffled, as a (256, 256) tensor."""
    values = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return values[torch.randperm(65536, generator=torch.Generator().manual_seed(0))].reshape(256, 256)


@needs_cc
def test_forward_is_atens_gelu_bit_for_bit_on_every_bf16_value(native):
    x = every_bf16_value()
    ours, reference = native_gelu.gelu(x), F.gelu(x)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours.view(torch.int16), reference.view(torch.int16))  # NaN payloads too


@needs_cc
@pytest.mark.parametrize("numel", [1, 100, 16384, 3 * 16384 + 7])  # one thread; a team split unevenly
def test_backward_is_atens_gelu_backward(native, numel):
    x = (torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 3).to(torch.bfloat16)
    grad = torch.randn(numel, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x.requires_grad_()
    y = native_gelu.gelu(x)
    assert type(y.grad_fn).__name__ == "_GeluBackward"
    (ours,) = torch.autograd.grad(y, x, grad)
    reference = torch.ops.aten.gelu_backward(grad, x.detach())
    assert torch.equal(ours, reference)
    assert torch.equal(y.detach(), F.gelu(x.detach()))


@needs_cc
def test_the_backward_over_every_bf16_value_rounds_as_aten(native):
    x = every_bf16_value()
    finite = torch.isfinite(x)
    grad = torch.full_like(x, 0.7)
    x.requires_grad_()
    (ours,) = torch.autograd.grad(native_gelu.gelu(x), x, grad)
    reference = torch.ops.aten.gelu_backward(grad, x.detach())
    assert torch.equal(ours[finite], reference[finite])
    assert torch.equal(torch.isnan(ours), torch.isnan(reference))


@needs_cc
def test_other_tensors_take_f_gelu(native):
    x = torch.randn(4, 9)
    assert torch.equal(native_gelu.gelu(x), F.gelu(x))  # float32: not tabulated
    y = torch.randn(9, 4).to(torch.bfloat16).t()
    assert torch.equal(native_gelu.gelu(y), F.gelu(y))  # not contiguous
    native_gelu.use_native_gelu(False)
    z = torch.randn(8).to(torch.bfloat16).requires_grad_()
    assert type(native_gelu.gelu(z).grad_fn).__name__ == "GeluBackward0"


@needs_cc
def test_enable_swaps_exact_gelu_activations_only_and_fused_inference_still_folds_them(native):
    from transformers import BertConfig, BertForSequenceClassification

    from engine.fused_inference import enable_fused_inference

    model = BertForSequenceClassification(
        BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert native_gelu.enable_native_gelu(model) == 2
    for layer in model.bert.encoder.layer:
        assert layer.intermediate.intermediate_act_fn.act is native_gelu.gelu
        assert _is_exact_gelu(layer.intermediate.intermediate_act_fn)
    assert enable_fused_inference(model)[1] == 2  # both GELUs still folded into their linear layers
    assert native_gelu.enable_native_gelu(torch.nn.Sequential(GELUActivation(use_gelu_python=True))) == 0
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_defaults_and_errors(monkeypatch, tmp_path, caplog):
    assert native_gelu.use_native_gelu(False) is None and not native_gelu.active()
    assert native_gelu.use_native_gelu(None, "cuda") is None
    assert native_gelu.use_native_gelu(None, "cpu", compiled=True) is None
    with pytest.raises(EngineError, match="trainer.native_gelu is not enabled"):
        native_gelu.enable_native_gelu(torch.nn.Sequential())
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(EngineError, match="trainer.native_gelu: could not run the C compiler .*no-such-cc"):
        native_gelu.use_native_gelu(True)
    assert native_gelu.use_native_gelu(None) is None and "the GELU stays ATen's" in caplog.text


@needs_cc
def test_a_training_run_uses_the_native_gelu(make_cfg, tmp_path):
    """On by default on the CPU, logged; the same losses as ATen's GELU to float rounding."""
    runs = native_on_and_off(make_cfg, tmp_path, "native_gelu", "native GELU tables: 2 activations")
    assert len(runs["null"]) == 8
    np.testing.assert_allclose(runs["null"], runs["false"], rtol=1e-3)


def test_a_library_that_does_not_look_up_refuses_to_load(tmp_path):
    assert_broken_build_refused(
        native_gelu, "y[i] = table[x[i]];", "y[i] = x[i];", tmp_path, "does not look its table up"
    )
