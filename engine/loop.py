"""``train(cfg)``: the explicit training loop, readable top to bottom.

:func:`fit` builds each component in its own step (run dir, data, model, speed-ups,
loaders, optimizer, schedule, resume state), then runs the loop: forward, backward, clip,
step, schedule, log, evaluate, keep the best, save a resumable state. :func:`finish` tunes
multi-label thresholds, evaluates the test split, draws the plots and writes the summary.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from engine import checkpoint, resume, speedups, tracking
from engine.backend import Backend, make_backend
from engine.config import Config, MixedPrecision, NonFinite, ProblemType, validate
from engine.data import load_data, loader_workers, make_collator, row_order, run_eval_loader, train_loader
from engine.errors import EngineError
from engine.evaluation import BestKeeper, evaluate, evaluate_checkpoint, format_metrics
from engine.metrics import compute_metrics, confusion, per_class_report, sigmoid, tune_thresholds
from engine.model import build_classifier, load_tokenizer
from engine.optim import build_ema, build_optimizer, build_scheduler, device_skippable, total_steps
from engine.sources import format_preflight

log = logging.getLogger("engine.loop")


def seed_everything(seed: int) -> None:
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
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise EngineError(f"cannot make the run directory {run_dir}: {error.strerror}") from None
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


def micro_batch_groups(loader: Any, size: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Yield lists of ``size`` consecutive batches (the last may be shorter): one optimizer step each."""
    batches = iter(loader)
    while group := list(itertools.islice(batches, size)):
        yield group


