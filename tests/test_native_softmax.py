"""``trainer.native_softmax``: the compiled attention softmax, with its dropout, forward and backward."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine import native_masks, native_softmax
from engine.attention import folded_products
from engine.errors import EngineError
from engine.fast_dropout import _ApplyMask, keep_multiplier
from tests.conftest import native_on_and_off, needs_cc

LENGTHS = [1, 7, 16, 17, 56, 100, 257]  # within one 16-lane vector, at and across its edges, long rows
PATHS = [False, True]  # the AVX-512 path (where the CPU has it), the plain-C one


@pytest.fixture
def native():
    path = native_softmax.use_native_softmax(True)
    assert path is not None and native_softmax.active()
    return path


def scores(rows: int, n: int, seed: int = 0, masked_tail: int = 0) -> torch.Tensor:
    """bf16 attention scores; the last ``masked_tail`` keys of each row carry the padding bias."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=generator) * 4
    if masked_tail:
        x[:, n - masked_tail :] = torch.finfo(torch.bfloat16).min
    return x.to(torch.bfloat16)


def assert_bf16_close(actual: torch.Tensor, expected: torch.Tensor, identical: float = 0.99) -> None:
    """Within one bf16 step (at most 2^-7 relative; 1e-6 for values near 0) everywhere, and
    bit-identical for at least the ``identical`` share of the elements."""
    assert actual.dtype == expected.dtype == torch.bfloat16 and actual.shape == expected.shape
    a, e = actual.float(), expected.float()
    assert torch.all((a - e).abs() <= e.abs() * 2**-7 + 1e-6), (a - e).abs().max()
    assert (actual == expected).float().mean().item() >= identical


