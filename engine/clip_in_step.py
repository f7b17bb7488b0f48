"""``trainer.clip_in_step``: gradient clipping done inside the fused AdamW step.

``torch.nn.utils.clip_grad_norm_`` reads every gradient for the norm and then multiplies
every gradient in place by ``max_norm / (norm + 1e-6)`` (when that is below 1): one
read and one read-and-write pass over all 22.7M MiniLM gradients, 9 ms of a ~250 ms
bf16 step on this project's 2-core CPU. A fused AdamW (or Adam) step divides each
gradient by its ``grad_scale`` as it reads it (the hook ``torch.amp.GradScaler`` uses to
unscale), at no extra cost (16.3 vs 16.5 ms a step measured). So here the norm is computed
as before (4.4 ms) and the clipping factor's inverse is handed to the step as its
``grad_scale``; the multiply pass is gone. Where the word-embedding gradient is the sparse
gradient's persistent buffer (``trainer.sparse_embedding_grad``), the norm reads only the rows
the step wrote (:func:`engine.embedding_grad.nonzero_rows`): the others are zero.

The update equals clipping then stepping up to float rounding (``g / (1 / c)`` against
``g * c``), the returned norm is the same unclipped total norm, and a step that is not
clipped divides by exactly 1. The ``.grad`` tensors themselves stay unclipped between the
clip and the step; nothing in the engine reads them there. Only the manual backend (one
process, no fp16 loss scaler, which owns ``grad_scale`` itself) with a fused optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engine.embedding_grad import nonzero_rows
from engine.errors import EngineError


def supports_step_scale(optimizer: Any) -> bool:
    """Whether ``optimizer``'s step divides the gradients by a ``grad_scale`` attribute (fused Adam/AdamW)."""
    return isinstance(optimizer, torch.optim.Optimizer) and bool(
        getattr(optimizer, "_step_supports_amp_scaling", False)
    )


def use_clip_in_step(
    setting: bool | None, backend_name: str, device: torch.device, fp16: bool, optimizer: Any, max_norm: float | None
) -> bool:
    """``trainer.clip_in_step``: null means on for CPU training on the manual backend with a
    fused optimizer, no fp16 scaler and clipping on; true where it cannot apply is an error."""
    why_not = None
    if backend_name != "manual":
        why_not = f"the {backend_name} backend clips through its own accelerator"
    elif fp16:
        why_not = "fp16's gradient scaler owns the optimizer's grad_scale"
    elif not supports_step_scale(optimizer):
        why_not = f"{type(optimizer).__name__} is not a fused optimizer with a grad_scale (set optim.fused=true)"
    if setting is None:
        return why_not is None and device.type == "cpu" and max_norm is not None
    if setting and why_not is not None:
        raise EngineError(f"trainer.clip_in_step=true: {why_not}; use null or false")
    return bool(setting)


class StepScaleClipper:
    """``clip_grad_norm_`` whose multiply is left to ``optimizer``'s next step (its ``grad_scale``)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if not supports_step_scale(optimizer):
            raise EngineError(f"{type(optimizer).__name__}: its step takes no grad_scale")
        self.optimizer = optimizer
        # The norm of gradients kept off the parameters' ``.grad`` (``trainer.bf16_weights``'s bf16
        # copies), None where there are none; it joins the norm, and its gradients take the step's scale.
        self.other_norm: Callable[[], torch.Tensor | None] = lambda: None
        # A scale serves one step only: dropped once the step has used it.
        optimizer.register_step_post_hook(lambda opt, args, kwargs: opt.__dict__.pop("grad_scale", None))

    def clip_grad_norm_(self, parameters: Any, max_norm: float) -> torch.Tensor:
        """The total 2-norm of the gradients (returned, as ``clip_grad_norm_`` does); the next
        step divides them by ``max(1, (norm + 1e-6) / max_norm)``, i.e. multiplies them by the clip factor."""
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        grads = [p.grad for p in parameters if p.grad is not None]
        other = self.other_norm()
        if not grads and other is None:
            self.optimizer.__dict__.pop("grad_scale", None)
            return torch.tensor(0.0)
        parts: list[torch.Tensor] = []
        for grad in grads:
            rows = nonzero_rows(grad)  # the sparse embedding gradient's buffer: its written rows only
            if rows is not None:
                parts.append(torch.linalg.vector_norm(grad.index_select(0, rows)))
            else:
                parts.append(grad)
        if other is not None:
            parts.append(other)
        norm = torch.nn.utils.get_total_norm(parts)
        self.optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp_(min=1.0).to(torch.float32)
        return norm
