"""``trainer.native_softmax``: the attention softmax (and its dropout) in one compiled pass.

In the engine's bf16 CPU attention (:func:`engine.attention.folded_products`) the softmax over
each row of scores, then fast dropout's mask, were two ATen passes, and ATen's bf16 CPU softmax
takes a row's elements past the last multiple of 32 one at a time (MRPC's rows are 40-100
long): for MiniLM's 16 x 12 x 56 x 56 weights on this project's 2-core CPU, softmax and
dropout took ~1.2 ms of a layer's forward. ``engine/native/softmax.c`` does both in one
pass per row with AVX-512 (a plain-C path elsewhere), and the backward likewise: the dropout
gradient and the softmax gradient in one pass.

The arithmetic is that of the ATen passes it replaces: float32 inside, bf16 out (round to
nearest even), the dropout applied to the rounded softmax and its gradient rounded before the
softmax gradient; only ``exp`` differs (a Cephes-style polynomial within 2 float32 ulps of
ATen's), so an element differs from ATen's by at most one bf16 rounding step, and rarely.
The masks are fast dropout's (:func:`engine.fast_dropout.keep_multiplier`), drawn as before.

Used for contiguous bf16 CPU scores only (bf16 autocast training, bf16 evaluation); anything
else keeps ATen's softmax. Built like :mod:`engine.native_masks`' library, into the same cache.
The AVX-512 path takes 4 rows side by side (each row's arithmetic unchanged, their dependency
chains overlapped): 192 x 56 rows of 56 on 2 threads, forward with dropout 224 -> 140 us,
backward 120 -> 93 us.

``trainer.native_attention`` (:func:`attention_dropout`): the whole training attention in this
library, per head in one call each way: q k^T with the scale and the mask, the softmax and its
dropout, the product with v, and backward the four gradient products around the softmax
gradient. The products sum pairs of bf16 products in k order from zero with the AVX-512 BF16 dot
instruction, as the oneDNN kernels behind ``torch.bmm`` do on such a CPU, so the results are
ATen's bit for bit (checked on a small problem when first used; ATen's products stay where they
differ). The operands stay in the linear layers' layout (no heads' layout copies either way),
each head's operands stay in cache between its products, and the dropout mask is read as bits
(:func:`engine.fast_dropout.keep_bits`, the same draw). One MiniLM layer's attention (16 x 12
heads of 32, forward and backward from a q/k/v projection output, 2 threads, this project's
CPU): 1.29 -> 1.05 ms at 56 tokens, 2.43 -> 1.81 ms at 80; in a training step (profiled, 16
steps, two runs each way) the time outside the linear layers' products 47.9 / 49.4 -> 44.6 /
47.0 ms.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from engine import native_masks
from engine.errors import EngineError
from engine.fast_dropout import keep_bits, keep_multiplier, pack_bits

SOURCE = Path(__file__).with_name("native") / "softmax.c"
FLAGS = ("-fopenmp", "-lm")
SETTING = "trainer.native_softmax"

_library: ctypes.CDLL | None = None  # the active library; None: ATen's softmax
_attention_setting: bool | None = None  # trainer.native_attention; False: ATen's products around the softmax


def load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    for function in (library.engine_softmax_forward, library.engine_softmax_backward):
        function.argtypes = [ctypes.c_void_p] * 4 + [
            ctypes.c_float,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int,
            ctypes.c_int,
        ]
        function.restype = ctypes.c_int
    library.engine_softmax_avx512.argtypes = []
    library.engine_softmax_avx512.restype = ctypes.c_int
    pointer, real = ctypes.c_void_p, ctypes.c_float
    library.engine_attention_available.argtypes = []
    library.engine_attention_available.restype = ctypes.c_int
    library.engine_attention_forward.argtypes = [pointer] * 8 + [pointer, real, real, ctypes.c_int]
    library.engine_attention_forward.restype = ctypes.c_int
    library.engine_attention_backward.argtypes = [pointer] * 11 + [pointer, real, real, ctypes.c_int]
    library.engine_attention_backward.restype = ctypes.c_int
    # A wrong build refuses to load: one row against ATen's softmax.
    scores = torch.linspace(-4, 4, 37).to(torch.bfloat16)
    weights = torch.empty_like(scores)
    library.engine_softmax_forward(scores.data_ptr(), weights.data_ptr(), None, None, 1.0, 1, 37, 1, 0)
    if not torch.allclose(weights.float(), torch.softmax(scores, -1).float(), rtol=1e-2, atol=1e-5):
        raise EngineError(f"{SETTING}: {path} computes a wrong softmax: {weights.tolist()}")
    return library


def use_native_softmax(setting: bool | None, device: torch.device | str = "cpu", compiled: bool = False) -> Path | None:
    """``trainer.native_softmax``: make this process's bf16 CPU attention softmax come from the
    library (returned) or from ATen (None). null: the library for eager CPU runs where it builds
    (a compiled graph makes its own kernels; CUDA attention never takes the engine's CPU path)."""
    global _library, _attention_setting
    _attention_setting = None  # trainer.native_attention's default until use_native_attention says otherwise
    path, _library = native_masks.eager_cpu_library(
        setting, device, compiled, SETTING, SOURCE, FLAGS, load, "the attention softmax stays ATen's"
    )
    return path


def active() -> bool:
    return _library is not None


def kernel_path() -> str:
    """Which of the library's kernels this CPU runs: "AVX-512" or "plain C"."""
    return "AVX-512" if _library_or_error().engine_softmax_avx512() else "plain C"


def applies(scores: torch.Tensor) -> bool:
    """Whether :func:`softmax` / :func:`softmax_dropout` take these scores (the library is on, and they
    are contiguous bf16 CPU rows)."""
    return (
        _library is not None
        and scores.dtype == torch.bfloat16
        and scores.device.type == "cpu"
        and scores.is_contiguous()
        and scores.numel() > 0
    )


def _run(
    function,
    first: torch.Tensor,
    second: torch.Tensor,
    keep: torch.Tensor | None,
    third: torch.Tensor | None,
    scale: float,
    generic: bool,
) -> None:
    """The library's forward ``(x, y, keep, z)`` or backward ``(dz, y, keep, dx)`` over the rows of
    ``second``'s last dimension, on torch's intra-op thread count."""
    n = second.shape[-1]
    failed = function(
        first.data_ptr(),
        second.data_ptr(),
        None if keep is None else keep.data_ptr(),
        None if third is None else third.data_ptr(),
        scale,
        second.numel() // n,
        n,
        torch.get_num_threads(),
        int(generic),
    )
    if failed:
        raise MemoryError(f"{SETTING}: no memory for scratch rows of {n} floats")


def _library_or_error() -> ctypes.CDLL:
    if _library is None:
        raise EngineError(f"{SETTING} is not enabled (engine.native_softmax.use_native_softmax)")
    return _library


def softmax(scores: torch.Tensor, generic: bool = False) -> torch.Tensor:
    """``torch.softmax(scores, -1)`` for :func:`applies` scores, without autograd (evaluation)."""
    weights = torch.empty_like(scores)
    _run(_library_or_error().engine_softmax_forward, scores, weights, None, None, 1.0, generic)
    return weights


class _SoftmaxDropout(torch.autograd.Function):
    """``dropout(softmax(scores, -1))`` with a given 0/1 mask: one pass forward, one backward;
    saves the softmax and the mask, as the two ATen passes did."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, keep: torch.Tensor, scale: float, generic: bool) -> torch.Tensor:
        weights, dropped = torch.empty_like(scores), torch.empty_like(scores)
        _run(_library_or_error().engine_softmax_forward, scores, weights, keep, dropped, scale, generic)
        ctx.save_for_backward(weights, keep)
        ctx.scale, ctx.generic = scale, generic
        return dropped

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weights, keep = ctx.saved_tensors
        grad = grad.to(torch.bfloat16).contiguous()
        scores_grad = torch.empty_like(weights)
        _run(_library_or_error().engine_softmax_backward, grad, weights, keep, scores_grad, ctx.scale, ctx.generic)
        return scores_grad, None, None, None


def softmax_dropout(scores: torch.Tensor, p: float, generic: bool = False) -> torch.Tensor:
    """``fast_dropout(torch.softmax(scores, -1), p)`` for :func:`applies` scores and 0 < p < 1, with
    the same mask draw (one :func:`engine.fast_dropout.keep_multiplier` call)."""
    _library_or_error()
    keep = keep_multiplier(scores.shape, p, scores.dtype, scores.device)
    return _SoftmaxDropout.apply(scores, keep, 1.0 / (1.0 - p), generic)


# ---- the whole training attention -------------------------------------------------------------

_fused: dict[int, bool] = {}  # id(library) -> whether its attention matches ATen's here (checked once)


def use_native_attention(setting: bool | None) -> bool:
    """``trainer.native_attention``: whether the training attention runs whole in the library
    (:func:`fused_attention`). null: where it can; true: an error naming why where it cannot."""
    global _attention_setting
    _attention_setting = setting
    if setting is False:
        return False
    if setting and _library is None:
        raise EngineError("trainer.native_attention=true runs in trainer.native_softmax's library, which is off")
    on = fused_attention()
    if setting and not on:
        why = (
            "this CPU has no AVX-512 BF16 dot products"
            if _library is not None and not _library.engine_attention_available()
            else "its products differ from torch's bf16 products on this CPU"
        )
        raise EngineError(f"trainer.native_attention=true: the library's attention cannot be used: {why}")
    return on


def fused_attention() -> bool:
    """Whether :func:`attention_dropout` runs: the library is on, this CPU has the AVX-512 BF16 dot
    products, and the library's attention equals ATen's (products, softmax, dropout; forward and
    backward, with and without a mask) bit for bit on a small random problem, checked once.

    The check is what makes the path safe to choose: the library sums products as oneDNN's AVX-512
    BF16 kernels do. Where torch's bf16 products come from another kernel (AMX, or float32 on a CPU
    without bf16 dot products) the sums round differently, and the engine keeps ATen's products."""
    if _library is None or _attention_setting is False:
        return False
    key = id(_library)
    if key not in _fused:
        with torch.inference_mode(False), torch.enable_grad():  # the check differentiates, wherever first asked
            _fused[key] = bool(_library.engine_attention_available()) and _attention_matches()
    return _fused[key]


