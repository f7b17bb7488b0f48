"""trainer.packed_inference: evaluation without padding positions outside attention gives the
padded forward's logits, really computes the real tokens only, and steps aside where it cannot apply."""

from __future__ import annotations

import copy
import json

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

from engine.errors import EngineError
from engine.first_token import enable_first_token_last_layer
from engine.fused_inference import enable_fused_inference, fused_inference_supported
from engine.loop import train
from engine.packed_inference import PackedInferenceEncoder, enable_packed_inference, use_packed_inference
from tests.conftest import TINY

needs_onednn_bf16 = pytest.mark.skipif(not fused_inference_supported(), reason="no native oneDNN bf16 on this CPU")

SIZES = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64}
MODELS = [(BertForSequenceClassification, BertConfig), (RobertaForSequenceClassification, RobertaConfig)]


def _models(model_class, config_class, first_token):
    """A random classifier with fused inference (padded), and a copy with the packed encoder."""
    torch.manual_seed(0)
    config = config_class(vocab_size=100, num_labels=3, pad_token_id=1, attn_implementation="sdpa", **SIZES)
    padded = model_class(config).eval()
    if first_token:
        enable_first_token_last_layer(padded)
    enable_fused_inference(padded)
    packed = copy.deepcopy(padded)
    enable_packed_inference(packed)
    return padded, packed


def _inputs(pad=True):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (5, 16), generator=generator)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, 5:] = 0
        mask[2, 9:] = 0
        mask[3, 15:] = 0
        ids[mask == 0] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _bf16(model, **extra):
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(**_inputs(), **extra)


@pytest.fixture
def linear_rows(monkeypatch):
    """The row count of every oneDNN fused-linear call."""
    rows = []
    original = torch.ops.mkldnn._linear_pointwise

    def counting(*args):
        rows.append(args[0].shape[0])
        return original(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counting)
    return rows


@needs_onednn_bf16
@pytest.mark.parametrize(("model_class", "config_class"), MODELS)
@pytest.mark.parametrize("first_token", [True, False])
def test_packed_logits_equal_padded_and_only_real_tokens_are_computed(
    model_class, config_class, first_token, linear_rows
):
    padded, packed = _models(model_class, config_class, first_token)
    expected = _bf16(padded).logits.float()
    assert max(linear_rows) == 5 * 16  # the padded forward: every position
    linear_rows.clear()
    got = _bf16(packed).logits.float()
    real = int(_inputs()["attention_mask"].sum())  # 5 + 9 + 16 + 15 + 16 = 61 of 80
    assert real == 61 and max(linear_rows) == real
    if first_token:  # the last layer: keys and values of every token, the rest for the 5 first tokens
        # query, key+value, attention output, intermediate, output, then the pooler and the classifier
        assert linear_rows[-7:] == [5, real, 5, 5, 5, 5, 5]
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    # The first token's last hidden state (what the head reads; ~1 in size, logits here ~0.01):
    # the same products row by row, equal here; attending to the padding moves it by ~0.02.
    first = [_bf16(getattr(m, m.base_model_prefix)).last_hidden_state[:, 0].float() for m in (padded, packed)]
    assert torch.allclose(first[1], first[0], atol=2e-3), (first[1] - first[0]).abs().max()


@needs_onednn_bf16
def test_without_first_token_layer_padding_positions_are_zeros_and_real_ones_match():
    padded, packed = _models(BertForSequenceClassification, BertConfig, first_token=False)
    expected = _bf16(padded.bert).last_hidden_state.float()
    got = _bf16(packed.bert).last_hidden_state.float()
    mask = _inputs()["attention_mask"].bool()
    assert got.shape == expected.shape == (5, 16, 32)
    assert torch.count_nonzero(got[~mask]) == 0
    assert torch.allclose(got[mask], expected[mask], atol=2e-3), (got[mask] - expected[mask]).abs().max()


