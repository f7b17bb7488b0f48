"""``trainer.packed_inference``: CPU bf16 evaluation without the padding tokens in the per-token work.

A batch of evaluation rows is padded to its longest row (rounded up to
``data.pad_to_multiple_of``), and every linear layer, LayerNorm, residual add and GELU of
every layer then computes the padding positions too, whose outputs nothing reads. Only
attention mixes positions. Here the encoder keeps the real tokens of the batch as one
``(tokens, hidden)`` matrix and pads only inside attention: the fused query/key/value
product of the packed tokens is scattered into zeroed ``(batch · heads, length, head_size)``
heads, attention runs as :func:`engine.attention.folded_products`, and its output is gathered
back to the packed rows for the output projection. MRPC's dev set, in batches of 64 sorted
by length, has 21723 real tokens in 25024 positions: 13% of the evaluation's matmul work.
With :mod:`engine.first_token`'s last layer, that layer's query, attention output and
feed-forward take the first token of each row only, as they do unpacked.

Each token meets the same products with the same weights (row by row the same arithmetic),
so the logits are the unpacked forward's to float rounding (equal on MRPC dev here).
The encoder's ``last_hidden_state`` holds zeros at padding positions (or, after a
first-token last layer, the first position only, as unpacked); the swap is limited to the
sequence classifiers of :data:`engine.first_token.FIRST_TOKEN_HEADS`, whose heads read the
first position alone. It takes effect only on :func:`engine.fused_inference.fused_path`
(CPU, no autograd, bf16 autocast) with a key-padding mask whose first column is real in
every row; anything else (no padding, other masks, a cache, requested hidden states or
attentions, hooks on the layers) runs the encoder's own forward.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.attention import additive_mask, folded_products
from engine.errors import EngineError
from engine.first_token import FIRST_TOKEN_HEADS, FirstTokenLayer, swap_class
from engine.fused_inference import InferenceFusedQKV, fused_linear, fused_path


class PackedInferenceEncoder(nn.Module):
    """Mixed into a BERT-family encoder class: on the fused path with a padded batch the layers
    compute the real tokens only (see the module docstring); elsewhere the class's own forward runs."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        rows = None if args else padding_rows(hidden_states, attention_mask, kwargs, self.layer)
        if rows is None:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        batch, length, hidden = hidden_states.shape
        flat = rows.reshape(-1).nonzero().squeeze(1)  # the real positions of the flattened batch
        positions = (flat // length, flat % length)  # their (row, position) in the batch
        x = hidden_states.reshape(batch * length, hidden).index_select(0, flat)
        for layer in self.layer:
            x = packed_layer(layer, x, positions, rows, attention_mask)
        if isinstance(self.layer[-1], FirstTokenLayer):
            last = x.view(batch, 1, hidden)  # as the unpacked first-token layer returns it
        else:
            last = x.new_zeros(batch * length, hidden).index_copy_(0, flat, x).view(batch, length, hidden)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=last)


def padding_rows(
    hidden_states: torch.Tensor, mask: torch.Tensor | None, kwargs: dict, layers: nn.ModuleList
) -> torch.Tensor | None:
    """The ``(batch, length)`` real-token mask where the packed forward applies, else None."""
    unsupported = ("encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values", "use_cache")
    if (
        mask is None  # no padding (or a mask kind left to the encoder): nothing to drop
        or mask.dtype != torch.bool
        or mask.shape != (hidden_states.shape[0], 1, hidden_states.shape[1], hidden_states.shape[1])
        or any(kwargs.get(name) for name in unsupported)
        or any(v for k, v in kwargs.items() if k.startswith("output_"))
        or not fused_path(hidden_states)
        or any(_hooked(module) for layer in layers for module in layer.modules())
    ):
        return None
    rows = mask[:, 0, 0, :]
    # A key-padding mask: every query row the same, the first position real in every row.
    if not bool(rows[:, 0].all()) or not torch.equal(mask, rows[:, None, None, :].expand_as(mask)):
        return None
    return rows