def attention_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether :func:`attention_dropout` takes these ``(batch, heads, length, head dim)`` inputs: bf16
    CPU self-attention (one length) with an even head dim at unit stride and even other strides."""
    return (
        query.dtype == key.dtype == value.dtype == torch.bfloat16
        and query.device.type == "cpu"
        and query.shape == key.shape == value.shape
        and query.shape[-1] % 2 == 0
        and query.numel() > 0
        and all(
            t.stride(-1) == 1 and all(s % 2 == 0 for s in t.stride()[:3]) and t.data_ptr() % 4 == 0
            for t in (query, key, value)
        )
        and fused_attention()
    )


def _strides(*tensors: torch.Tensor | None) -> torch.Tensor:
    """The batch, head and position strides of each ``(batch, heads, length, ...)`` tensor (0s for None)."""
    return torch.tensor(
        [s for t in tensors for s in (t.stride()[:3] if t is not None else (0, 0, 0))], dtype=torch.int64
    )


def _check(failed: int) -> None:
    if failed == -2:
        raise EngineError(f"{SETTING}: this CPU has no AVX-512 BF16 dot products for the library's attention")
    if failed:
        raise MemoryError(f"{SETTING}: no memory for the attention's per-thread scratch")


def attention_forward(q, k, v, bias, keep, alpha: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`_Attention`'s forward as one library call: the output ``(batch, length, heads, head dim)``
    and the dropped softmax weights its backward reads, for ``(batch, heads, length, head dim)`` inputs."""
    batch, heads, n, d = q.shape
    weights = q.new_empty((batch * heads, n, n))
    out = q.new_empty((batch, n, heads, d))
    shape = torch.tensor([batch, heads, n, d], dtype=torch.int64)
    strides = _strides(q, k, v, bias)
    ptr = None if bias is None else bias.data_ptr()
    args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), strides.data_ptr(), ptr, keep.data_ptr(), weights.data_ptr())
    _check(
        _library_or_error().engine_attention_forward(
            *args, out.data_ptr(), shape.data_ptr(), alpha, scale, torch.get_num_threads()
        )
    )
    return out, weights


