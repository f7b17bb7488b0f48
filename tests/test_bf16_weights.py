"""``trainer.bf16_weights``: linear layers on bf16 copies of float32 masters, stepped by a C AdamW."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine import bf16_weights
from engine.clip_in_step import StepScaleClipper
from engine.errors import EngineError
from tests.conftest import (
    assert_broken_build_refused,
    assert_no_compiler_handled,
    native_library,
    native_on_and_off,
    needs_cc,
)


@pytest.fixture(scope="module")
def library():
    return native_library(bf16_weights)


def model() -> nn.Module:
    """Two linears; the head's 2-element bias is no whole 16-float vector, so it stays on autocast's cast."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 2))


def adamw(net: nn.Module, **options) -> torch.optim.AdamW:
    decay = [p for name, p in net.named_parameters() if name.endswith("weight")]
    no_decay = [p for name, p in net.named_parameters() if name.endswith("bias")]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=3e-3, fused=True, **options)


def pair(library, **options):
    """The reference (float32 weights cast by autocast) and the same model on bf16 copies."""
    reference, ours = model(), model()
    made = [(reference, adamw(reference, **options)), (ours, adamw(ours, **options))]
    copies = bf16_weights.enable_bf16_weights(made[1][1], ours, library, required=True)
    return made, copies


