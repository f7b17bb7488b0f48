"""``trainer.native_embedding_adamw``: the word embedding's fused AdamW step, by rows."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine import native_adamw
from engine.errors import EngineError
from tests.conftest import (
    assert_broken_build_refused,
    assert_no_compiler_handled,
    native_library,
    native_on_and_off,
    needs_cc,
)


@pytest.fixture(scope="module")
def library():
    return native_library(native_adamw)


class Tiny(nn.Module):
    """A model whose input embedding (60 rows of ``cols``) is all there is."""

    def __init__(self, cols: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(60, cols)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding


def pair(rows: int, cols: int, library, **adamw):
    """Two identical (embedding weight, bias) models, each with a fused AdamW: the reference and one
    whose embedding the library steps."""
    made = []
    for _ in range(2):
        torch.manual_seed(0)
        weight, bias = nn.Parameter(torch.randn(rows, cols)), nn.Parameter(torch.randn(cols))
        optimizer = torch.optim.AdamW(
            [{"params": [weight]}, {"params": [bias], "weight_decay": 0.0}], lr=3e-3, fused=True, **adamw
        )
        made.append((weight, bias, optimizer))
    step = native_adamw.EmbeddingRowsStep(made[1][2], made[1][0], library)
    return made[0], made[1], step


def gradients(rows: int, cols: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A gradient on a few rows only (the others exactly zero), different rows each step; row 0 never."""
    generator = torch.Generator().manual_seed(step)
    grad = torch.zeros(rows, cols)
    touched = torch.randperm(rows - 1, generator=generator)[: rows // 5] + 1
    grad[touched] = torch.randn(len(touched), cols, generator=generator)
    return grad, torch.randn(cols, generator=generator)


def run(models, steps, rows, cols, scale=None, first=0):
    for step in range(first, first + steps):
        grad, bias_grad = gradients(rows, cols, step)
        for weight, bias, optimizer in models:
            weight.grad, bias.grad = grad.clone(), bias_grad.clone()
            if scale is not None:
                optimizer.grad_scale = torch.tensor(scale)
            optimizer.step()
            optimizer.__dict__.pop("grad_scale", None)
            optimizer.zero_grad(set_to_none=True)


def assert_same(reference, ours):
    (w0, b0, o0), (w1, b1, o1) = reference, ours
    assert torch.equal(w0, w1) and torch.equal(b0, b1)
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(o0.state[w0][key], o1.state[w1][key]), key
        assert o0.state[w0][key].dtype == o1.state[w1][key].dtype


@pytest.mark.parametrize("cols", [384, 37])
@pytest.mark.parametrize(
    ("weight_decay", "betas", "scale"),
    [(0.01, (0.9, 0.999), None), (0.0, (0.9, 0.999), 1.7), (0.1, (0.3, 0.99), 2.5)],
    ids=["decay", "no-decay-scaled", "other-lerp-branch-scaled"],
)
def test_the_steps_are_torchs_fused_adamw_bit_for_bit(library, cols, weight_decay, betas, scale):
    rows = 50
    reference, ours, step = pair(rows, cols, library, weight_decay=weight_decay, betas=betas)
    run([reference, ours], 6, rows, cols, scale)
    assert_same(reference, ours)
    ever = sum(gradients(rows, cols, s)[0].ne(0).any(1) for s in range(6)).ne(0)
    assert step.active_rows == int(ever.sum()) and not ever[0]
    assert torch.equal(step.active.bool(), ever)
    # the same state_dict as torch's, so runs resume across the setting
    assert ours[2].state_dict()["state"].keys() == reference[2].state_dict()["state"].keys()


def test_a_resumed_or_rewritten_state_rebuilds_the_active_rows(library):
    rows, cols = 40, 24
    reference, ours, step = pair(rows, cols, library, weight_decay=0.01)
    run([reference], 3, rows, cols)
    ours[0].data.copy_(reference[0].data)
    ours[1].data.copy_(reference[1].data)
    ours[2].load_state_dict(copy.deepcopy(reference[2].state_dict()))  # as resume does: new moment tensors
    for _, _, optimizer in (reference, ours):  # the scheduler sets the lr of the new group dicts
        for group in optimizer.param_groups:
            group["lr"] = 1e-3
    run([reference, ours], 2, rows, cols, first=3)
    assert_same(reference, ours)
    # a moment written in place by anything else (row 0 never had a gradient): the rows are rebuilt
    for weight, _, optimizer in (reference, ours):
        optimizer.state[weight]["exp_avg"][0] = 0.5
    run([reference, ours], 1, rows, cols, first=5)
    assert_same(reference, ours)
    assert step.active[0] == 1


def test_a_gradient_it_cannot_take_goes_to_the_fused_step(library):
    rows, cols = 30, 16
    reference, ours, step = pair(rows, cols, library, weight_decay=0.01)
    grad, bias_grad = gradients(rows, cols, 0)
    for weight, bias, optimizer in (reference, ours):
        weight.grad, bias.grad = grad.t().contiguous().t(), bias_grad.clone()  # not contiguous
        optimizer.step()
    assert_same(reference, ours)
    assert step.active_rows == 0 and ours[0].grad is not None


def test_defaults_and_errors(monkeypatch, tmp_path, caplog):
    weight = nn.Parameter(torch.zeros(4, 4))
    fused = torch.optim.AdamW([weight], fused=True)
    plain = torch.optim.AdamW([weight])
    assert native_adamw.use_native_embedding_adamw(False, fused, "cpu", False) == (None, None)
    for optimizer, device, fp16, why in [
        (fused, "cuda", False, "it steps CPU tensors"),
        (plain, "cpu", False, "without fused=True"),
        (fused, "cpu", True, "fp16's gradient scaler"),
        (torch.optim.AdamW([weight], fused=True, amsgrad=True), "cpu", False, "amsgrad"),
    ]:
        assert native_adamw.use_native_embedding_adamw(None, optimizer, device, fp16) == (None, None)
        with pytest.raises(EngineError, match=f"trainer.native_embedding_adamw=true: .*{why}"):
            native_adamw.use_native_embedding_adamw(True, optimizer, device, fp16)
    with pytest.raises(EngineError, match="no trainable input nn.Embedding"):
        native_adamw.enable_embedding_adamw(fused, nn.Linear(2, 2), None, required=True)
    assert native_adamw.enable_embedding_adamw(fused, nn.Linear(2, 2), None) is None
    assert_no_compiler_handled(
        monkeypatch,
        tmp_path,
        caplog,
        lambda setting: native_adamw.use_native_embedding_adamw(setting, fused, "cpu", False),
        "trainer.native_embedding_adamw",
        "the embedding takes the fused step",
    )


@needs_cc
def test_a_training_run_steps_its_embedding_by_rows_to_the_same_weights(make_cfg, tmp_path):
    """On by default for CPU training, logged; the same losses and checkpoint as the fused step."""
    runs = native_on_and_off(make_cfg, tmp_path, "native_embedding_adamw", "word embedding AdamW by rows")
    assert len(runs["null"]) == 8 and runs["null"] == runs["false"]
    on, off = (torch.load(tmp_path / v / "best_acc_classify.pth") for v in ("null", "false"))
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)


