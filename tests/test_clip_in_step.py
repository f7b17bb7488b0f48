"""trainer.clip_in_step: clipping folded into the fused AdamW step updates the weights as
clip-then-step does, returns the same norm, serves one step only; clear errors where it cannot apply."""

from __future__ import annotations

import pytest
import torch

from engine.clip_in_step import StepScaleClipper, use_clip_in_step
from engine.embedding_grad import enable_sparse_embedding_grad
from engine.errors import EngineError
from engine.loop import train
from tests.conftest import TINY, assert_same_training
from tests.test_model import batch, tiny


def _params_with_grads(seed: int, scale: float) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((7, 5), (5,), (300,))]
    for p in params:
        p.grad = scale * torch.randn(p.shape, generator=generator)
    return params


@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clipped", "not-clipped"])
def test_update_equals_clip_then_step(max_norm):
    reference, folded = _params_with_grads(0, 3.0), _params_with_grads(0, 3.0)
    # eps=1 makes the update follow the gradient's size (Adam's is otherwise nearly scale-free),
    # so a clip left out would show in the weights
    reference_opt = torch.optim.AdamW(reference, lr=0.1, eps=1.0, weight_decay=0.01, fused=True)
    folded_opt = torch.optim.AdamW(folded, lr=0.1, eps=1.0, weight_decay=0.01, fused=True)
    clipper = StepScaleClipper(folded_opt)
    for step in range(3):
        if step:  # new gradients, the same on both sides
            for a, b in zip(reference, _params_with_grads(step, 3.0), strict=True):
                a.grad = b.grad.clone()
            for a, b in zip(folded, reference, strict=True):
                a.grad = b.grad.clone()
        expected_norm = torch.nn.utils.clip_grad_norm_(reference, max_norm)
        norm = clipper.clip_grad_norm_(folded, max_norm)
        assert torch.allclose(norm, expected_norm, rtol=1e-6)
        if max_norm < 1e6:
            assert float(norm) > max_norm  # the case really clips: 3 * sqrt(340) ~ 55
            assert folded_opt.grad_scale == pytest.approx(float(norm) / max_norm, rel=1e-6)
        else:
            assert float(folded_opt.grad_scale) == 1.0  # not clipped: divided by exactly 1
        reference_opt.step()
        folded_opt.step()
        assert not hasattr(folded_opt, "grad_scale")  # one step only
        for a, b in zip(folded, reference, strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_norm_reads_only_the_written_rows_of_the_sparse_embedding_buffer():
    torch.manual_seed(0)
    model = tiny().eval()
    enable_sparse_embedding_grad(model.hf_model)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    clipper = StepScaleClipper(optimizer)
    model(**batch()).loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    expected = torch.nn.utils.get_total_norm(grads)
    assert torch.allclose(clipper.clip_grad_norm_(model.parameters(), 1.0), expected, rtol=1e-6)
    buffer = model.hf_model.get_input_embeddings().weight.grad
    untouched = next(row for row in range(buffer.shape[0]) if not buffer[row].any())
    buffer.data[untouched] = 100.0  # unseen by the version counter: proves only written rows are read
    assert torch.allclose(clipper.clip_grad_norm_(model.parameters(), 1.0), expected, rtol=1e-6)
    buffer.mul_(1.0)  # a visible in-place write: every row is read again
    assert clipper.clip_grad_norm_(model.parameters(), 1.0) > 100.0


def test_default_rules_and_errors():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    fused = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], fused=True)
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    assert use_clip_in_step(None, "manual", cpu, False, fused, 1.0)
    assert not use_clip_in_step(None, "manual", cuda, False, fused, 1.0)
    assert not use_clip_in_step(None, "manual", cpu, False, fused, None)  # no clipping to fold
    assert not use_clip_in_step(None, "accelerate", cpu, False, fused, 1.0)
    assert not use_clip_in_step(None, "manual", cpu, True, fused, 1.0)
    assert not use_clip_in_step(None, "manual", cpu, False, plain, 1.0)
    assert use_clip_in_step(True, "manual", cuda, False, fused, 1.0)
    assert not use_clip_in_step(False, "manual", cpu, False, fused, 1.0)
    for args, message in [
        (("accelerate", cpu, False, fused), "the accelerate backend clips through its own accelerator"),
        (("manual", cpu, True, fused), "fp16's gradient scaler owns the optimizer's grad_scale"),
        (("manual", cpu, False, plain), "AdamW is not a fused optimizer with a grad_scale"),
    ]:
        with pytest.raises(EngineError, match=r"trainer.clip_in_step=true: " + message):
            use_clip_in_step(True, *args, 1.0)
    with pytest.raises(EngineError, match="AdamW: its step takes no grad_scale"):
        StepScaleClipper(plain)


def test_training_with_the_fold_equals_training_without(make_cfg, tmp_path):
    # max_grad_norm 0.05: every step of the tiny model clips (its gradient norms are 0.3-0.5)
    common = (*TINY, "trainer.epochs=2", "trainer.max_grad_norm=0.05", "optim.fused=true")
    train(make_cfg(*common, "trainer.clip_in_step=true", output_dir=tmp_path / "fold"))
    train(make_cfg(*common, "trainer.clip_in_step=false", output_dir=tmp_path / "clip"))
    logs = {run: (tmp_path / run / "train.log").read_text() for run in ("fold", "clip")}
    assert "gradient clipping inside the fused optimizer step" in logs["fold"]
    assert "gradient clipping inside" not in logs["clip"]

    assert_same_training(tmp_path / "fold", tmp_path / "clip", evaluations=2)
