"""The classifier: a pretrained encoder whose ``forward`` computes the class-weighted loss.

The class weights are a non-persistent buffer: they follow ``.to(device)`` with the
model (no "Expected all tensors to be on the same device") and stay out of the saved
``state_dict``, which is the plain transformers one (see :func:`plain_state_dict`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig, ProblemType
from engine.errors import EngineError

log = logging.getLogger(__name__)


class ModelLoadError(EngineError):
    """The model or tokenizer could not be loaded (offline hub, bad folder)."""


@dataclass
class ClassifierOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor


class ClassifierWithLoss(nn.Module):
    """Wraps a ``*ForSequenceClassification`` model; ``forward(**batch)`` returns loss and logits."""

    def __init__(
        self, hf_model: nn.Module, problem_type: ProblemType, class_weights: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.hf_model = hf_model
        self.problem_type = ProblemType(problem_type)
        weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)

    @property
    def multi_label(self) -> bool:
        return self.problem_type == ProblemType.multi_label_classification

    def loss_denominator(self, labels: torch.Tensor) -> torch.Tensor:
        """What the summed loss of ``labels`` is divided by to give the mean.

        Weighted cross-entropy's mean divides by the sum of the targets' weights, so
        ``k`` micro-batches equal one ``k``-times batch only when every micro-batch is
        divided by the denominator of the whole batch; the loop passes that one in.
        """
        if self.multi_label:
            return torch.tensor(float(labels.numel()), device=labels.device)
        valid = labels[labels != -100]
        if self.class_weights is None:
            return torch.tensor(float(valid.numel()), device=labels.device)
        return self.class_weights.to(labels.device)[valid].sum()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_denominator: torch.Tensor | None = None,
    ) -> ClassifierOutput:
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        logits = self.hf_model(**inputs).logits
        if labels is None:
            return ClassifierOutput(loss=None, logits=logits)
        return ClassifierOutput(loss=self.loss_from_logits(logits, labels, loss_denominator), logits=logits)

    def loss_from_logits(
        self, logits: torch.Tensor, labels: torch.Tensor, loss_denominator: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Weighted cross-entropy (single-label) or BCE with ``pos_weight`` (multi-label), in float32."""
        if self.multi_label:
            loss_sum = F.binary_cross_entropy_with_logits(
                logits.float(), labels.float(), pos_weight=self.class_weights, reduction="sum"
            )
        else:
            loss_sum = F.cross_entropy(
                logits.float(), labels, weight=self.class_weights, reduction="sum", ignore_index=-100
            )
        if loss_denominator is None:
            loss_denominator = self.loss_denominator(labels)
        return loss_sum / loss_denominator.clamp_min(1e-12)


def balanced_class_weights(label_counts: Sequence[int], problem_type: ProblemType, n_samples: int) -> list[float]:
    """``n_samples / (n_classes * count)`` per class; for multi-label, negatives / positives per label.

    A class absent from the training labels gets weight 0 (single-label) or 1 (multi-label)
    rather than infinity.
    """
    n_classes = len(label_counts)
    if ProblemType(problem_type) == ProblemType.multi_label_classification:
        return [(n_samples - c) / c if c > 0 else 1.0 for c in label_counts]
    return [n_samples / (n_classes * c) if c > 0 else 0.0 for c in label_counts]


def resolve_class_weights(
    setting: Any, label_counts: Sequence[int], problem_type: ProblemType, n_samples: int
) -> list[float] | None:
    if setting is None:
        return None
    if setting == "balanced":
        return balanced_class_weights(label_counts, problem_type, n_samples)
    weights = [float(w) for w in setting]
    if len(weights) != len(label_counts):
        raise EngineError(f"loss.class_weights has {len(weights)} values but there are {len(label_counts)} labels")
    return weights


