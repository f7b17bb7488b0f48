"""``trainer.native_attention``: the whole bf16 CPU training attention in the softmax library, bit for bit
the ATen products around the library's softmax that it replaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import native_masks, native_softmax
from engine.attention import folded_attention
from engine.errors import EngineError
from engine.fast_dropout import keep_bits, keep_multiplier
from tests.conftest import native_on_and_off, needs_cc

pytestmark = needs_cc


@pytest.fixture
def library():
    native_softmax.use_native_softmax(True)
    if not native_softmax.fused_attention():
        pytest.skip("this CPU's bf16 products are not the library's (no AVX-512 BF16, or another kernel)")
    return native_softmax._library


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int16)


def attention_run(fused: bool, batch: int, heads: int, n: int, d: int, mask: str, seed: int = 0, grad_layout="plain"):
    """Query, key and value as views of linear-layer outputs ``(batch, n, heads * d)``, as transformers hands
    them over; returns the output, the three inputs' gradients and a draw of the generator after."""
    generator = torch.Generator().manual_seed(seed)
    layouts = [
        torch.randn(batch, n, heads * d, generator=generator)
        .to(torch.bfloat16)
        .view(batch, n, heads, d)
        .transpose(1, 2)
        for _ in range(3)
    ]
    leaves = [t.detach().requires_grad_() for t in layouts]
    attention_mask = None
    if mask == "bool":  # SDPA's padding mask: True = attend; row b masks its last b keys
        attention_mask = torch.ones(batch, 1, n, n, dtype=torch.bool)
        for b in range(batch):
            attention_mask[b, ..., n - b % n :] = b == 0
    elif mask == "float":  # an additive float mask, any values
        attention_mask = torch.randn(batch, 1, 1, n, generator=generator)
    grad = torch.randn(batch, n, heads, d, generator=generator).to(torch.bfloat16)
    if grad_layout == "strided":  # a gradient that is not contiguous
        grad = torch.randn(batch, n, d, heads, generator=generator).to(torch.bfloat16).transpose(2, 3)
    applies = native_softmax.attention_applies
    try:
        if not fused:
            native_softmax.attention_applies = lambda *args: False
        torch.manual_seed(seed + 100)
        out = folded_attention(*leaves, attention_mask, d**-0.5, dropout=0.1)
        after = torch.rand(3)
    finally:
        native_softmax.attention_applies = applies
    grads = torch.autograd.grad(out, leaves, grad)
    return out, grads, after


SHAPES = [
    (4, 12, 56, 32, "bool"),  # MiniLM's heads at an MRPC length
    (3, 4, 57, 32, "bool"),  # odd length: products over a padded last pair
    (2, 3, 9, 8, "float"),
    (2, 2, 1, 8, "none"),  # one token; no mask: bmm, then the scale on its bf16 output
    (2, 12, 130, 64, "none"),  # BERT-base heads, rows over 8 vectors
    (1, 2, 17, 34, "bool"),  # a head dim that is not a multiple of 16
]


@pytest.mark.parametrize("batch, heads, n, d, mask", SHAPES)
@pytest.mark.parametrize("masks", ["native", "torch"])
def test_the_whole_attention_is_atens_bit_for_bit(library, batch, heads, n, d, mask, masks):
    """Output and the query's, key's and value's gradients equal to the last bit, with the dropout mask
    from either generator, and the generator left where the ATen path leaves it."""
    if masks == "native":
        native_masks.use_native_masks(True, True)
    ours = attention_run(True, batch, heads, n, d, mask)
    reference = attention_run(False, batch, heads, n, d, mask)
    assert torch.equal(bits(ours[0]), bits(reference[0]))
    for mine, theirs in zip(ours[1], reference[1], strict=True):
        assert torch.equal(bits(mine), bits(theirs))
    assert torch.equal(ours[2], reference[2])
    assert ours[0].grad_fn.name().endswith("_AttentionBackward")
    assert reference[0].grad_fn.name() != ours[0].grad_fn.name()
    # the gradients keep the linear layers' layout: no copies on the way back to them
    assert all(g.transpose(1, 2).is_contiguous() for g in ours[1])


