"""``speedups.sparse_embedding_grad``: the word-embedding gradient in one persistent buffer.

The word embedding is the largest tensor of an encoder (30522 x 384 floats, 47 MB, for
MiniLM; half its parameters), and a batch touches a few hundred of its rows. Its dense
backward allocates a fresh zero-filled gradient of the whole table every step; on the CPU
that fresh allocation page-faults its way through 47 MB. Here the embedding's backward
emits only the touched rows (``nn.Embedding(sparse=True)``) and a hook adds them into one
dense buffer that lives for the whole run, zeroed in place (warm pages) whenever autograd
starts a new gradient. The optimizer, clipping and accumulation see an ordinary dense
gradient with the same values (only the order of additions inside a row can differ).
Parameters, ``state_dict`` keys and evaluation are untouched.

Single process only: DDP all-reduces dense gradient buckets and rejects a sparse gradient.
"""

from __future__ import annotations

import torch
from torch import nn


def enable(hf_model: nn.Module) -> nn.Embedding | None:
    """Make the input embedding's backward sparse, accumulated into one persistent dense
    buffer; returns the embedding, or None where there is no trainable ``nn.Embedding``."""
    embedding = hf_model.get_input_embeddings() if hasattr(hf_model, "get_input_embeddings") else None
    if type(embedding) is not nn.Embedding or not embedding.weight.requires_grad:
        return None
    buffers: list[torch.Tensor] = []  # the one buffer, once the first gradient has shown its shape

    def densify(parameter: torch.Tensor) -> None:
        # After each accumulation into .grad. A sparse .grad means autograd has just started a
        # new gradient (.grad was None): it goes into the zeroed buffer. Later micro-batches of
        # the same step add their rows into that dense .grad in place.
        grad = parameter.grad
        if grad is None or not grad.is_sparse:
            return
        if not buffers or (buffers[0].shape, buffers[0].dtype, buffers[0].device) != (
            grad.shape,
            grad.dtype,
            grad.device,
        ):
            buffers[:] = [torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)]
        else:
            buffers[0].zero_()
        parameter.grad = buffers[0].add_(grad)

    embedding.sparse = True
    embedding.weight.register_post_accumulate_grad_hook(densify)
    return embedding