def test_a_library_that_steps_differently_refuses_to_load(tmp_path):
    assert_broken_build_refused(
        native_adamw, "p[j] = p[j] * decay;", "p[j] = p[j];", tmp_path, "does not step as torch's fused AdamW"
    )


def test_with_the_sparse_gradient_buffer_only_the_written_rows_are_read(library, monkeypatch):
    """The sparse embedding gradient lists the rows it wrote: the library takes that list (no other row's
    gradient is read) and still steps exactly as the fused AdamW does."""
    from engine.embedding_grad import enable_sparse_embedding_grad, nonzero_rows

    models, optimizers = [], []
    for _ in range(2):
        torch.manual_seed(0)
        model = Tiny(24)
        assert enable_sparse_embedding_grad(model) is model.embedding
        models.append(model)
        optimizers.append(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, fused=True))
    step = native_adamw.enable_embedding_adamw(optimizers[1], models[1], library, required=True)
    listed = []
    monkeypatch.setattr(native_adamw, "nonzero_rows", lambda grad: listed.append(nonzero_rows(grad)) or listed[-1])
    for i in range(5):
        ids = torch.randint(1, 60, (3, 7), generator=torch.Generator().manual_seed(i))
        for model, optimizer in zip(models, optimizers, strict=True):
            (model.embedding(ids) * torch.linspace(-1, 1, 24)).sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    weights = [m.embedding.weight for m in models]
    # the rows no gradient reached (0 and the unlisted ones) owe the 5 steps' decay until read
    assert step.lazy.pending == 5 and not torch.equal(weights[0][0], weights[1][0])
    assert torch.equal(models[0].state_dict()["embedding.weight"], models[1].state_dict()["embedding.weight"])
    assert step.lazy.pending == 0 and torch.equal(weights[0], weights[1])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(optimizers[0].state[weights[0]][key], optimizers[1].state[weights[1]][key])
    assert len(listed) == 5 and all(rows is not None for rows in listed)
    assert step.active_rows == len(torch.unique(torch.cat([r for r in listed])))