def test_a_strided_output_gradient_and_one_or_two_threads(library):
    reference = attention_run(False, 2, 4, 33, 32, "bool", grad_layout="strided")
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            ours = attention_run(True, 2, 4, 33, 32, "bool", grad_layout="strided")
            assert all(
                torch.equal(bits(a), bits(b))
                for a, b in zip((ours[0], *ours[1]), (reference[0], *reference[1]), strict=True)
            )
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("masks", ["native", "torch"])
@pytest.mark.parametrize("numel", [1, 255, 256, 1000, 12 * 57 * 57])
def test_keep_bits_are_the_keep_multiplier_mask_packed(masks, numel):
    if masks == "native":
        native_masks.use_native_masks(True, True)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):  # a thread's chunk starts on a byte of the packed mask
            torch.set_num_threads(count)
            torch.manual_seed(7)
            packed = keep_bits(numel, 0.1)
            after = torch.rand(1)
            torch.manual_seed(7)
            keep = keep_multiplier((numel,), 0.1, torch.bfloat16)
            assert torch.equal(torch.rand(1), after)
            expected = np.packbits(keep.float().numpy() > 0, bitorder="little")
            assert np.array_equal(packed.numpy()[: len(expected)], expected)
            assert packed.numel() == len(expected) + 8 and not packed[len(expected) :].any()
    finally:
        torch.set_num_threads(threads)


def test_inputs_it_does_not_take_keep_the_aten_products(library):
    q = torch.zeros(2, 2, 8, 8, dtype=torch.bfloat16)
    assert native_softmax.attention_applies(q, q, q)
    assert not native_softmax.attention_applies(q.float(), q.float(), q.float())
    assert not native_softmax.attention_applies(q[:, :, :1], q, q)  # one query row (first-token layer)
    odd = torch.zeros(2, 2, 8, 7, dtype=torch.bfloat16)
    assert not native_softmax.attention_applies(odd, odd, odd)  # pairs of the head dim
    strided = torch.zeros(2, 8, 2, 9, dtype=torch.bfloat16)[..., :8].transpose(1, 2)
    assert not native_softmax.attention_applies(strided, strided, strided)  # odd strides: no whole pairs
    with torch.no_grad():  # evaluation keeps the folded path with the library's softmax alone
        out = folded_attention(q, q, q, None, 8**-0.5, dropout=0.1)
        assert out.grad_fn is None


def test_the_setting(monkeypatch):
    native_softmax.use_native_softmax(False)
    assert native_softmax.use_native_attention(None) is False
    with pytest.raises(
        EngineError, match="trainer.native_attention=true .* trainer.native_softmax's library, which is off"
    ):
        native_softmax.use_native_attention(True)
    native_softmax.use_native_softmax(True)
    assert native_softmax.use_native_attention(False) is False
    q = torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16)
    assert not native_softmax.attention_applies(q, q, q)
    # where the library's products would not be torch's, null keeps ATen's and true is an error
    monkeypatch.setattr(native_softmax, "_attention_matches", lambda: False)
    monkeypatch.setattr(native_softmax, "_fused", {})
    if native_softmax._library.engine_attention_available():
        assert native_softmax.use_native_attention(None) is False
        with pytest.raises(EngineError, match="products differ from torch's bf16 products"):
            native_softmax.use_native_attention(True)
    else:
        with pytest.raises(EngineError, match="no AVX-512 BF16 dot products"):
            native_softmax.use_native_attention(True)


def test_a_bf16_training_run_is_the_same_with_it_and_without(library, make_cfg, tmp_path):
    """On by default for bf16 CPU training; logged; the losses equal to the last bit."""
    runs = native_on_and_off(
        make_cfg,
        tmp_path,
        "native_attention",
        "native training attention: products, softmax and dropout per head",
        "trainer.mixed_precision=bf16",
    )
    assert len(runs["null"]) == len(runs["false"]) == 8
    assert runs["null"] == runs["false"]


def test_the_first_use_check_runs_under_inference_mode_too(monkeypatch):
    """Whoever first asks (an evaluation under inference mode, say) gets the check's answer, not an error."""
    native_softmax.use_native_softmax(True)
    monkeypatch.setattr(native_softmax, "_fused", {})
    expected = native_softmax.fused_attention()
    native_softmax._fused.clear()
    with torch.inference_mode():
        assert native_softmax.fused_attention() == expected
