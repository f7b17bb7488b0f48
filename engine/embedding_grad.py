"""``trainer.sparse_embedding_grad``: the word-embedding gradient in one persistent buffer.

The word embedding is the largest tensor of an encoder (30522 × 384 floats, 47 MB, for
MiniLM; half its parameters), and a batch touches a few hundred of its rows. Its dense
backward allocates a fresh zero-filled gradient of the whole table every step; on the CPU
that fresh allocation page-faults its way through 47 MB (11.5 ms of a ~300 ms bf16 MiniLM
step on this project's 2-core CPU, profiled). Here the embedding's backward emits only the
touched rows (``nn.Embedding(sparse=True)``) and a hook adds them into one dense buffer that
lives for the whole run, zeroed in place (warm pages) whenever autograd starts a new
gradient. The optimizer, gradient clipping and accumulation see an ordinary dense gradient
with the same values: only the order of the additions inside a row can differ (float32
rounding). Parameters, ``state_dict`` keys and evaluation are untouched.

Single-process only: DDP all-reduces dense gradient buckets and rejects a sparse gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.errors import EngineError


def use_sparse_embedding_grad(
    setting: bool | None, device: torch.device, num_processes: int, compiled: bool = False
) -> bool:
    """``trainer.sparse_embedding_grad``: ``null`` means on for single-process eager CPU training
    (CUDA's caching allocator hands back warm memory, so a fresh gradient costs one memset
    there; a compiled graph plans its own buffers); ``true`` in a multi-process run is an error."""
    if setting is None:
        return device.type == "cpu" and num_processes == 1 and not compiled
    if setting and num_processes > 1:
        raise EngineError(
            f"trainer.sparse_embedding_grad=true needs a single process, this run has {num_processes} "
            "(DDP all-reduces dense gradients and rejects a sparse one); use null or false"
        )
    return bool(setting)


def enable_sparse_embedding_grad(hf_model: nn.Module) -> nn.Embedding | None:
    """Make the input embedding's backward sparse, accumulated into one persistent dense
    buffer; returns the embedding, or None where there is no trainable ``nn.Embedding``."""
    embedding = hf_model.get_input_embeddings() if hasattr(hf_model, "get_input_embeddings") else None
    if type(embedding) is not nn.Embedding or not embedding.weight.requires_grad:
        return None
    weight = embedding.weight
    buffer: torch.Tensor | None = None

    def densify(parameter: torch.Tensor) -> None:
        # Runs after each accumulation into .grad. A sparse .grad means autograd has just
        # started a new gradient (.grad was None): move it into the buffer. Later micro-batches
        # add their rows into that dense .grad in place.
        nonlocal buffer
        grad = parameter.grad
        if grad is None or not grad.is_sparse:
            return
        if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != (grad.shape, grad.dtype, grad.device):
            buffer = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
        else:
            buffer.zero_()
        parameter.grad = buffer.add_(grad)

    embedding.sparse = True
    weight.register_post_accumulate_grad_hook(densify)
    return embedding
