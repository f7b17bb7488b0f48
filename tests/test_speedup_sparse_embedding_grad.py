"""speedups.sparse_embedding_grad: the same gradient as the dense backward, in one reused buffer;
the same training and checkpoint keys as speedups=off."""

from __future__ import annotations

import torch

from engine.model import plain_state_dict
from engine.speedups.sparse_embedding_grad import enable as enable_sparse_embedding_grad
from tests.conftest import TINY, assert_same_training, speedup_on_and_off
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


def test_state_dict_and_eval_logits_are_unchanged():
    plain, swapped = tiny(), tiny()
    swapped.load_state_dict(plain.state_dict())
    enable_sparse_embedding_grad(swapped.hf_model)
    assert plain_state_dict(swapped).keys() == plain_state_dict(plain).keys()
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.inference_mode():
        assert torch.equal(swapped.eval()(**inputs).logits, plain.eval()(**inputs).logits)


def test_training_with_the_buffer_equals_training_without(make_cfg, tmp_path):
    common = (*TINY, "data.max_train_samples=96", "trainer.epochs=2", "trainer.grad_accum_steps=2")
    sparse, dense = speedup_on_and_off(make_cfg, tmp_path, "sparse_embedding_grad", *common)
    assert_same_training(sparse, dense, evaluations=2)


def test_zero_grad_without_set_to_none_keeps_the_dense_gradient():
    """``zero_grad(set_to_none=False)`` zeroes the buffer in place: autograd then accumulates into
    it as into any dense gradient, and a later fresh gradient starts from a zeroed buffer."""
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
