"""trainer.fused_inference: the fused CPU bf16 evaluation forward gives the unfused logits (to bf16
rounding), follows weight updates, and leaves training forwards, gradients and checkpoints alone."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import engine.attention as attention
from engine.attention import INFERENCE_ATTENTION, folded_attention
from engine.fused_inference import (
    FoldedActivation,
    InferenceFusedLinear,
    InferenceFusedQKV,
    enable_fused_inference,
    frozen_weights,
    fused_inference_supported,
    use_fused_inference,
)
from engine.loop import train
from engine.model import plain_state_dict
from tests.conftest import TINY
from tests.test_model import batch, tiny

needs_onednn_bf16 = pytest.mark.skipif(not fused_inference_supported(), reason="no native oneDNN bf16 on this CPU")


def _inputs():
    return {k: v for k, v in batch().items() if k != "labels"}


def _bf16_eval_logits(model):
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(**_inputs()).logits.float()


def test_swap_counts_layers_and_keeps_checkpoint_keys():
    plain, fused = tiny(), tiny()
    linears = sum(type(m) is nn.Linear for m in plain.hf_model.modules())
    layers = plain.hf_model.config.num_hidden_layers
    assert enable_fused_inference(fused.hf_model) == (linears, layers)
    assert sum(isinstance(m, FoldedActivation) for m in fused.hf_model.modules()) == layers
    assert sum(isinstance(m, InferenceFusedQKV) for m in fused.hf_model.modules()) == layers
    assert all(isinstance(m, nn.Linear) for m in fused.hf_model.modules() if isinstance(m, InferenceFusedLinear))
    assert plain_state_dict(fused).keys() == plain_state_dict(plain).keys()
    assert all(
        torch.equal(a, b)
        for a, b in zip(plain_state_dict(fused).values(), plain_state_dict(plain).values(), strict=True)
    )


@needs_onednn_bf16
def test_fused_eval_logits_match_autocast_and_take_the_fused_path(monkeypatch):
    plain, fused = tiny().eval(), tiny().eval()
    enable_fused_inference(fused.hf_model)
    calls = []
    original = torch.ops.mkldnn._linear_pointwise

    def counting(*args):
        calls.append(args[3])
        widths.append(args[1].shape[0])  # output features
        return original(*args)

    widths = []

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counting)
    attention_calls = []
    monkeypatch.setattr(
        attention, "folded_attention", lambda *args: attention_calls.append(1) or folded_attention(*args)
    )
    assert fused.hf_model.config._attn_implementation == INFERENCE_ATTENTION
    expected, got = _bf16_eval_logits(plain), _bf16_eval_logits(fused)
    # every linear, each layer's query, key and value as one product, the 2 feed-forward GELUs fused
    hidden = plain.hf_model.config.hidden_size
    assert calls.count("gelu") == 2 and len(calls) == 10 and widths.count(3 * hidden) == 2
    assert len(attention_calls) == 2  # each layer's attention in bf16 batched matmuls
    assert torch.allclose(got, expected, atol=2e-2), (got - expected).abs().max()
    # outside bf16 autocast (fp32 evaluation) nothing is fused and the logits are the plain ones
    calls.clear()
    with torch.inference_mode():
        assert torch.equal(fused(**_inputs()).logits, plain(**_inputs()).logits)
    assert calls == [] and len(attention_calls) == 2


@needs_onednn_bf16
def test_training_forward_and_gradients_are_the_plain_ones():
    plain, fused = tiny().train(), tiny().train()
    enable_fused_inference(fused.hf_model)
    for model in (plain, fused):
        torch.manual_seed(4)  # the same dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**batch()).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), fused.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


@needs_onednn_bf16
def test_evaluations_see_every_fused_adamw_step_and_load():
    """The fused AdamW kernel updates weights in place without bumping their version counters:
    a bf16 copy kept across evaluations went stale (dev accuracy froze at the first epoch's)."""
    plain, fused = tiny().eval(), tiny().eval()
    enable_fused_inference(fused.hf_model)
    with frozen_weights():
        before = _bf16_eval_logits(fused)
        assert torch.equal(_bf16_eval_logits(fused), before)  # the cached copies, same result
    for model in (plain, fused):  # one identical fused AdamW step
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
        model.train()
        torch.manual_seed(7)
        model(**batch()).loss.backward()
        optimizer.step()
        model.eval()
    with frozen_weights():
        after = _bf16_eval_logits(fused)
    assert not torch.allclose(after, before, atol=0.05)
    assert torch.allclose(after, _bf16_eval_logits(plain), atol=2e-2)
    assert torch.allclose(_bf16_eval_logits(fused), after)  # outside a block: cast per call
    fused.hf_model.load_state_dict(plain_state_dict(tiny()))
    with frozen_weights():
        assert torch.allclose(_bf16_eval_logits(fused), before)


@needs_onednn_bf16
def test_training_run_evaluations_follow_the_weights(make_cfg, tmp_path):
    """Each epoch's dev loss of a bf16 run equals a fresh evaluation of that epoch's weights."""
    common = (*TINY, "trainer.mixed_precision=bf16", "trainer.epochs=3", "optim.lr=1e-3")
    train(make_cfg(*common, "trainer.fused_inference=null", output_dir=tmp_path / "fused"))
    train(make_cfg(*common, "trainer.fused_inference=false", output_dir=tmp_path / "plain"))
    fused = [json.loads(x) for x in (tmp_path / "fused" / "metrics.jsonl").read_text().splitlines()]
    plain = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert len({round(m["loss"], 4) for m in fused}) == 3  # no epoch repeats another's evaluation
    assert [m["loss"] for m in fused] == pytest.approx([m["loss"] for m in plain], abs=5e-3)


def test_default_is_on_for_eager_bf16_cpu_runs_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_fused_inference(None, cpu, bf16=True) == fused_inference_supported()
    assert not use_fused_inference(None, cpu, bf16=False)
    assert not use_fused_inference(None, cpu, bf16=True, compiled=True)
    assert not use_fused_inference(None, cuda, bf16=True)
    assert not use_fused_inference(False, cpu, bf16=True)


@needs_onednn_bf16
def test_eval_only_metrics_with_and_without_fusion_agree(make_cfg, tmp_path):
    bf16 = (*TINY, "trainer.mixed_precision=bf16", "data.max_eval_samples=80")
    train(make_cfg(*bf16, "trainer.fused_inference=true", output_dir=tmp_path / "run"))
    assert "fused inference: 14 linear layers, 2 GELUs" in (tmp_path / "run" / "train.log").read_text()
    results = {}
    for setting in ("true", "false"):
        out = tmp_path / f"eval_{setting}"
        train(
            make_cfg(
                *bf16,
                "trainer.do_train=false",
                f"checkpoint={tmp_path / 'run'}",
                f"trainer.fused_inference={setting}",
                output_dir=out,
            )
        )
        results[setting] = json.loads((out / "eval_metrics.json").read_text())
    fused, plain = results["true"], results["false"]
    assert fused["samples"] == plain["samples"] == 80
    assert fused["loss"] == pytest.approx(plain["loss"], abs=5e-3)
    assert abs(fused["accuracy"] - plain["accuracy"]) <= 1 / 80
