"""``trainer.fused_layers``: a BERT layer's training forward and backward as one autograd node, bit for bit
the modules' output and gradients, with the same mask draws; where it steps aside and where it refuses."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from engine import fused_layer, native_gelu, native_masks, native_softmax
from engine.bf16_weights import Bf16Copy, Bf16WeightsLinear
from engine.errors import EngineError
from engine.fast_dropout import enable_fast_dropout
from engine.first_token import enable_first_token_last_layer, mixed_class
from engine.fused_inference import enable_fused_inference
from engine.fused_layer import FusedLayer, enable_fused_layers, use_fused_layers
from engine.native_gelu import enable_native_gelu
from tests.conftest import native_on_and_off, needs_cc

pytestmark = needs_cc


@pytest.fixture
def libraries():
    native_masks.use_native_masks(True, True)
    native_softmax.use_native_softmax(True)
    if not native_softmax.fused_attention():
        pytest.skip("this CPU's bf16 products are not the softmax library's (no AVX-512 BF16, or another kernel)")
    native_gelu.use_native_gelu(True)


def _model(hidden=64, heads=4, layers=3, folded=False):
    """A random BERT classifier set up as the engine trains it: fast dropout, GELU tables, linears on bf16
    copies (``folded``: the inference-fused linears and folded GELU too)."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        attn_implementation="sdpa",
    )
    model = BertForSequenceClassification(config)
    enable_fast_dropout(model)
    enable_native_gelu(model)
    if folded:
        enable_fused_inference(model)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not model.classifier:
            module.__dict__["bf16_copies"] = (Bf16Copy(module.weight), Bf16Copy(module.bias))
            module.__class__ = mixed_class(Bf16WeightsLinear, type(module), "Bf16Weights")
    return model.train()


def _leaves(layer) -> list[torch.Tensor]:
    """What a layer's backward writes: its linears' bf16 copies and its LayerNorms' parameters."""
    out = []
    for module in layer.modules():
        if "bf16_copies" in module.__dict__:
            out += [c.tensor for c in module.__dict__["bf16_copies"]]
        elif isinstance(module, torch.nn.LayerNorm):
            out += [module.weight, module.bias]
    return out


def _run(layer, h, mask, grad, seed=5):
    """The layer's output, the input's and every leaf's gradient, and a draw of the generator after."""
    h = h.detach().requires_grad_()
    for leaf in _leaves(layer):
        leaf.grad = None
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # a layer's input in a model is the output of another node (autocast caches its casts of leaves)
        out = layer(h.clone(), mask, None, encoder_attention_mask=None, cache=None)
    after = torch.rand(2)
    out.backward(grad)
    return [out, h.grad, *(leaf.grad for leaf in _leaves(layer))], after


def _pair(**kwargs):
    model = _model(**kwargs)
    reference = model.bert.encoder.layer[0]
    fused = copy.deepcopy(reference)
    for a, b in zip(reference.modules(), fused.modules(), strict=True):  # deepcopy made new copies: recopy
        if "bf16_copies" in a.__dict__:
            b.__dict__["bf16_copies"] = tuple(Bf16Copy(m) for m in (b.weight, b.bias))
    assert enable_fused_layers(torch.nn.ModuleList([fused])) == 1
    return reference, fused


def _inputs(batch, length, hidden, masked, seed=1):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, hidden, generator=generator) * 3
    grad = torch.randn(batch, length, hidden, generator=generator)
    mask = None
    if masked:  # SDPA's padding mask: True = attend; row b masks its last b keys
        mask = torch.ones(batch, 1, length, length, dtype=torch.bool)
        for b in range(1, batch):
            mask[b, ..., length - b :] = False
    return h, mask, grad


def _assert_same(mine, theirs):
    assert len(mine) == len(theirs)
    for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        assert a is not None and b is not None, i
        assert a.dtype == b.dtype, i
        assert torch.equal(a.contiguous().view(torch.int8), b.contiguous().view(torch.int8)), i


@pytest.mark.parametrize(
    ("batch", "length", "hidden", "heads", "masked", "folded"),
    [
        (3, 9, 64, 4, True, False),
        (2, 16, 64, 4, False, False),
        (4, 1, 32, 2, True, False),
        (2, 13, 96, 3, True, True),
    ],
)
def test_output_and_every_gradient_equal_the_modules(libraries, batch, length, hidden, heads, masked, folded):
    reference, fused = _pair(hidden=hidden, heads=heads, folded=folded)
    h, mask, grad = _inputs(batch, length, hidden, masked)
    calls = []
    forward = fused_layer._Layer.forward

    def counted(*args):
        calls.append(1)
        return forward(*args)

    fused_layer._Layer.forward = staticmethod(counted)
    try:
        mine, after_mine = _run(fused, h, mask, grad)
    finally:
        fused_layer._Layer.forward = staticmethod(forward)
    theirs, after_theirs = _run(reference, h, mask, grad)
    assert calls == [1]  # the fused node ran
    assert len(mine) == 2 + 16
    _assert_same(mine, theirs)
    assert torch.equal(after_mine, after_theirs)  # the same mask draws: the generator left in the same place


