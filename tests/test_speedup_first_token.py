"""speedups.first_token_last_layer: the last layer computes only the token the head reads;
logits, gradients and checkpoint keys are those of the full model; unsupported models are named."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)
from transformers.models.bert.modeling_bert import BertLayer

from engine.predict import load_classifier
from engine.speedups.fast_dropout import enable as enable_fast_dropout
from engine.speedups.first_token import FirstTokenLayer, last_layer
from engine.speedups.first_token import enable as enable_first_token_last_layer
from tests.conftest import TINY, assert_same_training, speedup_on_and_off

SIZES = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64}


def _pair(model_class, config_class, attn="sdpa", **extra):
    """A randomly initialised classifier and a copy with the swap; dropout off so both forwards agree.
    ``extra`` sets other config values, the sizes too."""
    torch.manual_seed(0)
    config = config_class(
        vocab_size=100,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=1,
        attn_implementation=attn,
        **{**SIZES, **extra},
    )
    full = model_class(config)
    first = copy.deepcopy(full)
    enable_first_token_last_layer(first)
    return full, first


def _inputs():
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (5, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 9:] = 0  # padded rows: the first token must not attend to the padding
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize(
    ("model_class", "config_class", "attn"),
    [
        (BertForSequenceClassification, BertConfig, "sdpa"),
        (BertForSequenceClassification, BertConfig, "eager"),
        (RobertaForSequenceClassification, RobertaConfig, "sdpa"),
    ],
)
def test_logits_and_every_gradient_equal_the_full_layer(model_class, config_class, attn):
    full, first = _pair(model_class, config_class, attn)
    full.train(), first.train()
    want, have = full(**_inputs()).logits, first(**_inputs()).logits
    assert torch.allclose(have, want, atol=1e-6)
    (want * torch.arange(3.0)).sum().backward()
    (have * torch.arange(3.0)).sum().backward()
    for (name, a), b in zip(full.named_parameters(), first.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert torch.allclose(b.grad, a.grad, atol=1e-6), name
    # the last layer's query still learns (from the first token), its keys from every token
    layer = last_layer(first)
    assert layer.attention.self.query.weight.grad.abs().sum() > 0
    assert type(layer).__name__ == f"FirstToken{type(last_layer(full)).__name__}"
    assert first.state_dict().keys() == full.state_dict().keys()


def test_last_hidden_state_is_the_first_position_only():
    full, first = _pair(BertForSequenceClassification, BertConfig)
    with torch.inference_mode():
        want = full.bert(**_inputs()).last_hidden_state
        have = first.bert(**_inputs()).last_hidden_state
    assert have.shape == (5, 1, 32)
    assert torch.allclose(have[:, 0], want[:, 0], atol=1e-6)


def test_fast_dropout_attention_takes_the_one_query_row():
    """Training with dropout on: the packed-mask attention gets a 1-row query against every key."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, num_labels=2, attention_probs_dropout_prob=0.5, **SIZES)
    model = BertForSequenceClassification(config).train()
    enable_fast_dropout(model)
    enable_first_token_last_layer(model)
    logits = model(**_inputs()).logits
    assert logits.shape == (5, 2) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert last_layer(model).attention.self.key.weight.grad.abs().sum() > 0
    model.eval()  # dropout off: the fast-dropout attention hands over to SDPA and matches the full layer
    reference = copy.deepcopy(model)
    reference.bert.encoder.layer[-1].__class__ = BertLayer
    with torch.inference_mode():
        assert torch.allclose(model(**_inputs()).logits, reference(**_inputs()).logits, atol=1e-6)


def test_unsupported_models_are_left_whole():
    distil = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    )
    assert last_layer(distil) is None and enable_first_token_last_layer(distil) is None
    decoder = BertForSequenceClassification(BertConfig(vocab_size=100, is_decoder=True, **SIZES))
    assert last_layer(decoder) is None  # causal attention and a key/value cache: left whole


def test_a_two_dimensional_mask_reaches_the_attention_whole(monkeypatch):
    """Flash attention takes the padding mask as (batch, keys), without query rows: the layer must
    pass it on unsliced, and the first token still attends to every real key only."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
    from transformers.models.bert import modeling_bert

    seen = []

    def two_d_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        seen.append(None if attention_mask is None else tuple(attention_mask.shape))
        bias = None
        if attention_mask is not None:  # (batch, keys), 1 = attend
            bias = torch.zeros(attention_mask.shape).masked_fill(attention_mask == 0, torch.finfo(torch.float32).min)
            bias = bias[:, None, None, :]
        return modeling_bert.eager_attention_forward(module, query, key, value, bias, dropout=dropout, scaling=scaling)

    AttentionInterface.register("two_d_test", two_d_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("two_d_test", flash_attention_mask)
    full, first = _pair(BertForSequenceClassification, BertConfig, attn="eager")
    for model in (full, first):
        model.config._attn_implementation = "two_d_test"
    inputs = _inputs()
    with torch.inference_mode():
        want, have = full(**inputs).logits, first(**inputs).logits
    assert (5, 11) in seen and all(shape is None or len(shape) == 2 for shape in seen)
    assert torch.allclose(have, want, atol=1e-6)


def test_training_with_it_equals_training_without(make_cfg, tmp_path):
    common = (*TINY, "data.max_train_samples=96", "trainer.epochs=2", "model.dropout=0.0")
    first, full = speedup_on_and_off(make_cfg, tmp_path, "first_token_last_layer", *common)
    assert_same_training(first, full, evaluations=2, weights_atol=1e-4)
    # the checkpoint loads into the plain transformers class; prediction gives the swapped layer's logits
    classifier = load_classifier(first)
    assert not isinstance(last_layer(classifier.model), FirstTokenLayer)  # prediction is the plain model
    plain = copy.deepcopy(classifier.model)
    enable_first_token_last_layer(plain)
    texts = ["a short one", "a somewhat longer sentence to classify here"]
    encoded = classifier.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        assert torch.allclose(torch.from_numpy(classifier.logits(texts)), plain(**encoded).logits, atol=1e-5)
