"""``trainer.fused_layers``: a BERT encoder layer's training forward and backward as one autograd node.

A MiniLM training step on this project's 2-core CPU spends ~60% in the linear layers' oneDNN
products. Through the modules, each layer also makes ~20 module calls and ~60 autograd nodes
(views, transposes, autocast's casts, the linears, dropouts, adds and LayerNorms), and casts its
float32 input to bf16 once for each of the query, key and value products, with three float32
gradients cast back. As one node the layer casts its input once and widens those gradients inside
its float32 adds. Measured (interleaved MRPC steps, every default on): 1.7-6% off a ~95-115 ms
step, and 20.75 -> 19.26 ms for a 1-row, 8-token step, whose cost lies mostly in the operators
themselves rather than in the autograd engine.

Here a whole encoder layer is one :class:`torch.autograd.Function`. Its forward calls the same
kernels as the modules do under bf16 autocast, in the same order, with the same mask draws:

* the query, key and value ``addmm`` on the input cast to bf16, the attention, softmax and dropout
  in the softmax library (:func:`engine.native_softmax.attention_forward`), the attention output's
  ``addmm``, its dropout (:func:`engine.fast_dropout.keep_multiplier`, ``addcmul``), the float32
  residual add and LayerNorm;
* the feed-forward's ``addmm``, the GELU tables (:mod:`engine.native_gelu`), the output ``addmm``,
  dropout, residual add and LayerNorm.

Its backward is autograd's formulas for those nodes written out: ``mm`` for the linears' input and
weight gradients in the layouts autograd uses, ``sum`` over the rows for the biases, the
LayerNorms' ``native_layer_norm_backward``, the library's attention backward, and the float32
gradient sums where a tensor feeds several nodes, added in the order autograd's engine adds them.
So the outputs and every gradient equal the modules' bit for bit (tested), and so do the runs.

Where. CPU training forwards under bf16 autocast whose layer is a plain BERT-style layer (no
cross-attention, no cache, no feed-forward chunking, exact GELU), where everything it calls is on:
fast dropout with 0 < p < 1 at every dropout, the library's whole training attention
(``trainer.native_attention``), the GELU tables (``trainer.native_gelu``) and the linear layers'
bf16 weight copies (``trainer.bf16_weights``). Every other forward is the layer's own.
"""

from __future__ import annotations

import torch
from torch import nn

from engine import native_gelu, native_softmax
from engine.attention import FAST_DROPOUT_ATTENTION, additive_mask
from engine.bf16_weights import training_forward
from engine.errors import EngineError
from engine.fast_dropout import FastDropout, apply_keep, keep_bits, keep_multiplier
from engine.first_token import FirstTokenLayer, swap_class
from engine.fused_inference import FoldedActivation, _is_exact_gelu

SETTING = "trainer.fused_layers"
# Self-attention classes whose arithmetic is the engine's attention: scaled dot products of plain
# query/key/value projections (no relative or rotary positions), as in the first-token heads' models.
SELF_ATTENTION = {
    "BertSelfAttention",
    "RobertaSelfAttention",
    "XLMRobertaSelfAttention",
    "CamembertSelfAttention",
    "ElectraSelfAttention",
}
_BF16 = torch.bfloat16
_OTHER_INPUTS = ("encoder_attention_mask", "cache", "past_key_values", "past_key_value")  # none is fused


class _Plan:
    """What one layer's forward needs besides tensors: sizes, dropout rates, LayerNorm epsilons."""

    __slots__ = ("heads", "alpha", "p_attention", "p_hidden", "p_output", "eps1", "eps2")

    def __init__(self, layer: nn.Module) -> None:
        attention = layer.attention.self
        self.heads = attention.num_attention_heads
        self.alpha = attention.scaling
        self.p_attention = attention.dropout.p
        self.p_hidden = layer.attention.output.dropout.p
        self.p_output = layer.output.dropout.p
        self.eps1 = layer.attention.output.LayerNorm.eps
        self.eps2 = layer.output.LayerNorm.eps