def forward_backward(
    model: torch.nn.Module, classifier: torch.nn.Module, backend: Backend, micro_batches: list[dict[str, torch.Tensor]]
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
    # An evaluation-only run resolves precision as prediction does (fp16 where native on GPUs without bf16).
    backend = make_backend(config.backend, config.trainer.mixed_precision, inference=not config.trainer.do_train)
    try:
        run_dir = resolve_run_dir(config, backend)
        with checkpoint.RunDirLock(run_dir, enabled=backend.is_main_process):
            return fit(config, backend, run_dir, origin)
    finally:
        tracking.close_logging()
        backend.end()


def fit(config: Config, backend: Backend, run_dir: Path, origin: tuple[float, str] | None = None) -> float:
    """The run itself, on a backend that is already set up, in a run directory this process holds;
    ``origin`` (a time and its name) is where the logged start-up time counts from (default: this call)."""
    started = time.perf_counter()
    started_at, started_what = origin or (time.time(), "fit() was called")
    resolved = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    t = config.trainer

    # --- Set-up: logs, the state to resume from --------------------------------------------
    tracking.setup_logging(run_dir, backend.is_main_process)
    log.info(
        "run dir %s | backend %s | %d process(es) | device %s | mixed precision %s",
        *(run_dir, backend.name, backend.num_processes, backend.device, backend.mixed_precision.value),
    )
    seed_everything(config.seed)
    if backend.device.type == "cuda":  # TF32 matmuls and convolutions on Ampere and later (nanoGPT's line)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = t.tf32
    if not t.do_train:
        return evaluate_checkpoint(config, backend, run_dir)
    state_folder = resume.find_state(config.resume, run_dir) if config.resume else None
    if state_folder is not None:
        resume.check(state_folder, backend, resolved)

    # --- Data: read, map labels, tokenize (rank 0 fills the cache first) ------------------
    tokenizer = load_tokenizer(config.model)
    data = read_data(config, tokenizer, backend, run_dir)

    # --- Model with the weighted loss in its forward, then the speed wing (one call) ------
    seed_everything(config.seed)  # the same initial head whatever the data step consumed
    model = build_classifier(config, data)
    check_max_length(config.data.max_length, model.hf_model.config, config.model.source)
    if t.ema_decay is not None and backend.sharded:
        raise EngineError("trainer.ema_decay is not supported under FSDP (the average would need every shard)")
    ema = build_ema(model.hf_model, t.ema_decay, backend.device)  # copies the plain model: before the speed wing
    log.info("speed-ups: %s", ", ".join(speedups.apply(model, backend, config)) or "none")

    # --- Loaders, optimizer, schedule: placed by the backend -------------------------------
    collator = make_collator(tokenizer, config.data)
    workers = loader_workers(config.data, backend.device)
    dev_loader = run_eval_loader(data.eval, config, collator, backend.device)
    dev_order = row_order(dev_loader)
    train_dl, shuffler = train_loader(
        data.train, t.batch_size, config.seed, collator, group_by_length=config.data.group_by_length, **workers
    )
    optimizer = build_optimizer(model, config.optim, backend.device)
    model, optimizer, train_dl, dev_loader = backend.prepare(model, optimizer, train_dl, dev_loader)
    classifier = backend.unwrap_model(model)
    steps = total_steps(len(train_dl), t.grad_accum_steps, t.epochs, t.max_steps)
    (scheduler,) = backend.prepare(build_scheduler(optimizer, config.optim, steps))

    # --- Resume: a saved state replaces the fresh weights, optimizer and schedule ----------
    progress, saved = restore_or_start(
        config, state_folder, run_dir, backend, resolved, model, optimizer, scheduler, ema
    )
    resumed_at = progress.global_step if state_folder else None
    tracker = tracking.Tracker(
        run_dir, config.logger, backend.is_main_process, resolved, config.wandb_project, resumed_at
    )
    describe = describe_checkpoint(config, data, resolved)
    keep_best = BestKeeper(run_dir, config, backend, data.labels, describe, averaged=ema)
    keep_best.restore(saved["extra"])
    window = Window(backend.device, saved["extra"])
    if state_folder is not None:
        keep_best.check_on_disk(progress, model)
        checkpoint.restore_rng(saved["rng"])  # last: the resumed run draws the uninterrupted run's masks

    def save_state() -> None:
        if t.save_state:
            extra = {**window.state(), **keep_best.state()}
            resume.save(run_dir, backend, progress, model, optimizer, scheduler, extra, resolved, ema)

    # --- Train -----------------------------------------------------------------------------
    startup_seconds: float | None = None
    bar = tracking.progress_bar(steps, progress.global_step, t.progress and backend.is_main_process)
    parameters = list(model.parameters())  # walking the modules for them each step costs ~0.5 ms
    fp16 = backend.mixed_precision == MixedPrecision.fp16
    skips_on_device = None if fp16 else device_skippable(optimizer)
    no_flag = torch.zeros((), dtype=torch.bool, device=backend.device)
    resume_hint = f"continue with resume={run_dir}" if t.save_state else "no state saved (trainer.save_state=false)"
    window.start = time.perf_counter()
    model.train()
    with resume.StopSignal() as stop:
        while progress.epoch < t.epochs and progress.global_step < steps and not progress.early_stopped:
            epoch = progress.epoch
            shuffler.set_epoch(epoch)
            skip = progress.batches_in_epoch  # micro-batches this process already did
            epoch_loader = backend.skip_first_batches(train_dl, skip) if skip else train_dl
            for micro_batches in micro_batch_groups(epoch_loader, t.grad_accum_steps):
                progress.batches_in_epoch += len(micro_batches)
                micro_batches = [backend.to_device(b) for b in micro_batches]
                step_loss = forward_backward(model, classifier, backend, micro_batches)
                grad_norm = backend.clip_grad_norm_(parameters, t.max_grad_norm or float("inf"))
                nonfinite = no_flag if grad_norm is None or fp16 else ~torch.isfinite(grad_norm)
                step_unless_nonfinite(optimizer, nonfinite, skips_on_device)  # counted at the next logging step
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if startup_seconds is None:
                    startup_seconds = time.time() - started_at
                    log.info("first optimizer step done %.1f s after %s", startup_seconds, started_what)
                progress.global_step += 1
                progress.step_in_epoch += 1
                step = progress.global_step
                window.add(step_loss, nonfinite, micro_batches, progress)
                bar.update(1)

                logged = step % t.log_every == 0 or step == steps
                if logged:  # a CPU-GPU sync and all-reduces: every log_every steps
                    count_nonfinite_steps(progress, t, int(window.skipped))
                    norm = grad_norm if t.max_grad_norm else None
                    log_window(backend, tracker, bar, progress, window, scheduler.get_last_lr()[0], norm)

                if ema is not None:  # the moving average follows every optimizer step
                    ema.update_parameters(classifier.hf_model)
                paused = time.perf_counter()  # evaluating and saving are not training time
                if t.eval_every and step % t.eval_every == 0:
                    keep_best(model, dev_loader, dev_order, progress, tracker, epoch)
                end_of_epoch = progress.batches_in_epoch >= len(train_dl)
                # A stop signal is taken at the next logging step: one all-reduce every log_every steps.
                stopping = logged and backend.any_process(stop.received is not None)
                if stopping or (t.save_every and step % t.save_every == 0 and not end_of_epoch):
                    save_state()
                if stopping:
                    log.warning("stopped at step %d; %s", step, resume_hint)
                    raise SystemExit(stop.exit_code or 143)
                window.start += time.perf_counter() - paused
                if step >= steps or progress.early_stopped:  # early stopping ends the run as its last step would
                    break
            # End of the epoch (or of max_steps): evaluate, then save a state that starts the next one.
            paused = time.perf_counter()
            if t.eval_every == 0 and progress.last_eval_step != progress.global_step:
                keep_best(model, dev_loader, dev_order, progress, tracker, epoch)
            if progress.global_step < steps and not progress.early_stopped:
                progress.epoch, progress.step_in_epoch, progress.batches_in_epoch = epoch + 1, 0, 0
            save_state()
            window.start += time.perf_counter() - paused
        if stop.received is not None:
            log.warning("%s came after the last step: the run finishes", signal.Signals(stop.received).name)
    bar.close()
    if progress.last_eval_step != progress.global_step:
        keep_best(model, dev_loader, dev_order, progress, tracker, progress.epoch)
    return finish(
        config, backend, run_dir, model, data, collator, keep_best, progress, tracker, started, startup_seconds
    )


def check_max_length(max_length: int, model_config: Any, source: str) -> None:
    """``data.max_length`` within the positions the model has (checked before the first step)."""
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions is None:
        return
    if getattr(model_config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        positions -= (model_config.pad_token_id or 0) + 1  # position ids start after the padding index
    if max_length > positions:
        raise EngineError(
            f"data.max_length={max_length} is above the {positions} positions of {source}; set data.max_length<={positions}"
        )


def read_data(config: Config, tokenizer: Any, backend: Backend, run_dir: Path) -> Any:
    """Read, label and tokenize the splits (rank 0 fills the token cache first); log and save the pre-flight report."""
    with backend.main_process_first():
        data = load_data(config.data, tokenizer, with_train=True, with_test=config.trainer.evaluate_test)
    if len(data.train) < backend.num_processes:
        raise EngineError(
            f"{data.sources['train']}: {len(data.train)} training rows for {backend.num_processes} processes"
        )
    log.info("%s", format_preflight(data.preflight))
    if backend.is_main_process:
        checkpoint.atomic_write_json(run_dir / "preflight.json", data.preflight)
    return data


def restore_or_start(
    config: Config,
    state_folder: Path | None,
    run_dir: Path,
    backend: Backend,
    resolved: dict,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ema: torch.nn.Module | None,
) -> tuple[resume.Progress, dict[str, Any]]:
    """The saved state restored into the model, optimizer, scheduler and moving average: its
    progress and what it saved besides; or a fresh start, said loudly under ``resume=auto`` when the
    run dir holds an earlier run's files but no usable state."""
    if state_folder is not None:
        return resume.restore(state_folder, backend, resolved, model, optimizer, scheduler, averaged=ema)
    if config.resume == "auto":
        earlier = (run_dir / checkpoint.STATE_DIR).is_dir() or (run_dir / tracking.EVAL_METRICS).is_file()
        (log.warning if earlier else log.info)(
            "resume=auto: no usable saved state in %s; training starts from step 0%s",
            *(run_dir, " (the earlier run's metrics files start anew)" if earlier else ""),
        )
    return resume.Progress(), {"extra": {}}


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, nonfinite: torch.Tensor, skips_on_device: Any) -> None:
    """A step whose gradients hold a NaN/Inf leaves the weights and optimizer state as they were (it
    still counts in the schedule). ``nonfinite`` comes from the norm of the all-reduced gradients, so
    every rank decides alike. The fused AdamW skips on the device, told by the flag GradScaler also
    uses, so no CPU-GPU sync; another optimizer reads the flag here. fp16's GradScaler and DeepSpeed
    (no norm) skip on their own."""
    if skips_on_device is not None:
        skips_on_device.found_inf = nonfinite.float()
        optimizer.step()
    elif not bool(nonfinite):
        optimizer.step()


class Window:
    """The steps since the last log, summed on the device and read only at logging steps: the loss
    of the finite steps, non-pad tokens, skipped steps. Saved with the state (a resumed run logs the
    window the uninterrupted one would); samples and steps are counted in ``progress``."""

    def __init__(self, device: torch.device, saved: dict[str, torch.Tensor]) -> None:
        self.loss = saved.get("window_loss", torch.zeros(())).to(device)
        self.tokens = saved.get("window_tokens", torch.zeros((), dtype=torch.long)).to(device)
        self.skipped = saved.get("window_skipped", torch.zeros((), dtype=torch.long)).to(device)
        self.start = time.perf_counter()

    def add(self, step_loss: torch.Tensor, nonfinite: torch.Tensor, micro_batches: list, progress: Any) -> None:
        self.loss += torch.where(nonfinite, 0.0, step_loss)
        self.skipped += nonfinite
        self.tokens += sum(b["attention_mask"].sum() for b in micro_batches)
        progress.window_samples += sum(b["labels"].shape[0] for b in micro_batches)
        progress.window_steps += 1

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "window_loss": self.loss.cpu(),
            "window_tokens": self.tokens.cpu(),
            "window_skipped": self.skipped.cpu(),
        }


