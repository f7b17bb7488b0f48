"""speedups.fast_dropout: packed masks keep nn.Dropout's semantics (rate, scaling, gradient, seeding),
the attention computes the formula with the same mask, eval and checkpoints are untouched."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from engine.model import plain_state_dict
from engine.speedups.fast_dropout import ATTENTION as ATTENTION_NAME
from engine.speedups.fast_dropout import (
    FastDropout,
    attention,
    drop_threshold,
    fast_dropout,
    keep_lanes,
    keep_multiplier,
)
from engine.speedups.fast_dropout import enable as enable_fast_dropout
from tests.conftest import TINY, speedup_on_and_off
from tests.test_model import batch, tiny


def keep_mask(shape, p):
    return keep_multiplier(shape, p).bool()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_drops_at_the_requested_rate(p):
    torch.manual_seed(0)
    keep = keep_mask((1000, 1000), p)
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000)
    dropped = 1 - keep.float().mean().item()
    assert dropped == pytest.approx(p, abs=0.002)  # 1e6 draws: sd 0.0005
    # every one of the four lanes of a 64-bit word is uniform, not only the low ones
    lanes = keep.flatten()[: 4 * (keep.numel() // 4)].view(-1, 4).float().mean(0)
    assert torch.allclose(lanes, torch.full((4,), 1 - p), atol=0.004)
    assert drop_threshold(0.1) == -32768 + 6554


@pytest.mark.parametrize("p", [0.0, 1 / 65536, 0.1, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_lane_value_is_kept_exactly_when_at_or_above_the_threshold(p, dtype):
    """All 65536 int16 lanes: round(p * 65536) dropped, the int16 clamp-and-shift (and p = 0 or 1,
    whose threshold lies outside int16) giving lane >= threshold as 0/1."""
    lanes = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    keep = keep_lanes(lanes, p, dtype)
    assert keep.dtype == dtype and torch.equal(keep, (lanes.int() >= drop_threshold(p)).to(dtype))
    assert keep.double().sum().item() == 65536 - round(p * 65536)
    torch.manual_seed(4)
    drawn = keep_multiplier((3, 333), p, dtype)  # 999 lanes: a partial last word
    torch.manual_seed(4)
    words = torch.empty(250, dtype=torch.int64).random_(-(2**63), None)
    assert torch.equal(drawn, keep_lanes(words.view(torch.int16)[:999].view(3, 333), p, dtype))


def test_masks_follow_the_seed_and_differ_between_draws():
    torch.manual_seed(3)
    first, second = keep_mask((257,), 0.3), keep_mask((257,), 0.3)  # odd size: a partial last word
    torch.manual_seed(3)
    assert torch.equal(keep_mask((257,), 0.3), first)
    assert not torch.equal(first, second)


def test_forward_and_backward_scale_the_kept_elements():
    x = torch.randn(6, 7, 33, requires_grad=True)
    torch.manual_seed(5)
    out = fast_dropout(x, 0.25)
    torch.manual_seed(5)
    keep = keep_mask(x.shape, 0.25)
    assert torch.equal(out, x.detach() * keep * (1 / 0.75))
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, keep * (1 / 0.75))
    assert fast_dropout(x, 0.25, training=False) is x and fast_dropout(x, 0.0) is x
    assert torch.equal(fast_dropout(x, 1.0), torch.zeros_like(x))
    bf16 = x.detach().bfloat16()
    assert fast_dropout(bf16, 0.1).dtype == torch.bfloat16


def test_module_is_an_nn_dropout_and_is_identity_in_eval():
    module = FastDropout(0.2)
    assert isinstance(module, nn.Dropout) and module.p == 0.2
    x = torch.randn(4, 8)
    assert torch.equal(module.eval()(x), x)
    assert (module.train()(torch.ones(100, 100)) == 0).float().mean().item() == pytest.approx(0.2, abs=0.02)


def test_model_swap_keeps_eval_logits_and_checkpoint_keys():
    plain, fast = tiny(), tiny()
    dropouts = sum(type(m) is nn.Dropout for m in plain.hf_model.modules())
    assert enable_fast_dropout(fast.hf_model) == dropouts > 0
    assert not any(type(m) is nn.Dropout for m in fast.hf_model.modules())
    assert fast.hf_model.config._attn_implementation == ATTENTION_NAME
    assert plain_state_dict(fast).keys() == plain_state_dict(plain).keys()
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    plain.eval(), fast.eval()
    with torch.inference_mode():
        assert torch.allclose(fast(**inputs).logits, plain(**inputs).logits, atol=1e-6)
    # training: dropout is on (two draws differ), and the loss has a gradient
    fast.train()
    first, second = fast(**batch()), fast(**batch())
    assert not torch.equal(first.logits, second.logits)
    first.loss.backward()
    assert all(p.grad is not None for p in fast.parameters() if p.requires_grad)


def _dev(run_dir):
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def test_training_with_fast_dropout_matches_native_dropout_within_tolerance(make_cfg, tmp_path):
    common = (*TINY, "data.max_train_samples=128", "trainer.epochs=2", "model.dropout=0.1")
    fast_run, native_run = speedup_on_and_off(make_cfg, tmp_path, "fast_dropout", *common)
    fast, native = _dev(fast_run), _dev(native_run)
    # different masks, same distribution: the tiny model lands in the same place
    assert fast["loss"] == pytest.approx(native["loss"], abs=0.05)
    assert abs(fast["accuracy"] - native["accuracy"]) <= 3 / fast["samples"]
    state = torch.load(fast_run / "best_acc_classify.pth")
    assert not any("dropout" in key for key in state)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_training_attention_is_the_formula_with_the_same_mask(mask_kind):
    """softmax(q k^T * scale + mask) dropped with keep_multiplier's draw, times v: output and gradients."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    batch, heads, length, dim = 2, 3, 7, 8
    q, k, v = (torch.randn(batch, heads, length, dim, requires_grad=True) for _ in range(3))
    keep_cols = torch.ones(batch, length, dtype=torch.bool)
    keep_cols[0, 5:] = False
    mask = {"none": None, "bool": keep_cols[:, None, None, :]}.get(mask_kind)
    if mask_kind == "additive":
        mask = torch.zeros(batch, 1, 1, length).masked_fill(
            ~keep_cols[:, None, None, :], torch.finfo(torch.float32).min
        )
    module = SimpleNamespace(training=True, is_causal=False)
    torch.manual_seed(5)
    out, _ = attention(module, q, k, v, mask, dropout=0.25, scaling=0.5)
    torch.manual_seed(5)
    keep = keep_multiplier((batch * heads, length, length), 0.25).view(batch, heads, length, length)
    scores = q @ k.transpose(-1, -2) * 0.5
    if mask is not None:
        bias = (
            mask
            if mask.dtype != torch.bool
            else torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        )
        scores = scores + bias
    want = ((torch.softmax(scores, -1) * keep / 0.75) @ v).transpose(1, 2)
    assert out.shape == (batch, length, heads, dim)
    assert torch.allclose(out, want, atol=1e-5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    wanted = torch.autograd.grad(want.sum(), (q, k, v))
    for got, expected in zip(grads, wanted, strict=True):
        assert torch.allclose(got, expected, atol=1e-5)
    # evaluation (no dropout): transformers' SDPA function itself
    module.training = False
    with torch.no_grad():
        plain, _ = attention(module, q, k, v, mask, dropout=0.0, scaling=0.5)
        assert torch.allclose(plain, (torch.softmax(scores, -1) @ v).transpose(1, 2), atol=1e-5)