@needs_cc
@pytest.mark.parametrize("generic", PATHS)
@pytest.mark.parametrize("n", LENGTHS)
def test_the_softmax_is_atens_to_the_last_bf16_bit(native, n, generic):
    x = scores(300, n, masked_tail=n // 3)
    weights = native_softmax.softmax(x, generic=generic)
    assert_bf16_close(weights, torch.softmax(x, -1))
    if n > 1:
        assert torch.all(weights[:, n - n // 3 :] == 0)  # padding keys get exactly nothing, as in ATen


@needs_cc
@pytest.mark.parametrize("generic", PATHS)
@pytest.mark.parametrize("n", LENGTHS)
def test_softmax_dropout_forward_and_backward_match_the_aten_passes(native, n, generic):
    """Against ATen's softmax then fast dropout's ``_ApplyMask`` with the same 0/1 mask: the dropped
    weights, and the gradient to the scores (the dropout gradient rounded to bf16 first)."""
    p = 0.1
    x = scores(240, n, seed=n, masked_tail=n // 4).requires_grad_()
    keep = keep_multiplier(x.shape, p, torch.bfloat16)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)

    ours = native_softmax._SoftmaxDropout.apply(x, keep, 1 / (1 - p), generic)
    (ours_grad,) = torch.autograd.grad(ours, x, grad)
    reference = _ApplyMask.apply(torch.softmax(x, -1), keep, 1 / (1 - p))
    (reference_grad,) = torch.autograd.grad(reference, x, grad)

    assert_bf16_close(ours.detach(), reference.detach())
    assert torch.all(ours[keep == 0] == 0)
    # the gradient sums a row's products in another order: within a few bf16 steps of the row's scale
    scale = reference_grad.float().abs().amax(-1, keepdim=True) + 1e-6
    assert torch.all((ours_grad.float() - reference_grad.float()).abs() <= scale * 2**-6)
    assert (ours_grad == reference_grad).float().mean().item() >= 0.9


@needs_cc
def test_both_threads_and_one_give_the_same_bits(native):
    x = scores(4096, 56, masked_tail=9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = native_softmax.softmax(x)
        torch.set_num_threads(2)
        assert torch.equal(native_softmax.softmax(x), single)
    finally:
        torch.set_num_threads(threads)


@needs_cc
@pytest.mark.parametrize("generic", PATHS)
def test_nan_and_inf_scores_give_nan_rows_as_atens_do(native, generic):
    x = scores(4, 40)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    weights = native_softmax.softmax(x, generic=generic)
    reference = torch.softmax(x, -1)
    assert torch.isnan(weights[1]).all() and torch.isnan(reference[1]).all()
    assert torch.isnan(weights[2]).any() and torch.isnan(reference[2]).any()
    assert_bf16_close(weights[[0, 3]], reference[[0, 3]])


@needs_cc
def test_attention_takes_the_native_path_with_the_same_mask_draw(native):
    """:func:`folded_products` in training: the library's autograd node, one mask draw as before
    (so the generator is left where the ATen path leaves it), and the same result."""
    q, k, v = (torch.randn(24, 56, 32, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16) for i in range(3))
    q.requires_grad_()
    bias = torch.zeros(24, 56, 56, dtype=torch.bfloat16)
    bias[:, :, 50:] = torch.finfo(torch.bfloat16).min

    torch.manual_seed(5)
    ours = folded_products(q, k, v, bias, 32**-0.5, dropout=0.1)
    after_ours = torch.rand(1)
    library = native_softmax._library
    native_softmax._library = None
    torch.manual_seed(5)
    reference = folded_products(q, k, v, bias, 32**-0.5, dropout=0.1)
    after_reference = torch.rand(1)
    native_softmax._library = library

    assert type(ours.grad_fn.next_functions[0][0]).__name__ == "_SoftmaxDropoutBackward"
    assert torch.equal(after_ours, after_reference)
    assert (ours.float() - reference.float()).abs().max().item() < 0.05  # bf16 products of near-equal weights
    with torch.inference_mode():  # evaluation: the softmax alone, no autograd node
        inference = folded_products(q.detach(), k, v, bias, 32**-0.5)
        assert_bf16_close(
            inference, F.softmax(torch.baddbmm(bias, q.detach(), k.transpose(1, 2), alpha=32**-0.5), -1) @ v, 0.9
        )


@needs_cc
def test_the_avx512_path_is_used_where_the_cpu_has_it(native):
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    has = all(f" {flag}" in flags for flag in ("avx512f", "avx512bw", "avx512vl"))
    assert native_softmax.kernel_path() == ("AVX-512" if has else "plain C")


@needs_cc
def test_other_dtypes_and_layouts_keep_atens_softmax(native):
    assert native_softmax.applies(scores(2, 8))
    assert not native_softmax.applies(scores(2, 8).float())
    assert not native_softmax.applies(scores(2, 8).t())
    assert not native_softmax.applies(scores(0, 8))


def test_defaults_where_it_applies_and_errors(monkeypatch, tmp_path, caplog):
    assert native_softmax.use_native_softmax(False) is None and not native_softmax.active()
    assert native_softmax.use_native_softmax(None, "cuda") is None  # CUDA attention never takes the CPU path
    assert native_softmax.use_native_softmax(None, "cpu", compiled=True) is None
    with pytest.raises(EngineError, match="trainer.native_softmax is not enabled"):
        native_softmax.softmax(scores(2, 8))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing cached there
    with pytest.raises(EngineError, match="trainer.native_softmax: could not run the C compiler .*no-such-cc"):
        native_softmax.use_native_softmax(True)
    assert native_softmax.use_native_softmax(None) is None and not native_softmax.active()
    assert "the attention softmax stays ATen's" in caplog.text


def test_the_library_builds_beside_the_masks_library(monkeypatch, tmp_path):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = native_softmax.use_native_softmax(True)
    assert path.parent == native_masks.cache_dir() and path.name.startswith("softmax-")
    assert native_softmax.use_native_softmax(True) == path  # built once, then reused


@needs_cc
def test_a_training_run_uses_the_native_softmax(make_cfg, tmp_path):
    """On by default on the CPU; logged; the run trains as with ATen's softmax (same masks: the
    losses agree to bf16 rounding)."""
    runs = native_on_and_off(
        make_cfg, tmp_path, "native_softmax", "native attention softmax (with its dropout in training, "
    )
    assert len(runs["null"]) == len(runs["false"]) == 8
    np.testing.assert_allclose(runs["null"], runs["false"], rtol=0.02)