def log_window(backend, tracker, bar, progress, window: Window, lr: float, grad_norm) -> None:
    """Log the steps since the last log (loss, rate, throughput over all processes), then empty the window.
    The loss is the mean over the window's finite steps (``None`` when it has none)."""
    elapsed = time.perf_counter() - window.start
    finite_steps = progress.window_steps - int(window.skipped)
    total_loss = float(backend.reduce_sum(window.loss) / backend.num_processes)
    mean_loss = total_loss / finite_steps if finite_steps else None
    samples = int(backend.reduce_sum(torch.tensor(progress.window_samples, device=backend.device)))
    tokens = int(backend.reduce_sum(window.tokens))
    record = {
        "epoch": progress.epoch,
        "loss": mean_loss,
        "lr": lr,
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "samples_per_s": samples / max(elapsed, 1e-9),
        "tokens_per_s": tokens / max(elapsed, 1e-9),
    }
    tracker.log("train", record, progress.global_step)
    bar.set_postfix(loss=f"{mean_loss or float('nan'):.4f}", lr=f"{lr:.2e}", samples_s=f"{record['samples_per_s']:.1f}")
    progress.train_samples += samples
    progress.train_tokens += tokens
    progress.train_seconds += elapsed
    window.loss.zero_()
    window.tokens.zero_()
    window.skipped.zero_()
    window.start = time.perf_counter()
    progress.window_steps, progress.window_samples = 0, 0


