"""``speedups.fast_dropout``: dropout masks at a quarter of the random draws, for CPU training.

On the CPU, ``nn.Dropout`` draws one Bernoulli sample per element through the mt19937
generator, and SDPA with dropout falls back to its math kernel with one draw per attention
weight; in bf16 MiniLM training on a 2-core CPU those draws are a large share of a step.
Here one 64-bit draw gives four 16-bit lanes, each kept when it lies at or above the drop
threshold, so a mask costs a quarter of the draws. The drop rate is rounded to a multiple of
1/65536 (p=0.1 drops 6554/65536 = 0.100006). The 0/1 mask is kept in the input's dtype and
applied forward and backward by one ``addcmul`` (scaled in float32, as ``nn.Dropout`` does).

Masks come from torch's default CPU generator, so ``seed`` and resumed runs reproduce them.
Attention dropout runs through ``sdpa_fast_dropout``, registered with transformers'
``AttentionInterface``: in CPU training with dropout it computes both products with heads
folded into the batch and drops the softmax's output with the packed mask; everywhere else
(evaluation, CUDA, no dropout) it is transformers' SDPA function. No parameter or
``state_dict`` key changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION = "sdpa_fast_dropout"
_LANES = 65536  # values of one 16-bit lane


def drop_threshold(p: float) -> int:
    """Lanes below this (as signed int16) are dropped: ``round(p * 65536)`` of the 65536 values."""
    return -32768 + round(p * _LANES)


def keep_lanes(lanes: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """``lanes >= drop_threshold(p)`` (int16 lanes) as 0/1 in ``dtype``."""
    threshold = drop_threshold(p)
    if -32768 < threshold <= 32767:
        # in int16: clamp to threshold - 1 (dropped) or threshold (kept), then shift down to 0 or 1
        return lanes.clamp(threshold - 1, threshold).sub_(threshold - 1).to(dtype)
    # p = 0 or 1: the threshold lies outside int16; the same 0/1 through float32
    return lanes.float().sub_(threshold - 1).clamp_(0, 1).to(dtype)


def keep_multiplier(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A CPU ``dtype`` tensor of ``shape``: each element 0 with probability ``round(p * 65536) / 65536``, else 1."""
    numel = 1
    for size in shape:
        numel *= size
    words = torch.empty((numel + 3) // 4, dtype=torch.int64)
    words.random_(-(2**63), None)  # every bit uniform: four uniform int16 lanes per word
    return keep_lanes(words.view(torch.int16)[:numel].view(shape), p, dtype)


class _ApplyMask(torch.autograd.Function):
    """``x * keep * scale`` forward and ``grad * keep * scale`` backward, one ``addcmul`` each."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.addcmul(x.new_zeros(()), x, keep, value=scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.addcmul(grad.new_zeros(()), grad, keep, value=ctx.scale), None, None


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the packed mask on CPU tensors; other devices use ``F.dropout``."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    return _ApplyMask.apply(x, keep_multiplier(x.shape, p, x.dtype), 1.0 / (1.0 - p))


class FastDropout(nn.Dropout):
    """An ``nn.Dropout`` (same ``p``, same ``repr``) whose mask is :func:`keep_multiplier`'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:  # nn.Dropout(inplace=True) callers expect x itself back
            return F.dropout(x, self.p, self.training, inplace=True)
        return fast_dropout(x, self.p, self.training)


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """``sdpa_fast_dropout``: transformers' SDPA, except bidirectional CPU training with attention
    dropout, where the softmax's output is dropped with the packed mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    own = (
        query.device.type == "cpu"
        and module.training
        and 0.0 < dropout < 1.0
        and not (is_causal or getattr(module, "is_causal", False))
        and key.shape[1] == query.shape[1]  # grouped-query heads: SDPA expands them
    )
    if not own:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    scale = head_dim**-0.5 if scaling is None else scaling
    q = query.reshape(batch * heads, q_len, head_dim)
    k = key.to(q.dtype).reshape(batch * heads, k_len, head_dim).transpose(1, 2)
    v = value.to(q.dtype).reshape(batch * heads, k_len, head_dim)
    with torch.autocast("cpu", enabled=False):  # the inputs' dtype (bf16 under autocast) is the compute dtype
        if attention_mask is None:
            scores = torch.bmm(q, k).mul_(scale)
        else:
            bias = attention_mask
            if bias.dtype == torch.bool:  # SDPA's mask: True = attend
                bias = torch.zeros(bias.shape, dtype=q.dtype).masked_fill_(~bias, torch.finfo(q.dtype).min)
            bias = bias.to(q.dtype).expand(batch, heads, q_len, k_len).reshape(-1, q_len, k_len)
            scores = torch.baddbmm(bias, q, k, alpha=scale)
        weights = fast_dropout(F.softmax(scores, dim=-1), dropout)  # float32 accumulation inside
        out = torch.bmm(weights, v)
    return out.view(batch, heads, q_len, head_dim).transpose(1, 2).contiguous(), None


def enable(hf_model: nn.Module) -> int:
    """Swap every ``nn.Dropout`` for :class:`FastDropout` and an SDPA model's attention for
    ``sdpa_fast_dropout``, in place; returns how many dropout modules it swapped."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    swapped = 0
    for parent in hf_model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                replacement = FastDropout(child.p, child.inplace)
                replacement.train(child.training)
                setattr(parent, name, replacement)
                swapped += 1
    if getattr(hf_model.config, "_attn_implementation", None) == "sdpa":
        AttentionInterface.register(ATTENTION, attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
        hf_model.set_attn_implementation(ATTENTION)
    return swapped