def _hooked(module: nn.Module) -> bool:
    """Hooks would see packed tensors (transformers records hidden states and attentions by hooks)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def packed_layer(
    layer: nn.Module,
    x: torch.Tensor,
    positions: tuple[torch.Tensor, torch.Tensor],
    rows: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """One BERT-layout layer over the packed tokens ``x`` ``(tokens, hidden)``, at ``positions``
    (row and position indices) of the batch's ``rows`` ``(batch, length)``: attention padded to the
    batch, all else per token. A first-token layer returns ``(batch, hidden)``."""
    attention = layer.attention.self
    batch, length = rows.shape
    heads, size = attention.num_attention_heads, attention.attention_head_size
    weight, bias = attention.qkv_bf16_parameters()  # query, key and value weights stacked, in that order
    width = heads * size
    first = isinstance(layer, FirstTokenLayer)
    if first:  # keys and values for every token, the query for the first ones (row offsets) only
        lengths = rows.sum(1)
        starts = lengths.cumsum(0) - lengths
        residual = x.index_select(0, starts)
        query_weight, weight = weight[:width], weight[width:]
        query_bias, bias = (None, None) if bias is None else (bias[:width], bias[width:])
        query = fused_linear(residual, query_weight, query_bias).view(batch * heads, 1, size)
    else:
        residual = x
    projected = fused_linear(x, weight, bias)  # (tokens, [3 or 2] * heads * size)
    parts = projected.shape[1] // width
    # Scatter into zeroed heads: padded keys get a zero value (their weight is 0; zeros keep 0 * value finite).
    padded = projected.new_zeros(parts, batch, heads, length, size)
    padded.permute(1, 3, 0, 2, 4)[positions] = projected.view(-1, parts, heads, size)
    padded = padded.view(parts, batch * heads, length, size)
    key, value = padded[-2], padded[-1]
    scores_bias = additive_mask(mask, (batch, heads, length, length), padded.dtype)
    if first:
        out = folded_products(query, key, value, scores_bias[:, :1], attention.scaling)
        context = out.view(batch, width)
    else:
        out = folded_products(padded[0], key, value, scores_bias, attention.scaling)
        context = out.view(batch, heads, length, size).permute(0, 2, 1, 3)[positions].reshape(-1, width)
    return layer.feed_forward_chunk(layer.attention.output(context, residual))


def packable_encoder(hf_model: nn.Module) -> nn.Module | None:
    """The encoder of a :data:`FIRST_TOKEN_HEADS` classifier whose every layer has the BERT layout
    and a fused query/key/value self-attention (:func:`engine.fused_inference.enable_fused_inference`), else None."""
    base = getattr(hf_model, FIRST_TOKEN_HEADS.get(type(hf_model).__name__, ""), None)
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None)
    config = getattr(hf_model, "config", None)
    if not layers or getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return None
    for layer in layers:
        attention = getattr(getattr(layer, "attention", None), "self", None)
        if not (
            isinstance(attention, InferenceFusedQKV)
            and hasattr(layer.attention, "output")
            and hasattr(layer, "feed_forward_chunk")
            and hasattr(attention, "num_attention_heads")
        ):
            return None
    return encoder


def use_packed_inference(setting: bool | None, fused: bool, hf_model: nn.Module) -> bool:
    """``trainer.packed_inference``: null means on wherever fused inference is on and the model is
    supported; true elsewhere is an error naming why."""
    supported = fused and packable_encoder(hf_model) is not None
    if setting and not supported:
        why = (
            "needs trainer.fused_inference (CPU bf16 evaluation)"
            if not fused
            else f"{type(hf_model).__name__} is not a BERT-family sequence classifier with fused query/key/value "
            f"attention ({', '.join(FIRST_TOKEN_HEADS)})"
        )
        raise EngineError(f"trainer.packed_inference=true: {why}; use null or false")
    return supported if setting is None else bool(setting)


def enable_packed_inference(hf_model: nn.Module) -> nn.Module:
    """Swap the encoder's class for the packed one, in place; returns the encoder."""
    missing = f"{type(hf_model).__name__}: no encoder the packed evaluation supports"
    return swap_class(packable_encoder(hf_model), PackedInferenceEncoder, "Packed", missing)