def count_nonfinite_steps(progress: resume.Progress, t: Any, skipped: int) -> None:
    """Count the window's steps whose gradients were NaN/Inf (their updates already skipped); stop the
    run when ``trainer.on_nonfinite=stop`` or after ``trainer.max_nonfinite`` of them."""
    if not skipped:
        return
    progress.nonfinite_steps += skipped
    last = progress.global_step
    first = last - progress.window_steps + 1
    where = f"at step {last}" if first == last else f"in {skipped} of steps {first}-{last}"
    message = f"non-finite gradients {where}"
    if t.on_nonfinite == NonFinite.stop or progress.nonfinite_steps > t.max_nonfinite:
        raise EngineError(
            f"{message}; stopping (trainer.on_nonfinite={t.on_nonfinite.value}, "
            f"{progress.nonfinite_steps} non-finite steps, "
            f"trainer.max_nonfinite={t.max_nonfinite}); nothing non-finite was saved"
        )
    log.warning("%s: update skipped (%d so far)", message, progress.nonfinite_steps)


def describe_checkpoint(config: Config, data: Any, resolved: dict[str, Any]) -> dict[str, Any]:
    """What ``best_acc_classify.json`` says besides the metric, its value and the step."""
    import transformers  # loaded by now: the model is built

    labels = data.labels
    return {
        "model_source": config.model.source,
        "model_name": config.model.name,
        "tokenizer": config.model.tokenizer or config.model.source,
        "num_labels": labels.num_labels,
        "id2label": {str(i): name for i, name in labels.id2label.items()},
        "problem_type": labels.problem_type.value,
        "data_sources": data.sources,
        "config": resolved,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def finish(
    config: Config,
    backend: Backend,
    run_dir: Path,
    model: torch.nn.Module,
    data: Any,
    collator: Any,
    keep_best: BestKeeper,
    progress: resume.Progress,
    tracker: tracking.Tracker,
    started: float,
    startup_seconds: float | None,
) -> float:
    """After the last step: multi-label thresholds tuned on dev, the test split with the best
    weights, plots and ``summary.json``; returns the best dev metric."""
    t, labels = config.trainer, data.labels
    best_value, best_predictions = progress.best_value, keep_best.predictions
    if best_value is not None:  # the summary never names a best checkpoint that is not there
        missing = backend.broadcast_object(keep_best.missing(progress.best_step) if backend.is_main_process else None)
        if missing:
            raise EngineError(f"the best checkpoint is not on disk: {missing}")

    # --- Multi-label: decision thresholds tuned on dev with the best checkpoint ----------
    thresholds = None
    if labels.problem_type == ProblemType.multi_label_classification and best_predictions is not None:
        logits, gold = best_predictions
        thresholds = tune_thresholds(sigmoid(logits), gold)
        tuned = compute_metrics(logits, gold, labels.problem_type, threshold=thresholds["per_label"])
        tuned_text, global_threshold = format_metrics(tuned), thresholds["global"]
        log.info("dev with thresholds tuned per label: %s (global threshold %.2f)", tuned_text, global_threshold)
        if backend.is_main_process:
            info = checkpoint.load_info(run_dir / checkpoint.BEST_INFO)
            info.update(thresholds=thresholds, metrics_tuned_thresholds=tuned)
            checkpoint.atomic_write_json(run_dir / checkpoint.BEST_INFO, info)

    # --- The test split with the best weights (and the tuned thresholds) ----------------
    test_metrics: dict[str, float] | None = None
    if t.evaluate_test and data.test is not None and best_value is not None:
        best_weights = checkpoint.load_weights(run_dir / checkpoint.BEST_WEIGHTS) if backend.is_main_process else None
        backend.load_state_dict(model, backend.broadcast_object(best_weights))
        test_loader = run_eval_loader(data.test, config, collator, backend.device)
        test_order = row_order(test_loader)
        test_loader = backend.prepare(test_loader)[0]
        test_metrics, test_logits, test_gold = evaluate(
            model, test_loader, backend, labels.problem_type, t.progress, test_order
        )
        if thresholds is not None:
            tuned = compute_metrics(test_logits, test_gold, labels.problem_type, threshold=thresholds["per_label"])
            test_metrics.update({f"{k}_tuned": v for k, v in tuned.items()})
        tracker.log("test", test_metrics, progress.global_step)
        if backend.is_main_process:
            checkpoint.atomic_write_json(run_dir / "test_metrics.json", test_metrics)
        log.info("test (best checkpoint, step %d): %s", progress.best_step, format_metrics(test_metrics))
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
                f1, support = [r["f1"] for r in report], [r["support"] for r in report]
                title = "Per-label F1 (dev, best checkpoint, thresholds tuned per label)" if thresholds else None
                plots.plot_per_label_f1(f1, support, labels.names, run_dir / plots.PER_LABEL_F1, title=title)
        summary = {
            "best_metric": t.metric_for_best,
            "best_value": best_value,
            "best_step": progress.best_step,
            "steps": progress.global_step,
            "early_stopped": progress.early_stopped,
            "early_stopped_step": progress.global_step if progress.early_stopped else None,
            "test": test_metrics,
            "wall_seconds": time.perf_counter() - started,
            "startup_seconds": startup_seconds,
            "train_samples_per_s": progress.train_samples / max(progress.train_seconds, 1e-9),
            "train_tokens_per_s": progress.train_tokens / max(progress.train_seconds, 1e-9),
            "processes": backend.num_processes,
            "run_dir": str(run_dir),
            "files": sorted(p.name for p in run_dir.iterdir()),
        }
        checkpoint.atomic_write_json(run_dir / "summary.json", summary)
        log.info("%s", tracking.format_summary(summary))
    backend.wait_for_everyone()
    return float(best_value)
