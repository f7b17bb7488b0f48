"""``train(cfg)``: the explicit training loop, readable top to bottom.

Set-up builds each component in its own step (backend, data, model, optimizer,
schedule); the loop itself is one function: forward, backward, clip, step, log,
evaluate, keep the best.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from engine import checkpoint, native_gelu, native_softmax, resume, tracking
from engine.backend import Backend, make_backend
from engine.bf16_weights import enable_bf16_weights, use_bf16_weights
from engine.clip_in_step import use_clip_in_step
from engine.config import Config, MixedPrecision, NonFinite, OptimConfig, ProblemType, validate
from engine.data import eval_loader, format_preflight, load_data, make_collator, restore_order, row_order, train_loader
from engine.embedding_grad import enable_sparse_embedding_grad, use_sparse_embedding_grad
from engine.errors import EngineError
from engine.fast_dropout import enable_fast_dropout, use_fast_dropout
from engine.first_token import enable_first_token_last_layer, use_first_token_last_layer
from engine.fused_inference import enable_fused_inference, frozen_weights, use_fused_inference
from engine.fused_layer import use_fused_layers
from engine.metrics import compute_metrics, confusion, load_metric, per_class_report, sigmoid, tune_thresholds
from engine.model import (
    build_model,
    init_bias_from_priors,
    load_tokenizer,
    plain_state_dict,
    resolve_class_weights,
)
from engine.native_adamw import enable_embedding_adamw, use_native_embedding_adamw
from engine.native_gelu import enable_native_gelu, use_native_gelu
from engine.native_masks import use_native_masks
from engine.native_softmax import kernel_path, use_native_attention, use_native_softmax
from engine.packed_inference import enable_packed_inference, use_packed_inference
from engine.resume import Progress

log = logging.getLogger("engine.loop")


# ---------------------------------------------------------------------------
# Set-up steps
# ---------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def resolve_run_dir(cfg: Config, backend: Backend) -> Path:
    """Rank 0 decides the run directory; every other rank follows it.

    ``resume=<run dir>`` continues in that run directory (its files go on growing there).
    """
    if cfg.resume not in (None, "auto"):
        named = Path(cfg.resume)
        if named.name.startswith("step_") and named.parent.name == checkpoint.STATE_DIR:
            named = named.parent.parent
        if backend.is_main_process:
            log.info("resume=%s: continuing in %s", cfg.resume, named)
        return named
    own: str | None = cfg.output_dir
    if own is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            own = HydraConfig.get().runtime.output_dir
        except ValueError:  # train(cfg) called outside @hydra.main
            own = str(Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))
    chosen = backend.broadcast_object(own)
    if not backend.is_main_process and os.path.abspath(own) != os.path.abspath(chosen):
        _discard_stray_run_dir(Path(own))
    run_dir = Path(chosen)
    if backend.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    backend.wait_for_everyone()
    return run_dir


def _discard_stray_run_dir(folder: Path) -> None:
    """Hydra made a run dir on this non-zero rank too: remove it if it holds only Hydra's own files."""
    if not folder.is_dir():
        return
    names = {p.name for p in folder.iterdir()}
    log_file = folder / tracking.LOG_FILE
    if names <= {".hydra", tracking.LOG_FILE} and (not log_file.exists() or log_file.stat().st_size == 0):
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def fused_adamw_supported(device: torch.device) -> bool:
    """Whether this torch has a fused AdamW kernel for ``device`` (CPU and CUDA since torch 2.4).

    On this project's 2-core CPU the fused step over MiniLM's 22.7M parameters takes 14 ms
    against 83 ms for the default per-tensor loop (the Trainer's default is fused too).
    """
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return device.type in _get_fused_kernels_supported_devices()


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on weight matrices only (not biases, not LayerNorm)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim < 2 or name.endswith(".bias") or "LayerNorm" in name or "layer_norm" in name:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    fused = optim.fused if optim.fused is not None else fused_adamw_supported(device)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        fused=fused or None,
    )