def test_the_input_gradient_sums_its_four_uses_in_autograd_order(libraries, monkeypatch):
    """The residual first, then the value, key and query casts; the query's cast first rounds differently,
    so the equality in the test above pins the order."""
    reference, fused = _pair()
    h, mask, grad = _inputs(3, 9, 64, True)
    theirs, _ = _run(reference, h, mask, grad)
    real = fused_layer._input_gradient
    monkeypatch.setattr(fused_layer, "_input_gradient", lambda residual, v, k, q: real(residual, q, k, v))
    mine, _ = _run(fused, h, mask, grad)
    assert torch.equal(mine[0], theirs[0])
    assert not torch.equal(mine[1], theirs[1])
    assert torch.allclose(mine[1], theirs[1], rtol=1e-5, atol=1e-6)


def test_it_steps_aside_where_it_cannot_compute_the_layer(libraries):
    reference, fused = _pair()
    h, mask, grad = _inputs(2, 5, 64, True)
    calls = []
    forward = fused_layer._Layer.forward
    fused_layer._Layer.forward = staticmethod(lambda *args: calls.append(1) or forward(*args))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # no autograd: the modules
            fused(h, mask, None)
        fused(h.requires_grad_(), mask, None)  # float32 (no autocast): the modules
        fused.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # evaluation: the modules
            fused(h, mask, None)
        fused.train()
        native_gelu.use_native_gelu(False)  # a part it computes with is off: the modules
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused(h, mask, None)
        native_gelu.use_native_gelu(True)
        config = fused.attention.self.config
        implementation, config._attn_implementation = config._attn_implementation, "eager"
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the modules' attention is not the engine's
            fused(h, mask, None)
        config._attn_implementation = implementation
        fused.output.LayerNorm.weight.requires_grad_(False)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a frozen parameter
            fused(h, mask, None)
        fused.output.LayerNorm.weight.requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused(h, mask, None)
    finally:
        fused_layer._Layer.forward = staticmethod(forward)
    assert calls == [1]


def test_the_first_token_last_layer_keeps_its_own_forward(libraries):
    model = _model()
    enable_first_token_last_layer(model)
    assert enable_fused_layers(model) == 2
    layers = model.bert.encoder.layer
    assert [isinstance(layer, FusedLayer) for layer in layers] == [True, True, False]


def test_true_is_an_error_where_a_part_is_off(libraries):
    model = _model()
    with pytest.raises(EngineError, match=r"trainer.fused_layers=true: .*trainer.native_gelu, which is off"):
        use_fused_layers(True, model, True, True, False, True)
    assert use_fused_layers(None, model, True, True, False, True) == 0
    assert use_fused_layers(False, model, True, True, True, True) == 0
    assert not any(isinstance(m, FusedLayer) for m in model.modules())


def test_true_is_an_error_without_a_bert_layer():
    with pytest.raises(EngineError, match="no BERT-style encoder layer"):
        use_fused_layers(True, torch.nn.Sequential(torch.nn.Linear(2, 2)), True, True, True, True)


def test_a_bf16_training_run_is_the_same_with_it_and_without(make_cfg, tmp_path):
    """On by default for bf16 CPU training; logged; the losses equal to the last bit."""
    runs = native_on_and_off(
        make_cfg,
        tmp_path,
        "fused_layers",
        "fused encoder layers: 1, each one autograd node in training",
        "trainer.mixed_precision=bf16",
    )
    assert len(runs["null"]) == len(runs["false"]) == 8
    assert runs["null"] == runs["false"]


def test_only_layers_whose_attention_is_the_engines_are_fused(libraries):
    """A layer of the same layout whose self-attention adds positions of its own (RoFormer's rotary ones)
    keeps its modules."""
    from transformers import RoFormerConfig, RoFormerModel

    config = RoFormerConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        embedding_size=32,
    )
    layer = RoFormerModel(config).encoder.layer[0]
    assert hasattr(layer.attention.self, "query")
    assert not fused_layer.fusable(layer)
    bert_layer = _model().bert.encoder.layer[0]
    assert fused_layer.fusable(bert_layer)

    class MySelfAttention(type(bert_layer.attention.self)):  # a subclass of one's own may compute otherwise
        pass

    bert_layer.attention.self.__class__ = MySelfAttention
    assert not fused_layer.fusable(bert_layer)


def test_a_parameter_written_before_the_backward_is_an_error(libraries):
    """As for the modules: autograd's version check on what the backward reads."""
    _, fused = _pair()
    h, mask, grad = _inputs(2, 5, 64, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(h.clone().requires_grad_(), mask, None)
    with torch.no_grad():
        fused.attention.self.key.__dict__["bf16_copies"][0].tensor.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward(grad)
