"""The optimizer and its schedule: AdamW with weight decay on weight matrices only, and
``transformers.get_scheduler``'s schedule (linear with warm-up by default)."""

from __future__ import annotations

import math
from typing import Any

import torch

from engine.config import OptimConfig


def fused_adamw_supported(device: torch.device) -> bool:
    """Whether this torch has a fused AdamW kernel for ``device`` (CPU and CUDA since torch 2.4).

    On a 2-core CPU the fused step over MiniLM's 22.7M parameters takes 14 ms against 83 ms for
    the per-tensor loop (the Trainer's default is fused too).
    """
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return device.type in _get_fused_kernels_supported_devices()


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on weight matrices only (not biases, not LayerNorm)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim < 2 or name.endswith(".bias") or "LayerNorm" in name or "layer_norm" in name:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    fused = optim.fused if optim.fused is not None else fused_adamw_supported(device)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        fused=fused or None,
    )


def device_skippable(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside ``optimizer`` (Accelerate's wrapper, ...) when it can skip an update
    on the device: the fused Adam/AdamW leave weights and state as they were while their ``found_inf``
    flag (the one ``torch.amp.GradScaler`` sets) is 1. ``None`` for any other optimizer."""
    inner = getattr(optimizer, "optimizer", optimizer)
    fused = isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and bool(inner.defaults.get("fused"))
    return inner if fused else None


def total_steps(batches_per_epoch: int, grad_accum_steps: int, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps in the run: a last partial accumulation group still steps."""
    steps = math.ceil(batches_per_epoch / grad_accum_steps) * epochs
    return steps if max_steps is None else min(steps, max_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, steps: int):
    """``optim.scheduler`` over ``steps`` optimizer steps, warming up over ``optim.warmup_ratio`` of them."""
    from transformers import get_scheduler

    return get_scheduler(
        optim.scheduler,
        optimizer=optimizer,
        num_warmup_steps=math.ceil(optim.warmup_ratio * steps),
        num_training_steps=steps,
    )