def _linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.linear`` on a 2-D input as ATen computes it: ``addmm(bias, x, weight.t())``."""
    return torch.addmm(bias, x2, weight.t())


def _linear_backward(grad2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor):
    """``AddmmBackward0`` for ``addmm(bias, x2, weight.t())``: the input's, weight's and bias' gradients
    (``grad @ weight``; ``(grad.t() @ x).t().t()``, as ``mm_mat2_backward`` takes a transposed weight;
    the rows' sum, as the engine reduces a broadcast bias' gradient)."""
    return torch.mm(grad2, weight), torch.mm(grad2.t(), x2), grad2.sum(0, keepdim=True).view(grad2.shape[1])


def _input_gradient(residual: torch.Tensor, *casts: torch.Tensor) -> torch.Tensor:
    """The layer input's gradient: its four uses summed in float32 as autograd's engine reaches them, the
    residual first, then the value, key and query casts (the last-made node first). Each bf16 addend
    widens exactly inside the add, as autocast's cast back to float32 does."""
    total = torch.add(residual, casts[0])
    for cast in casts[1:]:
        total += cast
    return total


class _Layer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, bias, plan: _Plan, *params):
        wq, bq, wk, bk, wv, bv, wo, bo, g1, b1, wi, bi, wout, bout, g2, b2 = params
        batch, length, hidden = h.shape
        rows, heads = batch * length, plan.heads
        head_dim = hidden // heads
        with torch.autocast("cpu", enabled=False):
            x = h.to(_BF16).view(rows, hidden)
            q, k, v = (_linear(x, w, b) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
            q4, k4, v4 = (t.view(batch, length, heads, head_dim).transpose(1, 2) for t in (q, k, v))
            p = plan.p_attention
            keep_a = keep_bits(batch * heads * length * length, p)
            scale_a = 1.0 / (1.0 - p)
            out, weights = native_softmax.attention_forward(q4, k4, v4, bias, keep_a, plan.alpha, scale_a)
            c = out.view(rows, hidden)
            keep1 = keep_multiplier((batch, length, hidden), plan.p_hidden, _BF16)
            scale1 = 1.0 / (1.0 - plan.p_hidden)
            s1 = torch.add(apply_keep(_linear(c, wo, bo).view(batch, length, hidden), keep1, scale1), h)
            h1, mean1, rstd1 = torch.native_layer_norm(s1, (hidden,), g1, b1, plan.eps1)
            x1 = h1.to(_BF16).view(rows, hidden)
            i = _linear(x1, wi, bi)
            gelu = native_gelu._forward(i)
            keep2 = keep_multiplier((batch, length, hidden), plan.p_output, _BF16)
            scale2 = 1.0 / (1.0 - plan.p_output)
            s2 = torch.add(apply_keep(_linear(gelu, wout, bout).view(batch, length, hidden), keep2, scale2), h1)
            h2, mean2, rstd2 = torch.native_layer_norm(s2, (hidden,), g2, b2, plan.eps2)
        # the parameters saved too, so that an in-place write before the backward is an error, as for the modules
        ctx.save_for_backward(
            x,
            q4,
            k4,
            v4,
            bias,
            keep_a,
            weights,
            c,
            keep1,
            s1,
            mean1,
            rstd1,
            x1,
            i,
            gelu,
            keep2,
            s2,
            mean2,
            rstd2,
            *params,
        )
        ctx.scales = (plan.alpha, scale_a, scale1, scale2)
        return h2

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        x, q4, k4, v4, bias, keep_a, weights, c, keep1, s1, mean1, rstd1, x1, i, gelu, keep2, s2, mean2, rstd2 = saved[
            :19
        ]
        wq, _, wk, _, wv, _, wo, _, g1, b1, wi, _, wout, _, g2, b2 = saved[19:]
        alpha, scale_a, scale1, scale2 = ctx.scales
        batch, heads, length, head_dim = q4.shape
        rows, hidden = x.shape
        norm = torch.ops.aten.native_layer_norm_backward
        with torch.autocast("cpu", enabled=False):
            ds2, dg2, db2 = norm(grad, s2, (hidden,), mean2, rstd2, g2, b2, (True, True, True))
            do = apply_keep(ds2.to(_BF16), keep2, scale2).view(rows, hidden)
            dgelu, dwout, dbout = _linear_backward(do, gelu, wout)
            di = native_gelu._backward(dgelu, i).view(rows, -1)
            dx1, dwi, dbi = _linear_backward(di, x1, wi)
            # ds2 + dx1.float() in one pass: the bf16 addend widens exactly inside the float32 add
            ds1, dg1, db1 = norm(torch.add(ds2, dx1.view(ds2.shape)), s1, (hidden,), mean1, rstd1, g1, b1, (True,) * 3)
            da = apply_keep(ds1.to(_BF16), keep1, scale1).view(rows, hidden)
            dc, dwo, dbo = _linear_backward(da, c, wo)
            dq, dk, dv = native_softmax.attention_backward(
                q4, k4, v4, bias, keep_a, weights, dc.view(batch, length, heads, head_dim), alpha, scale_a
            )
            dxv, dwv, dbv = _linear_backward(dv.view(rows, hidden), x, wv)
            dxk, dwk, dbk = _linear_backward(dk.view(rows, hidden), x, wk)
            dxq, dwq, dbq = _linear_backward(dq.view(rows, hidden), x, wq)
            dh = _input_gradient(ds1, *(d.view(ds1.shape) for d in (dxv, dxk, dxq)))
        return (dh, None, None, dwq, dbq, dwk, dbk, dwv, dbv, dwo, dbo, dg1, db1, dwi, dbi, dwout, dbout, dg2, db2)


def _copies(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A linear layer's current bf16 weight and bias copies (:mod:`engine.bf16_weights`), or None."""
    copies = linear.__dict__.get("bf16_copies")
    if copies is None or copies[0] is None or copies[1] is None:
        return None
    return copies[0].current(), copies[1].current()


class FusedLayer(nn.Module):
    """Mixed into an encoder layer's class: a training forward it can take runs as one :class:`_Layer`."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, *args, **kwargs):
        params = None
        if encoder_hidden_states is None and not args and all(kwargs.get(k) is None for k in _OTHER_INPUTS):
            params = self._fused_params(hidden_states)
        if params is None:
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, *args, **kwargs)
        plan = _Plan(self)  # read each time, as the modules read their dropout rates
        batch, length, _ = hidden_states.shape
        bias = additive_mask(attention_mask, (batch, plan.heads, length, length), _BF16, fold=False)
        return _Layer.apply(hidden_states, native_softmax.library_bias(bias), plan, *params)

    def _fused_params(self, h: torch.Tensor) -> list[torch.Tensor] | None:
        """The layer's 16 parameters in :class:`_Layer`'s order (the linears' bf16 copies), where this
        forward can be fused; else None."""
        if not (self.training and training_forward(h) and h.dtype == torch.float32 and h.is_contiguous()):
            return None
        attention, out = self.attention, self.output
        if not (
            native_gelu.active()
            and native_softmax.fused_attention()
            and getattr(attention.self.config, "_attn_implementation", None) == FAST_DROPOUT_ATTENTION
        ):
            return None  # the modules' attention is not the engine's (eager, say): theirs runs
        dropouts = (attention.self.dropout, attention.output.dropout, out.dropout)
        if not all(type(d) is FastDropout and d.training and 0.0 < d.p < 1.0 for d in dropouts):
            return None
        hidden = h.shape[-1]
        heads = attention.self.num_attention_heads
        if hidden % heads or (hidden // heads) % 2 or h.numel() == 0:
            return None
        linears = (
            attention.self.query,
            attention.self.key,
            attention.self.value,
            attention.output.dense,
            self.intermediate.dense,
            out.dense,
        )
        copies = [_copies(linear) for linear in linears]
        if any(c is None for c in copies):
            return None
        (wq, bq), (wk, bk), (wv, bv), (wo, bo), (wi, bi), (wout, bout) = copies
        norm1, norm2 = attention.output.LayerNorm, out.LayerNorm
        params = [
            wq,
            bq,
            wk,
            bk,
            wv,
            bv,
            wo,
            bo,
            norm1.weight,
            norm1.bias,
            wi,
            bi,
            wout,
            bout,
            norm2.weight,
            norm2.bias,
        ]
        return params if all(p.requires_grad for p in params) else None  # a frozen part: the modules


def _transformers_class(module: nn.Module) -> str | None:
    """The name of the transformers class ``module`` computes as: its own, or the one under the engine's
    mix-ins (evaluation-only ones, such as the fused query/key/value); None for any other class."""
    for cls in type(module).__mro__:
        if not cls.__module__.startswith("engine."):
            return cls.__name__ if cls.__module__.startswith("transformers.") else None
    return None


def fusable(layer: nn.Module) -> bool:
    """Whether ``layer`` has a BERT layer's layout that :class:`FusedLayer` computes: self-attention
    only, no feed-forward chunking, LayerNorms with weights and biases, exact GELU."""
    try:
        attention, intermediate, out = layer.attention, layer.intermediate, layer.output
        parts = (attention.self.query, attention.self.key, attention.self.value, attention.output.dense)
        norms = (attention.output.LayerNorm, out.LayerNorm)
        act = intermediate.intermediate_act_fn
    except AttributeError:
        return False
    return (
        _transformers_class(attention.self) in SELF_ATTENTION
        and not isinstance(layer, FirstTokenLayer)
        and not getattr(layer, "add_cross_attention", False)
        and not getattr(layer, "is_decoder", False)
        and getattr(layer, "chunk_size_feed_forward", 0) == 0
        and all(isinstance(p, nn.Linear) for p in (*parts, intermediate.dense, out.dense))
        and all(isinstance(n, nn.LayerNorm) and n.elementwise_affine and n.bias is not None for n in norms)
        and _is_exact_gelu(act.activation if isinstance(act, FoldedActivation) else act)
        and hasattr(attention.self, "num_attention_heads")
        and hasattr(attention.self, "scaling")
    )


def encoder_layers(hf_model: nn.Module) -> list[nn.Module]:
    """The model's encoder layers that :func:`fusable` accepts (the first-token last layer is not)."""
    return [m for m in hf_model.modules() if type(m).__name__.endswith("Layer") and fusable(m)]


def enable_fused_layers(hf_model: nn.Module, required: bool = False) -> int:
    """Mix :class:`FusedLayer` into every fusable encoder layer of ``hf_model``; returns how many.
    None fusable is an error when ``required`` (``trainer.fused_layers=true``)."""
    layers = encoder_layers(hf_model)
    if not layers and required:
        raise EngineError(f"{SETTING}=true: {type(hf_model).__name__} has no BERT-style encoder layer to fuse")
    for layer in layers:
        swap_class(layer, FusedLayer, "Fused", "")
    return len(layers)


def why_not(fast_dropout: bool, attention: bool, gelu: bool, bf16_copies: bool) -> str | None:
    """Why a run's encoder layers cannot be fused (None: they can): each part it computes with."""
    for on, name in (
        (fast_dropout, "trainer.fast_dropout"),
        (attention, "trainer.native_attention"),
        (gelu, "trainer.native_gelu"),
        (bf16_copies, "trainer.bf16_weights"),
    ):
        if not on:
            return f"its layers compute with {name}, which is off for this run"
    return None


def use_fused_layers(setting: bool | None, hf_model: nn.Module, *conditions: bool) -> int:
    """``trainer.fused_layers``: fuse ``hf_model``'s encoder layers where ``conditions`` (:func:`why_not`'s
    arguments) allow; returns how many. null: where it can; true: an error naming why it cannot."""
    if setting is False:
        return 0
    reason = why_not(*conditions)
    if reason is not None:
        if setting:
            raise EngineError(f"{SETTING}=true: {reason}; use null or false")
        return 0
    return enable_fused_layers(hf_model, required=bool(setting))
