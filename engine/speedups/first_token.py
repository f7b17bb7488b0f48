"""``speedups.first_token_last_layer``: the last encoder layer computes only the token the head reads.

A ``*ForSequenceClassification`` head of the BERT family reads one position of the last
hidden state: the first (``[CLS]`` / ``<s>``), through BERT's pooler or RoBERTa's and
ELECTRA's classification heads. Every other position of the last layer's output is
computed and then dropped, and in training its backward is computed too, from zeros.
In that layer only the keys and values need every token (the first token attends to
them all); its query, attention output, feed-forward and LayerNorms need just the first.
For MiniLM (6 layers) that is 14% of the model's matmul FLOPs per token, forward and
backward, with the last layer's dropout, GELU and LayerNorm work going the same way.

The logits and every gradient are those of the full layer, up to float rounding (the
same products over fewer rows): nothing the head reads is approximated. The swap
changes the last layer's class only (same parameters, same ``state_dict`` keys), so a
checkpoint loads into a plain transformers model. The encoder's ``last_hidden_state``
is then one position long, which is why the swap is limited to the classification
models listed in :data:`FIRST_TOKEN_HEADS`, whose heads read nothing else.
"""

from __future__ import annotations

from torch import nn

from engine.errors import EngineError

# Sequence classifiers whose head reads only position 0 of the last hidden state, and the
# attribute of their base model. (BERT: pooler on hidden_states[:, 0]; RoBERTa, XLM-R,
# CamemBERT, ELECTRA: a classification head on features[:, 0, :].)
FIRST_TOKEN_HEADS = {
    "BertForSequenceClassification": "bert",
    "RobertaForSequenceClassification": "roberta",
    "XLMRobertaForSequenceClassification": "roberta",
    "CamembertForSequenceClassification": "roberta",
    "ElectraForSequenceClassification": "electra",
}


def attention_interface(attention: nn.Module):
    """The attention function the self-attention module would call (eager from the transformers
    module that defines its class)."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    modules = (sys.modules.get(cls.__module__) for cls in type(attention).__mro__)
    eager = next(m.eager_attention_forward for m in modules if hasattr(m, "eager_attention_forward"))
    return ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager)


class FirstTokenLayer(nn.Module):
    """Mixed into the last encoder layer's own class: its forward returns the first position only."""

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise EngineError("speedups.first_token_last_layer: the last layer got a key/value cache")
        attention = self.attention.self
        batch, length, _ = hidden_states.shape
        first = hidden_states[:, :1]
        head_size = attention.attention_head_size
        query = attention.query(first).view(batch, 1, -1, head_size).transpose(1, 2)
        key = attention.key(hidden_states).view(batch, length, -1, head_size).transpose(1, 2)
        value = attention.value(hidden_states).view(batch, length, -1, head_size).transpose(1, 2)
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = attention_mask[..., :1, :]  # (batch, 1, queries, keys): the first query's row
        # a 2-D (batch, keys) mask, as flash attention takes it, has no query rows to slice
        kwargs.pop("encoder_attention_mask", None)
        kwargs.pop("cache", None)
        out, _ = attention_interface(attention)(
            attention,
            query,
            key,
            value,
            attention_mask,
            dropout=attention.dropout.p if attention.training else 0.0,
            scaling=attention.scaling,
            **kwargs,
        )
        attended = self.attention.output(out.reshape(batch, 1, -1).contiguous(), first)
        return self.feed_forward_chunk(attended)


def last_layer(hf_model: nn.Module) -> nn.Module | None:
    """The last encoder layer of a supported classifier with the BERT layer layout, else None."""
    base = getattr(hf_model, FIRST_TOKEN_HEADS.get(type(hf_model).__name__, ""), None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not layers:
        return None
    layer = layers[-1]
    attention = getattr(getattr(layer, "attention", None), "self", None)
    config = getattr(hf_model, "config", None)
    if (
        attention is None
        or not all(hasattr(attention, name) for name in ("query", "key", "value", "scaling", "attention_head_size"))
        or not hasattr(layer, "feed_forward_chunk")
        or getattr(config, "is_decoder", False)
        or getattr(config, "add_cross_attention", False)
    ):
        return None
    return layer


def enable(hf_model: nn.Module) -> nn.Module | None:
    """Make the last encoder layer compute only the first token, in place (its class becomes a
    subclass with :class:`FirstTokenLayer`'s forward); returns that layer, None where unsupported."""
    layer = last_layer(hf_model)
    if layer is not None and not isinstance(layer, FirstTokenLayer):
        layer.__class__ = type(f"FirstToken{type(layer).__name__}", (FirstTokenLayer, type(layer)), {})
    return layer
