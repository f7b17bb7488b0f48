"""The engine's attention (engine/attention.py): the packed-mask dropout path equals the formula with
the same mask; under bf16 autocast it computes as autocast's eager attention; bf16 inference is
within bf16 rounding of float32 SDPA; the model switches between the two registered names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engine.attention as attention
from engine.attention import (
    FAST_DROPOUT_ATTENTION,
    INFERENCE_ATTENTION,
    folded_attention,
    mark_inference_attention,
    sdpa_fast_dropout_attention,
    use_engine_attention,
)
from engine.fast_dropout import enable_fast_dropout, keep_mask
from engine.fused_inference import enable_fused_inference, fused_inference_supported
from tests.test_model import batch, tiny


def _inputs():
    return {k: v for k, v in batch().items() if k != "labels"}


def test_training_attention_equals_the_formula_with_the_same_mask():
    class Module(nn.Module):
        is_causal = False

    module = Module().train()
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, 2, 9, 8, generator=generator) for _ in range(3))
    mask = torch.ones(3, 1, 9, 9, dtype=torch.bool)
    mask[0, :, :, 6:] = False  # row 0 is padded after 6 tokens
    torch.manual_seed(11)
    out, weights = sdpa_fast_dropout_attention(module, q, k, v, mask, dropout=0.1, scaling=8**-0.5)
    torch.manual_seed(11)
    keep = keep_mask((3, 2, 9, 9), 0.1)
    scores = (q @ k.transpose(2, 3)) * 8**-0.5
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) * keep / 0.9
    assert weights is None
    assert out.shape == (3, 9, 2, 8)
    assert torch.allclose(out, (probs @ v).transpose(1, 2), atol=1e-6)
    # and so do the gradients (scale and mask ride inside one batched product)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    reference = [t.clone().requires_grad_() for t in (q, k, v)]
    upstream = torch.randn(3, 9, 2, 8, generator=generator)
    torch.manual_seed(11)
    (sdpa_fast_dropout_attention(module, *leaves, mask, dropout=0.1, scaling=8**-0.5)[0] * upstream).sum().backward()
    rq, rk, rv = reference
    scores = (rq @ rk.transpose(2, 3)) * 8**-0.5
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) * keep / 0.9
    ((probs @ rv).transpose(1, 2) * upstream).sum().backward()
    for ours, theirs in zip(leaves, reference, strict=True):
        assert torch.allclose(ours.grad, theirs.grad, atol=1e-5)
    # evaluation (and dropout 0) is SDPA itself
    module.eval()
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=8**-0.5).transpose(1, 2)
    assert torch.allclose(sdpa_fast_dropout_attention(module, q, k, v, mask, dropout=0.0)[0], expected, atol=1e-6)


def test_bf16_training_attention_computes_as_autocast_eager_attention():
    """Under bf16 autocast: bf16 products, the softmax accumulated in float32 and rounded to bf16,
    as transformers' eager attention under autocast; the float32 result is ~2% of the output
    scale away (scores rounded to bf16 before the softmax) on these deliberately large scores."""

    class Module(nn.Module):
        is_causal = False

    module = Module().train()
    generator = torch.Generator().manual_seed(0)
    q, k, v = (2 * torch.randn(2, 4, 40, 32, generator=generator).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        out, _ = sdpa_fast_dropout_attention(module, q, k, v, None, dropout=0.1)
    torch.manual_seed(1)
    keep = keep_mask((2, 4, 40, 40), 0.1)
    scores = (q @ k.transpose(2, 3)) * 32**-0.5  # bf16, as eager attention's matmul under autocast
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).bfloat16() * keep * (1 / 0.9)
    eager = (probs.bfloat16() @ v).transpose(1, 2)
    assert out.dtype == torch.bfloat16
    assert (out.float() - eager.float()).abs().max() <= 0.0625  # one bf16 step at |out| ~ 5
    exact = (torch.softmax(q.float() @ k.float().transpose(2, 3) * 32**-0.5, dim=-1) * keep / 0.9) @ v.float()
    assert (out.float() - exact.transpose(1, 2)).abs().max() < 0.02 * exact.abs().max()


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none", "first-query-row"])
def test_bf16_inference_attention_matches_float32_sdpa(mask_kind):
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 4, 9, 8, generator=generator) for _ in range(3))
    keep = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    keep[1, ..., 5:] = False
    mask = {
        "bool": keep,
        "additive": torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min),
        "none": None,
        "first-query-row": keep,
    }[mask_kind]
    if mask_kind == "first-query-row":  # the first-token last layer: one query against every key
        q = q[:, :, :1]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        have = folded_attention(*(t.bfloat16() for t in (q, k, v)), mask, 8**-0.5)
    assert have.shape == want.shape and have.dtype == torch.bfloat16
    assert torch.allclose(have.float(), want, atol=3e-2), (have.float() - want).abs().max()


@pytest.mark.skipif(not fused_inference_supported(), reason="no native oneDNN bf16 on this CPU")
def test_with_fast_dropout_the_attention_keeps_both_paths(monkeypatch):
    model = tiny()
    enable_fast_dropout(model.hf_model)
    enable_fused_inference(model.hf_model)
    assert model.hf_model.config._attn_implementation == "sdpa_fast_dropout"
    calls = []  # (dropout, autograd on) of each folded_attention call
    monkeypatch.setattr(
        attention,
        "folded_attention",
        lambda *args: (
            calls.append((args[5] if len(args) > 5 else 0.0, torch.is_grad_enabled())) or folded_attention(*args)
        ),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()(**batch()).loss.backward()  # training: the packed-mask dropout attention
    assert calls == [(0.1, True), (0.1, True)]
    calls.clear()
    reference = tiny().eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.eval()(**_inputs()).logits.float()
        expected = reference(**_inputs()).logits.float()
    assert torch.allclose(logits, expected, atol=2e-2)
    assert calls == [(0.0, False), (0.0, False)]  # evaluation: the bf16 inference path


def test_registered_names_and_marks():
    model = tiny()
    assert model.hf_model.config._attn_implementation == "sdpa"
    assert mark_inference_attention(model.hf_model) == model.hf_model.config.num_hidden_layers
    assert model.hf_model.config._attn_implementation == INFERENCE_ATTENTION
    enable_fast_dropout(model.hf_model)  # the fast-dropout attention takes the inference path too
    assert model.hf_model.config._attn_implementation == FAST_DROPOUT_ATTENTION
    assert not use_engine_attention(model.hf_model, INFERENCE_ATTENTION)  # not back to inference-only
    eager = tiny()
    eager.hf_model.set_attn_implementation("eager")
    assert mark_inference_attention(eager.hf_model) == 0
    assert not use_engine_attention(eager.hf_model, FAST_DROPOUT_ATTENTION)
    assert eager.hf_model.config._attn_implementation == "eager"


def test_the_mask_bias_is_built_once_per_mask_and_not_kept_after_it():
    from engine.attention import _LAST_BIAS, additive_mask

    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False
    shape = (2, 4, 5, 5)
    bias = additive_mask(mask, shape, torch.bfloat16)
    assert bias.shape == (8, 5, 5) and bias[4:, :, 3:].eq(torch.finfo(torch.bfloat16).min).all()
    assert bias[:4].eq(0).all() and bias[4:, :, :3].eq(0).all()
    assert additive_mask(mask, shape, torch.bfloat16) is bias  # the next layer's call: the same bias
    assert additive_mask(mask, shape, torch.float32) is not bias  # another dtype: built again
    mask[0, ..., 4:] = False  # an in-place change: built again, with it
    assert additive_mask(mask, shape, torch.float32)[0, :, 4].eq(torch.finfo(torch.float32).min).all()
    other = mask.clone()
    assert additive_mask(other, shape, torch.float32) is not additive_mask(mask, shape, torch.float32)
    del mask, other
    assert not _LAST_BIAS  # the mask is gone, and so is its bias
    with torch.inference_mode():  # inference tensors keep no version counter
        mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
        assert additive_mask(mask, shape) is additive_mask(mask, shape)
