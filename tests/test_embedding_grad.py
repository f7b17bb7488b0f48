"""trainer.sparse_embedding_grad: the same gradient as the dense backward, in one reused buffer;
same training, same checkpoint keys; a clear error where DDP would reject it."""

from __future__ import annotations

import pytest
import torch

from engine.embedding_grad import enable_sparse_embedding_grad, use_sparse_embedding_grad
from engine.errors import EngineError
from engine.loop import train
from engine.model import plain_state_dict
from tests.conftest import TINY, assert_same_training
from tests.test_model import batch, tiny


def _batch(n, length):
    """A batch whose first row is padded with the pad id (0) after 5 tokens."""
    b = batch(n=n, length=length)
    b["input_ids"][0, 5:] = 0
    b["attention_mask"][0, 5:] = 0
    return b


def _grads_after(model, batches):
    """Backward of each list of micro-batches in turn, ``set_to_none`` between steps, as the loop does;
    returns each step's word-embedding gradient (a copy) and the tensor that held it."""
    weight = model.hf_model.get_input_embeddings().weight
    out = []
    for micro_batches in batches:
        for b in micro_batches:
            model(**b).loss.backward()
        out.append((weight.grad.clone(), weight.grad))
        model.zero_grad(set_to_none=True)
    return out


def test_gradient_equals_the_dense_backward_and_reuses_one_buffer():
    torch.manual_seed(0)
    dense, sparse = tiny().eval(), tiny().eval()  # eval: no dropout, so both see the same forward
    sparse.load_state_dict(dense.state_dict())
    assert enable_sparse_embedding_grad(sparse.hf_model) is sparse.hf_model.get_input_embeddings()
    steps = [
        [_batch(6, 10)],
        [_batch(4, 12), _batch(5, 8)],
        [_batch(3, 9)],
    ]  # the middle step accumulates two micro-batches
    expected, got = _grads_after(dense, steps), _grads_after(sparse, steps)
    for (want, _), (have, _holder) in zip(expected, got, strict=True):
        assert not have.is_sparse and have.shape == want.shape
        assert torch.allclose(have, want, atol=1e-6)  # only the order of additions inside a row differs
        assert have.abs().sum() > 0
    # one buffer for the run, zeroed for each new gradient rather than accumulated across steps
    assert len({holder.data_ptr() for _, holder in got}) == 1
    pad = sparse.hf_model.get_input_embeddings().padding_idx
    assert pad is not None and torch.equal(got[-1][0][pad], torch.zeros_like(got[-1][0][pad]))
    # the other parameters' gradients are untouched by the hook
    for p_dense, p_sparse in zip(dense.parameters(), sparse.parameters(), strict=True):
        assert (p_dense.grad is None) == (p_sparse.grad is None)


def test_only_written_rows_are_zeroed_unless_something_else_wrote_the_buffer():
    torch.manual_seed(0)
    dense, sparse = tiny().eval(), tiny().eval()
    sparse.load_state_dict(dense.state_dict())
    enable_sparse_embedding_grad(sparse.hf_model)
    weight = sparse.hf_model.get_input_embeddings().weight
    first, second = _batch(6, 10), _batch(4, 12)
    sparse(**first).loss.backward()
    buffer = weight.grad
    untouched = next(row for row in range(buffer.shape[0]) if row not in set(first["input_ids"].flatten().tolist()))
    # .data shares the storage but not the version counter: a write the hook cannot see, so it
    # shows which rows the next gradient zeroes (the previous gradient's only)
    buffer.data[untouched] = 7.0
    sparse.zero_grad(set_to_none=True)
    sparse(**second).loss.backward()
    assert weight.grad is buffer and torch.all(buffer[untouched] == 7.0)
    # a visible in-place write (clipping's multiply, a user's add) means a whole zeroing next time
    buffer.add_(1.0)
    sparse.zero_grad(set_to_none=True)
    for model in (dense, sparse):
        model(**first).loss.backward()
    dense_grad = dense.hf_model.get_input_embeddings().weight.grad
    assert weight.grad is buffer and torch.allclose(buffer, dense_grad, atol=1e-6)


def test_state_dict_and_eval_logits_are_unchanged():
    plain, swapped = tiny(), tiny()
    swapped.load_state_dict(plain.state_dict())
    enable_sparse_embedding_grad(swapped.hf_model)
    assert plain_state_dict(swapped).keys() == plain_state_dict(plain).keys()
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.inference_mode():
        assert torch.equal(swapped.eval()(**inputs).logits, plain.eval()(**inputs).logits)


def test_default_and_the_multi_process_error():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_sparse_embedding_grad(None, cpu, 1)
    assert not use_sparse_embedding_grad(None, cpu, 2)
    assert not use_sparse_embedding_grad(None, cuda, 1)
    assert not use_sparse_embedding_grad(None, cpu, 1, compiled=True)
    assert use_sparse_embedding_grad(True, cuda, 1) and not use_sparse_embedding_grad(False, cpu, 1)
    with pytest.raises(EngineError, match=r"trainer.sparse_embedding_grad=true needs a single process, this run has 2"):
        use_sparse_embedding_grad(True, cpu, 2)


def test_training_with_the_buffer_equals_training_without(make_cfg, tmp_path):
    common = (*TINY, "data.max_train_samples=96", "trainer.epochs=2", "trainer.grad_accum_steps=2")
    train(make_cfg(*common, "trainer.sparse_embedding_grad=true", output_dir=tmp_path / "sparse"))
    train(make_cfg(*common, "trainer.sparse_embedding_grad=false", output_dir=tmp_path / "dense"))
    assert "sparse embedding gradient: " in (tmp_path / "sparse" / "train.log").read_text()
    assert "sparse embedding gradient" not in (tmp_path / "dense" / "train.log").read_text()

    assert_same_training(tmp_path / "sparse", tmp_path / "dense", evaluations=2)


def test_zero_grad_without_set_to_none_keeps_the_dense_gradient():
    """``zero_grad(set_to_none=False)`` zeroes the buffer in place: autograd then accumulates into
    it as into any dense gradient, and a later fresh gradient zeroes it whole."""
    torch.manual_seed(0)
    dense, sparse = tiny().eval(), tiny().eval()
    sparse.load_state_dict(dense.state_dict())
    enable_sparse_embedding_grad(sparse.hf_model)
    for step, b in enumerate([_batch(6, 10), _batch(4, 12), _batch(3, 9), _batch(5, 11)]):
        for model in (dense, sparse):
            model.zero_grad(set_to_none=step == 3)  # in place for three steps, then a fresh gradient
            model(**b).loss.backward()
        want = dense.hf_model.get_input_embeddings().weight.grad
        assert torch.allclose(sparse.hf_model.get_input_embeddings().weight.grad, want, atol=1e-6), step
