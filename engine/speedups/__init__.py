"""The speed wing: optional, pure-PyTorch speed-ups, one file each, one decision table, one call.

The loop calls :func:`apply` once, after building the classifier and before the backend
places it; it returns the names of what it applied, which the loop logs. Nothing else in the
engine imports this package. ``speedups=off`` (every switch false) runs the plain loop exactly
as ``engine/loop.py`` reads. Each row below was kept because an interleaved A/B on the default
MRPC run measured >= 5% (docs/speed.md has the table and the method); the others were deleted.

A switch is ``null`` (on where :attr:`SpeedUp.blocker` finds nothing against it), ``true``
(on; a blocker is then an error naming it) or ``false`` (off).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from engine.errors import EngineError
from engine.speedups import fast_dropout, first_token, sparse_embedding_grad

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Where:
    """What a speed-up's decision looks at."""

    device: str  # "cpu" | "cuda" | ...
    processes: int
    training: bool  # false: an evaluation-only run
    compiled: bool
    hf_model: nn.Module


@dataclass(frozen=True)
class SpeedUp:
    name: str  # its switch: speedups.<name>
    applies: str  # where null turns it on, in words (docs/speed.md repeats it)
    measured: str  # its A/B figure on the default MRPC run (docs/speed.md)
    blocker: Callable[[Where], str | None]  # why it cannot or should not run here; None: it applies
    enable: Callable[[nn.Module], object]  # swaps or hooks the transformers model in place


def _cpu_training(where: Where) -> str | None:
    if where.device != "cpu":
        return f"{where.device}: CUDA's dropout and allocator already do this work"
    if not where.training:
        return "an evaluation-only run"
    if where.compiled:
        return "a compiled model makes its own masks and buffers"
    return None


def _sparse_blocker(where: Where) -> str | None:
    if where.processes > 1:
        return f"{where.processes} processes: DDP all-reduces dense gradients and rejects a sparse one"
    embedding = where.hf_model.get_input_embeddings() if hasattr(where.hf_model, "get_input_embeddings") else None
    if type(embedding) is not nn.Embedding or not embedding.weight.requires_grad:
        return "the model has no trainable nn.Embedding input embedding"
    return _cpu_training(where)


def _first_token_blocker(where: Where) -> str | None:
    if first_token.last_layer(where.hf_model) is None:
        return (
            f"{type(where.hf_model).__name__} is not a classifier whose head reads only the first token "
            f"with a BERT-style encoder layer ({', '.join(first_token.FIRST_TOKEN_HEADS)})"
        )
    if where.device != "cpu":
        return f"{where.device}: not measured there"
    return None


TABLE = (
    SpeedUp(
        "fast_dropout",
        "CPU training, eager (not compiled)",
        "1.14x training samples/s (median of 3 interleaved MRPC rounds, fp32 CPU)",
        _cpu_training,
        fast_dropout.enable,
    ),
    SpeedUp(
        "sparse_embedding_grad",
        "single-process CPU training, eager, a trainable nn.Embedding",
        "1.08x training samples/s (median of 3 interleaved MRPC rounds, fp32 CPU)",
        _sparse_blocker,
        sparse_embedding_grad.enable,
    ),
    SpeedUp(
        "first_token_last_layer",
        "CPU, BERT/RoBERTa/XLM-R/CamemBERT/ELECTRA sequence classifiers (training and evaluation)",
        "1.18x training, 1.21x evaluation samples/s (median of 3 interleaved MRPC rounds, fp32 CPU)",
        _first_token_blocker,
        first_token.enable,
    ),
)


def apply(model: nn.Module, backend, config, training: bool = True) -> list[str]:
    """Apply the table's speed-ups that ``config.speedups`` and the run allow to ``model`` (the
    engine's classifier, not yet prepared), then compile if asked; returns what was applied."""
    settings = config.speedups
    hf_model = model.hf_model
    where = Where(backend.device.type, backend.num_processes, training, settings.compile, hf_model)
    applied = []
    for speedup in TABLE:
        setting = getattr(settings, speedup.name)
        if setting is False:
            continue
        blocker = speedup.blocker(where)
        if blocker is not None:
            if setting is True:
                raise EngineError(f"speedups.{speedup.name}=true: {blocker}; use null or false")
            continue
        speedup.enable(hf_model)
        applied.append(speedup.name)
    if settings.compile:
        compile_encoder(hf_model, settings, config.data)
        applied.append("compile")
    return applied


def compile_encoder(hf_model: nn.Module, settings, data) -> None:
    """``speedups.compile``: compile the transformers model in place (its ``state_dict`` keys stay
    plain); batches come padded to ``data.pad_to_multiple_of`` buckets (32 unless set)."""
    import torch._dynamo

    # Graphs: each bucket, full and last partial batch, in training and in eval mode.
    buckets = math.ceil(data.max_length / data.pad_to_multiple_of)
    # recompile_limit was cache_size_limit before torch 2.6
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 4 * buckets + 4))
    options = {"mode": settings.compile_mode} if settings.compile_mode else {}
    hf_model.compile(backend=settings.compile_backend, dynamic=False, **options)
    tokens = data.pad_to_multiple_of
    log.info(
        "torch.compile (backend %s): up to %d length buckets of %d tokens", settings.compile_backend, buckets, tokens
    )