def attention_backward(q, k, v, bias, keep, weights, grad, alpha: float, scale: float):
    """:class:`_Attention`'s backward as one library call: the gradients of ``q``, ``k`` and ``v``, each
    ``(batch, length, heads, head dim)`` (contiguous), from ``grad`` of the output in that shape."""
    batch, heads, n, d = q.shape
    grad = grad.to(torch.bfloat16)
    if grad.stride(-1) != 1 or any(s % 2 for s in grad.stride()) or grad.data_ptr() % 4:
        grad = grad.contiguous()
    dq, dk, dv = (q.new_empty((batch, n, heads, d)) for _ in range(3))
    strides = torch.cat([_strides(q, k, v, bias), _strides(grad.transpose(1, 2))])
    shape = torch.tensor([batch, heads, n, d], dtype=torch.int64)
    ptr = None if bias is None else bias.data_ptr()
    args = (
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        strides.data_ptr(),
        ptr,
        keep.data_ptr(),
        weights.data_ptr(),
        grad.data_ptr(),
    )
    outs = (dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), shape.data_ptr())
    _check(_library_or_error().engine_attention_backward(*args, *outs, alpha, scale, torch.get_num_threads()))
    return dq, dk, dv


class _Attention(torch.autograd.Function):
    """``bmm(dropout(softmax(baddbmm(bias, q, k^T, alpha=alpha))), v)`` (``bmm(q, k^T).mul_(alpha)``
    without a bias) per head in one library call each way; saves the inputs, the softmax and the mask."""

    @staticmethod
    def forward(ctx, q, k, v, bias, keep, alpha: float, scale: float):
        out, weights = attention_forward(q, k, v, bias, keep, alpha, scale)
        ctx.save_for_backward(q, k, v, bias, keep, weights)
        ctx.alpha, ctx.scale = alpha, scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dq, dk, dv = attention_backward(*ctx.saved_tensors, grad, ctx.alpha, ctx.scale)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None, None, None


