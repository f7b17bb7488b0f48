"""``trainer.fast_dropout``: dropout masks at a quarter of the random draws, for CPU training.

On the CPU, ``torch.nn.Dropout`` draws one Bernoulli sample per element through the
mt19937 generator; a profile of bf16 MiniLM training on this project's 2-core CPU puts
those draws at ~16% of the step. Here one 64-bit draw gives four 16-bit lanes, each kept
when it lies at or above the drop threshold, so the mask costs a quarter of the draws,
and the kept elements are scaled by ``1 / (1 - p)`` in one pass, as in ``nn.Dropout``.
The drop rate is rounded to a multiple of 1/65536 (p=0.1 drops 6554/65536 = 0.100006).

The mask is kept as 0/1 in the input's dtype, not as bool: on this CPU a product with a
bool mask (``native_dropout_backward``, ``where``) converts it element by element at ~8x the
cost of a vectorised product (357 vs 54 us for a 16 x 56 x 384 bf16 tensor), and the
comparison that makes a bool mask is itself slow (117 us); the 0/1 mask is made from the
lanes by int16 arithmetic (54 us; 82 us through float32, where the lanes are converted first)
and applied, forward and backward, by one ``addcmul``
that scales in float32 as ``nn.Dropout`` does, so the values equal ``native_dropout_backward``'s.

Masks come from torch's default CPU generator, so ``seed`` and resumed runs reproduce
them; with ``trainer.native_masks`` (:mod:`engine.native_masks`) a compiled counter-based
generator, keyed by one draw from that generator per mask, makes them in one pass instead.

Attention-probability dropout has its own path: with dropout on, CPU SDPA takes its math
kernel (one Bernoulli draw per attention weight, plus a masked-row check); the
``sdpa_fast_dropout`` attention (:mod:`engine.attention`) uses the packed mask instead and
SDPA wherever dropout is off (evaluation, prediction). With ``model.attn_implementation=eager``
only the ``nn.Dropout`` modules are swapped. Neither changes a parameter or a ``state_dict`` key.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine import native_masks

_LANES = 65536  # values of one 16-bit lane


def drop_threshold(p: float) -> int:
    """Lanes below this (as signed int16) are dropped: ``round(p * 65536)`` of the 65536 values."""
    return -32768 + round(p * _LANES)


def keep_multiplier(
    shape: torch.Size | tuple[int, ...],
    p: float,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A ``dtype`` tensor of ``shape``: each element 0 with probability ``round(p * 65536) / 65536``, else 1
    (from the compiled generator where ``trainer.native_masks`` enabled it, :mod:`engine.native_masks`)."""
    if native_masks.active() and torch.device(device).type == "cpu" and native_masks.supports(dtype):
        return native_masks.keep_multiplier(shape, round(p * _LANES), dtype)
    numel = 1
    for size in shape:
        numel *= size
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None)  # every bit uniform: four uniform int16 lanes per word
    return keep_lanes(words.view(torch.int16)[:numel].view(shape), p, dtype)


def keep_bits(numel: int, p: float) -> torch.Tensor:
    """:func:`keep_multiplier`'s draw for ``numel`` CPU elements (the same generator calls, the same
    mask) as packed bits: bit ``i % 8`` of byte ``i // 8`` set where element ``i`` is kept; a uint8
    tensor with 8 zero bytes past the mask's bytes."""
    if native_masks.active():
        return native_masks.keep_bits(numel, round(p * _LANES))
    return pack_bits(keep_multiplier((numel,), p, torch.float32).bool().numpy())


def pack_bits(kept: np.ndarray) -> torch.Tensor:
    """A bool array (True = kept) in :func:`keep_bits`' form: packed bits, then 8 zero bytes."""
    return torch.from_numpy(np.concatenate([np.packbits(kept.reshape(-1), bitorder="little"), np.zeros(8, np.uint8)]))


def keep_lanes(lanes: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """``lanes >= drop_threshold(p)`` (int16 lanes) as 0/1 in ``dtype``."""
    threshold = drop_threshold(p)
    if -32768 < threshold <= 32767:
        # in int16 (half of float32's bytes per pass): lanes clamp to threshold - 1 (dropped)
        # or threshold (kept), then shift down to 0 or 1
        return lanes.clamp(threshold - 1, threshold).sub_(threshold - 1).to(dtype)
    # p = 0 or 1: the threshold lies outside int16; the same 0/1 through float32 (exact: |lane| <= 32768)
    return lanes.float().sub_(threshold - 1).clamp_(0, 1).to(dtype)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`keep_multiplier`'s draw as a bool tensor (True = kept)."""
    return keep_multiplier(shape, p, torch.float32, device).bool()


_ZEROS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A 0-dim zero of ``like``'s dtype and device, made once (``addcmul`` only reads it)."""
    key = (like.dtype, like.device)
    zero = _ZEROS.get(key)
    if zero is None:
        with torch.inference_mode(False):  # a normal tensor, also when first made under inference mode
            zero = _ZEROS[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return zero


class _ApplyMask(torch.autograd.Function):
    """``x * keep * scale`` forward and ``grad * keep * scale`` backward in one pass each (the
    product scaled in float32, then rounded to ``x``'s dtype); saves only the 0/1 mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return apply_keep(x, keep, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return apply_keep(grad, keep, ctx.scale), None, None


def apply_keep(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """``x * keep * scale`` in one ``addcmul`` (scaled in float32, rounded to ``x``'s dtype): a 0/1 mask
    applied to an activation forward or to its gradient backward."""
    return torch.addcmul(_zero(x), x, keep, value=scale)


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the packed mask on CPU tensors; other devices use ``F.dropout``."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    return _ApplyMask.apply(x, keep_multiplier(x.shape, p, x.dtype, x.device), 1.0 / (1.0 - p))


class FastDropout(nn.Dropout):
    """An ``nn.Dropout`` (same ``p``, same ``repr`` fields) whose mask is drawn by :func:`keep_mask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:  # nn.Dropout(inplace=True) callers expect x itself back
            return F.dropout(x, self.p, self.training, inplace=True)
        return fast_dropout(x, self.p, self.training)


def use_fast_dropout(setting: bool | None, device: torch.device, compiled: bool = False) -> bool:
    """``trainer.fast_dropout``: null means on for eager CPU training, where the mask draws are
    the cost (CUDA's dropout is one fused kernel; a compiled model draws its masks in its own code)."""
    return device.type == "cpu" and not compiled if setting is None else bool(setting)


def enable_fast_dropout(hf_model: nn.Module) -> int:
    """Swap every ``nn.Dropout`` of ``hf_model`` for :class:`FastDropout` and SDPA attention for
    ``sdpa_fast_dropout``, in place; returns how many dropout modules it swapped."""
    swapped = 0
    for parent in hf_model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                replacement = FastDropout(child.p, child.inplace)
                replacement.train(child.training)
                setattr(parent, name, replacement)
                swapped += 1
    from engine.attention import FAST_DROPOUT_ATTENTION, use_engine_attention

    use_engine_attention(hf_model, FAST_DROPOUT_ATTENTION)
    return swapped