def train_step(net, optimizer, step, scale=None, autocast=True, grads_only=False) -> float:
    generator = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 32, generator=generator), torch.randint(0, 2, (8,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = nn.functional.cross_entropy(net(x).float(), y)
    loss.backward()
    if grads_only:
        return float(loss.detach())
    if scale is not None:
        optimizer.grad_scale = torch.tensor(scale)
    optimizer.step()
    optimizer.__dict__.pop("grad_scale", None)
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def assert_same(made, copies):
    (reference, ref_opt), (ours, our_opt) = made
    for (name, a), b in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b), name
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(ref_opt.state[a][key], our_opt.state[b][key]), (name, key)
    for c in copies.copies:
        assert torch.equal(c.current(), c.master.to(torch.bfloat16))  # cast again only where stale
    assert ref_opt.state_dict()["param_groups"] == our_opt.state_dict()["param_groups"]


@pytest.mark.parametrize(
    ("options", "scale"),
    [({}, None), ({}, 1.7), ({"betas": (0.3, 0.99), "weight_decay": 0.1}, 2.5)],
    ids=["decay", "scaled", "other-lerp-branch-scaled"],
)
def test_the_steps_are_autocasts_float32_weights_under_the_fused_adamw_bit_for_bit(library, options, scale):
    made, copies = pair(library, **options)
    assert copies.parameters == 32 * 48 + 48 + 48 * 2  # not the head's 2-element bias
    assert isinstance(made[1][0][0], bf16_weights.Bf16WeightsLinear)
    for step in range(6):
        losses = [train_step(net, optimizer, step, scale) for net, optimizer in made]
        assert losses[0] == losses[1]
        assert_same(made, copies)
    assert all(c.tensor.grad is None for c in copies.copies)


def test_a_layer_that_sits_out_steps_counts_fewer_and_still_steps_bit_for_bit(library):
    """A linear left out of some forwards has no gradient there: neither optimizer counts those steps
    for it, so one group holds copies of two step counts (one library call each); the steps where
    the pending copies change, and the ones after, equal the fused AdamW's."""
    nets = [model(), model()]
    for net in nets:
        torch.manual_seed(1)
        net.insert(2, nn.Linear(48, 48))  # the middle layer: used on even steps only
    made = [(net, adamw(net)) for net in nets]
    copies = bf16_weights.enable_bf16_weights(made[1][1], made[1][0], library, required=True)
    for step in range(7):
        for net, optimizer in made:
            generator = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 32, generator=generator), torch.randint(0, 2, (8,), generator=generator)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = net[1](net[0](x))
                h = net[2](h) if step % 2 == 0 else h
                loss = nn.functional.cross_entropy(net[3](h).float(), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert_same(made, copies)
    counts = {float(made[1][1].state[c.master]["step"]) for c in copies.copies}
    assert counts == {4.0, 7.0}


def test_a_tied_weight_stays_on_autocasts_cast(library):
    """A weight two modules share gets its gradients added in float32, so it gets no bf16 copy."""
    net = model()
    net.append(nn.Linear(32, 48))
    net[3].weight = net[0].weight  # tied
    optimizer = adamw(net)
    copies = bf16_weights.enable_bf16_weights(optimizer, net, library, required=True)
    assert all(c.master is not net[0].weight for c in copies.copies)
    assert {id(c.master) for c in copies.copies} == {id(net[0].bias), id(net[2].weight), id(net[3].bias)}


def test_the_clippers_norm_counts_the_copies_gradients(library):
    made, copies = pair(library)
    (reference, _), (ours, our_opt) = made
    clipper = StepScaleClipper(our_opt)
    clipper.other_norm = copies.norm
    for net, optimizer in made:
        train_step(net, optimizer, 0, grads_only=True)
    assert all(c.master.grad is None for c in copies.copies) and ours[2].bias.grad is not None
    expected = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
    norm = clipper.clip_grad_norm_(ours.parameters(), 0.5)
    assert float(norm) == pytest.approx(float(expected), rel=1e-6)
    assert float(our_opt.grad_scale) == pytest.approx(float(expected + 1e-6) / 0.5, rel=1e-6)
    copies.copies[0].tensor.grad[0, 0] = float("nan")
    assert not torch.isfinite(clipper.clip_grad_norm_(ours.parameters(), 0.5))
    our_opt.zero_grad(set_to_none=True)  # a skipped step: the copies' gradients go too
    assert all(c.tensor.grad is None for c in copies.copies) and copies.norm() is None


def test_a_resumed_state_continues_bit_for_bit(library):
    """``load_state_dict`` into the masters and the optimizer (a resume) mid-run: the copies are cast
    again from the loaded masters, and the run goes on as one that never stopped."""
    made, copies = pair(library)
    (reference, ref_opt), (ours, our_opt) = made
    for step in range(3):
        for net, optimizer in made:
            train_step(net, optimizer, step)
    saved = copy.deepcopy((ours.state_dict(), our_opt.state_dict()))
    for step in range(3, 5):  # steps the resumed run redoes
        train_step(ours, our_opt, step)
    ours.load_state_dict(saved[0])
    our_opt.load_state_dict(saved[1])
    for step in range(3, 6):
        for net, optimizer in made:
            train_step(net, optimizer, step)
        assert_same(made, copies)


def test_float32_and_evaluation_forwards_use_the_masters(library, monkeypatch):
    made, copies = pair(library)
    (reference, ref_opt), (ours, our_opt) = made
    for net, optimizer in made:  # no autocast: float32 gradients on the masters, the fused step's
        train_step(net, optimizer, 0, autocast=False)
    assert_same(made, copies)  # and the copies were cast again after it
    for step in (1, 2):
        for net, optimizer in made:
            train_step(net, optimizer, step)
        assert_same(made, copies)
    monkeypatch.setattr(bf16_weights.Bf16Copy, "current", lambda self: pytest.fail("a copy in evaluation"))
    x = torch.randn(4, 32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ours(x), reference(x))
    with pytest.raises(EngineError, match="both a float32 and a bf16 gradient"):
        monkeypatch.undo()
        train_step(ours, our_opt, 3, grads_only=True)
        train_step(ours, our_opt, 3, autocast=False)


@needs_cc
def test_a_training_run_on_bf16_copies_gives_the_same_losses_and_checkpoint(make_cfg, tmp_path):
    """On by default for CPU bf16 training, logged; the same step losses and the same float32
    checkpoint (the gradient norm is summed in double: equal here, float rounding at most)."""
    runs = native_on_and_off(
        make_cfg, tmp_path, "bf16_weights", "linear layers on bf16 copies", "trainer.mixed_precision=bf16"
    )
    assert len(runs["null"]) == 8 and runs["null"] == pytest.approx(runs["false"], rel=1e-6)
    on, off = (torch.load(tmp_path / v / "best_acc_classify.pth") for v in ("null", "false"))
    assert on.keys() == off.keys()
    for key in on:
        assert on[key].dtype == off[key].dtype and torch.allclose(on[key], off[key], rtol=0, atol=1e-6), key


def test_defaults_and_errors(monkeypatch, tmp_path, caplog):
    weight = nn.Parameter(torch.zeros(4, 4))
    fused = torch.optim.AdamW([weight], fused=True)
    ok = (fused, "cpu", "manual", True, 1, False, True)
    assert bf16_weights.why_not(*ok) is None
    assert bf16_weights.use_bf16_weights(False, *ok) == (None, None)
    for index, value, why in [
        (1, "cuda", "it steps CPU tensors"),
        (2, "accelerate", "the accelerate backend reduces"),
        (3, False, "not under bf16 autocast"),
        (0, torch.optim.AdamW([weight]), "without fused=True"),
        (0, torch.optim.AdamW([weight], fused=True, amsgrad=True), "amsgrad"),
        (4, 2, "accumulating micro-batches"),
        (5, True, "compiled graph"),
        (6, False, "trainer.clip_in_step, which is off"),
    ]:
        conditions = list(ok)
        conditions[index] = value
        assert bf16_weights.use_bf16_weights(None, *conditions) == (None, None)
        with pytest.raises(EngineError, match=f"trainer.bf16_weights=true: .*{why}"):
            bf16_weights.use_bf16_weights(True, *conditions)
    with pytest.raises(EngineError, match="no trainable float32 nn.Linear"):
        bf16_weights.enable_bf16_weights(fused, nn.Embedding(3, 16), None, required=True)
    assert bf16_weights.enable_bf16_weights(fused, nn.Embedding(3, 16), None) is None
    assert_no_compiler_handled(
        monkeypatch,
        tmp_path,
        caplog,
        lambda setting: bf16_weights.use_bf16_weights(setting, *ok),
        "trainer.bf16_weights",
        "the linears cast under autocast",
    )


def test_a_library_that_steps_differently_refuses_to_load(tmp_path):
    assert_broken_build_refused(
        bf16_weights,
        "w16[start + j] = float_to_bf16(p[j]);",
        "w16[start + j] = (uint16_t)(float_to_bf16(p[j]) + 1);",
        tmp_path,
        "does not step as torch's fused AdamW",
    )
