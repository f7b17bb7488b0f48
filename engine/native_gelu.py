"""``trainer.native_gelu``: the feed-forward GELU of bf16 CPU training from tables, forward and backward.

Under bf16 autocast the feed-forward's GELU reads the bf16 output of its linear layer, and a bf16
value is one of 65536: the exact (erf) GELU and its float32 derivative are tabulated once, by ATen,
when the library loads, and ``engine/native/gelu.c`` looks them up (an OpenMP loop on torch's own
thread pool). The forward is ATen's bf16 GELU bit for bit; the backward ``bf16(dy * gelu'(x))``
rounds as ATen's does (equal to ``gelu_backward`` on every element of the tests' tensors). For a
16 x 56 x 1536 MiniLM activation on this project's 2-core CPU, alone: forward 357 -> 238 us,
backward 594 -> 234 us; inside a training step ATen's backward took ~1.2 ms a call (cold caches).

Applies to transformers' ``GELUActivation`` modules whose function is the exact ``F.gelu`` (BERT's
``hidden_act="gelu"``), on contiguous bf16 CPU tensors; anything else (fp32, CUDA, another layout)
runs ``F.gelu`` unchanged. Fused inference still folds the GELU into its linear layer for
evaluation (:mod:`engine.fused_inference` recognises :func:`gelu`). No parameter or ``state_dict``
key changes. Built like :mod:`engine.native_masks`' library, into the same cache.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine import native_masks
from engine.errors import EngineError

SOURCE = Path(__file__).with_name("native") / "gelu.c"
FLAGS = ("-fopenmp",)
SETTING = "trainer.native_gelu"

_library: ctypes.CDLL | None = None  # the active library; None: F.gelu


def bf16_values() -> torch.Tensor:
    """Every bf16 value, at the index of its bits."""
    return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


@functools.cache
def tables() -> tuple[torch.Tensor, torch.Tensor]:
    """ATen's bf16 GELU of every bf16 value (indexed by its bits) and its float32 derivative there;
    made once per process (the load check and the kernels share them)."""
    values = bf16_values()
    return F.gelu(values).contiguous(), torch.ops.aten.gelu_backward(torch.ones(65536), values.float()).contiguous()


def load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    library.engine_gelu_forward.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int]
    library.engine_gelu_forward.restype = None
    library.engine_gelu_backward.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int]
    library.engine_gelu_backward.restype = None
    # A wrong build refuses to load: every bf16 value through the forward against ATen's GELU.
    values, (table, _) = bf16_values(), tables()
    out = torch.empty_like(values)
    library.engine_gelu_forward(values.data_ptr(), out.data_ptr(), table.data_ptr(), 65536, 1)
    if not torch.equal(out.view(torch.int16), table.view(torch.int16)):
        raise EngineError(f"{SETTING}: {path} does not look its table up")
    return library


def use_native_gelu(setting: bool | None, device: torch.device | str = "cpu", compiled: bool = False) -> Path | None:
    """``trainer.native_gelu``: make :func:`gelu` take the library (returned) or ``F.gelu`` (None).
    null: the library for eager CPU runs where it builds."""
    global _library
    path, _library = native_masks.eager_cpu_library(
        setting, device, compiled, SETTING, SOURCE, FLAGS, load, "the GELU stays ATen's"
    )
    return path


def active() -> bool:
    return _library is not None


def _applies(x: torch.Tensor) -> bool:
    return _library is not None and x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.is_contiguous()


def _forward(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    _library.engine_gelu_forward(x.data_ptr(), y.data_ptr(), tables()[0].data_ptr(), x.numel(), torch.get_num_threads())
    return y


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return _forward(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return _backward(grad, x)


def _backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The gradient of the GELU's input ``x`` (contiguous bf16) from ``grad`` of its output."""
    grad = grad.to(torch.bfloat16).contiguous()
    out = torch.empty_like(x)
    _library.engine_gelu_backward(
        grad.data_ptr(), x.data_ptr(), out.data_ptr(), tables()[1].data_ptr(), x.numel(), torch.get_num_threads()
    )
    return out


def gelu(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x)`` (exact), from the tables for contiguous bf16 CPU tensors while the library is on."""
    if not _applies(x):
        return F.gelu(x)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Gelu.apply(x)
    return _forward(x)


def enable_native_gelu(hf_model: nn.Module) -> int:
    """Point every exact-GELU ``GELUActivation`` of ``hf_model`` at :func:`gelu`; returns how many."""
    if _library is None:
        raise EngineError(f"{SETTING} is not enabled (engine.native_gelu.use_native_gelu)")
    swapped = 0
    for module in hf_model.modules():
        if type(module).__name__ == "GELUActivation" and getattr(module, "act", None) is F.gelu:
            module.act = gelu
            swapped += 1
    return swapped