def compile_model(classifier: torch.nn.Module, config: Config) -> int:
    """``trainer.compile``: compile the encoder in place (its ``state_dict`` keys stay plain);
    returns the padding bucket, so there is one compiled graph per bucket rather than per length."""
    import torch._dynamo

    bucket = config.data.pad_to_multiple_of or 32
    # Graphs: each bucket, full and last partial batch, in training and in eval mode.
    buckets = math.ceil(config.data.max_length / bucket)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * buckets + 4)
    options = {"mode": config.trainer.compile_mode} if config.trainer.compile_mode else {}
    classifier.hf_model.compile(backend=config.trainer.compile_backend, dynamic=False, **options)
    log.info(
        "torch.compile (backend %s): batches padded to multiples of %d, up to %d length buckets",
        config.trainer.compile_backend,
        bucket,
        buckets,
    )
    return bucket


def fuse_inference_linears(hf_model: torch.nn.Module, config: Config, backend: Backend) -> None:
    """``trainer.fused_inference``: bias and GELU inside the matmul for CPU bf16 evaluation; then
    ``trainer.packed_inference``: no padding positions outside attention."""
    bf16 = backend.mixed_precision == MixedPrecision.bf16
    fused = use_fused_inference(config.trainer.fused_inference, backend.device, bf16, config.trainer.compile)
    if fused:
        linears, gelus = enable_fused_inference(hf_model)
        log.info("fused inference: %d linear layers, %d GELUs folded into them (CPU bf16 evaluation)", linears, gelus)
    if use_packed_inference(config.trainer.packed_inference, fused, hf_model):
        encoder = enable_packed_inference(hf_model)
        log.info("packed inference: %s computes only the real tokens outside attention", type(encoder).__name__)


def first_token_only(hf_model: torch.nn.Module, config: Config) -> None:
    """``trainer.first_token_last_layer``: the last layer computes only what the head reads."""
    if use_first_token_last_layer(config.trainer.first_token_last_layer, hf_model):
        layer = enable_first_token_last_layer(hf_model)
        log.info(
            "first-token last layer: %s computes only the token the classification head reads", type(layer).__name__
        )


