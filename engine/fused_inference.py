"""``trainer.fused_inference``: CPU bf16 evaluation with the bias (and BERT's GELU) inside the matmul.

Under bf16 autocast on the CPU, ``nn.Linear`` runs as ``addmm``: the bias is first copied
across the whole output, then the product is accumulated onto it, and the feed-forward
GELU reads and writes the 4×-wide activation once more. oneDNN can do all three in one
call (``mkldnn._linear_pointwise`` with a post-op). On this project's 2-core CPU that is
1.09× the median samples/s of ten whole MRPC dev evaluations (MiniLM, batches of 64 sorted
by length, interleaved A/B in one process: 186 -> 203); single evaluations swing by ±15%
here, which hid the gain in the benchmark's one-evaluation figures of an earlier round.
``trainer.fused_inference`` is on (null) where the CPU computes bf16 natively.

Attention on the same path runs as batched bf16 matmuls (:mod:`engine.attention`) instead
of CPU SDPA's flash kernel, whose blocking suits long sequences: 239 -> 253 median eval
samples/s on top of the fused linears (ten interleaved MRPC dev evaluations). A BERT-family
self-attention's query, key and value projections are one product over their concatenated
weights (:class:`InferenceFusedQKV`): the LayerNorm output is cast to bf16 once, not three
times, and oneDNN gets one 3x wider product (median of 30 interleaved evaluations: 218.7 ->
222.4 samples/s, the same logits).

The swap changes classes only (:class:`InferenceFusedLinear` is an ``nn.Linear`` with
the same parameters and ``state_dict`` keys) and takes effect only in forwards that are
at once on the CPU, without autograd and under bf16 autocast (the loop's evaluations; prediction
runs fp32 and never takes it);
training forwards are the plain ``nn.Linear`` and activation, so gradients are untouched.
The result is bf16, as autocast's ``linear`` gives; logits agree with the unfused
forward to bf16 rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import EngineError
from engine.first_token import attention_interface, mixed_class


def fused_inference_supported() -> bool:
    """This torch has oneDNN's fused linear and the CPU computes bf16 natively."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def fused_path(x: torch.Tensor) -> bool:
    """Whether a forward on ``x`` takes the fused path: CPU, no autograd, bf16 autocast."""
    return (
        x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


_FROZEN: list[dict[nn.Module, tuple[torch.Tensor, torch.Tensor | None]]] = []


@contextlib.contextmanager
def frozen_weights() -> Iterator[None]:
    """A block in which no parameter changes (one evaluation): each fused linear casts its
    weights to bf16 once and reuses them for every batch; the copies go at the end of the block."""
    _FROZEN.append({})
    try:
        yield
    finally:
        _FROZEN.pop()


def _frozen_bf16(
    owner: nn.Module, weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """bf16 copies of ``weights`` and ``biases`` (each concatenated; no bias if any is missing),
    kept for ``owner`` until the innermost :func:`frozen_weights` block ends, else made per call."""
    cache = _FROZEN[-1] if _FROZEN else None
    if cache is not None and owner in cache:
        return cache[owner]

    def bf16(tensors: list[torch.Tensor]) -> torch.Tensor:  # one tensor is cast as it is, without a joining copy
        joined = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
        return joined.detach().to(torch.bfloat16)

    weight = bf16(weights)
    bias = bf16(biases) if all(b is not None for b in biases) else None
    if cache is not None:
        cache[owner] = (weight, bias)
    return weight, bias


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none"):
    """The fused path's product: ``x`` (any leading shape, cast to bf16) times the bf16 ``weight``
    with ``bias`` and ``activation`` ("none" or exact "gelu") inside one oneDNN call."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    algorithm = "none" if activation == "gelu" else ""  # exact (erf) GELU
    out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, activation, [], algorithm)
    return out.view(*x.shape[:-1], weight.shape[0])


class InferenceFusedLinear(nn.Linear):
    """``nn.Linear`` whose fused-path forward is one oneDNN call (bias and ``activation`` included)."""

    activation = "none"  # "gelu" once the following exact GELU is folded in (per instance)

    def bf16_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """bf16 copies of weight and bias: cast once per :func:`frozen_weights` block, else per call.

        Not cached across blocks on purpose: the fused AdamW kernel updates parameters in
        place without bumping their version counters, so no cheap check can tell a stale copy.
        """
        return _frozen_bf16(self, [self.weight], [self.bias])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fused_path(x):
            return F.linear(x, self.weight, self.bias)
        return fused_linear(x, *self.bf16_parameters(), self.activation)


class InferenceFusedQKV(nn.Module):
    """Mixed into a BERT-family self-attention class: on the fused path the query, key and value
    projections are one oneDNN product over their concatenated bf16 weights (concatenated once
    per :func:`frozen_weights` block), so the input is cast to bf16 once instead of three times;
    elsewhere (training, fp32, a cache) the class's own forward runs."""

    def qkv_bf16_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The concatenated bf16 weight and bias of query, key and value, as :meth:`InferenceFusedLinear.bf16_parameters`."""
        linears = (self.query, self.key, self.value)
        return _frozen_bf16(self, [linear.weight for linear in linears], [linear.bias for linear in linears])

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        own = args or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
        if own or kwargs.get("encoder_hidden_states") is not None or not fused_path(hidden_states):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        kwargs.pop("cache", None)
        batch, length, _ = hidden_states.shape
        qkv = fused_linear(hidden_states, *self.qkv_bf16_parameters())
        # (batch, length, 3, heads, head_size) -> three contiguous (batch, heads, length, head_size), one copy
        qkv = qkv.view(batch, length, 3, -1, self.attention_head_size).permute(2, 0, 3, 1, 4).contiguous()
        query, key, value = qkv.unbind(0)
        out, weights = attention_interface(self)(
            self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
        )
        return out.reshape(batch, length, -1).contiguous(), weights


# Self-attention classes whose forward is exactly: query/key/value of the same input, the
# attention function, reshape (others may add position terms to q and k, e.g. rotary ones).
QKV_ATTENTIONS = {
    "BertSelfAttention",
    "RobertaSelfAttention",
    "XLMRobertaSelfAttention",
    "CamembertSelfAttention",
    "ElectraSelfAttention",
}


def _fuse_qkv(module: nn.Module) -> bool:
    """Swap a listed bidirectional self-attention with fused query/key/value linears to :class:`InferenceFusedQKV`."""
    linears = [getattr(module, name, None) for name in ("query", "key", "value")]
    if (
        type(module).__name__ not in QKV_ATTENTIONS
        or getattr(module, "is_causal", None) is not False
        or not all(isinstance(linear, InferenceFusedLinear) and linear.activation == "none" for linear in linears)
        or not all(hasattr(module, name) for name in ("attention_head_size", "scaling", "config"))
        or getattr(module.config, "is_decoder", False)
        or getattr(module.config, "add_cross_attention", False)
    ):
        return False
    module.__class__ = mixed_class(InferenceFusedQKV, type(module), "InferenceFusedQKV")
    return True


class FoldedActivation(nn.Module):
    """The activation after a linear that folded it in: identity on the fused path, itself elsewhere."""

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if fused_path(x) else self.activation(x)


def _is_exact_gelu(activation: object) -> bool:
    """transformers' ``ACT2FN["gelu"]`` (``GELUActivation`` calling ``F.gelu``), or ``nn.GELU()``."""
    if isinstance(activation, nn.GELU):
        return activation.approximate == "none"
    from engine.native_gelu import gelu  # trainer.native_gelu's table GELU computes the same function

    return getattr(activation, "act", None) in (F.gelu, gelu)


def enable_fused_inference(hf_model: nn.Module) -> tuple[int, int]:
    """Turn every ``nn.Linear`` of ``hf_model`` into :class:`InferenceFusedLinear` and fold each
    ``dense`` + exact-GELU ``intermediate_act_fn`` pair (BERT-family feed-forward) into the linear;
    an SDPA model's attention takes :func:`engine.attention.folded_attention` on the fused path.
    In place; returns (linears, GELUs folded)."""
    linears = folded = 0
    for module in hf_model.modules():
        if type(module) is nn.Linear:
            module.__class__ = InferenceFusedLinear
            linears += 1
    for module in hf_model.modules():
        dense, activation = getattr(module, "dense", None), getattr(module, "intermediate_act_fn", None)
        if isinstance(dense, InferenceFusedLinear) and isinstance(activation, nn.Module) and _is_exact_gelu(activation):
            dense.activation = "gelu"
            module.intermediate_act_fn = FoldedActivation(activation)
            folded += 1
    from engine.attention import mark_inference_attention

    if mark_inference_attention(hf_model):  # the engine's attention on the fused path
        for module in list(hf_model.modules()):
            _fuse_qkv(module)
    return linears, folded


def use_fused_inference(setting: bool | None, device: torch.device, bf16: bool, compiled: bool = False) -> bool:
    """``trainer.fused_inference``: null means on for eager bf16 runs on a CPU where oneDNN computes
    bf16 (the fused path is taken only under bf16 autocast anyway; a compiled model fuses its own)."""
    if setting is None:
        return device.type == "cpu" and bf16 and not compiled and fused_inference_supported()
    if setting and device.type == "cpu" and not fused_inference_supported():
        raise EngineError(
            "trainer.fused_inference=true: this torch/CPU has no oneDNN bf16 fused linear "
            "(torch.ops.mkldnn._linear_pointwise with native bf16); use null or false"
        )
    return bool(setting)
