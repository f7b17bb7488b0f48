"""``trainer.fast_dropout``: dropout masks at a quarter of the random draws, for CPU training.

On the CPU, ``torch.nn.Dropout`` draws one Bernoulli sample per element through the
mt19937 generator; a profile of bf16 MiniLM training on this project's 2-core CPU puts
those draws at ~16% of the step. Here one 64-bit draw gives four 16-bit lanes, each kept
when it lies at or above the drop threshold, so the mask costs a quarter of the draws,
and the kept elements are scaled by ``1 / (1 - p)`` in one pass, as in ``nn.Dropout``.
The drop rate is rounded to a multiple of 1/65536 (p=0.1 drops 6554/65536 = 0.100006).

Masks come from torch's default CPU generator, so ``seed`` and resumed runs reproduce
them. Attention-probability dropout has its own path: with dropout on, CPU SDPA takes its
math kernel (one Bernoulli draw per attention weight, plus a masked-row check); the
``sdpa_fast_dropout`` attention does the same arithmetic (in float32, as that kernel does
for bf16 inputs) with the packed mask and falls back to SDPA wherever dropout is off
(evaluation, prediction; ``trainer.fused_inference`` routes CPU bf16 evaluation through it
too, see :mod:`engine.fused_inference`). With ``model.attn_implementation=eager`` only the ``nn.Dropout``
modules are swapped. Neither changes a
parameter or a ``state_dict`` key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.fused_inference import FAST_DROPOUT_ATTENTION, INFERENCE_ATTENTION, bf16_inference_attention

ATTENTION_NAME = FAST_DROPOUT_ATTENTION
_LANES = 65536  # values of one 16-bit lane


def drop_threshold(p: float) -> int:
    """Lanes below this (as signed int16) are dropped: ``round(p * 65536)`` of the 65536 values."""
    return -32768 + round(p * _LANES)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A bool tensor of ``shape``, each element False with probability ``round(p * 65536) / 65536``."""
    numel = 1
    for size in shape:
        numel *= size
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None)  # every bit uniform: four uniform int16 lanes per word
    return words.view(torch.int16)[:numel].view(shape) >= drop_threshold(p)


class _ApplyMask(torch.autograd.Function):
    """``x * keep * scale`` forward and ``grad * keep * scale`` backward; saves only the bool mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.ops.aten.native_dropout_backward(x, keep, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.ops.aten.native_dropout_backward(grad, keep, ctx.scale), None, None


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the packed mask on CPU tensors; other devices use ``F.dropout``."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    return _ApplyMask.apply(x, keep_mask(x.shape, p, x.device), 1.0 / (1.0 - p))


class FastDropout(nn.Dropout):
    """An ``nn.Dropout`` (same ``p``, same ``repr`` fields) whose mask is drawn by :func:`keep_mask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:  # nn.Dropout(inplace=True) callers expect x itself back
            return F.dropout(x, self.p, self.training, inplace=True)
        return fast_dropout(x, self.p, self.training)


def sdpa_fast_dropout_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: SDPA, except CPU attention dropout with the packed mask
    and, for modules that :func:`engine.fused_inference.enable_fused_inference` marked, CPU bf16
    inference in batched bf16 matmuls (:func:`engine.fused_inference.inference_attention`).

    Query, key and value are ``(batch, heads, length, head_dim)``; the mask is SDPA's
    (bool, True = attend, or additive float, or None). Returns ``(batch, length, heads,
    head_dim)`` like every transformers attention function.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    inference = bf16_inference_attention(module, query, key, value, attention_mask, scaling, is_causal, **kwargs)
    if inference is not None:  # trainer.fused_inference: a marked module in CPU bf16 inference
        return inference, None
    plain = (
        dropout == 0.0
        or not module.training
        or query.device.type != "cpu"
        or is_causal
        or getattr(module, "is_causal", False)
        or key.shape[1] != query.shape[1]  # grouped-query heads: SDPA expands them
        or kwargs.get("position_bias") is not None
    )
    if plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    # In float32 throughout, as SDPA's CPU math kernel computes bf16/fp16 inputs: under bf16
    # autocast the scores would otherwise be rounded to bf16 (~0.4%, 0.05-0.1 on typical logits)
    # before the softmax. Heads are folded into the batch so that each product is one batched
    # call and the scale and mask ride in it (baddbmm), which is ~25% off attention's
    # forward and backward here against matmul, scale, mask and transpose as separate passes.
    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    to_float = {"dtype": torch.float32, "memory_format": torch.contiguous_format}
    with torch.autocast("cpu", enabled=False):
        q = query.to(**to_float).reshape(batch * heads, q_len, head_dim)
        k = key.to(**to_float).reshape(batch * heads, k_len, head_dim)
        v = value.to(**to_float).reshape(batch * heads, k_len, head_dim)
        bias = additive_mask(attention_mask, (batch, heads, q_len, k_len))
        if bias is None:
            scores = torch.bmm(q, k.transpose(1, 2)).mul_(scaling)
        else:
            scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scaling)
        weights = fast_dropout(F.softmax(scores, dim=-1), dropout)
        out = torch.bmm(weights, v).view(batch, heads, q_len, head_dim).transpose(1, 2)
    return out.to(dtype=query.dtype, memory_format=torch.contiguous_format).contiguous(), None


def additive_mask(mask: torch.Tensor | None, shape: tuple[int, int, int, int]) -> torch.Tensor | None:
    """SDPA's ``attn_mask`` (bool, True = attend, or additive float; broadcastable to ``shape``
    = batch, heads, query length, key length) as a float32 ``(batch * heads, q, k)`` bias."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        bias.masked_fill_(~mask, torch.finfo(torch.float32).min)
    else:
        bias = mask.float()
    batch, heads, q_len, k_len = shape
    return bias.expand(shape).reshape(batch * heads, q_len, k_len)


def register_attention() -> None:
    """Make ``sdpa_fast_dropout`` a transformers attention implementation (with SDPA's masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, sdpa_fast_dropout_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


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
    config = getattr(hf_model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) in ("sdpa", INFERENCE_ATTENTION):
        register_attention()
        hf_model.set_attn_implementation(ATTENTION_NAME)
    return swapped
