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

Zeroing the whole 47 MB buffer is itself 1.5 ms a step; only the rows the previous gradient
wrote can be non-zero, so only they are zeroed, as long as nothing but autograd's
accumulation wrote the buffer since (its version counter says so: clipping's in-place
multiply, ``zero_grad(set_to_none=False)`` or any other in-place write means a whole zeroing).
For the same reason :func:`nonzero_rows` lets ``trainer.clip_in_step``'s norm read those rows
only, rather than all 11.7M entries.

Single-process only: DDP all-reduces dense gradient buckets and rejects a sparse gradient.
"""

from __future__ import annotations

import functools

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


def nonzero_rows(grad: torch.Tensor) -> torch.Tensor | None:
    """For a buffer of :func:`enable_sparse_embedding_grad` that only autograd has written since it
    was zeroed: the indices of its rows that can be non-zero (unique). None for any other tensor."""
    rows = getattr(grad, "_engine_nonzero_rows", None)
    return rows() if rows is not None else None


def enable_sparse_embedding_grad(hf_model: nn.Module) -> nn.Embedding | None:
    """Make the input embedding's backward sparse, accumulated into one persistent dense
    buffer; returns the embedding, or None where there is no trainable ``nn.Embedding``."""
    embedding = hf_model.get_input_embeddings() if hasattr(hf_model, "get_input_embeddings") else None
    if type(embedding) is not nn.Embedding or not embedding.weight.requires_grad:
        return None
    weight = embedding.weight
    buffer: torch.Tensor | None = None
    written: list[torch.Tensor] = []  # row indices of every gradient added since the buffer was zero
    known_version = -1  # the buffer's version counter after its last write that ``written`` covers

    def record_rows(grad: torch.Tensor) -> None:
        # Runs on each incoming gradient of the weight, before it is accumulated into .grad.
        if grad.is_sparse:
            written.append(grad._indices().reshape(-1))

    def densify(parameter: torch.Tensor) -> None:
        # Runs after each accumulation into .grad. A sparse .grad means autograd has just
        # started a new gradient (.grad was None): move it into the buffer. Later micro-batches
        # add their rows into that dense .grad in place.
        nonlocal buffer, known_version
        grad = parameter.grad
        if grad is None:
            return
        if not grad.is_sparse:
            if grad is buffer and buffer._version == known_version + 1:  # autograd's one accumulation
                known_version = buffer._version
            elif grad is buffer:  # written by something else too: which rows is unknown now
                written.clear()
            return
        current = written.pop() if written else grad.coalesce().indices().reshape(-1)
        if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != (grad.shape, grad.dtype, grad.device):
            buffer = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
            buffer._engine_nonzero_rows = functools.partial(written_rows, buffer)
        elif buffer._version == known_version and written:
            buffer.index_fill_(0, torch.cat(written), 0)  # the only rows that can be non-zero
        else:
            buffer.zero_()  # written by something else since: every row may be non-zero
        written[:] = [current]
        parameter.grad = buffer.add_(grad)
        known_version = buffer._version

    def written_rows(tensor: torch.Tensor) -> torch.Tensor | None:
        if tensor is not buffer or tensor._version != known_version or not written:
            return None
        return torch.unique(torch.cat(written))

    embedding.sparse = True
    weight.register_hook(record_rows)
    weight.register_post_accumulate_grad_hook(densify)
    return embedding