def attention_dropout(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None, alpha: float, p: float
) -> torch.Tensor:
    """The engine's training attention (:func:`engine.attention.folded_products` with softmax dropout
    ``p``, 0 < p < 1) for :func:`attention_applies` inputs ``(batch, heads, length, head dim)``; ``bias``
    an additive bf16 mask broadcast to ``(batch, heads, length, length)`` (unit last stride) or None.
    The same mask as :func:`softmax_dropout` draws for the folded scores, as bits
    (:func:`engine.fast_dropout.keep_bits`). Returns ``(batch, length, heads, head dim)``, contiguous."""
    batch, heads, n, _ = query.shape
    keep = keep_bits(batch * heads * n * n, p)
    return _Attention.apply(query, key, value, library_bias(bias), keep, alpha, 1.0 / (1.0 - p))


def library_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """An additive attention bias as the library reads it: unit last stride, 2-byte aligned (a copy
    only where it is not)."""
    if bias is not None and (bias.stride(-1) != 1 or bias.data_ptr() % 2):
        return bias.contiguous()
    return bias


def _attention_matches() -> bool:
    """The library's attention against ATen's products around :class:`_SoftmaxDropout`: outputs and
    the three inputs' gradients bit for bit, for a 2 x 2-head problem of odd length, with a padding
    mask and without one."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, n, d, p = 2, 2, 9, 8, 0.25
    alpha = d**-0.5

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(torch.bfloat16)

    kept = torch.rand(batch * heads, n, n, generator=generator) > p
    keep = kept.to(torch.bfloat16)
    bits = pack_bits(kept.numpy())
    pad = torch.zeros(batch, 1, 1, n, dtype=torch.bfloat16)
    pad[1, ..., n - 3 :] = torch.finfo(torch.bfloat16).min
    grad = rand(batch, n, heads, d)
    for bias in (pad.expand(batch, heads, n, n), None):
        layouts = [
            rand(batch, n, heads * d).view(batch, n, heads, d).transpose(1, 2).requires_grad_() for _ in range(3)
        ]
        q, k, v = layouts
        out = _Attention.apply(q, k, v, bias, bits, alpha, 1.0 / (1.0 - p))
        mine = (out, *torch.autograd.grad(out, layouts, grad))
        q2, k2, v2 = (t.detach().reshape(batch * heads, n, d).requires_grad_() for t in layouts)
        kt = k2.transpose(1, 2)
        if bias is None:
            scores = torch.bmm(q2, kt) * alpha
        else:
            scores = torch.baddbmm(bias.reshape(batch * heads, n, n), q2, kt, alpha=alpha)
        aten = torch.bmm(_SoftmaxDropout.apply(scores, keep, 1.0 / (1.0 - p), False), v2)
        aten = aten.view(batch, heads, n, d).transpose(1, 2)
        grads = torch.autograd.grad(aten, (q2, k2, v2), grad)
        theirs = (aten, *(g.view(batch, heads, n, d) for g in grads))
        if not all(
            torch.equal(a.view(torch.int16), b.contiguous().view(torch.int16))
            for a, b in zip(mine, theirs, strict=True)
        ):
            return False
    return True
