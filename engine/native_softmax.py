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
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from engine import native_masks
from engine.errors import EngineError
from engine.fast_dropout import keep_multiplier

SOURCE = Path(__file__).with_name("native") / "softmax.c"
FLAGS = ("-fopenmp", "-lm")
SETTING = "trainer.native_softmax"

_library: ctypes.CDLL | None = None  # the active library; None: ATen's softmax


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
    global _library
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
        raise MemoryError(f"{SETTING}: no memory for a scratch row of {n} floats")


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