def _looks_like_a_path(source: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else that is not a folder was meant as one."""
    return source.startswith(("/", ".", "~")) or source.endswith("/") or source.count("/") > 1


def refuse_custom_code(source: str) -> None:
    """A model folder whose ``config.json`` or ``tokenizer_config.json`` maps classes to its own Python
    (``auto_map``) is refused: this engine never runs code that comes with a model or a run."""
    folder = Path(os.path.expanduser(source))
    if not folder.is_dir():
        if _looks_like_a_path(source):
            raise ModelLoadError(f"model folder not found: {source}")
        return
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            described = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelLoadError(f"{path}: not readable JSON ({error})") from None
        if isinstance(described, dict) and described.get("auto_map"):
            raise ModelLoadError(
                f"{path}: refusing a model that ships its own code (auto_map {sorted(described['auto_map'])}); "
                "this engine never runs code from a model folder (trust_remote_code=False)"
            )


def _offline_hint(source: str, error: Exception) -> ModelLoadError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelLoadError(
        f"cannot load model {source!r}: {first}\n"
        "The hub may be unreachable from this machine. Offline options: model=minilm (the bundled "
        "all-MiniLM-L6-v2), model=local model.source=<a folder with config.json and weights>, or a model "
        "already in the Hugging Face cache with HF_HUB_OFFLINE=1."
    )


def _load_error(source: str, error: Exception) -> ModelLoadError:
    """transformers' refusal of a hub model's own code, said in one line; anything else: the offline hint."""
    if "trust_remote_code" in str(error):
        return ModelLoadError(
            f"{source}: refusing a model that ships its own code; this engine never runs code from a model "
            "(trust_remote_code=False)"
        )
    return _offline_hint(source, error)


def check_hub_reachable(source: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not after the hub client's retries, when a hub id can't be had.

    A local folder, offline mode or a copy in the Hugging Face cache pass; otherwise
    the hub must answer a TCP connection within ``timeout`` seconds.
    """
    import socket
    from urllib.parse import urlparse

    if os.path.isdir(os.path.expanduser(source)):  # a local folder
        return
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(source, "config.json"), str):
            return
    except Exception:  # an id the cache cannot parse: let from_pretrained explain it
        return
    if constants.HF_HUB_OFFLINE:
        raise _offline_hint(source, OSError("HF_HUB_OFFLINE is set and the model is not in the local cache"))
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as error:
        raise _offline_hint(source, OSError(f"{endpoint.hostname} is unreachable ({error})")) from None


def load_tokenizer(model: ModelConfig | str):
    """The tokenizer of ``model`` (its ``tokenizer`` or ``source``), or of the folder or hub id given."""
    from transformers import AutoTokenizer

    source = model if isinstance(model, str) else model.tokenizer or model.source
    refuse_custom_code(source)
    check_hub_reachable(source)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as error:  # OSError, connection errors, ValueError from the hub client
        raise _load_error(source, error) from None


def build_hf_model(
    model: ModelConfig, num_labels: int, id2label: dict[int, str], problem_type: ProblemType
) -> torch.nn.Module:
    """The transformers ``*ForSequenceClassification`` model that ``model`` describes, with this
    label space: pretrained weights from ``model.source`` where ``model.pretrained``, else random.
    Training builds its model here, and prediction the architecture a checkpoint was trained with."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    refuse_custom_code(model.source)
    check_hub_reachable(model.source)
    try:
        names = {int(k): v for k, v in id2label.items()}
        labels = {"num_labels": num_labels, "id2label": names, "label2id": {v: k for k, v in names.items()}}
        problem = ProblemType(problem_type).value
        config = AutoConfig.from_pretrained(model.source, trust_remote_code=False, problem_type=problem, **labels)
    except Exception as error:
        raise _load_error(model.source, error) from None
    for key, value in model.config_overrides.items():
        if not hasattr(config, key):
            raise EngineError(f"model.config_overrides.{key}: {type(config).__name__} has no attribute {key!r}")
        setattr(config, key, value)
    if model.dropout is not None:
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
            if hasattr(config, key):
                setattr(config, key, model.dropout)
    extra = {"attn_implementation": model.attn_implementation} if model.attn_implementation else {}
    if not model.pretrained:
        return AutoModelForSequenceClassification.from_config(config, **extra)
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            model.source, config=config, trust_remote_code=False, **extra
        )
    except Exception as error:
        raise _load_error(model.source, error) from None


def build_model(
    model: ModelConfig,
    num_labels: int,
    id2label: dict[int, str],
    problem_type: ProblemType,
    class_weights: Sequence[float] | None = None,
) -> ClassifierWithLoss:
    """The classifier with the weighted loss in its ``forward``, around :func:`build_hf_model`'s model."""
    hf_model = build_hf_model(model, num_labels, id2label, problem_type)
    weights = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)
    return ClassifierWithLoss(hf_model, problem_type, weights)