@needs_onednn_bf16
def test_the_encoder_s_own_forward_runs_where_packing_cannot_apply(linear_rows):
    padded, packed = _models(BertForSequenceClassification, BertConfig, first_token=False)
    # hidden states requested (recorded by hooks on the layers): the padded computation, equal results
    # (every encoder product over all 80 positions; the last two calls are the pooler and the classifier)
    expected = _bf16(padded, output_hidden_states=True).hidden_states
    linear_rows.clear()
    got = _bf16(packed, output_hidden_states=True).hidden_states
    assert min(linear_rows[:-2]) == 80 and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    # no padding: no mask reaches the encoder, nothing to drop
    linear_rows.clear()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = packed(**_inputs(pad=False)).logits
        assert min(linear_rows[:-2]) == 80 and torch.equal(full, padded(**_inputs(pad=False)).logits)
    # left padding (the first position is padding in a row): the first-token contract does not hold
    inputs = _inputs(pad=False)
    inputs["attention_mask"][1, :4] = 0
    linear_rows.clear()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed(**inputs)
    assert min(linear_rows[:-2]) == 80
    # a mask broadcast over the batch, or one whose query rows differ (not a key-padding mask)
    hidden = torch.randn(5, 16, 32, generator=torch.Generator().manual_seed(0))
    broadcast = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    broadcast[..., 12:] = False
    causal = torch.ones(16, 16, dtype=torch.bool).tril().expand(5, 1, 16, 16)
    for mask in (broadcast, causal):
        linear_rows.clear()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            got = packed.bert.encoder(hidden, mask).last_hidden_state
            assert torch.equal(got, padded.bert.encoder(hidden, mask).last_hidden_state)
        assert min(linear_rows) == 80
    # float32 inference and training forwards are the plain model's
    with torch.inference_mode():
        assert torch.equal(packed(**_inputs()).logits, padded(**_inputs()).logits)
    logits = []
    for model in (packed, padded):
        model.train()
        torch.manual_seed(5)  # the same dropout masks
        logits.append(model(**_inputs()).logits)
    assert torch.equal(*logits)


@needs_onednn_bf16
def test_default_and_errors():
    padded, _ = _models(BertForSequenceClassification, BertConfig, first_token=True)
    assert use_packed_inference(None, True, padded) and use_packed_inference(True, True, padded)
    assert not use_packed_inference(None, False, padded) and not use_packed_inference(False, True, padded)
    with pytest.raises(EngineError, match=r"packed_inference=true: needs trainer.fused_inference"):
        use_packed_inference(True, False, padded)
    distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=4))
    enable_fused_inference(distil)
    assert not use_packed_inference(None, True, distil)
    with pytest.raises(EngineError, match=r"packed_inference=true: DistilBertForSequenceClassification is not"):
        use_packed_inference(True, True, distil)


@needs_onednn_bf16
def test_training_run_evaluations_are_the_padded_ones(make_cfg, tmp_path, caplog):
    common = (*TINY, "trainer.mixed_precision=bf16", "trainer.epochs=2", "optim.lr=1e-3")
    with caplog.at_level("INFO"):
        train(make_cfg(*common, "trainer.packed_inference=null", output_dir=tmp_path / "packed"))
    assert "packed inference: PackedBertEncoder computes only the real tokens" in caplog.text
    train(make_cfg(*common, "trainer.packed_inference=false", output_dir=tmp_path / "padded"))
    runs = [
        [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("packed", "padded")
    ]
    assert len(runs[0]) == 2
    assert [m["loss"] for m in runs[0]] == pytest.approx([m["loss"] for m in runs[1]], abs=2e-3)
    assert [m["accuracy"] for m in runs[0]] == [m["accuracy"] for m in runs[1]]


def test_swap_keeps_checkpoint_keys():
    padded, packed = _models(BertForSequenceClassification, BertConfig, first_token=True)
    assert isinstance(packed.bert.encoder, PackedInferenceEncoder)
    assert packed.state_dict().keys() == padded.state_dict().keys()