@needs_cc
@pytest.mark.parametrize("compact", [512, 3])
def test_lazily_decayed_rows_read_as_the_fused_adamw_left_them(library, monkeypatch, compact):
    """Rows no gradient has reached owe their decay until read: an evaluation lookup of such rows, a
    step whose rows are not listed, a state_dict (a checkpoint) and a load_state_dict (a resume), and
    the list's compaction each see exactly the weights of torch's fused AdamW."""
    from engine import embedding_grad
    from engine.embedding_grad import enable_sparse_embedding_grad

    monkeypatch.setattr(native_adamw.LazyDecay, "COMPACT", compact)

    def build():
        torch.manual_seed(0)
        model = Tiny(16)
        assert enable_sparse_embedding_grad(model) is model.embedding
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, fused=True)

    (reference, ref_opt), (ours, our_opt) = build(), build()
    step = native_adamw.enable_embedding_adamw(our_opt, ours, library, required=True)
    unlisted = {4}  # the step whose gradient rows are not listed: every row catches up, then all decay
    real_rows = embedding_grad.nonzero_rows
    monkeypatch.setattr(native_adamw, "nonzero_rows", lambda grad: None if len(seen) in unlisted else real_rows(grad))
    seen: list[int] = []

    def train(model, optimizer, i):
        ids = torch.randint(1, 30, (2, 5), generator=torch.Generator().manual_seed(i))  # rows 30+: never trained
        (model.embedding(ids) * torch.linspace(-1, 1, 16)).sum().backward()
        for group in optimizer.param_groups:  # a schedule: each step's decay factor differs
            group["lr"] = 1e-2 * (1 - i / 20)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(9):
        seen.append(i)
        for model, optimizer in ((reference, ref_opt), (ours, our_opt)):
            train(model, optimizer, i)
        if i == 2:  # an evaluation lookup of never-trained rows (and trained ones)
            with torch.inference_mode():
                ids = torch.tensor([[0, 31, 45, 59, 3]])
                assert torch.equal(reference.embedding(ids), ours.embedding(ids))
        if i == 6:  # a checkpoint and a resume from it
            saved = copy.deepcopy((ours.state_dict(), our_opt.state_dict()))
            assert torch.equal(saved[0]["embedding.weight"], reference.embedding.weight)
            train(ours, our_opt, 100)  # a step the resumed run redoes differently
            ours.load_state_dict(saved[0])
            our_opt.load_state_dict(saved[1])
    assert step.lazy.pending <= max(compact, 1) and step.active_rows < 30
    assert torch.equal(ours.state_dict()["embedding.weight"], reference.embedding.weight)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(ref_opt.state[reference.embedding.weight][key], our_opt.state[ours.embedding.weight][key])


@needs_cc
def test_a_tied_embedding_decays_every_step(library):
    """An embedding weight another module also reads (an output layer tied to it) is read there
    without the lookup hook: its rows take their decay every step, as before."""
    model = Tiny(16)
    model.decoder = nn.Linear(16, 60, bias=False)
    model.decoder.weight = model.embedding.weight
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, fused=True)
    assert native_adamw.enable_embedding_adamw(optimizer, model, library, required=True).lazy is None
    untied = Tiny(16)
    optimizer = torch.optim.AdamW(untied.parameters(), lr=1e-2, weight_decay=0.05, fused=True)
    assert native_adamw.enable_embedding_adamw(optimizer, untied, library, required=True).lazy is not None


@needs_cc
def test_a_step_the_fused_kernel_takes_decays_rows_after_what_they_owe(library, monkeypatch):
    """A gradient the library cannot take (not contiguous) goes to the fused step, which decays every
    row: the rows owing lazily applied factors take them first, so the weights stay torch's."""
    monkeypatch.setattr(native_adamw, "nonzero_rows", lambda grad: grad.ne(0).any(1).nonzero().flatten())
    made = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Tiny(16)
        made.append((model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, fused=True)))
    step = native_adamw.enable_embedding_adamw(made[1][1], made[1][0], library, required=True)
    for i in range(4):
        for model, optimizer in made:
            ids = torch.randint(1, 30, (2, 5), generator=torch.Generator().manual_seed(i))
            (model.embedding(ids) * torch.linspace(-1, 1, 16)).sum().backward()
            if i == 2:
                model.embedding.weight.grad = model.embedding.weight.grad.t().contiguous().t()
            for group in optimizer.param_groups:  # a schedule: each step's decay factor differs
                group["lr"] = 1e-2 * (1 - i / 20)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if i == 1:
            assert step.lazy.pending == 2  # rows 0 and 30+ owe two steps' decay
    weights = [model.embedding.weight for model, _ in made]
    assert torch.equal(made[1][0].state_dict()["embedding.weight"], weights[0])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(made[0][1].state[weights[0]][key], made[1][1].state[weights[1]][key])