def build_classifier(config: Any, data: Any) -> ClassifierWithLoss:
    """The run's classifier from ``config`` (model, loss) and the read data (its label space and
    training label counts): class weights resolved, the top ``model.reinit_layers`` encoder layers
    re-initialised, multi-label output bias set from the priors."""
    labels = data.labels
    weights = resolve_class_weights(
        config.loss.class_weights, data.train_label_counts, labels.problem_type, len(data.train)
    )
    if weights is not None:
        log.info("class weights: %s", [round(w, 4) for w in weights])
    model = build_model(config.model, labels.num_labels, labels.id2label, labels.problem_type, weights)
    if config.model.reinit_layers:
        reinit_top_layers(model.hf_model, config.model.reinit_layers)
        log.info("re-initialised the top %d encoder layer(s) and the pooler", config.model.reinit_layers)
    if config.model.init_bias_from_priors and init_bias_from_priors(model, data.train_label_counts, len(data.train)):
        log.info("output bias initialised to the labels' log prior odds (multi-label, no pos_weight)")
    return model


def reinit_top_layers(hf_model: nn.Module, count: int) -> None:
    """Re-initialise the top ``count`` encoder layers (``encoder.layer``) and the pooler with the
    model's own ``_init_weights``, as a fresh model of its class would start (Zhang et al. 2021)."""
    layers = next((m for n, m in hf_model.named_modules() if n.endswith("encoder.layer")), None)
    if not isinstance(layers, nn.ModuleList) or count > len(layers):
        found = f"has {len(layers)} encoder layers" if isinstance(layers, nn.ModuleList) else "has no encoder.layer"
        raise EngineError(f"model.reinit_layers={count}: {type(hf_model).__name__} {found}")
    pooler = next((m for n, m in hf_model.named_modules() if n.endswith("pooler")), None)
    for module in [*layers[len(layers) - count :], *([pooler] if pooler is not None else [])]:
        for parameter in module.parameters():
            parameter._is_hf_initialized = False  # transformers skips loaded tensors marked as initialised
        module.apply(hf_model._init_weights)


def init_bias_from_priors(model: ClassifierWithLoss, label_counts: Sequence[int], n_samples: int) -> bool:
    """Multi-label without ``pos_weight``: start each label's output bias at the log-odds of its prior.

    With a zero bias every label starts at p=0.5, and the first epoch goes on learning that
    most labels are rare (GoEmotions: 1.2 of 28 labels a row). A weighted loss (``pos_weight``)
    moves the optimum away from the prior, so then the bias is left alone. Returns whether it set it.
    """
    if not model.multi_label or model.class_weights is not None or n_samples == 0:
        return False
    head = getattr(model.hf_model, "classifier", None)  # BERT-family *ForSequenceClassification
    while head is not None and not isinstance(head, nn.Linear):  # e.g. RoBERTa's classification head
        head = getattr(head, "out_proj", None)
    if head is None or head.bias is None or head.bias.numel() != len(label_counts):
        return False
    prior = torch.tensor([c / n_samples for c in label_counts], dtype=torch.float32).clamp(1e-4, 1 - 1e-4)
    with torch.no_grad():
        head.bias.copy_(torch.log(prior / (1 - prior)))
    return True


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP/FSDP (``module``), ``torch.compile`` (``_orig_mod``) and our loss wrapper."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or (
            hasattr(model, "module") and isinstance(model.module, nn.Module)
        ):
            model = model.module
        elif isinstance(model, ClassifierWithLoss):
            model = model.hf_model
        else:
            return model


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The transformers model's own ``state_dict``, on CPU, whatever wraps it."""
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def load_hf_model(weights_path: Path, info: dict[str, Any]) -> torch.nn.Module:
    """The checkpoint's architecture (its JSON's model config, random weights) with its weights,
    loaded safely and strictly."""
    import dataclasses

    from engine.checkpoint import check_state_dict, load_weights

    saved = info.get("config", {}).get("model", {})
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    described = ModelConfig(**{k: v for k, v in saved.items() if k in known})
    described.source, described.pretrained = info["model_source"], False
    described.config_overrides = dict(described.config_overrides or {})
    id2label = {int(k): v for k, v in info["id2label"].items()}
    model = build_hf_model(described, info["num_labels"], id2label, info["problem_type"])
    state = load_weights(weights_path)
    check_state_dict(model, state, weights_path)
    model.load_state_dict(state, strict=True)
    return model