def micro_batch_groups(loader: Any, size: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Yield lists of ``size`` consecutive batches (the last may be shorter): one optimizer step each."""
    group: list[dict[str, torch.Tensor]] = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def forward_backward(
    model: torch.nn.Module,
    classifier: torch.nn.Module,
    backend: Backend,
    micro_batches: list[dict[str, torch.Tensor]],
) -> torch.Tensor:
    """Forward and backward over the micro-batches of one optimizer step; returns the step's loss.

    One denominator serves the whole step, summed over processes, so ``k`` micro-batches on
    ``W`` processes give exactly the gradient of one ``k*W``-times batch, also with class
    weights (weighted cross-entropy's mean divides by the sum of the targets' weights).
    """
    denominator = sum(classifier.loss_denominator(b["labels"]) for b in micro_batches)
    denominator = backend.reduce_sum(denominator) / backend.num_processes
    step_loss = torch.zeros((), device=backend.device)
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        # Skip the gradient all-reduce on all but the last micro-batch.
        with contextlib.nullcontext() if last else backend.no_sync(model):
            with backend.autocast():
                loss = model(**batch, loss_denominator=denominator).loss
            backend.backward(loss)
        step_loss += loss.detach()
    return step_loss


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    loader: Any,
    backend: Backend,
    problem_type: ProblemType,
    progress: bool = False,
    order: np.ndarray | None = None,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Loss and metrics over every sample of ``loader``, gathered from all processes exactly once.

    Logits and labels come back in data set row order when ``order`` (:func:`engine.data.row_order`
    of the unprepared loader) is given, whatever order the batches ran in.
    """
    from tqdm.auto import tqdm

    classifier = backend.unwrap_model(model)
    model.eval()
    load_metric(problem_type)  # imported once per process (~1 s): after the first step, outside the timing
    started = time.perf_counter()
    all_logits, all_labels = [], []
    with frozen_weights():  # fused inference: one bf16 cast of the weights per evaluation
        for batch in tqdm(loader, desc="eval", leave=False, disable=not (progress and backend.is_main_process)):
            batch = backend.to_device(batch)
            with backend.autocast():
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            all_logits.append(backend.gather_for_metrics(logits.float()))
            all_labels.append(backend.gather_for_metrics(batch["labels"]))
    logits = torch.cat(all_logits)
    labels = torch.cat(all_labels)
    loss = classifier.loss_from_logits(logits, labels)
    logits_np, labels_np = logits.cpu().numpy(), labels.cpu().numpy()
    if order is not None:
        logits_np, labels_np = restore_order(order, logits_np, labels_np)
    metrics = {"loss": float(loss), **compute_metrics(logits_np, labels_np, problem_type)}
    metrics["samples"] = int(labels_np.shape[0])
    metrics["samples_per_s"] = metrics["samples"] / max(time.perf_counter() - started, 1e-9)
    model.train()
    return metrics, logits_np, labels_np


def evaluate_checkpoint(config: Config, backend: Backend, run_dir: Path) -> float:
    """``trainer.do_train=false checkpoint=...``: the training metric code on ``data.eval_split``."""
    from transformers import AutoTokenizer

    from engine.model import ClassifierWithLoss
    from engine.predict import load_hf_model, locate

    weights_path, info_path = locate(config.checkpoint)
    info = checkpoint.load_info(info_path)
    hf_model = load_hf_model(weights_path, info)
    first_token_only(hf_model, config)
    fuse_inference_linears(hf_model, config, backend)
    problem_type = ProblemType(info["problem_type"])
    names = [info["id2label"][str(i)] for i in range(info["num_labels"])]
    tokenizer = AutoTokenizer.from_pretrained(info.get("tokenizer") or info["model_source"])
    config.data.problem_type = problem_type
    with backend.main_process_first():
        data = load_data(config.data, tokenizer, with_train=False, label_names=names)
    loader = eval_loader(
        data.eval,
        config.trainer.eval_batch_size,
        make_collator(tokenizer, config.data),
        config.data.num_workers,
        config.data.sort_eval_by_length,
    )
    model, loader = backend.prepare(ClassifierWithLoss(hf_model, problem_type), loader)
    metrics, _, _ = evaluate(model, loader, backend, problem_type, config.trainer.progress)
    result = {
        "split": config.data.eval_split,
        "source": data.sources["validation"],
        "checkpoint": str(weights_path),
        **metrics,
    }
    if backend.is_main_process:
        checkpoint.atomic_write_json(run_dir / "eval_metrics.json", result)
        eval_log = tracking.JsonlLogger(run_dir / tracking.EVAL_METRICS)
        eval_log.log(result, int(info.get("step", 0)))
        eval_log.close()
    log.info("evaluated %s on %s: %s", weights_path, config.data.eval_split, _format(metrics))
    name = config.trainer.metric_for_best
    if name not in metrics:
        raise EngineError(f"trainer.metric_for_best={name!r} is not computed; choose one of {sorted(metrics)}")
    return float(metrics[name])


def _format(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


_runs_in_this_process = 0


def startup_origin() -> tuple[float, str]:
    """Where start-up is counted from: the process start for a process's first run (``python
    train.py``), this call for any later one (the next job of a multirun, a notebook)."""
    global _runs_in_this_process
    _runs_in_this_process += 1
    if _runs_in_this_process == 1:
        import psutil

        return psutil.Process().create_time(), "the process started"
    return time.time(), "train() was called"


def train(cfg: DictConfig | Config) -> float:
    """Fine-tune, evaluate and keep the best checkpoint; return the best dev metric."""
    origin = startup_origin()
    config = validate(cfg) if isinstance(cfg, DictConfig) else cfg
    backend = make_backend(config.backend, config.trainer.mixed_precision)
    try:
        return fit(config, backend, origin)
    finally:
        tracking.close_logging()
        backend.end()


@contextlib.contextmanager
def heap_frozen_on_request():
    """Yields ``freeze()``: from then until the block ends, the Python objects alive at that call sit in
    the collector's permanent generation (``gc.freeze``).

    The loop calls it after the first step. By then the imports, model and data have made ~450k
    long-lived objects (10 unreachable among them at step 1 on MiniLM/MRPC), and each full
    collection walked them all: ~270 ms, one every ~200-400 steps of MRPC (~1 ms a step). Frozen, a
    full collection took 25 ms. Objects made later are collected as usual."""
    frozen = []

    def freeze() -> None:
        if not frozen:
            gc.freeze()
            frozen.append(True)

    try:
        yield freeze
    finally:
        if frozen:
            gc.unfreeze()


def fit(config: Config, backend: Backend, origin: tuple[float, str] | None = None) -> float:
    """The run itself, on a backend that is already set up; ``origin`` (a time and its name)
    is where the logged start-up time counts from (default: this call)."""
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    started = time.perf_counter()
    started_at, started_what = origin or (time.time(), "fit() was called")
    resolved = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    t = config.trainer

    # --- Set-up: run dir, logs ---------------------------------------------------------
    run_dir = resolve_run_dir(config, backend)
    tracking.setup_logging(run_dir, backend.is_main_process)
    log.info(
        "run dir %s | backend %s | %d process(es) | device %s | mixed precision %s",
        run_dir,
        backend.name,
        backend.num_processes,
        backend.device,
        backend.mixed_precision.value,
    )
    seed_everything(config.seed)
    if not t.do_train:
        return evaluate_checkpoint(config, backend, run_dir)
    state_folder = resume.find_state(config.resume, run_dir) if config.resume else None
    if state_folder is not None:
        resume.check(state_folder, backend, resolved)

    # --- Data: read, map labels, tokenize (rank 0 fills the cache first) ---------------
    tokenizer = load_tokenizer(config.model)
    with backend.main_process_first():
        data = load_data(config.data, tokenizer, with_train=True, with_test=t.evaluate_test)
    labels = data.labels
    if len(data.train) < backend.num_processes:
        raise EngineError(
            f"{data.sources['train']}: {len(data.train)} training rows for {backend.num_processes} processes"
        )
    log.info("%s", format_preflight(data.preflight))
    if backend.is_main_process:
        checkpoint.atomic_write_json(run_dir / "preflight.json", data.preflight)

    # --- Model with the weighted loss in its forward -----------------------------------
    class_weights = resolve_class_weights(
        config.loss.class_weights, data.train_label_counts, labels.problem_type, len(data.train)
    )
    if class_weights is not None:
        log.info("class weights: %s", [round(w, 4) for w in class_weights])
    seed_everything(config.seed)  # the same initial head whatever the data step consumed
    model = build_model(config.model, labels.num_labels, labels.id2label, labels.problem_type, class_weights)
    if config.model.init_bias_from_priors and init_bias_from_priors(model, data.train_label_counts, len(data.train)):
        log.info("output bias initialised to the labels' log prior odds (multi-label, no pos_weight)")

    fast_dropout = use_fast_dropout(t.fast_dropout, backend.device, t.compile)
    if fast_dropout:
        swapped = enable_fast_dropout(model.hf_model)
        log.info("fast dropout: %d dropout modules, attention %s", swapped, model.hf_model.config._attn_implementation)
    library = use_native_masks(t.native_masks, fast_dropout)
    if library is not None:
        log.info("native dropout masks: Threefry-2x32-20 from %s", library)
    softmax_library = use_native_softmax(t.native_softmax, backend.device, t.compile)
    if softmax_library is not None:
        log.info("native attention softmax (with its dropout in training, %s) from %s", kernel_path(), softmax_library)
    if use_native_attention(t.native_attention):
        log.info("native training attention: products, softmax and dropout per head in one library call each way")
    gelu_library = use_native_gelu(t.native_gelu, backend.device, t.compile)
    if gelu_library is not None:
        log.info("native GELU tables: %d activations, from %s", enable_native_gelu(model.hf_model), gelu_library)
    embedding = None  # the sparse gradient's embedding: its steps list the rows they wrote
    if use_sparse_embedding_grad(t.sparse_embedding_grad, backend.device, backend.num_processes, t.compile):
        embedding = enable_sparse_embedding_grad(model.hf_model)
        if embedding is not None:
            log.info("sparse embedding gradient: %s rows into one persistent buffer", embedding.num_embeddings)
    first_token_only(model.hf_model, config)
    fuse_inference_linears(model.hf_model, config, backend)
    bucket = compile_model(model, config) if t.compile else None
    collator = make_collator(tokenizer, config.data, bucket)
    dev_loader = eval_loader(
        data.eval, t.eval_batch_size, collator, config.data.num_workers, config.data.sort_eval_by_length
    )
    dev_order = row_order(dev_loader)
    train_dl, shuffler = train_loader(
        data.train, t.batch_size, config.seed, collator, config.data.num_workers, config.data.group_by_length
    )
    optimizer = build_optimizer(model, config.optim, backend.device)
    fp16 = backend.mixed_precision == MixedPrecision.fp16
    adamw_path, adamw_library = use_native_embedding_adamw(t.native_embedding_adamw, optimizer, backend.device, fp16)
    if adamw_library is not None:
        rows_step = enable_embedding_adamw(
            optimizer, model.hf_model, adamw_library, bool(t.native_embedding_adamw), lazy_decay=embedding is not None
        )
        if rows_step is not None:
            log.info(
                "word embedding AdamW by rows (%d rows%s) from %s",
                rows_step.weight.shape[0],
                ", untouched rows' decay applied when read" if rows_step.lazy is not None else "",
                adamw_path,
            )
    model, optimizer, train_dl, dev_loader = backend.prepare(model, optimizer, train_dl, dev_loader)
    classifier = backend.unwrap_model(model)

    steps_per_epoch = math.ceil(len(train_dl) / t.grad_accum_steps)
    total_steps = steps_per_epoch * t.epochs
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)
    scheduler = get_scheduler(
        config.optim.scheduler,
        optimizer=optimizer,
        num_warmup_steps=math.ceil(config.optim.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    (scheduler,) = backend.prepare(scheduler)
    clipper = None
    if use_clip_in_step(t.clip_in_step, backend.name, backend.device, fp16, optimizer, t.max_grad_norm):
        clipper = backend.clip_in_step(optimizer)
        log.info("gradient clipping inside the fused optimizer step (grad_scale)")
    bf16 = backend.mixed_precision == MixedPrecision.bf16
    conditions = (optimizer, backend.device, backend.name, bf16, t.grad_accum_steps, t.compile, clipper is not None)
    bf16_path, bf16_library = use_bf16_weights(t.bf16_weights, *conditions)
    copies = None
    if bf16_library is not None and clipper is not None:
        copies = enable_bf16_weights(optimizer, classifier.hf_model, bf16_library, bool(t.bf16_weights))
        if copies is not None:
            clipper.other_norm = copies.norm
            log.info("linear layers on bf16 copies (%d parameters) stepped from %s", copies.parameters, bf16_path)
    parts = (fast_dropout, native_softmax.fused_attention(), native_gelu.active(), copies is not None)
    fused = use_fused_layers(t.fused_layers, classifier.hf_model, *parts)
    if fused:
        log.info("fused encoder layers: %d, each one autograd node in training", fused)

    # --- Resume: a saved state replaces the fresh weights, optimizer and schedule -------
    progress = Progress()
    best_predictions: tuple[np.ndarray, np.ndarray] | None = None
    if state_folder is not None:
        progress, parts = resume.load(state_folder, backend, resolved)
        checkpoint.check_state_dict(classifier.hf_model, parts[checkpoint.MODEL_KEY], state_folder)
        classifier.hf_model.load_state_dict(parts[checkpoint.MODEL_KEY])
        optimizer.load_state_dict(parts[checkpoint.OPTIMIZER_KEY])
        scheduler.load_state_dict(parts[checkpoint.SCHEDULER_KEY])
        if "best_logits" in parts["extra"]:
            best_predictions = (parts["extra"]["best_logits"].numpy(), parts["extra"]["best_labels"].numpy())
        log.info("resuming from %s: epoch %d, step %d", state_folder, progress.epoch, progress.global_step)
    elif config.resume == "auto":
        log.info("resume=auto: no saved state in %s, starting fresh", run_dir)
    tracker = tracking.Tracker(
        run_dir,
        config.logger,
        backend.is_main_process,
        resolved,
        config.wandb_project,
        resume_step=progress.global_step if state_folder else None,
    )
    sign = 1.0 if t.greater_is_better else -1.0

    def evaluate_and_keep_best(epoch: int, step: int) -> dict[str, float]:
        nonlocal best_predictions
        metrics, logits, gold = evaluate(model, dev_loader, backend, labels.problem_type, t.progress, dev_order)
        if t.metric_for_best not in metrics:
            raise EngineError(
                f"trainer.metric_for_best={t.metric_for_best!r} is not computed; choose one of {sorted(metrics)}"
            )
        value = metrics[t.metric_for_best]
        best = progress.best_value
        # A non-finite metric, or non-finite weights (checked in save_best), never become "best".
        improved = math.isfinite(value) and (best is None or sign * (value - best) > 0)
        if improved and backend.is_main_process:
            checkpoint.save_best(
                run_dir,
                plain_state_dict(classifier),
                {
                    "model_source": config.model.source,
                    "model_name": config.model.name,
                    "tokenizer": config.model.tokenizer or config.model.source,
                    "num_labels": labels.num_labels,
                    "id2label": {str(i): name for i, name in labels.id2label.items()},
                    "problem_type": labels.problem_type.value,
                    "metric_name": t.metric_for_best,
                    "metric_value": value,
                    "metrics": metrics,
                    "epoch": epoch,
                    "step": step,
                    "data_sources": data.sources,
                    "config": resolved,
                    "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
                },
            )
        # Every rank computed the same metric from the same gathered predictions, so all agree.
        if improved:
            progress.best_value, progress.best_step, best_predictions = value, step, (logits, gold)
        tracker.log("eval", {"epoch": epoch, **metrics, "best": progress.best_value, "is_best": improved}, step)
        log.info("eval epoch %d step %d: %s%s", epoch, step, _format(metrics), " (best)" if improved else "")
        if backend.is_main_process:
            tracking.append_per_class(run_dir, per_class_report(logits, gold, labels.problem_type, labels.names), step)
        backend.wait_for_everyone()
        return metrics

    def save_state() -> None:
        if not t.save_state:
            return
        extra = {"window_loss": window_loss.cpu(), "window_tokens": window_tokens.cpu()}
        if best_predictions is not None:
            extra.update(
                best_logits=torch.from_numpy(best_predictions[0]), best_labels=torch.from_numpy(best_predictions[1])
            )
        resume.save(run_dir, backend, progress, classifier, optimizer, scheduler, extra, resolved)

    # --- Train --------------------------------------------------------------------------
    window_loss = torch.zeros((), device=backend.device)
    window_tokens = torch.zeros((), device=backend.device, dtype=torch.long)
    if state_folder is not None:
        window_loss += parts["extra"]["window_loss"].to(backend.device)
        window_tokens += parts["extra"]["window_tokens"].to(backend.device)
        # Last, so the resumed run draws the same dropout masks as the uninterrupted one.
        checkpoint.restore_rng(parts["rng"])
    window_start = time.perf_counter()
    startup_seconds: float | None = None
    bar = tqdm(
        total=total_steps,
        initial=progress.global_step,
        desc="train",
        dynamic_ncols=True,
        disable=not (t.progress and backend.is_main_process),
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
    )
    model.train()
    parameters = list(model.parameters())  # walking the modules for them costs ~0.5 ms a step
    with resume.StopSignal() as stop, heap_frozen_on_request() as freeze_heap:
        while progress.epoch < t.epochs and progress.global_step < total_steps:
            epoch = progress.epoch
            shuffler.set_epoch(epoch)
            skip = progress.batches_in_epoch  # micro-batches this process already did
            epoch_loader = backend.skip_first_batches(train_dl, skip) if skip else train_dl
            for micro_batches in micro_batch_groups(epoch_loader, t.grad_accum_steps):
                progress.batches_in_epoch += len(micro_batches)
                micro_batches = [backend.to_device(b) for b in micro_batches]
                step_loss = forward_backward(model, classifier, backend, micro_batches)
                grad_norm = backend.clip_grad_norm_(parameters, t.max_grad_norm or float("inf"))
                # One decision on every rank: the gradients are all-reduced, the losses are not.
                finite = bool(torch.isfinite(step_loss)) and (
                    bool(torch.isfinite(grad_norm)) or backend.mixed_precision == MixedPrecision.fp16
                )
                if backend.any_process(not finite):
                    optimizer.zero_grad(set_to_none=True)
                    progress.nonfinite_steps += 1
                    message = (
                        f"non-finite loss or gradient at step {progress.global_step + 1} "
                        f"(loss {float(step_loss):.4g}, grad norm {float(grad_norm):.4g})"
                    )
                    if t.on_nonfinite == NonFinite.stop or progress.nonfinite_steps > t.max_nonfinite:
                        raise EngineError(
                            f"{message}; stopping (trainer.on_nonfinite={t.on_nonfinite.value}, "
                            f"{progress.nonfinite_steps} non-finite steps, "
                            f"trainer.max_nonfinite={t.max_nonfinite}); nothing non-finite was saved"
                        )
                    log.warning("%s: step skipped (%d so far)", message, progress.nonfinite_steps)
                    continue
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if startup_seconds is None:
                    startup_seconds = time.time() - started_at
                    log.info("first optimizer step done %.1f s after %s", startup_seconds, started_what)
                    freeze_heap()
                progress.global_step += 1
                progress.step_in_epoch += 1
                step = progress.global_step
                window_loss += step_loss
                window_tokens += sum(b["attention_mask"].sum() for b in micro_batches)
                progress.window_samples += sum(b["labels"].shape[0] for b in micro_batches)
                progress.window_steps += 1
                bar.update(1)

                if step % t.log_every == 0 or step == total_steps:
                    # A CPU-GPU sync point: only every log_every steps. Figures are over all processes.
                    elapsed = time.perf_counter() - window_start
                    mean_loss = float(backend.reduce_sum(window_loss) / backend.num_processes / progress.window_steps)
                    samples = int(backend.reduce_sum(torch.tensor(progress.window_samples, device=backend.device)))
                    tokens = int(backend.reduce_sum(window_tokens))
                    record = {
                        "epoch": epoch,
                        "loss": mean_loss,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm) if t.max_grad_norm else None,
                        "samples_per_s": samples / max(elapsed, 1e-9),
                        "tokens_per_s": tokens / max(elapsed, 1e-9),
                    }
                    tracker.log("train", record, step)
                    bar.set_postfix(
                        loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}", samples_s=f"{record['samples_per_s']:.1f}"
                    )
                    progress.train_samples += samples
                    progress.train_tokens += tokens
                    progress.train_seconds += elapsed
                    window_loss.zero_()
                    window_tokens.zero_()
                    progress.window_steps, progress.window_samples = 0, 0
                    window_start = time.perf_counter()

                if t.eval_every and step % t.eval_every == 0:
                    evaluate_and_keep_best(epoch, step)
                    progress.last_eval_step = step
                end_of_epoch = progress.batches_in_epoch >= len(train_dl)
                stopping = backend.any_process(stop.received is not None)
                if stopping or (t.save_every and step % t.save_every == 0 and not end_of_epoch):
                    save_state()
                if stopping:
                    log.warning("stopped at step %d; continue with resume=%s", step, run_dir)
                    raise SystemExit(stop.exit_code or 143)
                if step >= total_steps:
                    break
                window_start = time.perf_counter() if progress.window_steps == 0 else window_start
            # End of the epoch (or of max_steps): evaluate, then save a state that starts the next one.
            if t.eval_every == 0 and progress.last_eval_step != progress.global_step:
                evaluate_and_keep_best(epoch, progress.global_step)
                progress.last_eval_step = progress.global_step
            if progress.global_step < total_steps:
                progress.epoch, progress.step_in_epoch, progress.batches_in_epoch = epoch + 1, 0, 0
            save_state()
            window_start = time.perf_counter()
    bar.close()
    if progress.last_eval_step != progress.global_step:
        evaluate_and_keep_best(progress.epoch, progress.global_step)
    best_value, best_step, global_step = progress.best_value, progress.best_step, progress.global_step
    train_samples, train_tokens, train_seconds = progress.train_samples, progress.train_tokens, progress.train_seconds

    # --- Multi-label: decision thresholds tuned on dev with the best checkpoint ----------
    thresholds = None
    if labels.problem_type == ProblemType.multi_label_classification and best_predictions is not None:
        logits, gold = best_predictions
        thresholds = tune_thresholds(sigmoid(logits), gold)
        tuned = compute_metrics(logits, gold, labels.problem_type, threshold=thresholds["per_label"])
        log.info(
            "dev with thresholds tuned per label: %s (global threshold %.2f)", _format(tuned), thresholds["global"]
        )
        if backend.is_main_process:
            info = checkpoint.load_info(run_dir / checkpoint.BEST_INFO)
            info.update(thresholds=thresholds, metrics_tuned_thresholds=tuned)
            checkpoint.atomic_write_json(run_dir / checkpoint.BEST_INFO, info)

    # --- The test split with the best weights (and the tuned thresholds) ----------------
    test_metrics: dict[str, float] | None = None
    if t.evaluate_test and data.test is not None and best_value is not None:
        best_weights = checkpoint.load_weights(run_dir / checkpoint.BEST_WEIGHTS) if backend.is_main_process else None
        best_weights = backend.broadcast_object(best_weights)
        classifier.hf_model.load_state_dict(best_weights)
        test_loader = eval_loader(
            data.test, t.eval_batch_size, collator, config.data.num_workers, config.data.sort_eval_by_length
        )
        test_order = row_order(test_loader)
        test_loader = backend.prepare(test_loader)[0]
        test_metrics, test_logits, test_gold = evaluate(
            model, test_loader, backend, labels.problem_type, t.progress, test_order
        )
        if thresholds is not None:
            tuned = compute_metrics(test_logits, test_gold, labels.problem_type, threshold=thresholds["per_label"])
            test_metrics.update({f"{k}_tuned": v for k, v in tuned.items()})
        tracker.log("test", test_metrics, global_step)
        if backend.is_main_process:
            checkpoint.atomic_write_json(run_dir / "test_metrics.json", test_metrics)
        log.info("test (best checkpoint, step %d): %s", best_step, _format(test_metrics))
    tracker.close()

    # --- Plots and the run summary (main process) ---------------------------------------
    if best_value is None:
        raise EngineError(f"no finite {t.metric_for_best} was ever computed; nothing was saved")
    if backend.is_main_process:
        from engine import plots

        plots.plot_curves(run_dir, t.metric_for_best)
        if best_predictions is not None:
            logits, gold = best_predictions
            if labels.problem_type == ProblemType.single_label_classification:
                plots.plot_confusion(
                    confusion(logits, gold, labels.num_labels), labels.names, run_dir / plots.CONFUSION
                )
            else:
                # At the thresholds tuned on dev: the ones predictions will use.
                threshold = thresholds["per_label"] if thresholds else 0.5
                report = per_class_report(logits, gold, labels.problem_type, labels.names, threshold)
                plots.plot_per_label_f1(
                    [r["f1"] for r in report],
                    [r["support"] for r in report],
                    labels.names,
                    run_dir / plots.PER_LABEL_F1,
                    title="Per-label F1 (dev, best checkpoint, thresholds tuned per label)" if thresholds else None,
                )
        summary = {
            "best_metric": t.metric_for_best,
            "best_value": best_value,
            "best_step": best_step,
            "steps": global_step,
            "test": test_metrics,
            "wall_seconds": time.perf_counter() - started,
            "startup_seconds": startup_seconds,
            "train_samples_per_s": train_samples / max(train_seconds, 1e-9),
            "train_tokens_per_s": train_tokens / max(train_seconds, 1e-9),
            "processes": backend.num_processes,
            "run_dir": str(run_dir),
            "files": sorted(p.name for p in run_dir.iterdir()),
        }
        checkpoint.atomic_write_json(run_dir / "summary.json", summary)
        log.info("%s", tracking.format_summary(summary))
    backend.wait_for_everyone()
    return float(best_value)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Report an :class:`EngineError` (or a config error) as one line and exit 2, no traceback."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except (EngineError, OmegaConfBaseException) as error:
        # Once on the terminal, and in the run's log file when there is one.
        record = logging.LogRecord("engine", logging.ERROR, __file__, 0, "%s", (error,), None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
