"""The engine's CPU attention: one batched computation for dropout training and bf16 inference.

transformers calls an attention function by the name in ``config._attn_implementation``.
Two names are registered here, both SDPA except where the engine's own kernel applies:

* ``sdpa_fast_dropout`` (``trainer.fast_dropout``): CPU training with attention dropout.
  SDPA's CPU math kernel would draw one Bernoulli sample per attention weight; here the
  mask is :func:`engine.fast_dropout.keep_mask`'s packed one.
* ``sdpa_bf16_inference`` (``trainer.fused_inference`` without fast dropout): only the
  inference path below.

Either name also takes CPU bf16 inference (no autograd, bf16 autocast) for modules that
:func:`mark_inference_attention` marked: at MRPC's lengths (40-90 tokens, 12 heads of 32)
CPU SDPA's flash kernel, blocked for long sequences, is 25-45% slower than
:func:`folded_attention` (ten interleaved MRPC dev evaluations: median 239 -> 253 samples/s).

:func:`folded_attention` computes as autocast's eager attention does: both products in the
inputs' precision (bf16 under bf16 autocast) with heads folded into the batch, the scale
and the mask inside the first product (``baddbmm``), the softmax accumulated in float32
with its output in the inputs' precision. Against a float32-throughout version (as SDPA's
CPU math kernel treats bf16 inputs) that is 8% off a whole MiniLM training step here
(interleaved A/B, 297 -> 274 ms) with losses equal to the third decimal; the scores are
rounded to bf16 before the softmax, as in any bf16 eager attention.

In CPU bf16 training with dropout, ``trainer.native_attention`` hands :func:`folded_attention`'s
inputs, in the linear layers' layout, to :func:`engine.native_softmax.attention_dropout`, which
computes the same bits per head in one library call each way.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from engine import native_softmax
from engine.fast_dropout import fast_dropout
from engine.fused_inference import fused_path

FAST_DROPOUT_ATTENTION = "sdpa_fast_dropout"
INFERENCE_ATTENTION = "sdpa_bf16_inference"


_LAST_BIAS: list[tuple[weakref.ref, tuple[int, int, int, int], torch.dtype, int | None, bool, torch.Tensor]] = []


def additive_mask(
    mask: torch.Tensor | None, shape: tuple[int, int, int, int], dtype: torch.dtype = torch.float32, fold: bool = True
) -> torch.Tensor | None:
    """SDPA's ``attn_mask`` (bool, True = attend, or additive float; broadcastable to ``shape``
    = batch, heads, query length, key length) as a ``(batch * heads, q, k)`` bias in ``dtype``
    (``fold`` false: the bias broadcast to ``shape``, a view).

    Every layer of a forward gets the same mask tensor: the bias made for it is kept (one, for as
    long as that tensor lives unchanged) and handed to the next layer instead of being rebuilt."""
    if mask is None:
        return None
    version = None if mask.is_inference() else mask._version  # inference tensors keep no version
    if _LAST_BIAS:
        ref, last_shape, last_dtype, last_version, last_fold, bias = _LAST_BIAS[0]
        if ref() is mask and (last_shape, last_dtype, last_version, last_fold) == (shape, dtype, version, fold):
            return bias
    bias = _bias(mask, shape, dtype)
    if fold:
        bias = bias.reshape(-1, *shape[2:])  # a copy: heads folded into the batch
    _LAST_BIAS[:] = [(weakref.ref(mask, _forget), shape, dtype, version, fold, bias)]
    return bias


def _forget(ref: weakref.ref) -> None:
    """The mask is gone: so goes its bias (a long batch's bias is large)."""
    if _LAST_BIAS and _LAST_BIAS[0][0] is ref:
        _LAST_BIAS.clear()


def _bias(mask: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        bias.masked_fill_(~mask, torch.finfo(dtype).min)
    else:
        bias = mask.to(dtype)
    return bias.expand(shape)


def folded_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention over ``(batch, heads, length, head_dim)`` inputs with SDPA's mask; the attention
    weights dropped out at ``dropout`` with the packed mask. Returns ``(batch, q_len, heads,
    head_dim)`` (contiguous), as transformers attention functions do."""
    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    if 0.0 < dropout < 1.0 and torch.is_grad_enabled() and native_softmax.attention_applies(query, key, value):
        bias = additive_mask(mask, (batch, heads, q_len, k_len), query.dtype, fold=False)
        return native_softmax.attention_dropout(query, key, value, bias, scaling, dropout)
    q = query.reshape(batch * heads, q_len, head_dim)
    k = key.to(q.dtype).reshape(batch * heads, k_len, head_dim)
    v = value.to(q.dtype).reshape(batch * heads, k_len, head_dim)
    bias = additive_mask(mask, (batch, heads, q_len, k_len), q.dtype)
    out = folded_products(q, k, v, bias, scaling, dropout)
    return out.view(batch, heads, q_len, head_dim).transpose(1, 2).contiguous()


def folded_products(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """:func:`folded_attention`'s arithmetic on heads folded into the batch: ``q`` ``(n, q_len, d)``,
    ``k`` and ``v`` ``(n, k_len, d)``, ``bias`` ``(n, q_len, k_len)`` or None; returns ``(n, q_len, d)``."""
    with torch.autocast(q.device.type, enabled=False):  # the inputs' dtype is the compute dtype
        k = k.transpose(1, 2)
        scores = torch.bmm(q, k).mul_(scaling) if bias is None else torch.baddbmm(bias, q, k, alpha=scaling)
        native = native_softmax.applies(scores)
        if native and 0.0 < dropout < 1.0:
            weights = native_softmax.softmax_dropout(scores, dropout)  # one pass each way, same mask draw
        elif native and dropout == 0.0 and not scores.requires_grad:  # scores made under no_grad never require it
            weights = native_softmax.softmax(scores)
        else:
            weights = fast_dropout(F.softmax(scores, dim=-1), dropout)  # float32 accumulation inside
        return torch.bmm(weights, v)


def sdpa_fast_dropout_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    dropout_training: bool = True,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``sdpa_fast_dropout``: SDPA, except CPU training with attention dropout (packed mask) and
    marked modules' CPU bf16 inference, both :func:`folded_attention`. With ``dropout_training``
    false (``sdpa_bf16_inference``) training attention is SDPA's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    own_kernel = not (
        query.device.type != "cpu"
        or is_causal
        or getattr(module, "is_causal", False)
        or key.shape[1] != query.shape[1]  # grouped-query heads: SDPA expands them
        or kwargs.get("position_bias") is not None
    )
    scale = query.size(-1) ** -0.5 if scaling is None else scaling
    if own_kernel and getattr(module, "bf16_inference_attention", False) and fused_path(query):
        return folded_attention(query, key, value, attention_mask, scale), None
    if own_kernel and dropout_training and module.training and dropout > 0.0:
        return folded_attention(query, key, value, attention_mask, scale, dropout), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


# ``sdpa_bf16_inference``: SDPA, except marked modules' CPU bf16 inference (:func:`folded_attention`).
sdpa_bf16_inference_attention = functools.partial(sdpa_fast_dropout_attention, dropout_training=False)


def use_engine_attention(hf_model: nn.Module, name: str) -> bool:
    """Register ``name`` (one of the two above, with SDPA's masks) and switch an SDPA model to it.
    The fast-dropout name also replaces the inference-only one; returns whether the model uses ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    functions = {
        FAST_DROPOUT_ATTENTION: sdpa_fast_dropout_attention,
        INFERENCE_ATTENTION: sdpa_bf16_inference_attention,
    }
    config = getattr(hf_model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    replaceable = {"sdpa", INFERENCE_ATTENTION} if name == FAST_DROPOUT_ATTENTION else {"sdpa"}
    if current in replaceable:
        AttentionInterface.register(name, functions[name])
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
        hf_model.set_attn_implementation(name)
    return getattr(config, "_attn_implementation", None) == name


def mark_inference_attention(hf_model: nn.Module) -> int:
    """Mark ``hf_model``'s bidirectional attention modules for :func:`folded_attention` in CPU bf16
    inference and make sure an SDPA model calls the engine's attention; returns how many it marked."""
    config = getattr(hf_model, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", INFERENCE_ATTENTION, FAST_DROPOUT_ATTENTION):
        return 0  # eager or another kernel: left as it is
    marked = 0
    for module in hf_model.modules():
        if getattr(module, "is_causal", None) is False:  # transformers' attention modules
            module.bf16_inference_attention = True
            marked += 1
    use_engine_attention(hf_model, INFERENCE_ATTENTION)  # no-op where fast dropout's already is
    return marked
