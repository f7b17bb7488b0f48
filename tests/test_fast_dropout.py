"""trainer.fast_dropout: packed masks keep nn.Dropout's semantics (rate, scaling, gradient, seeding),
and eval/checkpoints are untouched (the attention path: tests/test_attention.py)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from engine.attention import FAST_DROPOUT_ATTENTION as ATTENTION_NAME
from engine.fast_dropout import (
    FastDropout,
    drop_threshold,
    enable_fast_dropout,
    fast_dropout,
    keep_lanes,
    keep_mask,
    keep_multiplier,
    use_fast_dropout,
)
from engine.loop import train
from engine.model import plain_state_dict
from tests.conftest import TINY
from tests.test_model import batch, tiny


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


def test_default_is_on_for_eager_cpu_training_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_fast_dropout(None, cpu) and not use_fast_dropout(None, cuda)
    assert not use_fast_dropout(None, cpu, compiled=True)
    assert not use_fast_dropout(False, cpu) and use_fast_dropout(True, cpu, compiled=True)


def _dev(run_dir):
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def test_training_with_fast_dropout_matches_native_dropout_within_tolerance(make_cfg, tmp_path):
    common = (*TINY, "data.max_train_samples=128", "trainer.epochs=2", "model.dropout=0.1")
    train(make_cfg(*common, "trainer.fast_dropout=true", output_dir=tmp_path / "fast"))
    train(make_cfg(*common, "trainer.fast_dropout=false", output_dir=tmp_path / "native"))
    log = (tmp_path / "fast" / "train.log").read_text()
    assert f"fast dropout: 8 dropout modules, attention {ATTENTION_NAME}" in log
    assert "fast dropout" not in (tmp_path / "native" / "train.log").read_text()
    fast, native = _dev(tmp_path / "fast"), _dev(tmp_path / "native")
    # different masks, same distribution: the tiny model lands in the same place
    assert fast["loss"] == pytest.approx(native["loss"], abs=0.05)
    assert abs(fast["accuracy"] - native["accuracy"]) <= 3 / fast["samples"]
    state = torch.load(tmp_path / "fast" / "best_acc_classify.pth")
    assert not any("dropout" in key for key in state)
